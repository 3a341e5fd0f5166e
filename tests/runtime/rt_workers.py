"""Endpoint processes for the runtime tests, driven by the pytest process.

Workers are :mod:`layoutc.tools.harness` workers.  A :class:`Pool` keeps them alive across
tests, because
starting one (Python + torch + NIXL) costs ~2 s of CPU on the 2-core box.  A test takes
workers with :meth:`Pool.rank`, which creates a real :class:`Endpoint` in the worker with
sentinel-filled, registered buffers; ``rank.call("pull", rid, local, remote)`` then runs the
method there and returns its result or re-raises its exception here (runtime errors pickle).
Between commands a worker keeps polling its endpoint and collecting completions, so
connection set-up and notifications progress as in an engine loop.  At the end of the test
the ``ranks`` fixture closes the endpoints (asserting no transfer handle was left open) and
keeps the processes; killed ones are replaced.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from layoutc.tools.harness import Worker as HarnessWorker

SENTINEL = 0x5A  # decode bytes that nothing may write
PREFILL_FILL = 0xC3  # prefill bytes outside tagged blocks


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------
class _Session:
    """One endpoint with its buffers inside a worker."""

    def __init__(self, channel, plan, role, rank, num_blocks, kinds, ep_kwargs) -> None:
        import torch  # noqa: F401
        from layoutc.runtime.endpoint import Endpoint, allocate_buffers
        from layoutc.runtime.tags import PageTagger

        self.channel = channel
        if isinstance(plan, str):  # a generated module, by path: plans for every compiled pair
            plan = _load_module(plan)
        self.ep = Endpoint(plan, role, rank, **ep_kwargs)
        self.plan, self.role, self.rank, self.num_blocks = self.ep.plan, role, rank, num_blocks
        self.side = self.ep.side
        self.kinds = list(kinds)
        self.device = str(ep_kwargs.get("device", "cpu"))
        self.bufs = allocate_buffers(self.plan, role, kinds, num_blocks, self.device)
        self.reset()
        self.ep.register_layers(self.bufs, kinds)
        self.taggers = {p: PageTagger(self.side, rank, p) for p in self.side.page_names}
        self.results: dict[str, Any] = {}  # rid -> None (done) or its error

    def reset(self) -> None:
        fill = PREFILL_FILL if self.role == "prefill" else SENTINEL
        for layer in self.bufs:
            for t in layer.values():
                t.fill_(fill)
        self._sync()

    def _sync(self) -> None:
        if self.device != "cpu":
            import torch

            torch.cuda.synchronize()

    def _views(self, write: bool = False):
        """(layer, page, (blocks, stride) uint8 host view) of every buffer; on a GPU a host
        copy, written back after the loop when ``write``."""
        for li, layer in enumerate(self.bufs):
            for page, t in layer.items():
                stride = self.side.page(page).logical_stride
                host = t.numpy() if t.device.type == "cpu" else t.cpu().numpy()
                yield li, page, host.reshape(self.num_blocks, stride)
                if write and t.device.type != "cpu":
                    import torch

                    t.copy_(torch.from_numpy(host).to(t.device))
        self._sync()

    def _layer_blocks(self, li: int, blocks: Any) -> np.ndarray | None:
        """The block ids of layer ``li`` in a request's ids: one sequence for every layer, or
        ``{kind: ids}`` (None: the layer's kind is not in the request)."""
        if isinstance(blocks, dict):
            blocks = blocks.get(self.kinds[li])
            if blocks is None:
                return None
        return np.asarray(blocks, dtype=np.int64)

    def tag(self, req: int, blocks: Any) -> None:
        """Fill request ``req``'s blocks with its tags (on a prefill rank)."""
        from layoutc.runtime.tags import block_keys

        for li, page, view in self._views(write=True):
            ids = self._layer_blocks(li, blocks)
            if ids is not None:
                self.taggers[page].fill(view, ids, block_keys(li, req, np.arange(ids.size)))

    def verify(self, reqs: list[tuple[int, Any]], layers: list[int] | None = None) -> int:
        """Every byte of every buffer: the requests' tags in their blocks (in ``layers``, default
        all), the sentinel everywhere else.  Returns the bytes checked."""
        from layoutc.runtime.tags import block_keys

        checked = 0
        for li, page, got in self._views():
            want = np.full_like(got, SENTINEL)
            if layers is None or li in layers:
                for req, blocks in reqs:
                    ids = self._layer_blocks(li, blocks)
                    if ids is not None:
                        keys = block_keys(li, req, np.arange(ids.size))
                        self.taggers[page].fill(want, ids, keys)
            checked += self._compare(li, page, got, want)
        return checked

    def _compare(self, li: int, page: str, got: np.ndarray, want: np.ndarray) -> int:
        bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
        if bad.size:
            b, off = divmod(int(bad[0]), got.shape[1])
            raise AssertionError(
                f"{self.ep.label}: layer {li} page {page!r}: {bad.size} "
                f"wrong bytes, first in block {b} at offset {off}"
            )
        return int(got.size)

    def tag_tokens(self, req: int, blocks: Any, chunk: int) -> None:
        """Fill request ``req``'s blocks with its tags, per-kernel-block pages by token (for
        engines holding different tokens per logical block; windows of ``chunk`` tokens)."""
        from layoutc.runtime.tags import TokenPageTagger, block_keys

        for li, page, view in self._views(write=True):
            ids = self._layer_blocks(li, blocks)
            if ids is None:
                continue
            if self.side.page(page).per == "kernel":
                TokenPageTagger(self.side, self.rank, page, chunk).fill(view, ids, li, req)
            else:
                self.taggers[page].fill(view, ids, block_keys(li, req, np.arange(ids.size)))

    def verify_tokens(self, reqs: list[tuple[int, Any, int]], chunk: int) -> int:
        """Every byte of every buffer, for requests ``(req, blocks, num_tokens)`` moved window
        by window: the tags of every token of the windows the request covers (its tokens,
        rounded up to whole windows of ``chunk``) and its per-logical-block state in their
        blocks, the sentinel everywhere else.  Returns the bytes checked."""
        from layoutc.runtime.tags import TokenPageTagger, block_keys

        checked = 0
        for li, page, got in self._views():
            want = np.full_like(got, SENTINEL)
            for req, blocks, num_tokens in reqs:
                ids = self._layer_blocks(li, blocks)
                if ids is None:
                    continue
                if self.side.page(page).per != "kernel":
                    self.taggers[page].fill(want, ids, block_keys(li, req, np.arange(ids.size)))
                    continue
                last = -(-num_tokens // chunk) * chunk
                tagger = TokenPageTagger(self.side, self.rank, page, chunk)
                for off, t, token in tagger.tags(li, req, np.arange(ids.size)):
                    isz = t.shape[1] // token.shape[1]
                    moved = np.repeat(token < last, isz, axis=1)
                    cur = want[ids, off : off + t.shape[1]]
                    want[ids, off : off + t.shape[1]] = np.where(moved, t, cur)
            checked += self._compare(li, page, got, want)
        return checked

    def check_blocks(self, req: int, blocks: Any) -> int:
        """Only the state bytes of ``blocks``: do they hold request ``req``'s tags?"""
        from layoutc.runtime.tags import block_keys

        blocks = np.asarray(blocks, dtype=np.int64)
        checked = 0
        for li, page, got in self._views():
            keys = block_keys(li, req, np.arange(blocks.size))
            for off, want in self.taggers[page].tags(keys):
                have = got[blocks, off : off + want.shape[1]]
                if not np.array_equal(have, want):
                    raise AssertionError(
                        f"{self.ep.label}: layer {li} page {page!r}: request "
                        f"{req} bytes wrong at offset {off}"
                    )
                checked += want.size
        return checked

    def collect(self) -> None:
        prog = self.ep.poll()
        for rid in prog.done:
            self.results[rid] = None
        self.results.update(prog.failed)

    def wait(self, rid: str, within: float = 30.0) -> dict[str, Any]:
        """Wait for a request collected by the polling loop; its completion info or error.
        Raises TimeoutError (the test's, not the runtime's) after ``within`` seconds."""
        deadline = time.monotonic() + within
        while rid not in self.results:
            self.collect()
            if rid in self.results:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"test wait for {rid!r} timed out after {within} s")
            time.sleep(0.0005)
        err = self.results.pop(rid)
        if err is not None:
            raise err
        return self.ep.completion_info(rid)

    def ep_wait(self, rid: str, timeout_s: float | None = None) -> None:
        """The endpoint's own ``wait`` (its timeout, its errors)."""
        self.ep.wait(rid, timeout_s=timeout_s)

    def loop(
        self,
        op: str,
        prefix: str,
        n: int,
        sets: list[Any],
        remote: Any,
        seconds: float = 30.0,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Post ``op`` ("pull"/"push") requests back to back, alternating the local block sets
        ``sets``, until the first failure, ``n`` requests or ``seconds``; an event
        ``("done", count)`` after each completed request.

        Returns {"done", "error", "failed_rid", "t_error" (monotonic), "last_set"}: the set
        written by the last request that completed (pull), for checking afterwards.
        """
        start = getattr(self.ep, op)
        done, last = 0, None
        end = time.monotonic() + seconds
        for i in range(n):
            if time.monotonic() > end:
                break
            rid = f"{prefix}-{i}"
            local = sets[i % len(sets)]
            try:
                start(rid, local, remote, **kwargs)
                self.ep.wait(rid)
            except Exception as e:  # noqa: BLE001 - the failure is the result
                return {
                    "done": done,
                    "error": e,
                    "failed_rid": rid,
                    "t_error": time.monotonic(),
                    "last_set": last,
                }
            done, last = done + 1, i % len(sets)
            self.channel.emit("done", done)
        return {"done": done, "error": None, "failed_rid": None, "t_error": None, "last_set": last}

    # -- for the security tests: a peer that holds the pair's keys ------------------------------
    def _peer(self, who: str) -> Any:
        for p in self.ep._peers.values():
            if who in (p.name, p.label):
                return p
        raise KeyError(who)

    def seal(self, who: str, bodies: list[bytes], send: bool = True) -> list[bytes]:
        """``bodies`` as authenticated messages to peer ``who`` (agent name or label): the
        pair's epoch, next sequence numbers and tags, whatever the bodies hold; sent when
        ``send``.  Returns the frames."""
        from layoutc.runtime import protocol

        peer = self._peer(who)
        frames = []
        for body in bodies:
            epoch, seq, tag = peer.channel.seal(body)
            frames.append(protocol.frame(epoch, seq, tag, body))
        if send:
            for i, f in enumerate(frames):
                self.ep.agent.send_notif(peer.name, f)
                if i % 64 == 63:
                    self.ep.progress()
        return frames

    def flood_done(self, who: str, n: int, prefix: str) -> int:
        """``n`` authenticated ``DONE``s of unknown request ids to peer ``who``."""
        from layoutc.runtime import protocol

        peer = self._peer(who)
        for i in range(n):
            self.ep.agent.send_notif(
                peer.name, self.ep._admission.notif(peer, protocol.Done(f"{prefix}{i}"))
            )
            if i % 64 == 63:
                self.ep.progress()
        return n

    def epoch(self, who: str) -> bytes:
        """The epoch of the handshake with peer ``who`` (not secret: it names the handshake)."""
        return self._peer(who).channel.epoch

    def agent_name(self) -> str:
        return self.ep.name

    def port(self) -> int | None:
        """The port of the endpoint's handshake socket."""
        return self.ep.listen_port

    def metadata(self) -> bytes:
        """This endpoint's agent metadata (what a stranger who got hold of it would have)."""
        return self.ep.agent.get_agent_metadata()

    def hold_then_poll(self, seconds: float) -> dict[str, Any]:
        """Do not poll for ``seconds`` (so that what peers send piles up), then poll once:
        what that one poll reported, and the stats after it."""
        self.channel.emit("holding")
        time.sleep(seconds)
        prog = self.ep.poll()
        for rid in prog.done:
            self.results[rid] = None
        self.results.update(prog.failed)
        return {"done": list(prog.done), "failed": sorted(prog.failed), "stats": self.ep.stats()}

    def rss(self) -> int:
        """Resident memory of this process (bytes)."""
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def trace(self, on: bool) -> list[str] | None:
        """Start (``on``) or stop the endpoint's trace; stopping returns its marks in order
        (``"packed decode rank 0 c3"``...)."""
        if on:
            self.ep.telemetry.start_trace()
            return None
        return [k[1:] for k, _, _ in self.ep.telemetry.stop_trace() if k.startswith("@")]

    def close(self) -> dict[str, int]:
        self.ep.close()
        return self.ep.stats()


def _load_module(path: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class TestRank:
    """A test worker's handler (:mod:`layoutc.tools.harness`): one endpoint session at a
    time; its methods and the endpoint's are called by name; between calls the endpoint is
    polled and completions are collected."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.session: _Session | None = None

    def setup(self, *args: Any, **kwargs: Any) -> str:
        if self.session is not None:
            self.session.close()
        self.session = None
        self.session = _Session(self.channel, *args, **kwargs)
        return self.session.ep.name

    def teardown(self) -> dict[str, int] | None:
        out = self.session.close() if self.session else None
        self.session = None
        return out

    def pid(self) -> int:
        return os.getpid()

    def environ(self, name: str) -> str | None:
        return os.environ.get(name)

    def tick(self) -> bool:
        if self.session is not None:
            self.session.collect()
        return False

    def close(self) -> dict[str, int] | None:
        return self.teardown()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or self.__dict__.get("session") is None:
            raise AttributeError(name)
        session = self.__dict__["session"]
        return getattr(session, name, None) or getattr(session.ep, name)


# --------------------------------------------------------------------------------------------
# Test side
# --------------------------------------------------------------------------------------------
class Worker(HarnessWorker):
    """A test worker process (the tools' harness), labelled with the rank it serves."""

    def __init__(self) -> None:
        super().__init__("rt_workers:TestRank", label="worker", device="cpu")
        self.role, self.rank = "", -1


class Pool:
    """Worker processes shared by the tests of a session."""

    def __init__(self, size: int) -> None:
        self.idle = [Worker() for _ in range(size)]
        self.busy: list[Worker] = []

    def _take(self) -> Worker:
        while self.idle:
            w = self.idle.pop(0)
            if w.alive:
                return w
        return Worker()

    def rank(
        self,
        plan,
        role: str,
        rank: int,
        *,
        num_blocks: int = 64,
        kinds: list[str] | None = None,
        layers: int = 2,
        **ep_kwargs: Any,
    ) -> Worker:
        """A worker with an Endpoint for (role, rank) set up; waits until it is ready."""
        return self.ranks(
            [(plan, role, rank)], num_blocks=num_blocks, kinds=kinds, layers=layers, **ep_kwargs
        )[0]

    def ranks(
        self,
        specs: list[tuple],
        *,
        num_blocks: int = 64,
        kinds: list[str] | None = None,
        layers: int = 2,
        **ep_kwargs: Any,
    ) -> list[Worker]:
        """Several endpoints set up in parallel; ``specs`` = [(plan, role, rank), ...] or
        [(plan, role, rank, {Endpoint keyword arguments of that rank}), ...]; ``plan`` is a
        Plan or the path of a generated module."""
        from layoutc.runtime.endpoint import layer_kind_sequence

        out = []
        for spec in specs:
            plan, role, rank = spec[:3]
            w = self._take()
            self.busy.append(w)
            w.label = f"{role} rank {rank}"
            w.role, w.rank = role, rank
            k = kinds or layer_kind_sequence(_plan_of(plan), layers)
            kw = dict(ep_kwargs, **(spec[3] if len(spec) > 3 else {}))
            kw.setdefault("timeout_s", 10.0)
            w.send("setup", plan, role, rank, num_blocks, k, kw)
            out.append(w)
        for w in out:
            w.result(120, "setup")
        return out

    def release(self, check_handles: bool = True) -> list[str]:
        """Tear down every busy worker's endpoint; return problems found (open handles)."""
        problems = []
        for w in self.busy:
            if not w.alive:
                continue
            try:
                stats = w.call("teardown", timeout=30)
            except Exception as e:  # noqa: BLE001
                problems.append(f"{w.label}: teardown failed: {e}")
                w.kill()
                continue
            if check_handles and stats and stats["xfer_handles_open"]:
                problems.append(f"{w.label}: {stats['xfer_handles_open']} xfer handles open")
            self.idle.append(w)
        self.busy = []
        return problems

    def close(self) -> None:
        for w in self.idle + self.busy:
            w.stop()


def _plan_of(plans: Any) -> Any:
    """A plan of a Plan or a generated module's path (for layer kinds)."""
    if not isinstance(plans, str):
        return plans
    mod = _load_module(plans)
    return mod.plan(prefill_tp=mod.COMPILED_PAIRS[0][0], decode_tp=mod.COMPILED_PAIRS[0][1])


def connect_all(prefill: list[Worker], decode: list[Worker]) -> None:
    """Exchange handshake bytes between every prefill and every decode rank."""
    hp = [r.call("handshake_bytes") for r in prefill]
    hd = [r.call("handshake_bytes") for r in decode]
    for r in prefill:
        for h in hd:
            r.call("add_peer", h)
    for r in decode:
        for h in hp:
            r.call("add_peer", h)


def run_requests(pre, dec, mode, pb, db, *, prefix="r", expect_ids=None, **start_kw):
    """Requests ``prefix{i}``: tag the prefill ranks' pages of ``pb[i]``, ``expect`` on the
    passive side (prefill ranks with ``blocks=expect_ids[i]`` when given), start ``mode``
    (``pull``/``push``, with ``start_kw``) on the initiators, wait for every rank.  Returns
    (completion infos by rank label, in request order; bytes verified by decode rank label)."""
    nreq = pb.shape[0]
    for r in pre:
        for i in range(nreq):
            r.call("tag", i, pb[i])
    initiators, passive = (dec, pre) if mode == "pull" else (pre, dec)
    local, remote = (db, pb) if mode == "pull" else (pb, db)
    for r in passive:
        for i in range(nreq):
            kw = {}
            if expect_ids is not None and r.role == "prefill":
                kw["blocks"] = expect_ids[i]
            r.call("expect", f"{prefix}{i}", **kw)
    for r in initiators:
        for i in range(nreq):
            r.call(mode, f"{prefix}{i}", local[i], remote[i], **start_kw)
    infos = {
        r.label: [r.call("wait", f"{prefix}{i}") for i in range(nreq)] for r in initiators + passive
    }
    layers = start_kw.get("layers")
    verified = {
        r.label: r.call("verify", [(i, db[i]) for i in range(nreq)], layers=layers) for r in dec
    }
    return infos, verified


def _token_ids(rng: np.random.Generator, counts: list[int], pool: int) -> list[np.ndarray]:
    """Disjoint scattered block ids, ``counts[i]`` for request ``i``."""
    perm = rng.permutation(pool)
    assert sum(counts) <= pool
    out, at = [], 0
    for n in counts:
        out.append(perm[at : at + n])
        at += n
    return out


def run_token_requests(
    ranks, plan, mode, lengths, kinds, seed, num_blocks=64, sources=None, **ep_kwargs
):
    """Requests of ``lengths`` tokens between engines holding different tokens per logical
    block (``plan.remap``), all in flight at once: tag by token, ``expect``, ``pull``/``push``
    with ``num_tokens=``, wait, verify every decode byte (``verify_tokens``).  ``sources``:
    (prefill, decode) plan sources given to the endpoints instead of ``plan``."""
    from layoutc.runtime.endpoint import layer_kind_sequence

    rm = plan.remap
    assert rm is not None
    chunk = rm.chunk_tokens
    layers = 2 * len(kinds)
    psrc, dsrc = sources or (plan, plan)
    kinds_seq = layer_kind_sequence(plan, layers)
    pre = ranks.ranks(
        [(psrc, "prefill", r, {"tp": plan.prefill_tp}) for r in range(plan.prefill_tp)],
        num_blocks=num_blocks,
        kinds=kinds_seq,
        **ep_kwargs,
    )
    dec = ranks.ranks(
        [(dsrc, "decode", r, {"tp": plan.decode_tp}) for r in range(plan.decode_tp)],
        num_blocks=num_blocks,
        kinds=kinds_seq,
        **ep_kwargs,
    )
    connect_all(pre, dec)
    rng = np.random.default_rng(seed)
    p_ids = {
        k: _token_ids(rng, [rm.blocks_for("prefill", n) for n in lengths], num_blocks)
        for k in kinds
    }
    d_ids = {
        k: _token_ids(rng, [rm.blocks_for("decode", n) for n in lengths], num_blocks) for k in kinds
    }
    if "mamba" in kinds:  # a request's Mamba state: one block on each side
        p_ids["mamba"] = _token_ids(rng, [1] * len(lengths), num_blocks)
        d_ids["mamba"] = _token_ids(rng, [1] * len(lengths), num_blocks)
    per_req = [
        ({k: p_ids[k][i] for k in kinds}, {k: d_ids[k][i] for k in kinds}, n)
        for i, n in enumerate(lengths)
    ]
    for r in pre:
        for i, (pb, _db, _n) in enumerate(per_req):
            r.call("tag_tokens", i, pb, chunk)
    initiators, passive = (dec, pre) if mode == "pull" else (pre, dec)
    for r in passive:
        for i, (_pb, _db, n) in enumerate(per_req):
            r.call("expect", f"{mode}-{i}", num_tokens=n)
    for r in initiators:
        for i, (pb, db, n) in enumerate(per_req):
            local, remote = (db, pb) if mode == "pull" else (pb, db)
            r.call(mode, f"{mode}-{i}", local, remote, num_tokens=n)
    for r in initiators + passive:
        for i in range(len(per_req)):
            info = r.call("wait", f"{mode}-{i}")
            assert info.ok
            if r in initiators and info.bytes:
                assert info.strategy == "zero-copy"
    for d in dec:
        got = d.call("verify_tokens", [(i, db, n) for i, (_pb, db, n) in enumerate(per_req)], chunk)
        assert got > 0
    return pre, dec


# --------------------------------------------------------------------------------------------
# pytest fixture (imported by the test modules; this folder has no conftest.py so that it
# does not shadow another folder's ``from conftest import ...``)
# --------------------------------------------------------------------------------------------
_POOL: Pool | None = None


def shared_pool() -> Pool:
    """One pool for the whole test session (worker processes are daemons: they end with it)."""
    global _POOL
    if _POOL is None:
        import atexit

        _POOL = Pool(int(os.environ.get("LAYOUTC_TEST_WORKERS", "6")))
        atexit.register(_POOL.close)
    return _POOL


@pytest.fixture(name="ranks")
def ranks_fixture():
    """The shared worker pool; endpoints set up during a test are torn down after it, and a
    transfer handle left open fails the test."""
    pool = shared_pool()
    yield pool
    problems = pool.release()
    assert not problems, problems


def requests_done(worker: Worker, count: int, timeout: float = 60.0) -> None:
    """Wait until ``worker``'s running ``loop`` has completed ``count`` requests."""
    worker.wait_event(lambda ev: ev[0] == "done" and ev[1] >= count, timeout)


def random_ids(
    seed: int, nreq: int, blocks: int, nb_p: int, nb_d: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct random block ids, ``nreq`` rows of ``blocks``: prefill's among ``nb_p``,
    decode's among ``nb_d`` (default ``nb_p``)."""
    rng = np.random.default_rng(seed)
    p = rng.permutation(nb_p)[: nreq * blocks].reshape(nreq, blocks)
    d = rng.permutation(nb_p if nb_d is None else nb_d)[: nreq * blocks].reshape(nreq, blocks)
    return p, d


def connected_ranks(
    pool: Pool, plan: Any, *, layers: int, nb_p: int, nb_d: int, **kw: Any
) -> tuple[list[Worker], list[Worker]]:
    """Every prefill and decode rank of ``plan`` (``nb_p`` / ``nb_d`` blocks, ``layers``
    layers, ``kw`` to each endpoint), each decode rank connected to the prefill ranks."""
    pre = pool.ranks(
        [(plan, "prefill", r) for r in range(plan.prefill_tp)], num_blocks=nb_p, layers=layers, **kw
    )
    dec = pool.ranks(
        [(plan, "decode", r) for r in range(plan.decode_tp)], num_blocks=nb_d, layers=layers, **kw
    )
    connect_all(pre, dec)
    return pre, dec


def chunk_events(marks: Sequence[str]) -> list[tuple[str, str, int]]:
    """(what, peer label, chunk) of every per-chunk trace mark (``"<what> <peer> c<n>"``), in
    order."""
    out = []
    for m in marks:
        hit = re.fullmatch(r"(\S+) (.+) c(\d+)", m)
        if hit:
            out.append((hit[1], hit[2], int(hit[3])))
    return out


def kill_mid_staged_loop(
    active: Worker,
    passive: Worker,
    num_blocks: int,
    *,
    mode: str,
    seed: int,
    requests: int = 400,
    per_set: int = 256,
    tag: str = "r",
) -> tuple[dict[str, Any], list[Any], Any, float]:
    """``active`` loops staged ``mode`` requests (``"pull"``: decode reading prefill,
    ``"push"``: prefill writing decode) over two sets of its own block ids against one set of
    the passive side's, all expected up front (a passive side serves staged requests only once
    expected); after 3 requests ``passive`` is SIGKILLed.  Returns the loop's result, the two
    active-side sets, the passive-side ids and when the kill happened."""
    rng = np.random.default_rng(seed)
    own = rng.permutation(num_blocks)
    sets, other = [own[:per_set], own[per_set : 2 * per_set]], rng.permutation(num_blocks)[:per_set]
    if mode == "pull":
        passive.call("tag", 0, other)
    else:
        for i in range(2):
            active.call("tag", i, sets[i])
    for i in range(requests):
        passive.call("expect", f"{tag}-{i}", timeout_s=60)
    active.send("loop", mode, tag, requests, sets, other, seconds=60, strategy="staged")
    requests_done(active, 3)
    t_kill = time.monotonic()
    passive.kill()
    return active.result(90, "loop"), sets, other, t_kill


def serve_a_restarted_prefill(
    pool: Pool, plan: Any, kw: dict[str, Any], dec: Worker, local: Any, remote: Any, *, tag: int
) -> Worker:
    """After a prefill rank died: a new prefill rank 0 (tagged ``tag`` at ``remote``) connects
    to ``dec``, which pulls one staged request into ``local``; both sides complete and every
    byte is verified.  Returns the new prefill worker."""
    pre = pool.rank(plan, "prefill", 0, **kw)
    pre.call("tag", tag, remote)
    connect_all([pre], [dec])
    dec.call("reset")
    pre.call("expect", "after-restart")
    dec.call("pull", "after-restart", local, remote, strategy="staged")
    assert dec.call("wait", "after-restart", within=30.0)["strategy"] == "staged"
    done = pre.call("wait", "after-restart", within=30.0)
    assert done["ok"] and done["peers"] == ["decode rank 0"], done
    dec.call("verify", [(tag, local)])
    return pre


def wait_until(what: str, check, timeout: float = 30.0) -> None:
    """Poll ``check()`` (a call into workers) until it is true; fail after ``timeout``."""
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.01)
