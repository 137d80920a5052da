// Compile a CPU hot loop for several instruction sets and pick one at load time (GCC/Clang
// function multiversioning on x86-64 Linux), so one wheel runs everywhere and still uses
// AVX-512 / AVX2 where the machine has them. Put it on non-template functions only.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(IMPFLOW_NO_MULTIVERSION)
#define IMPFLOW_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define IMPFLOW_CPU_CLONES
#endif

#if defined(__GNUC__)
#define IMPFLOW_INLINE inline __attribute__((always_inline))
#else
#define IMPFLOW_INLINE inline
#endif
