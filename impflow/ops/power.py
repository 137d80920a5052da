"""Python entry point of the fused power-iteration op (torch.ops.impflow.power_iteration)."""

import torch
from torch.torch_version import TorchVersion

from impflow._extension import check_device, check_same_device
from impflow.ops.reference import check_power_iteration_lists, power_iteration_reference

__all__ = ["power_iteration"]

# torch < 2.5 cannot functionalize a custom op that mutates a list of tensors (Tensor(a!)[]:
# auto_functionalize learnt it in 2.5), so torch.compile fails on this op there. A graph being
# compiled on such a torch runs the reference instead: plain PyTorch, the same contract.
_COMPILE_TAKES_REFERENCE = TorchVersion(torch.__version__) < (2, 5)


def power_iteration(weights, us, vs, n_iterations):
    """Power iteration for several matrices in one call; same contract as
    :func:`impflow.ops.reference.power_iteration_reference`.

    Each matrix is read from memory once per call on the CPU (its steps run while it stays in
    cache), and the whole list is one kernel launch on CUDA. The layers run in parallel, so
    no vector of ``us`` or ``vs`` may share memory with another one or with a weight.
    """
    weights, us, vs = list(weights), list(us), list(vs)
    if not weights and not us and not vs:
        # The dispatcher needs a tensor to pick a kernel: the checks of empty lists run here.
        check_power_iteration_lists(weights, us, vs, n_iterations)
        return torch.empty(0)
    if weights:
        check_device(weights[0], "ops.power_iteration")
    if _COMPILE_TAKES_REFERENCE and torch.compiler.is_compiling():
        return power_iteration_reference(weights, us, vs, n_iterations)
    try:
        return torch.ops.impflow.power_iteration(weights, us, vs, n_iterations)
    except NotImplementedError:
        # No kernel for the device the dispatcher chose: say which argument is elsewhere.
        check_same_device("power_iteration", _named(weights, us, vs))
        raise


def _named(weights, us, vs):
    named = [(f"weights[{i}]", t) for i, t in enumerate(weights)]
    named += [(f"us[{i}]", t) for i, t in enumerate(us)]
    return named + [(f"vs[{i}]", t) for i, t in enumerate(vs)]


@torch.library.register_fake("impflow::power_iteration")
def _power_iteration_fake(weights, us, vs, n_iterations):
    check_power_iteration_lists(weights, us, vs, n_iterations)
    if not weights:
        return torch.empty(0)
    # Also reached by one meta tensor among real ones, where it must not pass for a result.
    check_same_device("power_iteration", _named(weights, us, vs))
    return weights[0].new_empty((len(weights),))
