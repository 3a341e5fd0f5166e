#!/usr/bin/env bash
# Two GPUs of one host (run on the GPU box from the repo root, NIXL wheels in .whl/, see
# README "Installing"): the demo with prefill ranks on GPU 0 and decode ranks on GPU 1, pull
# and push, 1 -> 2 and 2 -> 1, then `layoutc bench --device cuda --gpus 2`.
# Writes $OUT/h100-x2-demo.txt, $OUT/h100-x2.json and $OUT/h100-x2.txt.
set -u
. benchmarks/gpu/setup.sh
out=${OUT:-/tmp}
run() {  # a command line, its output, exit code and wall time
  echo
  echo "\$ $1"
  local start=$(date +%s.%N)
  timeout -s INT -k 15 "$2" python3 -m layoutc ${1#layoutc } 2>&1
  echo "[exit $? after $(python3 -c "import time; print(round(time.time() - $start, 1))") s]"
}
{
  echo "# $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | sort | uniq -c)"
  nvidia-smi topo -m | head -3
  for args in "--prefill-tp 1 --decode-tp 2 --mode pull" "--prefill-tp 1 --decode-tp 2 --mode push" \
              "--prefill-tp 2 --decode-tp 1 --mode pull" "--prefill-tp 2 --decode-tp 1 --mode push"; do
    run "layoutc demo --device cuda --prefill-gpus 0 --decode-gpus 1 $args --quiet" 60
  done
} 2>&1 | tee "$out/h100-x2-demo.txt"
{
  echo "# $(date -u +%FT%TZ)"
  run "layoutc bench --device cuda --gpus 2 --json $out/h100-x2.json --time-limit ${BENCH_S:-360}" $(( ${BENCH_S:-360} + 30 ))
} 2>&1 | tee "$out/h100-x2.txt"
