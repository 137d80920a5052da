// The schedule of impflow::mlp_vjp_series and its backward, shared by the CPU and CUDA
// backends (see mlp_vjp_series_math.h for the conventions). Two strategies, same results:
//   * stepwise: one vector-Jacobian step (a GEMM per layer over the batch, the derivative
//     scaling in place) per product; the backward recomputes each step from the saved
//     products instead of keeping its intermediates;
//   * explicit Jacobians, when d is small against n_terms (use_explicit_jacobian): one step
//     over the d*B rows e_j gives every per-sample J_b, then each product is a batched
//     product of tiny matrices; the backward accumulates dL/dJ_b and goes back through J once.
// The matrix products go through ATen (MKL or cuBLAS), into preallocated buffers where they
// repeat; everything elementwise that is not a plain product goes through the backend's
// `Kernels`:
//   trace_terms(u_k, v, coeffs, k, traces_k, series)
//       traces_k[b] = u_k[b] . v[b];  series[b] += coeffs[k] * traces_k[b]
//   product_adjoints(grad_u_k, grad_traces_k, grad_series, coeffs, k, v, u_k, carried,
//                    u_bar, grad_v)
//       u_bar = grad_u_k + w v + carried;  grad_v += w u_k,  w = grad_traces_k + c_k grad_series
//   derivative_adjoints(a_bar, b, d, grad_d)
//       grad_d += a_bar * b;  a_bar *= d
// All tensors handed to the kernels are contiguous; coeffs stays on the device (no sync).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "impflow/mlp_vjp_series_checks.h"

