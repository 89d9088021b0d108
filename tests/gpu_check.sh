#!/usr/bin/env bash
# The GPU check in one go (docs/speed.md, The GPU check): the GPU tests, then benchmark.py on ResNet50 +
# EMA (PyTorch and fused EMA, --deterministic, EMA alone per shape) and without attention. Full logs in the folder given
# (default gpu-check/); the result lines last.
#
#     bash tests/gpu_check.sh [LOG_FOLDER]
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-gpu-check}
mkdir -p "$logs"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$logs/device.txt"
git log -1 --format='commit %h %s' | tee -a "$logs/device.txt"

EMA_TEST_GPU=1 python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$logs/test_gpu.txt" | tail -3
python benchmark.py -net resnet50 -att ema --configs graphs graphs-fused graphs-deterministic --steps 30 --warmup 8 2>&1 \
  | tee "$logs/benchmark_ema.txt" | grep -E "result:|EMA alone|input \(|path, all|copies at"
python benchmark.py -net resnet50 -att none --configs graphs --steps 30 --warmup 8 2>&1 \
  | tee "$logs/benchmark_none.txt" | grep -E "result:"
echo; echo "== results"; grep -h "result:" "$logs"/benchmark_*.txt
