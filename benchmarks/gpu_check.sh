#!/usr/bin/env bash
# One prepared GPU check, about 5 minutes on one H100/H200-class GPU. Prints the GPU's name, then:
#   1. the CUDA tests (every test whose id says cuda or triton: the 16-mixed GradScaler runs, to_semi_structured, CUTLASS files)
#   2. 16-mixed training with a real GradScaler and SR-STE 2:4          (benchmarks/gpu_check.py amp)
#   3. mask speed on the GPU: nm_mask vs torch._sparse_semi_structured_tile vs clone   (gpu_check.py mask)
#   4. 2:4 Linear GEMMs, fp16/bf16, several large shapes, dense vs cuSPARSELt vs CUTLASS (gpu_semi_structured.py)
#   5. to_semi_structured of a transformer MLP block, prefill and decode batches      (gpu_check.py mlp)
# Ratios are measured side by side in one run (CUDA events, interleaved, medians).
#
# Usage: bash benchmarks/gpu_check.sh            (from anywhere; runs in the repository root)
#        OUT=/some/dir bash benchmarks/gpu_check.sh   also writes the log to $OUT/gpu_check.txt
#        DRY_RUN=1 bash benchmarks/gpu_check.sh       checks the script on a CPU (toy sizes, no GPU steps)
# Exit status: 0 when every step passed, 1 otherwise (every step runs regardless).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's nm_lightning, whatever is installed
PY="${PYTHON:-python}"
STEP_TIMEOUT="${STEP_TIMEOUT:-150}"
DRY="${DRY_RUN:-0}"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  exec > >(tee "$OUT/gpu_check.txt") 2>&1
fi
failed=()

run() {  # run NAME CMD...: one step with a time limit; its status is recorded, the script goes on
  local name="$1"
  shift
  echo
  echo "=== $name ($(date -u +%H:%M:%S) UTC)"
  timeout "$STEP_TIMEOUT" "$@"
  local rc=$?
  echo "--- $name: exit $rc"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

echo "nm_lightning GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if [ "$DRY" = "1" ]; then
  run "script check (dry run)" "$PY" benchmarks/gpu_check.py gpu amp mask mlp --dry-run
else
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
  run "GPU" "$PY" benchmarks/gpu_check.py gpu
  run "CUDA tests" "$PY" -m pytest -q -rs -p no:cacheprovider -p no:randomly -k "cuda or triton" tests/
  run "16-mixed with a real GradScaler" "$PY" benchmarks/gpu_check.py amp
  run "mask speed" "$PY" benchmarks/gpu_check.py mask
  run "2:4 Linear GEMMs" "$PY" benchmarks/gpu_semi_structured.py --quick
  run "MLP block to_semi_structured" "$PY" benchmarks/gpu_check.py mlp
fi
echo
if [ "${#failed[@]}" -eq 0 ]; then
  echo "GPU check: every step passed"
  exit 0
fi
echo "GPU check: FAILED steps: ${failed[*]}"
exit 1
