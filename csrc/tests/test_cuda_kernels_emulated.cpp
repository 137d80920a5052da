// The CUDA ops' launch code and kernels, compiled for the CPU and run on the SIMT emulator
// (simt_emulator.h) against the same naive oracles as the CPU kernels: on a machine without a
// GPU this checks their logic (indices, passes, barriers, shared-memory sizes, the choice and
// arithmetic of the launches). It says nothing about the GPU itself: code generation, races
// within a phase, speed. `pytest -m cuda` on a GPU remains the test of the CUDA build.
//
// Each op runs with every kernel variant forced (the one-block step with 32, 128 and 256
// threads per sample, the split step; the bookkeeping with each group size), each on U, V or
// the bookkeeping buffers placed inside guard zones that must come back untouched.
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
    int64_t span = 1;
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

}  // namespace

int main() {
  at::manual_seed(0);
  run_step_cases();
  run_history_limit();
  run_track_cases();
  return impflow_test::finish();
}
