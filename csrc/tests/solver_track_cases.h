// The solver_track cases shared by the C++ tests of the CPU kernel (test_solver_track.cpp)
// and of the CUDA kernels' source on the SIMT emulator (test_cuda_kernels_emulated.cpp).
//
// The oracle follows the op's documented definition (ops.h) with plain loops over samples and
// elements, and shares no code with track_math.h. The data mixes every case the decision
// separates: residuals above and below tol, improving or not, NaN and Inf, exploding ones,
// inactive and fallback samples, and stale blow-up flags that must be cleared.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "check.h"

namespace impflow_test {


// Status bits, spelled out here rather than taken from track_math.h (impflow/ops/track.py
// documents the same values).
inline constexpr int kActive = 1, kConverged = 2, kNonfinite = 4, kFallback = 16, kBlowup = 32;

struct State {
  std::vector<double> z, F, best_z, best_F, best;  // best: 5 rows of B
  std::vector<uint8_t> status;
  std::vector<int64_t> nstep;
  int64_t active = 0, blowup = 0;
  std::vector<uint8_t> mask;
};

struct Settings {
  double tol, floor_scale, divergence_ratio;
  bool relative;
};

// ||x||_2 without overflow or underflow: long double holds the squares of any double.
inline double oracle_norm(const double* x, int64_t n) {
  long double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (long double)x[j] * x[j];
  return double(std::sqrt(sum));
}

// The definition, sample by sample.
inline void naive_track(State& s, int64_t B, int64_t n, const Settings& c) {
  s.mask.assign(B, 0);
  s.active = s.blowup = 0;
  for (int64_t b = 0; b < B; ++b) {
    int st = s.status[b] & ~kBlowup;
    if (st & kActive) {
      const double res = oracle_norm(&s.F[b * n], n), z_norm = oracle_norm(&s.z[b * n], n);
      const bool finite = std::isfinite(res) && std::isfinite(z_norm);
      // Within the reach the floor stands in for a smaller tol; beyond it, tol must be met
      // and resolved there (the relative measure's denominator stops at the reach).
      const double reach = s.best[4 * B + b];
      const bool beyond = z_norm > reach;
      const double denominator = c.relative ? std::min(z_norm, reach) + 1e-12 : 1.0;
      const double measure = res / denominator;
      const double resolution = c.floor_scale * (z_norm + std::sqrt(double(n))) / denominator;
      const double floor = c.relative && !beyond ? c.floor_scale : resolution;
      const double stop = beyond ? (floor <= c.tol ? c.tol : -1.0) : std::max(floor, c.tol);
      const double first = s.best[2 * B + b];
      const bool converged = finite && measure <= stop;
      if (converged || (finite && measure < s.best[0 * B + b])) {
        s.best[0 * B + b] = measure;
        s.best[1 * B + b] = res;
        s.best[3 * B + b] = z_norm;
        for (int64_t j = 0; j < n; ++j) {
          s.best_z[b * n + j] = s.z[b * n + j];
          s.best_F[b * n + j] = s.F[b * n + j];
        }
      }
      if (!finite) st |= kNonfinite;
      if (!finite || res > c.divergence_ratio * std::max(first, c.tol)) st |= kBlowup;
      if (converged) st = (st | kConverged) & ~kActive;
      s.nstep[b] += 1;
    }
    s.status[b] = uint8_t(st);
    s.active += (st & kActive) != 0;
    s.blowup += (st & kBlowup) != 0;
    s.mask[b] = (st & (kActive | kFallback)) == kActive;
  }
}

inline bool close(double got, double want) {
  if (std::isnan(got) || std::isnan(want)) return std::isnan(got) && std::isnan(want);
  return got == want || std::abs(got - want) <= 1e-12 * std::abs(want);
}

// The op under test: impflow::solver_track, or the CUDA launch code on the SIMT emulator.
using TrackOp = std::function<std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& z, const at::Tensor& F, at::Tensor& best_z, at::Tensor& best_F,
    at::Tensor& best, at::Tensor& status, at::Tensor& nstep, double tol, double floor_scale,
    double divergence_ratio, bool relative)>;

