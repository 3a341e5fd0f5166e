"""Sections without worker processes: request expansion and descriptor counts."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

import numpy as np
from layoutc.runtime.costmodel import CostModel
from layoutc.runtime.descriptors import build_pair_table, posted_count, synthetic_segments
from layoutc.runtime.endpoint import kind_pages
from layoutc.runtime.plan import Plan
from layoutc.runtime.staged import DEFAULT_STAGING_BYTES, DEFAULT_STAGING_SLOTS
from layoutc.runtime.staging import StagingLayout, count_ops, expand

from .config import (
    LLAMA70B,
    NEMOTRON,
    VLLM_V020_LLAMA,
    VLLM_V033_HYBRID_16,
    VLLM_V033_HYBRID_2096,
    VLLM_V033_LLAMA,
    BenchError,
    Run,
    median_time,
    put,
    round_to,
)
from .reference import expand_loop


def layer_pages(plan: Plan, kinds: list[str]) -> list[tuple[str, ...]]:
    kp = kind_pages(plan)
    return [tuple(kp[k]) for k in kinds]


def nixl_posted(table: Any, local: np.ndarray, remote: np.ndarray, rows: Any = None) -> int:
    """Descriptors ``make_prepped_xfer`` posts for one request of a PairTable, exactly by
    NIXL's merge rule (:func:`descriptors.posted_count`; checked against NIXL's telemetry in
    the tests): within one strided row, consecutive indices on both sides merge when the row
    is dense (``len == stride``) locally and both strides are equal; rows never merge."""
    return posted_count(table, local, remote, slice(None) if rows is None else rows)


def count_request(
    plan: Any,
    decode_rank: int,
    kinds: list[str],
    local: np.ndarray,
    remote: np.ndarray,
    layers: np.ndarray | None,
    model: Any,
    chunk_bytes: int,
    kernel: str,
    strategy: str = "auto",
) -> dict[str, Any]:
    """What one decode rank's request posts, per source: strategy, descriptors, bytes.

    ``kernel``: how pack/unpack run (``staging.count_ops``); ``chunk_bytes``: the staging
    chunk.  Zero-copy posts ``nixl_posted`` descriptors (one ``make_prepped_xfer`` per
    source); staged posts one ``initialize_xfer`` row per chunk.
    """
    lp = layer_pages(plan, kinds)
    nb = int(max(local.max(), remote.max())) + 1 if local.size else 1
    lseg = synthetic_segments(plan.decode, lp, nb, 1 << 44)
    rseg = synthetic_segments(plan.prefill, lp, nb, 1 << 45)
    per_source = {}
    total = 0
    for src in plan.rank(decode_rank).sources:
        table = build_pair_table(
            plan,
            decode_rank=decode_rank,
            prefill_rank=src,
            local_is_decode=True,
            layer_pages=lp,
            local_segments=lseg,
            remote_segments=rseg,
        )
        if table is None:
            continue
        rows = table.rows_for_layers(layers)
        nbytes = int(table.row_nbytes[rows].sum()) * int(local.shape[0])
        if nbytes == 0:
            continue
        zc = nixl_posted(table, local, remote, rows)
        n_chunks = -(-nbytes // chunk_bytes)
        lay = StagingLayout.build(plan, decode_rank=decode_rank, prefill_rank=src, layer_pages=lp)
        g = lay.groups_for_layers(layers)
        n_groups = lay.num_groups if g is None else int(g.shape[0])
        n_rows = int(table.row_nbytes[rows].shape[0])
        n_ops = count_ops(kernel, n_rows, n_groups, n_chunks)
        choice = strategy if strategy != "auto" else model.choose(zc, nbytes, n_chunks, n_ops)
        posted = zc if choice == "zero-copy" else n_chunks
        per_source[src] = {
            "strategy": choice,
            "posted": posted,
            "zero_copy_descriptors": zc,
            "index_entries": n_rows * int(local.shape[0]),
            "chunks": n_chunks,
            "bytes": nbytes,
            "predicted_s": model.predict(zc, nbytes, n_chunks, n_ops),
        }
        total += posted
    return {"posted": total, "sources": per_source}


def bench_expand(compile_plan: Callable[..., Plan], run: Run) -> None:
    cfg, out, log = run.cfg, run.out, run.log
    plan = compile_plan("vllm_hybrid_mamba2", 4, 2, NEMOTRON)
    kinds_all = [k for k, _ in plan.layer_kinds]
    kinds = [kinds_all[i % len(kinds_all)] for i in range(64)]  # attention, mamba alternating
    lp = layer_pages(plan, kinds)
    rng = np.random.default_rng(0)
    pool = 1500
    local = rng.choice(pool, 1000, replace=False).astype(np.int64)
    remote = rng.choice(pool, 1000, replace=False).astype(np.int64)
    lseg = synthetic_segments(plan.decode, lp, pool, 1 << 44)
    rseg = synthetic_segments(plan.prefill, lp, pool, 1 << 45)
    pairs = []
    for src in plan.rank(0).sources:
        table = build_pair_table(
            plan,
            decode_rank=0,
            prefill_rank=src,
            local_is_decode=True,
            layer_pages=lp,
            local_segments=lseg,
            remote_segments=rseg,
        )
        lay = StagingLayout.build(plan, decode_rank=0, prefill_rank=src, layer_pages=lp)
        pairs.append((lay, table))

    def run_vec():
        return [expand(lay, local, remote, table=t) for lay, t in pairs]

    def run_loop():
        return [expand_loop(lay, local, remote, table=t) for lay, t in pairs]

    reps = 31 if cfg.quick else 101
    res = run_vec()
    ref = run_loop()
    for a, b in zip(res, ref):
        if not (
            np.array_equal(a.local_indices, b.local_indices)
            and np.array_equal(a.stream.base, b.stream.base)
            and np.array_equal(a.chunk_bounds, b.chunk_bounds)
        ):
            raise BenchError("expand and expand_loop disagree")
    t_vec = median_time(run_vec, reps, warm=3)
    t_loop = median_time(run_loop, 3 if cfg.quick else 5, warm=0)
    entries = 0
    for ex in res:
        entries += int(ex.local_indices.size + ex.remote_indices.size)
        entries += int(ex.stream.groups.size * 3 + ex.chunk_bounds.size + ex.chunk_groups.size)
    med = put(out, "expand_us_1000_blocks_64_layers", [t * 1e6 for t in t_vec], 4)
    out["expand_entries"] = entries
    loop_med = statistics.median(t_loop)
    # speedup: each loop run against the median vectorized run of the same session
    put(out, "expand_speedup_vs_loop", [t / (med / 1e6) for t in t_loop], 4)
    out["expand_loop_us"] = round_to(loop_med * 1e6, 4)
    out["expand_case"] = {
        "spec": "vllm_hybrid_mamba2",
        "params": NEMOTRON,
        "prefill_tp": 4,
        "decode_tp": 2,
        "decode_rank": 0,
        "sources": list(plan.rank(0).sources),
        "layers": "64 (attention and mamba alternating)",
        "blocks": 1000,
        "rows": [int(lay.num_rows) for lay, _ in pairs],
        "descriptors": int(sum(ex.n_descriptors for ex in res)),
        "what": "zero-copy index arrays (both sides) + staged stream map and chunk table, "
        "for every source of decode rank 0",
    }
    log(f"expand: {med:.0f} us ({entries} entries), loop {loop_med * 1e6:.0f} us")


def bench_descriptors(compile_plan: Callable[..., Plan], run: Run, model: CostModel) -> None:
    cfg, out, log = run.cfg, run.out, run.log
    kernel = "per-row" if model.kind == "cpu" else "fused"
    if cfg.device == "cuda":
        chunk = cfg.gpu_staging_bytes // cfg.gpu_staging_slots
    else:
        chunk = DEFAULT_STAGING_BYTES // DEFAULT_STAGING_SLOTS
    rng = np.random.default_rng(1)

    # Llama-3.1-70B-like, 8 -> 4, 32,768 tokens = 2,048 blocks of 16, scattered
    plan = compile_plan("vllm_flashinfer", 8, 4, dict(LLAMA70B, num_layers=80))
    kinds = ["attention"] * 80
    nblk = 32768 // 16
    local = rng.choice(8 * nblk, nblk, replace=False).astype(np.int64)
    remote = rng.choice(8 * nblk, nblk, replace=False).astype(np.int64)
    auto = count_request(plan, 0, kinds, local, remote, None, model, chunk, kernel)
    zc = count_request(plan, 0, kinds, local, remote, None, model, chunk, kernel, "zero-copy")
    out["descriptors_llama70b_8to4"] = auto["posted"]
    out["descriptors_llama70b_8to4_zero_copy"] = zc["posted"]
    r = auto["posted"] / VLLM_V033_LLAMA
    out["descriptors_ratio_vs_vllm_long_request"] = round_to(r, 4)
    out["descriptors_ratio_vs_vllm_long_request_spread"] = [round_to(r, 4), round_to(r, 4)]
    out["descriptors_ratio_vs_vllm_v020"] = round_to(auto["posted"] / VLLM_V020_LLAMA, 4)
    out["descriptors_llama70b_detail"] = {
        "spec": "vllm_flashinfer",
        "params": dict(LLAMA70B, num_layers=80),
        "pair": "8->4",
        "decode_rank": 0,
        "tokens": 32768,
        "blocks": nblk,
        "chunk_bytes": chunk,
        "cost_model": model.kind,
        "sources": auto["sources"],
        "vllm_v033": VLLM_V033_LLAMA,
        "vllm_v020": VLLM_V020_LLAMA,
    }
    log(f"descriptors: Llama-70B-like 8->4: {auto['posted']} (vLLM v0.33 {VLLM_V033_LLAMA})")

    # Nemotron-3-Nano-like hybrid 4 -> 2: 6 attention + 23 Mamba2 layers; the attention layers
    # move every block of the request, the Mamba layers the request's last block (its state)
    hyb = {}
    for label, extra in (
        ("kernel16", dict(block_size=16, kernel_blocks=131)),
        ("block2096", dict(block_size=2096, kernel_blocks=1)),
    ):
        params = dict(NEMOTRON, **extra)
        plan = compile_plan("vllm_hybrid_mamba2", 4, 2, params)
        kinds = ["attention"] * 6 + ["mamba"] * 23
        nblk = math.ceil(32768 / 2096)
        loc = rng.choice(8 * nblk, nblk, replace=False).astype(np.int64)
        rem = rng.choice(8 * nblk, nblk, replace=False).astype(np.int64)
        att = count_request(plan, 0, kinds, loc, rem, np.arange(6), model, chunk, kernel)
        mam = count_request(
            plan, 0, kinds, loc[-1:], rem[-1:], np.arange(6, 29), model, chunk, kernel
        )
        hyb[label] = {
            "posted": att["posted"] + mam["posted"],
            "attention": att["sources"],
            "mamba": mam["sources"],
            "params": params,
        }
    out["descriptors_hybrid_nemotron_4to2"] = hyb["kernel16"]["posted"]
    out["descriptors_hybrid_nemotron_4to2_block2096"] = hyb["block2096"]["posted"]
    out["descriptors_hybrid_detail"] = {
        "pair": "4->2",
        "decode_rank": 0,
        "tokens": 32768,
        "logical_blocks": nblk,
        "layers": "6 attention (every block) + 23 Mamba2 (the last block)",
        "vllm_v033_kernel16": VLLM_V033_HYBRID_16,
        "vllm_v033_block2096": VLLM_V033_HYBRID_2096,
        **hyb,
    }
    log(
        f"descriptors: hybrid 4->2: {hyb['kernel16']['posted']} (vLLM 16-token kernel blocks "
        f"{VLLM_V033_HYBRID_16}), {hyb['block2096']['posted']} (--block-size 2096: "
        f"{VLLM_V033_HYBRID_2096})"
    )
