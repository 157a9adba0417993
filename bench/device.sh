#!/usr/bin/env bash
# The GPU check, in one device call: on a GPU machine with CUDA, PyTorch and
# Python but no Rust, starting from a wheel built on the CPU machine
# (`maturin build --release -o wheels`), it
#   1. installs the wheel (no dependencies, no network),
#   2. prints `python -m mamba_attention info`,
#   3. runs the GPU tests (the parity suite parametrised over device),
#   4. runs the GPU benchmark workloads beside every peer importable there,
#   5. with SANITIZE=1, runs every kernel on small odd shapes
#      (bench/kernel_tools/sanitize_cases.py) under compute-sanitizer's memcheck,
#      racecheck, initcheck and synccheck, printing each tool's summary,
# writing logs and bench JSON to $OUT (or ./bench/out).
#
#   bash bench/device.sh [WHEEL]
# Environment: BENCH_ONLY (rows), SKIP_TESTS / SKIP_BENCH (set to skip a part),
# MAXFAIL (pytest --maxfail, default 1), TAIL (lines of each log shown),
# SANITIZE=1 (step 5), SANITIZE_TOOLS (default "memcheck racecheck initcheck
# synccheck"), SANITIZE_ONLY (case-name substrings, sanitize_cases.py --only),
# SANITIZE_TIMEOUT (seconds per tool).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEEL=${1:-$(ls -t wheels/mamba_attention-*.whl 2>/dev/null | head -1)}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ -z "$WHEEL" ] || [ ! -f "$WHEEL" ]; then
  echo "no wheel: build one with 'maturin build --release -o wheels' and carry wheels/" >&2
  exit 2
fi
echo "== wheel: $WHEEL"
target=$(mktemp -d)
$PY -m pip install -q --no-deps --no-index --target "$target" "$WHEEL" || exit 1
export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -m mamba_attention info 2>&1 | tee "$OUT/info.txt"

# The compiled kernels persist between calls while the machine stays warm.
export MAMBA_ATTENTION_CACHE=${MAMBA_ATTENTION_CACHE:-/tmp/mamba-attention-kernels}

status=0
if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== GPU tests"
  $PY -m pytest tests -q -p no:cacheprovider --maxfail="${MAXFAIL:-1}" -k "cuda" --timeout=900 \
    ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/tests-gpu.log" | tail -"${TAIL:-25}"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  echo "== GPU bench"
  $PY -m mamba_attention bench --only "${BENCH_ONLY:-G1,G1f,G2,G3,G4,G5,G6,G7,G8,G9,GM1,GH1,G10,G11}" \
    --json "$OUT/bench-gpu.json" 2>&1 | tee "$OUT/bench-gpu.log" | tail -"${TAIL:-40}"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if [ -n "${SANITIZE:-}" ]; then
  echo "== compute-sanitizer"
  # kernels compiled once outside the tools (the cache persists through the call)
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  $PY -m mamba_attention compile-kernels --arch "sm_$cc" >/dev/null 2>&1
  san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  $san --version | tail -1
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}; do
    extra=""
    [ "$tool" = racecheck ] && extra="--racecheck-report all"
    t0=$(date +%s)
    timeout "${SANITIZE_TIMEOUT:-3000}" $san --tool "$tool" $extra --print-limit 100 --error-exitcode 9 \
      $PY bench/kernel_tools/sanitize_cases.py ${SANITIZE_ONLY:+--only "$SANITIZE_ONLY"} \
      >"$OUT/sanitize-$tool.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] || status=1
    summary=$(grep -E "(ERROR|RACECHECK|INITCHECK|SYNCCHECK) SUMMARY" "$OUT/sanitize-$tool.log" | tail -1)
    cases=$(grep -E "^sanitize_cases:" "$OUT/sanitize-$tool.log" | tail -1)
    echo "$tool: exit $rc, $(( $(date +%s) - t0 )) s; ${summary:-no summary line}; ${cases:-no case summary}"
    grep -E "^=========   (Race|Invalid|Uninitialized|Barrier|Error)|^========= (Error|Race|Invalid|Uninit)" \
      "$OUT/sanitize-$tool.log" | sort | uniq -c | sort -rn | head -"${TAIL:-10}"
  done
fi
exit $status
