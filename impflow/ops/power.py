"""Python entry point of the fused power-iteration op (torch.ops.impflow.power_iteration)."""

import torch

from impflow._extension import check_device

__all__ = ["power_iteration"]


def power_iteration(weights, us, vs, n_iterations):
    """Power iteration for several matrices in one call; same contract as
    :func:`impflow.ops.reference.power_iteration_reference`.

    Each matrix is read from memory once per call on the CPU (its steps run while it stays in
    cache), and the whole list is one kernel launch on CUDA.
    """
    weights, us, vs = list(weights), list(us), list(vs)
    if not weights and not us and not vs:
        return torch.empty(0)  # the dispatcher needs a tensor to pick a backend
    if weights:
        check_device(weights[0], "ops.power_iteration")
    return torch.ops.impflow.power_iteration(weights, us, vs, n_iterations)


@torch.library.register_fake("impflow::power_iteration")
def _power_iteration_fake(weights, us, vs, n_iterations):
    if not weights:
        return torch.empty(0)
    return weights[0].new_empty((len(weights),))
