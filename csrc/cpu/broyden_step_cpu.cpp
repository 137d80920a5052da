// CPU kernel of impflow::broyden_step: one task per group of samples, one pass over each
// sample's history (each row's dots, then at once its weighted contribution to the sums).
//
// Two loop orders, because the vector unit must have contiguous work in both regimes:
//   * small d (1..4, a compile-time constant): vectorise along the history slots i;
//   * larger d: vectorise along the elements j.
// Reductions are written with `#pragma omp simd reduction`, so they vectorise without
// -ffast-math; the hot functions are compiled for AVX-512, AVX2 and a baseline, chosen at
// load time (GCC/Clang function multiversioning).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "impflow/broyden_checks.h"
#include "impflow/broyden_math.h"
#include "impflow/cpu_dispatch.h"
#include "broyden_step_avx512.h"

namespace impflow {
namespace {

// Pointers to one sample. Histories are (m, d) row-major.
template <typename scalar_t>
struct Sample {
  scalar_t* __restrict__ U;
  scalar_t* __restrict__ V;
  const scalar_t* __restrict__ dz;
  const scalar_t* __restrict__ dF;
  const scalar_t* __restrict__ F;
  scalar_t* __restrict__ step;
};

// General d: for each slot, its three dots and, while its rows are still in L1, the weighted
// row sums; the sums live in `rows` (3 d values). The history is read from memory once.
template <typename scalar_t>
IMPFLOW_INLINE void sample_general(const Sample<scalar_t>& s, int64_t d, int n_valid, int slot,
                                   at::opmath_type<scalar_t>* __restrict__ rows) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* __restrict__ sum_u_b = rows;
  acc_t* __restrict__ sum_v_a = rows + d;
  acc_t* __restrict__ sum_u_c = rows + 2 * d;
  acc_t dz_dF = 0, dz_F = 0, zero_F = 0;
#pragma omp simd reduction(+ : dz_dF, dz_F, zero_F)
  for (int64_t j = 0; j < d; ++j) {
    dz_dF += acc_t(s.dz[j]) * acc_t(s.dF[j]);
    dz_F += acc_t(s.dz[j]) * acc_t(s.F[j]);
    zero_F += acc_t(0) * acc_t(s.F[j]);  // NaN when F is not finite (broyden_math.h)
    sum_u_b[j] = sum_v_a[j] = sum_u_c[j] = acc_t(0);
  }
  acc_t sum_ab = 0, sum_ac = 0;
  for (int i = 0; i < n_valid; ++i) {
    const scalar_t* __restrict__ u = s.U + i * d;
    const scalar_t* __restrict__ v = s.V + i * d;
    acc_t a = 0, b = 0, c = 0;
#pragma omp simd reduction(+ : a, b, c)
    for (int64_t j = 0; j < d; ++j) {
      a += acc_t(s.dz[j]) * acc_t(u[j]);
      b += acc_t(v[j]) * acc_t(s.dF[j]);
      c += acc_t(v[j]) * acc_t(s.F[j]);
    }
    sum_ab += a * b;
    sum_ac += a * c;
    // The overwritten slot drops out of the step: skipped, not multiplied by 0 (a NaN or Inf
    // in it would still reach the step).
    const bool kept = i != slot;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      sum_u_b[j] += acc_t(u[j]) * b;
      sum_v_a[j] += acc_t(v[j]) * a;
      if (kept) sum_u_c[j] += acc_t(u[j]) * c;
    }
  }
  const auto k = broyden_coefficients_from_sums<acc_t>(sum_ab, sum_ac, dz_dF, dz_F, zero_F);
  scalar_t* __restrict__ u_slot = s.U + int64_t(slot) * d;
  scalar_t* __restrict__ v_slot = s.V + int64_t(slot) * d;
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) {
    acc_t u_new, v_new, st;
    broyden_element<acc_t>(s.dz[j], s.dF[j], s.F[j], sum_u_b[j], sum_v_a[j], sum_u_c[j], k,
                           &u_new, &v_new, &st);
    u_slot[j] = scalar_t(u_new);
    v_slot[j] = scalar_t(v_new);
    s.step[j] = scalar_t(st);
  }
}

