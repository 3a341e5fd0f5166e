"""Per-request planning and staging pack/unpack throughput (CPU probe; prints, asserts nothing).

    PYTHONPATH=/work/dev python benchmarks/expand_probe.py [--blocks 1000] [--layers 64]

Hybrid attention + Mamba2 spec at prefill TP 4 -> decode TP 2, small model values, half the
layers attention and half Mamba (alternating), scattered block ids on both sides.

* ``expand``: block ids -> zero-copy NIXL index arrays (one PairTable's rows x blocks, both
  sides) + staged stream map and chunk table, for one (decode rank, prefill rank) pair;
  ``expand_loop``: the same arrays with a per-block Python loop (docs/design.md §8 target: expand
  under 1 ms and at least 20x faster than the loop).
* ``pack``/``unpack``: GB/s of stream bytes through a reused 64 MiB staging buffer, and the
  per-row kernels against one gather per (layer, page) with per-unit indices.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from layoutc.compiler.api import compile_plan
from layoutc.runtime.descriptors import build_pair_table, synthetic_segments
from layoutc.runtime.staging import BoundPages, StagingLayout, expand, pack, unpack
from layoutc.tools.bench.reference import expand_loop

SPEC = Path(__file__).resolve().parents[1] / "specs" / "vllm_hybrid_mamba2.layout"
PARAMS = dict(
    num_key_value_heads=2,
    head_dim=64,
    mamba_num_heads=8,
    mamba_head_dim=16,
    n_groups=2,
    ssm_state_size=16,
)


def median_s(fn, reps: int, warm: int = 1) -> float:
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def unit_index_gather(bufs, lay, blocks_t, out, layers_rows):
    """Alternative pack: one index_select per (layer, page) over per-unit indices."""
    pos = 0
    for layer, page, po, nb, stride in layers_rows:
        g = 0
        for v in (*po, *nb, stride):
            g = math.gcd(g, v)
        idx = torch.cat(
            [
                (
                    blocks_t[:, None] * (stride // g)
                    + (o // g)
                    + torch.arange(n // g, dtype=torch.int64)[None, :]
                ).reshape(-1)
                for o, n in zip(po, nb)
            ]
        )
        src = bufs[layer][page].view(-1, g)
        n_bytes = idx.numel() * g
        torch.index_select(src, 0, idx, out=out[pos : pos + n_bytes].view(-1, g))
        pos += n_bytes
    return pos


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--pool", type=int, default=1500, help="logical blocks per buffer")
    ap.add_argument("--chunk-mib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=51)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for every kernel (pack/unpack default to 1 themselves)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    plan = compile_plan(str(SPEC), 4, 2, PARAMS)
    kinds = [pages for _, pages in plan.layer_kinds]
    lp = [tuple(kinds[i % 2]) for i in range(args.layers)]
    rng = np.random.default_rng(0)
    B = args.blocks
    dr, src = 0, 0

    print(f"host: {torch.get_num_threads()} torch threads; torch {torch.__version__}")
    print(f"spec: {SPEC.name} {PARAMS} P_TP=4 -> D_TP=2, decode rank {dr} <- prefill rank {src}")
    lay = StagingLayout.build(plan, decode_rank=dr, prefill_rank=src, layer_pages=lp)
    table = build_pair_table(
        plan,
        decode_rank=dr,
        prefill_rank=src,
        local_is_decode=True,
        layer_pages=lp,
        local_segments=synthetic_segments(plan.decode, lp, args.pool, 1 << 44),
        remote_segments=synthetic_segments(plan.prefill, lp, args.pool, 1 << 45),
    )
    local = rng.choice(args.pool, B, replace=False)
    remote = rng.choice(args.pool, B, replace=False)
    print(f"rows {lay.num_rows}, groups {lay.num_groups}, {B} blocks x {args.layers} layers")

    chunk = args.chunk_mib << 20
    t_exp = median_s(
        lambda: expand(lay, local, remote, table=table, chunk_bytes=chunk), args.reps, warm=3
    )
    t_loop = median_s(
        lambda: expand_loop(lay, local, remote, table=table, chunk_bytes=chunk),
        max(3, args.reps // 10),
    )
    ex = expand(lay, local, remote, table=table, chunk_bytes=chunk)
    t_exp_sel = median_s(
        lambda: expand(
            lay, local, remote, np.arange(0, args.layers, 2), table=table, chunk_bytes=chunk
        ),
        args.reps,
        warm=3,
    )
    t_exp_noz = median_s(lambda: expand(lay, local, remote, chunk_bytes=chunk), args.reps, warm=3)
    print(
        f"expand (zero-copy indices + staged maps): {t_exp * 1e6:8.0f} us   "
        f"({ex.n_descriptors} descriptors, {ex.nbytes / 1e6:.1f} MB, {ex.n_chunks} chunks)"
    )
    print(f"expand, staged maps only:                 {t_exp_noz * 1e6:8.0f} us")
    print(f"expand, every other layer:                {t_exp_sel * 1e6:8.0f} us")
    print(
        f"expand_loop:                              {t_loop * 1e6:8.0f} us   "
        f"({t_loop / t_exp:.0f}x slower)"
    )

    # -- pack / unpack ---------------------------------------------------------------------
    def bufs(side, fill):
        out = []
        for pages in lp:
            d = {}
            for page in pages:
                n = side.page(page).buffer_bytes(args.pool)
                d[page] = (
                    torch.randint(0, 256, (n,), dtype=torch.uint8)
                    if fill
                    else torch.zeros(n, dtype=torch.uint8)
                )
            out.append(d)
        return out

    P = bufs(plan.prefill, True)
    D = bufs(plan.decode, False)
    t_bind = median_s(lambda: BoundPages(lay, P, "prefill"), 11)
    PB = BoundPages(lay, P, "prefill")
    DB = BoundPages(lay, D, "decode")
    total = ex.stream.total_bytes
    stage = torch.empty(chunk, dtype=torch.uint8)
    whole = torch.empty(total, dtype=torch.uint8)
    rt = torch.from_numpy(remote)
    lt = torch.from_numpy(local)
    reps = max(3, args.reps // 5)

    def pack_chunks():
        for s, e in ex.chunks():
            pack(PB, lay, remote, stage, start=s, end=e, stream=ex.stream, device_block_ids=rt)

    def unpack_chunks():
        for s, e in ex.chunks():
            unpack(DB, lay, local, stage, start=s, end=e, stream=ex.stream, device_block_ids=lt)

    res = {}
    res["pack, whole stream (per-row index_select)"] = median_s(
        lambda: pack(PB, lay, remote, whole, stream=ex.stream, device_block_ids=rt), reps
    )
    res["pack, unbound buffers (bound per call)"] = median_s(
        lambda: pack(P, lay, remote, whole, stream=ex.stream, device_block_ids=rt), reps
    )
    res["pack, grouped 3-D index_select"] = median_s(
        lambda: pack(PB, lay, remote, whole, stream=ex.stream, device_block_ids=rt, grouped=True),
        reps,
    )
    res[f"pack, {args.chunk_mib} MiB chunks"] = median_s(pack_chunks, reps)
    rows_by_page = []
    for layer, pages in enumerate(lp):
        for page in pages:
            pi = lay.page_names.index(page)
            sel = (lay.row_layer == layer) & (lay.row_page == pi)
            if sel.any():
                rows_by_page.append(
                    (
                        layer,
                        page,
                        lay.row_prefill_offset[sel].tolist(),
                        lay.row_nbytes[sel].tolist(),
                        int(lay.prefill_stride[pi]),
                    )
                )
    alt = torch.empty(total, dtype=torch.uint8)
    res["pack alt: one gather per page, per-unit indices"] = median_s(
        lambda: unit_index_gather(P, lay, rt, alt, rows_by_page), reps
    )
    pack(P, lay, remote, whole, stream=ex.stream)
    assert torch.equal(alt, whole), "unit-index gather disagrees with pack"
    res["unpack, whole stream"] = median_s(
        lambda: unpack(DB, lay, local, whole, stream=ex.stream, device_block_ids=lt), reps
    )
    res[f"unpack, {args.chunk_mib} MiB chunks"] = median_s(unpack_chunks, reps)
    a = torch.empty(total, dtype=torch.uint8)
    b = torch.randint(0, 256, (total,), dtype=torch.uint8)
    res["reference: torch copy_ of the same bytes"] = median_s(lambda: a.copy_(b), reps)
    print(f"stream: {total / 1e6:.1f} MB per (decode rank, prefill rank) pair")
    for k, t in res.items():
        print(f"{k:52s} {t * 1e3:8.2f} ms  {total / t / 1e9:6.2f} GB/s")
    # host cost per kernel call: a 2-block request is all overhead
    small = lay.stream(2)
    tiny = torch.empty(small.total_bytes, dtype=torch.uint8)
    ids2 = remote[:2]
    ids2_t = torch.from_numpy(ids2)
    t_small = median_s(
        lambda: pack(PB, lay, ids2, tiny, stream=small, device_block_ids=ids2_t), args.reps
    )
    print(
        f"binding the pages (BoundPages, once per peer): {t_bind * 1e6:.0f} us; "
        f"pack of a 2-block request: {t_small * 1e6:.0f} us for {lay.num_rows} kernel calls "
        f"({t_small / lay.num_rows * 1e6:.1f} us each)"
    )


if __name__ == "__main__":
    main()
