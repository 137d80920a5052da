// The split CUDA kernels of impflow::broyden_step, for long samples (large d, few samples).
//
// The one-block kernel (broyden_step_cuda.cu) gives each sample one block: at B = 256,
// d = 3072 that is 256 blocks on 132 SMs, too few to keep the memory busy (21% of the copy
// bandwidth on an H200). Here each sample is cut into chunks of kSplitChunk elements, one
// block per (sample, chunk), in two launches:
//   1. per chunk, its part of every dot of the sample (a_i, b_i, c_i, dz.dF, dz.F), written
//      to a (B, chunks, n_dots) buffer;
//   2. per chunk, the sums of its sample's parts (the same in every block of the sample), the
//      coefficients, then the chunk's elements of the new pair and of the step.
// The history is read twice, as in the one-block kernel, but by enough blocks to fill the
// machine. The arithmetic is broyden_math.h's, as in every other kernel.
//
// Not used unless IMPFLOW_CUDA_STEP=split: it has not run on a GPU yet.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>

#include <limits>

#include "impflow/broyden_math.h"
#include "reductions.cuh"

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
dots_kernel(const scalar_t* __restrict__ U, const scalar_t* __restrict__ V,
            const scalar_t* __restrict__ dz, const scalar_t* __restrict__ dF,
            const scalar_t* __restrict__ F, const bool* __restrict__ active,
            at::opmath_type<scalar_t>* __restrict__ partial, int64_t d, int chunks, int n_valid,
            int64_t sB, int64_t sM, int64_t sD) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* warp_dots = reinterpret_cast<acc_t*>(smem_raw);  // [warp][dot]
  const int64_t b = blockIdx.x;
  const int c = blockIdx.y;
  if (!active[b]) return;  // the whole block: no barrier is skipped by part of it
  const int n_dots = broyden_dots_size(n_valid);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const ChunkRange r = chunk_range(c, d);
  const scalar_t* Ub = U + b * sB;
  const scalar_t* Vb = V + b * sB;
  const scalar_t* dzb = dz + b * d;
  const scalar_t* dFb = dF + b * d;
  const scalar_t* Fb = F + b * d;
  for (int i = 0; i < n_valid; ++i) {
    acc_t a = 0, bb = 0, cc = 0;
    for (int64_t j = r.j0 + threadIdx.x; j < r.j1; j += kThreads) {
      const acc_t v = Vb[i * sM + j * sD];
      a += acc_t(dzb[j]) * acc_t(Ub[i * sM + j * sD]);
      bb += v * acc_t(dFb[j]);
      cc += v * acc_t(Fb[j]);
    }
    a = warp_sum(a);
    bb = warp_sum(bb);
    cc = warp_sum(cc);
    if (lane == 0) {
      warp_dots[warp * n_dots + i] = a;
      warp_dots[warp * n_dots + n_valid + i] = bb;
      warp_dots[warp * n_dots + 2 * n_valid + i] = cc;
    }
  }
  acc_t dz_dF = 0, dz_F = 0;
  for (int64_t j = r.j0 + threadIdx.x; j < r.j1; j += kThreads) {
    dz_dF += acc_t(dzb[j]) * acc_t(dFb[j]);
    dz_F += acc_t(dzb[j]) * acc_t(Fb[j]);
  }
  dz_dF = warp_sum(dz_dF);
  dz_F = warp_sum(dz_F);
  if (lane == 0) {
    warp_dots[warp * n_dots + 3 * n_valid] = dz_dF;
    warp_dots[warp * n_dots + 3 * n_valid + 1] = dz_F;
  }
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
  extern __shared__ unsigned char smem_raw[];
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
  const auto k = broyden_coefficients<acc_t>(dots, n_valid);
  const scalar_t* Ub = U + b * sB;
  const scalar_t* Vb = V + b * sB;
  scalar_t* u_slot = U + b * sB + int64_t(slot) * sM;
  scalar_t* v_slot = V + b * sB + int64_t(slot) * sM;
  for (int64_t j = r.j0 + threadIdx.x; j < r.j1; j += kThreads) {
    acc_t sum_u_b = 0, sum_v_a = 0, sum_u_c = 0;
    for (int i = 0; i < n_valid; ++i) {
      const acc_t u = Ub[i * sM + j * sD];
      sum_u_b += u * dots[n_valid + i];
      sum_v_a += acc_t(Vb[i * sM + j * sD]) * dots[i];
      if (i != slot) sum_u_c += u * dots[2 * n_valid + i];  // the overwritten slot drops out
    }
    acc_t u_new, v_new, s;
    broyden_element<acc_t>(dz[b * d + j], dF[b * d + j], F[b * d + j], sum_u_b, sum_v_a,
                           sum_u_c, k, &u_new, &v_new, &s);
    // Element j of the slot row was read above by this thread only (launch 1 has finished).
    u_slot[j * sD] = scalar_t(u_new);
    v_slot[j * sD] = scalar_t(v_new);
    step[b * d + j] = scalar_t(s);
  }
}

// Both launches on the current stream. Tensors as in broyden_step_cuda (checked, contiguous
// vectors; U, V contiguous or batch-minor), B >= 1, d >= 1.
template <typename scalar_t>
void launch(at::Tensor& U, at::Tensor& V, const at::Tensor& dz, const at::Tensor& dF,
            const at::Tensor& F, const at::Tensor& active, at::Tensor& step, int n_valid,
            int slot) {
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
  const auto stream = at::cuda::getCurrentCUDAStream();
  dots_kernel<scalar_t><<<grid, kThreads, dots_smem, stream>>>(
      U.data_ptr<scalar_t>(), V.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(),
      dF.data_ptr<scalar_t>(), F.data_ptr<scalar_t>(), active.data_ptr<bool>(),
      partial.data_ptr<acc_t>(), d, int(chunks), n_valid, U.stride(0), U.stride(1), U.stride(2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  update_kernel<scalar_t><<<grid, kThreads, size_t(n_dots) * sizeof(acc_t), stream>>>(
      U.data_ptr<scalar_t>(), V.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(),
      dF.data_ptr<scalar_t>(), F.data_ptr<scalar_t>(), active.data_ptr<bool>(),
      partial.data_ptr<acc_t>(), step.data_ptr<scalar_t>(), d, int(chunks), n_valid, slot,
      U.stride(0), U.stride(1), U.stride(2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace split_step
}  // namespace impflow
