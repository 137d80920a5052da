"""Python entry point of the fused Hutchinson-series op for MLPs
(``torch.ops.impflow.mlp_vjp_series``), its fake (meta) kernels and its autograd formula.

The op is differentiable once: its backward is the op ``impflow::mlp_vjp_series_backward``,
which recomputes each step from the saved products instead of storing the steps'
intermediates; differentiating that backward again (double backward) is refused.
"""

import torch

from impflow._extension import check_device, check_same_device

__all__ = ["mlp_vjp_series"]


def mlp_vjp_series(weights, act_derivs, v, coeffs, n_terms, *, check_finite=True):
    """``[vᵀJ, …, vᵀJⁿ]``, the trace terms ``vᵀJᵏv`` and their weighted sum, for an MLP
    ``g(x) = W_L s(… s(W_1 x + b_1) …) + b_L`` whose per-sample Jacobian is
    ``J = W_L D_{L-1} … D_1 W_1``, ``D_i = diag(act_derivs[i-1][b])``.

    Same contract as :func:`impflow.ops.reference.mlp_vjp_series_reference`. Each step costs
    one matrix product per layer (batched over the samples) and one elementwise scaling per
    hidden layer, and the trace terms and the series are accumulated in the same pass; no
    autograd graph is built. When ``d`` is small against ``n_terms`` the op first builds the
    per-sample Jacobians (``d`` steps at once) and then takes each product as a ``d × d``
    matrix product per sample (same results, fewer operations). Differentiable (once) with
    respect to ``weights``, ``act_derivs``, ``v`` and ``coeffs``.

    Args:
        weights: ``L ≥ 1`` matrices, ``weights[i]`` of shape ``(h_{i+1}, h_i)`` with
            ``h_0 = h_L = d``: the (normalised) weights of the layers, first layer first.
        act_derivs: ``L - 1`` tensors ``(B, h_{i+1})``: the activation derivative at each hidden
            layer's pre-activations.
        v: ``(B, d)`` probe vectors (any strides).
        coeffs: ``(n_terms,)`` series coefficients.
        n_terms: number of products ``n ≥ 1``.
        check_finite: raise ``ValueError`` when an input holds NaN or Inf (one reduction per
            input and, on CUDA, one synchronisation); skipped while tracing.

    Returns:
        ``(products, traces, series)``: ``(n, B, d)`` with ``products[k-1] = vᵀJᵏ``, ``(n, B)``
        with ``traces[k-1] = vᵀJᵏv``, and ``(B,)`` ``Σ_k coeffs[k-1] · traces[k-1]``.
    """
    weights, act_derivs = list(weights), list(act_derivs)
    check_device(v, "ops.mlp_vjp_series")
    if check_finite and not torch.compiler.is_compiling():
        # Devices first: the finite check gathers one flag per input, across their devices.
        _check_devices(_named_inputs(weights, act_derivs, coeffs), v)
        named = [(f"weights[{i}]", w) for i, w in enumerate(weights)]
        named += [(f"act_derivs[{i}]", t) for i, t in enumerate(act_derivs)]
        named += [("v", v), ("coeffs", coeffs)]
        _check_finite(named)
    try:
        return torch.ops.impflow.mlp_vjp_series(weights, act_derivs, v, coeffs, n_terms)
    except NotImplementedError:
        # No kernel for the device the dispatcher chose: say which argument is elsewhere.
        _check_devices(_named_inputs(weights, act_derivs, coeffs), v)
        raise


def _check_finite(named):
    tensors = [(name, t) for name, t in named if isinstance(t, torch.Tensor) and t.numel()]
    if not tensors or not all(t.is_floating_point() for _, t in tensors):
        return  # the op's own checks name a wrong dtype
    flags = torch.stack([torch.isfinite(t).all() for _, t in tensors]).tolist()
    for (name, _), ok in zip(tensors, flags):
        if not ok:
            raise ValueError(f"ops.mlp_vjp_series: {name} contains NaN or Inf values")


