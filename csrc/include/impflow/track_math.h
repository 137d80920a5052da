// Per-sample bookkeeping of a root solve (impflow::solver_track), shared by the CPU and CUDA
// kernels: status bits and the decision taken from a sample's residual and iterate norms.
#pragma once

#include <cstdint>

#include "impflow/broyden_math.h"

namespace impflow {

// Bits of the per-sample status byte (uint8). Python mirrors them in impflow/ops/track.py.
enum TrackStatus : uint8_t {
  kActive = 1,      // still iterating
  kConverged = 2,   // reached max(tol, floor)
  kNonfinite = 4,   // fn returned NaN/Inf for this sample at some point
  kDiverged = 8,    // set by the solver when it restarts a sample (not by the op)
  kFallback = 16,   // set by the solver: iterated by fixed-point steps from now on
  kBlowup = 32,     // this call: residual non-finite or above divergence_ratio x the first
};

// Rows of the float64 record `best`, shape (kBestRows, B): one row per quantity, so that the
// CPU kernel reads and writes them contiguously across samples.
enum TrackBest : int {
  kBestMeasure = 0,      // lowest stopping measure so far
  kBestResidual = 1,     // ||F|| at that iterate
  kInitialResidual = 2,  // ||F|| at z0: the scale of the divergence test
  kBestNorm = 3,         // ||z|| at the best iterate
  kBestRows = 4,
};

struct TrackSettings {
  double tol;
  double floor_scale;       // the precision floor is floor_scale (rel) or
                            // floor_scale * (||z|| + sqrt(n)) (abs)
  double divergence_ratio;
  double sqrt_n;
  bool relative;
};

// Flags are 0/1 integers and the status a whole word rather than bool and uint8: a loop over
// samples that mixes bool or byte arithmetic with doubles does not vectorise (GCC 12).
struct TrackDecision {
  int64_t better;  // 1: copy z, F into best_z, best_F and the new values into `best`
  double measure, residual, z_norm;
  int64_t status;  // the new status bits (fit in a byte)
};

// Decision for an active sample from ||F||^2 and ||z||^2 (accumulated in double), its best
// measure so far and its first residual. Written without branches (selects and integer flags),
// so that the CPU loop over samples vectorises.
// `Relative` is the stop mode as a compile-time constant: a select on a run-time bool inside
// the loop keeps GCC from vectorising it (track_decide below chooses at run time).
template <bool Relative>
IMPFLOW_HOST_DEVICE TrackDecision track_decide_mode(double F_sq, double z_sq, double best_measure,
                                                    double initial, int64_t status,
                                                    const TrackSettings& s) {
  TrackDecision out;
  const double res = sqrt(F_sq);
  const double z_norm = sqrt(z_sq);
  const int64_t finite = finite_value(res) ? 1 : 0;
  const double measure = Relative ? res / (z_norm + 1e-12) : res;
  out.residual = res;
  out.measure = measure;
  out.z_norm = z_norm;
  out.better = (measure < best_measure) ? finite : 0;  // a NaN measure compares false
  const double scale = initial > s.tol ? initial : s.tol;
  const int64_t blowup = (res > s.divergence_ratio * scale) ? 1 : 1 - finite;
  const double floor = Relative ? s.floor_scale : s.floor_scale * (z_norm + s.sqrt_n);
  const double stop = floor > s.tol ? floor : s.tol;
  const int64_t converged = (measure <= stop) ? finite : 0;
  int64_t st = status & ~int64_t(kBlowup);
  st |= (1 - finite) * kNonfinite;
  st |= blowup * kBlowup;
  st = (st | converged * kConverged) & ~(converged * kActive);
  out.status = st;
  return out;
}

IMPFLOW_HOST_DEVICE TrackDecision track_decide(double F_sq, double z_sq, double best_measure,
                                               double initial, int64_t status,
                                               const TrackSettings& s) {
  return s.relative ? track_decide_mode<true>(F_sq, z_sq, best_measure, initial, status, s)
                    : track_decide_mode<false>(F_sq, z_sq, best_measure, initial, status, s);
}

}  // namespace impflow
