#!/usr/bin/env bash
# Sets up .venv/ in the checkout: torch, the build and test tools, and impflow built in place
# (editable) against that torch. Safe to run again; it rebuilds the extension each time.
#   IMPFLOW_TORCH   the torch requirement (default torch==2.14.1; any torch >= 2.4 works)
#   FORCE_CUDA=1 / FORCE_ONLY_CPU=1 / IMPFLOW_CUDA_ARCHS / MAX_JOBS   build switches (README)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install -q "${IMPFLOW_TORCH:-torch==2.14.1}"
# setuptools >= 64 reads pyproject.toml's metadata (a new venv of Python 3.9 brings 58).
"$py" -m pip install -q numpy scipy pybind11 ninja "setuptools>=64" wheel pytest expecttest
# the training extras (pyproject.toml [train]); the data-loader tests need them
"$py" -m pip install -q scikit-learn pandas h5py tqdm matplotlib
# --no-build-isolation: compile against the torch just installed, never a second one.
MAX_JOBS="${MAX_JOBS:-2}" "$py" -m pip install -q --no-build-isolation --no-deps -e .
"$py" -c "import impflow, torch; print('impflow', impflow.__version__, 'on torch', torch.__version__, '| CUDA kernels:', impflow.has_cuda_kernels())"
