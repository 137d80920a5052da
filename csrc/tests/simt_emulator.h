// A SIMT emulator that runs the source of impflow's CUDA kernels on the CPU, for the C++ tests
// of a machine without a GPU. Include it before any kernel header.
//
// Each CUDA thread of a block is a fiber (ucontext) on the calling OS thread. A fiber runs until
// it reaches __syncthreads() or a warp shuffle, or returns; the scheduler then releases a warp
// whose 32 lanes all wait at a shuffle (computing every lane's result at once), or the block
// when all its threads wait at __syncthreads(). Between those points the threads run one after
// another in a shuffled order. Blocks run one after another, so `static` stands for
// __shared__, and atomics are plain read-modify-writes.
//
// It checks what the GPU would not report:
//   * __syncthreads() reached by some threads after others returned (the kernels promise that
//     an early return skips no barrier), or mixed with a shuffle: "divergent barrier";
//   * a shuffle with a full mask while lanes of the warp returned, or with different offsets;
//   * writes past the launch's dynamic shared memory (guard bytes after it);
//   * reads of dynamic shared memory never written: it starts as NaN bytes (0xFF), which the
//     results would carry;
//   * a missing barrier, most of the time: the shuffled order runs a reader before its writer.
//     (Removing any one of the step's and the bookkeeping's six barriers fails cases.)
// It proves no absence of data races, and sees nothing of timing or code generation: it checks
// the kernels' logic (indices, passes, barriers, launch arithmetic), not the GPU.
#pragma once

#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define IMPFLOW_DYNAMIC_SHARED_MEMORY(name) unsigned char* name = simt::dynamic_shared_memory()

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The built-in variables, set by the scheduler before it resumes a fiber.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace simt {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kGuardBytes = 256;
constexpr unsigned char kGuard = 0xA5;

// Thrown by run() when a kernel breaks one of the rules above.
struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Wait { kRunnable, kBarrier, kShuffle, kReturned, kFailed };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  Wait wait = Wait::kRunnable;
  int shuffle_offset = 0;
  size_t shuffle_bytes = 0;
  unsigned char shuffle_in[16], shuffle_out[16];
};

struct Launch {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  std::function<void()> kernel;
  std::vector<unsigned char> shared;  // dynamic shared memory, then the guard bytes
  size_t shared_bytes = 0;
  std::string error;  // set by a fiber that broke a rule (exceptions cannot leave a fiber)
};

inline Launch* g_launch = nullptr;

inline unsigned char* dynamic_shared_memory() { return g_launch->shared.data(); }

inline void yield_to_scheduler() {
  Fiber& f = g_launch->fibers[g_launch->current];
  swapcontext(&f.context, &g_launch->scheduler);
}

// Inside a fiber: records the broken rule and never comes back (the scheduler throws it).
inline void fail_in_fiber(const std::string& why) {
  g_launch->error = why;
  g_launch->fibers[g_launch->current].wait = Wait::kFailed;
  yield_to_scheduler();
}

inline void fiber_entry() {
  g_launch->kernel();
  g_launch->fibers[g_launch->current].wait = Wait::kReturned;
  // Returning resumes uc_link: the scheduler.
}

// Releases the lanes of warp w if all wait at a shuffle; throws on a broken rule.
inline bool release_warp(Launch& L, int w) {
  Fiber* lanes = &L.fibers[size_t(w) * kWarp];
  int shuffling = 0, returned = 0;
  for (int l = 0; l < kWarp; ++l) {
    shuffling += lanes[l].wait == Wait::kShuffle;
    returned += lanes[l].wait == Wait::kReturned;
  }
  if (shuffling == 0) return false;
  if (returned > 0)
    throw KernelError("a full-mask shuffle in warp " + std::to_string(w) + " while " +
                      std::to_string(returned) + " of its lanes have returned");
  if (shuffling < kWarp) return false;  // the others are still running or at a barrier
  for (int l = 0; l < kWarp; ++l) {
    if (lanes[l].shuffle_offset != lanes[0].shuffle_offset ||
        lanes[l].shuffle_bytes != lanes[0].shuffle_bytes)
      throw KernelError("lanes of warp " + std::to_string(w) + " shuffle different values");
    const int src = l + lanes[0].shuffle_offset;  // shfl_down: out of range keeps its own
    std::memcpy(lanes[l].shuffle_out, lanes[src < kWarp ? src : l].shuffle_in,
                lanes[0].shuffle_bytes);
  }
  for (int l = 0; l < kWarp; ++l) lanes[l].wait = Wait::kRunnable;
  return true;
}

