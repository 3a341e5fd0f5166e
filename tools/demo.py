"""``layoutc demo``: a real P/D transfer of tagged pages between processes, every byte checked.

:func:`run_demo` spawns one worker process per prefill rank and per decode rank
(:mod:`.harness`), each with an :class:`~layoutc.runtime.endpoint.Endpoint` over a real NIXL agent.
The parent is only the control plane: it carries handshake bytes between the processes
(a plain byte channel), says "go", counts completions for the progress bar, and collects
results.  Then:

1. every rank allocates its buffers with enough logical blocks that each request's blocks
   are scattered (a random permutation, different on prefill and decode);
2. prefill ranks fill their pages with *tagged* bytes (:mod:`.tags`: each byte derives from
   its layer, request, block, state and global element), decode pages start as a sentinel;
3. requests move per the plan, pulled (decode READs) or pushed (prefill WRITEs), with the
   plan's completion accounting (prefill checks that ``len(plan.readers(p))`` decode ranks
   notified each request in pull mode);
4. every decode rank recomputes, from its *own* logical identity, what each byte of its
   buffers must hold (sentinel where nothing may land) and compares every byte.

``inject`` turns a fault on: ``kill-prefill`` / ``kill-decode`` (SIGKILL the last rank of
that side once half of the requests are done), ``bad-blocks`` (a request carries block ids
outside the peer's range), ``spec-mismatch`` (the decode side runs a plan compiled from
other parameters).  Each ends in :class:`DemoError` naming the peer, ids or values.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from layoutc.runtime.endpoint import STRATEGIES
from layoutc.runtime.errors import LayoutcError, UsageError
from layoutc.runtime.plan import Plan

from .harness import Channel, Worker, WorkerError, readable

#: The built-in demo: a small hybrid attention + Mamba2 model whose KV heads (2) and B/C groups
#: (2) are replicated at decode TP 4, so every mechanism of the planner is exercised.
DEMO_SPEC = "vllm_hybrid_mamba2"
DEMO_SETS = {
    "num_key_value_heads": "2",
    "head_dim": "64",
    "block_size": "16",
    "mamba_num_heads": "8",
    "mamba_head_dim": "16",
    "n_groups": "2",
    "ssm_state_size": "16",
}

#: Faults ``--inject`` can turn on.
KILLS = ("kill-prefill", "kill-decode")  # the faults that kill a rank half-way
INJECTIONS = (*KILLS, "bad-blocks", "spec-mismatch")
MODES = ("pull", "push")
_PREFILL_FILL = 0xC3  # bytes of prefill buffers outside any request's state bytes
_DECODE_FILL = 0x5A  # decode sentinel: what every byte nothing may write must still hold
_WINDOW = 4  # requests in flight per initiator
_SETUP_TIMEOUT_S = 120.0


class DemoError(LayoutcError):
    """The demo failed; ``errors`` holds one line per failure that a process reported."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = list(errors or [])


@dataclass
class DemoResult:
    """What a successful demo run measured.  (A failed run raises :class:`DemoError`.)"""

    mode: str
    prefill_tp: int
    decode_tp: int
    requests: int
    layers: int
    blocks: int
    bytes: int  # bytes moved, all decode ranks together
    descriptors: int  # NIXL descriptor indices and staged chunk transfers posted, all ranks
    seconds: float  # wall time of the transfer phase (go -> last request complete)
    verified_bytes: int  # decode buffer bytes compared (every byte of every buffer)
    prefill_completions: dict[int, int] = field(default_factory=dict)  # rank -> requests
    notifications: dict[int, int] = field(default_factory=dict)  # prefill rank -> received
    setup_seconds: float = 0.0
    ok: bool = True
    error: str | None = None
    strategy: str = "auto"
    #: (request, initiator rank) pairs by the strategy they used: "zero-copy", "staged",
    #: "mixed" (different peers, different strategies), "none" (no byte to move)
    strategies: dict[str, int] = field(default_factory=dict)
    chunks: int = 0  # staged chunks, all initiators together
    #: where the ranks ran: "cpu", or the GPU of every rank ("prefill 0,0 -> decode 1,1")
    placement: str = "cpu"

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def verified_line(self) -> str:
        """The text after ``verified: `` (the CLI prints that prefix)."""
        return (
            f"{self.requests} requests x {self.layers} layers x {self.blocks} blocks, "
            f"P_TP={self.prefill_tp} -> D_TP={self.decode_tp} ({self.mode}): "
            f"{self.verified_bytes} decode bytes checked, 0 wrong"
        )

    def summary(self) -> str:
        done = ", ".join(f"rank {p}: {n}" for p, n in sorted(self.prefill_completions.items()))
        used = ", ".join(f"{k} {v}" for k, v in sorted(self.strategies.items())) or "none"
        return (
            f"moved {self.bytes / 2**20:.2f} MiB in {self.descriptors} descriptors in "
            f"{self.seconds:.3f} s ({self.gbps:.2f} GB/s; set-up {self.setup_seconds:.1f} s)\n"
            f"strategy {self.strategy}: requests x {'decode' if self.mode == 'pull' else 'prefill'}"
            f" ranks by strategy: {used} ({self.chunks} staged chunks)\n"
            f"prefill requests completed: {done}\n"
            f"placement: {self.placement}"
        )


