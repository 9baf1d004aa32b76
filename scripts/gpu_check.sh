#!/usr/bin/env bash
# GPU check, made for ONE call of at most 8 minutes on a bare GPU machine without a package index
# (Python 3.12, CUDA torch, Triton, pytest, ninja; jieba / rouge / fuzzywuzzy / datasets may be
# missing, so only the GPU-tier files are collected). Stages, each with its own time limit:
#
#   build      qjl_kernel._C for the local GPU only (setup.py build_ext --inplace)        130 s
#   cuda       CUDA-tier files, one pytest process each (skipped when the build failed)  115 s
#   triton     Triton-tier files (+ the sync-free index check), one pytest process each  145 s
#   memcheck   compute-sanitizer memcheck on edge shapes of decode / key_scores          35 s
#   bench      benchmarks/bench_gpu.py: fused decode vs exact bf16 SDPA, 8k..128k tokens 50 s
#                                                                                  sum: 475 s
# Time a stage leaves unused passes to the next ones (each limit is "planned end - now"), so the
# whole run never exceeds the sum. In the background, scripts/triton_static.py compiles the Triton
# kernels for this machine's Triton and reports registers and spills (static.txt).
#
# - A failed build does not stop the run: the Triton tier, memcheck and benchmark go on.
# - test_triton_ops.py spends its time compiling kernels (one CPU core each): it runs on 4 pytest-xdist
#   workers when xdist is importable.
# - Each file runs in its own pytest process with -v: an illegal memory access poisons a CUDA
#   context, so it must not take the other files with it, and a file cut by its limit still names
#   the tests that ran. A missing file is reported, not fatal (other work may not have landed yet).
# - Output: $OUT (else results/gpu_check/): summary.txt (one screen), bench.txt, static.txt and
#   logs.tar.gz (every log), at most 8 files as the device tool returns them.
# - Without a GPU visible to torch it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RESULTS="${OUT:-$ROOT/results/gpu_check}"
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.txt"
PY="${PYTHON:-python3}"
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# path:seconds[:xdist workers]
CUDA_TIER=(tests/qjl_kernel/test_cuda_ops.py:40 tests/qjl_kernel/test_cuda_decode.py:50
  tests/models/test_cuda_generation.py:25)
TRITON_TIER=(tests/qjl_kernel/test_triton_ops.py:80:4 tests/qjl_kernel/test_triton_decode.py:30
  tests/models/test_triton_generation.py:20 tests/qjl_kernel/test_bad_input.py:15)
BUILD_S=130 MEMCHECK_S=35 BENCH_S=50

say() { echo "gpu_check: $*" | tee -a "$SUMMARY"; }
pack() { [ -n "${OUT:-}" ] && tar -czf "$RESULTS/logs.tar.gz" -C "$LOGS" . 2>/dev/null; return 0; }
: >"$SUMMARY"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  say "no GPU visible to torch ($PY): nothing to check here; run this on a GPU machine"
  exit 0
fi
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
T0=$(date +%s)
PLAN=$T0  # planned end of the stages so far
# plan SECONDS: sets LIMIT, the time the next step may take (its budget plus what earlier steps left).
plan() { PLAN=$(( PLAN + $1 )); LIMIT=$(( PLAN - $(date +%s) )); }
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__)" 2>&1 | tee -a "$SUMMARY"

# Static register / spill report of the Triton kernels, compiled by this machine's Triton (CPU only).
timeout -k 5 150 "$PY" scripts/triton_static.py >"$LOGS/static.txt" 2>&1 &
STATIC_PID=$!

# --- build ---------------------------------------------------------------------------------------
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export QJL_CUDA_ARCHS="$ARCH" QJL_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
start=$(date +%s)
plan $BUILD_S
timeout -k 10 "$LIMIT" "$PY" setup.py build_ext --inplace >"$LOGS/build.log" 2>&1
build_rc=$?
if [ "$build_rc" -eq 0 ] && "$PY" -c "import qjl_kernel._C" 2>>"$LOGS/build.log"; then
  built=1
  say "build: ok for sm_${ARCH/./} in $(( $(date +%s) - start )) s (MAX_JOBS=$MAX_JOBS)"
else
  built=0
  say "build: FAILED (exit $build_rc, $(( $(date +%s) - start )) s of $LIMIT; build.log); the CUDA tier is skipped"
  grep -E "error|Error" "$LOGS/build.log" | head -5 | sed 's/^/  /' | tee -a "$SUMMARY"
fi
"$PY" -c "import qjl_kernel; print('backends:', qjl_kernel.backend_info())" 2>&1 | tee -a "$SUMMARY"
pack

