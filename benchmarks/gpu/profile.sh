#!/usr/bin/env bash
# Host-side profile of the scattered GPU request, then `layoutc bench --device cuda`
# (GPU box, repo root, NIXL wheels in .whl/).  Output in $OUT.
set -u
. benchmarks/gpu/setup.sh
out=${OUT:-/tmp}
timeout 180 python3 benchmarks/gpu/host_profile.py 5 > "$out/host_profile.txt" 2>&1
timeout -s INT -k 15 ${BENCH_S:-200} python3 -m layoutc bench --device cuda --json "$out/bench.json" \
  --time-limit $(( ${BENCH_S:-200} - 30 )) > "$out/bench.txt" 2>&1
