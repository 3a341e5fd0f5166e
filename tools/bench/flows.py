"""Requests across the bench's worker processes: set-up, one request, timelines."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from layoutc.runtime.plan import Plan

from ..harness import Worker
from .config import BenchError, Run
from .worker import HANDLER

Names = dict[tuple[str, int], tuple[int, str]]


def start_workers(
    devices: Sequence[str],
    labels: Sequence[str],
    deadline: float,
    env: dict[str, str] | None = None,
) -> list[Worker]:
    """One bench worker per (device, label); no wait outlives ``deadline`` by more than 20 s;
    ``env``: variables set in the workers."""
    workers = [
        Worker(HANDLER, dev, label=label, device=dev, deadline=deadline, env=env)
        for dev, label in zip(devices, labels)
    ]
    try:
        for w in workers:
            w.ready()
    except BaseException:
        for w in workers:
            w.stop(2)
        raise
    return workers


def scattered_ids(nblk: int, pool: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.choice(pool, nblk, replace=False).astype(np.int64),
        rng.choice(pool, nblk, replace=False).astype(np.int64),
    )


def setup_pair(
    workers: list[Worker],
    plan: Plan,
    kinds: list[str],
    nb_p: int,
    nb_d: int,
    ep_kwargs: dict[str, Any],
    tag: str,
    placement: list[tuple[int, str, int]],
) -> Names:
    """Endpoints: ``placement`` = [(worker index, role, rank)]; handshakes exchanged."""
    hs: dict[tuple[str, int], tuple[int, str, bytes]] = {}
    for wi, role, rank in placement:
        name = f"{tag}-{role}-{rank}"
        workers[wi].send(
            "setup", name, plan, role, rank, kinds, nb_p if role == "prefill" else nb_d, ep_kwargs
        )
    for wi, role, rank in placement:
        name = f"{tag}-{role}-{rank}"
        hs[(role, rank)] = (wi, name, workers[wi].result(300, f"setup {name}"))
    for (role, _rank), (wi, name, _) in hs.items():
        peers = [b for (r2, _k), (_w, _n, b) in hs.items() if r2 != role]
        workers[wi].call("add_peers", name, peers)
    return {k: (wi, name) for k, (wi, name, _) in hs.items()}


def run_push(
    workers: list[Worker],
    names: Names,
    rid: str,
    pre_by_worker: dict[int, list[str]],
    local: np.ndarray,
    remote: np.ndarray,
    strategy: str,
    timeout: float,
) -> tuple[float, list[dict[str, Any]]]:
    """Decode ranks expect, prefill ranks push ``local`` (prefill ids) into ``remote`` (decode
    ids); returns seconds from the first push to the last decode completion (the bytes are
    in their pages), infos of the prefill ranks."""
    return run_op(workers, names, rid, pre_by_worker, local, remote, strategy, timeout, "push")


def run_request(
    workers: list[Worker],
    names: Names,
    rid: str,
    dec_by_worker: dict[int, list[str]],
    local: np.ndarray,
    remote: np.ndarray,
    strategy: str,
    timeout: float,
    layers: list[int] | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """Prefill ranks expect (ready), decode ranks pull; returns seconds, infos."""
    return run_op(
        workers, names, rid, dec_by_worker, local, remote, strategy, timeout, "pull", layers
    )


def run_op(
    workers: list[Worker],
    names: Names,
    rid: str,
    init_by_worker: dict[int, list[str]],
    local: np.ndarray,
    remote: np.ndarray,
    strategy: str,
    timeout: float,
    op: str,
    layers: list[int] | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """The passive side's ranks ``expect`` (a prefill rank with its block ids: the request is
    ready there) and the initiators (``init_by_worker``: worker index -> session names) start
    ``op``, back to back.  Seconds: from the first start to the last initiator's completion
    (pull) or to the last target's completion (push: the bytes are in place only when the
    decode side completes).  Each info also gets ``from_ready_s``: the same, timed from the
    first ``expect`` call (a prefill rank may pack from then on) when that came first."""
    passive = "prefill" if op == "pull" else "decode"
    others = [(wi, n) for (role, _r), (wi, n) in names.items() if role == passive]
    ready = remote if op == "pull" else None  # the prefill ranks' own ids
    for wi, n in others:
        workers[wi].send("expect", n, rid, timeout_s=timeout, blocks=ready)
    for wi in init_by_worker:
        workers[wi].send(
            "pull",
            init_by_worker[wi],
            rid,
            local,
            remote,
            strategy=strategy,
            within=timeout,
            layers=layers,
            op=op,
        )
    t_ready = [workers[wi].result(what=f"expect {rid}") for wi, _n in others]
    res = [workers[wi].result(timeout + 30, f"{op} {rid}") for wi in init_by_worker]
    errs = [e for r in res for e in r["errors"]]
    ends = []
    passive_infos = []
    for wi, n in others:
        r = workers[wi].call("result", n, rid, within=timeout, timeout=timeout + 30)
        if r["error"]:
            errs.append(r["error"])
        ends.append(r["t"])
        passive_infos.append(r["info"])
    if errs:
        raise BenchError(f"request {rid} failed: {errs[0]}")
    t0 = min(r["t0"] for r in res)
    t1 = max(ends) if op == "push" else max(r["t1"] for r in res)
    infos = [i for r in res for i in r["infos"]]
    # NIXL transfers the request posted on every rank (staged chunks are posted by whoever
    # moves them: with the GPU's writer mover, the prefill ranks)
    posted = sum(int(i["descriptors"]) for i in infos) + sum(
        int(i["descriptors"]) for i in passive_infos
    )
    for i in infos:  # host seconds in pull()/push() on the slowest worker (the rest: waiting)
        i["pull_call_s"] = max(r["t_posted"] - r["t0"] for r in res)
        i["from_ready_s"] = t1 - min([t0] + t_ready)
        i["descriptors_all_ranks"] = posted
    return t1 - t0, infos


def tiny_requests(
    workers: list[Worker],
    names: Names,
    dec: dict[int, list[str]],
    db: np.ndarray,
    pb: np.ndarray,
    n: int,
) -> dict[str, Any]:
    """Latency of a one-block, one-layer request per strategy (fixed per-request costs)."""
    tiny: dict[str, Any] = {}
    for strat in ("staged", "zero-copy"):
        ts = []
        for i in range(n):
            t, infos = run_request(
                workers, names, f"tiny-{strat}-{i}", dec, db[:1], pb[:1], strat, 30.0, layers=[0]
            )
            ts.append(t)
        tiny[strat] = min(ts[2:])  # a fixed cost: noise only adds to it
        tiny[strat + "_bytes"] = sum(int(i["bytes"]) for i in infos)
        tiny[strat + "_descriptors"] = sum(int(i["descriptors"]) for i in infos)
    return tiny


def profile_staged(
    workers: list[Worker],
    names: Names,
    dec: dict[int, list[str]],
    db: np.ndarray,
    pb: np.ndarray,
    layers: list[int] | None = None,
    rid: str = "profile",
) -> dict[str, Any]:
    """One staged request with every heavy operation timed in each process: how busy each
    process was within the request, and on what (pack, write, read, unpack)."""
    for (_role, _r), (wi, n) in names.items():
        workers[wi].call("trace", n, True)
    t, _ = run_request(workers, names, rid, dec, db, pb, "staged", 60.0, layers=layers)
    traces: dict[int, list] = {}
    by_rank: list[tuple[str, list]] = []
    for (role, r), (wi, n) in names.items():
        ops = workers[wi].call("trace", n, False) or []
        traces.setdefault(wi, []).extend(ops)
        by_rank.append((f"{role} rank {r}", ops))
    out: dict[str, Any] = {"request_ms": round(t * 1e3, 2)}
    t_first = min((b for ops in traces.values() for _, b, _ in ops), default=0.0)
    timeline = []
    for wi, ops in traces.items():
        for k, b, e in ops:
            timeline.append(
                (round((b - t_first) * 1e3, 3), round((e - b) * 1e3, 3), workers[wi].label, k)
            )
    # every heavy operation and message arrival of the three processes, on one clock (ms)
    out["timeline"] = [list(x) for x in sorted(timeline)]
    out["chunks"] = chunk_timeline(by_rank, t_first)
    for wi, ops in traces.items():
        ops = [x for x in ops if not x[0].startswith(("@", "~"))]  # marks, nested spans
        if not ops:
            continue
        span = max(e for _, _, e in ops) - min(b for _, b, _ in ops)
        by: dict[str, float] = {}
        for k, b, e in ops:
            by[k] = by.get(k, 0.0) + (e - b)
        out[workers[wi].label + " process"] = {
            "busy_ms": round(sum(by.values()) * 1e3, 2),
            "span_ms": round(span * 1e3, 2),
            **{f"{k}_ms": round(v * 1e3, 2) for k, v in sorted(by.items())},
            "ops": len(ops),
        }
    return out


#: per-chunk trace marks of the staged engine, in the order a chunk meets them
CHUNK_STEPS = (
    "pack-start",
    "packed",
    "post",
    "written",
    "dat",
    "read",
    "unpack-start",
    "unpacked",
)


def chunk_timeline(
    traces: list[tuple[str, list[tuple[str, float, float]]]], t0: float
) -> list[dict[str, Any]]:
    """One row per (source rank, destination rank, chunk) of a traced staged request: when
    each step was seen, ms from ``t0`` on the host's one clock.  ``pack-start``: the pack was
    submitted to its lane (on a GPU it runs once the lane's earlier work is done);
    ``packed``: the source saw it done; ``post``: the chunk's transfer was posted;
    ``written`` (source) / ``dat`` (destination): it arrived; ``unpack-start`` /
    ``unpacked``: the destination's unpack, submitted and seen done.  ``traces``: (rank
    label, its endpoint's trace) of every rank taking part."""
    import re

    pat = re.compile(r"@(\S+) (prefill|decode) rank (\d+) c(\d+)$")
    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    for label, ops in traces:
        for what, t, _e in ops:
            hit = pat.match(what)
            if hit is None or hit[1] not in CHUNK_STEPS:
                continue
            peer = f"{hit[2]} rank {hit[3]}"
            c = int(hit[4])
            src, dst = (label, peer) if hit[2] == "decode" else (peer, label)
            row = rows.setdefault((src, dst, c), {"source": src, "destination": dst, "chunk": c})
            row.setdefault(hit[1], round((t - t0) * 1e3, 3))
    return sorted(rows.values(), key=lambda r: (r.get("pack-start", 1e18), r["chunk"]))


def run_parts(parts: list[tuple[str, Callable[[], None]]], run: Run, what: str) -> list[str]:
    """Run each ``(name, fn)`` of a section in turn; a failed part is noted (and logged) and
    the others still run; none starts after the run's deadline.  Returns the failures."""
    errs = []
    log = run.log
    for name, fn in parts:
        if time.monotonic() > run.deadline:
            errs.append(f"{name}: skipped, time limit reached")
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the other parts still run
            errs.append(f"{name}: {type(e).__name__}: {e}")
            log(f"{what} {name}: FAILED: {e}")
        run.checkpoint()
    return errs
