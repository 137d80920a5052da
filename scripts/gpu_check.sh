#!/usr/bin/env bash
# One command for a GPU machine: build impflow against the torch there, run the tests (the
# CUDA cases included), the C++ tests, and the main benchmark on CPU and GPU.
# Usage: scripts/gpu_check.sh OUT_DIR
#   (writes OUT_DIR/gpu_check.log, solver_speed.json, power_iteration.json, logdet.json,
#   exact_logdet.json, train_step.json, end_to_end.json)
#   PYTHON (default python3), IMPFLOW_CUDA_ARCHS (default: the GPU's own), MAX_JOBS (default 8)
set -uo pipefail
out="${1:?usage: scripts/gpu_check.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # impflow is built in place, not installed
if [ -z "${IMPFLOW_CUDA_ARCHS:-}" ]; then
  IMPFLOW_CUDA_ARCHS="$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  export IMPFLOW_CUDA_ARCHS
fi
failed=()
step() {  # step NAME COMMAND...: runs it, logs it, remembers a failure and goes on
  echo "=== $1 ($(date +%T))"
  shift
  "$@" || failed+=("$*")
}
{
  step "device" nvidia-smi
  step "torch" "$py" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  step "build (archs $IMPFLOW_CUDA_ARCHS)" "$py" setup.py -q build_ext --inplace
  step "tests" "$py" -m pytest tests -q -rs
  step "benchmark" "$py" benchmarks/solver_speed.py --out "$out/solver_speed.json"
  step "power iteration" "$py" benchmarks/power_iteration.py --out "$out/power_iteration.json"
  step "logdet" "$py" benchmarks/logdet.py --out "$out/logdet.json"
  step "exact logdet" "$py" benchmarks/exact_logdet.py --out "$out/exact_logdet.json"
  step "train step" "$py" benchmarks/train_step.py --out "$out/train_step.json"
  step "end to end" "$py" benchmarks/end_to_end.py --out "$out/end_to_end.json"
  echo "=== done: ${#failed[@]} step(s) failed ${failed[*]:-}"
} 2>&1 | tee "$out/gpu_check.log"
grep -q "=== done: 0 step" "$out/gpu_check.log"