// Small d known at compile time: one loop along the slots i, vectorised by the compiler,
// with the j loops unrolled and every sum in registers.
template <typename scalar_t, int D>
IMPFLOW_INLINE void sample_small(const Sample<scalar_t>& s, int n_valid, int slot) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t dz[D], dF[D], F[D];
  acc_t dz_dF = 0, dz_F = 0, zero_F = 0;
  for (int j = 0; j < D; ++j) {
    dz[j] = s.dz[j], dF[j] = s.dF[j], F[j] = s.F[j];
    dz_dF += dz[j] * dF[j], dz_F += dz[j] * F[j];
    zero_F += acc_t(0) * F[j];  // NaN when F is not finite (broyden_math.h)
  }
  acc_t sum_u_b[D] = {}, sum_v_a[D] = {}, sum_u_c[D] = {};
  acc_t sum_ab = 0, sum_ac = 0;
  // Unrolled D-wide sums as scalars, so that `omp simd reduction` sees plain variables.
  acc_t ub0 = 0, ub1 = 0, ub2 = 0, ub3 = 0, va0 = 0, va1 = 0, va2 = 0, va3 = 0;
  acc_t uc0 = 0, uc1 = 0, uc2 = 0, uc3 = 0;
#pragma omp simd reduction(+ : sum_ab, sum_ac, ub0, ub1, ub2, ub3, va0, va1, va2, va3, uc0, uc1, uc2, uc3)
  for (int i = 0; i < n_valid; ++i) {
    acc_t u[4] = {}, v[4] = {};
    for (int j = 0; j < D; ++j) u[j] = s.U[i * D + j], v[j] = s.V[i * D + j];
    acc_t a = 0, b = 0, c = 0;
    for (int j = 0; j < D; ++j) a += dz[j] * u[j], b += v[j] * dF[j], c += v[j] * F[j];
    sum_ab += a * b;
    sum_ac += a * c;
    // The overwritten slot drops out of the step: a select, not a product with 0 (its NaN
    // or Inf would remain).
    const bool kept = i != slot;
    ub0 += u[0] * b, va0 += v[0] * a, uc0 += kept ? u[0] * c : acc_t(0);
    if (D > 1) ub1 += u[1] * b, va1 += v[1] * a, uc1 += kept ? u[1] * c : acc_t(0);
    if (D > 2) ub2 += u[2] * b, va2 += v[2] * a, uc2 += kept ? u[2] * c : acc_t(0);
    if (D > 3) ub3 += u[3] * b, va3 += v[3] * a, uc3 += kept ? u[3] * c : acc_t(0);
  }
  const acc_t ub[4] = {ub0, ub1, ub2, ub3}, va[4] = {va0, va1, va2, va3}, uc[4] = {uc0, uc1, uc2, uc3};
  for (int j = 0; j < D; ++j) sum_u_b[j] = ub[j], sum_v_a[j] = va[j], sum_u_c[j] = uc[j];
  const auto k = broyden_coefficients_from_sums<acc_t>(sum_ab, sum_ac, dz_dF, dz_F, zero_F);
  for (int j = 0; j < D; ++j) {
    acc_t u_new, v_new, st;
    broyden_element<acc_t>(dz[j], dF[j], F[j], sum_u_b[j], sum_v_a[j], sum_u_c[j], k, &u_new,
                           &v_new, &st);
    s.U[slot * D + j] = scalar_t(u_new);
    s.V[slot * D + j] = scalar_t(v_new);
    s.step[j] = scalar_t(st);
  }
}

struct Problem {
  int64_t B, m, d;
  int n_valid, slot;
  bool batch_minor;  // histories stored as (m, d, B), see is_batch_minor
};

constexpr int64_t kLanes = 512;  // samples processed side by side by the batch-minor kernel

// The batch-minor kernel is compiled without fused multiply-adds: its lanes are samples, and
// where a sample's lane lands (the loops' vector bodies, their scalar remainders, short
// blocks the compiler runs in scalar code) depends on the batch and on the thread split. With contraction, AVX-512
// builds fused in some of those paths and not in others: a sample's bits changed with the batch
// and the thread count (seen with IMPFLOW_DISABLE_AVX512=1; the AVX2 and baseline builds have
// no FMA, and the hand-written AVX-512 kernel masks its tails). Separate multiplies and adds
// round the same in every path.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

