#!/usr/bin/env bash
# Configures, builds and tests the CMake (LibTorch) build of impflow.
# Usage: scripts/cmake_test.sh [build-dir]   (default cmake-build/)
# Env: MAX_JOBS (parallel build jobs, default 2), CMAKE_ARGS (extra configure arguments,
#      e.g. "-DIMPFLOW_WITH_CUDA=ON"). The python in PATH locates torch, so run this inside
#      the environment whose torch the library must match.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-cmake-build}"
jobs="${MAX_JOBS:-2}"
python="$(command -v python || command -v python3)"

prefix="$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
# shellcheck disable=SC2086  # CMAKE_ARGS is a list of words on purpose
cmake -S "$root" -B "$build" -DCMAKE_PREFIX_PATH="$prefix" ${CMAKE_ARGS:-}
cmake --build "$build" --parallel "$jobs"
# cd rather than ctest --test-dir, which needs CMake 3.20.
cd "$build"
ctest --output-on-failure
