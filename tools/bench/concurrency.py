"""Request latency under concurrency: a closed loop of scattered P1 -> D2 requests.

``c`` requests are in flight at all times: each completion is replaced at once by a new
request.  The prefill rank's worker drives the loop: it marks a request ready (``expect``
with its block ids, the moment prefill would hand the request over) and publishes it in a
small shared table (a memory-mapped file); each decode rank's worker pulls every published
request (``auto``) and records when it completed there.  A request's latency is ready ->
complete: from the prefill's ``expect`` to the later of the two decode ranks' completions
(one monotonic clock for the host).  ``c`` warm-up requests, then ``20 c`` measured ones.

In-flight requests never share destination blocks: the block pool is cut into ``2 c`` random
sets, and a request takes a set no other request in flight holds (as an engine's allocator
would); its prefill blocks are the matching set on the prefill side.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from layoutc.runtime.plan import Plan

from .config import BenchError, MiB, Run, round_to
from .flows import setup_pair, start_workers

#: shared table: [issued, aborted] + per request: ready time, set, done time per decode rank
_HEAD = 2


def table_path(tmpdir: str, n: int) -> str:
    path = os.path.join(tmpdir, "closed-loop.bin")
    np.zeros(_HEAD + 4 * n, dtype=np.float64).tofile(path)
    return path


class Table:
    """The closed loop's shared table, mapped into each worker."""

    def __init__(self, path: str, n: int) -> None:
        self.mm = np.memmap(path, dtype=np.float64, mode="r+", shape=(_HEAD + 4 * n,))
        self.n = n
        self.head = self.mm[:_HEAD]
        self.ready = self.mm[_HEAD : _HEAD + n]
        self.set_of = self.mm[_HEAD + n : _HEAD + 2 * n]
        self.done = self.mm[_HEAD + 2 * n :].reshape(2, n)

    @property
    def issued(self) -> int:
        return int(self.head[0])

    @property
    def aborted(self) -> bool:
        return bool(self.head[1])


def closed_loop_prefill(sess: Any, path: str, n: int, c: int, sets: np.ndarray, within: float):
    """The driver (in the prefill rank's worker): keep ``c`` requests in flight until ``n``
    were issued and all completed; returns the prefill's own failures."""
    tab = Table(path, n)
    ep = sess.ep
    free = list(range(sets.shape[0]))
    holding: dict[int, int] = {}  # request -> set, while a decode rank has not completed it
    rng = np.random.default_rng(c)
    issued = done_both = 0
    errors: list[str] = []
    pending: set[str] = set()
    end = time.monotonic() + within
    while done_both < n or pending:
        prog = ep.poll()
        for rid in prog.done:
            pending.discard(rid)
        for rid, err in prog.failed.items():
            pending.discard(rid)
            errors.append(f"{rid}: {err}")
        for i in list(holding):
            if tab.done[0, i] > 0 and tab.done[1, i] > 0:
                free.append(holding.pop(i))
                done_both += 1
        while issued < n and issued - done_both < c and free and not errors:
            k = free.pop(int(rng.integers(len(free))))
            holding[issued] = k
            tab.set_of[issued] = k
            rid = f"cl{c}-{issued}"
            tab.ready[issued] = time.monotonic()
            ep.expect(rid, timeout_s=60.0, blocks=sets[k])
            pending.add(rid)
            issued += 1
            tab.head[0] = issued  # published after its set and ready time
        if errors or tab.aborted or time.monotonic() > end:
            tab.head[1] = 1
            if not errors and not tab.aborted:
                errors.append(f"closed loop at {c}: {done_both} of {n} done in {within:.0f} s")
            break
    return errors


