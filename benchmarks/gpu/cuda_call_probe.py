"""Host time of small CUDA calls in a process, before and after NIXL/UCX join it (a probe).

    PYTHONPATH=<dir holding layoutc> python benchmarks/gpu/cuda_call_probe.py

Stages: plain torch; with a NIXL agent; with VRAM registered; connected to a peer process
after a transfer; while the agent is polled between calls.  Each prints the median host
microseconds of: a tiny device allocation, an 8-byte pinned host-to-device copy (queued), an
event record, a tiny kernel (``add_``), and the three together (what the staged engine does
per request before a pack).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import sys
import time


def _ops(torch, host, poll=None):
    out = {}
    dev = torch.device("cuda:0")
    x = torch.zeros(16, device=dev)

    def t(fn, n=300):
        fn()
        ts = []
        for _ in range(n):
            if poll is not None:
                poll()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        return round(statistics.median(ts) * 1e6, 1)

    out["empty_us"] = t(lambda: torch.empty(8, dtype=torch.int64, device=dev))
    out["h2d_pinned_us"] = t(
        lambda: torch.empty(1, dtype=torch.int64, device=dev).copy_(host[:1], non_blocking=True)
    )
    out["event_record_us"] = t(lambda: torch.cuda.Event().record())
    out["add_us"] = t(lambda: x.add_(1))

    def all3():
        d = torch.empty(1, dtype=torch.int64, device=dev)
        d.copy_(host[:1], non_blocking=True)
        torch.cuda.Event().record()

    out["ids_to_device_us"] = t(all3)
    return out


def _peer(conn):
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    from layoutc.runtime import nixl_compat

    nixl_compat.prepare_cuda_env()
    import torch

    agent = nixl_compat.create_agent(f"cp-b-{os.getpid()}")
    buf = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda:0")
    reg = agent.register_memory(buf)
    conn.send((agent.get_agent_metadata(), buf.data_ptr()))
    agent.add_remote_agent(conn.recv())
    while not conn.poll(0.0002):
        agent.get_new_notifs()
    conn.recv()
    agent.deregister_memory(reg)


def main():
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    import torch

    torch.cuda.init()
    host = torch.zeros(64, dtype=torch.int64, pin_memory=True)
    res = {"env": {k: v for k, v in os.environ.items() if k.startswith("UCX_")}}
    res["plain"] = _ops(torch, host)
    from layoutc.runtime import nixl_compat

    nixl_compat.prepare_cuda_env()
    import numpy as np

    agent = nixl_compat.create_agent(f"cp-a-{os.getpid()}")
    res["agent"] = _ops(torch, host)
    buf = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda:0")
    reg = agent.register_memory(buf)
    res["registered"] = _ops(torch, host)
    ctx = mp.get_context("spawn")
    c, p = ctx.Pipe()
    proc = ctx.Process(target=_peer, args=(p,))
    proc.start()
    if not c.poll(60):
        print(json.dumps({"error": "peer did not start"}))
        proc.kill()
        return
    md, raddr = c.recv()
    c.send(agent.get_agent_metadata())
    peer = agent.add_remote_agent(md)
    peer = peer.decode() if isinstance(peer, bytes) else peer
    lo = agent.get_xfer_descs(np.array([[buf.data_ptr(), 1 << 20, 0]], np.uint64), "VRAM")
    ro = agent.get_xfer_descs(np.array([[raddr, 1 << 20, 0]], np.uint64), "VRAM")
    end = time.monotonic() + 30
    while True:
        try:
            h = agent.initialize_xfer("WRITE", lo, ro, peer, b"x")
            break
        except Exception:  # noqa: BLE001 - metadata not loaded yet
            if time.monotonic() > end:
                raise
            agent.get_new_notifs()
    st = agent.transfer(h)
    while st == "PROC":
        st = agent.check_xfer_state(h)
    h.release()
    res["after_transfer"] = _ops(torch, host)
    res["polled_between"] = _ops(torch, host, poll=agent.get_new_notifs)
    print(json.dumps(res))
    c.send("stop")
    proc.join(20)
    agent.deregister_memory(reg)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
