// C++ test of impflow::broyden_step on CPU (no test framework: nothing may be downloaded),
// against the naive oracle of broyden_step_cases.h.
// The last line printed is "N passed, N failed"; the exit status is non-zero on any failure.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <exception>
#include <functional>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "broyden_step_cases.h"
#include "check.h"
#include "impflow/ops.h"

namespace {

using impflow_test::Case;
using impflow_test::report;

// The op must reject bad arguments with c10::Error (TORCH_CHECK), not crash or write.
void expect_throw(const std::string& name, const std::function<void()>& call) {
  try {
    call();
  } catch (const c10::Error&) {
    return report(true, name);
  } catch (const std::exception& e) {
    return report(false, name, std::string("threw a non-c10 exception: ") + e.what());
  }
  report(false, name, "did not throw");
}

void run_argument_checks() {
  const int64_t B = 2, m = 3, d = 4;
  auto U = at::randn({B, m, d}, at::kFloat), V = at::randn({B, m, d}, at::kFloat);
  auto dz = at::randn({B, d}, at::kFloat), dF = at::randn({B, d}, at::kFloat);
  auto F = at::randn({B, d}, at::kFloat);
  auto active = at::ones({B}, at::kBool);
  expect_throw("V of the wrong shape", [&] {
    auto V_bad = at::randn({B, m + 1, d}, at::kFloat);
    impflow::broyden_step(U, V_bad, dz, dF, F, active, 0, 0);
  });
  expect_throw("slot = m", [&] { impflow::broyden_step(U, V, dz, dF, F, active, m, m); });
  expect_throw("slot < 0", [&] { impflow::broyden_step(U, V, dz, dF, F, active, -1, m); });
  expect_throw("slot != n_valid while filling",
               [&] { impflow::broyden_step(U, V, dz, dF, F, active, 2, 1); });
  expect_throw("non-contiguous U", [&] {
    auto U_nc = at::randn({B, d, m}, at::kFloat).transpose(1, 2);  // shape (B, m, d), strided
    impflow::broyden_step(U_nc, V, dz, dF, F, active, 0, 0);
  });
  expect_throw("float active", [&] {
    auto active_f = at::ones({B}, at::kFloat);
    impflow::broyden_step(U, V, dz, dF, F, active_f, 0, 0);
  });
  expect_throw("mixed dtypes", [&] {
    auto F_d = F.to(at::kDouble);
    impflow::broyden_step(U, V, dz, dF, F_d, active, 0, 0);
  });
}

// One step of the samples `rows` of a batch-minor problem, as a batch of their own, run on
// `threads` threads: (step, U, V).
std::vector<at::Tensor> step_of_rows(const std::vector<at::Tensor>& state, const at::Tensor& rows,
                                     int64_t slot, int64_t n_valid, int threads) {
  auto minor = [&](const at::Tensor& X) {  // (B, m, d) values -> batch-minor storage
    return X.index_select(0, rows).permute({1, 2, 0}).contiguous().permute({2, 0, 1});
  };
  auto U = minor(state[0]), V = minor(state[1]);
  std::vector<at::Tensor> v;
  for (int k = 2; k < 6; ++k) v.push_back(state[k].index_select(0, rows).contiguous());
  at::set_num_threads(threads);
  auto step = impflow::broyden_step(U, V, v[0], v[1], v[2], v[3], slot, n_valid);
  at::set_num_threads(2);
  return {step, U, V};
}

// A sample's step and new pair must not depend on the rest of its batch, on where it falls in
// a vector, or on the number of threads (bit for bit), with both kernels for d <= 4: this
// test also runs with IMPFLOW_DISABLE_AVX512=1 (CMakeLists.txt).
void run_batch_independence() {
  for (auto dtype : {at::kFloat, at::kDouble}) {
    for (int64_t d = 1; d <= 4; ++d) {
      const int64_t B = 9001, m = 5;
      for (int64_t n_valid : {int64_t(3), m}) {
        const int64_t slot = n_valid == m ? 2 : n_valid;
        std::vector<at::Tensor> state = {at::randn({B, m, d}, dtype) * 0.2,
                                         at::randn({B, m, d}, dtype) * 0.2,
                                         at::randn({B, d}, dtype), at::randn({B, d}, dtype),
                                         at::randn({B, d}, dtype), at::rand({B}) < 0.8};
        state[3] = (-state[2] + 0.3 * state[3]).contiguous();
        const auto all = at::arange(B);
        const auto whole = step_of_rows(state, all, slot, n_valid, 1);
        // Every other sample (a partial last vector), all but the first (every sample shifted
        // by one lane), and the whole batch cut between two threads at an odd sample.
        const std::vector<std::pair<std::string, at::Tensor>> subsets = {
            {"every other sample", at::arange(1, B, 2)}, {"all but the first", at::arange(1, B)}};
        char buf[96];
        std::snprintf(buf, sizeof buf, "%s d=%ld n_valid=%ld: ", c10::toString(dtype), long(d),
                      long(n_valid));
        for (const auto& [what, rows] : subsets) {
          const auto part = step_of_rows(state, rows, slot, n_valid, 1);
          bool same = true;
          for (int k = 0; k < 3; ++k) same = same && at::equal(part[k], whole[k].index_select(0, rows));
          report(same, std::string("batch independence ") + buf + what, "bits differ");
        }
        const auto two = step_of_rows(state, all, slot, n_valid, 2);
        bool same = true;
        for (int k = 0; k < 3; ++k) same = same && at::equal(two[k], whole[k]);
        report(same, std::string("batch independence ") + buf + "two threads", "bits differ");
      }
    }
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  std::vector<Case> cases = impflow_test::basic_cases();
  cases.insert(cases.end(), {
      {40, 8, 128, 8, 5, "alternate", false},  // several parallel_for chunks
      // Batch-minor histories, d <= 4 (the AVX-512 kernel where the CPU has it): B = 37 is two
      // full vector blocks and a partial one; 9001 and 3001 (full histories) are cut between
      // two threads inside a block.
      {1, 3, 1, 0, 0, "all", false, true},
      {37, 5, 1, 5, 2, "alternate", false, true},
      {37, 5, 2, 3, 3, "all", false, true},
      {37, 5, 3, 5, 0, "alternate", false, true},
      {37, 5, 4, 5, 4, "all", false, true},
      {9001, 30, 1, 30, 7, "alternate", false, true},
      {3001, 30, 4, 30, 29, "all", false, true},
      {37, 5, 2, 5, 1, "alternate", true, true},  // dz = 0: the dropped update
  });
  at::set_num_threads(2);
  const impflow_test::StepOp op = [](at::Tensor& U, at::Tensor& V, const at::Tensor& dz,
                                     const at::Tensor& dF, const at::Tensor& F,
                                     const at::Tensor& active, int64_t slot, int64_t n_valid) {
    return impflow::broyden_step(U, V, dz, dF, F, active, slot, n_valid);
  };
  for (auto dtype : {at::kFloat, at::kDouble})
    for (const auto& c : cases) impflow_test::run_case(c, dtype, op);
  run_argument_checks();
  run_batch_independence();
  return impflow_test::finish();
}