# --------------------------------------------------------------------------------------------
# Helpers shared by parent and workers
# --------------------------------------------------------------------------------------------
def mismatched_plan(plan: Plan) -> Plan:
    """The same plan with one parameter changed on both sides (a 'compiled from other
    params' decode side, for ``inject='spec-mismatch'`` when no real second plan is given)."""
    params = dict(plan.decode.params)
    name = (
        "block_size"
        if isinstance(params.get("block_size"), int)
        else next(
            (
                k
                for k, v in sorted(params.items())
                if isinstance(v, int) and not isinstance(v, bool)
            ),
            None,
        )
    )
    if name is None:
        new = dict(params, layoutc_demo_mismatch=1)
    else:
        new = dict(params, **{name: params[name] * 2})

    def patch(side):
        p = dict(side.params)
        p.update({k: v for k, v in new.items() if k in p or k not in params})
        return dataclasses.replace(side, params=tuple(sorted(p.items())))

    return dataclasses.replace(plan, prefill=patch(plan.prefill), decode=patch(plan.decode))


def _layout_blocks(requests: int, blocks: int, seed: int) -> dict[str, Any]:
    """Logical block ids of every request on each side: disjoint, scattered, P != D."""
    used = requests * blocks
    nb_p = used + max(blocks, used // 4) + 1
    nb_d = used + max(blocks, used // 4) + 3
    rng = np.random.default_rng(seed)
    p = rng.permutation(nb_p)[:used].reshape(requests, blocks)
    d = rng.permutation(nb_d)[:used].reshape(requests, blocks)
    return {"nb_prefill": nb_p, "nb_decode": nb_d, "prefill": p, "decode": d}


def _rid(i: int) -> str:
    return f"req-{i}"


# --------------------------------------------------------------------------------------------
# Worker process (a harness handler)
# --------------------------------------------------------------------------------------------
def _request_keys(layer: int, ids: np.ndarray) -> np.ndarray:
    """Tag keys of every (request, block index) of ``ids`` (requests x blocks), row-major."""
    from layoutc.runtime.tags import block_keys

    nreq, nblk = ids.shape
    return block_keys(layer, np.arange(nreq)[:, None], np.arange(nblk)[None, :]).reshape(-1)


class DemoRank:
    """One prefill or decode rank of the demo, inside its worker process."""

    def __init__(self, channel: Channel, cfg: dict[str, Any]) -> None:
        self.channel = channel
        self.cfg = cfg
        self.ep: Any = None
        self.finished = False

    def setup(self) -> bytes:
        """Endpoint, tagged (prefill) or sentinel-filled (decode) buffers, registration;
        returns the handshake bytes."""
        import torch
        from layoutc.runtime.endpoint import Endpoint, allocate_buffers
        from layoutc.runtime.tags import PageTagger

        cfg = self.cfg
        role, rank, plan = cfg["role"], cfg["rank"], cfg["plan"]
        kinds, blocks = cfg["kinds"], cfg["blocks"]
        self.side = side = plan.prefill if role == "prefill" else plan.decode
        self.nb = nb = blocks["nb_" + role]
        self.my_ids = my_ids = blocks[role]
        self.peer_ids = blocks["decode" if role == "prefill" else "prefill"]
        self.ep = Endpoint(
            plan,
            role,
            rank,
            name=f"demo-{cfg['run_id']}-{role}-{rank}",
            engine=role,
            device=cfg["device"],
            timeout_s=cfg["timeout_s"],
            strategy=cfg["strategy"],
        )
        self.bufs = bufs = allocate_buffers(plan, role, kinds, nb, cfg["device"])
        self.taggers = {p: PageTagger(side, rank, p) for p in side.page_names}
        flat = my_ids.reshape(-1)
        for li, layer in enumerate(bufs):
            keys = _request_keys(li, my_ids)
            for page, t in layer.items():
                if role == "prefill":
                    # tags are computed on the host, then copied to the device if any
                    host = t if t.device.type == "cpu" else torch.empty_like(t, device="cpu")
                    host.fill_(_PREFILL_FILL)
                    stride = side.page(page).logical_stride
                    self.taggers[page].fill(host.numpy().reshape(nb, stride), flat, keys)
                    if host is not t:
                        t.copy_(host)
                else:
                    t.fill_(_DECODE_FILL)
        if cfg["device"] != "cpu":
            torch.cuda.synchronize()
        self.ep.register_layers(bufs, kinds)
        return bytes(self.ep.handshake_bytes())

    def add_peers(self, blobs: list[bytes]) -> None:
        for data in blobs:
            self.ep.add_peer(data)

    def run(self) -> dict[str, Any]:
        """Move every request (emitting ``("done", rid)`` per decode completion); check the
        plan's completion counts; on a decode rank verify every byte."""
        cfg, ep = self.cfg, self.ep
        used: dict[str, int] = {}
        if (ep.role == "decode") == (cfg["mode"] == "pull"):
            completions = _run_initiator(ep, cfg, self.channel, self.my_ids, self.peer_ids, used)
        else:
            completions = _run_passive(ep, cfg, self.channel, self.my_ids)
        result: dict[str, Any] = {
            "stats": ep.stats(),
            "completions": completions,
            "strategies": used,
        }
        if ep.role == "decode":
            result["verified_bytes"] = _verify(
                cfg["plan"], cfg["rank"], self.bufs, self.taggers, self.my_ids, self.nb, ep.label
            )
        self.finished = True
        return result

    def tick(self) -> bool:
        """After the run: keep progressing (late notifications, a peer's first message)."""
        if self.finished:
            self.ep.poll()
        return False

    def close(self) -> dict[str, Any] | None:
        """Close the endpoint; its final counters (``xfer_handles_open`` must be 0)."""
        if self.ep is None:
            return None
        stats = self.ep.stats()
        self.ep.close()
        self.ep = None
        return stats


def _gate(cfg: dict[str, Any], channel: Channel, i: int) -> None:
    """With a kill injection, initiators pause half-way until the parent killed its victim."""
    if cfg["inject"] in KILLS and i == cfg["requests"] // 2:
        channel.emit("gate", i)
        channel.wait_posted("continue", _SETUP_TIMEOUT_S)


def _run_initiator(
    ep: Any,
    cfg: dict[str, Any],
    channel: Channel,
    my_ids: np.ndarray,
    peer_ids: np.ndarray,
    used: dict[str, int],
) -> int:
    """Start requests (up to _WINDOW in flight) and wait for them; raise the first failure."""
    from layoutc.runtime.errors import TransferError

    nreq, half = cfg["requests"], cfg["requests"] // 2
    start = ep.pull if ep.role == "decode" else ep.push
    in_flight: set[str] = set()
    nxt = completions = 0
    waiter = _Sleep()
    while nxt < nreq or in_flight:
        while nxt < nreq and len(in_flight) < _WINDOW and not (nxt == half and in_flight):
            _gate(cfg, channel, nxt)  # (drained first, so a kill lands between requests)
            remote = peer_ids[nxt]
            if cfg["inject"] == "bad-blocks" and nxt == half:
                remote = remote.copy()
                remote[min(3, len(remote) - 1)] = cfg["blocks"]["nb_" + ep.peer_role] + 7
                remote[min(5, len(remote) - 1)] = -1
            try:
                start(_rid(nxt), my_ids[nxt], remote)
            except TransferError as e:
                earlier = ep.poll().failed  # an earlier request's failure is the cause
                raise next(iter(earlier.values()), e) from None
            in_flight.add(_rid(nxt))
            nxt += 1
        channel.posted()  # (a posted "stop" ends the run)
        progress = ep.poll()
        for err in progress.failed.values():
            raise err
        for rid in progress.done:
            in_flight.discard(rid)
            completions += 1
            s = ep.completion_info(rid)["strategy"] or "none"
            used[s] = used.get(s, 0) + 1
            if ep.role == "decode":
                channel.emit("done", rid)
        waiter.after(progress)
    return completions


def _run_passive(ep: Any, cfg: dict[str, Any], channel: Channel, my_ids: np.ndarray) -> int:
    """Expect requests (a sliding window) until all completed; check completion counts.
    A prefill rank passes its block ids of each request, so that it packs ahead for readers
    that stage."""
    nreq = cfg["requests"]
    want = (
        len(ep.plan.readers(ep.rank))
        if ep.role == "prefill"
        else len(ep.plan.rank(ep.rank).sources)
    )
    nxt = 0
    pending: set[str] = set()
    completions = 0
    waiter = _Sleep()
    while nxt < nreq or pending:
        while nxt < nreq and len(pending) < 2 * _WINDOW:
            ep.expect(_rid(nxt), blocks=my_ids[nxt] if ep.role == "prefill" else None)
            pending.add(_rid(nxt))
            nxt += 1
        channel.posted()  # (a posted "stop" ends the run)
        progress = ep.poll()
        for err in progress.failed.values():
            raise err
        for rid in progress.done:
            pending.discard(rid)
            info = ep.completion_info(rid)
            if len(info["peers"]) != want:
                raise RuntimeError(
                    f"{ep.label}: request {rid!r} completed after {len(info['peers'])} "
                    f"{ep.peer_role} notifications, the plan says {want}"
                )
            completions += 1
            if ep.role == "decode":
                channel.emit("done", rid)
        waiter.after(progress)
    return completions


class _Sleep:
    """Back-off between polls when nothing happened (no hot spin on a 2-core box)."""

    def __init__(self) -> None:
        self.delay = 5e-5

    def after(self, progress) -> None:
        if progress.done or progress.failed:
            self.delay = 5e-5
            return
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, 2e-3)


def _verify(plan, rank, bufs, taggers, my_ids, nb, label) -> int:
    """Compare every byte of every decode buffer with what its logical identity says."""
    flat = my_ids.reshape(-1)
    checked = 0
    for li, layer in enumerate(bufs):
        keys = _request_keys(li, my_ids)
        for page, t in layer.items():
            stride = plan.decode.page(page).logical_stride
            got = t.cpu().numpy().reshape(-1)  # (no copy for host memory)
            want = np.full(got.shape, _DECODE_FILL, dtype=np.uint8)
            taggers[page].fill(want[: nb * stride].reshape(nb, stride), flat, keys)
            checked += got.size
            if not np.array_equal(got, want):
                bad = np.flatnonzero(got != want)
                blk, off = divmod(int(bad[0]), stride)
                where = np.argwhere(my_ids == blk)
                req = (
                    f"request {where[0][0]} block {where[0][1]}" if where.size else "in no request"
                )
                raise RuntimeError(
                    f"{label}: layer {li} page {page!r}: {bad.size} of {got.size} bytes wrong; "
                    f"first at logical block {blk} ({req}), offset {off} "
                    f"({_state_at(plan.decode, page, off)}): got {int(got[bad[0]]):#04x}, "
                    f"want {int(want[bad[0]]):#04x}"
                )
    return checked


def _state_at(side, page: str, off: int) -> str:
    pl = side.page(page)
    off_k = off % pl.kernel_stride
    for s in pl.states:
        st = side.state(s)
        if st.offset <= off_k < st.offset + st.nbytes:
            return f"state {s!r} byte {off_k - st.offset}"
    return "padding"


# --------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------
class _Rank:
    """A rank's worker as the demo's parent sees it."""

    def __init__(self, role: str, rank: int, cfg: dict[str, Any], device: str) -> None:
        self.role, self.rank = role, rank
        self.label = f"{role} rank {rank}"
        self.worker = Worker(
            "layoutc.tools.demo:DemoRank", cfg, label=f"demo {self.label}", device=device
        )
        self.state = "running"  # running | finished | failed | killed | dead
        self.result: dict[str, Any] | None = None

    def take_return(self) -> tuple[bool, Any] | None:
        """(ok, value) of the call that ended, if one did."""
        w = self.worker
        if not w.returns:
            return None
        w.outstanding -= 1
        kind, value = w.returns.popleft()
        return kind == "ret", value


def _reason(rank: _Rank, value: Any) -> str:
    """One error line from what a rank's call raised."""
    if isinstance(value, LayoutcError) and not isinstance(value, WorkerError):
        return str(value)
    return f"{rank.label}: {value}"


def _make_progress(enabled: bool, total: int):
    if not enabled:
        return None
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )
    except ImportError:
        return None
    prog = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    prog.start()
    prog.add_task("requests x decode ranks", total=total)
    return prog


