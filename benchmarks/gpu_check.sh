#!/usr/bin/env bash
# One-call GPU check: on a machine with a CUDA GPU, build the extension against
# the local torch for that GPU's architecture, run the CUDA tests (plainly, then
# small sizes under compute-sanitizer memcheck), the GPU kernel benchmarks
# (bandwidth as a fraction of a copy_ measured in the same run) and any other
# GPU/CUDA benchmarks in benchmarks/, and write ONE results file:
#
#   ${OUT:-benchmarks/results}/gpu-check-<UTC date>.md
#
# Run from the repository root: bash benchmarks/gpu_check.sh
# Without a GPU it says so, writes a results file saying "skipped" and exits 0.
# Every step has a time cap so the whole check ends within 9.5 minutes (a device call may run 10).
#   PYTHON=python3      interpreter with torch (the GPU machine's own; no registry needed)
#   GPU_CHECK_PLAN=1    print the steps (commands) and exit without running anything
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
STAMP="$(date -u +%Y-%m-%d-%H%M)"
RES="$OUT_DIR/gpu-check-$STAMP.md"
LOG="$OUT_DIR/gpu-check-$STAMP.log"
T0=$(date +%s)

# Steps: name | time cap (s) | command. Caps sum to 520 s (+ 5 s grace each, + setup) < 9.5 min.
# tests runs tests/ops/test_ops_cuda.py, soft gates included (issue 27: test_soft_gate_*, the misaligned
# and backward ones under the sanitizer too); bench includes the soft gate's bandwidth ("soft sigmoid/phi").
# tests-other includes the CUDA worker-pool test (workers sharing the GPU equal the in-process
# run) and bench the concurrent-clients benchmark (benchmarks/bench_gpu_workers.py, issue 17).
CAP_BUILD=140 CAP_TESTS=120 CAP_TESTS_OTHER=80 CAP_SANITIZER=80 CAP_BENCH=100
SANITIZE_K="equal_cpu or layouts or misaligned or list_ops or sq_dist or integer or streaming or backward"
# pip first (it records the torch it built for, which the loader checks); no pip: setup.py in place.
STEP_BUILD="export TORCH_CUDA_ARCH_LIST=\"\$ARCH\" FEDSQ_FAST_CUDA=1 MAX_JOBS=\$(nproc); $PY -m pip install --no-build-isolation --no-deps --no-index -q -e . || $PY setup.py build_ext --inplace"
STEP_TESTS="$PY -m pytest tests/ops/test_ops_cuda.py -q -p no:cacheprovider -rs"
STEP_TESTS_OTHER="$PY -m pytest tests/ -q -p no:cacheprovider -rs -k 'cuda or gpu' --ignore=tests/ops/test_ops_cuda.py"
STEP_SANITIZER="FEDSQ_CUDA_TEST_SMALL=1 FEDSQ_FAST_CUDA_SYNC=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 $PY -m pytest tests/ops/test_ops_cuda.py -q -p no:cacheprovider -x -k '$SANITIZE_K'"
STEP_BENCH="FEDSQ_BENCH_OUT=gpu-bench-$STAMP.md $PY -m pytest benchmarks/ -q -p no:cacheprovider --benchmark-only -k 'gpu or cuda'"

if [ "${GPU_CHECK_PLAN:-0}" = "1" ]; then
  printf 'build|%s|%s\ntests|%s|%s\ntests-other|%s|%s\nsanitizer|%s|%s\nbench|%s|%s\n' \
    $CAP_BUILD "$STEP_BUILD" $CAP_TESTS "$STEP_TESTS" $CAP_TESTS_OTHER "$STEP_TESTS_OTHER" \
    $CAP_SANITIZER "$STEP_SANITIZER" $CAP_BENCH "$STEP_BENCH"
  echo "sanitize-k|$SANITIZE_K"
  exit 0
fi

say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
section() { printf '\n## %s\n\n' "$1" >> "$RES"; }

{
  echo "# GPU check $STAMP (UTC)"
  echo
  echo "Written by benchmarks/gpu_check.sh; the full console output is in $(basename "$LOG")."
} > "$RES"
: > "$LOG"

PROBE=$("$PY" -c "import torch; print(int(torch.cuda.is_available()), 'torch', torch.__version__)" 2>/dev/null || echo "0 no torch")
if [ "${PROBE%% *}" != "1" ]; then
  say "no CUDA GPU visible to torch: skipped (nothing built, nothing run)"
  section "Result"
  echo "skipped: no CUDA GPU visible to torch on $(hostname) (${PROBE#* })" >> "$RES"
  echo "results: $RES"
  exit 0
fi

ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
export ARCH
section "Machine"
{
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | head -5
  "$PY" -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', platform.python_version()); print('GPUs:', torch.cuda.device_count(), torch.cuda.get_device_name(0), 'sm', '$ARCH')"
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) ($(nproc) cores)"
  echo "compute-sanitizer: $(command -v compute-sanitizer || echo missing)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) uncommitted paths"
  echo '```'
} >> "$RES" 2>&1

FAILED=0
run_step() {  # name cap command
  local name=$1 cap=$2 cmd=$3 rc
  say "$name: start (cap ${cap}s)"
  say "  \$ $cmd"
  timeout --kill-after=5 "$cap" bash -c "$cmd" > "$OUT_DIR/.step.txt" 2>&1
  rc=$?
  cat "$OUT_DIR/.step.txt" >> "$LOG"
  section "$name (exit $rc$( [ $rc = 124 ] && echo ', TIME CAP REACHED'))"
  { echo '```'; echo "\$ $cmd"; tail -n 40 "$OUT_DIR/.step.txt"; echo '```'; } >> "$RES"
  say "$name: exit $rc ($(tail -n 1 "$OUT_DIR/.step.txt" | cut -c1-150))"
  [ $rc = 0 ] || FAILED=$((FAILED + 1))
  return $rc
}

if ! run_step build $CAP_BUILD "$STEP_BUILD"; then
  say "build failed: no tests or benchmarks can run"
else
  "$PY" -c "import fedsq_fast as ff; i = ff.backend_info(); print(i); assert i['cuda_kernels'], 'no CUDA kernels'" >> "$LOG" 2>&1 \
    || { say "the built library has no CUDA kernels"; FAILED=$((FAILED + 1)); }
  run_step tests $CAP_TESTS "$STEP_TESTS"
  run_step tests-other $CAP_TESTS_OTHER "$STEP_TESTS_OTHER"
  if command -v compute-sanitizer > /dev/null; then
    run_step sanitizer $CAP_SANITIZER "$STEP_SANITIZER"
    ERRS=$(grep -o 'ERROR SUMMARY: [0-9]* error' "$OUT_DIR/.step.txt" | tail -1)
    say "compute-sanitizer: ${ERRS:-no summary line}"
    echo "compute-sanitizer memcheck: ${ERRS:-no summary line (see the log)}" >> "$RES"
  else
    say "compute-sanitizer not found: skipped"
  fi
  run_step bench $CAP_BENCH "$STEP_BENCH"
  if [ -f "benchmarks/results/gpu-bench-$STAMP.md" ]; then
    section "Benchmark tables"
    cat "benchmarks/results/gpu-bench-$STAMP.md" >> "$RES"
  fi
fi
rm -f "$OUT_DIR/.step.txt"
section "Summary"
echo "$FAILED step(s) failed; total $(( $(date +%s) - T0 )) s" >> "$RES"
say "done: $FAILED step(s) failed; results: $RES"
exit $(( FAILED > 0 ))