// Batch-minor histories (U[i][j][b], contiguous along b): every loop runs along the samples,
// so the vector lanes hold different samples and no horizontal reduction is needed. This is
// the fast layout for small d, where a single sample is too short to fill a vector.
template <typename scalar_t, int D>  // D > 0: d known at compile time; 0: p.d
IMPFLOW_INLINE void samples_batch_minor(scalar_t* __restrict__ U, scalar_t* __restrict__ V,
                                        const scalar_t* __restrict__ dz,
                                        const scalar_t* __restrict__ dF,
                                        const scalar_t* __restrict__ F,
                                        const bool* __restrict__ active,
                                        scalar_t* __restrict__ step, const Problem& p,
                                        int64_t begin, int64_t end, scalar_t* __restrict__ work) {
  using acc_t = scalar_t;
  const int64_t B = p.B, d = D > 0 ? D : p.d;
  const int n_valid = p.n_valid, slot = p.slot;
  // work: (6 d + 8) kLanes values (the pointers below), allocated by the caller.
  acc_t* __restrict__ x = work;                    // dz, transposed to [j][lane]
  acc_t* __restrict__ g = x + d * kLanes;          // dF
  acc_t* __restrict__ f = g + d * kLanes;          // F
  acc_t* __restrict__ ub = f + d * kLanes;         // sum_i u_i[j] b_i
  acc_t* __restrict__ va = ub + d * kLanes;        // sum_i v_i[j] a_i
  acc_t* __restrict__ uc = va + d * kLanes;        // sum_{i != slot} u_i[j] c_i
  acc_t* __restrict__ a = uc + d * kLanes;         // per-slot dots of the current slot
  acc_t* __restrict__ bb = a + kLanes;
  acc_t* __restrict__ c = bb + kLanes;
  acc_t* __restrict__ sab = c + kLanes;            // sum_i a_i b_i, then sum_i a_i c_i
  acc_t* __restrict__ sac = sab + kLanes;
  acc_t* __restrict__ dzdF = sac + kLanes;
  acc_t* __restrict__ dzF = dzdF + kLanes;
  acc_t* __restrict__ zF = dzF + kLanes;          // sum_j 0 * F[j]: NaN when F is not finite
  for (int64_t b0 = begin; b0 < end; b0 += kLanes) {
    const int64_t len = std::min(kLanes, end - b0);
    for (int64_t j = 0; j < d; ++j) {
#pragma omp simd
      for (int64_t l = 0; l < len; ++l) {
        x[j * kLanes + l] = dz[(b0 + l) * d + j];
        g[j * kLanes + l] = dF[(b0 + l) * d + j];
        f[j * kLanes + l] = F[(b0 + l) * d + j];
        ub[j * kLanes + l] = va[j * kLanes + l] = uc[j * kLanes + l] = acc_t(0);
      }
    }
#pragma omp simd
    for (int64_t l = 0; l < len; ++l) sab[l] = sac[l] = dzdF[l] = dzF[l] = zF[l] = acc_t(0);
    for (int64_t j = 0; j < d; ++j) {
#pragma omp simd
      for (int64_t l = 0; l < len; ++l) {
        dzdF[l] += x[j * kLanes + l] * g[j * kLanes + l];
        dzF[l] += x[j * kLanes + l] * f[j * kLanes + l];
        zF[l] += acc_t(0) * f[j * kLanes + l];
      }
    }
    for (int i = 0; i < n_valid; ++i) {
      const scalar_t* __restrict__ Ui = U + (int64_t(i) * d) * B + b0;
      const scalar_t* __restrict__ Vi = V + (int64_t(i) * d) * B + b0;
#pragma omp simd
      for (int64_t l = 0; l < len; ++l) a[l] = bb[l] = c[l] = acc_t(0);
      for (int64_t j = 0; j < d; ++j) {
#pragma omp simd
        for (int64_t l = 0; l < len; ++l) {
          const acc_t v = Vi[j * B + l];
          a[l] += x[j * kLanes + l] * acc_t(Ui[j * B + l]);
          bb[l] += v * g[j * kLanes + l];
          c[l] += v * f[j * kLanes + l];
        }
      }
      // The overwritten slot drops out of the step: skipped, not multiplied by 0 (its NaN or
      // Inf would remain).
      const bool kept = i != slot;
#pragma omp simd
      for (int64_t l = 0; l < len; ++l) sab[l] += a[l] * bb[l], sac[l] += a[l] * c[l];
      for (int64_t j = 0; j < d; ++j) {
#pragma omp simd
        for (int64_t l = 0; l < len; ++l) {
          const acc_t u = Ui[j * B + l];
          ub[j * kLanes + l] += u * bb[l];
          va[j * kLanes + l] += acc_t(Vi[j * B + l]) * a[l];
          if (kept) uc[j * kLanes + l] += u * c[l];
        }
      }
    }
    scalar_t* __restrict__ Us = U + (int64_t(slot) * d) * B + b0;
    scalar_t* __restrict__ Vs = V + (int64_t(slot) * d) * B + b0;
    // Per-lane coefficients first (into the free slot-dot buffers), so that both loops
    // vectorise: a = 1 / denominator, bb = v_new . F, c = 1 where the update is kept.
#pragma omp simd
    for (int64_t l = 0; l < len; ++l) {
      const auto k =
          broyden_coefficients_from_sums<acc_t>(sab[l], sac[l], dzdF[l], dzF[l], zF[l]);
      a[l] = k.inv_denom, bb[l] = k.vnew_dot_F, c[l] = k.valid ? acc_t(1) : acc_t(0);
    }
    for (int64_t j = 0; j < d; ++j) {
#pragma omp simd
      for (int64_t l = 0; l < len; ++l) {
        acc_t u_new, v_new, st;
        broyden_element_scalars<acc_t>(x[j * kLanes + l], g[j * kLanes + l], f[j * kLanes + l],
                                       ub[j * kLanes + l], va[j * kLanes + l], uc[j * kLanes + l],
                                       a[l], bb[l], c[l] != acc_t(0), &u_new, &v_new, &st);
        // Inactive samples: history untouched, no step (read as bytes: bool loads do not
        // vectorise).
        const bool on = reinterpret_cast<const uint8_t*>(active)[b0 + l] != 0;
        Us[j * B + l] = on ? scalar_t(u_new) : Us[j * B + l];
        Vs[j * B + l] = on ? scalar_t(v_new) : Vs[j * B + l];
        step[(b0 + l) * d + j] = on ? scalar_t(st) : scalar_t(0);
      }
    }
  }
}