def closed_loop_decode(
    sess: Any,
    path: str,
    n: int,
    c: int,
    index: int,
    sets_local: np.ndarray,
    sets_remote: np.ndarray,
    within: float,
    strategy: str,
):
    """A decode rank's side: pull every published request, record its completion."""
    tab = Table(path, n)
    ep = sess.ep
    nxt = 0
    done = 0
    errors: list[str] = []
    chosen: dict[str, int] = {}
    end = time.monotonic() + within
    while done < n and not tab.aborted:
        issued = tab.issued
        while nxt < issued:
            k = int(tab.set_of[nxt])
            ep.pull(f"cl{c}-{nxt}", sets_local[k], sets_remote[k], strategy=strategy)
            nxt += 1
        prog = ep.poll()
        now = time.monotonic()
        for rid in prog.done:
            i = int(rid.rsplit("-", 1)[1])
            tab.done[index, i] = now
            done += 1
            info = ep.completion_info(rid)
            for s in info.strategies.values():
                chosen[s] = chosen.get(s, 0) + 1
        for rid, err in prog.failed.items():
            errors.append(f"{rid}: {err}")
        if errors:
            tab.head[1] = 1
            break
        if time.monotonic() > end:
            errors.append(f"decode {index}: {done} of {n} done in {within:.0f} s")
            tab.head[1] = 1
            break
    return {"errors": errors, "chosen": chosen}


