"""Variants of the fused staging kernel on one GPU (prints JSON lines; tuning data only).

    PYTHONPATH=<dir holding layoutc> python benchmarks/gpu/kernel_probe.py

The case is the bench's scattered GPU request (flashinfer, 4 KV heads x 128, block 16,
32 layers, P_TP=1 -> D_TP=2, decode rank 0: 8 KiB pieces, 1,024 scattered blocks, 512 MiB).
Each variant (the runtime's kernel with other warps and tile sizes) packs the whole stream
into one buffer; its output must equal the runtime's ``staging.pack``.  (An earlier variant
with 16-byte alignment hints gave no gain: 1,119-1,287 GB/s against 1,302-1,358.)  Also: a torch ``copy_`` of the same bytes (the ceiling) and the host time
of one kernel launch.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import torch
from layoutc.compiler.api import compile_builtin as compile_plan
from layoutc.runtime.endpoint import allocate_buffers
from layoutc.runtime.staging import BoundPages, StagingLayout, pack, triton_kernel


def timed(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def main() -> None:
    dev = torch.device("cuda:0")
    layers = 32
    params = dict(num_key_value_heads=4, head_dim=128, block_size=16, num_layers=layers)
    plan = compile_plan("vllm_flashinfer", 1, 2, params)
    kinds = ["attention"] * layers
    per_block = sum(int(g.nbytes) * g.count for g in plan.rank(0).posts)
    nblk = (512 << 20) // (per_block * layers)
    pool = nblk * 3 // 2 + 1
    rng = np.random.default_rng(11)
    pb = rng.permutation(pool)[:nblk].astype(np.int64)
    bufs = allocate_buffers(plan, "prefill", kinds, pool, str(dev))
    for layer in bufs:
        for t in layer.values():
            t.random_(0, 256)
    lay = StagingLayout.build(
        plan, decode_rank=0, prefill_rank=0, layer_pages=[("attention",)] * layers
    )
    bound = BoundPages(lay, bufs, "prefill")
    stream = lay.stream(nblk, None)
    total = stream.total_bytes
    ref = torch.empty(total, dtype=torch.uint8, device=dev)
    blk = torch.from_numpy(pb).to(dev)

    def runtime_pack():
        pack(bound, lay, pb, ref, "prefill", stream=stream, device_block_ids=blk)

    t = timed(runtime_pack)
    print(json.dumps({"variant": "runtime pack", "GBps": round(total / t / 1e9, 1)}))
    src = torch.empty(total, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src))
    print(json.dumps({"variant": "torch copy_", "GBps": round(total / t / 1e9, 1)}))
    table, cum, unit = bound.row_table(stream.groups)
    R = int(table.shape[1])
    out = torch.empty(total // 8, dtype=torch.int64, device=dev)
    kernel = triton_kernel()  # the runtime's fused kernel, launched with other settings
    for warps in (4, 8, 16):
        for tile_bytes in (4096, 8192):

            def run(pack_=True, warps=warps, tile_bytes=tile_bytes):
                kernel[(nblk, R)](
                    out, table, blk, R, nblk, 0, total, 0,
                    UNIT=8, PACK=pack_, TILE=tile_bytes // 8, num_warps=warps,
                )  # fmt: skip

            t = timed(run)
            same = bool(torch.equal(out.view(torch.uint8), ref))
            tu = timed(lambda: run(False))
            print(
                json.dumps(
                    {
                        "variant": f"warps {warps} tile {tile_bytes}",
                        "pack_GBps": round(total / t / 1e9, 1),
                        "unpack_GBps": round(total / tu / 1e9, 1),
                        "equal": same,
                    }
                )
            )
    # host time of one launch (a one-block, one-row pack)
    one = blk[:1]
    for _ in range(20):
        kernel[(1, 1)](out, table, one, R, 1, 0, 8192, 0, UNIT=8, PACK=True, TILE=1024)
    torch.cuda.synchronize()
    hs = []
    for _ in range(200):
        t0 = time.perf_counter()
        kernel[(1, 1)](out, table, one, R, 1, 0, 8192, 0, UNIT=8, PACK=True, TILE=1024)
        hs.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    ps = []
    for _ in range(100):
        t0 = time.perf_counter()
        runtime_pack_one = pack(bound, lay, pb[:1], ref, "prefill", start=0, end=8192)
        ps.append(time.perf_counter() - t0)
    ev = []
    for _ in range(200):
        t0 = time.perf_counter()
        e = torch.cuda.Event()
        e.record()
        e.query()
        ev.append(time.perf_counter() - t0)
    h2d = []
    for _ in range(100):
        t0 = time.perf_counter()
        torch.from_numpy(pb).to(dev)
        h2d.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "launch_us": round(statistics.median(hs) * 1e6, 1),
                "runtime_pack_call_us": round(statistics.median(ps) * 1e6, 1),
                "event_record_query_us": round(statistics.median(ev) * 1e6, 1),
                "block_ids_h2d_us": round(statistics.median(h2d) * 1e6, 1),
                "_": runtime_pack_one,
            }
        )
    )


if __name__ == "__main__":
    main()
