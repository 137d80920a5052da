// CPU kernels of impflow::mlp_vjp_series and its backward: the schedule of
// mlp_vjp_series_steps.h (GEMMs through ATen's BLAS into preallocated buffers), with the
// elementwise work fused into one pass over the rows each, split between threads by rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "impflow/mlp_vjp_series_math.h"
#include "impflow/mlp_vjp_series_steps.h"

namespace impflow {
namespace {

// Rows per task: enough work per thread to pay for the fork.
int64_t row_grain(int64_t row_length) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_length));
}

// grad_d += a_bar * b; a_bar *= d over a range of elements.
template <typename scalar_t>
void derivative_adjoint_range(scalar_t* __restrict__ a_bar, const scalar_t* __restrict__ b,
                              const scalar_t* __restrict__ d, scalar_t* __restrict__ grad_d,
                              int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t j = begin; j < end; ++j) derivative_adjoint<acc_t>(a_bar[j], b[j], d[j], grad_d[j]);
}

struct CpuKernels {
  static void trace_terms(const at::Tensor& u, const at::Tensor& v, const at::Tensor& coeffs,
                          int64_t k, const at::Tensor& traces,
                          const at::Tensor& series) {
    const int64_t B = u.size(0), d = u.size(1);
    AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "mlp_vjp_series_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* pu = u.data_ptr<scalar_t>();
      const scalar_t* pv = v.data_ptr<scalar_t>();
      const acc_t c = acc_t(coeffs.data_ptr<scalar_t>()[k]);
      scalar_t* pt = traces.data_ptr<scalar_t>();
      scalar_t* ps = series.data_ptr<scalar_t>();
      at::parallel_for(0, B, row_grain(d), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const acc_t t = partial_dot<acc_t>(pu + b * d, pv + b * d, 0, d, 1);
          pt[b] = scalar_t(t);
          ps[b] = scalar_t(acc_t(ps[b]) + c * t);
        }
      });
    });
  }

  static void product_adjoints(const at::Tensor& grad_u, const at::Tensor& grad_traces,
                               const at::Tensor& grad_series, const at::Tensor& coeffs,
                               int64_t k, const at::Tensor& v, const at::Tensor& u,
                               const at::Tensor& carried, const at::Tensor& u_bar,
                               const at::Tensor& grad_v) {
    const int64_t B = u.size(0), d = u.size(1);
    AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "mlp_vjp_series_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gu = grad_u.data_ptr<scalar_t>();
      const scalar_t* gt = grad_traces.data_ptr<scalar_t>();
      const scalar_t* gs = grad_series.data_ptr<scalar_t>();
      const acc_t c = acc_t(coeffs.data_ptr<scalar_t>()[k]);
      const scalar_t* pv = v.data_ptr<scalar_t>();
      const scalar_t* pu = u.data_ptr<scalar_t>();
      const scalar_t* pc = carried.data_ptr<scalar_t>();
      scalar_t* ub = u_bar.data_ptr<scalar_t>();
      scalar_t* gv = grad_v.data_ptr<scalar_t>();
      at::parallel_for(0, B, row_grain(d), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const acc_t w = trace_adjoint<acc_t>(gt[b], c, gs[b]);
          for (int64_t j = b * d; j < (b + 1) * d; ++j) {
            ub[j] = scalar_t(product_adjoint<acc_t>(gu[j], w, pv[j], pc[j]));
            gv[j] = scalar_t(acc_t(gv[j]) + w * acc_t(pu[j]));
          }
        }
      });
    });
  }

  static void derivative_adjoints(const at::Tensor& a_bar, const at::Tensor& b,
                                  const at::Tensor& d, const at::Tensor& grad_d) {
    const int64_t n = a_bar.numel();
    AT_DISPATCH_FLOATING_TYPES(a_bar.scalar_type(), "mlp_vjp_series_backward_cpu", [&] {
      scalar_t* pa = a_bar.data_ptr<scalar_t>();
      const scalar_t* pb = b.data_ptr<scalar_t>();
      const scalar_t* pd = d.data_ptr<scalar_t>();
      scalar_t* pg = grad_d.data_ptr<scalar_t>();
      at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
        derivative_adjoint_range(pa, pb, pd, pg, begin, end);
      });
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_vjp_series_cpu(at::TensorList weights,
                                                                  at::TensorList act_derivs,
                                                                  const at::Tensor& v,
                                                                  const at::Tensor& coeffs,
                                                                  int64_t n_terms) {
  return mlp_vjp_series_forward<CpuKernels>(weights, act_derivs, v, coeffs, n_terms);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>
mlp_vjp_series_backward_cpu(const at::Tensor& grad_products, const at::Tensor& grad_traces,
                            const at::Tensor& grad_series, at::TensorList weights,
                            at::TensorList act_derivs, const at::Tensor& v,
                            const at::Tensor& coeffs, const at::Tensor& products) {
  return mlp_vjp_series_backward<CpuKernels>(grad_products, grad_traces, grad_series, weights,
                                             act_derivs, v, coeffs, products);
}

}  // namespace

TORCH_LIBRARY_IMPL(impflow, CPU, m) {
  m.impl("mlp_vjp_series", &mlp_vjp_series_cpu);
  m.impl("mlp_vjp_series_backward", &mlp_vjp_series_backward_cpu);
}

}  // namespace impflow
