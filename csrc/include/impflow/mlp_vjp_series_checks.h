// Argument checks of impflow::mlp_vjp_series and its backward, shared by every backend.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace impflow {

// weights[i]: (h_{i+1}, h_i) with h_0 = h_L = d; act_derivs[i]: (B, h_{i+1}), i < L - 1;
// v: (B, d); coeffs: (n_terms,); one floating dtype and one device for all.
inline void check_mlp_vjp_series_args(at::TensorList weights, at::TensorList act_derivs,
                                      const at::Tensor& v, const at::Tensor& coeffs,
                                      int64_t n_terms) {
  const char* op = "mlp_vjp_series: ";
  TORCH_CHECK(n_terms >= 1, op, "n_terms must be >= 1, got ", n_terms);
  TORCH_CHECK(!weights.empty(), op, "weights must hold at least one matrix");
  const int64_t L = int64_t(weights.size());
  TORCH_CHECK(int64_t(act_derivs.size()) == L - 1, op, "act_derivs must hold one tensor per ",
              "hidden layer (len(weights) - 1 = ", L - 1, "), got ", act_derivs.size());
  TORCH_CHECK(v.dim() == 2, op, "v must have shape (B, d), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble, op,
              "v must be float32 or float64, got ", v.scalar_type());
  const int64_t B = v.size(0), d = v.size(1);
  const auto same_kind = [&](const at::Tensor& t, const std::string& name) {
    TORCH_CHECK(t.scalar_type() == v.scalar_type(), op, name, " must have v's dtype ",
                v.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == v.device(), op, name, " must be on v's device (", v.device(),
                "), got ", t.device());
  };
  for (int64_t i = 0; i < L; ++i) {
    const auto& W = weights[i];
    TORCH_CHECK(W.dim() == 2, op, "weights[", i, "] must be a matrix, got shape ", W.sizes());
    same_kind(W, "weights[" + std::to_string(i) + "]");
    const int64_t expected_in = i == 0 ? d : weights[i - 1].size(0);
    TORCH_CHECK(W.size(1) == expected_in, op, "weights[", i, "] must have ", expected_in,
                " columns (", i == 0 ? "d = v.size(1)" : "the rows of the previous weight",
                "), got shape ", W.sizes());
  }
  TORCH_CHECK(weights[L - 1].size(0) == d, op, "the last weight must have d = ", d,
              " rows (the Jacobian must be square), got shape ", weights[L - 1].sizes());
  for (int64_t i = 0; i < L - 1; ++i) {
    const auto& D = act_derivs[i];
    TORCH_CHECK(D.dim() == 2 && D.size(0) == B && D.size(1) == weights[i].size(0), op,
                "act_derivs[", i, "] must have shape (", B, ", ", weights[i].size(0),
                "), got ", D.sizes());
    same_kind(D, "act_derivs[" + std::to_string(i) + "]");
  }
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.size(0) == n_terms, op,
              "coeffs must have shape (n_terms,) = (", n_terms, "), got ", coeffs.sizes());
  same_kind(coeffs, "coeffs");
}

inline void check_mlp_vjp_series_backward_args(
    const at::Tensor& grad_products, const at::Tensor& grad_traces,
    const at::Tensor& grad_series, at::TensorList weights, at::TensorList act_derivs,
    const at::Tensor& v, const at::Tensor& coeffs, const at::Tensor& products) {
  const char* op = "mlp_vjp_series_backward: ";
  TORCH_CHECK(products.dim() == 3, op, "products must have shape (n_terms, B, d), got ",
              products.sizes());
  const int64_t n = products.size(0);
  check_mlp_vjp_series_args(weights, act_derivs, v, coeffs, n);
  const int64_t B = v.size(0), d = v.size(1);
  const auto check = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name) {
    TORCH_CHECK(t.sizes() == shape, op, name, " must have shape ", shape, ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == v.scalar_type() && t.device() == v.device(), op, name,
                " must have v's dtype and device");
  };
  check(products, {n, B, d}, "products");
  check(grad_products, {n, B, d}, "grad_products");
  check(grad_traces, {n, B}, "grad_traces");
  check(grad_series, {B}, "grad_series");
}

}  // namespace impflow
