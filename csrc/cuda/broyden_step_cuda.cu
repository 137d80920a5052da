// CUDA registration of impflow::broyden_step. The kernels are in broyden_step_block.cuh (one
// block per sample) and broyden_step_split.cuh (several blocks per sample), their launch code
// in broyden_step_launch.cuh.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "broyden_step_launch.cuh"
#include "cuda_launch.cuh"

namespace impflow {
namespace {

// IMPFLOW_CUDA_STEP (read at every call, so tests can switch it): "split" runs the split
// kernels of broyden_step_split.cuh, "block" or unset the one-block kernel. The split kernels
// stay opt-in until they have run and been measured on a GPU.
bool use_split_kernel() {
  const char* choice = std::getenv("IMPFLOW_CUDA_STEP");
  if (choice == nullptr || choice[0] == '\0' || std::strcmp(choice, "block") == 0) return false;
  TORCH_CHECK(std::strcmp(choice, "split") == 0,
              "IMPFLOW_CUDA_STEP must be 'block' or 'split' (or unset), got '", choice, "'");
  return true;
}

at::Tensor broyden_step_cuda(at::Tensor& U, at::Tensor& V, const at::Tensor& dz,
                             const at::Tensor& dF, const at::Tensor& F, const at::Tensor& active,
                             int64_t slot, int64_t n_valid) {
  const StepKernel kernel = use_split_kernel() ? StepKernel::kSplit : StepKernel::kAuto;
  return broyden_step_launch(CudaLaunch{}, U, V, dz, dF, F, active, slot, n_valid, kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(impflow, CUDA, m) { m.impl("broyden_step", &broyden_step_cuda); }

}  // namespace impflow
