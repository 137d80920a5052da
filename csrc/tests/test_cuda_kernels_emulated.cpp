// The CUDA ops' launch code and kernels, compiled for the CPU and run on the SIMT emulator
// (simt_emulator.h): on a machine without a GPU this checks their logic (indices, passes,
// barriers, shared-memory sizes, the choice and arithmetic of the launches). It says nothing
// about the GPU itself: code generation, races within a phase, speed. `pytest -m cuda` on a
// GPU remains the test of the CUDA build.
//
// The solver's ops (broyden_step, solver_track) are checked against the naive oracles of the
// CPU tests, with every kernel variant forced (the one-block step with 32, 128 and 256 threads
// per sample, the split step; the bookkeeping with each group size), their in-place buffers
// inside guard zones that must come back untouched. power_iteration and mlp_vjp_series (with
// its backward) are checked against the CPU ops, which pytest checks against the references.
// The last line printed is "N passed, N failed"; the exit status is non-zero on any failure.
#include "simt_emulator.h"  // first: it defines the CUDA keywords for the kernel headers

#include <ATen/ATen.h>
#include <c10/core/Device.h>

#include <cstdio>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "broyden_step_cases.h"
#include "broyden_step_launch.cuh"
#include "check.h"
#include "impflow/mlp_vjp_series_steps.h"
#include "impflow/ops.h"
#include "mlp_vjp_series_kernels.cuh"
#include "power_iteration_kernels.cuh"
#include "solver_track_cases.h"
#include "solver_track_kernels.cuh"

namespace {

using impflow_test::Case;
using impflow_test::report;

// The launcher the ops take (see csrc/cuda/cuda_launch.cuh), on the emulator.
struct EmulatedLaunch {
  int guard(c10::Device) const { return 0; }  // one CPU "device"

  template <typename... Params, typename... Args>
  void operator()(dim3 grid, dim3 block, size_t shared_bytes, void (*kernel)(Params...),
                  Args&&... args) const {
    simt::run(grid, block, shared_bytes, [&] { kernel(args...); });
  }
};

// A tensor's storage inside guard zones of kGuard elements on either side, filled with a
// sentinel; `view` has the sizes and strides of the original and holds its values.
struct Guarded {
  static constexpr int64_t kGuard = 64;
  at::Tensor storage, view, sentinel;

  explicit Guarded(const at::Tensor& t) {
    int64_t span = t.numel() == 0 ? 0 : 1;  // elements from the first to the last, inclusive
    if (span)
      for (int64_t i = 0; i < t.dim(); ++i) span += (t.size(i) - 1) * t.stride(i);
    sentinel = at::full({kGuard}, 77, t.options());
    storage = at::cat({sentinel, at::full({span}, 77, t.options()), sentinel});
    view = storage.as_strided(t.sizes(), t.strides(), kGuard);
    view.copy_(t);
  }

