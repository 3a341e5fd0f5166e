"""Host time of CUDA calls in one process while two other processes use the same GPU (a probe).

    PYTHONPATH=<dir holding layoutc> python benchmarks/gpu/contention_probe.py [seconds]

The measuring process times (median and 90th percentile, microseconds of host time) a small
torch kernel launch, the staging triton kernel's launch, an event record, an event query, an
8-byte pinned host-to-device copy, a device switch, and the turnaround of a tiny kernel
(launch to its event seen done).  The two other processes, one scenario after the other:
``none`` (not started), ``idle`` (a CUDA context, sleeping), ``spin`` (a CUDA context, a
Python loop without CUDA calls), ``query`` (tiny kernels, each awaited with event queries),
``busy`` (64 MiB device copies back to back, each awaited with event queries: what the other
ranks do during a request).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import time


def _other(mode: str, ready, stop) -> None:
    import torch

    dev = torch.device("cuda:0")
    x = torch.zeros(16 << 20, dtype=torch.float32, device=dev)
    y = torch.zeros_like(x)
    s = torch.zeros(16, device=dev)
    torch.cuda.synchronize()
    ready.set()
    while not stop.is_set():
        if mode == "idle":
            time.sleep(0.001)
        elif mode == "spin":
            for _ in range(1000):
                pass
        else:
            ev = torch.cuda.Event()
            if mode == "query":
                s.add_(1)
            else:
                y.copy_(x)
            ev.record()
            while not ev.query():
                pass


def _enter_exit(cm) -> None:
    with cm:
        pass


def _measure(torch, n: int = 400) -> dict[str, list[float]]:
    from layoutc.runtime import staging

    dev = torch.device("cuda:0")
    x = torch.zeros(16, device=dev)
    host = torch.zeros(64, dtype=torch.int64, pin_memory=True)
    kernel = staging.triton_kernel()
    st = torch.zeros(1 << 16, dtype=torch.int64, device=dev)
    tab = torch.zeros((4, 1), dtype=torch.int64, device=dev)
    tab[0, 0] = st.data_ptr()
    tab[2, 0] = 4096
    blk = torch.zeros(1, dtype=torch.int64, device=dev)
    done = torch.cuda.Event()
    done.record()
    torch.cuda.synchronize()

    def launch():
        kernel[(1, 1)](st, tab, blk, 1, 1, 0, 4096, 0, UNIT=8, PACK=True, TILE=1024, num_warps=8)

    calls = {
        "add_": lambda: x.add_(1),
        "triton_launch": launch,
        "event_record": lambda: done.record(),
        "event_query": lambda: done.query(),
        "h2d_pinned_8B": lambda: torch.empty(1, dtype=torch.int64, device=dev).copy_(
            host[:1], non_blocking=True
        ),
        "device_ctx": lambda: _enter_exit(torch.cuda.device(dev)),
    }
    out: dict[str, list[float]] = {}
    for name, fn in calls.items():
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
            if name != "event_query":
                torch.cuda.synchronize()
        out[name] = ts
    ts = []
    for _ in range(n // 4):
        ev = torch.cuda.Event()
        t0 = time.perf_counter()
        x.add_(1)
        ev.record()
        while not ev.query():
            pass
        ts.append(time.perf_counter() - t0)
    out["tiny_kernel_turnaround"] = ts
    return out


def main() -> None:
    import torch

    torch.cuda.init()
    ctx = mp.get_context("spawn")
    res: dict[str, dict[str, list[float]]] = {}
    for mode in ("none", "idle", "spin", "query", "busy"):
        procs, stop = [], ctx.Event()
        if mode != "none":
            for _ in range(2):
                ready = ctx.Event()
                p = ctx.Process(target=_other, args=(mode, ready, stop), daemon=True)
                p.start()
                if not ready.wait(60):
                    print(json.dumps({"error": f"{mode}: other process did not start"}))
                    return
                procs.append(p)
        time.sleep(0.2)
        r = _measure(torch)
        stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        res[mode] = {
            k: [
                round(statistics.median(v) * 1e6, 1),
                round(sorted(v)[int(len(v) * 0.9)] * 1e6, 1),
            ]
            for k, v in r.items()
        }
        print(mode, json.dumps(res[mode]), flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
