// Warp-level reductions shared by the CUDA kernels.
#pragma once

namespace impflow {

constexpr int kWarpSize = 32;

// Sum over the 32 lanes of a full warp; lane 0 holds the result (the others partial sums).
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x += __shfl_down_sync(0xffffffffu, x, offset);
  }
  return x;
}

}  // namespace impflow
