#!/usr/bin/env bash
# The tests marked `gpu` (VRAM endpoints, the staged pipeline on CUDA streams, host staging
# beside GPU pages), run on the GPU box from the repo root with the NIXL wheels in .whl/.
# Writes their summary to $OUT/h100-gpu-tests.txt (committed as
# benchmarks/results/h100-gpu-tests.txt).  GPU_TESTS_TIMEOUT caps the run (default 240 s);
# GPU_TESTS names other test files.
set -u
. benchmarks/gpu/setup.sh
out=${OUT:-/tmp}/h100-gpu-tests.txt
{
  echo "# $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
  echo "# python $(python3 -V 2>&1), torch $(python3 -c 'import torch; print(torch.__version__)')"
  cmd="python3 -m pytest -m gpu -p no:cacheprovider -rA --durations=10 ${GPU_TESTS:-tests/runtime/test_gpu_endpoints.py tests/runtime/test_gpu_pipeline.py}"
  echo "\$ $cmd"
  start=$(date +%s.%N)
  LAYOUTC_TEST_WORKERS=6 timeout -s INT -k 15 ${GPU_TESTS_TIMEOUT:-240} $cmd
  echo "[exit $? after $(python3 -c "import time; print(round(time.time() - $start, 1))") s]"
} 2>&1 | tee "$out"
