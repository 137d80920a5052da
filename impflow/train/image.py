"""The ``image`` task: the paper's multi-scale image flow (:func:`image_flow`) on
scikit-learn's 8×8 digits (CPU-sized) or CIFAR-10, trained and evaluated in bits per dimension
of uniformly dequantised pixels (the logit transform's Jacobian is part of the flow's
``log_prob``; :meth:`impflow.data.ImageData.bits_per_dim` adds ``log₂ n_bins``).

References:
    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735

    | Implicit Normalizing Flows (Lu et al., 2021), §5.3 https://arxiv.org/abs/2103.09527
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from impflow.data.images import IMAGE_DATASETS, dequantize, load_images
from impflow.nn import update_lipschitz
from impflow.train.evaluation import count_parameters, equal_size_blocks, mean_over_chunks
from impflow.train.image_model import check_levels, image_flow
from impflow.train.loop import Task
from impflow.train.plots import save_image_grid
from impflow.train.solver_metrics import mean_forward_iterations

__all__ = ["IMAGE_PRESETS", "ImageTask"]

EVAL_POWER_ITERATIONS = 200

IMAGE_PRESETS = {
    # CPU-sized: two levels (1×8×8, then 2×4×4 after the squeeze and factor-out).
    "digits": {"blocks": (2, 2), "hidden_channels": 32},
    # The paper's CIFAR-10 ImpFlow (its run_cifar10.sh): 2-2-2 blocks, 512 channels, c = 0.9.
    "cifar10": {"blocks": (2, 2, 2), "hidden_channels": 512},
}
"""ImpFlow's blocks per level and hidden channels per dataset (a ResFlow gets twice the blocks,
so that both have the same number of networks and about the same number of parameters)."""


class ImageTask(Task):
    """Fits ``dataset`` with the multi-scale flow of ``model`` blocks.

    Args:
        dataset: ``"digits"`` or ``"cifar10"``.
        root: CIFAR-10's folder (its python version); unused for digits.
        model: ``"implicit"`` or ``"residual"``.
        blocks: blocks per level; ``None``: the preset's for an ImpFlow, twice as many for a
            ResFlow (equal parameter count).
        hidden_channels: channels inside each network (``None``: the preset's).
        kernel_sizes, activation, coeff, n_power_iterations: of each network (the paper's
            3-1-3 LipSwish nets, ``c = 0.9``, 5 power iterations per training forward).
        alpha: the logit transform's ``α`` (0.05, as ResFlow on CIFAR-10).
        n_exact_terms: exact terms of the training log-det series (20 in evaluation).
        batch_size: training images per step.
        eval_samples: test images evaluated (``None``: the whole test split).
        eval_batch_size: images per evaluation forward.
        figure_samples: images in ``samples.png``.
        eval_seed: seeds the evaluation's dequantisation noise, probes and sampling.
    """

    name = "image"

    def __init__(
        self,
        dataset: str = "digits",
        root=None,
        model: str = "implicit",
        blocks=None,
        hidden_channels: int | None = None,
        kernel_sizes=(3, 1, 3),
        activation: str = "lipswish",
        coeff: float = 0.9,
        n_power_iterations: int = 5,
        alpha: float = 0.05,
        n_exact_terms: int = 2,
        batch_size: int = 64,
        eval_samples: int | None = None,
        eval_batch_size: int = 256,
        figure_samples: int = 64,
        eval_seed: int = 12345,
    ):
        if dataset not in IMAGE_DATASETS:
            raise ValueError(f"dataset must be one of {IMAGE_DATASETS}, got {dataset!r}")
        if model not in ("implicit", "residual"):
            raise ValueError(f"model must be 'implicit' or 'residual', got {model!r}")
        preset = IMAGE_PRESETS[dataset]
        if blocks is None:
            blocks = equal_size_blocks(preset["blocks"], model)
        elif isinstance(blocks, int):
            blocks = (blocks,) * len(preset["blocks"])
        self.data = load_images(dataset, root)  # FileNotFoundError names the files expected
        check_levels(self.data.shape, len(blocks))
        self.dataset, self.model, self.blocks = dataset, model, tuple(int(b) for b in blocks)
        self.hidden_channels = int(hidden_channels or preset["hidden_channels"])
        self.kernel_sizes, self.activation = tuple(kernel_sizes), activation
        self.coeff, self.n_power_iterations = coeff, n_power_iterations
        self.alpha, self.n_exact_terms = alpha, n_exact_terms
        self.batch_size, self.eval_samples = batch_size, eval_samples
        self.eval_batch_size, self.figure_samples = eval_batch_size, figure_samples
        self.eval_seed = eval_seed

    def config(self) -> dict:
        return {
            "dataset": self.dataset,
            "model": self.model,
            "blocks": list(self.blocks),
            "hidden_channels": self.hidden_channels,
            "kernel_sizes": list(self.kernel_sizes),
            "activation": self.activation,
            "coeff": self.coeff,
            "n_power_iterations": self.n_power_iterations,
            "alpha": self.alpha,
            "n_exact_terms": self.n_exact_terms,
            "batch_size": self.batch_size,
        }

    def build_model(self) -> nn.Module:
        return image_flow(
            self.model,
            tuple(self.data.shape),
            self.blocks,
            self.hidden_channels,
            kernel_sizes=self.kernel_sizes,
            activation=self.activation,
            coeff=self.coeff,
            n_power_iterations=self.n_power_iterations,
            alpha=self.alpha,
            logdet={"n_exact_terms": self.n_exact_terms, "eval_exact_terms": 20},
        )

    def sample_batch(self, generator):
        index = torch.randint(len(self.data.train), (self.batch_size,), generator=generator)
        return dequantize(self.data.train[index], self.data.n_bins, generator=generator)

    def loss(self, model, batch):
        bits = self.data.bits_per_dim(model.log_prob(batch)).mean()
        return bits, {"bits": float(bits.detach()), **mean_forward_iterations(model)}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """``test_bits_per_dim`` on the test split (one fixed dequantisation) after
        ``EVAL_POWER_ITERATIONS`` power iterations, with the evaluation-mode estimator."""
        update_lipschitz(model, EVAL_POWER_ITERATIONS)
        param = next(model.parameters())
        test = self.data.test[: self.eval_samples]
        x = dequantize(test, self.data.n_bins, generator=self.eval_seed)
        with torch.random.fork_rng(devices=_cuda_devices(param)):
            torch.manual_seed(self.eval_seed)
            bits = mean_over_chunks(
                lambda chunk: self.data.bits_per_dim(model.log_prob(chunk.to(param))),
                x,
                self.eval_batch_size,
            )
        return {
            "test_bits_per_dim": bits,
            "test_images": len(test),
            "n_bins": self.data.n_bins,
            "parameters": count_parameters(model),
            "blocks": list(self.blocks),
            "eval_power_iterations": EVAL_POWER_ITERATIONS,
        }

    @torch.no_grad()
    def figures(self, model, out: Path) -> list:
        param = next(model.parameters())
        with torch.random.fork_rng(devices=_cuda_devices(param)):
            torch.manual_seed(self.eval_seed + 1)
            samples = model.sample((self.figure_samples,))
        # The logit transform's inverse lands slightly outside [0, 1] near the edges.
        samples = samples.clamp(0, 1)
        return [
            save_image_grid(
                out / "samples.png",
                samples,
                title=f"{self.dataset}: {self.model}, blocks {'-'.join(map(str, self.blocks))}",
            )
        ]


def _cuda_devices(param: torch.Tensor) -> list:
    return [param.device] if param.device.type == "cuda" else []
