#!/usr/bin/env bash
# Everything the one-GPU results need, in one go on the GPU box (from the repo root, NIXL
# wheels in .whl/): the bench (bench_h100.sh: $OUT/h100.json, $OUT/h100.txt), the tests marked
# gpu (gpu_tests.sh: $OUT/h100-gpu-tests.txt) and the demos (demo_h100.sh:
# $OUT/h100-demo.txt).  About 7 minutes; each part is bounded on its own.
set -u
bash benchmarks/gpu/bench_h100.sh
bash benchmarks/gpu/gpu_tests.sh
bash benchmarks/gpu/demo_h100.sh
