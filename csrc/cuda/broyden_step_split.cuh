// The split CUDA kernels of impflow::broyden_step, for long samples (large d, few samples).
//
// The one-block kernel (broyden_step_cuda.cu) gives each sample one block: at B = 256,
// d = 3072 that is 256 blocks on 132 SMs, too few to keep the memory busy (21% of the copy
// bandwidth on an H200). Here each sample is cut into chunks of kChunk elements, one
// block per (sample, chunk), in two launches:
//   1. per chunk, its part of every dot of the sample (a_i, b_i, c_i, dz.dF, dz.F), written
//      to a (B, chunks, n_dots) buffer;
//   2. per chunk, the sums of its sample's parts (the same in every block of the sample), the
//      coefficients, then the chunk's elements of the new pair and of the step.
// The history is read twice, as in the one-block kernel, but by enough blocks to fill the
// machine. Both passes are those of the one-block kernel (broyden_step_device.cuh).
//
// Not used unless IMPFLOW_CUDA_STEP=split: it has not run on a GPU yet.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <limits>

#include "broyden_step_device.cuh"
#include "impflow/broyden_math.h"
#include "shared_memory.cuh"

namespace impflow {
namespace split_step {

constexpr int kThreads = 128;
constexpr int64_t kChunk = 512;  // elements of a sample per block: 4 per thread
constexpr int kWarps = kThreads / kWarpSize;

// Elements [j0, j1) of sample b's chunk c.
struct ChunkRange {
  int64_t j0, j1;
};

__device__ __forceinline__ ChunkRange chunk_range(int64_t c, int64_t d) {
  const int64_t j0 = c * kChunk;
  return {j0, j0 + kChunk < d ? j0 + kChunk : d};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
dots_kernel(scalar_t* __restrict__ U, scalar_t* __restrict__ V, const scalar_t* __restrict__ dz,
            const scalar_t* __restrict__ dF, const scalar_t* __restrict__ F,
            const bool* __restrict__ active, at::opmath_type<scalar_t>* __restrict__ partial,
            int64_t d, int chunks, int n_valid, int64_t sB, int64_t sM, int64_t sD) {
  using acc_t = at::opmath_type<scalar_t>;
  IMPFLOW_DYNAMIC_SHARED_MEMORY(smem_raw);
  acc_t* warp_dots = reinterpret_cast<acc_t*>(smem_raw);  // [warp][dot]
  const int64_t b = blockIdx.x;
  const int c = blockIdx.y;
  if (!active[b]) return;  // the whole block: no barrier is skipped by part of it
  const int n_dots = broyden_dots_size(n_valid);
  const ChunkRange r = chunk_range(c, d);
  const int warp = threadIdx.x / kWarpSize;
  warp_partial_dots(U + b * sB, V + b * sB, dz + b * d, dF + b * d, F + b * d, sM, sD,
                    r.j0 + threadIdx.x, r.j1, kThreads, n_valid, warp_dots + warp * n_dots);
  __syncthreads();
  acc_t* out = partial + (b * chunks + c) * n_dots;
  for (int t = threadIdx.x; t < n_dots; t += kThreads) {
    acc_t s = 0;
    for (int w = 0; w < kWarps; ++w) s += warp_dots[w * n_dots + t];
    out[t] = s;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
update_kernel(scalar_t* __restrict__ U, scalar_t* __restrict__ V,
              const scalar_t* __restrict__ dz, const scalar_t* __restrict__ dF,
              const scalar_t* __restrict__ F, const bool* __restrict__ active,
              const at::opmath_type<scalar_t>* __restrict__ partial,
              scalar_t* __restrict__ step, int64_t d, int chunks, int n_valid, int slot,
              int64_t sB, int64_t sM, int64_t sD) {
  using acc_t = at::opmath_type<scalar_t>;
  IMPFLOW_DYNAMIC_SHARED_MEMORY(smem_raw);
  acc_t* dots = reinterpret_cast<acc_t*>(smem_raw);  // the sample's dots, summed over chunks
  const int64_t b = blockIdx.x;
  const ChunkRange r = chunk_range(blockIdx.y, d);
  if (!active[b]) {  // the whole block: converged samples step by zero
    for (int64_t j = r.j0 + threadIdx.x; j < r.j1; j += kThreads) step[b * d + j] = scalar_t(0);
    return;
  }
  const int n_dots = broyden_dots_size(n_valid);
  for (int t = threadIdx.x; t < n_dots; t += kThreads) {
    acc_t s = 0;
    for (int c = 0; c < chunks; ++c) s += partial[(b * chunks + c) * n_dots + t];
    dots[t] = s;
  }
  __syncthreads();
  // Launch 1 has finished reading the slot row: its chunk is this block's alone now.
  update_elements(U + b * sB, V + b * sB, dz + b * d, dF + b * d, F + b * d, step + b * d, sM,
                  sD, dots, r.j0 + threadIdx.x, r.j1, kThreads, n_valid, slot);
}

// Both launches, one after the other. Tensors as checked by broyden_step_launch (contiguous
// vectors; U, V contiguous or batch-minor), B >= 1, d >= 1.
template <typename scalar_t, typename Launch>
void launch(const Launch& launch_kernel, at::Tensor& U, at::Tensor& V, const at::Tensor& dz,
            const at::Tensor& dF, const at::Tensor& F, const at::Tensor& active,
            at::Tensor& step, int n_valid, int slot) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = U.size(0), d = U.size(2);
  const int64_t chunks = (d + kChunk - 1) / kChunk;
  const int n_dots = broyden_dots_size(n_valid);
  const size_t dots_smem = size_t(kWarps) * n_dots * sizeof(acc_t);
  TORCH_CHECK(dots_smem <= 48 * 1024, "broyden_step: history too long for the split CUDA kernel "
              "(n_valid = ", n_valid, " needs ", dots_smem, " bytes of shared memory, at most "
              "49152)");
  TORCH_CHECK(B <= int64_t(std::numeric_limits<int>::max()) && chunks <= 65535,
              "broyden_step: problem too large for the split CUDA kernel (B = ", B, ", d = ", d,
              ")");
  const at::Tensor partial =
      at::empty({B, chunks, n_dots}, U.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(chunks));
  launch_kernel(grid, dim3(kThreads), dots_smem, dots_kernel<scalar_t>, U.data_ptr<scalar_t>(),
                V.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(), dF.data_ptr<scalar_t>(),
                F.data_ptr<scalar_t>(), active.data_ptr<bool>(), partial.data_ptr<acc_t>(), d,
                int(chunks), n_valid, U.stride(0), U.stride(1), U.stride(2));
  launch_kernel(grid, dim3(kThreads), size_t(n_dots) * sizeof(acc_t), update_kernel<scalar_t>,
                U.data_ptr<scalar_t>(), V.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(),
                dF.data_ptr<scalar_t>(), F.data_ptr<scalar_t>(), active.data_ptr<bool>(),
                partial.data_ptr<acc_t>(), step.data_ptr<scalar_t>(), d, int(chunks), n_valid, slot,
                U.stride(0), U.stride(1), U.stride(2));
}

}  // namespace split_step
}  // namespace impflow
