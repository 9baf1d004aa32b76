#!/usr/bin/env bash
# GPU check for a fresh GPU machine without a package index (Python 3.12, CUDA torch, pytest, ninja;
# no jieba / rouge / fuzzywuzzy / matplotlib / datasets): builds qjl_kernel._C for the local GPU only,
# runs the GPU tier file by file, then the decode benchmark (benchmarks/bench_ops.py). Logs go to
# $OUT when set, else results/gpu_check/. One call must fit in 600 s: the stage limits below add up
# to 560 s (build 240, CUDA tier 150, Triton tier 100, benchmark 70).
#
# - Only the GPU-tier files are collected (pytest's -m filters after collection, and the other test
#   files import packages this machine lacks).
# - Each file runs in its own pytest process: an illegal memory access poisons a CUDA context, so it
#   must not take the other files with it.
# - A failed build skips the CUDA tier only: the Triton tier does not need the extension.
# - pytest runs with -v, so a stage cut by its time limit still names the tests that ran.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-results/gpu_check}"
mkdir -p "$LOG_DIR"
SUMMARY="$LOG_DIR/summary.txt"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
CUDA_TIER=(tests/qjl_kernel/test_cuda_ops.py tests/models/test_cuda_generation.py)
TRITON_TIER=(tests/qjl_kernel/test_triton_ops.py tests/models/test_triton_generation.py)

say() { echo "gpu_check: $*" | tee -a "$SUMMARY"; }
: >"$SUMMARY"

ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || {
  say "no GPU visible to torch"; exit 1; }
export QJL_CUDA_ARCHS="$ARCH" QJL_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
say "building for sm_${ARCH/./} with MAX_JOBS=$MAX_JOBS"

# Build: pip first, setup.py build_ext in the time that is left (one 240 s budget for both).
start=$(date +%s)
built=0
if timeout 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . >"$LOG_DIR/build.log" 2>&1; then
  built=1
else
  left=$(( 240 - ($(date +%s) - start) ))
  if [ "$left" -gt 30 ]; then
    say "pip install failed, trying setup.py build_ext --inplace (${left} s left)"
    timeout "$left" "$PY" setup.py build_ext --inplace >>"$LOG_DIR/build.log" 2>&1 && built=1
  fi
fi
if [ "$built" -eq 1 ]; then
  say "build ok in $(( $(date +%s) - start )) s"
else
  tail -40 "$LOG_DIR/build.log"
  say "BUILD FAILED after $(( $(date +%s) - start )) s (log: build.log); the CUDA tier is skipped"
fi
"$PY" -c "import qjl_kernel; print(qjl_kernel.backend_info())" 2>&1 | tee -a "$SUMMARY"

# run_tier NAME SECONDS FILE...: each file in its own pytest process, within one time budget.
failed=0
run_tier() {
  local name=$1 budget=$2; shift 2
  local tier_start left file log rc
  tier_start=$(date +%s)
  for file in "$@"; do
    left=$(( budget - ($(date +%s) - tier_start) ))
    log="$LOG_DIR/pytest_$(basename "$file" .py).log"
    if [ "$left" -le 5 ]; then
      say "$name: $file NOT RUN (tier budget of $budget s spent)"; failed=1; continue
    fi
    timeout -s INT "$left" "$PY" -m pytest -m cuda -v -rfEs -p no:cacheprovider "$file" >"$log" 2>&1
    rc=$?
    say "$name: $file exit $rc ($(grep -cE ' PASSED' "$log") passed, $(grep -cE ' FAILED| ERROR' "$log") failed/error, $(grep -cE ' SKIPPED' "$log") skipped; log $(basename "$log"))"
    [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || failed=1  # 5: no test selected
  done
}
if [ "$built" -eq 1 ]; then
  run_tier cuda 150 "${CUDA_TIER[@]}"
else
  failed=1
fi
run_tier triton 100 "${TRITON_TIER[@]}"

start=$(date +%s)
timeout -s INT 70 "$PY" benchmarks/bench_ops.py >"$LOG_DIR/bench.txt" 2>&1
bench_rc=$?
tail -30 "$LOG_DIR/bench.txt"
say "benchmark exit $bench_rc in $(( $(date +%s) - start )) s"
[ "$failed" -eq 0 ] && [ "$bench_rc" -eq 0 ]
