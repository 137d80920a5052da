// CPU kernel of impflow::solver_track: per active sample, the norms of F and z in one pass,
// the decision of track_math.h, and a copy into the best iterate when it improved.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <utility>
#include <tuple>
#include <type_traits>

#include "impflow/track_checks.h"
#include "impflow/cpu_dispatch.h"
#include "impflow/track_math.h"

// The whole kernel is compiled without fused multiply-adds. The norms of short samples run
// with samples in the vector lanes, and a sample lands in a loop's vector body or its scalar
// remainder depending on the batch and the thread split. AVX-512 builds fused f*f + g*g in
// one and not the other, so a float64 residual's last bit changed with the batch (seen).
// Separate multiplies and adds round the same in every path. The option must hold for the
// multiversioned entry points: an inlined function takes its caller's. The cost is about 12%
// of one call at (256, 3072) float32 (5 us), nothing at (5000, 2) (alternate runs).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace impflow {
namespace {

constexpr int64_t kBlock = 256;  // samples whose norms and decisions are vectorised together

// best_z, best_F <- z, F for the lanes that improved, for samples of N elements: the flags
// are first spread to one per element, so that the selects run along contiguous elements.
template <typename scalar_t, int N>
IMPFLOW_INLINE void copy_better(const scalar_t* __restrict__ z, const scalar_t* __restrict__ F,
                                scalar_t* __restrict__ best_z, scalar_t* __restrict__ best_F,
                                const int64_t* __restrict__ better, int64_t b0, int64_t len) {
  int32_t take[N * kBlock];  // an integer flag per element: a bool keeps the loop scalar
#pragma omp simd
  for (int64_t l = 0; l < len; ++l) {
    for (int j = 0; j < N; ++j) take[l * N + j] = better[l];
  }
  const int64_t k0 = b0 * N;
#pragma omp simd
  for (int64_t k = 0; k < len * N; ++k) {
    best_z[k0 + k] = take[k] ? z[k0 + k] : best_z[k0 + k];
    best_F[k0 + k] = take[k] ? F[k0 + k] : best_F[k0 + k];
  }
}

// ||F||^2 and ||z||^2 of the samples b0 .. b0 + len, of N elements each (N known at compile
// time, so that the loop along the samples vectorises); N = 0: n elements.
template <typename scalar_t, int N>
IMPFLOW_INLINE void short_norms(const scalar_t* __restrict__ z, const scalar_t* __restrict__ F,
                                double* __restrict__ F_sq, double* __restrict__ z_sq, int64_t n,
                                int64_t b0, int64_t len) {
  const int64_t m = N > 0 ? N : n;
#pragma omp simd
  for (int64_t l = 0; l < len; ++l) {
    double f2 = 0, z2 = 0;
    for (int64_t j = 0; j < m; ++j) {
      const double f = F[(b0 + l) * m + j], x = z[(b0 + l) * m + j];
      f2 += f * f, z2 += x * x;
    }
    F_sq[l] = f2, z_sq[l] = z2;
  }
}

// float64 samples only: the active samples whose sums of squares left the normal range (an
// overflow above about 1e154, or digits lost below 1e-154) get their norms again, scaled
// (scaled_norm). Rare, so the check is one pass and the fix a plain loop.
IMPFLOW_INLINE void rescale_norms(const double* __restrict__ z, const double* __restrict__ F,
                                  const double* __restrict__ F_sq, const double* __restrict__ z_sq,
                                  double* __restrict__ F_norm, double* __restrict__ z_norm,
                                  const int64_t* __restrict__ state, int64_t n, int64_t b0,
                                  int64_t len) {
  int64_t odd = 0;
#pragma omp simd reduction(| : odd)
  for (int64_t l = 0; l < len; ++l) {
    const int64_t in_range = square_sum_in_range(F_sq[l]) & square_sum_in_range(z_sq[l]);
    odd |= (state[l] & kActive) & (1 - in_range);
  }
  if (!odd) return;
  for (int64_t l = 0; l < len; ++l) {
    if (!(state[l] & kActive)) continue;
    const int64_t b = b0 + l;
    if (!square_sum_in_range(F_sq[l])) F_norm[l] = scaled_norm(F + b * n, n);
    if (!square_sum_in_range(z_sq[l])) z_norm[l] = scaled_norm(z + b * n, n);
  }
}

// Returns the counts [active, blown up] of the range and writes its part of the mask.
// Per block of samples, loops along the samples: the norms, the decisions (track_decide),
// the counts, then the copies into the best iterate. perf showed each loop scalar at first;
// the code is shaped the way GCC 12 vectorises it: compile-time sample sizes and stop mode,
// integer flags instead of bools, the settings in a local copy, no reduction in the
// decision loop.
template <typename scalar_t, bool Relative>
IMPFLOW_INLINE std::pair<int64_t, int64_t> track_samples(const scalar_t* __restrict__ z,
                                          const scalar_t* __restrict__ F,
                                          scalar_t* __restrict__ best_z,
                                          scalar_t* __restrict__ best_F, double* __restrict__ best,
                                          uint8_t* __restrict__ status, int64_t* __restrict__ nstep,
                                          bool* __restrict__ mask, int64_t B, int64_t n,
                                          const TrackSettings& settings, int64_t begin,
                                          int64_t end) {
  // A local copy: the stores into `best` could alias a reference, which keeps GCC from
  // hoisting the settings out of the decision loop and from vectorising it.
  const TrackSettings s = settings;
  double F_sq[kBlock], z_sq[kBlock], F_norm[kBlock], z_norm[kBlock];
  // The decision loop touches 64-bit values only: a byte array in it (the status, the flags)
  // makes GCC vectorise over 32 lanes at once, which spills (perf), so the status bytes are
  // widened before it and narrowed after it.
  int64_t state[kBlock], better[kBlock];
  int64_t active = 0, blowup = 0;
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int64_t len = std::min(kBlock, end - b0);
    if (n <= 8) {  // short samples: lanes hold samples
      switch (n) {
        case 1: short_norms<scalar_t, 1>(z, F, F_sq, z_sq, n, b0, len); break;
        case 2: short_norms<scalar_t, 2>(z, F, F_sq, z_sq, n, b0, len); break;
        case 3: short_norms<scalar_t, 3>(z, F, F_sq, z_sq, n, b0, len); break;
        case 4: short_norms<scalar_t, 4>(z, F, F_sq, z_sq, n, b0, len); break;
        default: short_norms<scalar_t, 0>(z, F, F_sq, z_sq, n, b0, len);
      }
    } else {  // long samples: lanes run along each sample
      for (int64_t l = 0; l < len; ++l) {
        const scalar_t* Fb = F + (b0 + l) * n;
        const scalar_t* zb = z + (b0 + l) * n;
        double f2 = 0, z2 = 0;
        if (status[b0 + l] & kActive) {
#pragma omp simd reduction(+ : f2, z2)
          for (int64_t j = 0; j < n; ++j) f2 += double(Fb[j]) * double(Fb[j]), z2 += double(zb[j]) * double(zb[j]);
        }
        F_sq[l] = f2, z_sq[l] = z2;
      }
    }
#pragma omp simd
    for (int64_t l = 0; l < len; ++l) state[l] = status[b0 + l];
#pragma omp simd
    for (int64_t l = 0; l < len; ++l) F_norm[l] = std::sqrt(F_sq[l]), z_norm[l] = std::sqrt(z_sq[l]);
    if constexpr (std::is_same<scalar_t, double>::value) {
      rescale_norms(z, F, F_sq, z_sq, F_norm, z_norm, state, n, b0, len);
    }
    int64_t block_active = 0, block_blowup = 0;
    double* __restrict__ best_measure = best + kBestMeasure * B + b0;
    double* __restrict__ best_residual = best + kBestResidual * B + b0;
    double* __restrict__ best_norm = best + kBestNorm * B + b0;
    const double* __restrict__ initial = best + kInitialResidual * B + b0;
    const double* __restrict__ reach = best + kReach * B + b0;
    // No reduction in this loop: GCC's `omp simd` reduction arrays defeat its dependence
    // analysis here and leave the loop scalar; the counts come from a loop of their own.
#pragma omp simd
    for (int64_t l = 0; l < len; ++l) {
      const int64_t old = state[l];
      const int64_t on = old & kActive;  // 0 or 1
      const TrackDecision d = track_decide_mode<Relative>(F_norm[l], z_norm[l], best_measure[l],
                                                          initial[l], reach[l], old, s);
      const int64_t improve = on & d.better;
      better[l] = improve;
      best_measure[l] = improve ? d.measure : best_measure[l];
      best_residual[l] = improve ? F_norm[l] : best_residual[l];
      best_norm[l] = improve ? z_norm[l] : best_norm[l];
      state[l] = on ? d.status : (old & ~int64_t(kBlowup));
      nstep[b0 + l] += on;
    }
#pragma omp simd reduction(+ : block_active, block_blowup)
    for (int64_t l = 0; l < len; ++l) {
      block_active += state[l] & kActive;
      block_blowup += (state[l] & kBlowup) / kBlowup;  // 0 or 1, without a bool
    }
#pragma omp simd
    for (int64_t l = 0; l < len; ++l) {
      const int64_t st = state[l];
      status[b0 + l] = uint8_t(st);
      reinterpret_cast<uint8_t*>(mask)[b0 + l] = uint8_t((st & (kActive | kFallback)) == kActive);
    }
    active += block_active;
    blowup += block_blowup;
    switch (n) {  // tiny samples: copy lanes side by side; larger ones row by row
      case 1: copy_better<scalar_t, 1>(z, F, best_z, best_F, better, b0, len); break;
      case 2: copy_better<scalar_t, 2>(z, F, best_z, best_F, better, b0, len); break;
      case 3: copy_better<scalar_t, 3>(z, F, best_z, best_F, better, b0, len); break;
      case 4: copy_better<scalar_t, 4>(z, F, best_z, best_F, better, b0, len); break;
      default:
        for (int64_t l = 0; l < len; ++l) {
          if (!better[l]) continue;
          const int64_t b = b0 + l;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) best_z[b * n + j] = z[b * n + j], best_F[b * n + j] = F[b * n + j];
        }
    }
  }
  return {active, blowup};
}

