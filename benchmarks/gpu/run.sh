#!/usr/bin/env bash
# The command to run on the GPU machine (device tool), from the repository root, with .whl carried:
#   bash benchmarks/gpu/run.sh
# Installs the carried wheels into /tmp/site (no network there), then times ours (JAX) and
# diffusers (PyTorch, float16, SDPA) and writes $OUT/gpu.json.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 benchmarks/gpu/bench_gpu.py --size 512 --steps 20 --reps 3 --dtype float16 --out "${OUT:-/tmp}/gpu.json" "$@"
