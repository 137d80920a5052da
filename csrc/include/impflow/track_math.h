// Per-sample bookkeeping of a root solve (impflow::solver_track), shared by the CPU and CUDA
// kernels: status bits, the norms of a sample, and the decision taken from them.
#pragma once

#include <cstdint>

#include "impflow/broyden_math.h"

namespace impflow {

// Bits of the per-sample status byte (uint8). Python mirrors them in impflow/ops/track.py.
enum TrackStatus : uint8_t {
  kActive = 1,      // still iterating
  kConverged = 2,   // reached max(tol, floor) at a finite iterate
  kNonfinite = 4,   // the iterate or fn's value was NaN/Inf for this sample at some point
  kDiverged = 8,    // set by the solver when it restarts a sample (not by the op)
  kFallback = 16,   // set by the solver: iterated by fixed-point steps from now on
  kBlowup = 32,     // this call: non-finite, or residual above divergence_ratio x the first
};

// Rows of the float64 record `best`, shape (kBestRows, B): one row per quantity, so that the
// CPU kernel reads and writes them contiguously across samples.
enum TrackBest : int {
  kBestMeasure = 0,      // lowest stopping measure so far
  kBestResidual = 1,     // ||F|| at that iterate
  kInitialResidual = 2,  // ||F|| at z0: the scale of the divergence test
  kBestNorm = 3,         // ||z|| at the best iterate
  kReach = 4,            // where a root can lie, ||z0|| + 1000 ||F(z0)|| (see track_limits;
                         // read only, set by the solver after the first call)
  kBestRows = 5,
};

struct TrackSettings {
  double tol;
  double floor_scale;       // the dtype's precision: see track_limits
  double divergence_ratio;
  double sqrt_n;
  bool relative;
};

// A sum of squares of float64 values outside the normal range has overflowed or lost digits
// to underflow (float32 values cannot leave it: their squares fit a double).
IMPFLOW_HOST_DEVICE bool square_sum_in_range(double sq) {
  return sq >= 2.2250738585072014e-308 && sq <= 1.7976931348623157e308;
}

// ||x||_2 of n values, scaled by the largest magnitude so that no square overflows or
// underflows: for the float64 samples whose plain sum of squares left the normal range.
// NaN if any value is NaN, Inf if any is infinite (and none NaN).
template <typename scalar_t>
IMPFLOW_HOST_DEVICE double scaled_norm(const scalar_t* x, int64_t n) {
  double big = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double a = abs_value(double(x[j]));
    if (a != a) return a;
    big = a > big ? a : big;
  }
  if (big == 0 || !finite_value(big)) return big;
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double r = double(x[j]) / big;
    sum += r * r;
  }
  return big * sqrt(sum);
}

// Flags are 0/1 integers and the status a whole word rather than bool and uint8: a loop over
// samples that mixes bool or byte arithmetic with doubles does not vectorise (GCC 12).
struct TrackDecision {
  int64_t better;  // 1: copy z, F into best_z, best_F and the new values into `best`
  double measure;
  int64_t status;  // the new status bits (fit in a byte)
};

// The smallest stopping measure the dtype resolves at an iterate (the floor), and the largest
// it accepts (the stop), for a sample with ||z|| = z_norm and reach R:
// - within the reach (||z|| <= R), the floor is floor_scale * (||z|| + sqrt(n)) (abs) or
//   floor_scale (rel), and it replaces a tol below it: stop = max(tol, floor);
// - beyond it the iterate is running away from any root that a contraction started at z0 can
//   have, and a floor growing with it would call a residual of any size converged (atan(z) - 2
//   "solved" at |z| = 4e16, with a residual of 0.6 under a floor of 8.9). There tol itself must
//   be met, and resolved: the floor is floor_scale * (||z|| + sqrt(n)) / denominator, and the
//   stop is tol where floor <= tol, and -1 (nothing converges) otherwise.
// The relative measure's denominator is min(||z||, R) + 1e-12, for the same reason.
struct TrackLimits {
  double measure, floor, stop;
};

template <bool Relative>
IMPFLOW_HOST_DEVICE TrackLimits track_limits(double res, double z_norm, double reach,
                                             const TrackSettings& s) {
  TrackLimits out;
  const int64_t beyond = z_norm > reach ? 1 : 0;
  const double denominator = Relative ? (beyond ? reach : z_norm) + 1e-12 : 1.0;
  out.measure = res / denominator;
  const double resolution = s.floor_scale * (z_norm + s.sqrt_n) / denominator;
  out.floor = (Relative && !beyond) ? s.floor_scale : resolution;
  const double within_stop = out.floor > s.tol ? out.floor : s.tol;
  const double beyond_stop = out.floor <= s.tol ? s.tol : -1.0;
  out.stop = beyond ? beyond_stop : within_stop;
  return out;
}

// Decision for an active sample from ||F|| and ||z||, its best measure so far, its first
// residual and its reach. An iterate counts only where both norms are finite. A converged
// iterate always becomes the best one, so that the returned iterate is the one that met the
// stop. Written without branches (selects and integer flags), so that the CPU loop over
// samples vectorises. `Relative` is the stop mode as a compile-time constant: a select on a
// run-time bool inside the loop keeps GCC from vectorising it (track_decide below chooses at
// run time).
template <bool Relative>
IMPFLOW_HOST_DEVICE TrackDecision track_decide_mode(double res, double z_norm, double best_measure,
                                                    double initial, double reach, int64_t status,
                                                    const TrackSettings& s) {
  TrackDecision out;
  const int64_t finite = (finite_value(res) && finite_value(z_norm)) ? 1 : 0;
  const TrackLimits lim = track_limits<Relative>(res, z_norm, reach, s);
  out.measure = lim.measure;
  const double scale = initial > s.tol ? initial : s.tol;
  const int64_t blowup = (res > s.divergence_ratio * scale) ? 1 : 1 - finite;
  const int64_t converged = (lim.measure <= lim.stop) ? finite : 0;
  out.better = ((lim.measure < best_measure) ? finite : 0) | converged;  // NaN compares false
  int64_t st = status & ~int64_t(kBlowup);
  st |= (1 - finite) * kNonfinite;
  st |= blowup * kBlowup;
  st = (st | converged * kConverged) & ~(converged * kActive);
  out.status = st;
  return out;
}

IMPFLOW_HOST_DEVICE TrackDecision track_decide(double res, double z_norm, double best_measure,
                                               double initial, double reach, int64_t status,
                                               const TrackSettings& s) {
  return s.relative
             ? track_decide_mode<true>(res, z_norm, best_measure, initial, reach, status, s)
             : track_decide_mode<false>(res, z_norm, best_measure, initial, reach, status, s);
}

}  // namespace impflow
