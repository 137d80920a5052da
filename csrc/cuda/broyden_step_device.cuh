// The two passes of the CUDA Broyden step over one sample's elements, shared by the one-block
// kernel (broyden_step_cuda.cu) and the split kernels (broyden_step_split.cuh). Each thread
// takes the elements first, first + stride, ... below end of the sample: the whole sample
// (one block per sample) or one chunk of it (split).
#pragma once

#include <ATen/OpMathType.h>

#include "impflow/broyden_math.h"
#include "reductions.cuh"

namespace impflow {

// One sample's inputs. History element (i, j) lives at i * sM + j * sD from U, V (contiguous or
// batch-minor); the vectors are contiguous.
template <typename scalar_t>
struct SampleView {
  scalar_t* U;
  scalar_t* V;
  const scalar_t* dz;
  const scalar_t* dF;
  const scalar_t* F;
  scalar_t* step;
  int64_t sM, sD;
};

// Pass 1: this thread's share of every dot (a_i = dz.u_i, b_i = v_i.dF, c_i = v_i.F, then
// dz.dF and dz.F), summed over its warp; lane 0 writes them to `out` in the layout of
// broyden_dots_size. Every lane of the warp must call it (shuffles).
template <typename scalar_t>
__device__ __forceinline__ void warp_partial_dots(const SampleView<scalar_t>& s, int64_t first,
                                                  int64_t end, int64_t stride, int n_valid,
                                                  at::opmath_type<scalar_t>* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool lane0 = threadIdx.x % kWarpSize == 0;
  for (int i = 0; i < n_valid; ++i) {
    acc_t a = 0, bb = 0, c = 0;
    for (int64_t j = first; j < end; j += stride) {
      const acc_t v = s.V[i * s.sM + j * s.sD];
      a += acc_t(s.dz[j]) * acc_t(s.U[i * s.sM + j * s.sD]);
      bb += v * acc_t(s.dF[j]);
      c += v * acc_t(s.F[j]);
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
  acc_t dz_dF = 0, dz_F = 0;
  for (int64_t j = first; j < end; j += stride) {
    dz_dF += acc_t(s.dz[j]) * acc_t(s.dF[j]);
    dz_F += acc_t(s.dz[j]) * acc_t(s.F[j]);
  }
  dz_dF = warp_sum(dz_dF);
  dz_F = warp_sum(dz_F);
  if (lane0) {
    out[3 * n_valid] = dz_dF;
    out[3 * n_valid + 1] = dz_F;
  }
}

// Pass 2: from the sample's dots, this thread's elements of the new pair (written into the
// slot row) and of the step. Element j of the slot row is read here by this thread only,
// before it writes it, and no other thread reads it in this pass.
template <typename scalar_t>
__device__ __forceinline__ void update_elements(const SampleView<scalar_t>& s,
                                                const at::opmath_type<scalar_t>* dots,
                                                int64_t first, int64_t end, int64_t stride,
                                                int n_valid, int slot) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto k = broyden_coefficients<acc_t>(dots, n_valid);
  scalar_t* u_slot = s.U + int64_t(slot) * s.sM;
  scalar_t* v_slot = s.V + int64_t(slot) * s.sM;
  for (int64_t j = first; j < end; j += stride) {
    acc_t sum_u_b = 0, sum_v_a = 0, sum_u_c = 0;
    for (int i = 0; i < n_valid; ++i) {
      const acc_t u = s.U[i * s.sM + j * s.sD];
      sum_u_b += u * dots[n_valid + i];
      sum_v_a += acc_t(s.V[i * s.sM + j * s.sD]) * dots[i];
      if (i != slot) sum_u_c += u * dots[2 * n_valid + i];  // the overwritten slot drops out
    }
    acc_t u_new, v_new, st;
    broyden_element<acc_t>(s.dz[j], s.dF[j], s.F[j], sum_u_b, sum_v_a, sum_u_c, k, &u_new,
                           &v_new, &st);
    u_slot[j * s.sD] = scalar_t(u_new);
    v_slot[j * s.sD] = scalar_t(v_new);
    s.step[j] = scalar_t(st);
  }
}

}  // namespace impflow
