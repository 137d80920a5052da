// The Broyden-step cases shared by the C++ tests of the CPU kernel (test_broyden_step.cpp)
// and of the CUDA kernels' source on the SIMT emulator (test_cuda_kernels_emulated.cpp).
//
// The oracle is deliberately naive and independent of broyden_math.h: it builds each sample's
// H = -I + sum_i u_i v_i^T as a dense d x d matrix in double and applies the definition of the
// update with plain loops, so a shared algebra slip in the kernels cannot hide here.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "check.h"

namespace impflow_test {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();


// Bitwise-style equality that also accepts NaN == NaN (unused slots hold NaN sentinels).
inline bool same(double a, double b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

struct Expected {
  std::vector<double> U, V, step;
};

// The definition, per sample: H dense, v_new = H^T dz, u_new = (dz - H dF) / (v_new . dF),
// slot <- (u_new, v_new) or zeros when the denominator is unusable, step = -H_new F; a step
// of NaNs when F is not finite (broyden_step_reference's rule for NaN and Inf).
inline Expected naive_broyden_step(const std::vector<double>& U, const std::vector<double>& V,
                            const std::vector<double>& dz, const std::vector<double>& dF,
                            const std::vector<double>& F, const std::vector<bool>& active,
                            int64_t B, int64_t m, int64_t d, int64_t slot, int64_t n_valid,
                            double tiny) {
  Expected out{U, V, std::vector<double>(B * d, 0.0)};
  for (int64_t b = 0; b < B; ++b) {
    if (!active[b]) continue;
    // Row i, element j of sample b's history X (U or V).
    auto row = [&](const std::vector<double>& X, int64_t i, int64_t j) {
      return X[(b * m + i) * d + j];
    };
    // H over the old valid slots.
    std::vector<double> H(d * d, 0.0);
    for (int64_t j = 0; j < d; ++j) H[j * d + j] = -1.0;
    for (int64_t i = 0; i < n_valid; ++i)
      for (int64_t j = 0; j < d; ++j)
        for (int64_t k = 0; k < d; ++k) H[j * d + k] += row(U, i, j) * row(V, i, k);
    std::vector<double> v_new(d, 0.0), H_dF(d, 0.0), u_new(d, 0.0);
    for (int64_t j = 0; j < d; ++j)
      for (int64_t k = 0; k < d; ++k) {
        v_new[j] += H[k * d + j] * dz[b * d + k];  // (H^T dz)_j
        H_dF[j] += H[j * d + k] * dF[b * d + k];
      }
    double denom = 0.0, vF = 0.0;
    for (int64_t j = 0; j < d; ++j) {
      denom += v_new[j] * dF[b * d + j];
      vF += v_new[j] * F[b * d + j];
    }
    const bool valid = std::isfinite(denom) && std::isfinite(vF) && std::abs(denom) > tiny;
    for (int64_t j = 0; j < d; ++j) {
      u_new[j] = valid ? (dz[b * d + j] - H_dF[j]) / denom : 0.0;
      if (!valid) v_new[j] = 0.0;
      out.U[(b * m + slot) * d + j] = u_new[j];
      out.V[(b * m + slot) * d + j] = v_new[j];
    }
    // H_new over the slots valid after the update (the slot now holds the new pair).
    const int64_t n_after = std::max(n_valid, slot + 1);
    std::vector<double> Hn(d * d, 0.0);
    for (int64_t j = 0; j < d; ++j) Hn[j * d + j] = -1.0;
    for (int64_t i = 0; i < n_after; ++i)
      for (int64_t j = 0; j < d; ++j)
        for (int64_t k = 0; k < d; ++k) Hn[j * d + k] += row(out.U, i, j) * row(out.V, i, k);
    for (int64_t j = 0; j < d; ++j)
      for (int64_t k = 0; k < d; ++k) out.step[b * d + j] -= Hn[j * d + k] * F[b * d + k];
    // Spelled out rather than left to the dense product, which gives +-Inf for some elements
    // of a step from an infinite F: such a residual has no step, not even in part.
    bool F_finite = true;
    for (int64_t j = 0; j < d; ++j) F_finite = F_finite && std::isfinite(F[b * d + j]);
    if (!F_finite)
      for (int64_t j = 0; j < d; ++j) out.step[b * d + j] = std::numeric_limits<double>::quiet_NaN();
  }
  return out;
}

struct Case {
  int64_t B, m, d, n_valid, slot;
  std::string mask;  // "all", "none" or "alternate"
  bool zero_dz;      // dz = 0: the denominator vanishes and the update is dropped
  bool batch_minor = false;  // U, V stored as (m, d, B): the solver's CPU layout for d <= 4
  // `poison_value` in element d / 2 of samples 0 and 1 of one input: "F", "dz", "dF", "U" or
  // "V" (a kept history row), "U_slot" or "V_slot" (the row being overwritten); "" for none.
  // Kept rows take NaN only: for an Inf there, the dense H of the oracle mixes Inf of both
  // signs into NaN where the definition's sum over pairs has a single infinite term.
  std::string poison = "";
  double poison_value = 0.0;
};

inline std::string name_of(const Case& c, at::ScalarType dtype) {
  char buf[160];
  char poison[48] = "";
  if (!c.poison.empty())
    std::snprintf(poison, sizeof poison, " %s=%g", c.poison.c_str(), c.poison_value);
  std::snprintf(buf, sizeof buf, "%s B=%ld m=%ld d=%ld n_valid=%ld slot=%ld mask=%s%s%s%s",
                c10::toString(dtype), long(c.B), long(c.m), long(c.d), long(c.n_valid),
                long(c.slot), c.mask.c_str(), c.zero_dz ? " dz=0" : "",
                c.batch_minor ? " batch-minor" : "", poison);
  return buf;
}

// The corners of the definition every kernel must get right (small sizes).
inline std::vector<Case> basic_cases() {
  return {
      {1, 1, 1, 0, 0, "all", false},        // smallest everything, empty history
      {1, 1, 1, 1, 0, "all", false},        // m = 1: the only slot is replaced every step
      {3, 4, 1, 2, 2, "all", false},        // d = 1
      {4, 5, 7, 0, 0, "all", false},        // n_valid = 0: H = -I
      {4, 5, 7, 3, 3, "alternate", false},  // ring filling, masked samples
      {5, 6, 9, 6, 3, "all", false},        // full ring, slot in the middle
      {5, 6, 9, 6, 0, "alternate", false},  // full ring, first slot
      {5, 6, 9, 6, 5, "all", false},        // full ring, last slot
      {3, 4, 6, 4, 2, "none", false},       // every sample inactive
      {0, 3, 5, 0, 0, "all", false},        // empty batch
      {3, 5, 6, 5, 2, "alternate", true},   // dz = 0, full ring: slot zeroed, step w/o slot
      {3, 5, 6, 2, 2, "all", true},         // dz = 0 while filling
      {2, 1, 3, 1, 0, "all", true},         // dz = 0, m = 1: step = F
      // NaN and Inf (see broyden_math.h). F not finite: update dropped, a step of NaNs, also
      // with an empty history (it gave F there) and for d = 1 ... 4 (the unrolled kernel).
      {3, 4, 2, 0, 0, "all", false, false, "F", kNaN},
      {3, 4, 1, 2, 2, "alternate", false, false, "F", kInf},
      {3, 4, 3, 4, 1, "all", false, false, "F", -kInf},
      {3, 4, 4, 4, 3, "all", false, false, "F", kNaN},
      {3, 4, 9, 4, 0, "all", false, false, "F", kInf},
      // dz or dF not finite: update dropped, the step from the other rows.
      {3, 4, 9, 4, 1, "all", false, false, "dz", kInf},
      {3, 4, 2, 3, 3, "alternate", false, false, "dz", kNaN},
      {3, 4, 9, 0, 0, "all", false, false, "dF", kNaN},
      {3, 4, 3, 4, 2, "all", false, false, "dF", -kInf},
      // A kept history row with a NaN: update dropped; a NaN in u_i at element d / 2 of the
      // step, in v_i everywhere.
      {3, 4, 9, 4, 1, "all", false, false, "U", kNaN},
      {3, 4, 2, 3, 3, "all", false, false, "V", kNaN},
      // The row being overwritten, not finite: in v_new (update dropped), not in the step.
      {3, 4, 9, 4, 1, "all", false, false, "U_slot", kInf},
      {3, 4, 2, 4, 0, "alternate", false, false, "V_slot", kNaN},
      {3, 4, 4, 4, 2, "all", false, false, "U_slot", kNaN},
      // Batch-minor histories (the kernels of d <= 4 on CPU).
      {37, 4, 1, 0, 0, "all", false, true, "F", kNaN},
      {37, 4, 2, 4, 1, "alternate", false, true, "F", kInf},
      {37, 4, 3, 4, 2, "all", false, true, "U_slot", -kInf},
      {37, 4, 4, 4, 3, "all", false, true, "V_slot", kNaN},
      {37, 4, 2, 4, 0, "all", false, true, "U", kNaN},
      {37, 4, 3, 3, 3, "alternate", false, true, "dz", kInf},
  };
}

// The op under test: impflow::broyden_step, or the CUDA launch code on the SIMT emulator.
using StepOp = std::function<at::Tensor(at::Tensor& U, at::Tensor& V, const at::Tensor& dz,
                                        const at::Tensor& dF, const at::Tensor& F,
                                        const at::Tensor& active, int64_t slot, int64_t n_valid)>;

inline void run_case(const Case& c, at::ScalarType dtype, const StepOp& op,
                     const std::string& label = "") {
  const std::string name = label + name_of(c, dtype);
  const auto opts = at::TensorOptions().dtype(dtype);
  // Near-identity-Jacobian data (H ~ -I, dF ~ -dz) keeps v_new . dF ~ |dz|^2, well away from 0,
  // so the float32 comparison measures rounding, not conditioning. The pairs shrink with m:
  // 30 pairs of scale 0.3 bring some H near 0 among thousands of samples.
  const double scale = 0.3 / std::sqrt(double(c.d * std::max<int64_t>(c.m, 1)));
  auto history = [&] {
    auto X = (scale * at::randn({c.B, c.m, c.d}, at::kDouble)).to(dtype);
    return c.batch_minor ? X.permute({1, 2, 0}).contiguous().permute({2, 0, 1}) : X;
  };
  auto U = history(), V = history();
  // Slots outside the valid history (and the slot about to be filled) must never be read.
  for (int64_t i = c.n_valid; i < c.m; ++i) {
    U.select(1, i).fill_(std::numeric_limits<double>::quiet_NaN());
    V.select(1, i).fill_(std::numeric_limits<double>::quiet_NaN());
  }
  auto dz = c.zero_dz ? at::zeros({c.B, c.d}, opts) : at::randn({c.B, c.d}, opts);
  auto dF = (-dz + 0.1 * at::randn({c.B, c.d}, opts)).contiguous();
  auto F = at::randn({c.B, c.d}, opts);
  if (!c.poison.empty()) {
    // Element d / 2 of samples 0 and 1; a kept row is row 0, or 1 when slot 0 is overwritten.
    const int64_t j = c.d / 2, kept = c.slot == 0 ? 1 : 0;
    const bool slot_row = c.poison == "U_slot" || c.poison == "V_slot";
    const bool history = c.poison[0] == 'U' || c.poison[0] == 'V';
    TORCH_CHECK(!history || (slot_row ? c.slot < c.n_valid : kept < c.n_valid),
                "case ", name, ": the poisoned history row must be one that is read");
    at::Tensor target = c.poison == "F" ? F : c.poison == "dz" ? dz : c.poison == "dF" ? dF
                        : c.poison[0] == 'U' ? U : V;
    if (target.dim() == 3) target = target.select(1, slot_row ? c.slot : kept);
    for (int64_t b = 0; b < std::min<int64_t>(c.B, 2); ++b) target[b][j] = c.poison_value;
  }
  std::vector<bool> act(c.B);
  for (int64_t b = 0; b < c.B; ++b)
    act[b] = c.mask == "all" || (c.mask == "alternate" && b % 2 == 0);
  auto active = at::empty({c.B}, at::kBool);
  for (int64_t b = 0; b < c.B; ++b) active.data_ptr<bool>()[b] = act[b];

  const double tiny = dtype == at::kFloat ? double(std::numeric_limits<float>::min())
                                          : std::numeric_limits<double>::min();
  const auto want = naive_broyden_step(values(U), values(V), values(dz), values(dF), values(F),
                                       act, c.B, c.m, c.d, c.slot, c.n_valid, tiny);
  const auto U0 = values(U), V0 = values(V);
  at::Tensor step;
  try {
    step = op(U, V, dz, dF, F, active, c.slot, c.n_valid);
  } catch (const c10::Error& e) {
    return report(false, name, std::string("threw: ") + e.what_without_backtrace());
  } catch (const std::exception& e) {  // e.g. a rule of the SIMT emulator broken
    return report(false, name, std::string("threw: ") + e.what());
  }
  if (step.sizes() != F.sizes() || step.scalar_type() != dtype)
    return report(false, name, "step has the wrong shape or dtype");

  const double tol = dtype == at::kFloat ? 2e-5 : 1e-12;
  const auto gotU = values(U), gotV = values(V), gotS = values(step);
  std::string why;
  auto close = [&](double got, double exp) {
    return same(got, exp) || std::abs(got - exp) <= tol * (1.0 + std::abs(exp));
  };
  for (int64_t b = 0; b < c.B && why.empty(); ++b) {
    for (int64_t i = 0; i < c.m && why.empty(); ++i) {
      for (int64_t j = 0; j < c.d; ++j) {
        const int64_t at_ = (b * c.m + i) * c.d + j;
        // Only an active sample's slot changes; everything else must be bit-identical.
        const bool written = act[b] && i == c.slot;
        const bool okU = written ? close(gotU[at_], want.U[at_]) : same(gotU[at_], U0[at_]);
        const bool okV = written ? close(gotV[at_], want.V[at_]) : same(gotV[at_], V0[at_]);
        if (!okU || !okV) {
          why = "U/V mismatch at b=" + std::to_string(b) + " i=" + std::to_string(i) +
                " j=" + std::to_string(j) + ": got (" + std::to_string(gotU[at_]) + ", " +
                std::to_string(gotV[at_]) + ") want (" + std::to_string(want.U[at_]) + ", " +
                std::to_string(want.V[at_]) + ")";
          break;
        }
      }
    }
    for (int64_t j = 0; j < c.d && why.empty(); ++j) {
      const double got = gotS[b * c.d + j], exp = want.step[b * c.d + j];
      const bool ok = act[b] ? close(got, exp) : got == 0.0;  // inactive: exactly zero
      if (!ok)
        why = "step mismatch at b=" + std::to_string(b) + " j=" + std::to_string(j) + ": got " +
              std::to_string(got) + " want " + std::to_string(exp);
    }
  }
  if (why.empty() && c.zero_dz) {
    // Spelled out: a dropped update writes zeros and steps with H minus the overwritten slot.
    for (int64_t b = 0; b < c.B && why.empty(); ++b) {
      if (!act[b]) continue;
      for (int64_t j = 0; j < c.d; ++j)
        if (gotU[(b * c.m + c.slot) * c.d + j] != 0.0 || gotV[(b * c.m + c.slot) * c.d + j] != 0.0)
          why = "dropped update did not zero the slot";
    }
  }
  report(why.empty(), name, why);
}

}  // namespace impflow_test
