"""The fused hidden-layer node of the forward-mode Jacobian: ``(act(h), act'(h) ⊙ t)`` with a
closed-form backward, against the same pair built from plain ops."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from impflow.logdet._activation_tangent import SECOND_ORDER, activation_and_tangent
from impflow.logdet._mlp_layers import activation_derivative
from impflow.nn.activations import ELU, LipSwish, Sin, Softplus, Tanh

F64 = torch.float64
FUSED = [Sin, Tanh, Softplus, ELU]


def inputs(act_type, batch, width, d, broadcast, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, width, generator=gen, dtype=F64) * 2
    if act_type is ELU:  # ELU'' jumps at 0: keep finite differences off the kink
        h = h + torch.where(h >= 0, 0.2, -0.2).to(F64)
    if act_type is Softplus:  # both sides of torch's threshold (20), off the switch itself
        h[0, : width // 2] += 25.0
    tangent = torch.randn(d, 1 if broadcast else batch, width, generator=gen, dtype=F64)
    return h.to(dtype), tangent.to(dtype)


def plain(act, h, tangent):
    return act(h), activation_derivative(act, h) * tangent


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def test_every_parameter_free_activation_is_fused():
    assert set(SECOND_ORDER) == set(FUSED)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("broadcast", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 5, 2), (13, 9, 3), (3, 4, 11)])
@pytest.mark.parametrize("act_type", FUSED + [LipSwish])
def test_values_and_gradients_match_plain_ops(act_type, shape, broadcast, dtype):
    act = act_type().to(dtype)
    batch, width, d = shape
    h, tangent = inputs(act_type, batch, width, d, broadcast, dtype)
    h1, t1 = leaves(h, tangent)
    h2, t2 = leaves(h, tangent)
    a1, out1 = activation_and_tangent(act, h1, t1)
    a2, out2 = plain(act, h2, t2)
    assert torch.equal(a1, a2)  # the module's own ops: bit for bit
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-14}
    torch.testing.assert_close(out1, out2, **tol)
    gen = torch.Generator().manual_seed(1)
    ga = torch.randn(a1.shape, generator=gen, dtype=F64).to(dtype)
    gt = torch.randn(out1.shape, generator=gen, dtype=F64).to(dtype)
    grads1 = torch.autograd.grad((a1 * ga).sum() + (out1 * gt).sum(), [h1, t1])
    grads2 = torch.autograd.grad((a2 * ga).sum() + (out2 * gt).sum(), [h2, t2])
    for g1, g2 in zip(grads1, grads2):
        assert g1.shape == g2.shape
        torch.testing.assert_close(g1, g2, **tol)


@pytest.mark.parametrize("broadcast", [True, False])
@pytest.mark.parametrize("act_type", FUSED)
def test_gradcheck_and_double_backward(act_type, broadcast):
    act = act_type()
    h, tangent = leaves(*inputs(act_type, 4, 3, 2, broadcast))

    def fn(h, tangent):
        return activation_and_tangent(act, h, tangent)

    assert gradcheck(fn, (h, tangent))
    assert gradgradcheck(fn, (h, tangent))


@pytest.mark.parametrize("act_type", FUSED)
def test_one_output_used(act_type):
    """A loss on the value alone, or on the tangents alone (the other gradient is None)."""
    act = act_type()
    h, tangent = inputs(act_type, 5, 4, 2, False)
    for pick in (0, 1):
        h1, t1 = leaves(h, tangent)
        h2, t2 = leaves(h, tangent)
        g1 = torch.autograd.grad(
            activation_and_tangent(act, h1, t1)[pick].sum(), [h1, t1], allow_unused=True
        )
        g2 = torch.autograd.grad(plain(act, h2, t2)[pick].sum(), [h2, t2], allow_unused=True)
        for a, b in zip(g1, g2):
            if b is None or not b.abs().any():
                assert a is None or not a.abs().any()
            else:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("act_type", FUSED)
def test_without_grad_no_graph(act_type):
    act = act_type()
    h, tangent = leaves(*inputs(act_type, 3, 4, 2, True))
    with torch.no_grad():
        a, out = activation_and_tangent(act, h, tangent)
        a_ref, out_ref = plain(act, h, tangent)
    assert a.grad_fn is None and out.grad_fn is None
    assert torch.equal(a, a_ref)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=0)
