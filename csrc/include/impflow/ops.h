// C++ entry points of the impflow ops (LibTorch users and the C++ tests). Each call goes
// through the dispatcher, so it reaches the kernel of the inputs' device.
#pragma once

#include <ATen/ATen.h>

namespace impflow {

// One fused good-Broyden update per active sample; see DESIGN.md §3 and broyden_math.h.
// U, V: (B, m, d) histories, updated in place at `slot`; dz, dF, F: (B, d); active: (B,) bool.
// Returns the next step -H F, shape (B, d); zero for inactive samples.
at::Tensor broyden_step(at::Tensor& U, at::Tensor& V, const at::Tensor& dz, const at::Tensor& dF,
                        const at::Tensor& F, const at::Tensor& active, int64_t slot,
                        int64_t n_valid);

// True when this build carries CUDA kernels.
bool compiled_with_cuda();

}  // namespace impflow
