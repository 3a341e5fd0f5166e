#!/usr/bin/env bash
# `layoutc bench --device cuda` on one GPU (run on the GPU box from the repo root, with the
# NIXL wheels carried in .whl/, like demo_h100.sh).  Writes $OUT/h100.json (the JSON of the
# bench, with the command line in it) and $OUT/h100.txt (the table and the log).
#
# Sections: the scattered and contiguous requests against a torch copy (gpu), the scattered
# request over an emulated 5-60 GB/s link (link), a closed loop of 64 MiB requests at
# concurrency 1, 8, 32 (concurrency), Llama-70B P8->D4 and Nemotron-3-Nano P4->D2 requests
# with every rank a process (engines).  BENCH_ARGS adds arguments (e.g. "--quick" or
# "--sections gpu,link").
#
# Bounded: the bench stops starting new measurements at --time-limit (240 s) and every wait
# for a worker process is capped by it; `timeout` interrupts the whole run at 280 s (SIGINT,
# so worker processes are stopped and the JSON measured so far is kept) and kills it 15 s
# later.  The table is printed at the end in every case (from the JSON when interrupted).
set -u
. benchmarks/gpu/setup.sh
export UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y   # the runtime sets it too; here for the record
out=${OUT:-/tmp}
json="$out/h100.json"
rm -f "$json"
{
  echo "# $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
  echo "# python $(python3 -V 2>&1), torch $(python3 -c 'import torch; print(torch.__version__)')"
  cmd="layoutc bench --device cuda --json $json --time-limit ${BENCH_TIME_LIMIT:-240} ${BENCH_ARGS:-}"
  echo "\$ $cmd"
  start=$(date +%s.%N)
  timeout -s INT -k 15 $(( ${BENCH_TIME_LIMIT:-240} + 40 )) python3 -m layoutc ${cmd#layoutc }
  code=$?
  echo "[exit $code after $(python3 -c "import time; print(round(time.time() - $start, 1))") s]"
  if [ "$code" -eq 137 ] && [ -f "$json" ]; then  # killed before it could print
    echo "# interrupted: the table from what $json holds"
    python3 -c "import json, sys; from layoutc.tools.bench import format_table; print(format_table(json.load(open(sys.argv[1]))))" "$json"
  fi
} 2>&1 | tee "$out/h100.txt"
