"""cProfile of the three processes of the bench's scattered GPU request (prints the profiles).

    PYTHONPATH=<dir holding layoutc> python benchmarks/gpu/host_profile.py [requests]

Where the host time of a staged request goes on this machine: the same set-up as
``layoutc bench --device cuda`` (P_TP=1 -> D_TP=2, three processes on GPU 0, 1 GiB), a few
warm requests, then ``requests`` more under cProfile in every process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

from layoutc.compiler.cli_runtime import _builtin_compile as compile_plan
from layoutc.runtime import bench as B


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    cfg = B.BenchConfig(
        device="cuda", gpu_bytes_per_decode_rank=int(os.environ.get("PROBE_BYTES", 512 << 20))
    )
    ctx = mp.get_context("spawn")
    dev = os.environ.get("PROBE_DEVICE", "cuda")  # "cpu": a dry run of this script
    workers = [B._Worker(ctx, dev, lab) for lab in ("prefill", "decode-0", "decode-1")]
    try:
        ep_kw = dict(
            timeout_s=60.0,
            staging_bytes=cfg.gpu_staging_bytes,
            staging_slots=cfg.gpu_staging_slots,
        )
        params = dict(num_key_value_heads=4, head_dim=128, block_size=16)
        case = B.gpu_scattered_setup(compile_plan, cfg, workers, params, ep_kw, tag="h")
        names, dec, db, pb = case.names, case.dec, case.db, case.pb
        for i in range(3):
            B._run_request(workers, names, f"w{i}", dec, db, pb, "auto", 60.0)
        for w in workers:
            w.call("cprofile", True)
        ts = []
        for i in range(n):
            t, _ = B._run_request(workers, names, f"p{i}", dec, db, pb, "auto", 60.0)
            ts.append(round(t * 1e3, 3))
        print("requests (ms):", ts)
        for w in workers:
            print(f"===== {w.label}")
            print(w.call("cprofile", False, 35))
        print("timeline:", B._profile_staged(workers, names, dec, db, pb))
    finally:
        for w in workers:
            w.stop()
    time.sleep(0.1)


if __name__ == "__main__":
    main()
