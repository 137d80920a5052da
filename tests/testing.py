"""Helpers shared by the tests: devices, dtypes and error measures."""

import pytest
import torch

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
