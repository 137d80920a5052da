"""Helpers for the ResidualBlock / ImplicitBlock tests: small networks, a network whose
Lipschitz constant is broken by hand, the residual of a block's equation, and the mean of many
series log-det draws."""

import torch
from torch import nn

import impflow.nn as inn
from impflow.nn import SpectralLinear


def mlp(d, hidden=16, coeff=0.9, activation="lipswish"):
    return inn.LipschitzMLP([d, hidden, d], activation=activation, coeff=coeff)


def convnet(channels, size, hidden=8, coeff=0.9):
    return inn.LipschitzConvNet(channels, hidden, coeff=coeff, input_size=size)


def networks(kind, dtype):
    """A pair of networks and an input for ``kind`` "vector" ``(B, 3)`` or "image"
    ``(B, 2, 4, 4)``."""
    if kind == "vector":
        nets = (mlp(3), mlp(3))
        shape = (3,)
    else:
        nets = (convnet(2, (4, 4)), convnet(2, (4, 4)))
        shape = (2, 4, 4)
    return tuple(n.to(dtype) for n in nets), shape


@torch.no_grad()
def break_lipschitz(net: nn.Module, scale: float = 3.0) -> nn.Module:
    """Sets every dense spectral layer's weight to spectral norm ``scale`` and its ``u`` to a
    vector orthogonal to ``W v``, so that the stored estimate ``σ = uᵀWv`` is 0 and (in eval
    mode) the weight is used unnormalised: ``σ > 1`` set by hand. The vectors count as
    refreshed for the new weight (as after a ``power_iteration`` call that stopped too early),
    so that eval-mode forwards use them instead of refreshing them."""
    for m in net.modules():
        if isinstance(m, SpectralLinear):
            w = m.weight
            w.mul_(scale / torch.linalg.matrix_norm(w, ord=2))
            wv = w @ m.v
            u = torch.randn_like(m.u)
            u -= (u @ wv) / (wv @ wv) * wv
            m.u.copy_(u / u.norm())
            m._mark_vectors_current()
    return net.eval()


class Zero(nn.Module):
    """``g ≡ 0`` (with a graph, so that derivatives are zeros rather than missing)."""

    def forward(self, x):
        return x * 0


def implicit_residual(block, x, z):
    """``g_x(x) + x - g_z(z) - z`` evaluated without power iteration (call in eval mode)."""
    with torch.no_grad():
        return block.g_x(x) + x - block.g_z(z) - z


def max_abs_per_sample(t):
    return t.reshape(t.shape[0], -1).abs().amax(1)
