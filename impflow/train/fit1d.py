"""The ``fit1d`` task: the paper's 1-D function-fitting example. One ImpFlow block and one
ResFlow block (equal depth) are each fitted by least squares to a strictly increasing target
whose slope ranges over [0.1, 10] (:mod:`impflow.data.fit1d`). A ResFlow block's slope lies in
``(1 - c, 1 + c) ⊂ (0, 2)``, so it cannot follow the slope-10 part; an ImpFlow block can."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from impflow.data.fit1d import fit1d_dataset, fit1d_derivative
from impflow.nn import update_lipschitz
from impflow.train.loop import Task
from impflow.train.models import block
from impflow.train.plots import save_curves

__all__ = ["Fit1dTask"]

KINDS = ("implicit", "residual")
EVAL_POWER_ITERATIONS = 200


class Fit1dTask(Task):
    name = "fit1d"

    def __init__(
        self,
        hidden=(32,),
        activation: str = "elu",
        coeff: float = 0.97,
        n_power_iterations: int = 5,
        batch_size: int = 256,
    ):
        self.hidden, self.activation, self.coeff = tuple(hidden), activation, coeff
        self.n_power_iterations, self.batch_size = n_power_iterations, batch_size

    def config(self) -> dict:
        return {
            "hidden": list(self.hidden),
            "activation": self.activation,
            "coeff": self.coeff,
            "n_power_iterations": self.n_power_iterations,
            "batch_size": self.batch_size,
        }

    def build_model(self) -> nn.Module:
        return nn.ModuleDict(
            {
                kind: block(
                    kind,
                    1,
                    self.hidden,
                    activation=self.activation,
                    coeff=self.coeff,
                    n_power_iterations=self.n_power_iterations,
                    logdet="exact",
                )
                for kind in KINDS
            }
        )

    def sample_batch(self, generator):
        x, y = fit1d_dataset(self.batch_size, grid=False, generator=generator)
        return torch.cat([x, y], dim=1)

    def loss(self, model, batch):
        x, y = batch[:, :1], batch[:, 1:]
        errors = {kind: ((model[kind](x)[0] - y) ** 2).mean() for kind in KINDS}
        return sum(errors.values()), {f"mse_{k}": float(v.detach()) for k, v in errors.items()}

    @torch.no_grad()
    def _fits(self, model):
        """Grid ``x``, target ``y``, and per block its fit and slope (``exp(logdet)`` in 1-D)."""
        update_lipschitz(model, EVAL_POWER_ITERATIONS)  # the Lipschitz bound holds at evaluation
        x, y = fit1d_dataset(1000, grid=True)
        param = next(model.parameters())
        x, y = x.to(param), y.to(param)
        outputs = {kind: model[kind](x) for kind in KINDS}
        fits = {kind: z for kind, (z, _) in outputs.items()}
        slopes = {kind: logdet.exp() for kind, (_, logdet) in outputs.items()}
        return x, y, fits, slopes

    def evaluate(self, model) -> dict:
        x, y, fits, slopes = self._fits(model)
        metrics = {f"grid_mse_{k}": float(((f - y) ** 2).mean()) for k, f in fits.items()}
        metrics.update({f"max_slope_{k}": float(s.max()) for k, s in slopes.items()})
        metrics["target_max_slope"] = float(fit1d_derivative(x).max())
        return metrics

    def figures(self, model, out: Path) -> list:
        x, y, fits, _ = self._fits(model)
        curves = {"target": y[:, 0], **{f"{k} block": f[:, 0] for k, f in fits.items()}}
        return [
            save_curves(
                out / "fit1d.png", x[:, 0], curves, title="one ImpFlow block vs one ResFlow block"
            )
        ]
