// CPU kernel of impflow::solver_track: per active sample, the norms of F and z in one pass,
// the decision of track_math.h, and a copy into the best iterate when it improved.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <utility>
#include <tuple>

#include "impflow/track_checks.h"
#include "impflow/track_math.h"

namespace impflow {
namespace {

// Returns the counts [active, blown up] of the range and writes its part of the mask.
template <typename scalar_t>
std::pair<int64_t, int64_t> track_samples(const scalar_t* __restrict__ z,
                                          const scalar_t* __restrict__ F,
                                          scalar_t* __restrict__ best_z,
                                          scalar_t* __restrict__ best_F, double* __restrict__ best,
                                          uint8_t* __restrict__ status, int64_t* __restrict__ nstep,
                                          bool* __restrict__ mask, int64_t n,
                                          const TrackSettings& s, int64_t begin, int64_t end) {
  int64_t active = 0, blowup = 0;
  for (int64_t b = begin; b < end; ++b) {
    status[b] = uint8_t(status[b] & ~kBlowup);
    if (!(status[b] & kActive)) {
      mask[b] = false;
      continue;
    }
    const scalar_t* zb = z + b * n;
    const scalar_t* Fb = F + b * n;
    double F_sq = 0, z_sq = 0;
#pragma omp simd reduction(+ : F_sq, z_sq)
    for (int64_t j = 0; j < n; ++j) {
      F_sq += double(Fb[j]) * double(Fb[j]);
      z_sq += double(zb[j]) * double(zb[j]);
    }
    double* rec = best + b * kBestColumns;
    const TrackDecision d = track_decide(F_sq, z_sq, rec, status[b], s);
    if (d.better) {
      for (int64_t j = 0; j < n; ++j) best_z[b * n + j] = zb[j], best_F[b * n + j] = Fb[j];
      rec[kBestMeasure] = d.measure;
      rec[kBestResidual] = d.residual;
    }
    status[b] = d.status;
    nstep[b] += 1;
    active += (d.status & kActive) != 0;
    blowup += (d.status & kBlowup) != 0;
    mask[b] = (d.status & (kActive | kFallback)) == kActive;
  }
  return {active, blowup};
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
      const auto c = track_samples<scalar_t>(z_ptr, F_ptr, best_z_ptr, best_F_ptr, best_ptr,
                                             status_ptr, nstep_ptr, mask_ptr, n, s, begin, end);
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