namespace impflow {

inline std::vector<at::Tensor> contiguous_all(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(t.contiguous());
  return out;
}

// The weights as right operands of "rows @ W": a matrix with only a few columns is stored
// column-major, for which BLAS (MKL) has a fast path (measured: (1000 x 128) @ (128 x 2) runs
// about 4x faster than with the row-major copy).
inline std::vector<at::Tensor> right_operands(at::TensorList weights) {
  std::vector<at::Tensor> out;
  for (const auto& W : weights) {
    out.push_back(W.size(1) <= 4 ? W.t().contiguous().t() : W.contiguous());
  }
  return out;
}

// Multiply-adds per element of the per-sample products u_k = u_{k-1} J in a batched matrix
// product of tiny matrices, relative to a multiply-add inside a large GEMM (measured with
// MKL, float32, B = 1000: 1.6 ns for d = 2, 0.6 ns for d = 8..16, against 0.02 ns).
constexpr int64_t kSmallProductPenalty = 64;

// Whether to build the per-sample Jacobians first: d vector-Jacobian steps (one batched step
// of d*B rows, u = e_1..e_d) give every J_b (d x d), after which each product is a tiny
// per-sample matrix product. Pays off when d is small against n_terms (the 2-D toy data,
// tabular data with 20 exact terms at evaluation).
inline bool use_explicit_jacobian(at::TensorList weights, int64_t d, int64_t n_terms) {
  int64_t step = 0;  // multiply-adds per sample of one vector-Jacobian step
  for (const auto& W : weights) step += W.numel();
  return d * step + kSmallProductPenalty * n_terms * d * d < n_terms * step;
}

// The per-sample Jacobians (B, d, d), J[b] = J_b, from one vector-Jacobian step of the d*B rows
// e_j (the derivative rows broadcast over j). When `inputs` / `outputs` are given they receive,
// per layer i, what it multiplied, (d, B, h_{i+1}), and what it produced before the derivative
// scaling, (d, B, h_i) for i >= 1: the backward's intermediates.
inline at::Tensor explicit_jacobians(const std::vector<at::Tensor>& W,
                                     const std::vector<at::Tensor>& D, int64_t B, int64_t d,
                                     const at::TensorOptions& opts,
                                     std::vector<at::Tensor>* inputs = nullptr,
                                     std::vector<at::Tensor>* outputs = nullptr) {
  at::Tensor rows = at::eye(d, opts).unsqueeze(1).expand({d, B, d}).contiguous();
  for (int64_t i = int64_t(W.size()) - 1; i >= 0; --i) {
    if (inputs) (*inputs)[i] = rows;
    at::Tensor out = at::mm(rows.view({d * B, rows.size(2)}), W[i]).view({d, B, W[i].size(1)});
    if (i > 0) {
      if (outputs) {
        (*outputs)[i] = out;
        out = out * D[i - 1];
      } else {
        out.mul_(D[i - 1]);
      }
    }
    rows = out;
  }
  return rows.permute({1, 0, 2}).contiguous();  // rows[j, b] = e_j^T J_b: row j of J_b
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_vjp_series_forward(
    at::TensorList weights, at::TensorList act_derivs, const at::Tensor& v_in,
    const at::Tensor& coeffs_in, int64_t n_terms) {
  check_mlp_vjp_series_args(weights, act_derivs, v_in, coeffs_in, n_terms);
  if (v_in.numel() == 0) {
    // No sample or no element: nothing to multiply (an empty batch took n_terms empty
    // steps, 30 s for n_terms = 10^7). A trace over no element is 0.
    const int64_t B = v_in.size(0), d = v_in.size(1);
    return {at::empty({n_terms, B, d}, v_in.options()), at::zeros({n_terms, B}, v_in.options()),
            at::zeros({B}, v_in.options())};
  }
  const auto W = right_operands(weights);
  const auto D = contiguous_all(act_derivs);
  const auto v = v_in.contiguous();
  const auto coeffs = coeffs_in.contiguous();
  const int64_t L = int64_t(W.size()), B = v.size(0), d = v.size(1);
  auto products = at::empty({n_terms, B, d}, v.options());
  auto traces = at::empty({n_terms, B}, v.options());
  auto series = at::zeros({B}, v.options());
  if (use_explicit_jacobian(weights, d, n_terms)) {
    const at::Tensor J = explicit_jacobians(W, D, B, d, v.options());
    for (int64_t k = 0; k < n_terms; ++k) {
      const at::Tensor u = (k == 0 ? v : products[k - 1]).view({B, 1, d});
      at::Tensor out = products[k].view({B, 1, d});
      at::bmm_out(out, u, J);
      Kernels::trace_terms(products[k], v, coeffs, k, traces[k], series);
    }
    return {products, traces, series};
  }
  // hidden[i] (B, h_i): the output of layer i inside a step, i >= 1.
  std::vector<at::Tensor> hidden(L);
  for (int64_t i = 1; i < L; ++i) hidden[i] = at::empty({B, W[i].size(1)}, v.options());
  for (int64_t k = 0; k < n_terms; ++k) {
    at::Tensor u = k == 0 ? v : products[k - 1];
    for (int64_t i = L - 1; i >= 0; --i) {
      at::Tensor out = i == 0 ? products[k] : hidden[i];
      at::mm_out(out, u, W[i]);
      if (i > 0) out.mul_(D[i - 1]);  // the activation derivative, in place
      u = out;
    }
    Kernels::trace_terms(products[k], v, coeffs, k, traces[k], series);
  }
  return {products, traces, series};
}

template <class Kernels>
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>
mlp_vjp_series_backward(const at::Tensor& grad_products_in, const at::Tensor& grad_traces_in,
                        const at::Tensor& grad_series_in, at::TensorList weights,
                        at::TensorList act_derivs, const at::Tensor& v_in,
                        const at::Tensor& coeffs_in, const at::Tensor& products_in) {
  check_mlp_vjp_series_backward_args(grad_products_in, grad_traces_in, grad_series_in, weights,
                                     act_derivs, v_in, coeffs_in, products_in);
  if (v_in.numel() == 0) {
    // No sample or no element: every output of the forward is empty or 0 whatever the
    // inputs, so every gradient is 0, without the n steps back.
    std::vector<at::Tensor> grad_W, grad_D;
    for (const auto& w : weights) grad_W.push_back(at::zeros(w.sizes(), v_in.options()));
    for (const auto& t : act_derivs) grad_D.push_back(at::zeros(t.sizes(), v_in.options()));
    return {grad_W, grad_D, at::zeros(v_in.sizes(), v_in.options())};
  }
  const auto W = right_operands(weights);
  const auto D = contiguous_all(act_derivs);
  const auto v = v_in.contiguous();
  const auto coeffs = coeffs_in.contiguous();
  const auto products = products_in.contiguous();
  const auto grad_products = grad_products_in.contiguous();
  const auto grad_traces = grad_traces_in.contiguous();
  const auto grad_series = grad_series_in.contiguous();
  const int64_t L = int64_t(W.size()), B = v.size(0), d = v.size(1);
  const int64_t n = products.size(0);
  const auto opts = v.options();

  std::vector<at::Tensor> grad_W, grad_D;
  // Contiguous gradients, whatever the layout of the inputs (as the fake kernel says).
  for (const auto& w : W) grad_W.push_back(at::zeros(w.sizes(), opts));
  for (const auto& t : D) grad_D.push_back(at::zeros(t.sizes(), opts));
  auto grad_v = at::zeros({B, d}, opts);
  if (use_explicit_jacobian(weights, d, n)) {
    // dL/dJ_b = sum_k u_{k-1}^T u_bar_k per sample, then back through the construction of J.
    std::vector<at::Tensor> inputs(L), outputs(L);
    const at::Tensor J = explicit_jacobians(W, D, B, d, opts, &inputs, &outputs);
    auto grad_J = at::zeros({B, d, d}, opts);
    auto carried = at::zeros({B, d}, opts);  // u_bar_{k+1} J^T
    auto u_bar = at::empty({B, d}, opts);
    at::Tensor carried_rows = carried.view({B, 1, d});
    for (int64_t k = n - 1; k >= 0; --k) {
      Kernels::product_adjoints(grad_products[k], grad_traces[k], grad_series, coeffs, k, v,
                                products[k], carried, u_bar, grad_v);
      const at::Tensor u_prev = k == 0 ? v : products[k - 1];
      grad_J.baddbmm_(u_prev.view({B, d, 1}), u_bar.view({B, 1, d}));
      at::bmm_out(carried_rows, u_bar.view({B, 1, d}), J.transpose(1, 2));
    }
    grad_v.add_(carried);  // u_0 = v
    at::Tensor grad_out = grad_J.permute({1, 0, 2}).contiguous();  // of the last layer's rows
    for (int64_t i = 0; i < L; ++i) {
      const at::Tensor g = grad_out.view({d * B, grad_out.size(2)});
      grad_W[i].addmm_(inputs[i].view({d * B, inputs[i].size(2)}).t(), g);
      if (i == L - 1) break;  // inputs[L - 1] holds the constant e_j
      at::Tensor grad_in = at::mm(g, W[i].t()).view({d, B, W[i].size(0)});
      grad_D[i].add_((grad_in * outputs[i + 1]).sum(0));  // inputs[i] = outputs[i + 1] * D[i]
      grad_out = grad_in.mul_(D[i]);
    }
    return {grad_W, grad_D, grad_v};
  }

  // Per step: inputs[i] (B, h_{i+1}) is what layer i multiplies, outputs[i] (B, h_i) its
  // result before the derivative scaling (i >= 1), adjoints[i] (B, h_{i+1}) the gradient
  // with respect to inputs[i]; adjoints[L - 1] (B, d) carries u_bar_k J^T to step k - 1.
  std::vector<at::Tensor> inputs(L), outputs(L), adjoints(L);
  for (int64_t i = 0; i < L; ++i) {
    if (i < L - 1) inputs[i] = at::empty({B, W[i].size(0)}, opts);
    if (i > 0) outputs[i] = at::empty({B, W[i].size(1)}, opts);
    adjoints[i] = at::empty({B, W[i].size(0)}, opts);
  }
  adjoints[L - 1].zero_();
  auto u_bar = at::empty({B, d}, opts);

  for (int64_t k = n - 1; k >= 0; --k) {
    // Recompute step k from u_{k-1}.
    inputs[L - 1] = k == 0 ? v : products[k - 1];
    for (int64_t i = L - 1; i >= 1; --i) {
      at::mm_out(outputs[i], inputs[i], W[i]);
      at::mul_out(inputs[i - 1], outputs[i], D[i - 1]);
    }
    Kernels::product_adjoints(grad_products[k], grad_traces[k], grad_series, coeffs, k, v,
                              products[k], adjoints[L - 1], u_bar, grad_v);
    // Back through the step, from layer 0 (which produced u_k) to layer L - 1.
    at::Tensor b_bar = u_bar;
    for (int64_t i = 0; i < L; ++i) {
      grad_W[i].addmm_(inputs[i].t(), b_bar);
      at::mm_out(adjoints[i], b_bar, W[i].t());
      if (i < L - 1) {
        Kernels::derivative_adjoints(adjoints[i], outputs[i + 1], D[i], grad_D[i]);
        b_bar = adjoints[i];
      }
    }
  }
  grad_v.add_(adjoints[L - 1]);  // u_0 = v
  return {grad_W, grad_D, grad_v};
}

}  // namespace impflow
