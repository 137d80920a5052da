// The SIMT emulator's own test: it must run correct kernels to the right result and stop
// broken ones, or test_cuda_kernels_emulated could pass on a kernel it cannot see into.
// The last line printed is "N passed, N failed"; the exit status is non-zero on any failure.
#include "simt_emulator.h"

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace {

int g_passed = 0, g_failed = 0;

void report(bool ok, const std::string& name, const std::string& why = "") {
  (ok ? g_passed : g_failed)++;
  if (!ok) std::printf("FAIL %s: %s\n", name.c_str(), why.c_str());
}

template <typename T>
T warp_sum(T x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  return x;
}

// A correct grid-stride sum: shuffles, dynamic shared memory, a barrier, an atomic.
__global__ void sum_kernel(const double* in, double* out, int n) {
  IMPFLOW_DYNAMIC_SHARED_MEMORY(raw);
  double* partial = reinterpret_cast<double*>(raw);
  double s = 0;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < unsigned(n);
       i += blockDim.x * gridDim.x)
    s += in[i];
  s = warp_sum(s);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) total += partial[w];
    atomicAdd(out, total);
  }
}

// Broken kernels, one rule each.
__global__ void barrier_after_return(int* out) {
  if (threadIdx.x >= 64) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shuffle_after_return(int* out) {
  if (threadIdx.x % 32 == 5) return;
  out[threadIdx.x] = warp_sum(1);
}

__global__ void writes_past_shared_memory(int*) {
  IMPFLOW_DYNAMIC_SHARED_MEMORY(raw);
  reinterpret_cast<int*>(raw)[threadIdx.x] = 1;  // blockDim.x ints, the launch asks for fewer
}

__global__ void shuffle_and_barrier(int* out) {
  if (threadIdx.x < 32) out[0] = warp_sum(1);
  else __syncthreads();
}

// Thread 0 reads what thread 1 writes, with no barrier between: under the emulator's shuffled
// order it reads the value before the write in some block (the reading is 0 there).
__global__ void missing_barrier(int* seen) {
  __shared__ int shared_value;
  if (threadIdx.x == 0) shared_value = 0;
  __syncthreads();
  if (threadIdx.x == 1) shared_value = 1;
  if (threadIdx.x == 0) seen[blockIdx.x] = shared_value;
}

void expect_error(const std::string& name, const std::string& message,
                  const std::function<void()>& launch) {
  try {
    launch();
    report(false, name, "ran without an error");
  } catch (const simt::KernelError& e) {
    const std::string what = e.what();
    report(what.find(message) != std::string::npos, name, "wrong error: " + what);
  }
}

}  // namespace

int main() {
  std::vector<double> in(10000);
  double want = 0;
  for (size_t i = 0; i < in.size(); ++i) want += (in[i] = 0.5 * double(i));
  for (unsigned threads : {32u, 64u, 256u}) {
    double got = 0;
    simt::run(dim3(7), dim3(threads), threads / 32 * sizeof(double),
              [&] { sum_kernel(in.data(), &got, int(in.size())); });
    report(got == want, "sum with " + std::to_string(threads) + " threads",
           std::to_string(got) + " != " + std::to_string(want));
  }
  std::vector<int> out(256);
  expect_error("barrier after return", "threads returned before a __syncthreads()",
               [&] { simt::run(dim3(1), dim3(128), 0, [&] { barrier_after_return(out.data()); }); });
  expect_error("shuffle after return", "while 1 of its lanes have returned",
               [&] { simt::run(dim3(1), dim3(64), 0, [&] { shuffle_after_return(out.data()); }); });
  expect_error("write past shared memory", "a write past the 64 bytes",
               [&] { simt::run(dim3(1), dim3(32), 64, [&] { writes_past_shared_memory(nullptr); }); });
  expect_error("shuffle and barrier mixed", "divergent barrier",
               [&] { simt::run(dim3(1), dim3(64), 0, [&] { shuffle_and_barrier(out.data()); }); });
  std::vector<int> seen(64, -1);
  simt::run(dim3(64), dim3(32), 0, [&] { missing_barrier(seen.data()); });
  int early = 0;
  for (int s : seen) early += s == 0;
  report(early > 0 && early < 64, "shuffled order exposes a missing barrier",
         std::to_string(early) + " of 64 blocks read before the write");
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
