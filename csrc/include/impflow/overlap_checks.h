// What an op writes in place must not share memory with another tensor it writes or reads:
// the kernels would read values they had already overwritten, and return silent garbage
// (broyden_step(U, U, ...) did).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

namespace impflow {

// TooHard (strides the test cannot decide) counts as not shared, as in torch's own checks.
inline bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  // Different buffers, the usual case, in one comparison.
  if (!a.has_storage() || !b.has_storage() || !a.storage().is_alias_of(b.storage())) return false;
  const auto status = at::get_overlap_status(a, b);
  return status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
}

inline void check_no_shared_memory(const char* op, const at::Tensor& written,
                                   const char* written_name, const at::Tensor& other,
                                   const char* other_name) {
  TORCH_CHECK(!shares_memory(written, other), op, ": ", written_name,
              " is written in place and must not share memory with ", other_name,
              " (pass a copy, e.g. .clone())");
}

}  // namespace impflow
