// AVX-512 version of the batch-minor Broyden step for d <= 4 (the solver's layout for small
// samples on the CPU). One pass over a block of 16 (float) or 8 (double) samples keeps every
// sum of those samples in registers across the loop over the history slots, and reads each
// history element once; the compiler-vectorised version moves its sums through memory at every
// slot and runs the final per-sample loop on 4-wide vectors (perf). Same arithmetic as
// broyden_math.h, written with masked operations instead of selects.
// dz, dF, F and the step hold a block's samples side by side (sample l, element j at l*D + j):
// they are read and written as D contiguous vectors, regrouped by two-source permutes. Gathers
// and scatters did this before and took half the kernel's time on AMD Zen 4 (perf), where they
// are microcoded.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(IMPFLOW_NO_MULTIVERSION)
#define IMPFLOW_HAVE_AVX512_STEP 1

#include <immintrin.h>

#include <cstdint>

#include "impflow/broyden_math.h"

namespace impflow {
namespace avx512 {

#define IMPFLOW_AVX512 __attribute__((target("avx512f"), always_inline)) inline

// The few vector operations the kernel needs, for float (16 lanes) and double (8 lanes).
struct Float16 {
  using scalar = float;
  using vec = __m512;
  using mask = __mmask16;
  using index = __m512i;  // permute indices, one 32-bit integer per lane
  static constexpr int kWidth = 16;
  static IMPFLOW_AVX512 vec zero() { return _mm512_setzero_ps(); }
  static IMPFLOW_AVX512 vec set1(float x) { return _mm512_set1_ps(x); }
  static IMPFLOW_AVX512 vec load(mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static IMPFLOW_AVX512 void store(float* p, mask m, vec v) { _mm512_mask_storeu_ps(p, m, v); }
  static IMPFLOW_AVX512 index make_index(const int* lanes) {
    return _mm512_setr_epi32(lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5],
                             lanes[6], lanes[7], lanes[8], lanes[9], lanes[10], lanes[11],
                             lanes[12], lanes[13], lanes[14], lanes[15]);
  }
  // Lane l of the result: lane i[l] of the 32 lanes of a then b.
  static IMPFLOW_AVX512 vec permute2(vec a, index i, vec b) {
    return _mm512_permutex2var_ps(a, i, b);
  }
  static IMPFLOW_AVX512 vec blend(mask m, vec a, vec b) { return _mm512_mask_blend_ps(m, a, b); }
  // Lanes whose byte of `flags` (kWidth bytes) is non-zero.
  static IMPFLOW_AVX512 mask nonzero_bytes(const uint8_t* flags) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(flags));
    // The maskz form: the plain one trips GCC's -Wmaybe-uninitialized in its own header.
    const __m512i wide = _mm512_maskz_cvtepu8_epi32(0xFFFF, bytes);
    return _mm512_test_epi32_mask(wide, wide);
  }
  static IMPFLOW_AVX512 vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static IMPFLOW_AVX512 vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  static IMPFLOW_AVX512 vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static IMPFLOW_AVX512 vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static IMPFLOW_AVX512 vec maskz_mul(mask m, vec a, vec b) { return _mm512_maskz_mul_ps(m, a, b); }
  static IMPFLOW_AVX512 vec maskz_sub(mask m, vec a, vec b) { return _mm512_maskz_sub_ps(m, a, b); }
  static IMPFLOW_AVX512 vec maskz_div(mask m, vec a, vec b) { return _mm512_maskz_div_ps(m, a, b); }
  static IMPFLOW_AVX512 vec maskz_mov(mask m, vec a) { return _mm512_maskz_mov_ps(m, a); }
  static IMPFLOW_AVX512 vec abs(vec a) { return _mm512_abs_ps(a); }
  static IMPFLOW_AVX512 mask le(vec a, vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
  static IMPFLOW_AVX512 mask gt(vec a, vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
};

struct Double8 {
  using scalar = double;
  using vec = __m512d;
  using mask = __mmask8;
  using index = __m512i;  // permute indices, one 64-bit integer per lane
  static constexpr int kWidth = 8;
  static IMPFLOW_AVX512 vec zero() { return _mm512_setzero_pd(); }
  static IMPFLOW_AVX512 vec set1(double x) { return _mm512_set1_pd(x); }
  static IMPFLOW_AVX512 vec load(mask m, const double* p) { return _mm512_maskz_loadu_pd(m, p); }
  static IMPFLOW_AVX512 void store(double* p, mask m, vec v) { _mm512_mask_storeu_pd(p, m, v); }
  static IMPFLOW_AVX512 index make_index(const int* lanes) {
    return _mm512_setr_epi64(lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5],
                             lanes[6], lanes[7]);
  }
  static IMPFLOW_AVX512 vec permute2(vec a, index i, vec b) {
    return _mm512_permutex2var_pd(a, i, b);
  }
  static IMPFLOW_AVX512 vec blend(mask m, vec a, vec b) { return _mm512_mask_blend_pd(m, a, b); }
  static IMPFLOW_AVX512 mask nonzero_bytes(const uint8_t* flags) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(flags));
    const __m512i wide = _mm512_maskz_cvtepu8_epi64(0xFF, bytes);
    return _mm512_test_epi64_mask(wide, wide);
  }
  static IMPFLOW_AVX512 vec add(vec a, vec b) { return _mm512_add_pd(a, b); }
  static IMPFLOW_AVX512 vec sub(vec a, vec b) { return _mm512_sub_pd(a, b); }
  static IMPFLOW_AVX512 vec mul(vec a, vec b) { return _mm512_mul_pd(a, b); }
  static IMPFLOW_AVX512 vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_pd(a, b, c); }
  static IMPFLOW_AVX512 vec maskz_mul(mask m, vec a, vec b) { return _mm512_maskz_mul_pd(m, a, b); }
  static IMPFLOW_AVX512 vec maskz_sub(mask m, vec a, vec b) { return _mm512_maskz_sub_pd(m, a, b); }
  static IMPFLOW_AVX512 vec maskz_div(mask m, vec a, vec b) { return _mm512_maskz_div_pd(m, a, b); }
  static IMPFLOW_AVX512 vec maskz_mov(mask m, vec a) { return _mm512_maskz_mov_pd(m, a); }
  static IMPFLOW_AVX512 vec abs(vec a) { return _mm512_abs_pd(a); }
  static IMPFLOW_AVX512 mask le(vec a, vec b) { return _mm512_cmp_pd_mask(a, b, _CMP_LE_OQ); }
  static IMPFLOW_AVX512 mask gt(vec a, vec b) { return _mm512_cmp_pd_mask(a, b, _CMP_GT_OQ); }
};

