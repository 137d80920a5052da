"""update_lipschitz: power iteration on every spectral layer of a module, dense layers of one
dtype and device in one fused call."""

import torch
from torch import nn

from impflow.nn.spectral._checks import _check_n_iterations
from impflow.nn.spectral.conv import SpectralConv2d
from impflow.nn.spectral.linear import SpectralLinear
from impflow.ops.power import power_iteration

__all__ = ["update_lipschitz"]


@torch.no_grad()
def update_lipschitz(module: nn.Module, n_iterations: int = 20) -> int:
    """Runs power-iteration steps on every spectral layer inside ``module``.

    Call it before evaluation (and after loading weights) so that every ``σ`` estimate is
    converged and every layer is really ``coeff``-Lipschitz (DESIGN.md §7). A
    :class:`SpectralConv2d` that has not seen an input yet is skipped (its vectors are created,
    and iterated, at its first forward).

    Args:
        module: any module; ``module`` itself counts if it is a spectral layer.
        n_iterations: steps per layer (exactly that many; a positive int).

    Returns:
        The number of layers updated.
    """
    n_iterations = _check_n_iterations(n_iterations, "n_iterations")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    dense, count = {}, 0
    for layer in module.modules():
        if isinstance(layer, SpectralLinear):
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
            count += len(layers)
    return count
