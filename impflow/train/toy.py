"""The ``toy`` task: a 2-D density (checkerboard, 8gaussians, ...) fitted by an ImpFlow or a
ResFlow; evaluated by test bits (negative log-likelihood per sample in bits, exact log-det)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from impflow.data.toy import sample_toy
from impflow.nn import update_lipschitz
from impflow.train.loop import Task
from impflow.train.models import VectorFlowOptions
from impflow.train.plots import save_density_and_samples
from impflow.train.solver_metrics import mean_forward_iterations

__all__ = ["ToyTask"]

EVAL_SAMPLES = 10_000
EVAL_POWER_ITERATIONS = 200


class ToyTask(VectorFlowOptions, Task):
    """Fits ``dataset`` with ``blocks`` blocks of ``model``: Sin MLPs 2-64-64-2 by default
    (at equal wall-clock on a CPU they beat DESIGN.md §5's 128-wide ones: README,
    Reproductions), coeff 0.99, 5 power iterations per training forward, exact log-det."""

    name = "toy"

    def __init__(
        self,
        dataset: str,
        model: str,
        blocks: int,
        hidden=(64, 64),
        activation: str = "sin",
        coeff: float = 0.99,
        n_power_iterations: int = 5,
        actnorm: bool = False,
        batch_size: int = 500,
        eval_seed: int = 12345,
        eval_samples: int = EVAL_SAMPLES,
        figure_resolution: int = 200,
    ):
        sample_toy(dataset, 1)  # checks the name
        self.dataset, self.model, self.blocks = dataset, model, blocks
        self.hidden, self.activation, self.coeff = tuple(hidden), activation, coeff
        self.n_power_iterations, self.actnorm = n_power_iterations, actnorm
        self.batch_size, self.eval_seed = batch_size, eval_seed
        self.eval_samples, self.figure_resolution = eval_samples, figure_resolution

    def config(self) -> dict:
        return {"dataset": self.dataset, **self.model_config(), "batch_size": self.batch_size}

    def build_model(self) -> nn.Module:
        return self.build_vector_flow(2, logdet="exact")

    def sample_batch(self, generator):
        return sample_toy(self.dataset, self.batch_size, generator=generator)

    def loss(self, model, batch):
        nll = -model.log_prob(batch).mean()
        return nll, {"bits": float(nll.detach()) / math.log(2), **mean_forward_iterations(model)}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """``test_bits`` on fresh samples after ``EVAL_POWER_ITERATIONS`` power iterations."""
        update_lipschitz(model, EVAL_POWER_ITERATIONS)
        param = next(model.parameters())
        x = sample_toy(self.dataset, self.eval_samples, generator=self.eval_seed).to(param)
        log_prob = torch.cat([model.log_prob(chunk) for chunk in x.split(2500)])
        return {
            "test_bits": float(-log_prob.mean()) / math.log(2),
            "test_samples": self.eval_samples,
            "eval_power_iterations": EVAL_POWER_ITERATIONS,
        }

    @torch.no_grad()
    def figures(self, model, out: Path) -> list:
        param = next(model.parameters())
        data = sample_toy(self.dataset, self.eval_samples, generator=self.eval_seed + 1)
        samples = model.sample((self.eval_samples,)).to(param)
        path = save_density_and_samples(
            out / "density.png",
            lambda p: model.log_prob(p.to(param)),
            samples,
            data,
            resolution=self.figure_resolution,
            title=f"{self.dataset}: {self.model}, {self.blocks} blocks",
        )
        return [path]
