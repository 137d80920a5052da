"""The original ImpFlow algorithm in plain PyTorch: the baseline of ``benchmarks/train_step.py``.

It follows the authors' code (thu-ml/implicit-normalizing-flows, ``lib/layers/broyden.py``,
``implicit_block.py``, ``iresblock.py``) step for step, written anew here:

* **Root solves** (forward and sampling) by the DEQ-style whole-batch Broyden: history
  ``H = -I + U Vᵀ`` in zero-filled ``(B, threshold, d)`` buffers updated with einsums, the first
  step ``-F(z0)`` from ``z0 = 0`` (as the original writes it), one stop test for the whole batch,
  ``‖F‖₂ < eps·√(B·d)`` over all samples together, read back with ``.item()`` every iteration,
  at most ``threshold`` (30) iterations, the lowest-norm iterate returned, and fixed-point
  iteration when the norm explodes (the original's "protective break").
* **Gradient**: the root is re-attached by ``z = g_x(x) + x - g_z(z*)`` and passed through an
  ``autograd.Function`` whose backward solves the adjoint ``aᵀ(I + J_{g_z}(z*)) = ∂L/∂z`` with
  the same Broyden on vector-Jacobian products from autograd, ``eps = 1e-10`` (so at most 30
  iterations). Two things end it earlier than DESIGN.md §7 expects: the tolerance is absolute
  on ``√(B·d)``-scaled norm while a mean loss makes ``∂L/∂z`` of order ``1/B``, so it is
  reachable in float32 for large batches; and, as written, the loop stops at the first NaN norm,
  which comes once some sample's residual stops changing (an infinite update pair: the
  original zeroes NaN entries, not infinite ones); the lowest-norm iterate is returned.
* **Log-determinant** (the toy setting, ``brute_force=True``): the per-sample Jacobian of
  ``x + g_x(x)`` and of ``z + g_z(z)`` by ``d`` autograd products each (with graph), then
  ``slogdet`` (ImplicitBlock) or the closed-form 2×2 determinant (ResidualBlock, d = 2).
* **Power iteration**: the original runs it outside the forward (``update_lipschitz`` after each
  optimiser step) and evaluates its layers without iterating; here it runs once at the start of
  each block call (the networks' ``n_power_iterations`` steps) and every evaluation in the call
  and in its backward uses the stored vectors: the same work and weights as impflow's blocks.
* **ResidualBlock**: explicit forward; sampling by the original's fixed-point iteration with
  its loose test ``(Δ)² / (1e-5 + 1e-5·|z|) < 1`` on every entry.

Differences from the original, each of which can only make this baseline faster: no deep copies
of the networks (the original solves on copies, re-loading their state dict every call, for
``DataParallel``); the adjoint's products are ``autograd.grad`` with respect to ``z`` alone
instead of ``.backward`` on copies whose parameters are frozen; no final ``backward`` of zeros
to free the adjoint's graph; ``∂L/∂x`` only when ``x`` needs a gradient; no
``torch.cuda.empty_cache()`` calls.

The networks are shared with impflow's blocks (``impflow.nn.LipschitzMLP``), so both sides use
the same weights, spectral normalisation and activation.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from impflow.ops.reference import broyden_matvec, broyden_rmatvec

__all__ = ["OriginalImplicitBlock", "OriginalResidualBlock", "original_broyden"]


# --------------------------------------------------------------------------------------------
# Solvers


def original_fixed_point(fn, z0: Tensor, eps: float, threshold: int = 1000) -> Tensor:
    """``z ← fn(z)`` until ``(Δ)² / (eps + eps·|z0|) < 1`` for every entry (the original's
    ``find_fixed_point`` / ``_inverse_fixed_point`` test), at most ``threshold`` steps."""
    z, z_prev = fn(z0), z0
    tol = eps + eps * z0.abs()
    steps = 1
    while not bool(torch.all((z - z_prev) ** 2 / tol < 1.0)) and steps <= threshold:
        z, z_prev = fn(z), z
        steps += 1
    return z


@torch.no_grad()
def original_broyden(fn, z0: Tensor, threshold: int, eps: float) -> dict:
    """The original's whole-batch Broyden (no line search) for ``fn(z) = 0``.

    Args:
        fn: ``(B, ...) -> (B, ...)``.
        z0: ``(B, ...)`` start.
        threshold: iterations at most, and the history length.
        eps: stop once ``‖fn(z)‖₂ < eps·√(B·d)``, the norm taken over the whole batch.

    Returns:
        dict with ``result`` (the lowest-norm iterate), ``nstep``, ``diff`` (its norm),
        ``eps`` (the scaled tolerance), ``prot_break`` (the norm exploded) and ``nan_stop``
        (the loop ended on a NaN norm: ``nan >= eps`` is false, so the original stops there
        and returns its lowest iterate).
    """
    shape = z0.shape
    B = shape[0]
    z = z0.reshape(B, -1)
    d = z.shape[1]
    eps = eps * math.sqrt(B * d)

    def f(t):
        return fn(t.view(shape)).reshape(B, -1)

    F = f(z)
    U = torch.zeros(B, threshold, d, dtype=z.dtype, device=z.device)
    V = torch.zeros_like(U)
    update = -F  # the original's first step (not -H·F = +F for H = -I)
    objective = init_objective = lowest = F.norm().item()
    lowest_z, nstep, prot_break = z, 0, False
    while objective >= eps and nstep < threshold:
        z_new = z + update
        F_new = f(z_new)
        dz, dF = z_new - z, F_new - F
        z, F = z_new, F_new
        nstep += 1
        objective = F.norm().item()
        if objective < lowest:
            lowest_z, lowest = z.clone(), objective
        if objective < eps:
            break
        if objective > init_objective * 1e6:
            prot_break = True
            break
        n_old = (nstep - 1) % threshold
        old_U, old_V = U[:, :n_old], V[:, :n_old]
        v = broyden_rmatvec(old_U, old_V, dz)
        u = (dz - broyden_matvec(old_U, old_V, dF)) / torch.einsum("bi,bi->b", v, dF)[:, None]
        # The original zeroes NaN only: a sample whose residual stopped changing (ΔF = 0) gives
        # an infinite pair, the next norm is NaN, and `NaN >= eps` is false: the loop ends.
        v[v != v] = 0
        u[u != u] = 0
        U[:, n_old] = u
        V[:, n_old] = v
        update = -broyden_matvec(U[:, :nstep], V[:, :nstep], F)
    return {
        "result": lowest_z.view(shape),
        "nstep": nstep,
        "diff": lowest,
        "eps": eps,
        "prot_break": prot_break,
        "nan_stop": math.isnan(objective),
    }


# --------------------------------------------------------------------------------------------
# Power iteration once per call


def _spectral_layers(*nets):
    return [m for g in nets for m in g.modules() if hasattr(m, "power_iteration")]


@contextlib.contextmanager
def stored_vectors(*nets, refresh: bool = False):
    """Inside, spectral layers use their stored ``u``, ``v`` (no iteration per evaluation, as
    the original's ``compute_weight(update=False)``); ``refresh``: first run their
    ``n_power_iterations`` steps once, when in training mode (the original's
    ``update_lipschitz``)."""
    layers = [m for m in _spectral_layers(*nets) if m.training]
    if refresh:
        for m in layers:
            m.power_iteration(m.n_power_iterations)
    for m in layers:
        m.training = False
    try:
        yield
    finally:
        for m in layers:
            m.training = True


# --------------------------------------------------------------------------------------------
# Log-determinant


def jacobian_rows(out: Tensor, inp: Tensor) -> Tensor:
    """``J[b, i, j] = ∂out_{b,i} / ∂inp_{b,j}`` by ``d`` autograd products, with graph (the
    original's ``batch_jacobian``)."""
    rows = [
        torch.autograd.grad(out[:, i].sum(), inp, create_graph=True)[0].unsqueeze(1)
        for i in range(out.shape[1])
    ]
    return torch.cat(rows, 1)


def _leaf(t: Tensor) -> Tensor:
    # The original calls x.requires_grad_(True) on its input; a data tensor becomes a leaf.
    return t if t.requires_grad else t.detach().requires_grad_(True)


# --------------------------------------------------------------------------------------------
# The implicit block


class _Backward(torch.autograd.Function):
    """Identity on ``z``; backward: the adjoint ``a`` with ``aᵀ(I + J_{g_z}(z)) = grad`` by
    Broyden on autograd products, returned as the gradient of the re-attached ``z``."""

    @staticmethod
    def forward(ctx, z, x, block):
        ctx.save_for_backward(z, x)
        ctx.block = block
        return z

    @staticmethod
    def backward(ctx, grad):
        z, x = ctx.saved_tensors
        block = ctx.block
        with stored_vectors(block.g_x, block.g_z), torch.enable_grad():
            z = z.detach().requires_grad_(True)
            Gz = block.g_z(z) + z

            def residual(a):
                (aJ,) = torch.autograd.grad(Gz, z, a, retain_graph=True)
                return aJ - grad

            info = original_broyden(
                residual,
                torch.zeros_like(grad),
                block.threshold,
                block.eps_backward,
            )
            block.last_info["adjoint"] = info
            a = info["result"]
            grad_x = None
            if ctx.needs_input_grad[1]:
                x = x.detach().requires_grad_(True)
                (grad_x,) = torch.autograd.grad(block.g_x(x) + x, x, a)
        return a, grad_x, None


class OriginalImplicitBlock(nn.Module):
    """The original ``imBlock`` with ``brute_force=True``: ``z`` solves
    ``g_x(x) + x - g_z(z) - z = 0``; ``forward(x) -> (z, logdet)``, ``inverse(z) -> x``.

    Args:
        g_x, g_z: the networks (shared with impflow's block: same weights).
        threshold: iterations of every Broyden solve (the original's 30).
        eps_forward, eps_backward, eps_sample: per-entry RMS tolerances of the forward, adjoint
            and sampling solves (the original's 1e-6, 1e-10, 1e-5).

    Attributes:
        last_info: the solver dicts of the last ``forward``, ``adjoint`` and ``inverse``.
    """

    def __init__(
        self,
        g_x,
        g_z,
        threshold=30,
        eps_forward=1e-6,
        eps_backward=1e-10,
        eps_sample=1e-5,
    ):
        super().__init__()
        self.g_x, self.g_z = g_x, g_z
        self.threshold = threshold
        self.eps_forward, self.eps_backward, self.eps_sample = eps_forward, eps_backward, eps_sample
        self.last_info = {}

    def _solve(self, g_in, g_out, u, eps, name):
        with torch.no_grad():
            c = g_in(u) + u
            info = original_broyden(
                lambda y: c - g_out(y) - y, torch.zeros_like(u), self.threshold, eps
            )
            if info["prot_break"]:
                root = original_fixed_point(lambda y: c - g_out(y), u, eps)
            else:
                root = info["result"]
        self.last_info[name] = info
        return root.detach()

    def logdet(self, x: Tensor, z: Tensor) -> Tensor:
        """``log|det(I + J_{g_x}(x))| - log|det(I + J_{g_z}(z))|``, ``(B,)``, with graph."""
        with torch.enable_grad():
            x, z = _leaf(x), _leaf(z)
            jx = jacobian_rows(x + self.g_x(x), x)
            jz = jacobian_rows(z + self.g_z(z), z)
            return torch.linalg.slogdet(jx)[1] - torch.linalg.slogdet(jz)[1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with stored_vectors(self.g_x, self.g_z, refresh=True):
            x0 = x.detach()
            z_star = self._solve(self.g_x, self.g_z, x0, self.eps_forward, "forward")
            z = self.g_x(x0) - self.g_z(z_star) + x0  # the graph to the parameters
            z = _Backward.apply(z, x, self)
            return z, self.logdet(x, z)

    def inverse(self, z: Tensor, with_logdet: bool = False):
        """``x`` (the original's sampling), or ``(x, -logdet)`` with ``with_logdet``."""
        with stored_vectors(self.g_x, self.g_z, refresh=True):
            x = self._solve(self.g_z, self.g_x, z, self.eps_sample, "inverse")
            if not with_logdet:
                return x
            return x, -self.logdet(x, z)


# --------------------------------------------------------------------------------------------
# The residual block


class OriginalResidualBlock(nn.Module):
    """The original ``iResBlock`` with ``brute_force=True``: ``z = x + g(x)``; the log-det from the
    autograd Jacobian (closed-form determinant for d = 2, ``slogdet`` otherwise); ``inverse``
    by fixed-point iteration with the original's tolerances."""

    def __init__(self, g, atol=1e-5, rtol=1e-5):
        super().__init__()
        self.g = g
        self.atol, self.rtol = atol, rtol

    def logdet_of(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(g(x), log|det(I + J_g(x))|)`` with graph."""
        with torch.enable_grad():
            x = _leaf(x)
            gx = self.g(x)
            jac = jacobian_rows(gx, x)
            if jac.shape[-1] == 2:
                det = (jac[:, 0, 0] + 1) * (jac[:, 1, 1] + 1) - jac[:, 0, 1] * jac[:, 1, 0]
                return gx, det.abs().log()
            eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
            return gx, torch.linalg.slogdet(eye + jac)[1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with stored_vectors(self.g, refresh=True):
            gx, logdet = self.logdet_of(x)
            return x + gx, logdet

    def inverse(self, z: Tensor, with_logdet: bool = False):
        with stored_vectors(self.g, refresh=True):
            with torch.no_grad():
                x, x_prev = z - self.g(z), z
                tol = self.atol + z.abs() * self.rtol
                steps = 0
                while not bool(torch.all((x - x_prev) ** 2 / tol < 1)) and steps <= 1000:
                    x, x_prev = z - self.g(x), x
                    steps += 1
            if not with_logdet:
                return x
            return x, -self.logdet_of(x)[1]