inline void run_case(int64_t B, int64_t n, bool relative, at::ScalarType dtype, uint64_t seed,
                     const TrackOp& op, const std::string& label = "") {
  char buf[120];
  std::snprintf(buf, sizeof buf, "%s B=%ld n=%ld %s", c10::toString(dtype), long(B), long(n),
                relative ? "rel" : "abs");
  const std::string name = label + buf;
  at::manual_seed(seed);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  // Residual norms from 1e-6 to 10 around tol = 1e-3; best measures from 1e-5 to 1.
  auto z = at::randn({B, n}, f64);
  auto F = at::randn({B, n}, f64) * at::pow(10.0, at::randint(-6, 2, {B, 1}, f64)) /
           std::sqrt(double(n));
  if (B > 2) F[B / 3].fill_(std::nan(""));
  if (B > 4) F[B / 4][0].fill_(INFINITY);
  if (B > 6) z[B / 6][n - 1].fill_(std::nan(""));  // a non-finite iterate, finite F
  if (dtype == at::kDouble && B > 5) {
    // Squares that overflow or underflow float64: the norms must not.
    z[B / 5].mul_(1e200);
    F[B / 5 + 1].mul_(1e200);
    F[B / 5 + 2].mul_(1e-170);
  }
  auto best = at::empty({5, B}, f64);
  best[0].copy_(at::pow(10.0, at::randint(-5, 1, {B}, f64)));
  best[1].copy_(best[0]);
  best[2].copy_(0.1 * at::pow(10.0, at::randint(-1, 2, {B}, f64)));
  best[3].copy_(at::rand({B}, f64));
  // The reach, some below ||z|| (about sqrt(n)): it then caps the floor and the measure.
  best[4].copy_(at::rand({B}, f64) * 2 * std::sqrt(double(n)));
  if (B > 7) best[4][B / 7].fill_(INFINITY);
  auto status = at::full({B}, kActive, at::kByte);
  status.masked_fill_(at::rand({B}) < 0.2, kConverged);
  status.bitwise_or_(at::where(at::rand({B}) < 0.2, kFallback, 0).to(at::kByte));
  status.bitwise_or_(at::where(at::rand({B}) < 0.1, kBlowup, 0).to(at::kByte));
  auto nstep = at::randint(0, 5, {B}, at::kLong);
  auto best_z = at::randn({B, n}, f64), best_F = at::randn({B, n}, f64);
  // Inputs in the op's dtype; the oracle works on their values in double.
  z = z.to(dtype), F = F.to(dtype), best_z = best_z.to(dtype), best_F = best_F.to(dtype);

  State want{values(z), values(F), values(best_z), values(best_F), values(best),
             values<uint8_t>(status), values<int64_t>(nstep)};
  const Settings c{1e-3, 1e-7, 10.0, relative};
  naive_track(want, B, n, c);

  at::Tensor counts, mask;
  try {
    std::tie(counts, mask) = op(z, F, best_z, best_F, best, status, nstep, c.tol, c.floor_scale,
                                c.divergence_ratio, c.relative);
  } catch (const c10::Error& e) {
    return report(false, name, std::string("threw: ") + e.what_without_backtrace());
  } catch (const std::exception& e) {  // e.g. a rule of the SIMT emulator broken
    return report(false, name, std::string("threw: ") + e.what());
  }
  std::string why;
  const auto got_status = values<uint8_t>(status);
  const auto got_nstep = values<int64_t>(nstep);
  const auto got_mask = values<bool>(mask);
  const auto got_best = values(best);
  const auto got_z = values(best_z);
  const auto got_F = values(best_F);
  for (int64_t b = 0; b < B && why.empty(); ++b) {
    const std::string at_b = " at b=" + std::to_string(b);
    if (got_status[b] != want.status[b])
      why = "status " + std::to_string(got_status[b]) + " want " +
            std::to_string(want.status[b]) + at_b;
    else if (got_nstep[b] != want.nstep[b])
      why = "nstep" + at_b;
    else if (got_mask[b] != bool(want.mask[b]))
      why = "mask" + at_b;
    for (int r = 0; r < 5 && why.empty(); ++r)
      if (!close(got_best[r * B + b], want.best[r * B + b]))
        why = "best row " + std::to_string(r) + at_b;
    for (int64_t j = 0; j < n && why.empty(); ++j)
      if (!close(got_z[b * n + j], want.best_z[b * n + j]) ||
          !close(got_F[b * n + j], want.best_F[b * n + j]))
        why = "best iterate" + at_b;
  }
  if (why.empty() && (counts[0].item<int64_t>() != want.active ||
                      counts[1].item<int64_t>() != want.blowup))
    why = "counts [" + std::to_string(counts[0].item<int64_t>()) + ", " +
          std::to_string(counts[1].item<int64_t>()) + "] want [" + std::to_string(want.active) +
          ", " + std::to_string(want.blowup) + "]";
  report(why.empty(), name, why);
}

}  // namespace impflow_test
