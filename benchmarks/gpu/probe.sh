#!/usr/bin/env bash
# Tuning probes on the GPU box (repo root, NIXL wheels in .whl/): topology, staging kernel
# variants, NIXL across two GPUs, and a traced `layoutc bench --device cuda`.  Output in $OUT.
set -u
. benchmarks/gpu/setup.sh
out=${OUT:-/tmp}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvidia-smi topo -m
  nproc; lscpu | grep -i "model name"
  timeout 120 python3 benchmarks/gpu/kernel_probe.py
  timeout 120 python3 benchmarks/gpu/xgpu_probe.py
} 2>&1 | tee "$out/probe.txt"
timeout -s INT -k 15 ${BENCH_S:-250} python3 -m layoutc bench --device cuda --json "$out/bench.json" \
  --time-limit $(( ${BENCH_S:-250} - 30 )) 2>&1 | tee "$out/bench.txt"
