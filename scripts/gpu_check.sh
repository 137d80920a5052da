#!/usr/bin/env bash
# One command for a GPU machine: build impflow against the torch there, run the CUDA tests
# (which no CPU machine can run) first, then every benchmark on the GPU, then the CPU tests.
# Device time is scarce (15 minutes a session, 10 a command): each step is bounded by
# STEP_TIMEOUT seconds, and the order puts what has never run before what CI already covers.
# Usage: scripts/gpu_check.sh OUT_DIR
#   (writes OUT_DIR/gpu_check.log, solver_speed.json, solver_speed_split.json,
#   power_iteration.json, logdet.json, logdet_memory.json, exact_logdet.json, train_step.json,
#   end_to_end.json)
#   PYTHON (default python3), IMPFLOW_CUDA_ARCHS (default: the GPU's own), MAX_JOBS (default 16),
#   STEP_TIMEOUT (default 150), DEADLINE (seconds after the start; steps that would begin later
#   are skipped and listed, so that the run ends inside its lease; default none),
#   SKIP_BUILD=1 (use the impflow/_C*.so already in place, e.g. carried from an earlier run)
set -uo pipefail
out="${1:?usage: scripts/gpu_check.sh OUT_DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"  # absolute: the script changes directory next
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # impflow is built in place, not installed
if [ -z "${IMPFLOW_CUDA_ARCHS:-}" ]; then
  IMPFLOW_CUDA_ARCHS="$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  export IMPFLOW_CUDA_ARCHS
fi
failed=()
skipped=()
limit="${STEP_TIMEOUT:-150}"
start=$SECONDS
step() {  # step NAME COMMAND...: runs it (at most $limit s), logs it, remembers a failure
  if [ -n "${DEADLINE:-}" ] && [ $((SECONDS - start)) -ge "$DEADLINE" ]; then
    skipped+=("$1")
    return
  fi
  echo "=== $1 ($(date +%T), ${SECONDS}s)"
  shift
  timeout "$limit" "$@" || failed+=("$*")
}
# One test process (on the H200 machine, 8 xdist workers printed nothing in 90 s, while the
# CUDA tests ran in 47 s serially), and a per-test time limit where the plugin is there: a hung
# kernel then fails one test instead of the whole step.
pytest_opts=(-q -rfEs --tb=short -p no:xdist -p no:cacheprovider)
"$py" -c "import pytest_timeout" 2>/dev/null && pytest_opts+=(--timeout 60)
{
  step "device" nvidia-smi
  step "torch" "$py" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  if [ "${SKIP_BUILD:-0}" != 1 ]; then
    limit=400 step "build (archs $IMPFLOW_CUDA_ARCHS)" "$py" setup.py -q build_ext --inplace
  fi
  step "extension" "$py" -c "import impflow; assert impflow.has_cuda_kernels(), 'no CUDA kernels'"
  step "CUDA tests" "$py" -m pytest tests "${pytest_opts[@]}" -m cuda
  gpu=(--device cuda)
  step "benchmark" "$py" benchmarks/solver_speed.py "${gpu[@]}" --out "$out/solver_speed.json"
  # The opt-in split kernels of the Broyden step (csrc/cuda/broyden_step_split.cuh), side by
  # side with the default run above: which one large d should use.
  IMPFLOW_CUDA_STEP=split step "benchmark, split step kernels" "$py" benchmarks/solver_speed.py \
    "${gpu[@]}" --out "$out/solver_speed_split.json"
  step "power iteration" "$py" benchmarks/power_iteration.py "${gpu[@]}" --out "$out/power_iteration.json"
  step "logdet" "$py" benchmarks/logdet.py "${gpu[@]}" --out "$out/logdet.json"
  step "train step" "$py" benchmarks/train_step.py "${gpu[@]}" --out "$out/train_step.json"
  step "end to end" "$py" benchmarks/end_to_end.py "${gpu[@]}" --out "$out/end_to_end.json"
  step "logdet memory" "$py" benchmarks/logdet_memory.py "${gpu[@]}" --out "$out/logdet_memory.json"
  step "exact logdet" "$py" benchmarks/exact_logdet.py "${gpu[@]}" --out "$out/exact_logdet.json"
  limit=$((2 * limit)) step "CPU tests" "$py" -m pytest tests "${pytest_opts[@]}" -m "not cuda"
  echo  # a step killed at its time limit may leave its last line open
  echo "=== skipped at the deadline: ${skipped[*]:-none}"
  echo "=== done: ${#failed[@]} step(s) failed ${failed[*]:-}"
} 2>&1 | tee "$out/gpu_check.log"
grep -q "=== done: 0 step" "$out/gpu_check.log" && grep -q "deadline: none" "$out/gpu_check.log"
