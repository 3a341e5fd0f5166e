"""The bench's worker processes: endpoints with patterned pages, raw NIXL agents, rates."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from layoutc.runtime import nixl_compat
from layoutc.runtime.endpoint import Endpoint, allocate_buffers, host_staging_tensor
from layoutc.runtime.plan import Plan
from layoutc.runtime.staged import staging_memory
from layoutc.runtime.staging import BoundPages, StagingLayout, count_ops, pack, unpack

from .config import BenchError, median_time
from .counting import layer_pages

#: The handler of the bench's workers (:class:`layoutc.tools.harness.Worker`).
HANDLER = "layoutc.tools.bench.worker:BenchWorker"


@contextlib.contextmanager
def environment(env: dict[str, str] | None) -> Iterator[None]:
    """``env`` set in this process while NIXL agents are made (UCX reads its settings when
    an agent's backend starts), the previous values back afterwards."""
    if not env:
        yield
        return
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Sess:
    """One endpoint with its buffers inside a worker."""

    def __init__(
        self,
        plan: Plan,
        role: str,
        rank: int,
        kinds: list[str],
        nb: int,
        device: str,
        ep_kwargs: dict[str, Any],
        name: str,
        env: dict[str, str] | None = None,
    ) -> None:
        import torch

        self.plan, self.role, self.rank, self.nb, self.device = plan, role, rank, nb, device
        self.side = plan.prefill if role == "prefill" else plan.decode
        self.kinds = kinds
        with environment(env):
            self.ep = Endpoint(plan, role, rank, name=name, engine=role, device=device, **ep_kwargs)
        self.bufs = allocate_buffers(plan, role, kinds, nb, device)
        if role == "prefill":
            for li, layer in enumerate(self.bufs):
                for t in layer.values():
                    fill_pattern(t, li, rank)
        if device != "cpu":
            torch.cuda.synchronize()
        self.ep.register_layers(self.bufs, kinds)
        self.results: dict[str, Any] = {}  # rid -> (time done, error or None)
        self.pending: set[str] = set()

    def collect(self) -> bool:
        prog = self.ep.poll()
        now = time.monotonic()
        for rid in prog.done:
            self.results[rid] = (now, None)
            self.pending.discard(rid)
        for rid, err in prog.failed.items():
            self.results[rid] = (now, str(err))
            self.pending.discard(rid)
        return bool(prog.done or prog.failed)


def post_and_wait(agent: Any, handle: Any, what: str, within_s: float) -> None:
    """Post a prepared NIXL transfer and spin until it is ``DONE`` (BenchError on ``ERR`` or
    after ``within_s``)."""
    st = agent.transfer(handle)
    end = time.monotonic() + within_s
    while st != "DONE":
        if st == "ERR" or time.monotonic() > end:
            raise BenchError(f"{what} ended in {st}")
        st = agent.check_xfer_state(handle)


def fill_pattern(t: Any, layer: int, rank: int = 0) -> None:
    """Prefill pages: int64 ``(rank << 56) + ((layer + 1) << 40) + i`` at element i (cheap,
    unique per rank, layer and element)."""
    import torch

    b = t.reshape(-1).view(torch.uint8)
    n8 = b.numel() // 8
    v = b[: n8 * 8].view(torch.int64)
    torch.arange(n8, dtype=torch.int64, device=t.device, out=v)
    v += (rank << 56) + ((layer + 1) << 40)
    if b.numel() > n8 * 8:
        b[n8 * 8 :].zero_()


def pattern_bytes(layer: int, start: int, n: int, rank: int = 0) -> np.ndarray:
    j0 = start // 8
    j1 = (start + n + 7) // 8
    vals = np.arange(j0, j1, dtype=np.int64) + ((rank << 56) + ((layer + 1) << 40))
    b = vals.astype("<i8").view(np.uint8)
    o = start - j0 * 8
    return b[o : o + n]


_POLL_SLEEP_S = float(os.environ.get("LAYOUTC_BENCH_POLL_SLEEP_US", "0") or 0) * 1e-6


class BenchWorker:
    """A bench worker: endpoints (sessions) by name, raw NIXL agents, rate probes; every
    request it starts is progressed by :meth:`tick` between calls."""

    def __init__(self, channel: Any, device: str) -> None:
        self.device = device
        self.sessions: dict[str, _Sess] = {}
        self.raw: dict[str, Any] = {}
        self.hot_on = False
        self.prof: Any = None  # a cProfile.Profile while profiling

    # -- endpoints -------------------------------------------------------------------------
    def setup(self, name, plan, role, rank, kinds, nb, ep_kwargs, env=None):
        s = _Sess(plan, role, rank, kinds, nb, self.device, ep_kwargs, name, env)
        self.sessions[name] = s
        return s.ep.handshake_bytes()

    def add_peers(self, name, blobs):
        for b in blobs:
            self.sessions[name].ep.add_peer(b)
        return True

    def teardown(self, name):
        s = self.sessions.pop(name, None)
        if s is None:
            return None
        s.ep.close()
        st = s.ep.stats()
        del s
        import gc

        gc.collect()  # the endpoint and its strategies refer to each other
        if self.device != "cpu":
            import torch

            torch.cuda.empty_cache()
        return st

    def expect(self, name, rid, timeout_s=60.0, blocks=None):
        """The passive side's ``expect`` (``blocks``: a prefill rank's ids, so that it packs
        ahead); returns when it was called (monotonic seconds, one clock for the host)."""
        s = self.sessions[name]
        t0 = time.monotonic()
        s.ep.expect(rid, timeout_s=timeout_s, blocks=blocks)
        s.pending.add(rid)
        trace = s.ep.telemetry.trace
        if trace is not None:
            trace.append(("expect", t0, time.monotonic()))
        return t0

    def result(self, name, rid, within=60.0):
        s = self.sessions[name]
        end = time.monotonic() + within
        while rid not in s.results:
            self.poll_all()
            if time.monotonic() > end:
                raise TimeoutError(f"{name}: {rid} not finished within {within} s")
        t, err = s.results.pop(rid)
        info = s.ep.completion_info(rid).to_dict()
        return {"t": t, "error": err, "info": info}

    def pull(self, names, rid, local, remote, strategy=None, within=120.0, layers=None, op="pull"):
        """Start ``rid`` on every session of ``names`` at once (``op``: their ``pull`` or
        ``push``); spin until all finished."""
        sess = [self.sessions[n] for n in names]
        t0 = time.monotonic()
        for s in sess:
            getattr(s.ep, op)(rid, local, remote, strategy=strategy, layers=layers)
            s.pending.add(rid)
        t_posted = time.monotonic()  # host time of the pull() calls themselves
        for s in sess:
            if s.ep.telemetry.trace is not None:
                s.ep.telemetry.trace.append(("pull", t0, t_posted))
        end = t0 + within
        while any(rid not in s.results for s in sess):
            self.poll_all()
            if time.monotonic() > end:
                raise TimeoutError(f"{rid}: not finished within {within} s")
        t1 = max(s.results[rid][0] for s in sess)
        errs = [s.results[rid][1] for s in sess if s.results[rid][1]]
        infos = [s.ep.completion_info(rid).to_dict() for s in sess]
        for s in sess:
            s.results.pop(rid)
        return {"t0": t0, "t1": t1, "t_posted": t_posted, "errors": errs, "infos": infos}

    def hot(self, on: bool) -> bool:
        """Progress continuously (the raw agents of a section) even with nothing pending."""
        self.hot_on = bool(on)
        return True

    def tick(self) -> bool:
        return self.poll_all() if (self.sessions or self.raw) else False

    def close(self) -> None:
        for name in list(self.sessions):
            try:
                self.teardown(name)
            except Exception:  # noqa: BLE001 - closing after a failure
                pass

    def poll_all(self) -> bool:
        """Progress every endpoint and raw agent once; True when a request finished.

        ``$LAYOUTC_BENCH_POLL_SLEEP_US`` (default 0: spin) sleeps that long after each round,
        for experiments with polling processes that share cores."""
        if _POLL_SLEEP_S:
            time.sleep(_POLL_SLEEP_S)
        done = False
        for s in self.sessions.values():
            done = s.collect() or done
        for r in self.raw.values():
            r["agent"].get_new_notifs()
        return done

    def busy(self) -> bool:
        return self.hot_on or any(s.pending for s in self.sessions.values())

    def verify(self, name, sources, local, remote_by_source, samples=16, seed=0):
        """Check every run of ``samples`` of the request's blocks against the prefill pattern
        (of the source rank).  ``local`` and each ``remote_by_source[src]``: one id sequence
        for every layer, or ``{layer kind: ids}`` (layers of a kind not given are skipped)."""
        s = self.sessions[name]
        lp = layer_pages(s.plan, s.kinds)
        rng = np.random.default_rng(seed)

        def of_kind(ids: Any, kind: str) -> np.ndarray | None:
            if isinstance(ids, dict):
                ids = ids.get(kind)
                if ids is None:
                    return None
            return np.asarray(ids, dtype=np.int64)

        picks: dict[str, np.ndarray] = {}
        for kind in dict.fromkeys(s.kinds):
            loc = of_kind(local, kind)
            if loc is not None:
                picks[kind] = rng.choice(loc.shape[0], min(samples, loc.shape[0]), replace=False)
        checked = 0
        for src in sources:
            lay = StagingLayout.build(s.plan, decode_rank=s.rank, prefill_rank=src, layer_pages=lp)
            for r in range(lay.num_rows):
                layer = int(lay.row_layer[r])
                kind = s.kinds[layer]
                loc = of_kind(local, kind)
                remote = of_kind(remote_by_source[src], kind)
                if loc is None or remote is None:
                    continue
                page = lay.page_names[int(lay.row_page[r])]
                flat = s.bufs[layer][page].reshape(-1)
                n = int(lay.row_nbytes[r])
                dS = int(lay.decode_stride[int(lay.row_page[r])])
                pS = int(lay.prefill_stride[int(lay.row_page[r])])
                for i in picks[kind]:
                    d0 = int(loc[i]) * dS + int(lay.row_decode_offset[r])
                    p0 = int(remote[i]) * pS + int(lay.row_prefill_offset[r])
                    got = flat[d0 : d0 + n].cpu().numpy()  # (only these bytes leave a GPU)
                    if not np.array_equal(got, pattern_bytes(layer, p0, n, src)):
                        raise BenchError(
                            f"{s.ep.label}: wrong bytes in layer {layer} page {page!r} block "
                            f"{int(loc[i])} (from prefill rank {src} block {int(remote[i])})"
                        )
                    checked += n
        return checked

    def stats(self, name):
        return self.sessions[name].ep.stats()

    def trace(self, name, on):
        """Start (``on``) or stop and return the trace of a session's endpoint."""
        tel = self.sessions[name].ep.telemetry
        if on:
            tel.start_trace()
            return None
        return tel.stop_trace()

    def cprofile(self, on, top=30):
        """Start (``on``) or stop cProfile in this worker; stopping returns the ``top``
        functions by own time as text (host-cost tuning)."""
        import cProfile
        import io
        import pstats

        if on:
            self.prof = cProfile.Profile()
            self.prof.enable()
            return None
        prof, self.prof = self.prof, None
        if prof is None:
            return None
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
        return buf.getvalue()

    def huge_pages_kib(self):
        """AnonHugePages of this process (kB), or None where /proc does not say."""
        try:
            with open("/proc/self/smaps_rollup", encoding="ascii") as f:
                for line in f:
                    if line.startswith("AnonHugePages:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def zero(self, name):
        s = self.sessions[name]
        for layer in s.bufs:
            for t in layer.values():
                t.zero_()
        if self.device != "cpu":
            import torch

            torch.cuda.synchronize()
        return True

    # -- staging kernel rates (cost model) ------------------------------------------------------
    def pack_rate(self, name, peer_rank, blocks, chunk, reps):
        """GB/s of pack (prefill) or unpack (decode) of one peer's stream, chunk by chunk; and
        the host seconds per kernel call (a 2-block request)."""
        import torch

        s = self.sessions[name]
        lp = layer_pages(s.plan, s.kinds)
        d, p = (s.rank, peer_rank) if s.role == "decode" else (peer_rank, s.rank)
        lay = StagingLayout.build(s.plan, decode_rank=d, prefill_rank=p, layer_pages=lp)
        bound = BoundPages(lay, s.bufs, s.role)
        blocks = np.asarray(blocks, dtype=np.int64)
        dev = None if self.device == "cpu" else torch.from_numpy(blocks).to(self.device)
        stream = lay.stream(int(blocks.shape[0]))
        stage = torch.zeros(
            max(chunk, lay.stream(2).total_bytes), dtype=torch.uint8, device=self.device
        )
        fn = pack if s.role == "prefill" else unpack
        sync = (lambda: None) if self.device == "cpu" else torch.cuda.synchronize
        bounds = list(range(0, stream.total_bytes, chunk)) + [stream.total_bytes]

        def run():
            for a, b in zip(bounds[:-1], bounds[1:]):
                fn(
                    bound,
                    lay,
                    blocks,
                    stage[: b - a],
                    s.role,
                    start=a,
                    end=b,
                    stream=stream,
                    device_block_ids=dev,
                )
            sync()

        ts = median_time(run, reps, warm=1)
        small = blocks[:2]
        sdev = None if dev is None else dev[:2]
        sst = lay.stream(2)

        def run_small():
            fn(
                bound,
                lay,
                small,
                stage[: sst.total_bytes],
                s.role,
                stream=sst,
                device_block_ids=sdev,
            )
            sync()

        tsmall = median_time(run_small, 21, warm=2)
        kernel = "per-row" if self.device == "cpu" else "fused"
        ops = count_ops(kernel, lay.num_rows, lay.num_groups, 1)
        return {
            "bytes": stream.total_bytes,
            "seconds": ts,
            "op_s": statistics.median(tsmall) / max(1, ops),
            "rows": lay.num_rows,
        }

    # -- raw NIXL (the single-descriptor baseline, per-chunk cost) --------------------------------
    def raw_setup(self, name, nbytes, fill, huge=False, env=None, memory="device"):
        """A raw NIXL agent with one registered buffer; ``huge``: host memory on transparent
        huge pages, as the endpoint's staging buffer (for the comparison in the JSON);
        ``memory="host"``: host memory beside a GPU, pinned, as an endpoint's host staging
        (``staging_memory="host"``); ``env``: set while the agent starts (UCX settings)."""
        import torch

        with environment(env):
            agent = nixl_compat.create_agent(name)
        unpin = None
        if memory == "host":
            mem = staging_memory(nbytes, torch.device(self.device), "host")
            t, unpin = mem.tensor, mem
        elif huge and self.device == "cpu":
            t = host_staging_tensor(nbytes)
        else:
            t = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
        if fill:
            fill_pattern(t, 0)
        reg = agent.register_memory(t)
        self.raw[name] = {"agent": agent, "t": t, "reg": reg, "name": name, "mem": unpin}
        return agent.get_agent_metadata(), int(t.data_ptr())

    def raw_connect(self, name, md, peer_name, peer_addr):
        r = self.raw[name]
        r["agent"].add_remote_agent(md)
        r["peer"] = peer_name
        r["peer_addr"] = peer_addr
        return True

    def raw_read(self, name, nbytes, reps, op="READ", warm=1, within=60.0):
        """``reps`` transfers of ONE descriptor of ``nbytes`` from the peer (after ``warm``
        untimed ones); seconds each."""
        import torch

        r = self.raw[name]
        a = r["agent"]
        on_gpu = r["t"].device.type == "cuda"
        mem = "VRAM" if on_gpu else "DRAM"
        dev = (r["t"].device.index or 0) if on_gpu else 0
        loc = np.array([[r["t"].data_ptr(), nbytes, dev]], dtype=np.uint64)
        rem = np.array([[r["peer_addr"], nbytes, dev]], dtype=np.uint64)
        lh = a.prep_xfer_dlist("NIXL_INIT_AGENT", loc, mem)
        rh = a.prep_xfer_dlist(r["peer"], rem, mem)
        out = []
        try:
            for i in range(reps + warm):
                if self.device != "cpu":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                h = a.make_prepped_xfer(op, lh, [0], rh, [0])
                post_and_wait(a, h, f"raw {op}", within)
                dt = time.perf_counter() - t
                h.release()
                if i >= warm:
                    out.append(dt)
        finally:
            lh.release()
            rh.release()
        if op == "READ":
            got = r["t"][: min(nbytes, 1 << 20)].cpu().numpy()
            if not np.array_equal(got, pattern_bytes(0, 0, got.shape[0])):
                raise BenchError("raw READ moved wrong bytes")
        return out

    def raw_small(self, name, reps):
        """Seconds of one tiny one-row ``initialize_xfer`` READ: per-chunk fixed cost."""
        r = self.raw[name]
        a = r["agent"]
        mem = "DRAM" if self.device == "cpu" else "VRAM"
        dev = 0 if self.device == "cpu" else (r["t"].device.index or 0)
        loc = np.array([[r["t"].data_ptr(), 4096, dev]], dtype=np.uint64)
        rem = np.array([[r["peer_addr"], 4096, dev]], dtype=np.uint64)
        out = []
        for i in range(reps + 2):
            t = time.perf_counter()
            h = a.initialize_xfer(
                "READ", a.get_xfer_descs(loc, mem), a.get_xfer_descs(rem, mem), r["peer"]
            )
            post_and_wait(a, h, "raw small READ", 30)
            dt = time.perf_counter() - t
            h.release()
            if i >= 2:
                out.append(dt)
        return out

    def raw_close(self, name):
        r = self.raw.pop(name, None)
        if r is not None:
            try:
                r["agent"].deregister_memory(r["reg"])
            except Exception:  # noqa: BLE001
                pass
            if r.get("mem") is not None:
                r["mem"].release()
        return True

    def copy_rate(self, nbytes, reps):
        """Seconds of ``dst.copy_(src)`` of ``nbytes`` on the device (torch)."""
        import torch

        bufs = [torch.empty(nbytes, dtype=torch.uint8, device=self.device)]
        bufs.append(torch.empty_like(bufs[0]))
        bufs[0].fill_(1)
        sync = (lambda: None) if self.device == "cpu" else torch.cuda.synchronize

        def run():
            bufs[1].copy_(bufs[0])
            sync()

        out = median_time(run, reps, warm=2)
        bufs.clear()
        if self.device != "cpu":
            torch.cuda.empty_cache()
        return out

    def bounce_rate(self, nbytes, reps):
        """Seconds of a device-to-host and a host-to-device copy of ``nbytes`` between the
        GPU and pinned host memory (what host staging adds to a pack and an unpack)."""
        import torch

        if self.device == "cpu":
            return {"d2h": [], "h2d": []}
        host = staging_memory(nbytes, torch.device(self.device), "host")
        dev = torch.ones(nbytes, dtype=torch.uint8, device=self.device)
        out = {}
        try:
            for what, dst, src in (("d2h", host.tensor, dev), ("h2d", dev, host.tensor)):

                def run(dst=dst, src=src):
                    dst.copy_(src, non_blocking=True)
                    torch.cuda.synchronize()

                out[what] = median_time(run, reps, warm=2)
        finally:
            del dev
            host.release()
            torch.cuda.empty_cache()
        return out

    # -- the closed loop of the concurrency section --------------------------------------------
    def closed_loop_prefill(self, name, path, n, c, sets, within):
        from .concurrency import closed_loop_prefill

        return closed_loop_prefill(self.sessions[name], path, n, c, sets, within)

    def closed_loop_decode(self, name, path, n, c, index, sets_local, sets_remote, within, strat):
        from .concurrency import closed_loop_decode

        s = self.sessions[name]
        return closed_loop_decode(s, path, n, c, index, sets_local, sets_remote, within, strat)

    def peer_copy_rate(self, nbytes, src, dst, reps):
        """Seconds of ``dst.copy_(src)`` of ``nbytes`` from GPU ``src`` to GPU ``dst``."""
        import torch

        bufs = [
            torch.ones(nbytes, dtype=torch.uint8, device=src),
            torch.empty(nbytes, dtype=torch.uint8, device=dst),
        ]

        def run():
            bufs[1].copy_(bufs[0])
            if dst != "cpu":
                torch.cuda.synchronize(dst)
                torch.cuda.synchronize(src)

        out = median_time(run, reps, warm=2)
        bufs.clear()
        if dst != "cpu":
            torch.cuda.empty_cache()
        return out

    def device_name(self):
        if self.device == "cpu":
            return None
        import torch

        return torch.cuda.get_device_name()
