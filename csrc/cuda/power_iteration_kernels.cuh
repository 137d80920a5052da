// The CUDA kernel of impflow::power_iteration and its launch code: one block per matrix runs
// all its steps. v <- normalize(W^T u): a thread per column, reading the rows coalesced;
// u <- normalize(W v): a warp per row, reduced by shuffles; norms by a block reduction. The
// block barrier orders the phases (u and v are written to global memory and read back by
// other threads of the same block only).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <vector>

#include "impflow/power_checks.h"
#include "impflow/power_math.h"
#include "reductions.cuh"

namespace impflow {
namespace power {

constexpr int kThreads = 256;
constexpr int kWarp = kWarpSize;

// Sum over the block; every thread gets the result. `scratch` holds kThreads / kWarp values.
template <typename T>
__device__ T block_sum(T x, T* scratch) {
  x = warp_sum(x);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < kThreads / kWarp; ++w) total += scratch[w];
  return total;
}

// Per matrix: [W pointer, u pointer, v pointer, rows, cols] as int64.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
power_iteration_kernel(const int64_t* __restrict__ meta, int64_t n_iterations,
                       scalar_t* __restrict__ sigmas) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kThreads / kWarp];
  const int64_t* m = meta + 5 * blockIdx.x;
  const scalar_t* W = reinterpret_cast<const scalar_t*>(m[0]);
  scalar_t* u = reinterpret_cast<scalar_t*>(m[1]);
  scalar_t* v = reinterpret_cast<scalar_t*>(m[2]);
  const int64_t rows = m[3], cols = m[4];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int64_t it = 0; it < n_iterations; ++it) {
    // v = W^T u (unnormalised), then its norm.
    acc_t sq = 0;
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
      acc_t s = 0;
      for (int64_t i = 0; i < rows; ++i) s += acc_t(u[i]) * acc_t(W[i * cols + j]);
      v[j] = scalar_t(s);
      sq += s * s;
    }
    // Every thread has read u before the barrier inside block_sum, so u may change after it.
    const acc_t inv_v = inverse_norm(block_sum(sq, scratch));
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) v[j] = scalar_t(acc_t(v[j]) * inv_v);
    __syncthreads();
    // u = W v (unnormalised): a warp per row.
    sq = 0;
    for (int64_t i = warp; i < rows; i += kThreads / kWarp) {
      acc_t s = 0;
      for (int64_t j = lane; j < cols; j += kWarp) s += acc_t(W[i * cols + j]) * acc_t(v[j]);
      s = warp_sum(s);
      if (lane == 0) {
        u[i] = scalar_t(s);
        sq += s * s;
      }
    }
    const acc_t inv_u = inverse_norm(block_sum(sq, scratch));
    for (int64_t i = threadIdx.x; i < rows; i += kThreads) u[i] = scalar_t(acc_t(u[i]) * inv_u);
    __syncthreads();
  }
  // sigma = u^T W v
  acc_t part = 0;
  for (int64_t i = warp; i < rows; i += kThreads / kWarp) {
    acc_t s = 0;
    for (int64_t j = lane; j < cols; j += kWarp) s += acc_t(W[i * cols + j]) * acc_t(v[j]);
    s = warp_sum(s);
    if (lane == 0) part += acc_t(u[i]) * s;
  }
  const acc_t sigma = block_sum(part, scratch);
  if (threadIdx.x == 0) sigmas[blockIdx.x] = scalar_t(sigma);
}

// The host side of the CUDA power_iteration. The launcher is a parameter (see cuda_launch.cuh):
// power_iteration_cuda.cu passes CudaLaunch, the C++ tests the SIMT emulator's.
template <typename Launch>
at::Tensor power_iteration_launch(const Launch& launch_kernel, at::TensorList weights,
                                  at::TensorList us, at::TensorList vs, int64_t n_iterations) {
  check_power_iteration_args(weights, us, vs, n_iterations);
  const int64_t L = int64_t(weights.size());
  if (L == 0) return at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  const auto device_guard = launch_kernel.guard(weights[0].device());
  std::vector<at::Tensor> dense(weights.begin(), weights.end());
  for (auto& W : dense) W = W.contiguous();
  std::vector<int64_t> meta(5 * L);
  for (int64_t l = 0; l < L; ++l) {
    meta[5 * l] = reinterpret_cast<int64_t>(dense[l].data_ptr());
    meta[5 * l + 1] = reinterpret_cast<int64_t>(us[l].data_ptr());
    meta[5 * l + 2] = reinterpret_cast<int64_t>(vs[l].data_ptr());
    meta[5 * l + 3] = dense[l].size(0);
    meta[5 * l + 4] = dense[l].size(1);
  }
  // The table travels with the launch's stream; `dense` keeps the copies alive until then
  // (the caching allocator only reuses their memory for work queued later on the stream).
  const auto device_meta =
      at::from_blob(meta.data(), {5 * L}, at::TensorOptions().dtype(at::kLong))
          .to(weights[0].device(), /*non_blocking=*/false);
  auto sigmas = at::empty({L}, weights[0].options());
  AT_DISPATCH_FLOATING_TYPES(weights[0].scalar_type(), "power_iteration_cuda", [&] {
    launch_kernel(dim3(unsigned(L)), dim3(kThreads), 0, power_iteration_kernel<scalar_t>,
                  device_meta.data_ptr<int64_t>(), n_iterations, sigmas.data_ptr<scalar_t>());
  });
  return sigmas;
}

}  // namespace power

using power::power_iteration_launch;

}  // namespace impflow
