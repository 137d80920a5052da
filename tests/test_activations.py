"""Tests of impflow.nn.activations: the 1-Lipschitz bound, its tightness, smoothness, formulas,
gradients, the registry and shape/dtype handling."""

import math

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

from impflow.nn.activations import (
    ACTIVATIONS,
    ELU,
    Identity,
    LipSwish,
    Sin,
    Softplus,
    Tanh,
    make_activation,
)

BETAS = [0.1, 0.5, 1.0, 5.0, 50.0]

# The dense grid of the derivative checks: spacing 2e-4, fine enough to land within 1e-4 of
# every maximum of |f'| (so the tightness checks below see the true supremum to ~1e-6).
GRID = torch.linspace(-20.0, 20.0, 200_001, dtype=torch.float64)


def softplus_inv(beta: float) -> float:
    return math.log(math.expm1(beta))


def lipswish(beta: float) -> LipSwish:
    """A float64 LipSwish whose β is set through ``raw_beta``."""
    act = LipSwish().double()
    with torch.no_grad():
        act.raw_beta.fill_(softplus_inv(beta))
    return act


# (id, factory, lowest acceptable max|f'| on GRID): the bound 1 is attained or approached by
# each of them, so a too-small scale (sin(2πx)/(4π), x·sigmoid(βx)/2, ...) fails too.
# LipSwish's supremum is 1.0998/1.1 ≈ 0.99985 at x ≈ 2.3994/β; at β = 0.1 that lies outside
# [-20, 20], where the largest value is 0.9916 (at x = 20).
CASES = [
    ("sin", Sin, 0.999),
    ("elu", ELU, 0.999),
    ("softplus", Softplus, 0.999),
    ("tanh", Tanh, 0.999),
    ("identity", Identity, 0.999),
] + [(f"lipswish-beta{b:g}", (lambda b=b: lipswish(b)), 0.99 if b < 0.5 else 0.9998) for b in BETAS]
IDS = [c[0] for c in CASES]