// Non-template entry points: GCC clones these per instruction set.
IMPFLOW_CPU_CLONES std::pair<int64_t, int64_t> track_samples_f32(
    const float* z, const float* F, float* best_z, float* best_F, double* best, uint8_t* status,
    int64_t* nstep, bool* mask, int64_t B, int64_t n, const TrackSettings& s, int64_t begin,
    int64_t end) {
  return s.relative ? track_samples<float, true>(z, F, best_z, best_F, best, status, nstep, mask,
                                                 B, n, s, begin, end)
                    : track_samples<float, false>(z, F, best_z, best_F, best, status, nstep, mask,
                                                  B, n, s, begin, end);
}

IMPFLOW_CPU_CLONES std::pair<int64_t, int64_t> track_samples_f64(
    const double* z, const double* F, double* best_z, double* best_F, double* best,
    uint8_t* status, int64_t* nstep, bool* mask, int64_t B, int64_t n, const TrackSettings& s,
    int64_t begin, int64_t end) {
  return s.relative ? track_samples<double, true>(z, F, best_z, best_F, best, status, nstep, mask,
                                                  B, n, s, begin, end)
                    : track_samples<double, false>(z, F, best_z, best_F, best, status, nstep, mask,
                                                   B, n, s, begin, end);
}

std::pair<int64_t, int64_t> track_samples_any(const float* z, const float* F, float* best_z,
                                              float* best_F, double* best, uint8_t* status,
                                              int64_t* nstep, bool* mask, int64_t B, int64_t n,
                                              const TrackSettings& s, int64_t begin, int64_t end) {
  return track_samples_f32(z, F, best_z, best_F, best, status, nstep, mask, B, n, s, begin, end);
}