def bench_concurrency(compile_plan: Callable[..., Plan], run: Run, cross: bool = False) -> None:
    """Closed loop at each concurrency of ``cfg.concurrency_levels``: p50/p99 ready ->
    complete, aggregate GB/s, against a torch copy on the device.  ``cross``: the prefill
    rank on the first device of ``cfg.xgpu_devices``, the decode ranks on the second, against
    a torch peer copy between them (keys ``xgpu_concurrency_*``, ``..._fraction_of_peer_copy``)."""
    cfg, out, log = run.cfg, run.out, run.log
    src, dst = cfg.xgpu_devices if cross else (cfg.gpu_worker_device,) * 2
    base = "xgpu_concurrency" if cross else "gpu_concurrency"
    of_copy = "fraction_of_peer_copy" if cross else "fraction_of_copy"
    params = dict(num_key_value_heads=4, head_dim=128, block_size=16)
    layers = cfg.concurrency_layers
    plan = compile_plan("vllm_flashinfer", 1, 2, dict(params, num_layers=layers))
    per_block = sum(int(g.nbytes) * g.count for g in plan.rank(0).posts)  # per decode rank
    nblk = max(1, cfg.concurrency_request_bytes // (2 * per_block * layers))
    req_bytes = 2 * nblk * layers * per_block
    top = max(cfg.concurrency_levels)
    n_sets = 2 * top
    pool = n_sets * nblk
    rng = np.random.default_rng(17)
    sets_p = rng.permutation(pool).reshape(n_sets, nblk).astype(np.int64)
    sets_d = rng.permutation(pool).reshape(n_sets, nblk).astype(np.int64)
    workers = start_workers([src, dst, dst], ["prefill", "decode-0", "decode-1"], run.deadline)
    ep_kw = dict(
        timeout_s=60.0,
        staging_bytes=cfg.concurrency_staging_bytes,
        staging_slots=cfg.concurrency_staging_slots,
    )
    res: dict[str, Any] = {}
    try:
        placement = [(0, "prefill", 0), (1, "decode", 0), (2, "decode", 1)]
        names = setup_pair(workers, plan, ["attention"] * layers, pool, pool, ep_kw, "q", placement)
        pre = names[("prefill", 0)][1]
        decs = [names[("decode", 0)][1], names[("decode", 1)][1]]
        copy_bytes = cfg.gpu_bytes_per_decode_rank * 2
        if cross:
            copy = workers[0].call("peer_copy_rate", copy_bytes, src, dst, 7, timeout=120)
        else:
            copy = workers[0].call("copy_rate", copy_bytes, 7, timeout=120)
        copy_Bps = copy_bytes / statistics.median(copy)
        out[f"{base}_{'peer_' if cross else ''}copy_GBps"] = round_to(copy_Bps / 1e9, 4)
        log(
            f"{base}: {req_bytes / MiB:.0f} MiB requests (P1->D2, {nblk} scattered "
            f"blocks per decode rank), closed loop at c = "
            f"{', '.join(str(c) for c in cfg.concurrency_levels)}"
        )
        for wi in (1, 2):
            workers[wi].call("zero", decs[wi - 1])
        with tempfile.TemporaryDirectory(prefix="layoutc-bench-", dir=_shm_dir()) as tmp:
            for c in cfg.concurrency_levels:
                run.check_time()
                n = 21 * c
                path = table_path(tmp, n)
                within = max(10.0, min(120.0, run.deadline - time.monotonic()))
                workers[0].send("closed_loop_prefill", pre, path, n, c, sets_p, within)
                for wi in (1, 2):
                    workers[wi].send(
                        "closed_loop_decode",
                        decs[wi - 1],
                        path,
                        n,
                        c,
                        wi - 1,
                        sets_d,
                        sets_p,
                        within,
                        cfg.strategy,
                    )
                errs = list(workers[0].result(within + 60, f"closed loop {c} (prefill)"))
                chosen: dict[str, int] = {}
                for wi in (1, 2):
                    r = workers[wi].result(within + 60, f"closed loop {c} (decode)")
                    errs += r["errors"]
                    for k, v in r["chosen"].items():
                        chosen[k] = chosen.get(k, 0) + v
                if errs:
                    raise BenchError(f"closed loop at concurrency {c}: {errs[0]}")
                tab = Table(path, n)
                ready = np.array(tab.ready[c:])
                done = np.max(np.array(tab.done[:, c:]), axis=0)
                lat = (done - ready) * 1e3
                span = float(done.max() - ready.min())
                p50 = float(np.percentile(lat, 50))
                p99 = float(np.percentile(lat, 99))
                gbps = (n - c) * req_bytes / span / 1e9
                key = f"{base}_{c}"
                out[f"{key}_p50_ms"] = round_to(p50, 4)
                out[f"{key}_p99_ms"] = round_to(p99, 4)
                out[f"{key}_p99_over_p50"] = round_to(p99 / p50, 4)
                out[f"{key}_GBps"] = round_to(gbps, 4)
                out[f"{key}_{of_copy}"] = round_to(gbps * 1e9 / copy_Bps, 4)
                res[str(c)] = {
                    "requests_measured": n - c,
                    "warm_up": c,
                    "p50_ms": round_to(p50, 4),
                    "p90_ms": round_to(float(np.percentile(lat, 90)), 4),
                    "p99_ms": round_to(p99, 4),
                    "max_ms": round_to(float(lat.max()), 4),
                    "span_s": round_to(span, 4),
                    "GBps": round_to(gbps, 4),
                    "strategies": chosen,
                }
                log(
                    f"{base} {c}: p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
                    f"{gbps:.0f} GB/s aggregate over {n - c} requests"
                )
                run.checkpoint()
                # every destination set holds what the last request that used it moved
                used = sorted({int(k) for k in np.array(tab.set_of)})[:4]
                for wi in (1, 2):
                    for k in used:
                        workers[wi].call(
                            "verify", decs[wi - 1], [0], sets_d[k], {0: sets_p[k]}, timeout=180
                        )
                del tab
    finally:
        for w in workers:
            w.stop()
    top_key = f"{base}_{top}"
    for suffix in ("p99_over_p50", of_copy):
        if f"{top_key}_{suffix}" in out:
            out[f"{top_key}_{suffix}_spread"] = [out[f"{top_key}_{suffix}"]] * 2
    out[f"{base}_case"] = {
        "spec": "vllm_flashinfer",
        "params": dict(params, num_layers=layers),
        "pair": "1->2",
        "processes": "prefill rank 0 | decode rank 0 | decode rank 1",
        "devices": {"prefill": src, "decode": dst},
        "request_bytes": req_bytes,
        "blocks_per_decode_rank": nblk,
        "block_sets": n_sets,
        "strategy": cfg.strategy,
        "staging": {
            "bytes": cfg.concurrency_staging_bytes,
            "slots": cfg.concurrency_staging_slots,
        },
        "latency": "ready (prefill expect with block ids) -> complete (later decode rank)",
        "loop": "closed: c in flight, each completion replaced at once; c warm-up, 20 c measured",
        "verified": "sampled blocks of 4 destination sets per decode rank after each loop",
        "levels": res,
    }


def _shm_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") else None
