"""Small invertible layers with known log-dets for the flow tests, and the autograd reference
log-det (slogdet of the Jacobian of the flattened per-sample map)."""

import torch
from torch import nn


class ElementwiseAffine(nn.Module):
    """``z = x · exp(log_scale) + shift`` with one parameter per entry of the sample shape."""

    def __init__(self, shape):
        super().__init__()
        self.log_scale = nn.Parameter(0.2 * torch.randn(shape))
        self.shift = nn.Parameter(torch.randn(shape))

    def forward(self, x):
        z = x * self.log_scale.exp() + self.shift
        return z, self.log_scale.sum().expand(x.shape[0]).to(x.dtype)

    def inverse(self, z):
        x = (z - self.shift) * torch.exp(-self.log_scale)
        return x, -self.log_scale.sum().expand(z.shape[0]).to(z.dtype)


class Invertible1x1Conv(nn.Module):
    """``z[:, i] = Σ_j W[i, j] x[:, j]`` at every position, for ``(B, C)`` or ``(B, C, *)``;
    ``logdet = log|det W| · positions``. ``W`` starts near the identity (``‖W - I‖ ≲ 0.5``), so
    it is invertible and well conditioned."""

    def __init__(self, channels):
        super().__init__()
        noise = torch.randn(channels, channels) / channels**0.5
        self.weight = nn.Parameter(torch.eye(channels) + 0.25 * noise)

    def _mix(self, w, x):
        return torch.einsum("ij,bj...->bi...", w, x)

    def _logdet(self, x):
        return (torch.linalg.slogdet(self.weight)[1] * x[0, 0].numel()).expand(x.shape[0])

    def forward(self, x):
        return self._mix(self.weight.to(x.dtype), x), self._logdet(x).to(x.dtype)

    def inverse(self, z):
        w_inv = torch.linalg.inv(self.weight.to(z.dtype))
        return self._mix(w_inv, z), -self._logdet(z).to(z.dtype)


class LinearFlow(nn.Module):
    """``z = A x + b`` for vectors ``(B, d)`` with fixed ``A``, ``b`` (buffers)."""

    def __init__(self, A, b):
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("b", b)

    def forward(self, x):
        return x @ self.A.T + self.b, torch.linalg.slogdet(self.A)[1].expand(x.shape[0])

    def inverse(self, z):
        x = torch.linalg.solve(self.A, (z - self.b).T).T
        return x, -torch.linalg.slogdet(self.A)[1].expand(z.shape[0])


class ChannelDrop(nn.Module):
    """A faulty "flow" layer that changes the shape without saying so (drops a channel)."""

    def forward(self, x):
        return x[:, 1:], x.new_zeros(x.shape[0])

    def inverse(self, z):
        return z, z.new_zeros(z.shape[0])


class BadLogdet(nn.Module):
    """A faulty layer whose log-det has one value per entry instead of one per sample."""

    def forward(self, x):
        return x, torch.zeros_like(x)

    def inverse(self, z):
        return z, torch.zeros_like(z)


def autograd_logdet(fn, x):
    """``log|det ∂fn(x)/∂x|`` per sample, from the full Jacobian of the flattened map of one
    sample (``fn`` maps ``(1, ...)`` to ``((1, ...), logdet)``)."""
    values = []
    for sample in x:
        jac = torch.autograd.functional.jacobian(
            lambda v: fn(v.unsqueeze(0))[0].reshape(-1), sample
        )
        jac = jac.reshape(jac.shape[0], -1)
        assert jac.shape[0] == jac.shape[1], "the map must keep the number of entries"
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign != 0, "the Jacobian is singular"
        values.append(logabsdet)
    return torch.stack(values)
