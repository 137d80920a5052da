// Every impflow op schema, the C++ entry points, and (in the Python build) the module init.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "impflow/ops.h"
#include "impflow/power_checks.h"

#ifdef TORCH_EXTENSION_NAME
#include <torch/extension.h>
#endif

namespace impflow {

TORCH_LIBRARY(impflow, m) {
  // U and V are the Broyden histories, written in place at `slot`.
  m.def("broyden_step(Tensor(a!) U, Tensor(b!) V, Tensor dz, Tensor dF, Tensor F, Tensor active, "
        "int slot, int n_valid) -> Tensor");
  // Per-sample bookkeeping of one solver iteration; the state tensors are updated in place.
  m.def("solver_track(Tensor z, Tensor F, Tensor(a!) best_z, Tensor(b!) best_F, Tensor(c!) best, "
        "Tensor(d!) status, Tensor(e!) nstep, float tol, float floor_scale, "
        "float divergence_ratio, bool relative) -> (Tensor, Tensor)");
  // n power-iteration steps for each matrix of a list; the vectors are updated in place.
  m.def("power_iteration(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, int n_iterations) "
        "-> Tensor");
  // The vector-Jacobian products v^T J^k (k = 1..n_terms) of an MLP with the given (normalised)
  // weights and activation derivatives, their trace terms v^T J^k v and sum_k coeffs[k] * trace.
  m.def("mlp_vjp_series(Tensor[] weights, Tensor[] act_derivs, Tensor v, Tensor coeffs, "
        "int n_terms) -> (Tensor products, Tensor traces, Tensor series)");
  // Its backward (first order; the gradient with respect to coeffs is left to the caller).
  m.def("mlp_vjp_series_backward(Tensor grad_products, Tensor grad_traces, Tensor grad_series, "
        "Tensor[] weights, Tensor[] act_derivs, Tensor v, Tensor coeffs, Tensor products) "
        "-> (Tensor[] grad_weights, Tensor[] grad_act_derivs, Tensor grad_v)");
}

// The solver and power-iteration ops are not differentiable. Without these kernels torch's
// default lets a gradient through them come out as None, with a warning at most; with them,
// the outputs of inputs that require grad carry a node whose backward raises "derivative for
// impflow::broyden_step is not implemented".
TORCH_LIBRARY_IMPL(impflow, Autograd, m) {
  for (const char* name : {"broyden_step", "solver_track", "power_iteration"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}

at::Tensor broyden_step(at::Tensor& U, at::Tensor& V, const at::Tensor& dz, const at::Tensor& dF,
                        const at::Tensor& F, const at::Tensor& active, int64_t slot,
                        int64_t n_valid) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("impflow::broyden_step", "")
                       .typed<at::Tensor(at::Tensor&, at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         int64_t, int64_t)>();
  return op.call(U, V, dz, dF, F, active, slot, n_valid);
}

std::tuple<at::Tensor, at::Tensor> solver_track(const at::Tensor& z, const at::Tensor& F,
                                                at::Tensor& best_z, at::Tensor& best_F,
                                                at::Tensor& best, at::Tensor& status,
                                                at::Tensor& nstep, double tol, double floor_scale,
                                                double divergence_ratio, bool relative) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("impflow::solver_track", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                           at::Tensor&, at::Tensor&, at::Tensor&, double, double, double, bool)>();
  return op.call(z, F, best_z, best_F, best, status, nstep, tol, floor_scale, divergence_ratio,
                 relative);
}

at::Tensor power_iteration(at::TensorList weights, at::TensorList us, at::TensorList vs,
                           int64_t n_iterations) {
  // Without a tensor the dispatcher has no device to choose a kernel by: checked here.
  if (weights.empty() && us.empty() && vs.empty()) {
    check_power_iteration_args(weights, us, vs, n_iterations);
    return at::empty({0});
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("impflow::power_iteration", "")
                       .typed<at::Tensor(at::TensorList, at::TensorList, at::TensorList, int64_t)>();
  return op.call(weights, us, vs, n_iterations);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_vjp_series(at::TensorList weights,
                                                              at::TensorList act_derivs,
                                                              const at::Tensor& v,
                                                              const at::Tensor& coeffs,
                                                              int64_t n_terms) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("impflow::mlp_vjp_series", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           at::TensorList, at::TensorList, const at::Tensor&, const at::Tensor&,
                           int64_t)>();
  return op.call(weights, act_derivs, v, coeffs, n_terms);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> mlp_vjp_series_backward(
    const at::Tensor& grad_products, const at::Tensor& grad_traces, const at::Tensor& grad_series,
    at::TensorList weights, at::TensorList act_derivs, const at::Tensor& v,
    const at::Tensor& coeffs, const at::Tensor& products) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("impflow::mlp_vjp_series_backward", "")
          .typed<std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList,
              at::TensorList, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_products, grad_traces, grad_series, weights, act_derivs, v, coeffs,
                 products);
}

bool compiled_with_cuda() {
#ifdef IMPFLOW_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace impflow

#ifdef TORCH_EXTENSION_NAME
#define IMPFLOW_STRINGIFY_(x) #x
#define IMPFLOW_STRINGIFY(x) IMPFLOW_STRINGIFY_(x)

// The ops live in the dispatcher (torch.ops.impflow); the module carries build facts that
// impflow/_extension.py compares with the running torch.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("compiled_with_cuda", &impflow::compiled_with_cuda);
  module.attr("torch_version") = IMPFLOW_STRINGIFY(IMPFLOW_TORCH_VERSION);
#ifdef IMPFLOW_CUDA_VERSION
  module.attr("cuda_version") = IMPFLOW_STRINGIFY(IMPFLOW_CUDA_VERSION);
#else
  module.attr("cuda_version") = pybind11::none();
#endif
}
#endif
