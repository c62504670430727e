#!/usr/bin/env bash
# Every GPU benchmark in one go, most important first, each under its own time limit so that one slow or failing
# benchmark cannot take the others' time. Usage (from the repository root, on a CUDA machine):
#     bash benchmarks/gpu_run.sh OUTPUT_DIR [ORIGINAL_CUMO_CHECKOUT]
# Writes OUTPUT_DIR/*.json and prints every table; the original-code comparison runs only when a checkout is given.
set -u
out=${1:?usage: gpu_run.sh OUTPUT_DIR [ORIGINAL_CUMO_CHECKOUT]}
original=${2:-}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
gpu="--device cuda --dtype bfloat16"
run() {  # run LIMIT_S COMMAND...: report the exit status and go on
    local limit=$1; shift
    echo "=== $(date -u +%T) $*"
    timeout "$limit" "$@"; echo "=== exit $?"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
run 200 python3 benchmarks/model_speed.py --config real $gpu --repeats 3 --output "$out/model_speed_real_cuda.json"
if [ -n "$original" ]; then
    run 45 python3 benchmarks/original_vision.py --original-source "$original" $gpu --repeats 5 \
        --output "$out/original_vision_mid_cuda.json"
    run 75 python3 benchmarks/original_vision.py --original-source "$original" $gpu --repeats 5 \
        --width 1024 --layers 24 --image-size 336 --output "$out/original_vision_real_cuda.json"
fi
run 40 python3 benchmarks/moe_block.py $gpu --repeats 10 --output "$out/moe_block_cuda.json"
run 110 python3 benchmarks/model_speed.py --config mid $gpu --repeats 5 --compile --output "$out/model_speed_mid_cuda.json"
