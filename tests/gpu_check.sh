#!/usr/bin/env bash
# The GPU checks, in one script, each step with its own time limit (120 + 150 + 330 s):
#     bash tests/gpu_check.sh DATA_DIR        # DATA_DIR holds cifar-10-batches-py
# 1. the suite's CUDA test (the graphed step trains like the eager one); 2. tests/bench.py --device cuda (plain
# eager fp32, the project eager, the project with a CUDA graph, side by side); 3. the paper's protocol end to end
# with the CUDA graph, under `time`. Not part of the suite; it needs an NVIDIA GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:?usage: bash tests/gpu_check.sh DATA_DIR}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 120 python -m pytest -q -k cuda tests/test_main.py
timeout 150 python tests/bench.py --device cuda --repeats 50 --skip-augment
time timeout 330 python main.py --dataset cifar10 --aug crop --data-dir "$DATA_DIR" --cuda-graph on \
    --out runs/gpu-paper-protocol --overwrite --log-every 10
