#!/usr/bin/env bash
# The GPU check in one go (docs/speed.md, The GPU check), under 10 minutes on an H100/H200: the GPU
# tests (EMA's kernels against float64, the trainer's check of them in its child process), then
# benchmark.py on ResNet50 + EMA (the PyTorch path and the fused kernels, EMA alone per shape with
# the path --ema-kernel auto takes) and without attention. Full logs in the folder given (default
# gpu-check/); the result lines last. The kernels' cache goes there too: the check measures afresh.
# Each step has a time limit, so that the whole fits 10 minutes even where one hangs.
#
#     bash tests/gpu_check.sh [LOG_FOLDER]
set -uo pipefail
cd "$(dirname "$0")/.."
logs=$(mkdir -p "${1:-gpu-check}" && cd "${1:-gpu-check}" && pwd)
export XDG_CACHE_HOME="$logs/cache"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  | tee "$logs/device.txt"
git log -1 --format='commit %h %s' | tee -a "$logs/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$logs/device.txt"

EMA_TEST_GPU=1 timeout 270 python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 \
  | tee "$logs/test_gpu.txt" | tail -3
timeout 210 python benchmark.py -net resnet50 -att ema --configs graphs graphs-fused --steps 30 \
  --warmup 8 2>&1 | tee "$logs/benchmark_ema.txt" | grep -E "result:|EMA alone|input \(|path, all"
timeout 90 python benchmark.py -net resnet50 -att none --configs graphs --steps 30 --warmup 8 2>&1 \
  | tee "$logs/benchmark_none.txt" | grep -E "result:"
echo; echo "== results"; grep -h "passed\|failed" "$logs/test_gpu.txt" | tail -1
grep -h "result:" "$logs"/benchmark_*.txt