// The first n lanes (none for n <= 0, all for n >= kWidth).
template <typename S>
IMPFLOW_AVX512 typename S::mask first_lanes(int n) {
  using mask = typename S::mask;
  return n <= 0 ? mask(0) : n >= S::kWidth ? mask(~0u) : mask((1u << n) - 1);
}

// Permutes between a block's samples side by side (element j of sample l at flat position
// s = l * D + j, held in D vectors) and one vector per element index j (lane l: sample l).
// A permute reads two vectors; for D > 2 a second one reads the other two, and a blend takes
// its lanes.
template <typename S, int D>
struct Regroup {
  typename S::index split[D];    // element j of lane l: lane s % 2W of the pair s / 2W
  typename S::mask split_hi[D];  // lanes that come from the second pair
  typename S::index join[D];     // vector k, lane t: flat position s = k W + t, from element
                                 // s % D of lane s / D
  typename S::mask join_hi[D];   // lanes that come from elements 2 and 3
};

template <typename S, int D>
IMPFLOW_AVX512 Regroup<S, D> make_regroup() {
  constexpr int W = S::kWidth;
  Regroup<S, D> r;
  for (int j = 0; j < D; ++j) {
    int split[W], join[W];
    uint32_t split_hi = 0, join_hi = 0;
    for (int l = 0; l < W; ++l) {
      const int s = l * D + j;
      split[l] = s % (2 * W);
      split_hi |= uint32_t(s >= 2 * W) << l;
      const int sample = (j * W + l) / D, element = (j * W + l) % D;
      join[l] = (element % 2) * W + sample;
      join_hi |= uint32_t(element >= 2) << l;
    }
    r.split[j] = S::make_index(split);
    r.join[j] = S::make_index(join);
    r.split_hi[j] = typename S::mask(split_hi);
    r.join_hi[j] = typename S::mask(join_hi);
  }
  return r;
}

// out[j] = element j of the samples whose `count` = samples * D elements start at p; lanes
// past them are zero.
template <typename S, int D>
IMPFLOW_AVX512 void load_split(const typename S::scalar* p, int count, const Regroup<S, D>& r,
                               typename S::vec* out) {
  constexpr int W = S::kWidth;
  typename S::vec v[D];
  for (int k = 0; k < D; ++k) v[k] = S::load(first_lanes<S>(count - k * W), p + k * W);
  if constexpr (D == 1) {
    out[0] = v[0];
  } else {
    for (int j = 0; j < D; ++j) {
      out[j] = S::permute2(v[0], r.split[j], v[1]);
      if constexpr (D > 2) {
        out[j] = S::blend(r.split_hi[j], out[j], S::permute2(v[2], r.split[j], v[D - 1]));
      }
    }
  }
}

// The inverse of load_split: writes the first `count` elements.
template <typename S, int D>
IMPFLOW_AVX512 void store_joined(typename S::scalar* p, int count, const Regroup<S, D>& r,
                                 const typename S::vec* in) {
  constexpr int W = S::kWidth;
  for (int k = 0; k < D; ++k) {
    typename S::vec v = in[0];
    if constexpr (D > 1) v = S::permute2(in[0], r.join[k], in[1]);
    if constexpr (D > 2) {
      v = S::blend(r.join_hi[k], v, S::permute2(in[2], r.join[k], in[D - 1]));
    }
    S::store(p + k * W, first_lanes<S>(count - k * W), v);
  }
}

