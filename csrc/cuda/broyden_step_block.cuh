// The one-block CUDA kernel of impflow::broyden_step and its launch.
//
// A group of GROUP threads (a warp or several) owns one sample. Pass 1 accumulates the
// per-slot dots in registers, reduces them within each warp by shuffles and across the warps
// of the group through shared memory; pass 2 walks the sample's elements with the group's
// threads side by side (coalesced), combines the history rows and writes the new pair and the
// step. A sample lives in one block, so the block barrier orders the two passes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <limits>

#include "broyden_step_device.cuh"
#include "impflow/broyden_math.h"
#include "reductions.cuh"
#include "shared_memory.cuh"

namespace impflow {
namespace block_step {

constexpr int kBlockThreads = 256;
constexpr int kWarp = kWarpSize;

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
  IMPFLOW_DYNAMIC_SHARED_MEMORY(smem_raw);
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

// Tensors as checked by broyden_step_launch (contiguous vectors; U, V contiguous or
// batch-minor), B >= 1, d >= 1.
template <typename scalar_t, int GROUP, typename Launch>
void launch(const Launch& launch_kernel, at::Tensor& U, at::Tensor& V, const at::Tensor& dz,
            const at::Tensor& dF, const at::Tensor& F, const at::Tensor& active,
            at::Tensor& step, int n_valid, int slot) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = U.size(0), m = U.size(1), d = U.size(2);
  constexpr int kGroupsPerBlock = kBlockThreads / GROUP;
  const int64_t blocks = (B + kGroupsPerBlock - 1) / kGroupsPerBlock;
  const size_t smem = size_t(kGroupsPerBlock) * (GROUP / kWarp) * broyden_dots_size(n_valid) *
                      sizeof(acc_t);
  TORCH_CHECK(smem <= 48 * 1024, "broyden_step: history too long for the CUDA kernel (n_valid = ",
              n_valid, " needs ", smem, " bytes of shared memory, at most 49152)");
  TORCH_CHECK(blocks <= int64_t(std::numeric_limits<int>::max()), "broyden_step: batch too large");
  launch_kernel(dim3(unsigned(blocks)), dim3(kBlockThreads), smem,
                broyden_step_kernel<scalar_t, GROUP>, U.data_ptr<scalar_t>(),
                V.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(), dF.data_ptr<scalar_t>(),
                F.data_ptr<scalar_t>(), active.data_ptr<bool>(), step.data_ptr<scalar_t>(), B, m, d,
                n_valid, slot, U.stride(0), U.stride(1), U.stride(2));
}

}  // namespace block_step
}  // namespace impflow