# --- test tiers ----------------------------------------------------------------------------------
failed=0
XDIST=0
"$PY" -c "import xdist" >/dev/null 2>&1 && XDIST=1
# run_file TIER path:seconds[:workers]: one pytest process for the file within its limit.
run_file() {
  local tier=$1 file budget workers log rc
  IFS=: read -r file budget workers <<<"$2"
  local extra=()
  [ -n "$workers" ] && [ "$XDIST" -eq 1 ] && extra=(-n "$workers")
  plan "$budget"
  if [ ! -f "$file" ]; then
    say "$tier: $file MISSING (not in this checkout)"; return
  fi
  if [ "$LIMIT" -le 5 ]; then
    say "$tier: $file NOT RUN (no time left)"; failed=1; return
  fi
  log="$LOGS/pytest_$(basename "$file" .py).log"
  timeout -k 10 -s INT "$LIMIT" "$PY" -m pytest -m cuda -v -rfEs -p no:cacheprovider "${extra[@]}" "$file" >"$log" 2>&1
  rc=$?
  local note="exit $rc"
  [ "$rc" -eq 124 ] && note="CUT at its ${LIMIT} s limit"
  say "$tier: $(basename "$file"): $note; $(grep -cE ' PASSED' "$log") passed, $(grep -cE ' FAILED| ERROR' "$log") failed/error, $(grep -cE ' SKIPPED' "$log") skipped"
  grep -E '^(FAILED|ERROR) ' "$log" | head -5 | cut -c1-160 | sed 's/^/  /' | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || failed=1  # 5: no test selected
  pack
}
for entry in "${CUDA_TIER[@]}"; do
  if [ "$built" -eq 1 ]; then
    run_file cuda "$entry"
  else
    IFS=: read -r _ seconds _ <<<"$entry"
    plan "$seconds"  # its time passes to the later stages
    failed=1
  fi
done
for entry in "${TRITON_TIER[@]}"; do
  run_file triton "$entry"
done

# --- memcheck ------------------------------------------------------------------------------------
plan $MEMCHECK_S
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -z "$SANITIZER" ]; then
  say "memcheck: compute-sanitizer not found; skipped"
else
  # No caching allocator: every tensor its own allocation, so reads past one are caught.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$LIMIT" "$SANITIZER" --tool memcheck --error-exitcode 99 \
    --print-limit 20 "$PY" benchmarks/bench_gpu.py --edge-cases >"$LOGS/memcheck.log" 2>&1
  rc=$?
  case $rc in
    0) note="clean" ;; 99) note="MEMORY ERRORS" ;; 124) note="CUT at its ${LIMIT} s limit" ;; *) note="exit $rc" ;;
  esac
  say "memcheck: $note ($(grep -c ': ok' "$LOGS/memcheck.log") edge runs ok; $(grep -cE 'MISMATCH|FAILED' "$LOGS/memcheck.log") bad)"
  grep -E 'ERROR SUMMARY|Invalid|MISMATCH|FAILED' "$LOGS/memcheck.log" | head -6 | cut -c1-160 | sed 's/^/  /' | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || failed=1
fi
pack

# --- benchmark -----------------------------------------------------------------------------------
plan $BENCH_S
start=$(date +%s)
timeout -k 10 -s INT "$LIMIT" "$PY" benchmarks/bench_gpu.py >"$LOGS/bench.txt" 2>&1
bench_rc=$?
cp "$LOGS/bench.txt" "$RESULTS/bench.txt"
say "benchmark: exit $bench_rc in $(( $(date +%s) - start )) s (bench.txt)"
grep -vE '^# graph capture failed' "$LOGS/bench.txt" | tail -32 | tee -a "$SUMMARY"
[ "$bench_rc" -eq 0 ] || failed=1

# --- static report (ran in the background) -------------------------------------------------------
wait "$STATIC_PID"
static_rc=$?
cp "$LOGS/static.txt" "$RESULTS/static.txt"
spilling=$(awk '$1 != "config" && $2 ~ /kernel$/ && $3 != "COMPILE" && ($(NF-3) > 0 || $(NF-2) > 0) {printf " %s/%s", $1, $2}' "$LOGS/static.txt")
say "static: triton_static.py exit $static_rc; $(awk '$1 != "config" && $2 ~ /kernel$/' "$LOGS/static.txt" | wc -l) kernel rows, $(grep -c 'COMPILE FAILED' "$LOGS/static.txt") failed to compile, spilling:${spilling:- none} (static.txt)"
pack
say "total $(( $(date +%s) - T0 )) s; $([ "$failed" -eq 0 ] && echo 'every stage passed' || echo 'SOME STAGE FAILED')"
pack
rm -rf "$LOGS"
[ "$failed" -eq 0 ]
