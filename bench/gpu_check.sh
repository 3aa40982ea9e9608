#!/usr/bin/env bash
# The checks that need a GPU, in one pass: the CUDA tests (skipped on CPU-only machines, CI included), a job
# killed and resumed on the GPU, and the sensitivity and optimizer benchmarks on it.
#   bash bench/gpu_check.sh [OUTDIR]     (python3 must hold a CUDA build of torch and the project's dependencies)
set -u -o pipefail
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$out/device.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_ivon_cuda.py tests/test_worker_device.py \
  tests/test_sensitivity_exact.py tests/test_sensitivity_inputs.py tests/test_ivon_optimizer.py tests/test_worker.py \
  -k "cuda or device or killed_worker" -rs -s 2>&1 | tee "$out/tests.log"
timeout 200 python3 bench/sensitivity.py --device cuda --n-cnn 2048 2>&1 | tee "$out/bench_sensitivity.log"
timeout 90 python3 bench/optimizer.py --device cuda --quick 2>&1 | tee "$out/bench_optimizer.log"