def rank_devices(device: str, tp: int, gpus: Sequence[int]) -> list[str]:
    """The device of each of ``tp`` ranks: ``"cpu"``, or rank ``r`` on ``cuda:gpus[r % len]``."""
    if device == "cpu":
        return ["cpu"] * tp
    return [f"cuda:{int(gpus[r % len(gpus)])}" for r in range(tp)]


def run_demo(
    plan: Plan,
    *,
    mode: str = "pull",
    requests: int = 16,
    layers: int = 8,
    blocks: int = 32,
    device: str = "cpu",
    inject: str | None = None,
    timeout_s: float = 10.0,
    progress: bool = True,
    decode_plan: Plan | None = None,
    seed: int = 0,
    strategy: str = "auto",
    prefill_gpus: Sequence[int] = (0,),
    decode_gpus: Sequence[int] = (0,),
) -> DemoResult:
    """Run the demo; raise :class:`DemoError` on any failure (never a silent success).

    ``timeout_s`` bounds every request (and so every wait for a dead peer).
    ``strategy``: the endpoints' strategy (``"zero-copy"``, ``"staged"``, ``"auto"``).
    ``prefill_gpus``/``decode_gpus`` (``device="cuda"``): the GPUs of the ranks of each side,
    rank ``r`` on ``gpus[r % len(gpus)]`` (default: every rank on GPU 0).
    ``decode_plan``: the plan the decode processes use for ``inject="spec-mismatch"``
    (default: :func:`mismatched_plan`).
    """
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if strategy not in STRATEGIES:
        raise UsageError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if inject is not None and inject not in INJECTIONS:
        raise UsageError(f"inject must be one of {', '.join(INJECTIONS)}, got {inject!r}")
    for name, v in (("requests", requests), ("layers", layers), ("blocks", blocks)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UsageError(f"{name} must be a positive integer, got {v!r}")
    if requests >= 1 << 21 or blocks >= 1 << 21:
        raise UsageError("requests and blocks must each be below 2**21")
    if not timeout_s > 0:
        raise UsageError(f"timeout_s must be > 0, got {timeout_s}")
    if inject in KILLS and requests < 2:
        raise UsageError("kill injections need at least 2 requests")
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} requested but torch sees no CUDA device")
        count = torch.cuda.device_count()
        for side, gpus in (("prefill", prefill_gpus), ("decode", decode_gpus)):
            if not gpus or any(not 0 <= int(g) < count for g in gpus):
                raise UsageError(
                    f"{side} GPUs {list(gpus)}: torch sees {count} CUDA device(s) "
                    f"(valid: 0..{count - 1})"
                )

    pre_dev = rank_devices(device, plan.prefill_tp, prefill_gpus)
    dec_dev = rank_devices(device, plan.decode_tp, decode_gpus)
    placement = "cpu"
    if device != "cpu":
        placement = (
            f"GPU of each rank: prefill {','.join(d[5:] for d in pre_dev)} -> decode "
            f"{','.join(d[5:] for d in dec_dev)}"
        )
    from layoutc.runtime.endpoint import layer_kind_sequence
    from layoutc.runtime.tags import element_ids

    for side_layout in (plan.prefill, plan.decode):  # fail early without tag identity
        element_ids(side_layout, side_layout.states[0].name, 0)
    kinds = layer_kind_sequence(plan, layers)
    blk = _layout_blocks(requests, blocks, seed)
    run_id = f"{os.getpid()}-{time.monotonic_ns() % 10**9}"
    base = {
        "mode": mode,
        "requests": requests,
        "kinds": kinds,
        "blocks": blk,
        "device": device,
        "timeout_s": timeout_s,
        "inject": inject,
        "run_id": run_id,
        "strategy": strategy,
    }
    dplan = plan
    if inject == "spec-mismatch":
        dplan = decode_plan if decode_plan is not None else mismatched_plan(plan)

    t_start = time.monotonic()
    ranks = [
        _Rank(
            "prefill",
            r,
            dict(base, role="prefill", rank=r, plan=plan, device=pre_dev[r]),
            pre_dev[r],
        )
        for r in range(plan.prefill_tp)
    ]
    ranks += [
        _Rank(
            "decode",
            r,
            dict(base, role="decode", rank=r, plan=dplan, device=dec_dev[r]),
            dec_dev[r],
        )
        for r in range(plan.decode_tp)
    ]
    errors: list[str] = []
    notes: list[str] = []
    prog = None
    try:
        # ---- set-up: handshake bytes travel through the parent (a plain byte channel)
        for c in ranks:
            c.worker.send("setup")
        hs = _gather(ranks, "setup", errors)
        if not errors:
            for c in ranks:
                c.worker.send("add_peers", [hs[x.label] for x in ranks if x.role != c.role])
            _gather(ranks, "add_peers", errors)
        if errors:
            raise _failure(errors, notes)
        setup_s = time.monotonic() - t_start

        # ---- transfer
        prog = _make_progress(progress, requests * plan.decode_tp)
        t0 = t_last = time.monotonic()
        for c in ranks:
            c.worker.send("run")
        initiators = [c for c in ranks if (c.role == "decode") == (mode == "pull")]
        victim = None
        if inject in KILLS:
            vrole = inject.split("-", 1)[1]
            vrank = (plan.prefill_tp if vrole == "prefill" else plan.decode_tp) - 1
            victim = next(c for c in ranks if c.role == vrole and c.rank == vrank)
        gated: set[str] = set()
        done = 0
        watchdog = t0 + 3 * timeout_s + 60.0
        stop_at: float | None = None  # after a failure: when to stop waiting for more reports
        while any(c.state == "running" for c in ranks):
            now = time.monotonic()
            if stop_at is not None and now > stop_at:
                break
            if now > watchdog:
                errors.append(f"demo: stopped after {now - t0:.0f} s without completing")
                break
            running = [c for c in ranks if c.state == "running"]
            ready = {id(w) for w in readable([c.worker for c in running], 0.2)}
            for c in running:
                if id(c.worker) not in ready:
                    continue
                c.worker.drain()
                while c.worker.events:
                    ev = c.worker.events.popleft()
                    if ev[0] == "done":
                        done += 1
                        t_last = time.monotonic()
                        if prog is not None:
                            prog.update(prog.task_ids[0], completed=done)
                    elif ev[0] == "gate":
                        gated.add(c.label)
                        waiting = [x for x in initiators if x.state == "running"]
                        if victim is not None and all(x.label in gated for x in waiting):
                            victim.state = "killed"
                            victim.worker.kill()
                            notes.append(
                                f"injected: killed {victim.label} (pid {victim.worker.pid}) "
                                f"after {requests // 2} requests"
                            )
                            for x in waiting:
                                if x is not victim:
                                    x.worker.post("continue")
                            stop_at = time.monotonic() + timeout_s + 5.0
                ret = c.take_return()
                if ret is not None:
                    ok, value = ret
                    if ok:
                        c.state, c.result = "finished", value
                    else:
                        c.state = "failed"
                        errors.append(_reason(c, value))
                        if stop_at is None:
                            # let the peers report their side (a timeout takes timeout_s)
                            stop_at = time.monotonic() + (
                                timeout_s + 2.0 if victim is not None else 1.0
                            )
                elif c.worker.dead and c.state == "running":
                    c.state = "dead"
                    errors.append(
                        f"{c.label}: process exited unexpectedly (exit code {c.worker.exitcode})"
                    )
                    stop_at = stop_at or time.monotonic() + 1.0
        seconds = t_last - t0
        if prog is not None:
            prog.stop()
            prog = None
        if errors or inject is not None:
            if not errors:
                errors.append(f"injected {inject}, but no process reported an error")
            raise _failure(errors, notes)
        for c in ranks:
            final = c.worker.stop(30)
            if final is None:
                raise _failure([f"{c.label}: did not close its endpoint after finishing"], notes)
            if final["xfer_handles_open"]:
                raise _failure(
                    [f"{c.label}: {final['xfer_handles_open']} transfer handles left open"], notes
                )
        dec = [c.result for c in ranks if c.role == "decode" and c.result is not None]
        pre = [c.result for c in ranks if c.role == "prefill" and c.result is not None]
        inits = dec if mode == "pull" else pre
        used: dict[str, int] = {}
        for f in inits:
            for k, v in f["strategies"].items():
                used[k] = used.get(k, 0) + v
        return DemoResult(
            mode=mode,
            prefill_tp=plan.prefill_tp,
            decode_tp=plan.decode_tp,
            requests=requests,
            layers=layers,
            blocks=blocks,
            bytes=sum(f["stats"]["bytes_completed"] for f in inits),
            descriptors=sum(f["stats"]["descriptors_posted"] for f in dec + pre),
            seconds=seconds,
            verified_bytes=sum(f["verified_bytes"] for f in dec),
            prefill_completions={r: f["completions"] for r, f in enumerate(pre)},
            notifications={r: f["stats"]["notifs_received"] for r, f in enumerate(pre)},
            setup_seconds=setup_s,
            strategy=strategy,
            strategies=used,
            chunks=sum(f["stats"]["chunk_transfers"] for f in dec + pre),
            placement=placement,
        )
    finally:
        if prog is not None:
            prog.stop()
        for c in ranks:
            c.worker.post("stop")
        for c in ranks:
            c.worker.stop(5)


