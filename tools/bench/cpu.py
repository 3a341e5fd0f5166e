"""The CPU section: a scattered hetero-TP request against one NIXL descriptor."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from layoutc.runtime.endpoint import STRATEGIES
from layoutc.runtime.plan import Plan

from .config import BenchError, MiB, Run, put
from .flows import (
    profile_staged,
    run_request,
    scattered_ids,
    setup_pair,
    start_workers,
    tiny_requests,
)

#: The strategies a request can be forced to.
FORCED = tuple(s for s in STRATEGIES if s != "auto")


def bench_scattered(compile_plan: Callable[..., Plan], run: Run, cm: dict[str, Any]) -> None:
    """CPU: flashinfer 8 heads x 128 dims, block 16, P_TP=2 -> D_TP=4, 8 KiB head slices;
    prefill rank 0 in one process, its two readers (decode ranks 0 and 1) in the other.

    Measured in rounds: each round runs the request once per strategy (``cfg.strategy``,
    zero-copy, staged) and NIXL's single-descriptor READ of the same bytes between the same
    two processes (on ordinary and on huge pages), so that drift of the machine hits every
    variant alike; the fractions are per-round ratios.
    """
    cfg, out, log, deadline = run.cfg, run.out, run.log, run.deadline
    runs = cfg.runs or (3 if cfg.quick else 7)
    params = dict(num_key_value_heads=8, head_dim=128, block_size=16)
    layers = 32
    plan = compile_plan("vllm_flashinfer", 2, 4, dict(params, num_layers=layers))
    kinds = ["attention"] * layers
    # bytes per (layer, logical block) for decode rank 0
    per_block = sum(int(g.nbytes) * g.count for g in plan.rank(0).posts)
    piece = int(plan.rank(0).posts[0].nbytes)
    nblk = max(1, cfg.cpu_bytes_per_decode_rank // (per_block * layers))
    pool = nblk * 3 // 2 + 1
    pb, db = scattered_ids(nblk, pool, 7)
    total = 2 * nblk * layers * per_block
    workers = start_workers(["cpu", "cpu"], ["prefill", "decode"], deadline)
    strategies = [cfg.strategy] + [s for s in FORCED if s != cfg.strategy]
    results: dict[str, list[float]] = {s: [] for s in strategies}
    from_ready: list[float] = []  # cfg.strategy's requests timed from the prefill's expect
    base: dict[str, list[float]] = {"4k": [], "thp": []}
    chosen: dict[str, Any] = {}
    try:
        ep_kw = dict(timeout_s=60.0, **cfg.cpu_endpoint)
        names = setup_pair(
            workers,
            plan,
            kinds,
            pool,
            pool,
            ep_kw,
            "s",
            [(0, "prefill", 0), (1, "decode", 0), (1, "decode", 1)],
        )
        dec = {1: [names[("decode", 0)][1], names[("decode", 1)][1]]}
        # NIXL alone: one descriptor of the same bytes, ordinary pages and huge pages
        for kind, huge in (("4k", False), ("thp", True)):
            md0, a0 = workers[0].call("raw_setup", f"{kind}-src", total, True, huge)
            md1, a1 = workers[1].call("raw_setup", f"{kind}-dst", total, False, huge)
            workers[0].call("raw_connect", f"{kind}-src", md1, f"{kind}-dst", a1)
            workers[1].call("raw_connect", f"{kind}-dst", md0, f"{kind}-src", a0)
        log(
            f"cpu: {total / MiB:.0f} MiB request (2 decode ranks x {nblk} blocks x {layers} "
            f"layers, {piece // 1024} KiB pieces), {runs} rounds"
        )
        workers[0].call("hot", True)  # the raw source agents progress while idle
        warm = 2
        for i in range(warm + runs):
            if time.monotonic() > deadline:
                raise BenchError("time limit reached")
            for strat in strategies:
                rid = f"{strat}-{i}"
                t, infos = run_request(workers, names, rid, dec, db, pb, strat, 60.0)
                if i == 0:
                    chosen[strat] = sorted({s for inf in infos for s in inf["strategies"].values()})
                    # verify every run of 16 sampled blocks per decode rank, per strategy
                    for n in dec[1]:
                        workers[1].call("verify", n, [0], db, {0: pb}, timeout=120)
                        workers[1].call("zero", n)
                if i >= warm:
                    results[strat].append(t)
                    if strat == cfg.strategy:
                        from_ready.append(infos[0]["from_ready_s"])
            for kind in ("4k", "thp"):
                ts = workers[1].call(
                    "raw_read", f"{kind}-dst", total, 1, warm=int(i == 0), timeout=120
                )
                if i >= warm:
                    base[kind].extend(ts)
        small = workers[1].call("raw_small", "4k-dst", 50, timeout=120)
        workers[0].call("hot", False)
        for kind in ("4k", "thp"):
            workers[1].call("raw_close", f"{kind}-dst")
            workers[0].call("raw_close", f"{kind}-src")
        # staging kernel rates on the real buffers (for the cost model)
        pk = workers[0].call("pack_rate", names[("prefill", 0)][1], 0, pb, 16 * MiB, 3, timeout=300)
        up = workers[1].call("pack_rate", names[("decode", 0)][1], 0, db, 16 * MiB, 3, timeout=300)
        tiny = tiny_requests(workers, names, dec, db, pb, 12)
        out["cpu_huge_pages_kib"] = [w.call("huge_pages_kib") for w in workers]
        profile = profile_staged(workers, names, dec, db, pb)
        busy = {}
        for (role, rank), (wi, n) in sorted(names.items()):
            st = workers[wi].call("stats", n)
            busy[f"{role} rank {rank}"] = {
                k: round(st[k], 4) for k in ("staged_pack_s", "staged_unpack_s", "staged_post_s")
            }
    finally:
        for w in workers:
            w.stop()

    t_auto = results[cfg.strategy]
    put(
        out,
        "cpu_scattered_fraction_of_single_descriptor",
        [b / t for b, t in zip(base["4k"], t_auto)],
        4,
    )
    put(
        out,
        "cpu_scattered_fraction_of_single_descriptor_from_ready",
        [b / t for b, t in zip(base["4k"], from_ready)],
        4,
    )
    put(out, "cpu_scattered_GBps", [total / t / 1e9 for t in t_auto], 4)
    put(out, "cpu_single_descriptor_GBps", [total / t / 1e9 for t in base["4k"]], 4)
    put(out, "cpu_single_descriptor_thp_GBps", [total / t / 1e9 for t in base["thp"]], 4)
    put(
        out,
        "cpu_scattered_fraction_of_single_descriptor_thp",
        [b / t for b, t in zip(base["thp"], t_auto)],
        4,
    )
    for strat in FORCED:
        put(
            out,
            f"cpu_scattered_{strat.replace('-', '_')}_GBps",
            [total / t / 1e9 for t in results[strat]],
            4,
        )
    n_staged_runs = warm + runs
    out["cpu_scattered_case"] = {
        "spec": "vllm_flashinfer",
        "params": dict(params, num_layers=layers),
        "pair": "2->4",
        "processes": "prefill rank 0 | decode ranks 0 and 1 (its two readers, one process)",
        "bytes": total,
        "blocks": nblk,
        "piece_bytes": piece,
        "strategy": cfg.strategy,
        "chosen": chosen,
        "rounds": runs,
        "warm_up_rounds": warm,
        "method": "per round: the request once per strategy, then NIXL's single-descriptor "
        "READ of the same bytes (ordinary pages, then huge pages); fractions are per-round "
        "ratios",
        "staging": "endpoint defaults: 64 MiB in 4 slots of 16 MiB, on huge pages",
        "verified": "every run of 16 sampled blocks per decode rank, once per strategy",
        "host_seconds_in_staged_kernels_all_runs": busy,
        "profile_one_staged_request": profile,
        "staged_requests_measured_in_busy": n_staged_runs * (2 if cfg.strategy != "staged" else 1),
    }
    # cost model constants (host memory)
    link = total / statistics.median(base["4k"])
    zc_desc = total // piece
    t_zc = statistics.median(results["zero-copy"])
    cm["link_Bps"] = link
    cm["descriptor_s"] = max(0.0, (t_zc - total / link) / zc_desc)
    cm["pack_Bps"] = pk["bytes"] / statistics.median(pk["seconds"])
    cm["unpack_Bps"] = up["bytes"] / statistics.median(up["seconds"])
    cm["op_s"] = (pk["op_s"] + up["op_s"]) / 2
    cm["chunk_s"] = max(0.0, statistics.median(small) - cm["descriptor_s"])
    cm["_tiny"] = tiny
    cm["_staged_big"] = (statistics.median(results["staged"]), total, 16 * MiB)
    log(
        f"cpu: {cfg.strategy} {out['cpu_scattered_GBps']:.2f} GB/s (chose "
        f"{', '.join(chosen[cfg.strategy])}), single descriptor {link / 1e9:.2f} GB/s; "
        f"fraction {out['cpu_scattered_fraction_of_single_descriptor']:.3f}"
    )
