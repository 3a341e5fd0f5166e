#!/usr/bin/env bash
# Host-side profile of the scattered GPU request, then `layoutc bench --device cuda`
# (GPU box, repo root, NIXL wheels in .whl/).  Output in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/site/layoutc
for d in compiler runtime grammar specs; do ln -sfn "$PWD/$d" /tmp/site/layoutc/$d; done
cp compiler/pkg/__init__.py compiler/pkg/__main__.py /tmp/site/layoutc/
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 NIXL_LOG_LEVEL=WARN
out=${OUT:-/tmp}
timeout 180 python3 benchmarks/gpu/host_profile.py 5 > "$out/host_profile.txt" 2>&1
timeout -s INT -k 15 ${BENCH_S:-200} python3 -m layoutc bench --device cuda --json "$out/bench.json" \
  --time-limit $(( ${BENCH_S:-200} - 30 )) > "$out/bench.txt" 2>&1
