#!/usr/bin/env bash
# GPU check for a fresh GPU machine without a package index (Python 3.12, CUDA torch, pytest, ninja):
# builds qjl_kernel._C for the local GPU only, runs the GPU tier (`pytest -m cuda`), then the decode
# benchmark (benchmarks/bench_ops.py). Logs go to $OUT when set, else results/gpu_check/.
# Budget: build ~1-2 min on 16 cores, tests ~2 min, benchmark ~1 min (under 8 min on an H200).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-results/gpu_check}"
mkdir -p "$LOG_DIR"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || {
  echo "gpu_check: no GPU visible to torch" | tee "$LOG_DIR/summary.txt"; exit 1; }
export QJL_CUDA_ARCHS="$ARCH" QJL_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
echo "gpu_check: building for sm_${ARCH/./} with MAX_JOBS=$MAX_JOBS" | tee "$LOG_DIR/summary.txt"

start=$(date +%s)
if ! timeout 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . >"$LOG_DIR/build.log" 2>&1; then
  echo "gpu_check: pip install failed, trying setup.py build_ext --inplace" | tee -a "$LOG_DIR/summary.txt"
  timeout 300 "$PY" setup.py build_ext --inplace >>"$LOG_DIR/build.log" 2>&1 || {
    tail -40 "$LOG_DIR/build.log"; echo "gpu_check: BUILD FAILED" | tee -a "$LOG_DIR/summary.txt"; exit 1; }
fi
echo "gpu_check: build $(( $(date +%s) - start )) s" | tee -a "$LOG_DIR/summary.txt"
"$PY" -c "import qjl_kernel; print(qjl_kernel.backend_info())" 2>&1 | tee -a "$LOG_DIR/summary.txt"

start=$(date +%s)
timeout 300 "$PY" -m pytest -m cuda -q -rs 2>&1 | tee "$LOG_DIR/pytest_cuda.log"
tests_rc=${PIPESTATUS[0]}
echo "gpu_check: pytest -m cuda exit $tests_rc in $(( $(date +%s) - start )) s" | tee -a "$LOG_DIR/summary.txt"

start=$(date +%s)
timeout 180 "$PY" benchmarks/bench_ops.py 2>&1 | tee "$LOG_DIR/bench.txt"
bench_rc=${PIPESTATUS[0]}
echo "gpu_check: benchmark exit $bench_rc in $(( $(date +%s) - start )) s" | tee -a "$LOG_DIR/summary.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
