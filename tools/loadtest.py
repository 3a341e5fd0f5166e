"""Load test: many concurrent requests of mixed lengths through real NIXL endpoints.

    python benchmarks/load_test.py [--requests 1000] [--window 16]
        [--prefill-tp 2] [--decode-tp 4] [--json benchmarks/results/load-cpu.json]

One process per prefill and per decode rank (host memory, UCX), the built-in demo model
(hybrid attention + Mamba2, KV heads and B/C groups replicated at decode TP 4).  Prefill pages
are tagged once per (layer, block): every byte derives from its logical identity.  Each decode
rank pulls every request — random lengths, random scattered blocks on both sides — keeping
``--window`` requests in flight, and verifies every byte of a request's blocks as soon as it
completes.  Each prefill rank `expect`s every request and checks it completed after exactly
``len(plan.readers(p))`` notifications.  At the end every endpoint reports its NIXL handles and
registrations (they must be back to what set-up created) and its peak RSS.

Reported: requests/s (the engine's requests, each complete on every decode rank), per-rank
request latency p50/p99 (post to completion), failures, bytes, descriptors, RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from layoutc.runtime.plan import Plan

from .harness import Worker

_HANDLER = "layoutc.tools.loadtest:LoadRank"


def _schedule(requests: int, num_blocks: int, max_len: int, seed: int):
    """The same request list on every rank: (rid, length, prefill blocks).

    Prefill blocks are any scattered blocks (they are only read); each decode rank takes its
    destination blocks from its own free list when it posts a request and returns them once
    the request is verified, so no two requests in flight ever write one block.
    """
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, max_len + 1, size=requests)
    return [(f"r{i}", int(n), rng.integers(0, num_blocks, size=int(n))) for i, n in enumerate(lens)]


class LoadRank:
    """One rank of the load test, inside its worker process."""

    def __init__(self, channel: Any, role: str, rank: int, plan: Plan, args: dict[str, Any]):
        from layoutc.runtime.endpoint import Endpoint, allocate_buffers, layer_kind_sequence
        from layoutc.runtime.tags import PageTagger, block_keys

        self.role, self.rank, self.plan, self.args = role, rank, plan, args
        self.side = side = plan.prefill if role == "prefill" else plan.decode
        kinds = layer_kind_sequence(plan, args["layers"])
        self.nb = nb = args["num_blocks"]
        self.ep = Endpoint(plan, role, rank, engine=f"load-{role}", timeout_s=args["timeout_s"])
        self.bufs = allocate_buffers(plan, role, kinds, nb)
        self.taggers = {p: PageTagger(side, rank, p) for p in side.page_names}
        if role == "prefill":  # tag every block once: its identity is (layer, block)
            every = np.arange(nb)
            for li, page, v in self._views():
                self.taggers[page].fill(v, every, block_keys(li, 0, every))
        self.ep.register_layers(self.bufs, kinds)
        self.base = self.ep.stats()

    def _views(self) -> Iterator[tuple[int, str, np.ndarray]]:
        for li, layer in enumerate(self.bufs):
            for page, t in layer.items():
                yield li, page, t.numpy().reshape(self.nb, self.side.page(page).logical_stride)

    def handshake(self) -> bytes:
        return bytes(self.ep.handshake_bytes())

    def add_peers(self, blobs: list[bytes]) -> None:
        for data in blobs:
            self.ep.add_peer(data)

    def run(self) -> dict[str, Any]:
        from layoutc.runtime.tags import block_keys

        ep, args, plan, rank = self.ep, self.args, self.plan, self.rank
        nb = self.nb
        sched = _schedule(args["requests"], nb, args["max_len"], args["seed"])
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        lat: list[float] = []
        failures: dict[str, str] = {}
        checked = 0
        t0 = time.monotonic()
        if self.role == "prefill":
            for rid, _, _ in sched:
                ep.expect(rid, timeout_s=args["timeout_s"] * 4)
            pending = {rid for rid, _, _ in sched}
            want = len(plan.readers(rank))
            while pending and time.monotonic() - t0 < args["timeout_s"] * 4:
                done, failed = ep.poll()
                for rid in done:
                    info = ep.completion_info(rid)
                    if len(info["peers"]) != want:
                        failures[rid] = (
                            f"completed after {len(info['peers'])} notifications, not {want}"
                        )
                    pending.discard(rid)
                for rid, err in failed.items():
                    failures[rid] = str(err)
                    pending.discard(rid)
                if not done and not failed:
                    time.sleep(0.0005)
            for rid in pending:
                failures[rid] = "never completed"
        else:
            by_rid = {rid: (n, p) for rid, n, p in sched}
            queue = [rid for rid, _, _ in sched]
            free = deque(np.random.default_rng(args["seed"] + 1 + rank).permutation(nb).tolist())
            inflight: dict[str, float] = {}
            dst: dict[str, np.ndarray] = {}
            nxt = 0
            while (nxt < len(queue) or inflight) and time.monotonic() - t0 < args["timeout_s"] * 4:
                while nxt < len(queue) and len(inflight) < args["window"]:
                    rid = queue[nxt]
                    n, p = by_rid[rid]
                    dst[rid] = np.array([free.popleft() for _ in range(n)], dtype=np.int64)
                    inflight[rid] = time.monotonic()
                    ep.pull(rid, dst[rid], p)
                    nxt += 1
                done, failed = ep.poll()
                now = time.monotonic()
                for rid in done:
                    lat.append(now - inflight.pop(rid))
                    d, p = dst[rid], by_rid[rid][1]
                    for li, page, v in self._views():  # every state byte of the request's blocks
                        got = v[d]
                        for off, t in self.taggers[page].tags(block_keys(li, 0, p)):
                            if not np.array_equal(got[:, off : off + t.shape[1]], t):
                                failures[rid] = f"wrong bytes in layer {li} page {page} at {off}"
                            checked += t.size
                    free.extend(dst.pop(rid).tolist())
                for rid, err in failed.items():
                    inflight.pop(rid, None)
                    free.extend(dst.pop(rid).tolist())
                    failures[rid] = str(err)
                if not done and not failed:
                    time.sleep(0.0002)
            for rid in list(inflight) + queue[nxt:]:
                failures[rid] = "never completed"
        return {
            "role": self.role,
            "rank": rank,
            "wall_s": time.monotonic() - t0,
            "latencies": lat,
            "failures": failures,
            "checked_bytes": checked,
            "stats": ep.stats(),
            "base": self.base,
            "rss_kib": [rss0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss],
        }

    def close(self) -> dict[str, Any]:
        self.ep.close()
        return self.ep.stats().to_dict()


def run(plan: Plan, args: dict[str, Any]) -> dict[str, Any]:
    """Run the load test of ``plan`` (see the module docstring); ``args`` as built by ``main``."""
    specs = [
        (role, r)
        for role, tp in (("prefill", plan.prefill_tp), ("decode", plan.decode_tp))
        for r in range(tp)
    ]
    workers = [
        Worker(_HANDLER, role, r, plan, args, label=f"load {role} rank {r}") for role, r in specs
    ]
    try:
        for w in workers:
            w.ready()
        hs = [w.call("handshake") for w in workers]
        for (role, _), w in zip(specs, workers):
            w.call("add_peers", [h for (rl, _), h in zip(specs, hs) if rl != role])
        t0 = time.monotonic()
        for w in workers:
            w.send("run")
        res = [w.result(args["timeout_s"] * 6, "run") for w in workers]
        wall = time.monotonic() - t0
        # close together, so nobody sees a peer vanish mid-run
        closed = [w.stop(30) or {} for w in workers]
    finally:
        for w in workers:
            w.stop(5)
    lat = sorted(x for r in res for x in r["latencies"])
    failures = {
        f"{r['role']} rank {r['rank']}: {k}": v for r in res for k, v in r["failures"].items()
    }
    leaks = []
    for r, after in zip(res, closed):
        who = f"{r['role']} rank {r['rank']}"
        if r["stats"]["xfer_handles_open"]:
            leaks.append(f"{who}: {r['stats']['xfer_handles_open']} transfer handles open")
        if r["stats"]["registrations"] != r["base"]["registrations"]:
            leaks.append(
                f"{who}: registrations {r['base']['registrations']} -> {r['stats']['registrations']}"
            )
        for k in ("xfer_handles_open", "dlist_handles_open", "registrations"):
            if after.get(k):
                leaks.append(f"{who}: {after[k]} {k} after close")
    dec = [r for r in res if r["role"] == "decode"]
    out = {
        "command": " ".join(["benchmarks/load_test.py", *sys.argv[1:]]),
        "machine": {
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "card": None,
        "spec": "vllm_hybrid_mamba2 (built-in demo values)",
        "prefill_tp": plan.prefill_tp,
        "decode_tp": plan.decode_tp,
        "requests": args["requests"],
        "window": args["window"],
        "blocks_per_request": [1, args["max_len"]],
        "layers": args["layers"],
        "wall_s": round(wall, 3),
        "requests_per_s": round(args["requests"] / wall, 1),
        "latency_ms_p50": round(1e3 * statistics.median(lat), 3) if lat else None,
        "latency_ms_p99": round(1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3)
        if lat
        else None,
        "failures": len(failures),
        "failure_examples": dict(list(failures.items())[:5]),
        "verified_bytes": sum(r["checked_bytes"] for r in dec),
        "bytes_posted": sum(r["stats"]["bytes_posted"] for r in dec),
        "descriptors_posted": sum(r["stats"]["descriptors_posted"] for r in dec),
        "handle_leaks": leaks,
        "peak_rss_mib": round(max(r["rss_kib"][1] for r in res) / 1024, 1),
        "rss_growth_mib_max": round(max(r["rss_kib"][1] - r["rss_kib"][0] for r in res) / 1024, 1),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/load_test.py`` (the built-in demo model)."""
    from layoutc.compiler.api import compile_builtin

    from .demo import DEMO_SETS, DEMO_SPEC

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--window", type=int, default=16, help="requests in flight per decode rank")
    ap.add_argument("--max-len", type=int, default=32, help="most blocks in one request")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--num-blocks", type=int, default=1024)
    ap.add_argument("--prefill-tp", type=int, default=2)
    ap.add_argument("--decode-tp", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    if a.window * a.max_len > a.num_blocks:
        ap.error("--window x --max-len must fit in --num-blocks")
    args = dict(
        requests=a.requests,
        window=a.window,
        max_len=a.max_len,
        layers=a.layers,
        num_blocks=a.num_blocks,
        prefill_tp=a.prefill_tp,
        decode_tp=a.decode_tp,
        timeout_s=a.timeout,
        seed=a.seed,
    )
    out = run(compile_builtin(DEMO_SPEC, a.prefill_tp, a.decode_tp, dict(DEMO_SETS)), args)
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0 if out["failures"] == 0 and not out["handle_leaks"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
