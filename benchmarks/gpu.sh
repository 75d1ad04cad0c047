#!/usr/bin/env bash
# The GPU check, ~8 minutes on one H200: the CUDA test cases (one pytest process), then every
# measurement in one more Python process (benchmarks/gpu_check.py), which prints one table; the
# JPEGs for the input rows are written by the CPU cores while the tests run. Two Python starts with
# CUDA in all (each ~30 s on the card).
#
#     OUT=gpu-results bash benchmarks/gpu.sh             # on the card; results and logs in $OUT
#     bash benchmarks/gpu.sh --dry-run                   # on a CPU: the same steps, shrunk
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
DRY="" SLOW=1
[ "${1:-}" = "--dry-run" ] && DRY="--dry-run" SLOW=10  # a busy CPU: no time limits to speak of
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
JPEGS=$(mktemp -d /tmp/gpu_check_jpegs.XXXX)
IMAGES=$([ -n "$DRY" ] && echo 64 || echo 6144)

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    $PY benchmarks/gpu_check.py --make-jpegs "$JPEGS" --images "$IMAGES" &
    jpegs_pid=$!
    start=$SECONDS
    timeout -k 10 $((180 * SLOW)) $PY -m pytest -q -p no:cacheprovider -rfEs -k cuda tests > "$OUT/tests.txt" 2>&1
    echo "=== CUDA tests: exit $? after $((SECONDS - start)) s (summary below, details in $OUT/tests.txt)"
    grep -E "^(FAILED|ERROR)" "$OUT/tests.txt"
    summary=$(tail -n 1 "$OUT/tests.txt" | tr -d '=' | sed 's/^ *//')
    echo "$summary"
    wait "$jpegs_pid"
    timeout -k 10 $((300 * SLOW)) $PY benchmarks/gpu_check.py $DRY --budget 250 --jpegs "$JPEGS" --tests "$summary" --out "$OUT"
    echo "=== gpu_check: exit $? after $((SECONDS - start)) s in all"
} 2>&1 | tee "$OUT/log.txt"
rm -rf "$JPEGS"
