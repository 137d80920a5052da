"""update_lipschitz: power iteration on every spectral layer of a module, dense layers of one
dtype and device in one fused call."""

from __future__ import annotations

import torch
from torch import nn

from impflow.nn.spectral._checks import _check_n_iterations, _check_tol
from impflow.nn.spectral.conv import SpectralConv2d
from impflow.nn.spectral.linear import SpectralLinear
from impflow.ops.power import power_iteration

__all__ = ["update_lipschitz"]


@torch.no_grad()
def update_lipschitz(
    module: nn.Module,
    n_iterations: int = 20,
    atol: float | None = None,
    rtol: float | None = None,
) -> int:
    """Runs power-iteration steps on every spectral layer inside ``module``.

    Eval-mode forwards refresh stale estimates on their own (see :class:`SpectralLinear`);
    call this to choose the number of steps yourself, to converge every layer at once, or
    before compiling an eval-mode model (a compiled graph does not refresh). It counts as a
    refresh: the eval-mode forwards that follow use the vectors as it leaves them. A
    :class:`SpectralConv2d` that has not seen an input yet is skipped (its vectors are created,
    and iterated, at its first forward). Convolutions with close top singular values can need
    hundreds of steps: pass a tolerance and a generous ``n_iterations`` to run each layer until
    its vectors stop changing.

    Args:
        module: any module; ``module`` itself counts if it is a spectral layer.
        n_iterations: steps per layer (exactly that many without a tolerance; at most that
            many with one; a positive int).
        atol, rtol: when either is given, each layer stops after the first step in which
            ``u`` and ``v`` change by less than ``atol + rtol·max|·|`` (root mean square,
            ResFlow's test; layer by layer instead of the one fused call for dense layers).

    Returns:
        The number of layers updated.
    """
    n_iterations = _check_n_iterations(n_iterations, "n_iterations")
    atol, rtol = _check_tol(atol, "atol"), _check_tol(rtol, "rtol")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    tolerance = atol is not None or rtol is not None
    dense, count = {}, 0
    for layer in module.modules():
        if tolerance and isinstance(layer, (SpectralLinear, SpectralConv2d)) and layer._ready():
            layer.power_iteration(n_iterations, atol, rtol)
            count += 1
        elif isinstance(layer, SpectralLinear):
            # Dense layers of one dtype and device go through a single fused call.
            dense.setdefault((layer.weight.dtype, layer.weight.device), []).append(layer)
        elif isinstance(layer, SpectralConv2d) and layer._ready():
            layer.power_iteration(n_iterations)
            count += 1
    with torch.no_grad():
        for layers in dense.values():
            power_iteration(
                [layer.weight.detach() for layer in layers],
                [layer.u for layer in layers],
                [layer.v for layer in layers],
                n_iterations,
            )
            for layer in layers:
                layer._mark_vectors_current()
            count += len(layers)
    return count
