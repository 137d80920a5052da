// CUDA registration of impflow::solver_track; kernels and launch code in
// solver_track_kernels.cuh.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cuda_launch.cuh"
#include "solver_track_kernels.cuh"

namespace impflow {
namespace {

std::tuple<at::Tensor, at::Tensor> solver_track_cuda(const at::Tensor& z, const at::Tensor& F,
                                                     at::Tensor& best_z, at::Tensor& best_F,
                                                     at::Tensor& best, at::Tensor& status,
                                                     at::Tensor& nstep, double tol,
                                                     double floor_scale, double divergence_ratio,
                                                     bool relative) {
  return solver_track_launch(CudaLaunch{}, z, F, best_z, best_F, best, status, nstep, tol,
                             floor_scale, divergence_ratio, relative);
}

}  // namespace

TORCH_LIBRARY_IMPL(impflow, CUDA, m) { m.impl("solver_track", &solver_track_cuda); }

}  // namespace impflow
