// The two passes of the CUDA Broyden step over one sample's elements, shared by the one-block
// kernel (broyden_step_cuda.cu) and the split kernels (broyden_step_split.cuh). Each thread
// takes the elements first, first + stride, ... below end of the sample: the whole sample
// (one block per sample) or one chunk of it (split).
#pragma once

#include <ATen/OpMathType.h>

#include "impflow/broyden_math.h"
#include "reductions.cuh"

namespace impflow {

// Both passes take one sample's pointers as restrict-qualified parameters (not in a struct):
// after inlining the compiler still knows that the history writes of pass 2 do not alias the
// vectors it reads, and can keep the loads ahead of the stores. History element (i, j) lives at
// i * sM + j * sD from U, V (contiguous or batch-minor); the vectors are contiguous.

// Pass 1: this thread's share of every dot (a_i = dz.u_i, b_i = v_i.dF, c_i = v_i.F, then
// dz.dF, dz.F and 0.F), summed over its warp; lane 0 writes them to `out` in the layout of
// broyden_dots_size. Every lane of the warp must call it (shuffles).
template <typename scalar_t>
__device__ __forceinline__ void warp_partial_dots(
    const scalar_t* __restrict__ U, const scalar_t* __restrict__ V,
    const scalar_t* __restrict__ dz, const scalar_t* __restrict__ dF,
    const scalar_t* __restrict__ F, int64_t sM, int64_t sD, int64_t first, int64_t end,
    int64_t stride, int n_valid, at::opmath_type<scalar_t>* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool lane0 = threadIdx.x % kWarpSize == 0;
  for (int i = 0; i < n_valid; ++i) {
    acc_t a = 0, bb = 0, c = 0;
    for (int64_t j = first; j < end; j += stride) {
      const acc_t v = V[i * sM + j * sD];
      a += acc_t(dz[j]) * acc_t(U[i * sM + j * sD]);
      bb += v * acc_t(dF[j]);
      c += v * acc_t(F[j]);
    }
    a = warp_sum(a);
    bb = warp_sum(bb);
    c = warp_sum(c);
    if (lane0) {
      out[i] = a;
      out[n_valid + i] = bb;
      out[2 * n_valid + i] = c;
    }
  }
  acc_t dz_dF = 0, dz_F = 0, zero_F = 0;
  for (int64_t j = first; j < end; j += stride) {
    dz_dF += acc_t(dz[j]) * acc_t(dF[j]);
    dz_F += acc_t(dz[j]) * acc_t(F[j]);
    zero_F += acc_t(0) * acc_t(F[j]);  // NaN when F is not finite (broyden_math.h)
  }
  dz_dF = warp_sum(dz_dF);
  dz_F = warp_sum(dz_F);
  zero_F = warp_sum(zero_F);
  if (lane0) {
    out[3 * n_valid] = dz_dF;
    out[3 * n_valid + 1] = dz_F;
    out[3 * n_valid + 2] = zero_F;
  }
}

// Pass 2: from the sample's dots, this thread's elements of the new pair (written into the
// slot row) and of the step. Element j of the slot row is read here by this thread only,
// before it writes it, and no other thread reads it in this pass.
template <typename scalar_t>
__device__ __forceinline__ void update_elements(
    scalar_t* __restrict__ U, scalar_t* __restrict__ V, const scalar_t* __restrict__ dz,
    const scalar_t* __restrict__ dF, const scalar_t* __restrict__ F,
    scalar_t* __restrict__ step, int64_t sM, int64_t sD,
    const at::opmath_type<scalar_t>* __restrict__ dots, int64_t first, int64_t end,
    int64_t stride, int n_valid, int slot) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto k = broyden_coefficients<acc_t>(dots, n_valid);
  scalar_t* u_slot = U + int64_t(slot) * sM;
  scalar_t* v_slot = V + int64_t(slot) * sM;
  for (int64_t j = first; j < end; j += stride) {
    acc_t sum_u_b = 0, sum_v_a = 0, sum_u_c = 0;
    // 16: what nvcc 13 chose for this loop inside the one-block kernel measured on the H200;
    // pinned, because as a shared helper its choice changed for one instance (4 instead).
#pragma unroll 16
    for (int i = 0; i < n_valid; ++i) {
      const acc_t u = U[i * sM + j * sD];
      sum_u_b += u * dots[n_valid + i];
      sum_v_a += acc_t(V[i * sM + j * sD]) * dots[i];
      if (i != slot) sum_u_c += u * dots[2 * n_valid + i];  // the overwritten slot drops out
    }
    acc_t u_new, v_new, st;
    broyden_element<acc_t>(dz[j], dF[j], F[j], sum_u_b, sum_v_a, sum_u_c, k, &u_new, &v_new,
                           &st);
    u_slot[j * sD] = scalar_t(u_new);
    v_slot[j * sD] = scalar_t(v_new);
    step[j] = scalar_t(st);
  }
}

}  // namespace impflow
