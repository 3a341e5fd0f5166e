"""NIXL between two GPUs of one host: one 1 GiB descriptor READ and WRITE, GPU 0 -> GPU 1,
against a torch peer copy of the same bytes (prints JSON lines; a probe, not the bench).

    PYTHONPATH=<dir holding layoutc> python benchmarks/gpu/xgpu_probe.py
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import time

NBYTES = 1 << 30


def _side(role, gpu, conn):
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    from layoutc.runtime import nixl_compat

    nixl_compat.prepare_cuda_env()
    import numpy as np
    import torch

    torch.cuda.set_device(gpu)
    agent = nixl_compat.create_agent(f"x-{role}-{os.getpid()}")
    buf = torch.full((NBYTES,), 7 if role == "src" else 0, dtype=torch.uint8, device=f"cuda:{gpu}")
    reg = agent.register_memory(buf)
    conn.send((agent.get_agent_metadata(), buf.data_ptr()))
    md, raddr, rgpu = conn.recv()
    peer = agent.add_remote_agent(md)
    if role == "src":  # passive: progress until told to stop
        while not conn.poll(0.0005):
            agent.get_new_notifs()
        conn.recv()
        agent.deregister_memory(reg)
        return
    time.sleep(0.5)
    out = {}
    for op in ("READ", "WRITE"):
        lo = agent.get_xfer_descs(np.array([[buf.data_ptr(), NBYTES, gpu]], np.uint64), "VRAM")
        ro = agent.get_xfer_descs(np.array([[raddr, NBYTES, rgpu]], np.uint64), "VRAM")
        ts = []
        for _ in range(8):
            torch.cuda.synchronize()
            h = agent.initialize_xfer(op, lo, ro, peer, b"")
            t0 = time.perf_counter()
            st = agent.transfer(h)
            while st == "PROC":
                st = agent.check_xfer_state(h)
            ts.append(time.perf_counter() - t0)
            h.release()
            assert st == "DONE", st
        out[op] = round(NBYTES / statistics.median(ts[2:]) / 1e9, 1)
    out["read_ok"] = bool((buf[:: 1 << 20] == 7).all().item()) if True else None
    conn.send(out)
    agent.deregister_memory(reg)


def main():
    import torch

    n = torch.cuda.device_count()
    print(json.dumps({"gpus": n, "names": [torch.cuda.get_device_name(i) for i in range(n)]}))
    if n < 2:
        return
    print(json.dumps({"can_access_peer_0_1": torch.cuda.can_device_access_peer(0, 1)}))
    a = torch.empty(NBYTES, dtype=torch.uint8, device="cuda:0")
    b = torch.empty(NBYTES, dtype=torch.uint8, device="cuda:1")
    ts = []
    for _ in range(8):
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize(1)
        torch.cuda.synchronize(0)
        ts.append(time.perf_counter() - t0)
    print(json.dumps({"torch_peer_copy_GBps": round(NBYTES / statistics.median(ts[2:]) / 1e9, 1)}))
    del a, b
    torch.cuda.empty_cache()
    ctx = mp.get_context("spawn")
    c_src, p_src = ctx.Pipe()
    c_dst, p_dst = ctx.Pipe()
    ps = [
        ctx.Process(target=_side, args=("src", 0, p_src)),
        ctx.Process(target=_side, args=("dst", 1, p_dst)),
    ]
    for p in ps:
        p.start()
    if not (c_src.poll(60) and c_dst.poll(60)):  # a side that failed to start says nothing
        print(json.dumps({"nixl": "a side did not start within 60 s"}))
        for p in ps:
            p.kill()
        return
    md_s, addr_s = c_src.recv()
    md_d, addr_d = c_dst.recv()
    c_src.send((md_d, addr_d, 1))
    c_dst.send((md_s, addr_s, 0))
    if c_dst.poll(120):
        print(json.dumps({"nixl_gpu1_from_gpu0": c_dst.recv()}))
    else:
        print(json.dumps({"nixl": "no answer in 120 s"}))
    c_src.send("stop")
    for p in ps:
        p.join(30)
        if p.is_alive():
            p.kill()


if __name__ == "__main__":
    main()
