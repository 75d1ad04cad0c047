#!/usr/bin/env bash
# The GPU check on one H200, bounded at 9 minutes by its limits (the machine's start not counted), in three Python
# processes that start CUDA (~30 s each):
#   1. the CUDA test cases in one pytest process, at most TESTS_LIMIT s (TEST_LIMIT s a case; each
#      result, a failure's short traceback included, printed as it comes: pytest_stream.py), while
#      beside it the CPU cores write the input rows' JPEGs and a second process compiles the
#      compiled rows' graphs into inductor's on-disk caches (gpu_check.py --warm-compile);
#   2. every measurement, benchmarks/gpu_check.py, at most CHECK_LIMIT s: each row is written to
#      $OUT/rows.jsonl and $OUT/table.md the moment it is measured.
#
#     OUT=gpu-results bash benchmarks/gpu.sh             # on the card; results and logs in $OUT
#     bash benchmarks/gpu.sh --dry-run                   # on a CPU: the same steps, shrunk
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
DRY="" SLOW=1
[ "${1:-}" = "--dry-run" ] && DRY="--dry-run" SLOW=10  # a busy CPU: limits only against hangs
TESTS_LIMIT=$((165 * SLOW)) TEST_LIMIT=$((75 * SLOW)) WARM_LIMIT=$((190 * SLOW)) CHECK_LIMIT=$((330 * SLOW))
BUDGET=285  # seconds for gpu_check's rows: CHECK_LIMIT less its CUDA start and the table
IMAGES=$([ -n "$DRY" ] && echo "--images 64 --links 2" || echo "--images 4096 --links 4")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # as train.py --deterministic sets it; torch's own 32 MiB on Hopper
JPEGS=$(mktemp -d /tmp/gpu_check_jpegs.XXXX)
start=$SECONDS

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    $PY benchmarks/gpu_check.py --make-jpegs "$JPEGS" $IMAGES > "$OUT/jpegs.txt" 2>&1 &
    jpegs_pid=$!
    timeout -k 5 $WARM_LIMIT $PY benchmarks/gpu_check.py $DRY --warm-compile > "$OUT/warm_compile.txt" 2>&1 &
    warm_pid=$!
    echo "=== CUDA tests: at most $TESTS_LIMIT s, $TEST_LIMIT s a case"
    GPU_CHECK_TEST_LIMIT=$TEST_LIMIT PYTHONPATH=benchmarks timeout -k 5 $TESTS_LIMIT \
        $PY -m pytest -v -p no:cacheprovider -p pytest_stream --tb=short -rfEs -k cuda tests 2>&1 | tee "$OUT/tests.txt"
    code=${PIPESTATUS[0]}
    count() { grep -cE "::[^ ]+ $1" "$OUT/tests.txt"; }
    tests="$(count PASSED) passed, $(count FAILED) failed, $(count ERROR) errors, $(count SKIPPED) skipped"
    if [ "$code" = 124 ] || [ "$code" = 137 ]; then tests="$tests, cut at $TESTS_LIMIT s"; fi
    echo "=== CUDA tests: exit $code after $((SECONDS - start)) s: $tests"
    wait "$jpegs_pid" || echo "=== JPEG generation failed: $(tail -n 3 "$OUT/jpegs.txt")"
    wait "$warm_pid"
    echo "=== warm-compile: exit $? at $((SECONDS - start)) s: $(tr '\n' ' ' < "$OUT/warm_compile.txt" | tail -c 300)"
    warmed=$(grep -oE "^warm-compile: b[0-9]" "$OUT/warm_compile.txt" | cut -d' ' -f2 | paste -sd, -)
    timeout -k 5 $CHECK_LIMIT $PY benchmarks/gpu_check.py $DRY --budget $BUDGET --jpegs "$JPEGS" --tests "$tests" \
        --warmed "$warmed" --out "$OUT"
    echo "=== gpu_check: exit $? after $((SECONDS - start)) s in all"
} 2>&1 | tee "$OUT/log.txt"
rm -rf "$JPEGS"
