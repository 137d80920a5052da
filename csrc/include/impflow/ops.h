// C++ entry points of the impflow ops (LibTorch users and the C++ tests). Each call goes
// through the dispatcher, so it reaches the kernel of the inputs' device.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace impflow {

// One fused good-Broyden update per active sample; see DESIGN.md §3 and broyden_math.h.
// U, V: (B, m, d) histories, updated in place at `slot`; dz, dF, F: (B, d); active: (B,) bool.
// Returns the next step -H F, shape (B, d); zero for inactive samples.
at::Tensor broyden_step(at::Tensor& U, at::Tensor& V, const at::Tensor& dz, const at::Tensor& dF,
                        const at::Tensor& F, const at::Tensor& active, int64_t slot,
                        int64_t n_valid);

// Bookkeeping of one solver iteration for the active samples (status bit kActive, see
// track_math.h): residual ||F||_2 and measure (abs, or rel = ||F|| / min(||z||, reach)), best
// iterate copied into best_z / best_F when it improved or converged, convergence of finite
// iterates at max(tol, precision floor), non-finite and exploding residuals flagged, nstep
// incremented. z, F: (B, n); best: (5, B) float64 rows [best measure, best residual, first
// residual, ||z|| at the best iterate, reach]; status: (B,) uint8; nstep: (B,) int64.
// Returns (counts, mask): int64 [active, blown up] and bool (B,) = active and not in fallback.
std::tuple<at::Tensor, at::Tensor> solver_track(const at::Tensor& z, const at::Tensor& F,
                                                at::Tensor& best_z, at::Tensor& best_F,
                                                at::Tensor& best, at::Tensor& status,
                                                at::Tensor& nstep, double tol, double floor_scale,
                                                double divergence_ratio, bool relative);

// n_iterations steps of v <- normalize(W^T u), u <- normalize(W v) for every matrix of
// `weights` (each (out, in), one dtype and device), updating us[l] (out,) and vs[l] (in,) in
// place; returns sigma_l = u_l^T W_l v_l, shape (L,).
at::Tensor power_iteration(at::TensorList weights, at::TensorList us, at::TensorList vs,
                           int64_t n_iterations);

// The series of vector-Jacobian products of an MLP g(x) = W_L s(... s(W_1 x + b_1)) + b_L
// (see mlp_vjp_series_math.h): per sample J = W_L D_{L-1} ... D_1 W_1, D_i = diag(act_derivs[i]).
// weights[i]: (h_{i+1}, h_i), h_0 = h_L = d; act_derivs[i]: (B, h_{i+1}); v: (B, d);
// coeffs: (n_terms,); n_terms >= 1. Returns products (n_terms, B, d) with products[k-1] = v^T J^k,
// traces (n_terms, B) = v^T J^k v, and series (B,) = sum_k coeffs[k-1] traces[k-1].
std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_vjp_series(at::TensorList weights,
                                                              at::TensorList act_derivs,
                                                              const at::Tensor& v,
                                                              const at::Tensor& coeffs,
                                                              int64_t n_terms);

// Gradients of a loss with respect to weights, act_derivs and v, given its gradients with
// respect to the three outputs of mlp_vjp_series (products: that call's first output).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> mlp_vjp_series_backward(
    const at::Tensor& grad_products, const at::Tensor& grad_traces, const at::Tensor& grad_series,
    at::TensorList weights, at::TensorList act_derivs, const at::Tensor& v,
    const at::Tensor& coeffs, const at::Tensor& products);

// True when this build carries CUDA kernels.
bool compiled_with_cuda();

}  // namespace impflow
