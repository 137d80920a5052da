// CPU kernel of impflow::power_iteration: one task per matrix, all its steps in one go while
// the matrix stays in cache: v <- normalize(W^T u), u <- normalize(W v), then sigma = u^T W v.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "impflow/cpu_dispatch.h"
#include "impflow/power_checks.h"
#include "impflow/power_math.h"

namespace impflow {
namespace {

// W: (rows, cols) row-major; u: rows; v: cols; work: rows + cols values. Returns sigma.
template <typename scalar_t>
IMPFLOW_INLINE scalar_t iterate_one(const scalar_t* __restrict__ W, scalar_t* __restrict__ u,
                                    scalar_t* __restrict__ v, int64_t rows, int64_t cols,
                                    int64_t n_iterations, scalar_t* __restrict__ work) {
  scalar_t* __restrict__ wu = work;         // W^T u, then v
  scalar_t* __restrict__ wv = work + cols;  // W v, then u
  for (int64_t it = 0; it < n_iterations; ++it) {
    for (int64_t j = 0; j < cols; ++j) wu[j] = scalar_t(0);
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t ui = u[i];
      const scalar_t* __restrict__ row = W + i * cols;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) wu[j] += ui * row[j];
    }
    scalar_t sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < cols; ++j) sq += wu[j] * wu[j];
    const scalar_t inv_v = inverse_norm(sq);
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) v[j] = wu[j] * inv_v;
    sq = 0;
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t* __restrict__ row = W + i * cols;
      scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < cols; ++j) dot += row[j] * v[j];
      wv[i] = dot;
      sq += dot * dot;
    }
    const scalar_t inv_u = inverse_norm(sq);
#pragma omp simd
    for (int64_t i = 0; i < rows; ++i) u[i] = wv[i] * inv_u;
  }
  scalar_t sigma = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* __restrict__ row = W + i * cols;
    scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < cols; ++j) dot += row[j] * v[j];
    sigma += u[i] * dot;
  }
  return sigma;
}

// Non-template entry points: GCC clones these per instruction set.
IMPFLOW_CPU_CLONES float iterate_one_f32(const float* W, float* u, float* v, int64_t rows,
                                         int64_t cols, int64_t n, float* work) {
  return iterate_one<float>(W, u, v, rows, cols, n, work);
}

IMPFLOW_CPU_CLONES double iterate_one_f64(const double* W, double* u, double* v, int64_t rows,
                                          int64_t cols, int64_t n, double* work) {
  return iterate_one<double>(W, u, v, rows, cols, n, work);
}

float iterate_any(const float* W, float* u, float* v, int64_t r, int64_t c, int64_t n, float* w) {
  return iterate_one_f32(W, u, v, r, c, n, w);
}

double iterate_any(const double* W, double* u, double* v, int64_t r, int64_t c, int64_t n,
                   double* w) {
  return iterate_one_f64(W, u, v, r, c, n, w);
}

at::Tensor power_iteration_cpu(at::TensorList weights, at::TensorList us, at::TensorList vs,
                               int64_t n_iterations) {
  check_power_iteration_args(weights, us, vs, n_iterations);
  const int64_t L = int64_t(weights.size());
  const auto dtype = L ? weights[0].scalar_type() : at::kFloat;
  auto sigmas = at::empty({L}, at::TensorOptions().dtype(dtype));
  if (L == 0) return sigmas;
  std::vector<at::Tensor> dense(weights.begin(), weights.end());
  for (auto& W : dense) W = W.contiguous();
  AT_DISPATCH_FLOATING_TYPES(dtype, "power_iteration_cpu", [&] {
    scalar_t* out = sigmas.data_ptr<scalar_t>();
    // One matrix per task: its steps are sequential, the matrices independent.
    at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> work;
      for (int64_t l = begin; l < end; ++l) {
        const int64_t rows = dense[l].size(0), cols = dense[l].size(1);
        work.resize(rows + cols);
        out[l] = iterate_any(dense[l].data_ptr<scalar_t>(), us[l].data_ptr<scalar_t>(),
                             vs[l].data_ptr<scalar_t>(), rows, cols, n_iterations, work.data());
      }
    });
  });
  return sigmas;
}

}  // namespace

TORCH_LIBRARY_IMPL(impflow, CPU, m) { m.impl("power_iteration", &power_iteration_cpu); }

}  // namespace impflow
