// The block's dynamic shared memory (the launch's third parameter) as `unsigned char name[]`.
// A macro, so that the SIMT emulator of the C++ tests (csrc/tests/simt_emulator.h) can hand
// the kernels its own buffer.
#pragma once

#ifndef IMPFLOW_DYNAMIC_SHARED_MEMORY
#define IMPFLOW_DYNAMIC_SHARED_MEMORY(name) extern __shared__ unsigned char name[]
#endif
