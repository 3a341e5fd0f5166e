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
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np


def _schedule(requests: int, num_blocks: int, max_len: int, seed: int):
    """The same request list on every rank: (rid, length, prefill blocks).

    Prefill blocks are any scattered blocks (they are only read); each decode rank takes its
    destination blocks from its own free list when it posts a request and returns them once
    the request is verified, so no two requests in flight ever write one block.
    """
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, max_len + 1, size=requests)
    return [(f"r{i}", int(n), rng.integers(0, num_blocks, size=int(n))) for i, n in enumerate(lens)]


def _worker(role, rank, plan, args, conn):
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    import torch

    torch.set_num_threads(1)
    from .endpoint import Endpoint, allocate_buffers, layer_kind_sequence
    from .tags import PageTagger, block_keys

    side = plan.prefill if role == "prefill" else plan.decode
    kinds = layer_kind_sequence(plan, args["layers"])
    nb = args["num_blocks"]
    ep = Endpoint(plan, role, rank, engine=f"load-{role}", timeout_s=args["timeout_s"])
    bufs = allocate_buffers(plan, role, kinds, nb)
    taggers = {p: PageTagger(side, rank, p) for p in side.page_names}

    def views():
        for li, layer in enumerate(bufs):
            for page, t in layer.items():
                yield li, page, t.numpy().reshape(nb, side.page(page).logical_stride)

    if role == "prefill":  # tag every block once: its identity is (layer, block)
        every = np.arange(nb)
        for li, page, v in views():
            taggers[page].fill(v, every, block_keys(li, 0, every))
    ep.register_layers(bufs, kinds)
    base = ep.stats()
    conn.send(ep.handshake_bytes())
    peers = conn.recv()
    for data in peers:
        ep.add_peer(data)
    conn.send("ready")
    conn.recv()  # go
    sched = _schedule(args["requests"], nb, args["max_len"], args["seed"])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lat: list[float] = []
    failures: dict[str, str] = {}
    checked = 0
    t0 = time.monotonic()
    if role == "prefill":
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
                for li, page, v in views():  # every state byte of the request's blocks
                    got = v[d]
                    for off, t in taggers[page].tags(block_keys(li, 0, p)):
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
    wall = time.monotonic() - t0
    st = ep.stats()
    conn.send(
        {
            "role": role,
            "rank": rank,
            "wall_s": wall,
            "latencies": lat,
            "failures": failures,
            "checked_bytes": checked,
            "stats": st,
            "base": base,
            "rss_kib": [rss0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss],
        }
    )
    conn.recv()  # close together, so nobody sees a peer vanish mid-run
    ep.close()
    conn.send(ep.stats())


def run(plan, args: dict) -> dict:
    """Run the load test of `plan` (see the module docstring); `args` as built by `main`."""
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for role, tp in (("prefill", plan.prefill_tp), ("decode", plan.decode_tp)):
        for r in range(tp):
            a, b = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(role, r, plan, args, b), daemon=True)
            p.start()
            procs.append(p)
            conns.append((role, a))
    hs = [c.recv() for _, c in conns]
    for role, c in conns:
        other = "decode" if role == "prefill" else "prefill"
        c.send([h for (rl, _), h in zip(conns, hs) if rl == other])
    for _, c in conns:
        assert c.recv() == "ready"
    t0 = time.monotonic()
    for _, c in conns:
        c.send("go")
    res = []
    for _, c in conns:
        if not c.poll(args["timeout_s"] * 6):
            raise SystemExit("load test: a rank did not report in time")
        res.append(c.recv())
    wall = time.monotonic() - t0
    for _, c in conns:
        c.send("close")
    closed = [c.recv() for _, c in conns]
    for p in procs:
        p.join(30)
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


def main(plan_for, argv=None) -> int:
    """`plan_for(prefill_tp, decode_tp)` gives the plan (the caller compiles it)."""
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
    out = run(plan_for(a.prefill_tp, a.decode_tp), args)
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0 if out["failures"] == 0 and not out["handle_leaks"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