template <typename scalar_t>
IMPFLOW_INLINE void batch_minor_range(scalar_t* U, scalar_t* V, const scalar_t* dz,
                                      const scalar_t* dF, const scalar_t* F, const bool* active,
                                      scalar_t* step, const Problem& p, int64_t begin,
                                      int64_t end, scalar_t* work) {
  switch (p.d) {
    case 1: return samples_batch_minor<scalar_t, 1>(U, V, dz, dF, F, active, step, p, begin, end, work);
    case 2: return samples_batch_minor<scalar_t, 2>(U, V, dz, dF, F, active, step, p, begin, end, work);
    case 3: return samples_batch_minor<scalar_t, 3>(U, V, dz, dF, F, active, step, p, begin, end, work);
    case 4: return samples_batch_minor<scalar_t, 4>(U, V, dz, dF, F, active, step, p, begin, end, work);
    default: return samples_batch_minor<scalar_t, 0>(U, V, dz, dF, F, active, step, p, begin, end, work);
  }
}

// Non-template entry points of the batch-minor kernel: GCC clones these per instruction set.
IMPFLOW_CPU_CLONES void batch_minor_range_f32(float* U, float* V, const float* dz,
                                              const float* dF, const float* F, const bool* active,
                                              float* step, const Problem& p, int64_t begin,
                                              int64_t end, float* work) {
  batch_minor_range<float>(U, V, dz, dF, F, active, step, p, begin, end, work);
}

