"""Helpers shared by the tests: devices, dtypes, error measures and a small test network."""

import math

import pytest
import torch
from torch import nn

import impflow

HAS_CUDA = torch.cuda.is_available() and impflow.has_cuda_kernels()

# Every op test runs on each device; CUDA cases are skipped (and say why) without a GPU.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")],
    ),
]
DTYPES = [torch.float32, torch.float64]

# Relative error allowed against a float64 reference: float32 rounding, accumulated over
# a few hundred terms, stays well under 1e-5; float64 under 1e-12.
REL_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / max(||ref||, tiny), computed in float64; NaN anywhere gives inf."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp(min=1e-300))


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a tensor with other strides (a transposed copy)."""
    return (
        t.t().contiguous().t() if t.dim() == 2 else t.transpose(0, -1).contiguous().transpose(0, -1)
    )


def scaled_to_norm(w: torch.Tensor, norm: float) -> torch.Tensor:
    """``w`` rescaled to spectral norm ``norm``."""
    return w * (norm / torch.linalg.matrix_norm(w, 2))


class TanhMLP(nn.Module):
    """``d``-``hidden``-``d`` tanh MLP in float64 with each weight scaled once to spectral norm
    ``√lip``, so ``Lip(g) ≤ lip``; every parameter but the output bias enters the Jacobian."""

    def __init__(self, d, hidden, lip):
        super().__init__()
        self.l1 = nn.Linear(d, hidden, dtype=torch.float64)
        self.l2 = nn.Linear(hidden, d, dtype=torch.float64)
        with torch.no_grad():
            w1 = torch.randn(hidden, d, dtype=torch.float64)
            self.l1.weight.copy_(scaled_to_norm(w1, math.sqrt(lip)))
            w2 = torch.randn(d, hidden, dtype=torch.float64)
            self.l2.weight.copy_(scaled_to_norm(w2, math.sqrt(lip)))
            self.l1.bias.normal_()
            self.l2.bias.normal_()

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))
