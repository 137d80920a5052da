// CPU kernel of impflow::broyden_step: one task per sample, two passes over its history.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "impflow/broyden_checks.h"
#include "impflow/broyden_math.h"

namespace impflow {
namespace {

template <typename scalar_t>
void broyden_step_sample(scalar_t* U, scalar_t* V, const scalar_t* dz, const scalar_t* dF,
                         const scalar_t* F, scalar_t* step, int64_t d, int n_valid, int slot,
                         std::vector<at::opmath_type<scalar_t>>& dots,
                         std::vector<at::opmath_type<scalar_t>>& rows) {
  using acc_t = at::opmath_type<scalar_t>;
  // Pass 1: the dots a_i = dz.u_i, b_i = v_i.dF, c_i = v_i.F, then dz.dF and dz.F.
  for (int i = 0; i < n_valid; ++i) {
    const scalar_t* u = U + i * d;
    const scalar_t* v = V + i * d;
    acc_t a = 0, b = 0, c = 0;
    for (int64_t j = 0; j < d; ++j) {
      a += acc_t(dz[j]) * acc_t(u[j]);
      b += acc_t(v[j]) * acc_t(dF[j]);
      c += acc_t(v[j]) * acc_t(F[j]);
    }
    dots[3 * i] = a;
    dots[3 * i + 1] = b;
    dots[3 * i + 2] = c;
  }
  acc_t dz_dF = 0, dz_F = 0;
  for (int64_t j = 0; j < d; ++j) {
    dz_dF += acc_t(dz[j]) * acc_t(dF[j]);
    dz_F += acc_t(dz[j]) * acc_t(F[j]);
  }
  dots[3 * n_valid] = dz_dF;
  dots[3 * n_valid + 1] = dz_F;
  const auto k = broyden_coefficients<acc_t>(dots.data(), n_valid);

  // Pass 2: row sums, slot by slot so that the inner loop runs along contiguous memory.
  acc_t* sum_u_b = rows.data();
  acc_t* sum_v_a = sum_u_b + d;
  acc_t* sum_u_c = sum_v_a + d;
  std::fill(rows.begin(), rows.begin() + 3 * d, acc_t(0));
  for (int i = 0; i < n_valid; ++i) {
    const scalar_t* u = U + i * d;
    const scalar_t* v = V + i * d;
    const acc_t a = dots[3 * i], b = dots[3 * i + 1];
    const acc_t c = (i == slot) ? acc_t(0) : dots[3 * i + 2];  // the overwritten slot drops out
    for (int64_t j = 0; j < d; ++j) {
      sum_u_b[j] += acc_t(u[j]) * b;
      sum_v_a[j] += acc_t(v[j]) * a;
      sum_u_c[j] += acc_t(u[j]) * c;
    }
  }
  scalar_t* u_slot = U + int64_t(slot) * d;
  scalar_t* v_slot = V + int64_t(slot) * d;
  for (int64_t j = 0; j < d; ++j) {
    acc_t u_new, v_new, s;
    broyden_element<acc_t>(dz[j], dF[j], F[j], sum_u_b[j], sum_v_a[j], sum_u_c[j], k, &u_new,
                           &v_new, &s);
    u_slot[j] = scalar_t(u_new);
    v_slot[j] = scalar_t(v_new);
    step[j] = scalar_t(s);
  }
}

at::Tensor broyden_step_cpu(at::Tensor& U, at::Tensor& V, const at::Tensor& dz_in,
                            const at::Tensor& dF_in, const at::Tensor& F_in,
                            const at::Tensor& active_in, int64_t slot, int64_t n_valid) {
  check_broyden_step_args(U, V, dz_in, dF_in, F_in, active_in, slot, n_valid);
  const auto dz = dz_in.contiguous(), dF = dF_in.contiguous(), F = F_in.contiguous();
  const auto active = active_in.contiguous();
  const int64_t B = U.size(0), m = U.size(1), d = U.size(2);
  auto step = at::zeros_like(F);  // inactive samples take no step
  if (B == 0 || d == 0) return step;
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "broyden_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* U_ptr = U.data_ptr<scalar_t>();
    scalar_t* V_ptr = V.data_ptr<scalar_t>();
    const scalar_t* dz_ptr = dz.data_ptr<scalar_t>();
    const scalar_t* dF_ptr = dF.data_ptr<scalar_t>();
    const scalar_t* F_ptr = F.data_ptr<scalar_t>();
    const bool* active_ptr = active.data_ptr<bool>();
    scalar_t* step_ptr = step.data_ptr<scalar_t>();
    // Small samples are cheap: group them so that a task amortises the scheduling.
    const int64_t grain = std::max<int64_t>(1, 16384 / ((2 * m + 4) * d));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> dots(broyden_dots_size(int(n_valid)));
      std::vector<acc_t> rows(3 * d);
      for (int64_t b = begin; b < end; ++b) {
        if (!active_ptr[b]) continue;
        broyden_step_sample<scalar_t>(U_ptr + b * m * d, V_ptr + b * m * d, dz_ptr + b * d,
                                      dF_ptr + b * d, F_ptr + b * d, step_ptr + b * d, d,
                                      int(n_valid), int(slot), dots, rows);
      }
    });
  });
  return step;
}

}  // namespace

TORCH_LIBRARY_IMPL(impflow, CPU, m) { m.impl("broyden_step", &broyden_step_cpu); }

}  // namespace impflow
