// Argument checks of impflow::solver_track, shared by every backend.
#pragma once

#include <ATen/ATen.h>

#include "impflow/overlap_checks.h"
#include "impflow/track_math.h"

namespace impflow {

inline void check_solver_track_args(const at::Tensor& z, const at::Tensor& F,
                                    const at::Tensor& best_z, const at::Tensor& best_F,
                                    const at::Tensor& best, const at::Tensor& status,
                                    const at::Tensor& nstep) {
  TORCH_CHECK(z.dim() == 2, "solver_track: z must have shape (B, n), got ", z.sizes());
  const int64_t B = z.size(0);
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "solver_track: z must be float32 or float64, got ", z.scalar_type());
  for (const auto* t : {&F, &best_z, &best_F}) {
    TORCH_CHECK(t->sizes() == z.sizes() && t->scalar_type() == z.scalar_type(),
                "solver_track: F, best_z and best_F must have z's shape ", z.sizes(),
                " and dtype ", z.scalar_type(), ", got ", t->sizes(), " ", t->scalar_type());
  }
  TORCH_CHECK(best.dim() == 2 && best.size(0) == kBestRows && best.size(1) == B &&
                  best.scalar_type() == at::kDouble,
              "solver_track: best must be a float64 tensor of shape (", int(kBestRows), ", ", B,
              "), got ",
              best.scalar_type(), " ", best.sizes());
  TORCH_CHECK(status.dim() == 1 && status.size(0) == B && status.scalar_type() == at::kByte,
              "solver_track: status must be a uint8 tensor of shape (", B, "), got ",
              status.scalar_type(), " ", status.sizes());
  TORCH_CHECK(nstep.dim() == 1 && nstep.size(0) == B && nstep.scalar_type() == at::kLong,
              "solver_track: nstep must be an int64 tensor of shape (", B, "), got ",
              nstep.scalar_type(), " ", nstep.sizes());
  const std::pair<const at::Tensor*, const char*> others[] = {
      {&F, "F"}, {&best_z, "best_z"}, {&best_F, "best_F"}, {&best, "best"}, {&status, "status"},
      {&nstep, "nstep"}};
  for (const auto& [t, name] : others) {
    TORCH_CHECK(t->device() == z.device(), "solver_track: ", name, " must be on z's device (",
                z.device(), "), got ", t->device());
  }
  // The state tensors are updated in place: a hidden copy would lose the update.
  for (const auto* t : {&best_z, &best_F, &best, &status, &nstep}) {
    TORCH_CHECK(t->is_contiguous(),
                "solver_track: best_z, best_F, best, status and nstep must be contiguous");
  }
  const std::pair<const at::Tensor*, const char*> state[] = {
      {&best_z, "best_z"}, {&best_F, "best_F"}, {&best, "best"}, {&status, "status"},
      {&nstep, "nstep"}};
  for (size_t i = 0; i < 5; ++i) {
    const auto& [written, name] = state[i];
    check_no_shared_memory("solver_track", *written, name, z, "z");
    check_no_shared_memory("solver_track", *written, name, F, "F");
    for (size_t j = i + 1; j < 5; ++j) {
      check_no_shared_memory("solver_track", *written, name, *state[j].first, state[j].second);
    }
  }
}

}  // namespace impflow
