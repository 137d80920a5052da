"""Evaluating a network ``g`` privately: detached parameter aliases, a snapshot of its buffers
and of the random state, and a check that a graph reaches no other trainable tensor.

Used by the backward-in-forward estimator, which differentiates ``g`` inside the forward pass
(and again, sometimes, inside the backward pass) without disturbing the outer graph: user
gradient hooks on the parameters must not fire there, and a recomputation must see the same
function as the forward (same spectral-norm vectors, same dropout mask).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn


def trainable_parameters(g) -> list[Tensor]:
    """The parameters of ``g`` that require grad (none for a callable that is not a module)."""
    if not isinstance(g, nn.Module):
        return []
    return [p for p in g.parameters() if p.requires_grad]


@contextlib.contextmanager
def parameter_aliases(g, params: Sequence[Tensor]) -> Iterator[list[Tensor]]:
    """Swaps each of ``params`` inside ``g`` for a detached alias (same storage, new leaf).

    Gradients taken with respect to the aliases leave the real parameters untouched: their
    hooks do not fire, nothing accumulates in ``.grad``. Shared (tied) parameters get one alias.

    Yields:
        The aliases, in the order of ``params``.
    """
    aliases = {id(p): nn.Parameter(p.detach(), requires_grad=True) for p in params}
    swapped = []
    if isinstance(g, nn.Module):
        for module in g.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) in aliases:
                    swapped.append((module, name, p))
    try:
        for module, name, p in swapped:
            module._parameters[name] = aliases[id(p)]
        yield [aliases[id(p)] for p in params]
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


class StateSnapshot:
    """Buffers of ``g`` and the random-number state (CPU, and the CUDA device of ``x``) taken
    before ``g`` runs, so that a recomputation evaluates the same function.

    A training-mode forward may update buffers in place (power-iteration vectors of spectral
    normalisation, batch-norm statistics) and draw random numbers (dropout); replaying it from
    the snapshot reproduces the forward's weights and masks, and the live buffers and random
    state are left as they are.
    """

    def __init__(self, g, device: torch.device):
        self._buffers = []
        if isinstance(g, nn.Module):
            for module in g.modules():
                for name, b in module._buffers.items():
                    if b is not None:
                        self._buffers.append((module, name, b.detach().clone()))
        self._devices = _rng_devices(device)
        self._cpu_rng = torch.get_rng_state()
        self._cuda_rng = [torch.cuda.get_rng_state(d) for d in self._devices]

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Inside: ``g`` holds fresh copies of the snapshot buffers (its own are swapped out,
        untouched, and put back after) and the random state is the snapshot's."""
        originals = [(module, name, module._buffers[name]) for module, name, _ in self._buffers]
        with torch.random.fork_rng(devices=self._devices):
            torch.set_rng_state(self._cpu_rng)
            for d, state in zip(self._devices, self._cuda_rng):
                torch.cuda.set_rng_state(state, d)
            try:
                for module, name, saved in self._buffers:
                    module._buffers[name] = saved.clone()
                yield
            finally:
                for module, name, b in originals:
                    module._buffers[name] = b


def foreign_leaves(output: Tensor, allowed: Sequence[Tensor]) -> list[Tensor]:
    """Leaf tensors that require grad, reached from ``output``'s graph, other than ``allowed``."""
    allowed_ids = {id(t) for t in allowed}
    found, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None and id(variable) not in allowed_ids:
            found.append(variable)
        stack.extend(child for child, _ in node.next_functions)
    return found
