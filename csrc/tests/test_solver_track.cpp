// C++ test of impflow::solver_track on CPU (no test framework: nothing may be downloaded),
// against the naive oracle of solver_track_cases.h.
// The last line printed is "N passed, N failed"; the exit status is non-zero on any failure.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "check.h"
#include "impflow/ops.h"
#include "solver_track_cases.h"

int main() {
  uint64_t seed = 0;
  // n <= 4: samples side by side in the kernel's vector lanes; 9 and 64: along each sample.
  // B = 600 and 3001: several blocks of 256 samples and a partial last one; 3001 is also cut
  // between two threads inside a block.
  at::set_num_threads(2);
  for (auto dtype : {at::kFloat, at::kDouble})
    for (int64_t B : {1, 7, 600, 3001})
      for (int64_t n : {1, 2, 3, 4, 9, 64})
        for (bool relative : {false, true})
          impflow_test::run_case(B, n, relative, dtype, ++seed, impflow::solver_track);
  return impflow_test::finish();
}
