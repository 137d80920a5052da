// Arithmetic of impflow::mlp_vjp_series, shared by the CPU and CUDA kernels.
//
// Convention: g is an MLP x -> W_L s(... s(W_1 x + b_1) ...) + b_L, so per sample its Jacobian
// is J = W_L D_{L-1} W_{L-1} ... D_1 W_1 with D_i = diag(s'(z_i)) at the forward's
// pre-activations z_i. A vector-Jacobian step takes the row vector u to u J by applying the
// weights from the last to the first, scaling by D_i after each but the last:
//   u <- ((u W_L) * d_{L-1}) W_{L-1} ... * d_1) W_1.
// The op returns u_k = v^T J^k (k = 1..n), the trace terms t_k = u_k . v and the series
// s = sum_k c_k t_k. Its backward runs the same steps in reverse with the adjoints
//   u_bar_k = dL/du_k + (dL/dt_k + c_k dL/ds) v + u_bar_{k+1} J^T,
// recomputing each step's intermediates from u_{k-1} (a saved output) instead of storing them.
// The GEMMs go through ATen (MKL, cuBLAS); the helpers below are the elementwise work.
#pragma once

#include <cstdint>

#include "impflow/broyden_math.h"  // IMPFLOW_HOST_DEVICE

namespace impflow {

// sum of a[j] * b[j] over j = begin, begin + step, ... < end (a thread's share of a row).
template <typename acc_t, typename scalar_t>
IMPFLOW_HOST_DEVICE acc_t partial_dot(const scalar_t* a, const scalar_t* b, int64_t begin,
                                      int64_t end, int64_t step) {
  acc_t sum = 0;
  for (int64_t j = begin; j < end; j += step) sum += acc_t(a[j]) * acc_t(b[j]);
  return sum;
}

// How much the trace term t_k = u_k . v weighs in the loss: dL/dt_k + c_k dL/ds.
template <typename acc_t>
IMPFLOW_HOST_DEVICE acc_t trace_adjoint(acc_t grad_trace, acc_t coeff, acc_t grad_series) {
  return grad_trace + coeff * grad_series;
}

// One element of u_bar_k: the product's own gradient, its trace term's, and what the later
// products carried back through J^T.
template <typename acc_t>
IMPFLOW_HOST_DEVICE acc_t product_adjoint(acc_t grad_product, acc_t trace_weight, acc_t v,
                                          acc_t carried) {
  return grad_product + trace_weight * v + carried;
}

// Backward through "a = b * d" for one element: dL/dd += a_bar * b, and a_bar becomes b_bar.
template <typename acc_t, typename scalar_t>
IMPFLOW_HOST_DEVICE void derivative_adjoint(scalar_t& a_bar, scalar_t b, scalar_t d,
                                            scalar_t& grad_d) {
  const acc_t ab = acc_t(a_bar);
  grad_d = scalar_t(acc_t(grad_d) + ab * acc_t(b));
  a_bar = scalar_t(ab * acc_t(d));
}

}  // namespace impflow
