// CUDA kernel of impflow::broyden_step.
//
// A group of GROUP threads (a warp or several) owns one sample. Pass 1 accumulates the
// per-slot dots in registers, reduces them within each warp by shuffles and across the warps
// of the group through shared memory; pass 2 walks the sample's elements with the group's
// threads side by side (coalesced), combines the history rows and writes the new pair and the
// step. A sample lives in one block, so the block barrier orders the two passes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "broyden_step_device.cuh"
#include "broyden_step_split.cuh"
#include "reductions.cuh"

#include <cstdlib>
#include <cstring>
#include <limits>

#include "impflow/broyden_checks.h"
#include "impflow/broyden_math.h"

namespace impflow {
namespace {

constexpr int kBlockThreads = 256;
constexpr int kWarp = 32;

template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
broyden_step_kernel(scalar_t* __restrict__ U, scalar_t* __restrict__ V,
                    const scalar_t* __restrict__ dz, const scalar_t* __restrict__ dF,
                    const scalar_t* __restrict__ F, const bool* __restrict__ active,
                    scalar_t* __restrict__ step, int64_t B, int64_t m, int64_t d, int n_valid,
                    int slot, int64_t sB, int64_t sM, int64_t sD) {
  // History element (b, i, j) lives at b * sB + i * sM + j * sD (contiguous or batch-minor).
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kGroupsPerBlock = kBlockThreads / GROUP;
  constexpr int kWarpsPerGroup = GROUP / kWarp;
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

  const int group = threadIdx.x / GROUP;
  const int rank = threadIdx.x % GROUP;  // thread index within the group
  const int warp_in_group = rank / kWarp;
  const int64_t b = int64_t(blockIdx.x) * kGroupsPerBlock + group;
  // Every thread reaches the barriers below, also those without a sample to work on.
  const bool work = b < B && active[b];

  const int n_dots = broyden_dots_size(n_valid);
  acc_t* partial = smem + int64_t(group) * kWarpsPerGroup * n_dots;  // [warp][dot]

  // This sample's rows and vectors (computed for every thread, used only where `work`).
  scalar_t* Ub = U + b * sB;
  scalar_t* Vb = V + b * sB;
  const scalar_t* dzb = dz + b * d;
  const scalar_t* dFb = dF + b * d;
  const scalar_t* Fb = F + b * d;
  if (work) {
    warp_partial_dots(Ub, Vb, dzb, dFb, Fb, sM, sD, rank, d, GROUP, n_valid,
                      partial + warp_in_group * n_dots);
  }
  __syncthreads();
  // Sum the warps' partials into row 0 (each index is owned by one thread: no race).
  if (work && kWarpsPerGroup > 1) {
    for (int t = rank; t < n_dots; t += GROUP) {
      acc_t s = partial[t];
      for (int w = 1; w < kWarpsPerGroup; ++w) s += partial[w * n_dots + t];
      partial[t] = s;
    }
  }
  __syncthreads();
  if (!work) {
    if (b < B) {
      for (int64_t j = rank; j < d; j += GROUP) step[b * d + j] = scalar_t(0);
    }
    return;  // no barrier follows
  }
  update_elements(Ub, Vb, dzb, dFb, Fb, step + b * d, sM, sD, partial, rank, d, GROUP, n_valid,
                  slot);
}

template <typename scalar_t, int GROUP>
void launch(at::Tensor& U, at::Tensor& V, const at::Tensor& dz, const at::Tensor& dF,
            const at::Tensor& F, const at::Tensor& active, at::Tensor& step, int n_valid, int slot) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = U.size(0), m = U.size(1), d = U.size(2);
  constexpr int kGroupsPerBlock = kBlockThreads / GROUP;
  const int64_t blocks = (B + kGroupsPerBlock - 1) / kGroupsPerBlock;
  const size_t smem = size_t(kGroupsPerBlock) * (GROUP / kWarp) * broyden_dots_size(n_valid) *
                      sizeof(acc_t);
  TORCH_CHECK(smem <= 48 * 1024, "broyden_step: history too long for the CUDA kernel (n_valid = ",
              n_valid, " needs ", smem, " bytes of shared memory, at most 49152); use m <= ",
              (48 * 1024 / (kBlockThreads / kWarp * sizeof(acc_t)) - 2) / 3);
  TORCH_CHECK(blocks <= int64_t(std::numeric_limits<int>::max()), "broyden_step: batch too large");
  broyden_step_kernel<scalar_t, GROUP>
      <<<unsigned(blocks), kBlockThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
          U.data_ptr<scalar_t>(), V.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(),
          dF.data_ptr<scalar_t>(), F.data_ptr<scalar_t>(), active.data_ptr<bool>(),
          step.data_ptr<scalar_t>(), B, m, d, n_valid, slot, U.stride(0), U.stride(1), U.stride(2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// IMPFLOW_CUDA_STEP (read at every call, so tests can switch it): "split" runs the split
// kernels of broyden_step_split.cuh, "block" or unset the one-block kernel above. The split
// kernels stay opt-in until they have run and been measured on a GPU.
// The kernels keep up to 8 warps' partial dots (3 m + 2 each) in a block's shared memory, at
// most 48 KiB without an opt-in: 255 slots in float64, 511 in float32 (the accumulators).
int64_t max_history_slots(at::ScalarType dtype) {
  const int64_t acc_bytes = dtype == at::kDouble ? 8 : 4;
  return (48 * 1024 / (8 * acc_bytes) - 2) / 3;
}

bool use_split_kernel() {
  const char* choice = std::getenv("IMPFLOW_CUDA_STEP");
  if (choice == nullptr || choice[0] == '\0' || std::strcmp(choice, "block") == 0) return false;
  TORCH_CHECK(std::strcmp(choice, "split") == 0,
              "IMPFLOW_CUDA_STEP must be 'block' or 'split' (or unset), got '", choice, "'");
  return true;
}

at::Tensor broyden_step_cuda(at::Tensor& U, at::Tensor& V, const at::Tensor& dz_in,
                             const at::Tensor& dF_in, const at::Tensor& F_in,
                             const at::Tensor& active_in, int64_t slot, int64_t n_valid) {
  check_broyden_step_args(U, V, dz_in, dF_in, F_in, active_in, slot, n_valid);
  // Checked against the capacity m, not the slots filled so far: a solve with too long a
  // history fails at its first step, not after m of them.
  const int64_t max_m = max_history_slots(U.scalar_type());
  TORCH_CHECK(U.size(1) <= max_m, "broyden_step: the CUDA kernel holds at most ", max_m,
              " history slots in ", U.scalar_type(), " (U.size(1), a solver's history), got m = ",
              U.size(1));
  const c10::cuda::CUDAGuard guard(U.device());
  const auto dz = dz_in.contiguous(), dF = dF_in.contiguous(), F = F_in.contiguous();
  const auto active = active_in.contiguous();
  auto step = at::empty_like(F);
  if (U.size(0) == 0 || U.size(2) == 0) return step.zero_();
  const int64_t d = U.size(2);
  const bool split = use_split_kernel();
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "broyden_step_cuda", [&] {
    if (split) {
      split_step::launch<scalar_t>(U, V, dz, dF, F, active, step, int(n_valid), int(slot));
      return;
    }
    // Enough threads per sample to cover it, few enough to keep the lanes busy.
    if (d <= 64) {
      launch<scalar_t, 32>(U, V, dz, dF, F, active, step, int(n_valid), int(slot));
    } else if (d <= 1024) {
      launch<scalar_t, 128>(U, V, dz, dF, F, active, step, int(n_valid), int(slot));
    } else {
      launch<scalar_t, 256>(U, V, dz, dF, F, active, step, int(n_valid), int(slot));
    }
  });
  return step;
}

}  // namespace

TORCH_LIBRARY_IMPL(impflow, CUDA, m) { m.impl("broyden_step", &broyden_step_cuda); }

}  // namespace impflow
