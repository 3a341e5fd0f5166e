#!/usr/bin/env bash
# Tuning probes on the GPU box (repo root, NIXL wheels in .whl/): topology, staging kernel
# variants, NIXL across two GPUs, and a traced `layoutc bench --device cuda`.  Output in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/site/layoutc
for d in compiler runtime grammar specs; do ln -sfn "$PWD/$d" /tmp/site/layoutc/$d; done
cp compiler/pkg/__init__.py compiler/pkg/__main__.py /tmp/site/layoutc/
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 NIXL_LOG_LEVEL=WARN
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
