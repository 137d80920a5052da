// AVX-512 version of the batch-minor Broyden step for d <= 4 (the solver's layout for small
// samples on the CPU). One pass over a block of 16 (float) or 8 (double) samples keeps every
// sum of those samples in registers across the loop over the history slots, and reads each
// history element once; the compiler-vectorised version moves its sums through memory at every
// slot and runs the final per-sample loop on 4-wide vectors (perf). Same arithmetic as
// broyden_math.h, written with masked operations instead of selects.
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
  using index = __m512i;
  static constexpr int kWidth = 16;
  static IMPFLOW_AVX512 vec zero() { return _mm512_setzero_ps(); }
  static IMPFLOW_AVX512 vec set1(float x) { return _mm512_set1_ps(x); }
  static IMPFLOW_AVX512 vec load(mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static IMPFLOW_AVX512 void store(float* p, mask m, vec v) { _mm512_mask_storeu_ps(p, m, v); }
  static IMPFLOW_AVX512 index lanes_times(int d, int j) {
    return _mm512_add_epi32(_mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                                 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(d)),
                            _mm512_set1_epi32(j));
  }
  static IMPFLOW_AVX512 vec gather(mask m, index i, const float* base) {
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i, base, 4);
  }
  static IMPFLOW_AVX512 void scatter(float* base, mask m, index i, vec v) {
    _mm512_mask_i32scatter_ps(base, m, i, v, 4);
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
  using index = __m256i;
  static constexpr int kWidth = 8;
  static IMPFLOW_AVX512 vec zero() { return _mm512_setzero_pd(); }
  static IMPFLOW_AVX512 vec set1(double x) { return _mm512_set1_pd(x); }
  static IMPFLOW_AVX512 vec load(mask m, const double* p) { return _mm512_maskz_loadu_pd(m, p); }
  static IMPFLOW_AVX512 void store(double* p, mask m, vec v) { _mm512_mask_storeu_pd(p, m, v); }
  static IMPFLOW_AVX512 index lanes_times(int d, int j) {
    return _mm256_add_epi32(_mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                               _mm256_set1_epi32(d)),
                            _mm256_set1_epi32(j));
  }
  static IMPFLOW_AVX512 vec gather(mask m, index i, const double* base) {
    return _mm512_mask_i32gather_pd(_mm512_setzero_pd(), m, i, base, 8);
  }
  static IMPFLOW_AVX512 void scatter(double* base, mask m, index i, vec v) {
    _mm512_mask_i32scatter_pd(base, m, i, v, 8);
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
  typename S::index idx[D];
  for (int j = 0; j < D; ++j) idx[j] = S::lanes_times(D, j);
  const vec largest = S::set1(LargestFinite<T>::value);
  const vec smallest = S::set1(SmallestNormal<T>::value);
  const vec one = S::set1(T(1));
  for (int64_t b0 = begin; b0 < end; b0 += W) {
    const int len = int(end - b0 < W ? end - b0 : W);
    const mask m = mask((uint32_t(1) << len) - 1);  // len <= 16
    mask on = 0;
    for (int l = 0; l < len; ++l) on |= mask(on_bytes[b0 + l] != 0) << l;
    vec x[D], g[D], f[D], ub[D], va[D], uc[D];
    vec dz_dF = S::zero(), dz_F = S::zero(), sum_ab = S::zero(), sum_ac = S::zero();
    for (int j = 0; j < D; ++j) {
      x[j] = S::gather(m, idx[j], dz + b0 * D);
      g[j] = S::gather(m, idx[j], dF + b0 * D);
      f[j] = S::gather(m, idx[j], F + b0 * D);
      dz_dF = S::fmadd(x[j], g[j], dz_dF);
      dz_F = S::fmadd(x[j], f[j], dz_F);
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
    const vec vF = S::maskz_mov(valid, vnew_dot_F);
    T* Us = U + int64_t(slot) * D * B + b0;
    T* Vs = V + int64_t(slot) * D * B + b0;
    for (int j = 0; j < D; ++j) {  // broyden_element_scalars
      const vec u_new = S::maskz_mul(valid, S::sub(S::add(x[j], g[j]), ub[j]), inv_denom);
      const vec v_new = S::maskz_sub(valid, va[j], x[j]);
      const vec st = S::sub(S::sub(f[j], uc[j]), S::mul(u_new, vF));
      S::store(Us + int64_t(j) * B, on & m, u_new);  // inactive samples: history untouched
      S::store(Vs + int64_t(j) * B, on & m, v_new);
      S::scatter(step + b0 * D, m, idx[j], S::maskz_mov(on, st));  // and no step
    }
  }
}

}  // namespace avx512
}  // namespace impflow

#undef IMPFLOW_AVX512
#endif
