// Argument checks of impflow::power_iteration, shared by every backend.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>

#include <algorithm>

#include "impflow/overlap_checks.h"

namespace impflow {

// The vectors are written in place while every layer runs at once (one task or one block per
// layer), so no u or v may share memory with another u or v, of its own layer or of any
// other, nor with any weight: power_iteration([W0, W1], [u, u], [v, v], n) raced.
// Sorted by address, the written spans must follow one another without overlap (one pass),
// and each weight is compared with the one span that may reach into it (a binary search):
// O(L log L) for the long lists of deep networks. A strided weight counts with all the bytes
// from its first element to its last.
inline void check_power_iteration_written_apart(at::TensorList weights, at::TensorList us,
                                                at::TensorList vs) {
  const int64_t L = int64_t(weights.size());
  c10::SmallVector<MemorySpan, 16> spans;  // the written ones, then the weights
  for (int64_t l = 0; l < L; ++l) {
    if (const auto s = memory_span(us[l], "us", l, l, true)) spans.push_back(*s);
    if (const auto s = memory_span(vs[l], "vs", l, L + l, true)) spans.push_back(*s);
  }
  std::sort(spans.begin(), spans.end());
  bool apart = true;
  for (size_t k = 1; k < spans.size(); ++k) apart = apart && spans[k].begin >= spans[k - 1].end;
  for (int64_t l = 0; l < L && apart; ++l) {
    const auto w = memory_span(weights[l], "weights", l, 2 * L + l, false);
    if (!w) continue;
    // The written spans are disjoint and sorted, their ends too: of those ending after w
    // begins, the first starts before any other, so it overlaps w if any does.
    const auto s = std::partition_point(spans.begin(), spans.end(),
                                        [&](const MemorySpan& x) { return x.end <= w->begin; });
    apart = s == spans.end() || s->begin >= w->end;
  }
  if (apart) return;
  for (int64_t l = 0; l < L; ++l) {
    if (const auto w = memory_span(weights[l], "weights", l, 2 * L + l, false)) spans.push_back(*w);
  }
  refuse_shared_memory("power_iteration", spans);
}

inline void check_power_iteration_args(at::TensorList weights, at::TensorList us,
                                       at::TensorList vs, int64_t n_iterations) {
  TORCH_CHECK(us.size() == weights.size() && vs.size() == weights.size(),
              "power_iteration: weights, us and vs must have the same length, got ",
              weights.size(), ", ", us.size(), " and ", vs.size());
  TORCH_CHECK(n_iterations >= 0, "power_iteration: n_iterations must be >= 0, got ", n_iterations);
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto& W = weights[l];
    const auto device = weights[0].device();
    TORCH_CHECK(W.device() == device, "power_iteration: weights[", l,
                "] must be on weights[0]'s device (", device, "), got ", W.device());
    TORCH_CHECK(W.dim() == 2, "power_iteration: weights[", l, "] must be a matrix, got shape ",
                W.sizes());
    TORCH_CHECK(W.scalar_type() == at::kFloat || W.scalar_type() == at::kDouble,
                "power_iteration: weights must be float32 or float64, got ", W.scalar_type());
    TORCH_CHECK(W.scalar_type() == weights[0].scalar_type(), "power_iteration: weights[", l,
                "] must have the dtype of weights[0] (", weights[0].scalar_type(), "), got ",
                W.scalar_type());
    const std::pair<const at::Tensor*, const char*> vectors[] = {{&us[l], "us"}, {&vs[l], "vs"}};
    for (const auto& [t, name] : vectors) {
      TORCH_CHECK(t->device() == device, "power_iteration: ", name, "[", l,
                  "] must be on weights[0]'s device (", device, "), got ", t->device());
    }
    TORCH_CHECK(us[l].dim() == 1 && us[l].size(0) == W.size(0),
                "power_iteration: us[", l, "] must have shape (", W.size(0), "), got ",
                us[l].sizes());
    TORCH_CHECK(vs[l].dim() == 1 && vs[l].size(0) == W.size(1),
                "power_iteration: vs[", l, "] must have shape (", W.size(1), "), got ",
                vs[l].sizes());
    for (const auto& [t, name] : vectors) {
      TORCH_CHECK(t->scalar_type() == W.scalar_type(), "power_iteration: ", name, "[", l,
                  "] must have the dtype of weights[", l, "] (", W.scalar_type(), "), got ",
                  t->scalar_type());
      // Updated in place: a hidden copy would lose the update.
      TORCH_CHECK(t->is_contiguous(), "power_iteration: us and vs must be contiguous");
    }
  }
  check_power_iteration_written_apart(weights, us, vs);
}

}  // namespace impflow
