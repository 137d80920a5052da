// How the CUDA ops launch their kernels: on the current stream, checked. The launch code of
// each op takes the launcher as a parameter, so that the C++ tests run the same code with the
// SIMT emulator's launcher on a machine without a GPU (csrc/tests/simt_emulator.h).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <utility>

namespace impflow {

struct CudaLaunch {
  // Makes `device` current for the op's allocations and launches (after its checks).
  c10::cuda::CUDAGuard guard(c10::Device device) const { return c10::cuda::CUDAGuard(device); }

  template <typename... Params, typename... Args>
  void operator()(dim3 grid, dim3 block, size_t shared_bytes, void (*kernel)(Params...),
                  Args&&... args) const {
    kernel<<<grid, block, shared_bytes, at::cuda::getCurrentCUDAStream()>>>(
        std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace impflow
