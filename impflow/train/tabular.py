"""The ``tabular`` task: POWER, GAS, HEPMASS, MINIBOONE or BSDS300 (the MAF release's files,
preprocessing and splits, :func:`impflow.data.load_tabular`) fitted by an ImpFlow or a ResFlow
of Lipschitz MLPs; evaluated by the average negative log-likelihood in nats of the test and
validation splits (the convention of the MAF, FFJORD, ResFlow and ImpFlow tables, which print
its negative, the log-likelihood).

References:
    | Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017)
    | https://arxiv.org/abs/1705.07057

    | Implicit Normalizing Flows (Lu et al., 2021), §5.2 https://arxiv.org/abs/2103.09527
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from impflow.data.tabular import load_tabular
from impflow.nn import update_lipschitz
from impflow.train.evaluation import count_parameters, equal_size_blocks
from impflow.train.loop import Task
from impflow.train.models import VectorFlowOptions
from impflow.train.plots import _pyplot, _save
from impflow.train.solver_metrics import mean_forward_iterations

__all__ = ["TabularTask"]

EVAL_POWER_ITERATIONS = 200
IMPLICIT_BLOCKS = 5  # the paper's ImpFlow L = 5 against ResFlow L = 10 (Table 2)


class TabularTask(VectorFlowOptions, Task):
    """Fits a tabular benchmark with ``blocks`` blocks of ``model``.

    The defaults are the paper's tabular setting (its ``run_tabular.sh``): Sin MLPs
    ``d-128-128-128-128-d``, ``c = 0.99``, the unbiased series log-det with 2 exact terms in
    training and 20 in evaluation, batches of 1000; and ActNorm between blocks. Every split is
    already standardised by the loader.

    Args:
        dataset: one of ``power``, ``gas``, ``hepmass``, ``miniboone``, ``bsds300``.
        root: the MAF release's ``datasets`` folder.
        model: ``"implicit"`` or ``"residual"``.
        blocks: number of blocks; ``None``: 5 for an ImpFlow, 10 for a ResFlow (equal
            parameter count).
        hidden, activation, coeff, n_power_iterations: of each MLP.
        actnorm: ActNorm before every block and at the end.
        logdet: the blocks' log-det (``"series"``: the paper's; ``"exact"`` and ``"auto"`` as
            in :class:`~impflow.nn.ImplicitBlock`).
        batch_size: training rows per step, drawn with replacement from the training split.
        eval_samples: rows of each evaluated split (``None``: all of them).
        eval_batch_size: rows per evaluation forward.
        eval_seed: seeds the evaluation's probes and roulette draws.
    """

    name = "tabular"

    def __init__(
        self,
        dataset: str,
        root,
        model: str = "implicit",
        blocks: int | None = None,
        hidden=(128, 128, 128, 128),
        activation: str = "sin",
        coeff: float = 0.99,
        n_power_iterations: int = 5,
        actnorm: bool = True,
        logdet: str = "series",
        batch_size: int = 1000,
        eval_samples: int | None = None,
        eval_batch_size: int = 1000,
        eval_seed: int = 12345,
    ):
        if model not in ("implicit", "residual"):
            raise ValueError(f"model must be 'implicit' or 'residual', got {model!r}")
        if logdet not in ("series", "exact", "auto"):
            raise ValueError(f"logdet must be 'series', 'exact' or 'auto', got {logdet!r}")
        self.data = load_tabular(dataset, root)  # FileNotFoundError names the files expected
        self.dataset = dataset.lower()
        self.model = model
        self.blocks = (
            int(blocks) if blocks is not None else equal_size_blocks(IMPLICIT_BLOCKS, model)
        )
        self.hidden, self.activation, self.coeff = tuple(hidden), activation, coeff
        self.n_power_iterations, self.actnorm, self.logdet = n_power_iterations, actnorm, logdet
        self.batch_size, self.eval_samples = batch_size, eval_samples
        self.eval_batch_size, self.eval_seed = eval_batch_size, eval_seed

    def config(self) -> dict:
        return {
            "dataset": self.dataset,
            "n_dims": self.data.n_dims,
            **self.model_config(),
            "logdet": self.logdet,
            "batch_size": self.batch_size,
        }

    def build_model(self) -> nn.Module:
        return self.build_vector_flow(self.data.n_dims, logdet=self.logdet)

    def sample_batch(self, generator):
        index = torch.randint(len(self.data.train), (self.batch_size,), generator=generator)
        return self.data.train[index]

    def loss(self, model, batch):
        nll = -model.log_prob(batch).mean()
        return nll, {"bits": float(nll.detach()) / math.log(2), **mean_forward_iterations(model)}

    def _log_probs(self, model, split: torch.Tensor) -> torch.Tensor:
        """Per-row log-likelihoods (nats) of the first ``eval_samples`` rows, float64 on the
        CPU, with the estimator's draws seeded by ``eval_seed``."""
        param = next(model.parameters())
        rows = split[: self.eval_samples]
        if len(rows) == 0:
            raise ValueError(f"{self.dataset}: nothing to evaluate, the split is empty")
        with torch.random.fork_rng(devices=[param.device] if param.device.type == "cuda" else []):
            torch.manual_seed(self.eval_seed)
            return torch.cat(
                [
                    model.log_prob(chunk.to(param)).double().cpu()
                    for chunk in rows.split(self.eval_batch_size)
                ]
            )

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """``test_nll`` and ``val_nll`` (nats, mean per row) after ``EVAL_POWER_ITERATIONS``
        power iterations, with the evaluation-mode estimator (20 exact terms)."""
        update_lipschitz(model, EVAL_POWER_ITERATIONS)
        test, val = self._log_probs(model, self.data.test), self._log_probs(model, self.data.val)
        self._test_log_probs = test  # for the figure
        return {
            "test_nll": -float(test.mean()),
            "val_nll": -float(val.mean()),
            "test_rows": len(test),
            "val_rows": len(val),
            "n_dims": self.data.n_dims,
            "parameters": count_parameters(model),
            "blocks": self.blocks,
            "eval_power_iterations": EVAL_POWER_ITERATIONS,
        }

    @torch.no_grad()
    def figures(self, model, out: Path) -> list:
        """A histogram of the per-row test log-likelihoods."""
        log_probs = getattr(self, "_test_log_probs", None)
        if log_probs is None:
            log_probs = self._log_probs(model, self.data.test)
        return [
            _save_histogram(
                out / "test_log_likelihood.png",
                log_probs,
                xlabel="log-likelihood per test row (nats)",
                title=f"{self.dataset}: {self.model}, {self.blocks} blocks",
            )
        ]


def _save_histogram(path, values: torch.Tensor, *, xlabel: str, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    finite = values[torch.isfinite(values)].numpy()
    ax.hist(finite, bins=50)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.set_title(title)
    return _save(fig, plt, path)
