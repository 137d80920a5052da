// The host side of the CUDA broyden_step: checks, the choice of kernel, the launches. The
// launcher is a parameter (a device guard and a kernel launch, see cuda_launch.cuh):
// broyden_step_cuda.cu passes CudaLaunch; the C++ tests pass the SIMT emulator's, and run this
// code and the kernels' source on CPU tensors.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "broyden_step_block.cuh"
#include "broyden_step_split.cuh"
#include "impflow/broyden_checks.h"

namespace impflow {

// kAuto: the one-block kernel, with as many threads per sample as d asks for. The others force
// one kernel (kSplit: IMPFLOW_CUDA_STEP=split; the group sizes for the tests).
enum class StepKernel { kAuto, kSplit, kGroup32, kGroup128, kGroup256 };

// The kernels keep up to 8 warps' partial dots (3 m + 3 each, see broyden_dots_size) in a
// block's shared memory, at most 48 KiB without an opt-in: 255 slots in float64, 511 in
// float32 (the accumulators).
inline int64_t max_history_slots(at::ScalarType dtype) {
  const int64_t acc_bytes = dtype == at::kDouble ? 8 : 4;
  return (48 * 1024 / (8 * acc_bytes) - 3) / 3;
}

template <typename Launch>
at::Tensor broyden_step_launch(const Launch& launch_kernel, at::Tensor& U, at::Tensor& V,
                               const at::Tensor& dz_in, const at::Tensor& dF_in,
                               const at::Tensor& F_in, const at::Tensor& active_in, int64_t slot,
                               int64_t n_valid, StepKernel kernel) {
  check_broyden_step_args(U, V, dz_in, dF_in, F_in, active_in, slot, n_valid);
  // Checked against the capacity m, not the slots filled so far: a solve with too long a
  // history fails at its first step, not after m of them.
  const int64_t max_m = max_history_slots(U.scalar_type());
  TORCH_CHECK(U.size(1) <= max_m, "broyden_step: the CUDA kernel holds at most ", max_m,
              " history slots in ", U.scalar_type(), " (U.size(1), a solver's history), got m = ",
              U.size(1));
  const auto device_guard = launch_kernel.guard(U.device());
  const auto dz = dz_in.contiguous(), dF = dF_in.contiguous(), F = F_in.contiguous();
  const auto active = active_in.contiguous();
  auto step = at::empty_like(F);
  if (U.size(0) == 0 || U.size(2) == 0) return step.zero_();
  const int64_t d = U.size(2);
  if (kernel == StepKernel::kAuto) {
    // Enough threads per sample to cover it, few enough to keep the lanes busy.
    kernel = d <= 64 ? StepKernel::kGroup32
                     : (d <= 1024 ? StepKernel::kGroup128 : StepKernel::kGroup256);
  }
  const int nv = int(n_valid), sl = int(slot);
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "broyden_step_cuda", [&] {
    switch (kernel) {
      case StepKernel::kSplit:
        split_step::launch<scalar_t>(launch_kernel, U, V, dz, dF, F, active, step, nv, sl);
        break;
      case StepKernel::kGroup32:
        block_step::launch<scalar_t, 32>(launch_kernel, U, V, dz, dF, F, active, step, nv, sl);
        break;
      case StepKernel::kGroup128:
        block_step::launch<scalar_t, 128>(launch_kernel, U, V, dz, dF, F, active, step, nv, sl);
        break;
      default:
        block_step::launch<scalar_t, 256>(launch_kernel, U, V, dz, dF, F, active, step, nv, sl);
    }
  });
  return step;
}

}  // namespace impflow
