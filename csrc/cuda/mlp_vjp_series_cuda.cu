// CUDA registration of impflow::mlp_vjp_series and its backward: the schedule of
// mlp_vjp_series_steps.h with the fused kernels of mlp_vjp_series_kernels.cuh.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cuda_launch.cuh"
#include "impflow/mlp_vjp_series_steps.h"
#include "mlp_vjp_series_kernels.cuh"

namespace impflow {
namespace {

using Kernels = vjp_series::DeviceKernels<CudaLaunch>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_vjp_series_cuda(at::TensorList weights,
                                                                   at::TensorList act_derivs,
                                                                   const at::Tensor& v,
                                                                   const at::Tensor& coeffs,
                                                                   int64_t n_terms) {
  // A device-generic guard: with a CPU v among CUDA inputs (the CUDA kernel is picked by any
  // CUDA argument) the checks then name it; a CUDAGuard would refuse the CPU device first.
  const c10::DeviceGuard guard(v.device());
  return mlp_vjp_series_forward<Kernels>(weights, act_derivs, v, coeffs, n_terms);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>
mlp_vjp_series_backward_cuda(const at::Tensor& grad_products, const at::Tensor& grad_traces,
                             const at::Tensor& grad_series, at::TensorList weights,
                             at::TensorList act_derivs, const at::Tensor& v,
                             const at::Tensor& coeffs, const at::Tensor& products) {
  const c10::DeviceGuard guard(v.device());  // see mlp_vjp_series_cuda
  return mlp_vjp_series_backward<Kernels>(grad_products, grad_traces, grad_series, weights,
                                          act_derivs, v, coeffs, products);
}

}  // namespace

TORCH_LIBRARY_IMPL(impflow, CUDA, m) {
  m.impl("mlp_vjp_series", &mlp_vjp_series_cuda);
  m.impl("mlp_vjp_series_backward", &mlp_vjp_series_backward_cuda);
}

}  // namespace impflow