// Runs one block. Between two synchronisations the threads run one after another in an order
// shuffled anew each time (seeded by the block), so that a kernel relying on an order the GPU
// does not promise, e.g. a missing barrier, meets different ones.
inline void run_block(Launch& L, uint64_t seed) {
  const int n = int(L.fibers.size());
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 random_order(seed);
  for (int t = 0; t < n; ++t) {
    Fiber& f = L.fibers[t];
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &L.scheduler;
    makecontext(&f.context, fiber_entry, 0);
    f.wait = Wait::kRunnable;
  }
  for (;;) {
    std::shuffle(order.begin(), order.end(), random_order);
    for (int t : order) {
      while (L.fibers[t].wait == Wait::kRunnable) {
        L.current = t;
        threadIdx = dim3(unsigned(t), 0, 0);
        swapcontext(&L.scheduler, &L.fibers[t].context);
        if (!L.error.empty()) throw KernelError(L.error);
      }
    }
    bool released = false;
    for (int w = 0; w < n / kWarp; ++w) released |= release_warp(L, w);
    if (released) continue;
    int at_barrier = 0, returned = 0;
    for (const Fiber& f : L.fibers) {
      at_barrier += f.wait == Wait::kBarrier;
      returned += f.wait == Wait::kReturned;
    }
    if (returned == n) return;
    if (at_barrier + returned < n)
      throw KernelError("divergent barrier: threads wait at a shuffle and at __syncthreads()");
    if (returned > 0)
      throw KernelError("divergent barrier: " + std::to_string(returned) +
                        " threads returned before a __syncthreads() that " +
                        std::to_string(at_barrier) + " others reach");
    for (Fiber& f : L.fibers) f.wait = Wait::kRunnable;
  }
}

// Runs `kernel` (a call of the kernel function with its arguments) on every thread of a
// grid x block launch with `shared_bytes` of dynamic shared memory, as <<<grid, block,
// shared_bytes>>> would. One-dimensional blocks of whole warps.
inline void run(dim3 grid, dim3 block, size_t shared_bytes, std::function<void()> kernel) {
  if (block.y != 1 || block.z != 1 || block.x % kWarp != 0 || block.x == 0)
    throw KernelError("the emulator runs one-dimensional blocks of whole warps");
  if (g_launch != nullptr) throw KernelError("a kernel launched from a kernel");
  Launch L;
  L.kernel = std::move(kernel);
  L.fibers.resize(block.x);
  for (Fiber& f : L.fibers) f.stack.reset(new char[kStackBytes]);
  L.shared_bytes = shared_bytes;
  L.shared.resize(shared_bytes + kGuardBytes);
  gridDim = grid;
  blockDim = block;
  g_launch = &L;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          std::memset(L.shared.data(), 0xFF, shared_bytes);
          std::memset(L.shared.data() + shared_bytes, kGuard, kGuardBytes);
          run_block(L, (uint64_t(z) * grid.y + y) * grid.x + x);
          for (size_t i = 0; i < kGuardBytes; ++i)
            if (L.shared[shared_bytes + i] != kGuard)
              throw KernelError("a write past the " + std::to_string(shared_bytes) +
                                " bytes of dynamic shared memory");
        }
  } catch (...) {
    g_launch = nullptr;  // the fibers are abandoned: kernels hold no resources
    throw;
  }
  g_launch = nullptr;
}

}  // namespace simt

inline void __syncthreads() {
  simt::g_launch->fibers[simt::g_launch->current].wait = simt::Wait::kBarrier;
  simt::yield_to_scheduler();
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, int offset) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "shuffle of a small value");
  if (mask != 0xffffffffu) simt::fail_in_fiber("the emulator shuffles full warps only");
  simt::Fiber& f = simt::g_launch->fibers[simt::g_launch->current];
  std::memcpy(f.shuffle_in, &value, sizeof(T));
  f.shuffle_offset = offset;
  f.shuffle_bytes = sizeof(T);
  f.wait = simt::Wait::kShuffle;
  simt::yield_to_scheduler();
  T out;
  std::memcpy(&out, f.shuffle_out, sizeof(T));
  return out;
}

template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;  // one OS thread: nothing runs between the read and the write
  *address = old + value;
  return old;
}