  bool intact() const {
    const int64_t n = storage.numel();
    return at::equal(storage.narrow(0, 0, kGuard), sentinel) &&
           at::equal(storage.narrow(0, n - kGuard, kGuard), sentinel);
  }
};

impflow_test::StepOp emulated_step(impflow::StepKernel kernel) {
  return [kernel](at::Tensor& U, at::Tensor& V, const at::Tensor& dz, const at::Tensor& dF,
                  const at::Tensor& F, const at::Tensor& active, int64_t slot,
                  int64_t n_valid) {
    Guarded gU(U), gV(V);
    auto step = impflow::broyden_step_launch(EmulatedLaunch{}, gU.view, gV.view, dz, dF, F,
                                             active, slot, n_valid, kernel);
    TORCH_CHECK(gU.intact() && gV.intact(), "a write outside the histories U, V");
    U.copy_(gU.view);
    V.copy_(gV.view);
    return step;
  };
}

impflow_test::TrackOp emulated_track(int group) {
  return [group](const at::Tensor& z, const at::Tensor& F, at::Tensor& best_z,
                 at::Tensor& best_F, at::Tensor& best, at::Tensor& status, at::Tensor& nstep,
                 double tol, double floor_scale, double divergence_ratio, bool relative) {
    Guarded g_z(best_z), g_F(best_F), g_best(best), g_status(status), g_nstep(nstep);
    auto out = impflow::solver_track_launch(EmulatedLaunch{}, z, F, g_z.view, g_F.view,
                                            g_best.view, g_status.view, g_nstep.view, tol,
                                            floor_scale, divergence_ratio, relative, group);
    for (const Guarded* g : {&g_z, &g_F, &g_best, &g_status, &g_nstep})
      TORCH_CHECK(g->intact(), "a write outside the bookkeeping buffers");
    best_z.copy_(g_z.view), best_F.copy_(g_F.view), best.copy_(g_best.view);
    status.copy_(g_status.view), nstep.copy_(g_nstep.view);
    return out;
  };
}

void run_step_cases() {
  std::vector<Case> cases = impflow_test::basic_cases();
  cases.insert(cases.end(), {
      // Sizes around the CUDA shapes: a warp's width and one more; more than 128 and 1024
      // elements (several passes of a group); 700 and 1100: two and three chunks of 512 for
      // the split kernels, the last one partial; 17 samples: three blocks of 8 groups of 32.
      {17, 3, 33, 3, 1, "alternate", false},
      {3, 4, 130, 4, 2, "all", false},
      {2, 3, 700, 3, 0, "alternate", false},
      {2, 2, 1100, 2, 1, "all", false},
      // Batch-minor histories, as the CPU solver allocates them for d <= 4.
      {17, 5, 3, 5, 4, "alternate", false, true},
      {9, 5, 2, 3, 3, "all", false, true},
  });
  const std::pair<impflow::StepKernel, const char*> kernels[] = {
      {impflow::StepKernel::kGroup32, "emulated CUDA step, 32 per sample: "},
      {impflow::StepKernel::kGroup128, "emulated CUDA step, 128 per sample: "},
      {impflow::StepKernel::kGroup256, "emulated CUDA step, 256 per sample: "},
      {impflow::StepKernel::kSplit, "emulated CUDA step, split: "},
  };
  for (const auto& [kernel, label] : kernels) {
    const auto op = emulated_step(kernel);
    for (auto dtype : {at::kFloat, at::kDouble}) {
      for (const auto& c : cases) impflow_test::run_case(c, dtype, op, label);
      // The longest history the kernels hold (see max_history_slots), full: the shared memory
      // it needs is the most a launch asks for, and its guard bytes must stay untouched.
      const int64_t m = impflow::max_history_slots(dtype);
      impflow_test::run_case({2, m, 5, m, m / 3, "all", false}, dtype, op, label);
    }
  }
  // The default choice of kernel (by d), as the registered CUDA op makes it.
  const auto op = emulated_step(impflow::StepKernel::kAuto);
  for (int64_t d : {1, 64, 65, 1024, 1025})
    impflow_test::run_case({3, 3, d, 3, 1, "alternate", false}, at::kFloat, op,
                           "emulated CUDA step, default kernel: ");
}

void run_history_limit() {
  // One slot more than the kernels hold is refused before any launch, whatever n_valid.
  for (auto dtype : {at::kFloat, at::kDouble}) {
    const int64_t m = impflow::max_history_slots(dtype) + 1;
    auto U = at::zeros({2, m, 3}, dtype), V = at::zeros({2, m, 3}, dtype);
    auto v = at::randn({2, 3}, dtype);
    auto active = at::ones({2}, at::kBool);
    const std::string name = std::string("emulated CUDA step refuses m = ") + std::to_string(m) +
                             " in " + c10::toString(dtype);
    try {
      impflow::broyden_step_launch(EmulatedLaunch{}, U, V, v, v, v, active, 0, 0,
                                   impflow::StepKernel::kAuto);
      report(false, name, "did not throw");
    } catch (const c10::Error& e) {
      const std::string what = e.what_without_backtrace();
      report(what.find("history slots") != std::string::npos, name, what);
    }
  }
}

void run_track_cases() {
  uint64_t seed = 1000;
  for (int group : {32, 128, 256}) {
    const auto op = emulated_track(group);
    const std::string label = "emulated CUDA track, " + std::to_string(group) + " per sample: ";
    for (auto dtype : {at::kFloat, at::kDouble})
      for (int64_t B : {1, 7, 41})
        for (int64_t n : {1, 2, 9, 33, 130, 1100})
          for (bool relative : {false, true})
            impflow_test::run_case(B, n, relative, dtype, ++seed, op, label);
  }
  // The default group size, and B over 256: the mask-and-counts kernel's second block.
  const auto op = emulated_track(0);
  for (int64_t B : {300, 600})
    for (bool relative : {false, true})
      impflow_test::run_case(B, 3, relative, at::kDouble, ++seed, op,
                             "emulated CUDA track, default group: ");
}

// ||got - want|| / ||want|| in double (0 when both vanish).
double rel_error(const at::Tensor& got, const at::Tensor& want) {
  const auto g = got.to(at::kDouble), w = want.to(at::kDouble);
  const double scale = w.norm().item<double>();
  const double err = (g - w).norm().item<double>();
  return scale == 0 ? err : err / scale;
}

void expect_close(const std::string& name, const std::vector<at::Tensor>& got,
                  const std::vector<at::Tensor>& want, double tol) {
  std::string why;
  for (size_t i = 0; i < got.size() && why.empty(); ++i) {
    const double err = rel_error(got[i], want[i]);
    if (!(err <= tol))
      why = "output " + std::to_string(i) + ": relative error " + std::to_string(err);
  }
  report(why.empty(), name, why);
}

double tol_for(at::ScalarType dtype) { return dtype == at::kFloat ? 2e-5 : 1e-12; }

void run_power_iteration_cases() {
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 1}, {3, 5}, {64, 33},
                                                           {300, 7}, {7, 300}, {257, 1}};
  for (auto dtype : {at::kFloat, at::kDouble}) {
    for (int64_t n_iterations : {0, 1, 7}) {
      std::vector<at::Tensor> weights, us, vs;
      for (const auto& [rows, cols] : shapes) {
        weights.push_back(at::randn({rows, cols}, dtype));
        us.push_back(at::randn({rows}, dtype).div_(std::sqrt(double(rows))));
        vs.push_back(at::randn({cols}, dtype).div_(std::sqrt(double(cols))));
      }
      weights.push_back(at::randn({9, 12}, dtype).t());  // a transposed (strided) weight
      us.push_back(at::randn({12}, dtype));
      vs.push_back(at::randn({9}, dtype));
      std::vector<at::Tensor> us_cpu, vs_cpu;
      std::vector<Guarded> us_emu, vs_emu;
      for (size_t l = 0; l < weights.size(); ++l) {
        us_cpu.push_back(us[l].clone()), vs_cpu.push_back(vs[l].clone());
        us_emu.emplace_back(us[l]), vs_emu.emplace_back(vs[l]);
      }
      std::vector<at::Tensor> us_views, vs_views;
      for (size_t l = 0; l < weights.size(); ++l)
        us_views.push_back(us_emu[l].view), vs_views.push_back(vs_emu[l].view);
      const std::string name = std::string("emulated CUDA power_iteration: ") +
                               c10::toString(dtype) + " n_iterations=" +
                               std::to_string(n_iterations);
      try {
        const auto want = impflow::power_iteration(weights, us_cpu, vs_cpu, n_iterations);
        const auto got =
            impflow::power_iteration_launch(EmulatedLaunch{}, weights, us_views, vs_views,
                                            n_iterations);
        bool intact = true;
        for (size_t l = 0; l < weights.size(); ++l)
          intact = intact && us_emu[l].intact() && vs_emu[l].intact();
        if (!intact) {
          report(false, name, "a write outside u or v");
          continue;
        }
        std::vector<at::Tensor> g{got}, w{want};
        for (size_t l = 0; l < weights.size(); ++l) {
          g.push_back(us_views[l]), w.push_back(us_cpu[l]);
          g.push_back(vs_views[l]), w.push_back(vs_cpu[l]);
        }
        expect_close(name, g, w, 10 * tol_for(dtype));
      } catch (const std::exception& e) {
        report(false, name, std::string("threw: ") + e.what());
      }
    }
  }
}

