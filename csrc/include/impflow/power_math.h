// Shared constants of impflow::power_iteration (CPU and CUDA kernels, and the Python layers).
#pragma once

#include "impflow/broyden_math.h"

namespace impflow {

// A vector is normalised as x / max(||x||, kNormalizeEps): a zero vector stays zero, as in
// impflow/nn/spectral.py's _normalize.
constexpr double kNormalizeEps = 1e-12;

template <typename acc_t>
IMPFLOW_HOST_DEVICE acc_t inverse_norm(acc_t squared_norm) {
  const acc_t norm = sqrt(squared_norm);
  return acc_t(1) / (norm > acc_t(kNormalizeEps) ? norm : acc_t(kNormalizeEps));
}

}  // namespace impflow