// Samples [begin, end) of a batch-minor problem (histories U[i][j][b]) with D elements each:
// the new pair at `slot` and step = -H F for the active samples, zero step for the others.
template <typename S, int D>
__attribute__((target("avx512f"))) void step_samples(typename S::scalar* U, typename S::scalar* V,
                                                     const typename S::scalar* dz,
                                                     const typename S::scalar* dF,
                                                     const typename S::scalar* F,
                                                     const bool* active,
                                                     typename S::scalar* step, int64_t B,
                                                     int n_valid, int slot, int64_t begin,
                                                     int64_t end) {
  using T = typename S::scalar;
  using vec = typename S::vec;
  using mask = typename S::mask;
  constexpr int W = S::kWidth;
  const uint8_t* on_bytes = reinterpret_cast<const uint8_t*>(active);
  const Regroup<S, D> regroup = make_regroup<S, D>();
  const vec largest = S::set1(LargestFinite<T>::value);
  const vec smallest = S::set1(SmallestNormal<T>::value);
  const vec one = S::set1(T(1));
  for (int64_t b0 = begin; b0 < end; b0 += W) {
    const int len = int(end - b0 < W ? end - b0 : W);
    const mask m = mask((uint32_t(1) << len) - 1);  // len <= 16
    mask on = 0;
    if (len == W) {
      on = S::nonzero_bytes(on_bytes + b0);
    } else {  // the last block: no read past the mask's end
      for (int l = 0; l < len; ++l) on |= mask(on_bytes[b0 + l] != 0) << l;
    }
    vec x[D], g[D], f[D], ub[D], va[D], uc[D], st[D];
    vec dz_dF = S::zero(), dz_F = S::zero(), sum_ab = S::zero(), sum_ac = S::zero();
    vec zero_F = S::zero();  // sum_j 0 * F[j]: NaN when F is not finite
    load_split<S, D>(dz + b0 * D, len * D, regroup, x);
    load_split<S, D>(dF + b0 * D, len * D, regroup, g);
    load_split<S, D>(F + b0 * D, len * D, regroup, f);
    for (int j = 0; j < D; ++j) {
      dz_dF = S::fmadd(x[j], g[j], dz_dF);
      dz_F = S::fmadd(x[j], f[j], dz_F);
      zero_F = S::fmadd(S::zero(), f[j], zero_F);
      ub[j] = va[j] = uc[j] = S::zero();
    }
    for (int i = 0; i < n_valid; ++i) {
      vec u[D], v[D];
      vec a = S::zero(), bi = S::zero(), c = S::zero();
      for (int j = 0; j < D; ++j) {
        u[j] = S::load(m, U + (int64_t(i) * D + j) * B + b0);
        v[j] = S::load(m, V + (int64_t(i) * D + j) * B + b0);
        a = S::fmadd(x[j], u[j], a);
        bi = S::fmadd(v[j], g[j], bi);
        c = S::fmadd(v[j], f[j], c);
      }
      sum_ab = S::fmadd(a, bi, sum_ab);
      sum_ac = S::fmadd(a, c, sum_ac);
      for (int j = 0; j < D; ++j) {
        ub[j] = S::fmadd(u[j], bi, ub[j]);
        va[j] = S::fmadd(v[j], a, va[j]);
      }
      if (i != slot) {  // the overwritten slot drops out of -H_new F
        for (int j = 0; j < D; ++j) uc[j] = S::fmadd(u[j], c, uc[j]);
      }
    }
    // broyden_coefficients_from_sums: the update is dropped where the denominator is zero,
    // subnormal or not finite (ordered compares: NaN fails them).
    const vec denom = S::sub(sum_ab, dz_dF);
    const vec vnew_dot_F = S::sub(sum_ac, dz_F);
    const mask valid = S::le(S::abs(denom), largest) & S::le(S::abs(vnew_dot_F), largest) &
                       S::gt(S::abs(denom), smallest);
    const vec inv_denom = S::maskz_div(valid, one, denom);
    const vec vF = S::blend(valid, zero_F, vnew_dot_F);  // dropped: the zero pair's 0 . F
    T* Us = U + int64_t(slot) * D * B + b0;
    T* Vs = V + int64_t(slot) * D * B + b0;
    for (int j = 0; j < D; ++j) {  // broyden_element_scalars
      const vec u_new = S::maskz_mul(valid, S::sub(S::add(x[j], g[j]), ub[j]), inv_denom);
      const vec v_new = S::maskz_sub(valid, va[j], x[j]);
      st[j] = S::maskz_mov(on, S::sub(S::sub(f[j], uc[j]), S::mul(u_new, vF)));  // 0 if off
      S::store(Us + int64_t(j) * B, on & m, u_new);  // inactive samples: history untouched
      S::store(Vs + int64_t(j) * B, on & m, v_new);
    }
    store_joined<S, D>(step + b0 * D, len * D, regroup, st);
  }
}

}  // namespace avx512
}  // namespace impflow

#undef IMPFLOW_AVX512
#endif