IMPFLOW_CPU_CLONES void batch_minor_range_f64(double* U, double* V, const double* dz,
                                              const double* dF, const double* F,
                                              const bool* active, double* step, const Problem& p,
                                              int64_t begin, int64_t end, double* work) {
  batch_minor_range<double>(U, V, dz, dF, F, active, step, p, begin, end, work);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// All samples in [begin, end) of contiguous histories: the multiversioned hot loop.
template <typename scalar_t>
IMPFLOW_INLINE void samples_range(scalar_t* U, scalar_t* V, const scalar_t* dz, const scalar_t* dF,
                                  const scalar_t* F, const bool* active, scalar_t* step,
                                  const Problem& p, int64_t begin, int64_t end,
                                  at::opmath_type<scalar_t>* rows) {
  for (int64_t b = begin; b < end; ++b) {
    if (!active[b]) {  // inactive samples take no step
      for (int64_t j = 0; j < p.d; ++j) step[b * p.d + j] = scalar_t(0);
      continue;
    }
    const Sample<scalar_t> s{U + b * p.m * p.d, V + b * p.m * p.d, dz + b * p.d,
                             dF + b * p.d,      F + b * p.d,       step + b * p.d};
    switch (p.d) {
      case 1: sample_small<scalar_t, 1>(s, p.n_valid, p.slot); break;
      case 2: sample_small<scalar_t, 2>(s, p.n_valid, p.slot); break;
      case 3: sample_small<scalar_t, 3>(s, p.n_valid, p.slot); break;
      case 4: sample_small<scalar_t, 4>(s, p.n_valid, p.slot); break;
      default: sample_general<scalar_t>(s, p.d, p.n_valid, p.slot, rows);
    }
  }
}

// Non-template entry points: GCC clones these per instruction set.
IMPFLOW_CPU_CLONES void samples_range_f32(float* U, float* V, const float* dz, const float* dF,
                                          const float* F, const bool* active, float* step,
                                          const Problem& p, int64_t begin, int64_t end,
                                          float* rows) {
  samples_range<float>(U, V, dz, dF, F, active, step, p, begin, end, rows);
}

IMPFLOW_CPU_CLONES void samples_range_f64(double* U, double* V, const double* dz, const double* dF,
                                          const double* F, const bool* active, double* step,
                                          const Problem& p, int64_t begin, int64_t end,
                                          double* rows) {
  samples_range<double>(U, V, dz, dF, F, active, step, p, begin, end, rows);
}

#ifdef IMPFLOW_HAVE_AVX512_STEP
// The hand-written AVX-512 kernel takes batch-minor problems with d <= 4 where the CPU has it.
// IMPFLOW_DISABLE_AVX512=1 (read once) keeps the compiler-vectorised kernel, which CPUs
// without AVX-512 run: the tests use it to check that kernel on any machine.
bool use_avx512_step(const Problem& p) {
  static const bool enabled = [] {
    const char* off = std::getenv("IMPFLOW_DISABLE_AVX512");
    return __builtin_cpu_supports("avx512f") && !(off && off[0] == '1');
  }();
  return enabled && p.batch_minor && p.d >= 1 && p.d <= 4;
}

template <typename S>
void avx512_step(typename S::scalar* U, typename S::scalar* V, const typename S::scalar* dz,
                 const typename S::scalar* dF, const typename S::scalar* F, const bool* active,
                 typename S::scalar* step, const Problem& p, int64_t begin, int64_t end) {
  switch (p.d) {
    case 1: return avx512::step_samples<S, 1>(U, V, dz, dF, F, active, step, p.B, p.n_valid, p.slot, begin, end);
    case 2: return avx512::step_samples<S, 2>(U, V, dz, dF, F, active, step, p.B, p.n_valid, p.slot, begin, end);
    case 3: return avx512::step_samples<S, 3>(U, V, dz, dF, F, active, step, p.B, p.n_valid, p.slot, begin, end);
    default: return avx512::step_samples<S, 4>(U, V, dz, dF, F, active, step, p.B, p.n_valid, p.slot, begin, end);
  }
}
#endif

void samples_range_any(float* U, float* V, const float* dz, const float* dF, const float* F,
                       const bool* active, float* step, const Problem& p, int64_t begin,
                       int64_t end, float* rows) {
#ifdef IMPFLOW_HAVE_AVX512_STEP
  if (use_avx512_step(p)) return avx512_step<avx512::Float16>(U, V, dz, dF, F, active, step, p, begin, end);
#endif
  if (p.batch_minor) return batch_minor_range_f32(U, V, dz, dF, F, active, step, p, begin, end, rows);
  samples_range_f32(U, V, dz, dF, F, active, step, p, begin, end, rows);
}

void samples_range_any(double* U, double* V, const double* dz, const double* dF, const double* F,
                       const bool* active, double* step, const Problem& p, int64_t begin,
                       int64_t end, double* rows) {
#ifdef IMPFLOW_HAVE_AVX512_STEP
  if (use_avx512_step(p)) return avx512_step<avx512::Double8>(U, V, dz, dF, F, active, step, p, begin, end);
#endif
  if (p.batch_minor) return batch_minor_range_f64(U, V, dz, dF, F, active, step, p, begin, end, rows);
  samples_range_f64(U, V, dz, dF, F, active, step, p, begin, end, rows);
}

at::Tensor broyden_step_cpu(at::Tensor& U, at::Tensor& V, const at::Tensor& dz_in,
                            const at::Tensor& dF_in, const at::Tensor& F_in,
                            const at::Tensor& active_in, int64_t slot, int64_t n_valid) {
  check_broyden_step_args(U, V, dz_in, dF_in, F_in, active_in, slot, n_valid);
  const auto dz = dz_in.contiguous(), dF = dF_in.contiguous(), F = F_in.contiguous();
  const auto active = active_in.contiguous();
  const Problem p{U.size(0), U.size(1), U.size(2), int(n_valid), int(slot), is_batch_minor(U) && !U.is_contiguous()};
  auto step = at::empty_like(F);
  if (p.B == 0 || p.d == 0) return step;
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "broyden_step_cpu", [&] {
    static_assert(std::is_same_v<at::opmath_type<scalar_t>, scalar_t>, "float/double only");
    scalar_t* U_ptr = U.data_ptr<scalar_t>();
    scalar_t* V_ptr = V.data_ptr<scalar_t>();
    const scalar_t* dz_ptr = dz.data_ptr<scalar_t>();
    const scalar_t* dF_ptr = dF.data_ptr<scalar_t>();
    const scalar_t* F_ptr = F.data_ptr<scalar_t>();
    const bool* active_ptr = active.data_ptr<bool>();
    scalar_t* step_ptr = step.data_ptr<scalar_t>();
    // A task gets at least kTaskElements elements to read and write (both histories up to
    // n_valid, the vectors): below that a second thread costs more than it saves. At
    // (B, d) = (5000, 2) a solve's steps (n_valid < 8) then run on one thread: 4% faster
    // solves than with the grain set by the history's capacity m (timed alternately).
    constexpr int64_t kTaskElements = 1 << 18;
    const int64_t grain = std::max<int64_t>(1, kTaskElements / ((2 * p.n_valid + 6) * p.d));
    // Row sums of sample_general, or the lane buffers of samples_batch_minor (the AVX-512
    // kernel needs none: an allocation and fill of 13 KB per task saved).
#ifdef IMPFLOW_HAVE_AVX512_STEP
    const bool needs_rows = !use_avx512_step(p);
#else
    const bool needs_rows = true;
#endif
    at::parallel_for(0, p.B, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> rows(!needs_rows ? 0 : p.batch_minor ? (9 * p.d + 7) * kLanes : 3 * p.d);
      samples_range_any(U_ptr, V_ptr, dz_ptr, dF_ptr, F_ptr, active_ptr, step_ptr, p, begin, end,
                        rows.data());
    });
  });
  return step;
}

}  // namespace

TORCH_LIBRARY_IMPL(impflow, CPU, m) { m.impl("broyden_step", &broyden_step_cpu); }

}  // namespace impflow