using EmulatedSeriesKernels = impflow::vjp_series::DeviceKernels<EmulatedLaunch>;

// An MLP's weights and activation derivatives for mlp_vjp_series, of per-sample size d.
struct SeriesCase {
  int64_t B, d, hidden, layers, n_terms;
};

void run_vjp_series_case(const SeriesCase& c, at::ScalarType dtype) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "emulated CUDA mlp_vjp_series: %s B=%ld d=%ld hidden=%ld "
                "layers=%ld n_terms=%ld", c10::toString(dtype), long(c.B), long(c.d),
                long(c.hidden), long(c.layers), long(c.n_terms));
  const std::string name = buf;
  std::vector<at::Tensor> weights, act_derivs;
  for (int64_t i = 0; i < c.layers; ++i) {
    const int64_t in = i == 0 ? c.d : c.hidden, out = i == c.layers - 1 ? c.d : c.hidden;
    weights.push_back(at::randn({out, in}, dtype).div_(std::sqrt(double(in))));
    if (i < c.layers - 1) act_derivs.push_back(at::rand({c.B, out}, dtype));
  }
  const auto v = at::randn({c.B, c.d}, dtype);
  const auto coeffs = at::randn({c.n_terms}, dtype);
  try {
    const auto [p_cpu, t_cpu, s_cpu] =
        impflow::mlp_vjp_series(weights, act_derivs, v, coeffs, c.n_terms);
    const auto [p_emu, t_emu, s_emu] = impflow::mlp_vjp_series_forward<EmulatedSeriesKernels>(
        weights, act_derivs, v, coeffs, c.n_terms);
    expect_close(name + " forward", {p_emu, t_emu, s_emu}, {p_cpu, t_cpu, s_cpu},
                 10 * tol_for(dtype));
    const auto g_products = at::randn_like(p_cpu), g_traces = at::randn_like(t_cpu);
    const auto g_series = at::randn_like(s_cpu);
    const auto [gw_cpu, gd_cpu, gv_cpu] = impflow::mlp_vjp_series_backward(
        g_products, g_traces, g_series, weights, act_derivs, v, coeffs, p_cpu);
    const auto [gw_emu, gd_emu, gv_emu] =
        impflow::mlp_vjp_series_backward<EmulatedSeriesKernels>(
            g_products, g_traces, g_series, weights, act_derivs, v, coeffs, p_cpu);
    std::vector<at::Tensor> got(gw_emu), want(gw_cpu);
    got.insert(got.end(), gd_emu.begin(), gd_emu.end());
    want.insert(want.end(), gd_cpu.begin(), gd_cpu.end());
    got.push_back(gv_emu), want.push_back(gv_cpu);
    expect_close(name + " backward", got, want, 10 * tol_for(dtype));
  } catch (const std::exception& e) {
    report(false, name, std::string("threw: ") + e.what());
  }
}

void run_vjp_series_cases() {
  // d = 2 with many terms takes the explicit-Jacobian schedule, d = 40 the stepwise one; a
  // single layer has no activation; 70 samples make several warps' worth of trace terms.
  const std::vector<SeriesCase> cases = {
      {1, 1, 3, 2, 1}, {7, 2, 16, 2, 8}, {5, 40, 24, 3, 3}, {70, 3, 8, 1, 4}, {33, 17, 9, 2, 2}};
  for (auto dtype : {at::kFloat, at::kDouble})
    for (const auto& c : cases) run_vjp_series_case(c, dtype);
}

}  // namespace

int main() {
  at::manual_seed(0);
  run_step_cases();
  run_history_limit();
  run_track_cases();
  run_power_iteration_cases();
  run_vjp_series_cases();
  return impflow_test::finish();
}