def _named_inputs(weights, act_derivs, coeffs):
    named = [(f"weights[{i}]", w) for i, w in enumerate(weights)]
    return (
        named + [(f"act_derivs[{i}]", t) for i, t in enumerate(act_derivs)] + [("coeffs", coeffs)]
    )


def _check_devices(named, v, op="mlp_vjp_series"):
    check_same_device(op, [("v", v), *named])  # a wrong type is left to the op's schema


def _check_same_kind(weights, act_derivs, v, coeffs):
    # The checks of csrc/include/impflow/mlp_vjp_series_checks.h that need no data, for the
    # fake kernel (a meta or fake tensor among the inputs dispatches here, not to a backend).
    named = _named_inputs(weights, act_derivs, coeffs)
    for name, t in named:
        torch._check(
            t.dtype == v.dtype,
            lambda: f"mlp_vjp_series: {name} must have v's dtype {v.dtype}, got {t.dtype}",
        )
    _check_devices(named, v)


@torch.library.register_fake("impflow::mlp_vjp_series")
def _mlp_vjp_series_fake(weights, act_derivs, v, coeffs, n_terms):
    torch._check(n_terms >= 1, lambda: f"mlp_vjp_series: n_terms must be >= 1, got {n_terms}")
    torch._check(v.dim() == 2, lambda: f"mlp_vjp_series: v must have shape (B, d), got {v.shape}")
    torch._check(
        len(act_derivs) == len(weights) - 1,
        lambda: "mlp_vjp_series: act_derivs must hold one tensor per hidden layer",
    )
    _check_same_kind(weights, act_derivs, v, coeffs)
    b, d = v.shape
    return v.new_empty((n_terms, b, d)), v.new_empty((n_terms, b)), v.new_empty((b,))


@torch.library.register_fake("impflow::mlp_vjp_series_backward")
def _mlp_vjp_series_backward_fake(
    grad_products, grad_traces, grad_series, weights, act_derivs, v, coeffs, products
):
    # Also reached by one meta tensor among real ones, where it must not pass for gradients.
    named = _named_inputs(weights, act_derivs, coeffs) + [
        ("products", products),
        ("grad_products", grad_products),
        ("grad_traces", grad_traces),
        ("grad_series", grad_series),
    ]
    _check_devices(named, v, op="mlp_vjp_series_backward")
    return (
        [w.new_empty(w.shape) for w in weights],
        [t.new_empty(t.shape) for t in act_derivs],
        v.new_empty(v.shape),
    )


def _setup_context(ctx, inputs, output):
    weights, act_derivs, v, coeffs, n_terms = inputs
    products, traces, _ = output
    ctx.n_weights = len(weights)
    ctx.save_for_backward(*weights, *act_derivs, v, coeffs, products, traces)


def _backward(ctx, grad_products, grad_traces, grad_series):
    saved = ctx.saved_tensors
    n_weights = ctx.n_weights
    weights = list(saved[:n_weights])
    act_derivs = list(saved[n_weights : 2 * n_weights - 1])
    v, coeffs, products, traces = saved[2 * n_weights - 1 :]
    # Outputs that did not reach the loss have no gradient: use zeros.
    if grad_products is None:
        grad_products = torch.zeros_like(products)
    if grad_traces is None:
        grad_traces = torch.zeros_like(traces)
    if grad_series is None:
        grad_series = v.new_zeros(v.shape[:1])
    grad_weights, grad_act_derivs, grad_v = torch.ops.impflow.mlp_vjp_series_backward(
        grad_products, grad_traces, grad_series, weights, act_derivs, v, coeffs, products
    )
    grad_coeffs = traces @ grad_series  # series = Σ_k coeffs[k] traces[k]
    return list(grad_weights), list(grad_act_derivs), grad_v, grad_coeffs, None


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "impflow.ops.mlp_vjp_series is differentiable once: the gradient of its backward "
        "(double backward) is not implemented"
    )


def _setup_backward_context(ctx, inputs, output):
    pass


torch.library.register_autograd("impflow::mlp_vjp_series", _backward, setup_context=_setup_context)
torch.library.register_autograd(
    "impflow::mlp_vjp_series_backward",
    _refuse_double_backward,
    setup_context=_setup_backward_context,
)
