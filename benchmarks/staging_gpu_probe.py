"""Staging pack/unpack on one GPU: correctness against the CPU path, then GB/s (prints only).

    PYTHONPATH=<dir holding layoutc> python benchmarks/staging_gpu_probe.py

1. Same random pages on CPU and GPU; staged transfers (odd chunk sizes, per-row and grouped
   kernels) on both; the GPU's decode pages must equal the CPU's byte for byte.
2. Pack / unpack GB/s of one (decode rank, prefill rank) stream, 1,000 scattered blocks x 64
   layers, whole stream and 64 MiB chunks, kernels per row or per group, widest element
   (16 B) against 8 B and 1 B; ``copy_`` of the same bytes as the ceiling.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from layoutc.compiler.api import compile_plan
from layoutc.runtime.staging import BoundPages, StagingLayout, expand, pack, unpack
from layoutc.runtime.staging import pages as staging_pages

SPECS = Path(__file__).resolve().parents[1] / "specs"
SMALL_HYBRID = dict(
    num_key_value_heads=2,
    head_dim=64,
    mamba_num_heads=8,
    mamba_head_dim=16,
    n_groups=2,
    ssm_state_size=16,
)


def layer_pages(plan, n):
    kinds = [pages for _, pages in plan.layer_kinds]
    return [tuple(kinds[i % len(kinds)]) for i in range(n)]


def rand_bufs(plan, role, lp, nb, gen, device):
    side = plan.prefill if role == "prefill" else plan.decode
    return [
        {
            p: torch.randint(
                0, 256, (side.page(p).buffer_bytes(nb),), dtype=torch.uint8, generator=gen
            ).to(device)
            for p in pages
        }
        for pages in lp
    ]


def staged(plan, dr, lp, P, D, pb, db, chunk, grouped, fused=False):
    dev = D[0][lp[0][0]].device
    for src in plan.rank(dr).sources:
        lay = StagingLayout.build(plan, decode_rank=dr, prefill_rank=src, layer_pages=lp)
        ex = expand(lay, db, pb[src], chunk_bytes=chunk)
        stage = torch.empty(max(1, min(chunk, ex.nbytes)), dtype=torch.uint8, device=dev)
        for s, e in ex.chunks():
            pack(
                P[src],
                lay,
                pb[src],
                stage,
                start=s,
                end=e,
                stream=ex.stream,
                grouped=grouped,
                fused=fused,
            )
            unpack(
                D, lay, db, stage, start=s, end=e, stream=ex.stream, grouped=grouped, fused=fused
            )


def correctness():
    cases = [
        ("vllm_hybrid_mamba2", SMALL_HYBRID, 4, 2),
        ("vllm_hybrid_mamba2", SMALL_HYBRID, 1, 2),
        ("vllm_hybrid_mamba2", SMALL_HYBRID, 2, 1),
        ("vllm_flashinfer", {"num_key_value_heads": 6, "head_dim": 64}, 2, 3),
        ("vllm_flashinfer", {"num_key_value_heads": 8, "head_dim": 64}, 1, 2),
    ]
    ok = True
    for spec, params, p, d in cases:
        plan = compile_plan(str(SPECS / f"{spec}.layout"), p, d, params)
        lp = layer_pages(plan, 6)
        rng = np.random.default_rng(0)
        nb, req = 40, 17
        pb = [rng.choice(nb, req, replace=False) for _ in range(p)]
        db = rng.choice(nb, req, replace=False)
        for chunk in (1 << 30, 4097, 777, 4096):
            for grouped, fused in ((False, False), (True, False), (None, True)):
                gen = torch.Generator().manual_seed(1)
                Pc = [rand_bufs(plan, "prefill", lp, nb, gen, "cpu") for _ in range(p)]
                Pg = [[{k: t.cuda() for k, t in lay.items()} for lay in x] for x in Pc]
                for dr in range(d):
                    Dc = rand_bufs(plan, "decode", lp, nb, gen, "cpu")
                    Dg = [{k: t.cuda() for k, t in lay.items()} for lay in Dc]
                    staged(plan, dr, lp, Pc, Dc, pb, db, chunk, None)
                    staged(plan, dr, lp, Pg, Dg, pb, db, chunk, grouped, fused)
                    torch.cuda.synchronize()
                    same = all(
                        torch.equal(Dc[i][k], Dg[i][k].cpu()) for i in range(len(lp)) for k in lp[i]
                    )
                    ok &= same
                    if not same:
                        print(
                            f"MISMATCH {spec} {p}->{d} rank {dr} chunk {chunk} grouped "
                            f"{grouped} fused {fused}"
                        )
    print(
        f"correctness (GPU == CPU path, 5 plans x 4 chunkings x 3 kernel modes): "
        f"{'OK' if ok else 'FAILED'}"
    )


def cuda_median(fn, reps=15):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def throughput(name, spec, params, p, d, nlayers=64, blocks=1000, pool=3000):
    plan = compile_plan(str(SPECS / f"{spec}.layout"), p, d, params)
    lp = layer_pages(plan, nlayers)
    rng = np.random.default_rng(0)
    lay = StagingLayout.build(plan, decode_rank=0, prefill_rank=0, layer_pages=lp)
    local = rng.choice(pool, blocks, replace=False)
    remote = rng.choice(pool, blocks, replace=False)
    chunk = 64 << 20
    t0 = time.perf_counter()
    for _ in range(100):
        ex = expand(lay, local, remote, chunk_bytes=chunk, kernel="fused")
    t_exp = (time.perf_counter() - t0) / 100
    gen = torch.Generator(device="cuda").manual_seed(0)

    def bufs(side):
        return [
            {
                pg: torch.randint(
                    0,
                    256,
                    (side.page(pg).buffer_bytes(pool),),
                    dtype=torch.uint8,
                    device="cuda",
                    generator=gen,
                )
                for pg in pages
            }
            for pages in lp
        ]

    P = BoundPages(lay, bufs(plan.prefill), "prefill")
    D = BoundPages(lay, bufs(plan.decode), "decode")
    total = ex.nbytes
    whole = torch.empty(total, dtype=torch.uint8, device="cuda")
    stage = torch.empty(chunk, dtype=torch.uint8, device="cuda")
    rt = torch.from_numpy(remote).cuda()
    lt = torch.from_numpy(local).cuda()
    print(
        f"\n{name}: {spec} {params} P_TP={p} -> D_TP={d}, {blocks} scattered blocks x "
        f"{nlayers} layers: {lay.num_rows} rows, {lay.num_groups} groups, stream "
        f"{total / 1e6:.1f} MB, run bytes {sorted(set(lay.row_nbytes.tolist()))}; "
        f"expand {t_exp * 1e6:.0f} us"
    )
    res = {}
    for units, tag in (((16, 8, 4, 2, 1), "16 B"), ((8, 4, 2, 1), "8 B"), ((1,), "1 B")):
        staging_pages._UNITS = units
        for grouped in (False, True):
            g = "grouped" if grouped else "per-row"
            res[f"pack   {tag:4s} {g:7s} whole"] = cuda_median(
                lambda g=grouped: pack(
                    P,
                    lay,
                    remote,
                    whole,
                    stream=ex.stream,
                    device_block_ids=rt,
                    grouped=g,
                    fused=False,
                )
            )
            res[f"unpack {tag:4s} {g:7s} whole"] = cuda_median(
                lambda g=grouped: unpack(
                    D,
                    lay,
                    local,
                    whole,
                    stream=ex.stream,
                    device_block_ids=lt,
                    grouped=g,
                    fused=False,
                )
            )
        staging_pages._UNITS = (16, 8, 4, 2, 1)

    for tag, bufs_, fn, ids_t in (("pack  ", P, pack, rt), ("unpack", D, unpack, lt)):
        ids = remote if fn is pack else local
        res[f"{tag} fused (triton) whole"] = cuda_median(
            lambda f=fn, b=bufs_, i=ids, t=ids_t: f(
                b, lay, i, whole, stream=ex.stream, device_block_ids=t, fused=True
            )
        )

    def fused_chunks(fn, bufs_, ids, ids_t):
        for s, e in ex.chunks():
            fn(
                bufs_,
                lay,
                ids,
                stage,
                start=s,
                end=e,
                stream=ex.stream,
                device_block_ids=ids_t,
                fused=True,
            )

    res["pack   fused 64 MiB chunks"] = cuda_median(lambda: fused_chunks(pack, P, remote, rt))
    res["unpack fused 64 MiB chunks"] = cuda_median(lambda: fused_chunks(unpack, D, local, lt))
    # the fused result must equal the torch kernels' byte for byte
    chk = torch.empty_like(whole)
    pack(P, lay, remote, whole, stream=ex.stream, device_block_ids=rt, fused=False)
    pack(P, lay, remote, chk, stream=ex.stream, device_block_ids=rt, fused=True)
    torch.cuda.synchronize()
    print(f"  fused pack == torch pack: {bool(torch.equal(chk, whole))}")

    def chunks(fn, bufs_, ids, ids_t):
        for s, e in ex.chunks():
            fn(
                bufs_,
                lay,
                ids,
                stage,
                start=s,
                end=e,
                stream=ex.stream,
                device_block_ids=ids_t,
                grouped=True,
            )

    res["pack   16 B grouped 64 MiB chunks"] = cuda_median(lambda: chunks(pack, P, remote, rt))
    res["unpack 16 B grouped 64 MiB chunks"] = cuda_median(lambda: chunks(unpack, D, local, lt))
    a = torch.empty_like(whole)
    res["copy_ of the same bytes (ceiling)"] = cuda_median(lambda: a.copy_(whole))
    # CPU-side cost of issuing the kernels (no sync): how launch-bound a pack is
    t0 = time.perf_counter()
    pack(P, lay, remote, whole, stream=ex.stream, device_block_ids=rt, grouped=True, fused=False)
    t_issue = time.perf_counter() - t0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pack(P, lay, remote, whole, stream=ex.stream, device_block_ids=rt, fused=True)
    t_issue_f = time.perf_counter() - t0
    torch.cuda.synchronize()
    for k, t in res.items():
        print(f"  {k:38s} {t * 1e3:8.3f} ms  {total / t / 1e9:8.1f} GB/s")
    print(
        f"  host time to issue one pack: grouped torch {t_issue * 1e3:.3f} ms, fused "
        f"{t_issue_f * 1e3:.3f} ms"
    )


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    start = time.perf_counter()
    correctness()
    throughput(
        "hetero-TP attention", "vllm_flashinfer", {"num_key_value_heads": 8, "head_dim": 128}, 4, 2
    )
    throughput(
        "hetero-TP attention, 4 KiB runs",
        "vllm_flashinfer",
        {"num_key_value_heads": 8, "head_dim": 64},
        4,
        2,
    )
    throughput("hybrid (small values, as the CPU probe)", "vllm_hybrid_mamba2", SMALL_HYBRID, 4, 2)
    throughput("hybrid 1->2 (multi-row groups)", "vllm_hybrid_mamba2", SMALL_HYBRID, 1, 2)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
