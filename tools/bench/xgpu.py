"""The two-GPU section: prefill ranks on GPU 0, decode ranks on GPU 1."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

from layoutc.runtime.plan import Plan

from .config import BenchError, MiB, Run, put
from .flows import (
    run_parts,
    run_push,
    run_request,
    scattered_ids,
    setup_pair,
    start_workers,
)
from .gpu import contiguous_setup


def bench_cross_gpu(compile_plan: Callable[..., Plan], run: Run) -> None:
    """Two GPUs of one host: prefill ranks on GPU 0, decode ranks on GPU 1, one process per
    rank; requests pulled and pushed against a torch peer copy GPU 0 -> GPU 1 of the same
    bytes.  Cases: the scattered request of the one-GPU section (8 KiB pieces) at
    P_TP=1 -> D_TP=2 and P_TP=2 -> D_TP=1, and a contiguous 1 -> 1 request."""
    cfg, out = run.cfg, run.out
    runs = cfg.runs or (3 if cfg.quick else 5)
    params = dict(num_key_value_heads=4, head_dim=128, block_size=16)
    layers = 32
    src, dst = cfg.xgpu_devices  # (("cpu", "cpu") runs the same flow on host memory: tests)
    workers = start_workers(
        [src, src, dst, dst], ["prefill-0", "prefill-1", "decode-0", "decode-1"], run.deadline
    )
    ep_kw = dict(
        timeout_s=60.0, staging_bytes=cfg.gpu_staging_bytes, staging_slots=cfg.gpu_staging_slots
    )
    base = (compile_plan, run, workers, runs, params, ep_kw, (src, dst))
    parts: list[tuple[str, Callable[[], None]]] = [
        (key, functools.partial(_xgpu_scattered, *base, layers, key, p, d))
        for key, p, d in (("1to2", 1, 2), ("2to1", 2, 1))
    ]
    parts.append(("contiguous", functools.partial(_xgpu_contiguous, *base)))
    try:
        out["xgpu_case"] = {
            "placement": "prefill ranks on GPU 0, decode ranks on GPU 1, one process per rank",
            "gpus": [w.call("device_name", timeout=180) for w in (workers[0], workers[2])],
            "runs": runs,
            "staging": {"bytes": cfg.gpu_staging_bytes, "slots": cfg.gpu_staging_slots},
            "cases": {},
        }
        errs = run_parts(parts, run, "xgpu")
    finally:
        for w in workers:
            w.stop()
    if errs:
        raise BenchError("; ".join(errs))


def _xgpu_scattered(
    compile_plan: Callable[..., Plan],
    run: Run,
    workers: list[Any],
    runs: int,
    params: dict[str, Any],
    ep_kw: dict[str, Any],
    devs: tuple[str, str],
    layers: int,
    key: str,
    p_tp: int,
    d_tp: int,
) -> None:
    """One scattered case; ``devs`` = (prefill device, decode device) of the peer copy."""
    cfg, out, log, deadline = run.cfg, run.out, run.log, run.deadline
    plan = compile_plan("vllm_flashinfer", p_tp, d_tp, dict(params, num_layers=layers))
    kinds = ["attention"] * layers
    per_block = sum(int(g.nbytes) * g.count for g in plan.rank(0).posts)  # decode rank 0
    nblk = max(1, cfg.xgpu_bytes_per_decode_rank // (per_block * layers))
    pool = nblk * 3 // 2 + 1
    pb, db = scattered_ids(nblk, pool, 13)
    total = d_tp * nblk * layers * per_block
    placement = [(r, "prefill", r) for r in range(p_tp)]
    placement += [(2 + r, "decode", r) for r in range(d_tp)]
    names = setup_pair(workers, plan, kinds, pool, pool, ep_kw, f"x{key}", placement)
    dec = {names[("decode", r)][0]: [names[("decode", r)][1]] for r in range(d_tp)}
    pre = {names[("prefill", r)][0]: [names[("prefill", r)][1]] for r in range(p_tp)}
    piece = int(plan.rank(0).posts[0].nbytes)
    copy = workers[0].call("peer_copy_rate", total, *devs, max(5, runs * 2), timeout=120)
    t_copy = statistics.median(copy)
    put(out, f"xgpu_{key}_peer_copy_GBps", [total / t / 1e9 for t in copy], 4)
    log(
        f"xgpu {key}: {total / MiB:.0f} MiB, {piece // 1024} KiB pieces; torch peer copy "
        f"{total / t_copy / 1e9:.0f} GB/s"
    )

    def verify():
        for r in range(d_tp):
            wi, nm = names[("decode", r)]
            srcs = list(plan.rank(r).sources)
            workers[wi].call("verify", nm, srcs, db, {s: pb for s in srcs}, timeout=180)
            workers[wi].call("zero", nm)

    case: dict[str, Any] = {
        "spec": "vllm_flashinfer",
        "params": dict(params, num_layers=layers),
        "pair": f"{p_tp}->{d_tp}",
        "bytes": total,
        "blocks": nblk,
        "piece_bytes": piece,
        "copy_ms": round(t_copy * 1e3, 3),
        "verified": "the first request of each variant: every run of 16 sampled blocks "
        "per decode rank, against the pattern of its source prefill rank",
    }
    variants = [("pull", cfg.strategy, runs), ("push", cfg.strategy, runs)]
    variants.append(("pull", "zero-copy", 1 if cfg.quick else 2))
    for mode, strat, n in variants:
        ts = []
        infos: list[dict[str, Any]] = []
        for i in range(n + 1):
            if time.monotonic() > deadline:
                raise BenchError("time limit reached")
            rid = f"x{key}-{mode}-{strat}-{i}"
            if mode == "pull":
                t, infos = run_request(workers, names, rid, dec, db, pb, strat, 120.0)
            else:
                t, infos = run_push(workers, names, rid, pre, pb, db, strat, 120.0)
            if i == 0:
                verify()
                continue
            ts.append(t)
        name = mode if strat == cfg.strategy else f"{mode}_{strat.replace('-', '_')}"
        med = put(out, f"xgpu_{key}_{name}_GBps", [total / t / 1e9 for t in ts], 4)
        put(out, f"xgpu_{key}_{name}_fraction_of_peer_copy", [t_copy / t for t in ts], 4)
        case[name] = {
            "request_ms": round(statistics.median(ts) * 1e3, 3),
            "strategies": sorted({s for inf in infos for s in inf["strategies"].values()}),
            # per initiating rank: NIXL descriptors it posted, and staged chunks (one NIXL
            # transfer each, posted by the source: the decode posts none for a staged pull)
            "descriptors_per_rank": [int(inf["descriptors"]) for inf in infos],
            "staged_chunks_per_rank": [int(inf.get("chunks") or 0) for inf in infos],
        }
        log(
            f"xgpu {key}: {mode} {strat}: {med / 1e9 * 1e9:.0f} GB/s, "
            f"{t_copy / statistics.median(ts):.2f} of the peer copy, "
            f"{case[name]['descriptors_per_rank']} descriptors, "
            f"{case[name]['staged_chunks_per_rank']} staged chunks"
        )
    out["xgpu_case"]["cases"][key] = case
    for (_role, _r), (wi, nm) in names.items():
        workers[wi].call("teardown", nm)


def _xgpu_contiguous(
    compile_plan: Callable[..., Plan],
    run: Run,
    workers: list[Any],
    runs: int,
    params: dict[str, Any],
    ep_kw: dict[str, Any],
    devs: tuple[str, str],
) -> None:
    cfg, out, log, deadline = run.cfg, run.out, run.log, run.deadline
    names, dec, loc, rem, total = contiguous_setup(
        compile_plan, workers, params, ep_kw, cfg.xgpu_contiguous_bytes, "xc", 2
    )
    n1 = int(loc.shape[0])
    ts = []
    infos: list[dict[str, Any]] = []
    for i in range(runs + 2):
        if time.monotonic() > deadline:
            raise BenchError("time limit reached")
        t, infos = run_request(workers, names, f"xc-{i}", dec, loc, rem, cfg.strategy, 120.0)
        if i == 0:
            workers[2].call("verify", dec[2][0], [0], loc, {0: rem}, timeout=180)
        if i >= 2:
            ts.append(t)
    copy = workers[0].call("peer_copy_rate", total, *devs, max(5, runs * 2), timeout=120)
    t_copy = statistics.median(copy)
    put(out, "xgpu_contiguous_peer_copy_GBps", [total / t / 1e9 for t in copy], 4)
    put(out, "xgpu_contiguous_GBps", [total / t / 1e9 for t in ts], 4)
    frac = put(out, "xgpu_contiguous_fraction_of_peer_copy", [t_copy / t for t in ts], 4)
    out["xgpu_case"]["cases"]["contiguous"] = {
        "pair": "1->1",
        "bytes": total,
        "blocks": n1,
        "consecutive": True,
        "strategies": sorted({s for inf in infos for s in inf["strategies"].values()}),
        "descriptors": int(infos[0]["descriptors"]),
        "request_ms": round(statistics.median(ts) * 1e3, 3),
        "copy_ms": round(t_copy * 1e3, 3),
    }
    log(
        f"xgpu contiguous: {total / statistics.median(ts) / 1e9:.0f} GB/s, {frac:.2f} of the "
        f"peer copy"
    )
    for (_role, _r), (wi, nm) in names.items():
        workers[wi].call("teardown", nm)
