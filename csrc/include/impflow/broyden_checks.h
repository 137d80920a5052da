// Argument checks of impflow::broyden_step, shared by every backend so that the CPU and CUDA
// kernels reject the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include "impflow/overlap_checks.h"

namespace impflow {

// A (B, m, d) history stored as a contiguous (m, d, B) tensor: the batch is the fastest
// dimension, so a kernel can put samples side by side in vector lanes (used for small d).
inline bool is_batch_minor(const at::Tensor& t) {
  if (t.dim() != 3) return false;
  const int64_t B = t.size(0), d = t.size(2);
  return t.stride(0) == 1 && t.stride(2) == B && t.stride(1) == B * d;
}

inline void check_broyden_step_args(const at::Tensor& U, const at::Tensor& V, const at::Tensor& dz,
                                    const at::Tensor& dF, const at::Tensor& F,
                                    const at::Tensor& active, int64_t slot, int64_t n_valid) {
  TORCH_CHECK(U.dim() == 3, "broyden_step: U must have shape (B, m, d), got ", U.sizes());
  const int64_t B = U.size(0), m = U.size(1), d = U.size(2);
  TORCH_CHECK(V.sizes() == U.sizes(), "broyden_step: V must have the shape of U ", U.sizes(),
              ", got ", V.sizes());
  TORCH_CHECK(m >= 1, "broyden_step: the history size m (U.size(1)) must be at least 1");
  for (const auto* t : {&dz, &dF, &F}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == d,
                "broyden_step: dz, dF and F must have shape (B, d) = (", B, ", ", d, "), got ",
                t->sizes());
  }
  TORCH_CHECK(active.dim() == 1 && active.size(0) == B && active.scalar_type() == at::kBool,
              "broyden_step: active must be a bool tensor of shape (", B, "), got ",
              active.scalar_type(), " ", active.sizes());
  TORCH_CHECK(U.scalar_type() == at::kFloat || U.scalar_type() == at::kDouble,
              "broyden_step: U must be float32 or float64, got ", U.scalar_type());
  for (const auto* t : {&V, &dz, &dF, &F}) {
    TORCH_CHECK(t->scalar_type() == U.scalar_type(), "broyden_step: V, dz, dF and F must have "
                "the dtype of U (", U.scalar_type(), "), got ", t->scalar_type());
  }
  const std::pair<const at::Tensor*, const char*> others[] = {
      {&V, "V"}, {&dz, "dz"}, {&dF, "dF"}, {&F, "F"}, {&active, "active"}};
  for (const auto& [t, name] : others) {
    TORCH_CHECK(t->device() == U.device(), "broyden_step: ", name, " must be on U's device (",
                U.device(), "), got ", t->device());
  }
  // U and V are written in place, so a hidden copy would silently lose the update.
  TORCH_CHECK(U.strides() == V.strides() && (U.is_contiguous() || is_batch_minor(U)),
              "broyden_step: U and V are updated in place and must both be contiguous or both "
              "batch-minor (a (B, m, d) view of a contiguous (m, d, B) tensor), got strides ",
              U.strides(), " and ", V.strides());
  check_no_shared_memory("broyden_step", U, "U", V, "V");
  const std::pair<const at::Tensor*, const char*> read[] = {{&dz, "dz"}, {&dF, "dF"}, {&F, "F"}};
  for (const auto& [t, name] : read) {
    check_no_shared_memory("broyden_step", U, "U", *t, name);
    check_no_shared_memory("broyden_step", V, "V", *t, name);
  }
  TORCH_CHECK(n_valid >= 0 && n_valid <= m, "broyden_step: n_valid must be in [0, m] = [0, ", m,
              "], got ", n_valid);
  TORCH_CHECK(slot >= 0 && slot < m, "broyden_step: slot must be in [0, m) = [0, ", m, "), got ",
              slot);
  // The ring buffer fills slots in order: slot n_valid while filling, any slot once full.
  TORCH_CHECK(slot == n_valid || n_valid == m, "broyden_step: slot must equal n_valid (", n_valid,
              ") until the history is full (m = ", m, "), got ", slot);
}

}  // namespace impflow
