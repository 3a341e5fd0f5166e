"""The one-GPU section: scattered and contiguous requests against a torch copy."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from layoutc.runtime.plan import Plan

from .config import BenchError, MiB, Run, put
from .flows import (
    profile_staged,
    run_parts,
    run_request,
    scattered_ids,
    setup_pair,
    start_workers,
    tiny_requests,
)


def bench_gpu(compile_plan: Callable[..., Plan], run: Run, cm: dict[str, Any]) -> None:
    """One GPU, three processes: the scattered P_TP=1 -> D_TP=2 request (auto, zero-copy per
    block, staged) against a torch copy; then a contiguous 1 -> 1 request."""
    cfg = run.cfg
    runs = cfg.runs or (3 if cfg.quick else 5)
    params = dict(num_key_value_heads=4, head_dim=128, block_size=16)
    dev = cfg.gpu_worker_device  # ("cpu" runs the same flow on host memory: the tests)
    workers = start_workers([dev] * 3, ["prefill", "decode-0", "decode-1"], run.deadline)
    ep_kw = dict(
        timeout_s=60.0, staging_bytes=cfg.gpu_staging_bytes, staging_slots=cfg.gpu_staging_slots
    )
    args = (compile_plan, run, cm, workers, runs, params, ep_kw)
    try:
        run.out["card"] = workers[0].call("device_name", timeout=180)
        parts = [
            ("scattered", lambda: _gpu_scattered(*args)),
            ("contiguous", lambda: _gpu_contiguous(*args)),
        ]
        errs = run_parts(parts, run, "gpu")
    finally:
        for w in workers:
            w.stop()
    if errs:
        raise BenchError("; ".join(errs))


class ScatteredCase(NamedTuple):
    layers: int
    pb: np.ndarray  # prefill block ids
    db: np.ndarray  # decode block ids (each decode rank)
    total: int  # bytes of one request, both decode ranks
    piece: int  # bytes of one head slice of one block
    names: dict[tuple[str, int], tuple[int, str]]
    dec: dict[int, list[str]]  # worker index -> decode session names


def gpu_scattered_setup(compile_plan, cfg, workers, params, ep_kw, tag="g") -> ScatteredCase:
    """The one-GPU scattered request's endpoints: prefill rank 0 in worker 0, decode ranks 0
    and 1 in workers 1 and 2 (P_TP=1 -> D_TP=2, 32 layers, 8 KiB pieces)."""
    layers = 32
    plan = compile_plan("vllm_flashinfer", 1, 2, dict(params, num_layers=layers))
    kinds = ["attention"] * layers
    per_block = sum(int(g.nbytes) * g.count for g in plan.rank(0).posts)
    nblk = max(1, cfg.gpu_bytes_per_decode_rank // (per_block * layers))
    pool = nblk * 3 // 2 + 1
    pb, db = scattered_ids(nblk, pool, 11)
    placement = [(0, "prefill", 0), (1, "decode", 0), (2, "decode", 1)]
    names = setup_pair(workers, plan, kinds, pool, pool, ep_kw, tag, placement)
    dec = {1: [names[("decode", 0)][1]], 2: [names[("decode", 1)][1]]}
    total = 2 * nblk * layers * per_block
    piece = int(plan.rank(0).posts[0].nbytes)
    return ScatteredCase(layers, pb, db, total, piece, names, dec)


def _gpu_scattered(
    compile_plan: Callable[..., Plan],
    run: Run,
    cm: dict[str, Any],
    workers: list[Any],
    runs: int,
    params: dict[str, Any],
    ep_kw: dict[str, Any],
) -> None:
    cfg, out, log, deadline = run.cfg, run.out, run.log, run.deadline
    case = gpu_scattered_setup(compile_plan, cfg, workers, params, ep_kw)
    pb, db, total, piece, names, dec = (
        case.pb,
        case.db,
        case.total,
        case.piece,
        case.names,
        case.dec,
    )
    layers = case.layers
    log(
        f"gpu: {out['card']}: {total / MiB:.0f} MiB request (P1->D2, 3 processes, "
        f"{piece // 1024} KiB pieces)"
    )
    copy = workers[0].call("copy_rate", total, max(5, runs * 2), timeout=120)
    put(out, "gpu_copy_GBps", [total / t / 1e9 for t in copy], 4)
    t_copy = statistics.median(copy)
    res: dict[str, list[float]] = {}
    chosen: dict[str, Any] = {}
    pull_call: dict[str, list[float]] = {}
    ready: dict[str, list[float]] = {}  # the same requests timed from the prefill's expect
    plan_runs = [(cfg.strategy, runs), ("zero-copy", 2 if cfg.quick else 3)]
    if cfg.strategy != "staged":
        plan_runs.append(("staged", runs))
    for strat, n in plan_runs:
        ts = []
        for i in range(n + 1):
            if time.monotonic() > deadline:
                raise BenchError("time limit reached")
            t, infos = run_request(workers, names, f"{strat}-{i}", dec, db, pb, strat, 60.0)
            if i == 0:  # warm-up (triton compiles, cuda_ipc maps): verified, not timed
                chosen[strat] = sorted({s for inf in infos for s in inf["strategies"].values()})
                for wi, ns in dec.items():
                    for nm in ns:
                        workers[wi].call("verify", nm, [0], db, {0: pb}, timeout=180)
                        workers[wi].call("zero", nm)
                continue
            ts.append(t)
            pull_call.setdefault(strat, []).append(infos[0]["pull_call_s"])
            ready.setdefault(strat, []).append(infos[0]["from_ready_s"])
        res[strat] = ts
        log(
            f"gpu: {strat}: {total / statistics.median(ts) / 1e9:.1f} GB/s "
            f"(chose {', '.join(chosen[strat])})"
        )
        if strat == cfg.strategy:
            put(out, "gpu_scattered_fraction_of_copy", [t_copy / t for t in ts], 4)
            put(
                out,
                "gpu_scattered_fraction_of_copy_from_ready",
                [t_copy / t for t in ready[strat]],
                4,
            )
            put(out, "gpu_scattered_GBps", [total / t / 1e9 for t in ts], 4)
        run.checkpoint()
    t_zc = statistics.median(res["zero-copy"])
    put(out, "gpu_scattered_speedup_vs_per_block", [t_zc / t for t in res[cfg.strategy]], 4)
    put(out, "gpu_per_block_GBps", [total / t / 1e9 for t in res["zero-copy"]], 4)
    if "staged" in res:
        put(out, "gpu_scattered_staged_GBps", [total / t / 1e9 for t in res["staged"]], 4)
    out["gpu_scattered_case"] = {
        "spec": "vllm_flashinfer",
        "params": dict(params, num_layers=layers),
        "pair": "1->2",
        "processes": "prefill rank 0 | decode rank 0 | decode rank 1",
        "bytes": total,
        "blocks": int(db.shape[0]),
        "piece_bytes": piece,
        "strategy": cfg.strategy,
        "chosen": chosen,
        "runs": runs,
        "staging": {"bytes": cfg.gpu_staging_bytes, "slots": cfg.gpu_staging_slots},
        "verified": "every run of 16 sampled blocks per decode rank, once per strategy",
        "request_ms": {k: round(statistics.median(v) * 1e3, 3) for k, v in res.items()},
        "pull_call_ms": {k: round(statistics.median(v) * 1e3, 3) for k, v in pull_call.items()},
        "copy_ms": round(t_copy * 1e3, 3),
    }
    zc_desc = total // piece
    cm["_zero_copy_big"] = (t_zc, total, zc_desc)
    cm["_staged_big"] = (
        statistics.median(res.get("staged", res[cfg.strategy])),
        total,
        cfg.gpu_staging_bytes // cfg.gpu_staging_slots,
    )
    # cost-model constants on the device
    chunk = cfg.gpu_staging_bytes // cfg.gpu_staging_slots
    pk = workers[0].call("pack_rate", names[("prefill", 0)][1], 0, pb, chunk, 3, timeout=180)
    up = workers[1].call("pack_rate", names[("decode", 0)][1], 0, db, chunk, 3, timeout=180)
    cm["pack_Bps"] = pk["bytes"] / statistics.median(pk["seconds"])
    cm["unpack_Bps"] = up["bytes"] / statistics.median(up["seconds"])
    cm["op_s"] = (pk["op_s"] + up["op_s"]) / 2
    cm["_tiny"] = tiny_requests(workers, names, dec, db, pb, 8)
    out["gpu_tiny_request_ms"] = {
        k: round(v * 1e3, 3) for k, v in cm["_tiny"].items() if not k.endswith(("bytes", "ors"))
    }
    out["gpu_tiny_request_ms"]["profile_staged"] = profile_staged(
        workers, names, dec, db[:1], pb[:1], layers=[0], rid="tiny-profile"
    )
    out["gpu_scattered_case"]["profile_one_staged_request"] = profile_staged(
        workers, names, dec, db, pb
    )
    for wi, ns in dec.items():
        for nm in ns:
            workers[wi].call("teardown", nm)
    workers[0].call("teardown", names[("prefill", 0)][1])
    # the same request with the staging cut into other numbers of slots, for the record
    # (the keys above keep the configuration)
    for alt in cfg.gpu_scattered_slot_variants:
        if alt == cfg.gpu_staging_slots or time.monotonic() > deadline - 60:
            continue
        kw2 = dict(ep_kw, staging_slots=alt)
        case2 = gpu_scattered_setup(compile_plan, cfg, workers, params, kw2, tag=f"g{alt}")
        names2, dec2 = case2.names, case2.dec  # (the same plan and block ids)
        ts = []
        for i in range(runs + 1):
            t, _ = run_request(workers, names2, f"s{alt}-{i}", dec2, db, pb, cfg.strategy, 60.0)
            if i == 0:
                for wi, ns in dec2.items():
                    for nm in ns:
                        workers[wi].call("zero", nm)
                t, _ = run_request(workers, names2, f"s{alt}-v", dec2, db, pb, cfg.strategy, 60)
                for wi, ns in dec2.items():
                    for nm in ns:
                        workers[wi].call("verify", nm, [0], db, {0: pb}, timeout=180)
            else:
                ts.append(t)
        put(out, f"gpu_scattered_fraction_of_copy_{alt}_slots", [t_copy / t for t in ts], 4)
        for wi, ns in dec2.items():
            for nm in ns:
                workers[wi].call("teardown", nm)
        workers[0].call("teardown", names2[("prefill", 0)][1])


def contiguous_setup(compile_plan, workers, params, ep_kw, nbytes, tag, decode_worker):
    """A 1 -> 1 request of about ``nbytes``: whole pages (16 layers), consecutive block ids on
    both sides; prefill rank 0 in worker 0, decode rank 0 in ``decode_worker``.  Returns
    (names, decode sessions by worker, decode ids, prefill ids, bytes)."""
    layers = 16
    plan = compile_plan("vllm_flashinfer", 1, 1, dict(params, num_layers=layers))
    stride = plan.prefill.page("attention").logical_stride
    n = max(1, nbytes // (stride * layers))
    placement = [(0, "prefill", 0), (decode_worker, "decode", 0)]
    names = setup_pair(workers, plan, ["attention"] * layers, n + 8, n + 8, ep_kw, tag, placement)
    dec = {decode_worker: [names[("decode", 0)][1]]}
    loc = np.arange(n, dtype=np.int64)
    rem = np.arange(5, 5 + n, dtype=np.int64)
    return names, dec, loc, rem, n * stride * layers


def _gpu_contiguous(
    compile_plan: Callable[..., Plan],
    run: Run,
    cm: dict[str, Any],
    workers: list[Any],
    runs: int,
    params: dict[str, Any],
    ep_kw: dict[str, Any],
) -> None:
    """1 -> 1, whole pages, consecutive blocks on both sides: 16 layers of 512 MiB (8 GiB;
    the host time around a request, ~0.3-0.6 ms, is what separates it from the copy)."""
    cfg, out, log, deadline = run.cfg, run.out, run.log, run.deadline
    names1, dec1, loc1, rem1, total1 = contiguous_setup(
        compile_plan, workers, params, ep_kw, cfg.gpu_contiguous_bytes, "c", 1
    )
    n1 = int(loc1.shape[0])
    ts = []
    pull_calls: list[float] = []
    chosen1 = None
    for i in range(runs + 2):
        if time.monotonic() > deadline:
            raise BenchError("time limit reached")
        t, infos = run_request(workers, names1, f"c-{i}", dec1, loc1, rem1, cfg.strategy, 60)
        if i == 0:
            chosen1 = sorted({s for inf in infos for s in inf["strategies"].values()})
            workers[1].call("verify", dec1[1][0], [0], loc1, {0: rem1}, timeout=180)
        if i >= 2:
            ts.append(t)
            pull_calls.append(infos[0]["pull_call_s"])
    copy1 = workers[2].call("copy_rate", total1, max(5, runs * 2), timeout=120)
    put(out, "gpu_contiguous_fraction_of_copy", [statistics.median(copy1) / t for t in ts], 4)
    put(out, "gpu_contiguous_GBps", [total1 / t / 1e9 for t in ts], 4)
    put(out, "gpu_contiguous_copy_GBps", [total1 / t / 1e9 for t in copy1], 4)
    out["gpu_contiguous_case"] = {
        "spec": "vllm_flashinfer",
        "params": dict(params, num_layers=16),
        "pair": "1->1",
        "bytes": total1,
        "blocks": n1,
        "consecutive": True,
        "chosen": chosen1,
        "descriptors": infos[0]["descriptors"],
        "request_ms": round(statistics.median(ts) * 1e3, 3),
        "copy_ms": round(statistics.median(copy1) * 1e3, 3),
        "pull_call_ms": round(statistics.median(pull_calls) * 1e3, 3),
    }
    cm["link_Bps"] = total1 / statistics.median(ts)
    if "_zero_copy_big" in cm:
        t_zc, nbytes, zc_desc = cm["_zero_copy_big"]
        cm["descriptor_s"] = max(0.0, (t_zc - nbytes / cm["link_Bps"]) / zc_desc)
    log(
        f"gpu: contiguous {total1 / statistics.median(ts) / 1e9:.0f} GB/s, fraction "
        f"{out['gpu_contiguous_fraction_of_copy']:.3f}"
    )
