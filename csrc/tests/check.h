// What the C++ tests share (no test framework: nothing may be downloaded): a tally of passed
// and failed cases, a tensor's values as a std::vector, and the summary line and exit status.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>

#include <cstdio>
#include <string>
#include <vector>

namespace impflow_test {

inline int g_passed = 0, g_failed = 0;

inline void report(bool ok, const std::string& name, const std::string& why = "") {
  (ok ? g_passed : g_failed)++;
  if (!ok) std::printf("FAIL %s: %s\n", name.c_str(), why.c_str());
}

// The elements of t in row-major order, converted to T (double by default).
template <typename T = double>
std::vector<T> values(const at::Tensor& t) {
  const at::Tensor c = t.to(c10::CppTypeToScalarType<T>::value).contiguous();
  return std::vector<T>(c.data_ptr<T>(), c.data_ptr<T>() + c.numel());
}

// Prints "N passed, N failed" (the last line of every test's output); the exit status.
inline int finish() {
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}

}  // namespace impflow_test
