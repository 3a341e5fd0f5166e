"""Compile cost against kernel blocks (docs/design.md §8, "Compile").

A 128-layer hybrid (vllm_hybrid_mamba2 with Nemotron-3-Nano's shapes: 16 attention and 112
Mamba2 layers) compiled for every pair of {1, 2, 4, 8, 16}^2, at kernel_blocks 131 (what the
shipped Nemotron specs use) and at kernel_blocks 1, in the same run.  Each measurement is one
`python -m layoutc compile` process: its CPU time (user + sys, from wait4) and its wall time.
The two settings alternate, so drift on a shared box hits both alike; the medians are reported.

    python benchmarks/compile_cost.py [--runs 5] [--json benchmarks/results/compile-cost-cpu.json]

Targets: CPU time at kernel_blocks 131 under 2 s, and within 1.5x of kernel_blocks 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = """\
# A 128-layer hybrid with Nemotron-3-Nano-30B-A3B's shapes (the compile-cost benchmark).
use "vllm_hybrid_mamba2.layout" {
  num_key_value_heads  = 2
  head_dim             = 128
  num_attention_layers = 16
  num_mamba_layers     = 112
  mamba_num_heads      = 64
  mamba_head_dim       = 64
  n_groups             = 8
  ssm_state_size       = 128
  conv_kernel          = 4
  conv_dtype           = bf16
  ssm_dtype            = fp32
}
"""
TPS = (1, 2, 4, 8, 16)
PAIRS = ",".join(f"{p}:{d}" for p in TPS for d in TPS)
KERNEL_BLOCKS = (1, 131)
CPU_TARGET_S = 2.0
RATIO_TARGET = 1.5


def compile_once(spec: Path, out: Path, kernel_blocks: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one compile in a fresh process."""
    argv = [sys.executable, "-m", "layoutc", "compile", str(spec), "-o", str(out)]
    argv += ["--set", f"kernel_blocks={kernel_blocks}", "--tp-pairs", PAIRS]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"compile failed (kernel_blocks {kernel_blocks}):\n{err}")
    return usage.ru_utime + usage.ru_stime, wall


def machine() -> dict[str, object]:
    return {
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="compiles per setting (default 5)")
    ap.add_argument("--json", metavar="FILE", help="write the results here")
    ap.add_argument("--machine", default="", help="a name for the machine, kept in the JSON")
    args = ap.parse_args(argv)
    runs: dict[int, list[tuple[float, float]]] = {kb: [] for kb in KERNEL_BLOCKS}
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "hybrid_128.layout"
        spec.write_text(SPEC)
        compile_once(spec, Path(tmp) / "warm", 1)  # file caches, .pyc
        for i in range(args.runs):
            for kb in KERNEL_BLOCKS:
                runs[kb].append(compile_once(spec, Path(tmp) / f"out-{kb}-{i}", kb))
                print(
                    f"kernel_blocks {kb:>3}: cpu {runs[kb][-1][0]:.3f} s, "
                    f"wall {runs[kb][-1][1]:.3f} s",
                    file=sys.stderr,
                )
    result: dict[str, object] = {}
    for kb in KERNEL_BLOCKS:
        cpu = [c for c, _ in runs[kb]]
        wall = [w for _, w in runs[kb]]
        result[f"kernel_blocks_{kb}"] = {
            "cpu_s_median": round(statistics.median(cpu), 4),
            "cpu_s_spread": [round(min(cpu), 4), round(max(cpu), 4)],
            "wall_s_median": round(statistics.median(wall), 4),
            "wall_s_spread": [round(min(wall), 4), round(max(wall), 4)],
        }
    cpu_131 = statistics.median(c for c, _ in runs[131])
    cpu_1 = statistics.median(c for c, _ in runs[1])
    ratio = cpu_131 / cpu_1
    doc = {
        "benchmark": "compile cost against kernel blocks",
        "spec": "vllm_hybrid_mamba2, Nemotron-3-Nano shapes, 16 attention + 112 Mamba2 layers",
        "pairs": PAIRS,
        "runs": args.runs,
        "machine": {"name": args.machine, **machine()},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "benchmarks/compile_cost.py", *(argv or sys.argv[1:])]),
        **result,
        "cpu_ratio_131_to_1": round(ratio, 3),
        "targets": {
            "cpu_s_kernel_blocks_131": {
                "value": round(cpu_131, 4),
                "target": f"< {CPU_TARGET_S}",
                "met": cpu_131 < CPU_TARGET_S,
            },
            "cpu_ratio_131_to_1": {
                "value": round(ratio, 3),
                "target": f"<= {RATIO_TARGET}",
                "met": ratio <= RATIO_TARGET,
            },
        },
    }
    text = json.dumps(doc, indent=2) + "\n"
    if args.json:
        Path(args.json).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
