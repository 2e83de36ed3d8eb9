#!/usr/bin/env bash
# The GPU checks, in one script, each step with its own time limit (150 + 150 + 270 s, under the 10 minutes of one
# call of a lent GPU machine):
#     bash tests/gpu_check.sh DATA_DIR        # DATA_DIR holds cifar-10-batches-py
# 1. the whole test suite on the GPU machine (the CUDA tests run there; the exact ones pin --device cpu);
# 2. tests/bench.py --device cuda: plain eager fp32, the project eager and with a CUDA graph, side by side;
# 3. the paper's protocol end to end on one GPU with the CUDA graph, under `time`.
# Not part of the suite; it needs an NVIDIA GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:?usage: bash tests/gpu_check.sh DATA_DIR}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 150 python -m pytest -q -rs
timeout 150 python tests/bench.py --device cuda --repeats 50 --skip-augment
time timeout 270 python main.py --dataset cifar10 --aug crop --data-dir "$DATA_DIR" --cuda-graph \
    --out runs/gpu-paper-protocol --overwrite --log-every 10
