#!/usr/bin/env bash
# The GPU checks and tables of benchmarks/RESULTS.md, in one go (at most 17 minutes on one H100):
#   bash benchmarks/run_gpu.sh OUTPUT_DIR
# Each step has its own time limit, so one slow step cannot take the others' results with it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
step() {  # step SECONDS NAME COMMAND...: run, keep its output in $out/NAME.txt, report its status
    local limit=$1 name=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$PYTHON" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"
step 130 gpu_tests "$PYTHON" -m pytest -m gpu -n 0 -q -p no:cacheprovider
step 150 latency_eager "$PYTHON" -m benchmarks.latency --device cuda --variants s0 s1 s2 s3 s4 \
    --backends eager eager-fp16 eager-bf16 --batch-sizes 1 64 --rounds 30 \
    --csv "$out/latency_eager.csv" --plot "$out/figure1_cuda_fp16.png" --plot-backend eager-fp16
step 180 latency_compile "$PYTHON" -m benchmarks.latency --device cuda --variants s0 --unfused none \
    --backends eager-bf16 compile-bf16 --batch-sizes 1 64 --rounds 30 --csv "$out/latency_compile.csv"
step 300 train_eager "$PYTHON" -m benchmarks.train_throughput --device cuda --variants s0 s4 \
    --batch-sizes 64 256 --precisions fp32 bf16 --steps 10 --csv "$out/train_eager.csv"
step 240 train_compile "$PYTHON" -m benchmarks.train_throughput --device cuda --variants s0 \
    --batch-sizes 256 --modes eager compile --precisions bf16 --steps 10 --csv "$out/train_compile.csv"
tail -n 5 "$out/gpu_tests.txt"
