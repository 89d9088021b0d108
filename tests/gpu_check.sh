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

limited() {  # limited SECONDS LOG COMMAND...: the command's output in LOG, a line if cut short
  local seconds=$1 log=$2; shift 2
  timeout "$seconds" "$@" > "$log" 2>&1
  [ $? = 124 ] && echo "result: stopped by its ${seconds} s limit: $*" | tee -a "$log"
  return 0
}
EMA_TEST_GPU=1 limited 300 "$logs/test_gpu.txt" python -m pytest -q -p no:cacheprovider \
  tests/test_gpu.py
tail -3 "$logs/test_gpu.txt"
limited 200 "$logs/benchmark_ema.txt" python benchmark.py -net resnet50 -att ema \
  --configs graphs graphs-fused --steps 30 --warmup 8
grep -E "result:|EMA alone|input \(|path, all" "$logs/benchmark_ema.txt"
limited 80 "$logs/benchmark_none.txt" python benchmark.py -net resnet50 -att none \
  --configs graphs --steps 30 --warmup 8
echo; echo "== results"; grep -h "passed\|failed\|stopped by its" "$logs/test_gpu.txt" | tail -1
grep -h "result:" "$logs"/benchmark_*.txt
