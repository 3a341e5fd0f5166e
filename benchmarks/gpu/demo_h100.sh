#!/usr/bin/env bash
# The GPU demo runs recorded in benchmarks/results/ (run on the GPU box from the repo root,
# with the NIXL wheel carried in .whl/; see README "Installing").
set -u
. benchmarks/gpu/setup.sh
out=${OUT:-/tmp}/h100-demo.txt
{
  echo "# $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
  echo "# python $(python3 -V 2>&1), torch $(python3 -c 'import torch; print(torch.__version__)')"
  for cmd in \
    "layoutc doctor" \
    "layoutc demo --device cuda --prefill-tp 1 --decode-tp 1 --mode pull --quiet" \
    "layoutc demo --device cuda --prefill-tp 1 --decode-tp 1 --mode push --quiet" \
    "layoutc demo --device cuda --mode pull --quiet" \
    "layoutc demo --device cuda --mode push --quiet" \
    "layoutc demo --device cuda --strategy staged --mode pull --quiet" \
    "layoutc demo --device cuda --prefill-tp 1 --decode-tp 1 --inject kill-prefill --quiet"; do
    echo
    echo "\$ $cmd"
    start=$(date +%s.%N)
    timeout -s INT -k 10 90 python3 -m layoutc ${cmd#layoutc } 2>&1
    echo "[exit $? after $(python3 -c "import time; print(round(time.time() - $start, 1))") s]"
  done
} | tee "$out"
