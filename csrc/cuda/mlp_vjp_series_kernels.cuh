// The CUDA kernels of impflow::mlp_vjp_series and its backward: the elementwise work of the
// schedule of mlp_vjp_series_steps.h fused into one kernel each: the trace terms and the series
// (a warp per sample), the product adjoints and the derivative adjoints (a thread per element).
// The GEMMs go through ATen (cuBLAS); the coefficients are read on the device, so a call queues
// its work without synchronising.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

#include "impflow/mlp_vjp_series_math.h"
#include "reductions.cuh"

namespace impflow {
namespace vjp_series {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return unsigned(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535));
}

// One warp per sample (grid-stride over samples): t = u[b] . v[b]; series[b] += c * t.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
trace_terms_kernel(const scalar_t* __restrict__ u, const scalar_t* __restrict__ v,
                   const scalar_t* __restrict__ coeff, scalar_t* __restrict__ traces,
                   scalar_t* __restrict__ series, int64_t B, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / kWarpSize);
  for (int64_t b = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / kWarpSize; b < B; b += warps) {
    acc_t t = partial_dot<acc_t>(u + b * d, v + b * d, lane, d, kWarpSize);
    t = warp_sum(t);
    if (lane == 0) {
      traces[b] = scalar_t(t);
      series[b] = scalar_t(acc_t(series[b]) + acc_t(*coeff) * t);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
product_adjoints_kernel(const scalar_t* __restrict__ grad_u,
                        const scalar_t* __restrict__ grad_traces,
                        const scalar_t* __restrict__ grad_series,
                        const scalar_t* __restrict__ coeff, const scalar_t* __restrict__ v,
                        const scalar_t* __restrict__ u, const scalar_t* __restrict__ carried,
                        scalar_t* __restrict__ u_bar, scalar_t* __restrict__ grad_v, int64_t n,
                        int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t c = acc_t(*coeff);
  for (int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x; j < n;
       j += int64_t(gridDim.x) * kThreads) {
    const int64_t b = j / d;
    const acc_t w = trace_adjoint<acc_t>(grad_traces[b], c, grad_series[b]);
    u_bar[j] = scalar_t(product_adjoint<acc_t>(grad_u[j], w, v[j], carried[j]));
    grad_v[j] = scalar_t(acc_t(grad_v[j]) + w * acc_t(u[j]));
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
derivative_adjoints_kernel(scalar_t* __restrict__ a_bar, const scalar_t* __restrict__ b,
                           const scalar_t* __restrict__ d, scalar_t* __restrict__ grad_d,
                           int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x; j < n;
       j += int64_t(gridDim.x) * kThreads) {
    derivative_adjoint<acc_t>(a_bar[j], b[j], d[j], grad_d[j]);
  }
}

// The elementwise steps of mlp_vjp_series_steps.h, launched by `Launch` (see cuda_launch.cuh):
// CudaLaunch in mlp_vjp_series_cuda.cu, the SIMT emulator's in the C++ tests.
template <typename Launch>
struct DeviceKernels {
  static void trace_terms(const at::Tensor& u, const at::Tensor& v, const at::Tensor& coeffs,
                          int64_t k, const at::Tensor& traces, const at::Tensor& series) {
    const int64_t B = u.size(0), d = u.size(1);
    AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "mlp_vjp_series_cuda", [&] {
      const scalar_t* coeff = coeffs.data_ptr<scalar_t>() + k;
      Launch{}(dim3(blocks_for(B * kWarpSize)), dim3(kThreads), 0, trace_terms_kernel<scalar_t>,
               u.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), coeff, traces.data_ptr<scalar_t>(),
               series.data_ptr<scalar_t>(), B, d);
    });
  }

  static void product_adjoints(const at::Tensor& grad_u, const at::Tensor& grad_traces,
                               const at::Tensor& grad_series, const at::Tensor& coeffs,
                               int64_t k, const at::Tensor& v, const at::Tensor& u,
                               const at::Tensor& carried, const at::Tensor& u_bar,
                               const at::Tensor& grad_v) {
    const int64_t n = u.numel(), d = u.size(1);
    AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "mlp_vjp_series_backward_cuda", [&] {
      const scalar_t* coeff = coeffs.data_ptr<scalar_t>() + k;
      Launch{}(dim3(blocks_for(n)), dim3(kThreads), 0, product_adjoints_kernel<scalar_t>,
               grad_u.data_ptr<scalar_t>(), grad_traces.data_ptr<scalar_t>(),
               grad_series.data_ptr<scalar_t>(), coeff, v.data_ptr<scalar_t>(),
               u.data_ptr<scalar_t>(), carried.data_ptr<scalar_t>(), u_bar.data_ptr<scalar_t>(),
               grad_v.data_ptr<scalar_t>(), n, d);
    });
  }

  static void derivative_adjoints(const at::Tensor& a_bar, const at::Tensor& b,
                                  const at::Tensor& d, const at::Tensor& grad_d) {
    const int64_t n = a_bar.numel();
    AT_DISPATCH_FLOATING_TYPES(a_bar.scalar_type(), "mlp_vjp_series_backward_cuda", [&] {
      Launch{}(dim3(blocks_for(n)), dim3(kThreads), 0, derivative_adjoints_kernel<scalar_t>,
               a_bar.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(),
               grad_d.data_ptr<scalar_t>(), n);
    });
  }
};

}  // namespace vjp_series
}  // namespace impflow
