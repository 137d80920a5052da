// CUDA registration of impflow::power_iteration; kernel and launch code in
// power_iteration_kernels.cuh.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_launch.cuh"
#include "power_iteration_kernels.cuh"

namespace impflow {
namespace {

at::Tensor power_iteration_cuda(at::TensorList weights, at::TensorList us, at::TensorList vs,
                                int64_t n_iterations) {
  return power_iteration_launch(CudaLaunch{}, weights, us, vs, n_iterations);
}

}  // namespace

TORCH_LIBRARY_IMPL(impflow, CUDA, m) { m.impl("power_iteration", &power_iteration_cuda); }

}  // namespace impflow