std::pair<int64_t, int64_t> track_samples_any(const double* z, const double* F, double* best_z,
                                              double* best_F, double* best, uint8_t* status,
                                              int64_t* nstep, bool* mask, int64_t B, int64_t n,
                                              const TrackSettings& s, int64_t begin, int64_t end) {
  return track_samples_f64(z, F, best_z, best_F, best, status, nstep, mask, B, n, s, begin, end);
}

std::tuple<at::Tensor, at::Tensor> solver_track_cpu(const at::Tensor& z_in, const at::Tensor& F_in,
                                                    at::Tensor& best_z, at::Tensor& best_F,
                                                    at::Tensor& best, at::Tensor& status,
                                                    at::Tensor& nstep, double tol,
                                                    double floor_scale, double divergence_ratio,
                                                    bool relative) {
  check_solver_track_args(z_in, F_in, best_z, best_F, best, status, nstep);
  const auto z = z_in.contiguous(), F = F_in.contiguous();
  const int64_t B = z.size(0), n = z.size(1);
  const TrackSettings s{tol, floor_scale, divergence_ratio, std::sqrt(double(n)), relative};
  auto mask = at::empty({B}, status.options().dtype(at::kBool));
  std::atomic<int64_t> active{0}, blowup{0};
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "solver_track_cpu", [&] {
    const scalar_t* z_ptr = z.data_ptr<scalar_t>();
    const scalar_t* F_ptr = F.data_ptr<scalar_t>();
    scalar_t* best_z_ptr = best_z.data_ptr<scalar_t>();
    scalar_t* best_F_ptr = best_F.data_ptr<scalar_t>();
    double* best_ptr = best.data_ptr<double>();
    uint8_t* status_ptr = status.data_ptr<uint8_t>();
    int64_t* nstep_ptr = nstep.data_ptr<int64_t>();
    bool* mask_ptr = mask.data_ptr<bool>();
    const int64_t grain = std::max<int64_t>(1, 16384 / (n + 16));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      const auto c = track_samples_any(z_ptr, F_ptr, best_z_ptr, best_F_ptr, best_ptr,
                                             status_ptr, nstep_ptr, mask_ptr, B, n, s, begin,
                                             end);
      active += c.first;
      blowup += c.second;
    });
  });
  // Counts for the solver's single host read per iteration: [still active, blown up].
  auto counts = at::empty({2}, status.options().dtype(at::kLong));
  counts.data_ptr<int64_t>()[0] = active.load();
  counts.data_ptr<int64_t>()[1] = blowup.load();
  return {counts, mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(impflow, CPU, m) { m.impl("solver_track", &solver_track_cpu); }

}  // namespace impflow