def derivative(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """f'(x) elementwise, by autograd of the sum (the activations act elementwise)."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(act(x).sum(), x)
    return g


def max_abs_derivative(act: nn.Module) -> float:
    return derivative(act, GRID).abs().max().item()


def derivative_jump(act: nn.Module, h: float) -> float:
    """max over GRID of |f'(x + h) - f'(x)|: goes to 0 with h iff f' is continuous there."""
    return (derivative(act, GRID + h) - derivative(act, GRID)).abs().max().item()


def lipschitz_ratio(act: nn.Module, seed: int = 0) -> float:
    """max |f(x) - f(y)| / |x - y| over random pairs at distances from 1e-4 to 10."""
    gen = torch.Generator().manual_seed(seed)
    x = 8.0 * torch.randn(100_000, generator=gen, dtype=torch.float64)
    scale = 10.0 ** torch.empty(100_000, dtype=torch.float64).uniform_(-4, 1, generator=gen)
    y = x + scale * torch.randn(100_000, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        return ((act(x) - act(y)).abs() / (x - y).abs()).max().item()


class _Wrong(nn.Module):
    """Deliberately wrong activations, to show that each check can fail."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


# ---------------------------------------------------------------------------------------------
# The Lipschitz bound and its tightness


@pytest.mark.parametrize("make, tight", [c[1:] for c in CASES], ids=IDS)
def test_derivative_bounded_by_one_and_tight(make, tight):
    m = max_abs_derivative(make())
    assert m <= 1 + 1e-6
    assert m >= tight


@pytest.mark.parametrize("beta", BETAS)
def test_lipswish_derivative_range_does_not_depend_on_beta(beta):
    # f'(x) = h(βx)/1.1 with h in about [-0.0998, 1.0998]: the lower end is reached too.
    d = derivative(lipswish(beta), GRID)
    if beta >= 0.5:  # the minimum, at u ≈ -2.3994, lies inside the grid
        assert d.min().item() == pytest.approx(-0.0998 / 1.1, abs=2e-4)
        assert d.max().item() == pytest.approx(1.0998 / 1.1, abs=2e-4)


@pytest.mark.parametrize("make", [c[1] for c in CASES], ids=IDS)
def test_lipschitz_by_finite_differences(make):
    assert lipschitz_ratio(make()) <= 1 + 1e-9


def test_checks_catch_wrong_scalings():
    two_pi = 2 * math.pi
    # Missing /2π: slope 2π.
    assert max_abs_derivative(_Wrong(lambda x: torch.sin(two_pi * x))) > 6
    assert lipschitz_ratio(_Wrong(lambda x: torch.sin(two_pi * x))) > 6
    # Missing /1.1: slope 1.0998 > 1.
    assert max_abs_derivative(_Wrong(lambda x: x * torch.sigmoid(5 * x))) > 1.09
    assert lipschitz_ratio(_Wrong(lambda x: x * torch.sigmoid(5 * x))) > 1 + 1e-6
    # Over-scaled (a needless factor 2): the bound holds but is not tight.
    assert max_abs_derivative(_Wrong(lambda x: torch.sin(two_pi * x) / (2 * two_pi))) < 0.999
    # A kink: the derivative jumps by 1 however small h is.
    assert derivative_jump(_Wrong(torch.relu), 1e-5) > 0.99


# ---------------------------------------------------------------------------------------------
# Smoothness


@pytest.mark.parametrize("name, cls", list(ACTIVATIONS.items()))
def test_smooth_attribute(name, cls):
    assert isinstance(cls.smooth, bool)
    assert cls.smooth  # every registered activation is at least C^1
    assert cls().smooth is cls.smooth


@pytest.mark.parametrize("make", [c[1] for c in CASES], ids=IDS)
def test_derivative_is_continuous(make):
    act = make()
    assert act.smooth
    jumps = [derivative_jump(act, h) for h in (1e-3, 1e-4, 1e-5, 1e-6)]
    # f'' is bounded (by 2π for Sin, ≈ 0.23β for LipSwish), so the jump shrinks like h.
    assert jumps[2] <= 1e-3
    assert jumps[3] <= 1e-4
    for coarse, fine in zip(jumps, jumps[1:]):
        assert fine <= coarse * 0.2 + 1e-12


def test_elu_is_c1_at_zero():
    # Both one-sided derivatives at 0 equal 1 (so α = 1 is the C^1 choice).
    act = ELU()
    x = torch.tensor([-1e-8, 0.0, 1e-8], dtype=torch.float64)
    assert torch.allclose(derivative(act, x), torch.ones(3, dtype=torch.float64), atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Formulas and gradients


def test_sin_formula():
    x = torch.randn(1000, dtype=torch.float64) * 3
    torch.testing.assert_close(Sin()(x), torch.sin(2 * math.pi * x) / (2 * math.pi), rtol=0, atol=0)


@pytest.mark.parametrize(
    "cls, ref",
    [
        (ELU, lambda x: torch.where(x > 0, x, torch.expm1(x))),
        (Softplus, lambda x: torch.log1p(torch.exp(-x.abs())) + x.clamp(min=0)),
        (Tanh, lambda x: (torch.exp(2 * x) - 1) / (torch.exp(2 * x) + 1)),
        (Identity, lambda x: x),
    ],
    ids=["elu", "softplus", "tanh", "identity"],
)
def test_other_formulas(cls, ref):
    x = torch.cat([torch.randn(1000, dtype=torch.float64) * 5, torch.tensor([-30.0, 19.9, 30.0])])
    # torch's softplus returns x itself above x = 20, where the exact value differs by
    # log1p(exp(-x)) < 2.1e-9.
    atol = 2.1e-9 if cls is Softplus else 1e-12
    torch.testing.assert_close(cls()(x), ref(x).to(x.dtype), rtol=1e-12, atol=atol)


@pytest.mark.parametrize("raw", [-3.0, -0.2, 0.0, 0.7, 4.0])
def test_lipswish_formula(raw):
    act = LipSwish().double()
    with torch.no_grad():
        act.raw_beta.fill_(raw)
    beta = math.log1p(math.exp(raw))
    x = torch.randn(1000, dtype=torch.float64) * 5
    torch.testing.assert_close(act(x), x * torch.sigmoid(beta * x) / 1.1, rtol=1e-14, atol=1e-15)
    assert act.beta.item() == pytest.approx(beta, rel=1e-14)


@pytest.mark.parametrize("beta_init", [0.5, 0.01, 1.0, 2.0, 25.0, 100.0])
def test_lipswish_init(beta_init):
    act = LipSwish(beta_init)
    assert isinstance(act.raw_beta, nn.Parameter) and act.raw_beta.shape == ()
    assert act.beta.item() == pytest.approx(beta_init, rel=1e-6)
    assert [n for n, _ in act.named_parameters()] == ["raw_beta"]
    assert "raw_beta" in act.state_dict()
    assert f"beta={beta_init:.4g}" in repr(act)


def test_lipswish_default_beta():
    assert LipSwish().beta.item() == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "1", True])
def test_lipswish_rejects_bad_beta(bad):
    with pytest.raises(ValueError, match="beta_init"):
        LipSwish(bad)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lipswish_gradcheck_input_and_beta(seed):
    torch.manual_seed(seed)
    act = LipSwish()
    x = (3 * torch.randn(4, 5, dtype=torch.float64)).requires_grad_(True)
    raw = torch.randn((), dtype=torch.float64).requires_grad_(True)

    def f(x, raw):
        return functional_call(act, {"raw_beta": raw}, (x,))

    assert gradcheck(f, (x, raw))
    assert gradgradcheck(f, (x, raw))


def test_lipswish_gradient_reaches_raw_beta():
    act = LipSwish()
    x = torch.randn(64, 3)
    act(x).pow(2).sum().backward()
    g = act.raw_beta.grad
    assert g is not None and torch.isfinite(g) and g.abs() > 0
    before = act.beta.item()
    torch.optim.SGD(act.parameters(), lr=0.1).step()
    assert act.beta.item() != before


@pytest.mark.parametrize("cls", list(ACTIVATIONS.values()), ids=list(ACTIVATIONS))
def test_gradcheck_input(cls):
    act = cls().double()
    x = (3 * torch.randn(3, 7, dtype=torch.float64)).requires_grad_(True)
    assert gradcheck(act, (x,))


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry_contents():
    assert ACTIVATIONS == {
        "sin": Sin,
        "lipswish": LipSwish,
        "elu": ELU,
        "softplus": Softplus,
        "tanh": Tanh,
        "identity": Identity,
    }


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_make_activation_by_name(name):
    for spelling in (name, name.upper(), name.capitalize()):
        act = make_activation(spelling)
        assert type(act) is ACTIVATIONS[name]
    assert make_activation(name) is not make_activation(name)  # a fresh module each time


def test_make_activation_instance_and_class():
    act = LipSwish(2.0)
    assert make_activation(act) is act
    other = nn.ReLU()
    assert make_activation(other) is other
    assert type(make_activation(Tanh)) is Tanh
    assert type(make_activation(nn.GELU)) is nn.GELU


def test_make_activation_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        make_activation("relu6")
    msg = str(err.value)
    assert "relu6" in msg
    for name in ACTIVATIONS:
        assert repr(name) in msg


@pytest.mark.parametrize("bad", [None, 3, 1.0, torch.tanh, int, ["sin"]])
def test_make_activation_wrong_type(bad):
    with pytest.raises(TypeError, match="activation must be"):
        make_activation(bad)


# ---------------------------------------------------------------------------------------------
# Shapes, dtypes, strides


@pytest.mark.parametrize("shape", [(), (5,), (2, 3), (2, 3, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls", list(ACTIVATIONS.values()), ids=list(ACTIVATIONS))
def test_shape_and_dtype(cls, dtype, shape):
    act = cls()  # parameters (LipSwish) stay float32: the output must still follow the input
    x = torch.randn(shape, dtype=dtype)
    y = act(x)
    assert y.shape == x.shape
    assert y.dtype == dtype


@pytest.mark.parametrize("shape", [(), (4, 3)])
@pytest.mark.parametrize("cls", list(ACTIVATIONS.values()), ids=list(ACTIVATIONS))
def test_float32_input_with_float64_parameters(cls, shape):
    # A 0-dim input meeting a 0-dim float64 parameter would be promoted without a cast.
    act = cls().double()
    x = torch.randn(shape)
    assert act(x).dtype == torch.float32


@pytest.mark.parametrize("cls", list(ACTIVATIONS.values()), ids=list(ACTIVATIONS))
def test_non_contiguous_input(cls):
    act = cls()
    base = torch.randn(6, 8, 5)
    x = base.transpose(0, 2)[:, ::2]
    assert not x.is_contiguous()
    y = act(x)
    assert y.shape == x.shape
    # Strided and contiguous kernels may round differently (vectorised vs scalar): allow an ulp.
    torch.testing.assert_close(y, act(x.contiguous()))
    torch.testing.assert_close(derivative(act, x), derivative(act, x.contiguous()))
