// What an op writes in place must not share memory with another tensor it writes or reads:
// the kernels would read values they had already overwritten, and return silent garbage
// (broyden_step(U, U, ...) did).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <utility>

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

// For ops that take lists of tensors (many comparisons): the bytes from a tensor's first
// element to one past its last, all of them for a strided tensor, with the argument's name
// for messages (`list`[`index`]), its position among the op's arguments (`order`), which
// breaks ties between equal spans and orders the names of a message, and whether the op
// writes it.
struct MemorySpan {
  uintptr_t begin, end;
  const char* list;
  int64_t index;
  int64_t order;
  bool written;
  bool operator<(const MemorySpan& other) const {
    return begin != other.begin ? begin < other.begin : order < other.order;
  }
  bool overlaps(const MemorySpan& other) const { return begin < other.end && other.begin < end; }
};

// Empty for a tensor without elements (it has no bytes to share).
inline std::optional<MemorySpan> memory_span(const at::Tensor& t, const char* list,
                                             int64_t index, int64_t order, bool written) {
  if (t.numel() == 0) return std::nullopt;
  int64_t last = 0;  // strides are never negative
  for (int64_t k = 0; k < t.dim(); ++k) last += (t.size(k) - 1) * t.stride(k);
  // const_data_ptr: only the address is wanted (data_ptr would copy a copy-on-write tensor).
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return MemorySpan{begin, begin + uintptr_t(last + 1) * t.element_size(),
                    list, index, order, written};
}

// Throws, naming the overlap of a written span that comes first in argument order (by the
// later argument of the pair, then the earlier), so that the message does not depend on the
// addresses. For the error path, once a faster test has found an overlap: all pairs.
[[noreturn]] inline void refuse_shared_memory(const char* op,
                                              c10::ArrayRef<MemorySpan> spans) {
  const MemorySpan *first = nullptr, *second = nullptr;
  for (size_t a = 0; a < spans.size(); ++a) {
    for (size_t b = a + 1; b < spans.size(); ++b) {
      const MemorySpan *p = &spans[a], *q = &spans[b];
      if (!(p->written || q->written) || !p->overlaps(*q)) continue;
      if (p->order > q->order) std::swap(p, q);
      if (!second || q->order < second->order ||
          (q->order == second->order && p->order < first->order)) {
        first = p, second = q;
      }
    }
  }
  TORCH_INTERNAL_ASSERT(second, op, ": no overlap to report");
  if (!second->written) std::swap(first, second);  // the message's subject is written
  TORCH_CHECK(false, op, ": ", second->list, "[", second->index,
              "] is written in place and must not share memory with ", first->list, "[",
              first->index, "] (pass copies, e.g. .clone())");
}

}  // namespace impflow
