// The CUDA kernels of impflow::solver_track and their launch code: a group of threads per
// sample reduces ||F||^2 and ||z||^2 (warp shuffles, then shared memory across the group's
// warps), its first thread takes the decision of track_math.h, and the group copies the iterate
// into best_z / best_F when it improved. A second small kernel builds the mask and the counts.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "impflow/track_checks.h"
#include "impflow/track_math.h"
#include "reductions.cuh"

namespace impflow {
namespace track {

constexpr int kBlockThreads = 256;
constexpr int kWarp = kWarpSize;

template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
track_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ F,
             scalar_t* __restrict__ best_z, scalar_t* __restrict__ best_F,
             double* __restrict__ best, uint8_t* __restrict__ status, int64_t* __restrict__ nstep,
             int64_t B, int64_t n, TrackSettings s) {
  constexpr int kGroupsPerBlock = kBlockThreads / GROUP;
  constexpr int kWarpsPerGroup = GROUP / kWarp;
  __shared__ double partial[kGroupsPerBlock][kWarpsPerGroup][2];
  __shared__ bool better[kGroupsPerBlock];
  const int group = threadIdx.x / GROUP;
  const int rank = threadIdx.x % GROUP;
  const int lane = threadIdx.x % kWarp;
  const int64_t b = int64_t(blockIdx.x) * kGroupsPerBlock + group;
  // Every thread reaches the barriers, also those without an active sample.
  const bool work = b < B && (status[b] & kActive);
  if (work) {
    double F_sq = 0, z_sq = 0;
    for (int64_t j = rank; j < n; j += GROUP) {
      const double f = F[b * n + j], x = z[b * n + j];
      F_sq += f * f;
      z_sq += x * x;
    }
    F_sq = warp_sum(F_sq);
    z_sq = warp_sum(z_sq);
    if (lane == 0) {
      partial[group][rank / kWarp][0] = F_sq;
      partial[group][rank / kWarp][1] = z_sq;
    }
  }
  __syncthreads();
  if (work && rank == 0) {
    double F_sq = 0, z_sq = 0;
    for (int w = 0; w < kWarpsPerGroup; ++w) F_sq += partial[group][w][0], z_sq += partial[group][w][1];
    double res = sqrt(F_sq), z_norm = sqrt(z_sq);
    // float64 sums of squares outside the normal range (overflow above about 1e154, digits lost
    // below 1e-154): this thread computes the norm again, scaled. Rare; no barrier needed.
    if (sizeof(scalar_t) == sizeof(double)) {
      if (!square_sum_in_range(F_sq)) res = scaled_norm(F + b * n, n);
      if (!square_sum_in_range(z_sq)) z_norm = scaled_norm(z + b * n, n);
    }
    const TrackDecision d =
        track_decide(res, z_norm, best[kBestMeasure * B + b], best[kInitialResidual * B + b],
                     best[kReach * B + b], status[b], s);
    if (d.better) {
      best[kBestMeasure * B + b] = d.measure;
      best[kBestResidual * B + b] = res;
      best[kBestNorm * B + b] = z_norm;
    }
    status[b] = d.status;
    nstep[b] += 1;
    better[group] = d.better;
  } else if (b < B && rank == 0) {
    status[b] = uint8_t(status[b] & ~kBlowup);
  }
  __syncthreads();
  if (work && better[group]) {
    for (int64_t j = rank; j < n; j += GROUP) {
      best_z[b * n + j] = z[b * n + j];
      best_F[b * n + j] = F[b * n + j];
    }
  }
}

// mask[b] = active and not in fallback; counts = [active, blown up] (counts zeroed before).
__global__ void mask_and_counts_kernel(const uint8_t* __restrict__ status, bool* __restrict__ mask,
                                       unsigned long long* __restrict__ counts, int64_t B) {
  unsigned long long active = 0, blowup = 0;
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < B;
       b += int64_t(gridDim.x) * blockDim.x) {
    const uint8_t st = status[b];
    mask[b] = (st & (kActive | kFallback)) == kActive;
    active += (st & kActive) != 0;
    blowup += (st & kBlowup) != 0;
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    active += __shfl_down_sync(0xffffffffu, active, offset);
    blowup += __shfl_down_sync(0xffffffffu, blowup, offset);
  }
  if ((threadIdx.x % kWarp) == 0) {
    if (active) atomicAdd(counts, active);
    if (blowup) atomicAdd(counts + 1, blowup);
  }
}

template <typename scalar_t, int GROUP, typename Launch>
void launch_track(const Launch& launch_kernel, const at::Tensor& z, const at::Tensor& F,
                  at::Tensor& best_z, at::Tensor& best_F, at::Tensor& best, at::Tensor& status,
                  at::Tensor& nstep, const TrackSettings& s) {
  const int64_t B = z.size(0), n = z.size(1);
  constexpr int kGroupsPerBlock = kBlockThreads / GROUP;
  const int64_t blocks = (B + kGroupsPerBlock - 1) / kGroupsPerBlock;
  TORCH_CHECK(blocks <= int64_t(std::numeric_limits<int>::max()), "solver_track: batch too large");
  launch_kernel(dim3(unsigned(blocks)), dim3(kBlockThreads), 0, track_kernel<scalar_t, GROUP>,
                z.data_ptr<scalar_t>(), F.data_ptr<scalar_t>(), best_z.data_ptr<scalar_t>(),
                best_F.data_ptr<scalar_t>(), best.data_ptr<double>(), status.data_ptr<uint8_t>(),
                nstep.data_ptr<int64_t>(), B, n, s);
}

// The host side of the CUDA solver_track. The launcher is a parameter (see cuda_launch.cuh):
// solver_track_cuda.cu passes CudaLaunch, the C++ tests the SIMT emulator's. `group` forces the
// threads per sample (32, 128 or 256; 0: chosen from n).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> solver_track_launch(
    const Launch& launch_kernel, const at::Tensor& z_in, const at::Tensor& F_in,
    at::Tensor& best_z, at::Tensor& best_F, at::Tensor& best, at::Tensor& status,
    at::Tensor& nstep, double tol, double floor_scale, double divergence_ratio, bool relative,
    int group = 0) {
  check_solver_track_args(z_in, F_in, best_z, best_F, best, status, nstep);
  const auto device_guard = launch_kernel.guard(z_in.device());
  const auto z = z_in.contiguous(), F = F_in.contiguous();
  const int64_t B = z.size(0), n = z.size(1);
  const TrackSettings s{tol, floor_scale, divergence_ratio, std::sqrt(double(n)), relative};
  auto counts = at::zeros({2}, status.options().dtype(at::kLong));
  auto mask = at::empty({B}, status.options().dtype(at::kBool));
  if (B == 0) return {counts, mask};
  if (group == 0) group = n <= 64 ? 32 : (n <= 1024 ? 128 : 256);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "solver_track_cuda", [&] {
    if (group == 32) {
      launch_track<scalar_t, 32>(launch_kernel, z, F, best_z, best_F, best, status, nstep, s);
    } else if (group == 128) {
      launch_track<scalar_t, 128>(launch_kernel, z, F, best_z, best_F, best, status, nstep, s);
    } else {
      launch_track<scalar_t, 256>(launch_kernel, z, F, best_z, best_F, best, status, nstep, s);
    }
  });
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((B + threads - 1) / threads, 1024);
  launch_kernel(dim3(unsigned(blocks)), dim3(threads), 0, mask_and_counts_kernel,
                status.data_ptr<uint8_t>(), mask.data_ptr<bool>(),
                reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()), B);
  return {counts, mask};
}

}  // namespace track

using track::solver_track_launch;

}  // namespace impflow
