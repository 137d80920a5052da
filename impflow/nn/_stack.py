"""What the Lipschitz networks share: a fresh activation per position, and slicing."""

from __future__ import annotations

import copy
import operator
from collections import OrderedDict

from torch import nn

from impflow.nn.activations import make_activation


def fresh_activation(activation) -> nn.Module:
    """A new activation module for one position of a network: a module given as a template is
    copied (so each position keeps its own parameters, e.g. LipSwish's β), anything else goes
    through :func:`make_activation`."""
    if isinstance(activation, nn.Module):
        return copy.deepcopy(activation)
    return make_activation(activation)


class LayerStack(nn.Sequential):
    """An ``nn.Sequential`` whose slices are plain ``nn.Sequential``s: the default rebuilds a
    slice with ``type(self)(OrderedDict)``, which the subclasses' constructors do not take.
    An integer picks a layer as ``nn.Sequential`` does (negative counts from the end), from a
    plain list: torch 2.4's dynamo cannot trace ``nn.Sequential``'s own lookup from a
    subclass."""

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        layers = list(self._modules.values())
        idx = operator.index(idx)
        if not -len(layers) <= idx < len(layers):
            raise IndexError(f"index {idx} is out of range")
        return layers[idx]
