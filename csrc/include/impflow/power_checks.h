// Argument checks of impflow::power_iteration, shared by every backend.
#pragma once

#include <ATen/ATen.h>

#include "impflow/overlap_checks.h"

namespace impflow {

inline void check_power_iteration_args(at::TensorList weights, at::TensorList us,
                                       at::TensorList vs, int64_t n_iterations) {
  TORCH_CHECK(us.size() == weights.size() && vs.size() == weights.size(),
              "power_iteration: weights, us and vs must have the same length, got ",
              weights.size(), ", ", us.size(), " and ", vs.size());
  TORCH_CHECK(n_iterations >= 0, "power_iteration: n_iterations must be >= 0, got ", n_iterations);
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto& W = weights[l];
    TORCH_CHECK(W.dim() == 2, "power_iteration: weights[", l, "] must be a matrix, got shape ",
                W.sizes());
    TORCH_CHECK(W.scalar_type() == at::kFloat || W.scalar_type() == at::kDouble,
                "power_iteration: weights must be float32 or float64, got ", W.scalar_type());
    TORCH_CHECK(W.scalar_type() == weights[0].scalar_type() && W.device() == weights[0].device(),
                "power_iteration: every weight must have the dtype and device of weights[0]");
    TORCH_CHECK(us[l].dim() == 1 && us[l].size(0) == W.size(0),
                "power_iteration: us[", l, "] must have shape (", W.size(0), "), got ",
                us[l].sizes());
    TORCH_CHECK(vs[l].dim() == 1 && vs[l].size(0) == W.size(1),
                "power_iteration: vs[", l, "] must have shape (", W.size(1), "), got ",
                vs[l].sizes());
    for (const auto* t : {&us[l], &vs[l]}) {
      TORCH_CHECK(t->scalar_type() == W.scalar_type() && t->device() == W.device(),
                  "power_iteration: us[", l, "] and vs[", l, "] must have the dtype and device of "
                  "weights[", l, "]");
      // Updated in place: a hidden copy would lose the update.
      TORCH_CHECK(t->is_contiguous(), "power_iteration: us and vs must be contiguous");
    }
    TORCH_CHECK(!shares_memory(us[l], vs[l]) && !shares_memory(us[l], W) &&
                    !shares_memory(vs[l], W),
                "power_iteration: us[", l, "] and vs[", l, "] are written in place and must not "
                "share memory with each other or with weights[", l, "] (pass copies, e.g. "
                ".clone())");
  }
}

}  // namespace impflow
