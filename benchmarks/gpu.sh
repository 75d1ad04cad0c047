#!/usr/bin/env bash
# The GPU checks and figures of the README, on one CUDA GPU. Sections, in order of importance:
#   tests    the CUDA cases of the test suite (kernels, autocast, inductor, train.py fp16/bf16)
#   b0       bench_model (ours, ours-plain, torchvision, timm, ours+ckpt) and bench_loop, bf16 b256
#   compile  train.py --compile on synthetic data, b0 bf16 b256
#   b4       bench_model and bench_loop at 380 px, batch 128 (NVIDIA's per-GPU batch)
# Each step has a time limit and the next runs whatever the last did; output goes to $OUT.
# Every Python process spends ~30 s starting CUDA and tuning cuDNN, so all of it takes ~20 min:
# with less time on the card, give the sections one at a time.
#
#     OUT=gpu-results bash benchmarks/gpu.sh tests b0
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORKERS=${WORKERS:-12}

step() {  # step LIMIT_SECONDS COMMAND...
    local limit=$1 start=$SECONDS
    shift
    echo "=== $* (limit ${limit}s)"
    timeout "$limit" "$@"
    echo "=== exit $? after $((SECONDS - start))s"
}

section() {
    case $1 in
    tests)
        step 400 $PY -m pytest -v -p no:cacheprovider -k cuda tests ;;
    b0)
        step 300 $PY benchmarks/bench_model.py --device cuda --amp bf16 --batch-size 256 --rounds 5 --steps 5 \
            --models ours,ours-plain,torchvision,timm,ours+ckpt --json "$OUT/model_b0.json"
        step 200 $PY benchmarks/bench_loop.py --device cuda --amp bf16 --batch-size 256 --steps 100 --rounds 1 \
            --workers "$WORKERS" --json "$OUT/loop_b0.json" ;;
    compile)  # the steady rate is the last logged interval (compilation happens in the first one)
        rm -rf /tmp/gpu-compile-b0
        step 300 $PY train.py --data synthetic --arch b0 --batch-size 256 --amp bf16 --compile --epochs 2 \
            --warmup-epochs 1 --steps-per-epoch 100 --log-every 50 --eval-every 0 --workers "$WORKERS" \
            --output-dir /tmp/gpu-compile-b0 ;;
    b4)
        step 300 $PY benchmarks/bench_model.py --arch b4 --image-size 380 --device cuda --amp bf16 --batch-size 128 \
            --rounds 3 --steps 4 --models ours,ours-plain,torchvision,timm --json "$OUT/model_b4.json"
        step 200 $PY benchmarks/bench_loop.py --arch b4 --image-size 380 --device cuda --amp bf16 --batch-size 128 \
            --steps 20 --rounds 1 --workers "$WORKERS" --json "$OUT/loop_b4.json" ;;
    *)
        echo "unknown section $1 (tests, b0, compile, b4)"; return 2 ;;
    esac
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
    for name in "${@:-tests b0 compile b4}"; do
        for s in $name; do section "$s"; done
    done
} 2>&1 | tee "$OUT/log.txt"
