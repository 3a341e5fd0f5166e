"""NIXL notification round trips between two processes (prints JSON lines; a probe).

    PYTHONPATH=<dir holding layoutc> python benchmarks/gpu/notif_probe.py [cpu|cuda]

Each process registers a small buffer on the device (so UCX loads the same transports as a
runtime endpoint); then ping-pong of notifications of 64 B to 16 KiB, median round trip.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import sys
import time

SIZES = (64, 1024, 4096, 6144, 8192, 16384)
ROUNDS = 200


def _side(role, device, conn):
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    from layoutc.runtime import nixl_compat

    if device == "cuda":
        nixl_compat.prepare_cuda_env()
    import torch

    agent = nixl_compat.create_agent(f"n-{role}-{os.getpid()}")
    buf = torch.zeros(1 << 20, dtype=torch.uint8, device=device)
    reg = agent.register_memory(buf)
    conn.send(agent.get_agent_metadata())
    peer = agent.add_remote_agent(conn.recv())
    peer = peer.decode() if isinstance(peer, bytes) else peer

    def recv_one():
        end = time.monotonic() + 10
        while time.monotonic() < end:
            got = agent.get_new_notifs()
            for msgs in got.values():
                if msgs:
                    return msgs[0]
        raise TimeoutError("no notification in 10 s")

    # connect (both sides progressing)
    if role == "a":
        while True:
            try:
                agent.send_notif(peer, b"hello")
                break
            except Exception:  # noqa: BLE001
                agent.get_new_notifs()
        recv_one()
    else:
        recv_one()
        agent.send_notif(peer, b"hello")
    out = {}
    for size in SIZES:
        msg = b"x" * size
        ts = []
        for _ in range(ROUNDS):
            if role == "a":
                t0 = time.perf_counter()
                agent.send_notif(peer, msg)
                recv_one()
                ts.append(time.perf_counter() - t0)
            else:
                recv_one()
                agent.send_notif(peer, msg)
        if role == "a":
            out[size] = round(statistics.median(ts) * 1e6, 1)
    if role == "a":
        conn.send(out)
    time.sleep(0.5)
    agent.deregister_memory(reg)


def main():
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    ctx = mp.get_context("spawn")
    ca, pa = ctx.Pipe()
    cb, pb = ctx.Pipe()
    ps = [ctx.Process(target=_side, args=(r, device, p)) for r, p in (("a", pa), ("b", pb))]
    for p in ps:
        p.start()
    if not (ca.poll(60) and cb.poll(60)):  # a side that failed to start says nothing
        print(json.dumps({"device": device, "error": "a side did not start within 60 s"}))
        for p in ps:
            p.kill()
        return
    ma, mb = ca.recv(), cb.recv()
    ca.send(mb)
    cb.send(ma)
    if ca.poll(120):
        print(json.dumps({"device": device, "notif_round_trip_us_by_bytes": ca.recv()}))
    else:
        print(json.dumps({"device": device, "error": "no answer in 120 s"}))
    for p in ps:
        p.join(30)
        if p.is_alive():
            p.kill()


if __name__ == "__main__":
    main()