def _gather(ranks: list[_Rank], what: str, errors: list[str]) -> dict[str, Any]:
    """The result of call ``what`` from every rank; on an error or a death, give the others a
    second to report theirs (both sides of a handshake mismatch), then return."""
    deadline = time.monotonic() + _SETUP_TIMEOUT_S
    got: dict[str, Any] = {}
    pending = list(ranks)
    stop_at = None
    while pending:
        now = time.monotonic()
        if stop_at is not None and now > stop_at:
            return got
        if now > deadline:
            errors.append(
                f"set-up timed out after {_SETUP_TIMEOUT_S:.0f} s waiting for "
                f"{', '.join(c.label for c in pending)} ({what})"
            )
            return got
        ready = {id(w) for w in readable([c.worker for c in pending], 0.2)}
        for c in list(pending):
            if id(c.worker) not in ready:
                continue
            c.worker.drain()
            ret = c.take_return()
            if ret is None and not c.worker.dead:
                continue
            pending.remove(c)
            if ret is None:
                errors.append(
                    f"{c.label}: process died during set-up (exit code {c.worker.exitcode})"
                )
            elif ret[0]:
                got[c.label] = ret[1]
                continue
            else:
                errors.append(_reason(c, ret[1]))
            stop_at = stop_at or time.monotonic() + 1.0
    return got


def _failure(errors: list[str], notes: list[str]) -> DemoError:
    seen, uniq = set(), []
    for e in errors:
        if e not in seen:
            seen.add(e)
            uniq.append(e)
    lines = notes + uniq
    return DemoError("demo failed:\n  " + "\n  ".join(lines), uniq)


def demo_main(plan: Plan, **kwargs: Any) -> int:
    """Run the demo as a CLI would: summary and ``verified: ...`` on stdout (after the
    progress bar has ended), errors on stderr; return the exit code (0 ok, 1 failure)."""
    try:
        res = run_demo(plan, **kwargs)
    except DemoError as e:
        print(f"layoutc demo: failed: {e}", file=sys.stderr)
        return 1
    sys.stderr.flush()
    print(res.summary())
    print(f"verified: {res.verified_line()}", flush=True)
    return 0
