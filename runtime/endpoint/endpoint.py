"""One NIXL agent per engine rank, executing a layoutc :class:`~layoutc.runtime.plan.Plan`.

Life of an endpoint (see ``docs/runtime.md`` for the full protocol)::

    ep = Endpoint(plan, role="decode", rank=d)
    ep.register_layers(buffers)               # [{page: tensor}] per layer, registered once
    peer_bytes = exchange(ep.handshake_bytes())   # any byte channel, or ep.connect(...)
    ep.add_peer(peer_bytes)                   # authenticated, validated, then loaded
    ep.pull("req-1", local_blocks, remote_blocks) # decode READs (pull); prefill: ep.push(...)
    ep.wait("req-1")                           # or poll() from the engine's loop

Completion protocol (messages: :mod:`~layoutc.runtime.protocol`):

* **pull** — decode rank *d* READs from every source, and once *every* descriptor completed
  ``DONE`` it sends ``DONE`` to each prefill rank in ``plan.rank(d).notified`` (sources and
  ``notify_only``).  Prefill rank *p* (``expect(request_id)``) completes a request after
  ``len(plan.readers(p))`` distinct decode ranks sent ``DONE``; it may then free the blocks.
* **push** — prefill rank *p* WRITEs into every decode rank in ``plan.targets(p)`` (those with
  *p* among their sources); its request completes when every WRITE completed ``DONE``, and it
  then sends ``DONE`` to each target.  Decode rank *d* (``expect(request_id)``) completes after
  all ``len(plan.rank(d).sources)`` sources sent ``DONE`` (a NIXL notification arrives after
  the data it follows).
* A failing initiator sends ``FAIL`` (with the reason) to the peers of the request, which then
  fail it too instead of waiting for their timeout.  Every request has a deadline.

How bytes move with each peer is a strategy's business (:mod:`.host`): zero-copy
(:mod:`.zero_copy`) or staged (:mod:`~layoutc.runtime.staged`), chosen per (request, peer).
Who may be a peer, and which messages are a peer's, is :mod:`.admission`'s: handshakes, pair
keys, message authentication and the handshake socket.  Nothing a peer sends makes
:meth:`Endpoint.poll` raise: a bad message is dropped and counted (``stats()``'s
``dropped_*``), and the state kept for unknown or early messages is bounded.

The endpoint is single-threaded: call it from one thread.  With NIXL's progress thread off,
the UCX worker only progresses inside this object's calls, so an engine must call
:meth:`Endpoint.poll` regularly (both sides, also while peers connect).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .. import handshake as hs
from .. import nixl_compat, protocol
from ..costmodel import CostModel
from ..descriptors import (
    PairTable,
    block_runs,
    build_pair_table,
    check_block_ids,
    check_same_count,
    posted_count,
    window_descriptors,
)
from ..errors import (
    CallOrderError,
    PeerDisconnectedError,
    PeerNotConnectedError,
    PlanError,
    RemoteFailureError,
    TransferError,
    TransferFailedError,
    TransferTimeoutError,
    UnknownRequestError,
    UsageError,
    WaitTimeoutError,
)
from ..plan import PLAN_FORMAT, Plan
from ..protocol import STAGED_KINDS, Done, Fail, Message, Ping, SReq
from ..staged import (
    DEFAULT_STAGING_BYTES,
    DEFAULT_STAGING_SLOTS,
    MOVERS,
    Staged,
    check_staged_options,
    staging_memory,
)
from ..telemetry import DROP_COUNTERS, Telemetry
from .admission import Admission
from .blocks import RequestBlocks
from .buffers import LocalPages, kind_pages
from .host import JobPart, PeerJob, Strategy
from .peers import Peer
from .plans import PlanSet
from .requests import Backoff, EarlyMessages, Progress, Request, now
from .results import CompletionInfo, PeerInfo, Stats
from .zero_copy import ZeroCopy

__all__ = ["Endpoint", "STRATEGIES"]

#: Strategies a request may ask for.
STRATEGIES = ("zero-copy", "staged", "auto")
_MAX_OTHER_NOTIFS = 1000
#: notifications in one batch after which the heap is trimmed (a flood's transient memory)
_LARGE_BATCH = 10_000


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` (None elsewhere)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    """Return freed heap memory to the system (a no-op where glibc is not the allocator)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_MAX_INFO = 4096
#: Messages kept per peer for requests not (yet) started here (``DONE`` before ``expect``),
#: and their bytes; more are dropped and counted.
MAX_EARLY_PER_PEER = 4096
MAX_EARLY_BYTES_PER_PEER = 64 << 20
#: Messages whose handling failed unexpectedly are logged this many times.
_MAX_LOGGED = 10

log = logging.getLogger("layoutc.runtime")


class Endpoint:
    """A NIXL agent for one engine rank, serving peers of every TP size its plans cover.

    Parameters
    ----------
    plans:      a generated module (anything with ``plan(prefill_tp=, decode_tp=)``): the
                plan for each peer is taken at its handshake, from the peer's TP size and
                ``tp``; or a single :class:`~layoutc.runtime.plan.Plan` (peers of that one
                pair only).
    role:       ``"prefill"`` or ``"decode"``.
    rank:       this rank's TP rank on its side.
    tp:         this engine's TP size (with a module; a single plan implies it).
    name:       NIXL agent name (unique among the agents that meet; at most 256 printable
                characters); default ``f"{engine}-{rank}"``.
    engine:     id shared by the ranks of one engine instance; default the role.
    device:     ``"cpu"`` (buffers in DRAM), ``"cuda"`` (VRAM, any GPU) or ``"cuda:N"`` (VRAM
                on GPU ``N``: pages elsewhere are refused; staging and kernels go there).
    listen_port: accept handshakes on layoutc's own socket on this port (peers then
                :meth:`connect`; 0: a free port, see :attr:`listen_port`).  Serviced from
                :meth:`poll`/:meth:`progress` (no thread).
    listen_host: the address that socket binds (default ``"127.0.0.1"``: this host only;
                ``"0.0.0.0"`` for every interface -- then set an ``auth_key``).
    auth_key:   pre-shared key (str or bytes, at least 16 bytes) that every peer must prove
                in its handshake; default ``$LAYOUTC_AUTH_KEY`` when set.  It keys every
                message's HMAC and encrypts the agent metadata in handshakes; it never crosses
                the wire.  See ``docs/security.md``.
    nixl_listener: also run NIXL's own metadata listener: ``True`` on NIXL's default port,
                or on the port given (off by default).  It binds every interface and hands
                this agent's metadata -- read and write access to every registered buffer --
                to anyone who connects (and loads anyone's); layoutc's handshakes never use
                it.  Turning it on is logged as a warning.
    timeout_s:  default deadline of every request and wait.
    strategy:   how requests this endpoint initiates move bytes, per peer: ``"zero-copy"``
                (one descriptor per run, page to page), ``"staged"`` (pack into the staging
                buffer, one transfer per chunk, unpack), or ``"auto"`` (the cost model picks
                per request and peer; the default).  ``pull``/``push`` can override it.
                A prefill rank given its block ids in :meth:`expect` also uses it to guess
                which readers will stage (and packs their bytes before they ask).
    staging_bytes: size of the staging buffer allocated and registered with the layers
                (default 64 MiB, on the endpoint's device); 0 turns staging off (every
                request then goes zero-copy, and peers cannot stage with this endpoint).
    staging_slots: slots the staging buffer is cut into (default 4); a chunk is one slot.
    cost_model: a :class:`~layoutc.runtime.costmodel.CostModel`, a dict of constants, or
                None for the device kind's defaults (updated from ``$LAYOUTC_COST_MODEL``).
    staged_mover: who copies staged chunks, ``"reader"``, ``"writer"``, ``"alternate"`` or
                ``"adaptive"`` (default: adaptive on host memory, writer on GPUs).
    staging_memory: ``"device"`` (the staging buffer on the pages' device; the default) or
                ``"host"`` (GPU pages, staging in pinned host memory: pack, copy to host,
                one transfer per chunk between host buffers, copy to the GPU, unpack -- for
                links that carry host memory only).
    staged_lanes: where staged pack and unpack run: ``"stream"`` (a CUDA stream each; the
                default on GPUs), ``"inline"`` (in the poll; the default on host memory) or
                ``"thread"`` (a worker thread each, host memory), see
                :mod:`~layoutc.runtime.staged.lanes`.
    """

    def __init__(
        self,
        plans: Any,
        role: str = "decode",
        rank: int = 0,
        *,
        tp: int | None = None,
        name: str | None = None,
        engine: str | None = None,
        device: str = "cpu",
        listen_port: int | None = None,
        listen_host: str = "127.0.0.1",
        auth_key: str | bytes | None = None,
        nixl_listener: bool | int = False,
        timeout_s: float = 30.0,
        strategy: str = "auto",
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        staging_slots: int = DEFAULT_STAGING_SLOTS,
        cost_model: CostModel | dict[str, Any] | None = None,
        staged_mover: str | None = None,
        staging_memory: str = "device",
        staged_lanes: str | None = None,
    ) -> None:
        self.plans = PlanSet(plans, role, tp)
        #: a plan of the set (all describe this rank's pages alike); the plan, for an
        #: endpoint given a single one
        self.plan = self.plans.any()
        self.side = self.plans.local
        self.role = role
        self.peer_role = hs.other_role(role)
        tp = self.side.tp
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < tp:
            raise PlanError(f"{role} rank {rank!r} out of range for {role} TP {tp}")
        dev = str(device)
        if dev not in ("cpu", "cuda") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
            raise UsageError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        timeout_s = finite_timeout(timeout_s, "timeout_s")
        if strategy not in STRATEGIES:
            raise UsageError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if not isinstance(staging_bytes, int) or staging_bytes < 0:
            raise UsageError(f"staging_bytes must be an int >= 0, got {staging_bytes!r}")
        if not isinstance(staging_slots, int) or staging_slots < 1:
            raise UsageError(f"staging_slots must be an int >= 1, got {staging_slots!r}")
        if staged_mover is not None and staged_mover not in MOVERS:
            raise UsageError(
                f"staged_mover must be one of {', '.join(MOVERS)}, got {staged_mover!r}"
            )
        kind = "cpu" if dev == "cpu" else "cuda"
        if cost_model is None:
            cost_model = CostModel.load(kind)
        elif isinstance(cost_model, dict):
            cost_model = CostModel.load(kind, overrides=cost_model)
        elif not isinstance(cost_model, CostModel):
            raise UsageError(f"cost_model must be a CostModel or a dict, got {type(cost_model)}")
        if strategy == "staged" and staging_bytes == 0:
            raise UsageError("strategy 'staged' needs a staging buffer (staging_bytes > 0)")
        check_staged_options(kind, staging_memory, staged_lanes)
        self._staging_memory = staging_memory
        self._staged_lanes = staged_lanes
        self.strategy = strategy
        self.cost_model = cost_model
        self.staging_bytes = staging_bytes
        self.staging_slots = staging_slots
        self._mover = staged_mover
        self.rank = rank
        if engine is not None and protocol.name_problem(engine, "engine"):
            raise UsageError(str(protocol.name_problem(engine, "engine")))
        self.engine = engine or role
        self.name = name if name is not None else f"{self.engine}-{rank}"
        if protocol.name_problem(self.name):
            raise UsageError(str(protocol.name_problem(self.name)))
        self.label = hs.rank_label(role, rank)
        self.device = dev
        self.mem_type = "DRAM" if dev == "cpu" else "VRAM"
        self.timeout_s = float(timeout_s)
        self.kinds = kind_pages(self.plan)
        self.telemetry = Telemetry()
        self.pages = LocalPages(
            label=self.label, side=self.side, kinds=self.kinds, device=dev, mem_type=self.mem_type
        )
        self.blocks = RequestBlocks(
            self.label, role, self.peer_role, self.side, self.kinds, lambda: self.pages.layer_kinds
        )
        self._peers: dict[str, Peer] = {}  # by agent name
        self._admission = Admission(
            self, self._peers, auth_key=auth_key, listen_host=listen_host, listen_port=listen_port
        )
        if self.mem_type == "VRAM":
            nixl_compat.prepare_cuda_env()
        try:
            self.agent = nixl_compat.create_agent(
                self.name, listen_port=nixl_compat.listener_port(nixl_listener)
            )
        except BaseException:
            self._admission.close()
            raise
        self._closed = False
        self._saw_dead = False
        self._reg: Any = None
        self._zero_copy = ZeroCopy(self, cost_model)
        self._staged: Staged | None = None
        self._requests: dict[str, Request] = {}
        self._finished: dict[str, TransferError | None] = {}
        # messages of requests not started here yet (bounded per sender)
        self._early = EarlyMessages(MAX_EARLY_PER_PEER, MAX_EARLY_BYTES_PER_PEER)
        self.other_notifs: list[tuple[str, bytes]] = []
        self._info: dict[str, CompletionInfo] = {}
        self._logged = 0
        self.thread_id = threading.get_ident()  # the thread that created (and uses) it
        _LIVE.add(self)

    @property
    def _strategies(self) -> list[Strategy]:
        """The strategies in use, in the order they are preferred on a tie."""
        out: list[Strategy] = [self._zero_copy]
        if self._staged is not None:
            out.append(self._staged)
        return out

    # ---------------------------------------------------------------- context management
    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Endpoint({self.name!r}, {self.label}, {len(self._peers)} peers)"

    def close(self) -> None:
        """Fail active requests, release every handle, forget peers, deregister memory."""
        if self._closed:
            return
        self._admission.close()
        for req in list(self._requests.values()):
            self._fail(
                req,
                TransferError(
                    f"{self.label}: request {req.rid!r} cancelled: endpoint closed",
                    request_id=req.rid,
                ),
                notify_peers=False,
            )
        for peer in list(self._peers.values()):
            self._drop_peer(peer)
        if self._saw_dead:
            # UCX closes endpoints asynchronously; destroying the worker while the endpoint of
            # a dead peer still has a failed operation queued trips a UCX assertion
            # (arbiter.c "ucs_arbiter_group_is_empty") and aborts the process.  Progress a
            # moment so those closes complete.
            end = now() + 0.05
            while now() < end:
                try:
                    self.agent.get_new_notifs()
                except nixl_compat.nixl_errors():
                    pass
                time.sleep(0.001)
        self._zero_copy.close()
        if self._reg is not None:
            try:
                self.agent.deregister_memory(self._reg)
            except nixl_compat.nixl_errors():
                pass
            self._reg = None
            self.telemetry.counters["registrations"] = 0
            self.telemetry.counters["registered_bytes"] = 0
        if self._staged is not None:
            self._staged.close()
            self.telemetry.counters["staging_bytes"] = 0
        self._closed = True

    def in_thread(self, other: Endpoint) -> bool:
        """Is this endpoint open and created in the same thread as ``other``?"""
        return not self._closed and self.thread_id == other.thread_id

    def _check_open(self) -> None:
        if self._closed:
            raise CallOrderError(f"{self.label}: endpoint is closed")

    # ---------------------------------------------------------------- registration
    def register_layers(
        self, buffers: Sequence[dict[str, Any]], kinds: Sequence[str] | None = None
    ) -> None:
        """Register one buffer per (layer, page): ``buffers[l] = {page_name: tensor}``.

        Tensors must be contiguous, on this endpoint's device, any dtype; each must hold at
        least one logical block (``PageLayout.logical_stride`` bytes).  A layer's kind is taken
        from ``kinds[l]``, or inferred from its set of pages when unambiguous.
        """
        self._check_open()
        if self._reg is not None:
            raise CallOrderError(f"{self.label}: layers are already registered")
        regions = self.pages.check(buffers, kinds)
        staged = None
        if self.staging_bytes:
            staged = self._make_staging(buffers)
        self._reg = self.agent.register_memory(regions, self.mem_type)
        if staged is not None:
            try:
                staged.register()
            except BaseException:
                self.agent.deregister_memory(self._reg)
                self._reg = None
                raise
            self._staged = staged
            self.telemetry.counters["staging_bytes"] = staged.pool.slots * staged.pool.slot_bytes
        self.telemetry.counters["registrations"] = int(regions.shape[0])
        self.telemetry.counters["registered_bytes"] = int(regions[:, 1].sum())

    def _make_staging(self, buffers: Sequence[dict[str, Any]]) -> Staged:
        """Allocate the staging buffer (once per endpoint) beside the pages."""
        first = next(iter(buffers[0].values()))
        mem = staging_memory(self.staging_bytes, first.device, self._staging_memory)
        return Staged(
            self, mem, self.staging_slots, self._mover, self.cost_model, self._staged_lanes
        )

    @property
    def num_blocks(self) -> int:
        """Logical blocks every registered buffer can hold (the valid local block id range)."""
        return self.pages.num_blocks

    @property
    def layer_kinds(self) -> list[str]:
        return list(self.pages.layer_kinds)

    # ---------------------------------------------------------------- the host interface
    def send(self, peer: Peer, msg: Message) -> None:
        self.agent.send_notif(peer.name, self._admission.notif(peer, msg))
        self.telemetry.add("notifs_sent")

    def notif_bytes(self, peer: Peer, msg: Message) -> bytes:
        return self._admission.notif(peer, msg)

    def fail(self, req: Request, err: TransferError) -> None:
        self._fail(req, err)

    def peer_error(self, req: Request, peer: Peer, exc: BaseException, doing: str) -> None:
        dead = nixl_compat.is_disconnect(exc)
        if dead:
            err: TransferError = PeerDisconnectedError(
                f"{self.label}: request {req.rid!r}: {peer.label} disconnected "
                f"({nixl_compat.error_name(exc)} while {doing} the transfer)",
                peer=peer.label,
                request_id=req.rid,
            )
        else:
            err = TransferFailedError(
                f"{self.label}: request {req.rid!r}: NIXL failed while {doing} the transfer "
                f"with {peer.label}: {nixl_compat.error_name(exc)}",
                peer=peer.label,
                request_id=req.rid,
            )
        if req.rid in self._requests:
            self._fail(req, err)
        if dead:  # then every other request that needs the peer
            self._mark_dead(peer, "NIXL reported a remote disconnect")

    def active(self, req: Request) -> bool:
        return self._requests.get(req.rid) is req

    def local_block_ids(
        self, blocks: Any, rid: str, *, peer: str | None = None, unique: bool = False
    ) -> np.ndarray:
        """This rank's block ids of request ``rid``, validated (:func:`check_block_ids`;
        ``unique`` where they receive bytes)."""
        return check_block_ids(
            blocks,
            what=f"local ({self.role})",
            limit=self.pages.num_blocks,
            who=self.label,
            request_id=rid,
            peer=peer,
            unique=unique,
        )

    def layer_selection(self, layers: Any, rid: str) -> np.ndarray | None:
        if layers is None:
            return None
        arr = np.asarray(layers)
        n = len(self.pages.layer_kinds)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise UsageError(f"{self.label}: request {rid!r}: layers must be a list of ints")
        bad = arr[(arr < 0) | (arr >= n)]
        if bad.size:
            raise UsageError(
                f"{self.label}: request {rid!r}: layers {bad.tolist()} out of range [0, {n})"
            )
        return np.unique(arr.astype(np.int64))

    def layer_pages(self) -> list[tuple[str, ...]]:
        return self.pages.layer_pages()

    def buffers(self) -> list[dict[str, Any]]:
        return self.pages.buffers

    def plan_for(self, peer: Peer) -> Plan:
        return peer.plan

    def pair_ranks(self, peer: Peer) -> tuple[int, int]:
        return (self.rank, peer.rank) if self.role == "decode" else (peer.rank, self.rank)

    # ---------------------------------------------------------------- handshake
    # (admission: :mod:`.admission`; these are the engine-facing calls)
    @property
    def listen_port(self) -> int | None:
        """The port of this endpoint's handshake socket (None: no socket)."""
        return self._admission.listen_port

    @property
    def listen_host(self) -> str:
        return self._admission.listen_host

    def header(self) -> dict[str, Any]:
        """The layout header this endpoint publishes (see :mod:`.handshake`)."""
        self._check_open()
        if self._reg is None:
            raise CallOrderError(f"{self.label}: call register_layers() before the handshake")
        out = {
            "format": hs.FORMAT,
            "agent": self.name,
            "engine": self.engine,
            "role": self.role,
            "rank": self.rank,
            "tp": self.side.tp,
            "spec": self.plan.spec,
            "spec_sha256": self.plan.spec_sha256,
            "plan_format": list(PLAN_FORMAT),
            "layout": self.side.header(),
            "mem_type": self.mem_type,
            "layers": self.pages.header_layers(),
            "listener": self.listen_port,
            "staging": None,
        }
        for s in self._strategies:
            out.update(s.advertise())
        return out

    def handshake_bytes(self) -> bytes:
        """This endpoint's handshake for :meth:`add_peer` on the other side: layout header and
        agent metadata, sealed (encrypted too, with an auth key) under this endpoint's nonce.
        Send it over a channel you trust: without an auth key, whoever reads it can read and
        write the registered memory."""
        self._check_open()
        return self._admission.handshake_bytes()

    def add_peer(self, data: bytes) -> str:
        """Authenticate a peer's :meth:`handshake_bytes`, validate its header against the plan,
        then load its metadata.

        Raises :class:`HandshakeError` (nothing loaded, nothing dropped) on anything wrong with
        the bytes, whatever they hold.  A live peer already known under the same agent name,
        or the same (engine, rank), is replaced only when the new bytes prove the auth key and
        were made later, or once the live one is known dead (it is probed for up to half a
        second): its requests then fail, its prepped lists are released, and the new metadata
        is loaded (a restarted peer).  The same bytes again change nothing.  Returns the peer's
        label, e.g. ``"prefill rank 1"``.
        """
        self._check_open()
        return self._admission.add_peer(data)

    def drop_peer(self, peer: Peer, reason: str = "") -> None:
        """Forget ``peer`` (see :class:`.admission.AdmissionHost`)."""
        self._drop_peer(peer, reason)

    def mark_dead(self, peer: Peer, reason: str) -> None:
        self._mark_dead(peer, reason)

    def progress_others(self) -> None:
        """Progress the other endpoints created in this thread once."""
        for other in _thread_endpoints(self):
            other.progress()

    def _drop_peer(self, peer: Peer, reason: str = "", *, unload: bool = True) -> None:
        """Fail the peer's requests, release what the strategies keep for it, unload its
        metadata."""
        if reason:
            self._peer_dead(peer, reason, error_cls=PeerDisconnectedError)
        for s in self._strategies:
            s.forget_peer(peer)
        if unload:
            try:
                self.agent.remove_remote_agent(peer.name)
            except nixl_compat.nixl_errors():
                pass
        self._admission.retire(peer)
        if self._peers.get(peer.name) is peer:
            del self._peers[peer.name]
        self._early.forget(peer.name)

    def peers(self) -> list[PeerInfo]:
        """Connected peers (name, label, engine, rank, tp, alive, reason)."""
        return [
            PeerInfo(p.name, p.label, p.engine, p.rank, p.tp, p.alive, p.dead_reason)
            for p in self._peers.values()
        ]

    def connect(
        self,
        host: str,
        port: int,
        peer_name: str | None = None,
        *,
        timeout_s: float | None = None,
    ) -> str:
        """Handshake with the endpoint listening at ``host:port`` (its ``listen_port``).

        Both sides prove the auth key (when one is set) before either releases its agent
        metadata; both validate.  The peer must be polling (:meth:`poll` or
        :meth:`wait_for_peers`); when this returns, the peer is installed here, and there once
        it polls.  ``peer_name``, when given, must be the agent found there.  A closed port
        fails at once (:class:`HandshakeError`); a peer that does not answer, at the timeout
        (:class:`TransferTimeoutError`).  Returns the peer's label.
        """
        self._check_open()
        if self._reg is None:
            raise CallOrderError(f"{self.label}: call register_layers() before the handshake")
        return self._admission.connect(host, port, peer_name, self._timeout_arg(timeout_s))

    def wait_for_peers(
        self,
        count: int | None = None,
        *,
        engine: str | None = None,
        timeout_s: float | None = None,
    ) -> list[str]:
        """Poll until ``count`` peers are connected (default: with a single plan, as many as
        its other side has ranks; otherwise every rank of every peer engine that connected,
        and at least one).

        A handshake refused here does not end the wait (a stranger cannot fail start-up),
        unless an auth key is set and the refused peer proved it.  At the timeout: the last
        refusal as a :class:`HandshakeError` (the count in its message), or
        :class:`TransferTimeoutError`.  Returns the connected peers' labels.
        """
        self._check_open()
        return self._admission.wait_for_peers(count, engine, self._timeout_arg(timeout_s))

    # ---------------------------------------------------------------- transfers
    def pull(
        self,
        request_id: str,
        local_blocks: Any,
        remote_blocks: Any,
        *,
        layers: Sequence[int] | None = None,
        engine: str | None = None,
        timeout_s: float | None = None,
        strategy: str | None = None,
        num_tokens: int | None = None,
    ) -> None:
        """Decode side: READ a request's pages from every source prefill rank (pull mode).

        ``local_blocks[i]`` (this engine's logical block ids) receives ``remote_blocks[i]``
        (the prefill engine's): one sequence for every layer, or ``{kind: sequence}`` per
        layer kind (KV-cache group; a kind missing from the mapping moves nothing).
        ``layers`` selects layers (default all).  ``engine`` names the prefill engine (needed
        when peers of several engines are connected).  Block ids are validated before
        anything is posted (:class:`BlockIdError`).  Completion is reported by
        :meth:`poll`/:meth:`wait`; once complete, every prefill rank in
        ``plan.rank(d).notified`` has been sent ``DONE``.  ``strategy`` overrides the
        endpoint's for this request (``"zero-copy"``, ``"staged"``, ``"auto"``); a staged
        source packs once its :meth:`expect` marked the request ready.

        ``num_tokens``: the request's tokens.  Needed when the two engines hold different
        tokens per logical block (the plan has a ``remap``): the block ids of each side then
        cover the request's tokens in that side's blocks (``ceil(num_tokens / tokens per
        logical block)`` of them, or more: the rest is untouched), and the tokens move window
        by window; per-logical-block kinds (a request's Mamba state) still pair ids one to one.
        Ignored otherwise.
        """
        if self.role != "decode":
            raise CallOrderError(f"{self.label}: pull() is for decode ranks; prefill uses push()")
        self._start(
            "pull", "READ", request_id, local_blocks, remote_blocks, layers, engine, timeout_s,
            strategy, num_tokens,
        )  # fmt: skip

    def push(
        self,
        request_id: str,
        local_blocks: Any,
        remote_blocks: Any,
        *,
        layers: Sequence[int] | None = None,
        engine: str | None = None,
        timeout_s: float | None = None,
        strategy: str | None = None,
        num_tokens: int | None = None,
    ) -> None:
        """Prefill side: WRITE a request's pages into every decode rank that reads from this
        rank (``plan.targets(p)``; push mode).  ``remote_blocks`` are the decode engine's
        logical block ids (one sequence, or ``{kind: sequence}`` as for :meth:`pull`).  When
        every WRITE completed ``DONE`` the request completes and each target is sent
        ``DONE``.  ``strategy`` as for :meth:`pull` (a staged target grants staging slots
        once its :meth:`expect` marked the request ready).  ``num_tokens`` as for
        :meth:`pull`.
        """
        if self.role != "prefill":
            raise CallOrderError(f"{self.label}: push() is for prefill ranks; decode uses pull()")
        self._start(
            "push", "WRITE", request_id, local_blocks, remote_blocks, layers, engine, timeout_s,
            strategy, num_tokens,
        )  # fmt: skip

    def expect(
        self,
        request_id: str,
        *,
        blocks: Any = None,
        engine: str | None = None,
        timeout_s: float | None = None,
        num_tokens: int | None = None,
    ) -> None:
        """Passive side of a request: wait for the peers' ``DONE`` notifications.

        Prefill (pull mode): completes after ``len(plan.readers(p))`` decode ranks notified;
        decode (push mode): after all of ``plan.rank(d).sources`` notified -- with the plan
        of the peer engine (``engine``, the only one connected, or the first to send a
        message for the request).  Notifications that arrived before this call count.

        ``blocks`` (prefill only): this rank's block ids of the request (one sequence, or
        ``{kind: sequence}``), the ``remote_blocks`` its readers will pull.  With them a
        staged source packs each reader's bytes at once (for readers that would choose the
        staged strategy, by this side's cost model), so that the chunks cross as soon as a
        reader's request arrives; a reader that asks for other layers or moves the bytes
        zero-copy is served as without them.  ``num_tokens`` (the request's tokens) is checked
        like :meth:`pull`'s; with a token remap the readers move the bytes zero-copy, so
        ``blocks`` are then only validated.
        """
        self._check_open()
        rid = self._new_rid(request_id)
        self.blocks.tokens(num_tokens, rid)
        sets = None
        if blocks is not None:
            if self.role != "prefill":
                raise UsageError(
                    f"{self.label}: request {rid!r}: expect(blocks=) is for prefill ranks"
                )
            sets = [
                (kind, self.local_block_ids(ids, rid))
                for kind, ids, _ in self.blocks.sets(blocks, blocks, rid)
            ]
        timeout = self._timeout_arg(timeout_s)
        engine, plan = self._expect_engine(engine)
        t = now()
        req = Request(rid, "expect", engine, t, t + timeout, timeout)
        if plan is not None:
            self._set_plan(req, plan)
        self._requests[rid] = req
        for _, sender, msg in self._early.pop(rid, []):
            if self.active(req):
                self._on_request_msg(req, sender, msg)
        if not self.active(req):
            return
        # peers already known dead fail the request at once
        for peer in self._peers.values():
            if not peer.alive and req.expects(peer):
                self._fail(
                    req,
                    PeerDisconnectedError(
                        f"{self.label}: request {rid!r}: {peer.label} is disconnected "
                        f"({peer.dead_reason})",
                        peer=peer.label,
                        request_id=rid,
                    ),
                )
                return
        if sets and any(ids.shape[0] for _, ids in sets):
            self._prepare_ahead(req, sets)
        self._maybe_complete_expect(req)

    def _set_plan(self, req: Request, plan: Plan) -> None:
        """Fix the plan (the peer engine's) of a passive request, and so whom it waits for."""
        req.plan = plan
        req.expected = self._expected_of(plan)

    def _expected_of(self, plan: Plan) -> frozenset[int]:
        """Peer ranks whose ``DONE`` completes a passive request under ``plan``."""
        if self.role == "prefill":
            return frozenset(plan.readers(self.rank))
        return frozenset(plan.rank(self.rank).sources)

    def _expect_engine(self, engine: str | None) -> tuple[str | None, Plan | None]:
        """(engine, its plan) of a passive request when known now: the engine named, or the
        only one connected; else the plan when only one peer TP is possible."""
        engines = {p.engine: p.plan for p in self._peers.values()}
        if engine is not None and engine in engines:
            return engine, engines[engine]
        if engine is None and len(engines) == 1:
            e = next(iter(engines))
            return None, engines[e]
        if self.plans.single_peer_tp() is not None:
            return engine, self.plan
        return engine, None

    def _prepare_ahead(self, req: Request, sets: list[tuple[str | None, np.ndarray]]) -> None:
        """Let the strategy each expected reader would use get ready (see :meth:`expect`)."""
        if self._staged is None or req.plan is None:
            return
        peers = [
            p
            for p in self._peers.values()
            if p.alive and req.expects(p) and p.staging is not None and p.plan is req.plan
        ]
        if len({p.engine for p in peers}) != 1:
            return  # no reader, or readers of several engines: which one pulls is unknown
        for peer in peers:
            table = self._pair_table(peer)
            if table is None:
                continue
            # (the readers' ids are unknown: assume they match)
            job = self._job(req, peer, "READ", table, [(k, ids, ids) for k, ids in sets], None)
            chosen = self._choose(job, self.strategy)
            if chosen is not None:
                chosen.prepare(job)

    def _new_rid(self, request_id: str) -> str:
        if not isinstance(request_id, str) or not request_id:
            raise UsageError(
                f"{self.label}: request id must be a non-empty str, got {request_id!r}"
            )
        if request_id in self._requests or request_id in self._finished:
            raise UsageError(f"{self.label}: request id {request_id!r} is already in use")
        return request_id

    def _timeout_arg(self, timeout_s: float | None) -> float:
        if timeout_s is None:
            return self.timeout_s
        return finite_timeout(timeout_s, "timeout_s", self.label)

    def _engine_plan(self, engine: str | None, rid: str) -> tuple[str | None, Plan]:
        """(engine, its plan) of a request this side initiates."""
        engines = {p.engine: p.plan for p in self._peers.values()}
        if engine is None:
            if len(engines) > 1:
                raise UsageError(
                    f"{self.label}: request {rid!r}: peers of several engines are connected "
                    f"({', '.join(sorted(engines))}); pass engine="
                )
            engine = next(iter(engines), None)
        if engine in engines:
            return engine, engines[engine]
        if self.plans.single_peer_tp() is not None:
            return engine, self.plan  # (the peers it needs are named below)
        raise PeerNotConnectedError(
            f"{self.label}: request {rid!r}: no {self.peer_role} engine"
            f"{'' if engine is None else f' {engine!r}'} is connected (no handshake)",
            request_id=rid,
        )

    def _peers_for(self, engine: str | None, ranks: Iterable[int], rid: str) -> dict[int, Peer]:
        """The connected peers of ``ranks`` in one engine."""
        by_rank = {p.rank: p for p in self._peers.values() if p.engine == engine}
        out = {}
        for r in ranks:
            label = hs.rank_label(self.peer_role, r)
            peer = by_rank.get(r)
            if peer is None:
                raise PeerNotConnectedError(
                    f"{self.label}: request {rid!r}: {label} is not connected (no handshake)",
                    peer=label,
                    request_id=rid,
                )
            if not peer.alive:
                raise PeerDisconnectedError(
                    f"{self.label}: request {rid!r}: {peer.label} is disconnected "
                    f"({peer.dead_reason}); re-handshake with a restarted peer first",
                    peer=peer.label,
                    request_id=rid,
                )
            out[r] = peer
        return out

    def _start(
        self,
        kind: str,
        op: str,
        request_id: str,
        local_blocks: Any,
        remote_blocks: Any,
        layers: Sequence[int] | None,
        engine: str | None,
        timeout_s: float | None,
        strategy: str | None = None,
        num_tokens: int | None = None,
    ) -> None:
        self._check_open()
        if self._reg is None:
            raise CallOrderError(f"{self.label}: call register_layers() first")
        tel = self.telemetry
        t_start = tel.clock()
        rid = self._new_rid(request_id)
        strategy = self.strategy if strategy is None else strategy
        if strategy not in STRATEGIES:
            raise UsageError(
                f"{self.label}: request {rid!r}: strategy must be one of "
                f"{', '.join(STRATEGIES)}, got {strategy!r}"
            )
        engine, plan = self._engine_plan(engine, rid)
        if op == "READ":
            rp = plan.rank(self.rank)
            targets, notify = rp.sources, rp.notified
        else:
            targets = notify = plan.targets(self.rank)
        peer_kind = f"{self.peer_role}"
        peers = self._peers_for(engine, sorted(set(targets) | set(notify)), rid)
        tokens = self.blocks.tokens(num_tokens, rid)
        if plan.remap is not None and tokens is None:
            rm = plan.remap
            raise UsageError(
                f"{self.label}: request {rid!r}: the engines hold different tokens per logical "
                f"block (prefill {rm.prefill_kernel_tokens * rm.prefill_kernel_blocks}, decode "
                f"{rm.decode_kernel_tokens * rm.decode_kernel_blocks}): pass num_tokens= (the "
                "request's tokens)"
            )
        sets = []
        for part_kind, lb, rb in self.blocks.sets(local_blocks, remote_blocks, rid):
            if plan.remap is not None and tokens is not None:
                lb, rb = self.blocks.window(plan, part_kind, lb, rb, tokens, rid)
            local = self.local_block_ids(lb, rid, unique=(op == "READ"))
            remote = None
            for r in sorted(set(targets)):
                peer = peers[r]
                remote = check_block_ids(
                    rb,
                    what=f"remote ({peer_kind})",
                    limit=peer.num_blocks,
                    who=self.label,
                    request_id=rid,
                    peer=peer.label,
                    unique=(op == "WRITE"),
                )
            if remote is None:  # no targets: still validate the shape
                remote = check_block_ids(
                    rb,
                    what=f"remote ({peer_kind})",
                    limit=np.iinfo(np.int64).max,
                    who=self.label,
                    request_id=rid,
                )
            if plan.remap is not None and self.blocks.per_kernel(part_kind):
                sets.append((part_kind, local, remote))
                continue
            check_same_count(
                local,
                remote,
                local_what=f"local ({self.role}) block ids"
                + ("" if part_kind is None else f" of kind {part_kind!r}"),
                remote_what=f"remote ({peer_kind}) block ids",
                who=self.label,
                request_id=rid,
            )
            sets.append((part_kind, local, remote))
        sel = self.layer_selection(layers, rid)
        if strategy == "staged" and plan.remap is not None:
            raise UsageError(
                f"{self.label}: request {rid!r}: strategy 'staged' cannot move requests between "
                "engines holding different tokens per logical block; use 'zero-copy' or 'auto'"
            )
        if strategy == "staged":
            for r in sorted(set(targets)):
                if self._staged is None or peers[r].staging is None:
                    who = self.label if self._staged is None else peers[r].label
                    raise TransferFailedError(
                        f"{self.label}: request {rid!r}: strategy 'staged' but {who} has no "
                        f"staging buffer (staging_bytes=0)",
                        peer=None if self._staged is None else peers[r].label,
                        request_id=rid,
                    )
        timeout = self._timeout_arg(timeout_s)
        t = now()
        req = Request(
            rid,
            kind,
            engine,
            t,
            t + timeout,
            timeout,
            notify=[peers[r] for r in sorted(set(notify))],
            plan=plan,
            num_tokens=tokens,
        )
        self._requests[rid] = req
        for _, sender, msg in self._early.pop(rid, []):  # e.g. a peer's FAIL that came first
            if self.active(req):
                self._on_request_msg(req, sender, msg)
        if not self.active(req):
            return
        if not any(local.shape[0] for _, local, _ in sets):
            return  # nothing to move; completes (and notifies) on the next poll
        tel.span("~start-checks", t_start)
        t_start = tel.clock()
        chosen: dict[str, tuple[Strategy, list[PeerJob]]] = {}
        for r in sorted(set(targets)):
            peer = peers[r]
            table = self._pair_table(peer)
            if table is None:
                continue
            job = self._job(req, peer, op, table, sets, sel)
            s = self._choose(job, strategy)
            if s is None:
                continue  # no bytes from this peer in these layers
            req.strategies[peer.label] = s.name
            tel.add("staged_peer_requests" if s.name == "staged" else "zero_copy_peer_requests")
            chosen.setdefault(s.name, (s, []))[1].append(job)
        tel.span("~start-choose", t_start)
        for s, jobs in chosen.values():
            if self.active(req):
                s.start(req, jobs)

    def _job(
        self,
        req: Request,
        peer: Peer,
        op: str,
        table: PairTable,
        sets: list[tuple[str | None, np.ndarray, np.ndarray]],
        sel: np.ndarray | None,
    ) -> PeerJob:
        """The request's bytes with ``peer``: one part per kind of block ids."""
        parts = []
        rm = self.plan_for(peer).remap
        for kind, local, remote in sets:
            layers = self.blocks.kind_layers(kind, sel)
            rows = table.rows_for_layers(layers)
            explicit = None
            if rm is not None and req.num_tokens is not None:
                loc, rem, nbytes = window_descriptors(
                    table,
                    rows,
                    local,
                    remote,
                    rm.windows(self.role, req.num_tokens),
                    rm.windows(self.peer_role, req.num_tokens),
                )
                runs, posted, explicit = block_runs(local, local), int(loc.shape[0]), (loc, rem)
            else:
                runs = block_runs(local, remote)  # consecutive on both sides: what NIXL merges
                nbytes = int(table.row_nbytes[rows].sum()) * int(local.shape[0])
                posted = posted_count(table, local, remote, rows, runs)
            parts.append(
                JobPart(
                    kind=kind,
                    local=local,
                    remote=remote,
                    layers=layers,
                    rows=rows,
                    runs=runs,
                    nbytes=nbytes,
                    posted=posted,
                    explicit=explicit,
                )
            )
        return PeerJob(req=req, peer=peer, op=op, table=table, parts=parts)

    def _choose(self, job: PeerJob, strategy: str) -> Strategy | None:
        """The strategy of one (request, peer): ``None`` when no byte moves; forced by name,
        or (``"auto"``) the one the cost model predicts fastest (ties: the first)."""
        if job.nbytes == 0:
            return None
        staged = self._staged
        can_stage = (
            staged is not None
            and job.peer.staging is not None
            and not any(p.explicit is not None for p in job.parts)
        )
        if strategy == "zero-copy" or not can_stage:
            return self._zero_copy
        if strategy == "staged":
            return staged
        best: tuple[float, Strategy] | None = None
        for s in self._strategies:
            t = s.estimate(job)
            if t is not None and (best is None or t < best[0]):
                best = (t, s)
        return None if best is None else best[1]

    def descriptor_table(self, peer: str) -> PairTable | None:
        """The descriptor table of the pair with ``peer`` (agent name or label), for
        inspection: rows, index starts and bytes per logical block (None: no bytes move)."""
        for p in self._peers.values():
            if peer in (p.name, p.label):
                return self._pair_table(p)
        raise UsageError(f"{self.label}: no peer {peer!r}")

    def _pair_table(self, peer: Peer) -> PairTable | None:
        """The pair's descriptor table (built once per peer; no NIXL calls)."""
        if not peer.table_built:
            d, p = self.pair_ranks(peer)
            peer.table = build_pair_table(
                self.plan_for(peer),
                decode_rank=d,
                prefill_rank=p,
                local_is_decode=self.role == "decode",
                layer_pages=self.pages.layer_pages(),
                local_segments=self.pages.segments,
                remote_segments=peer.segments,
            )
            peer.table_built = True
        return peer.table

    # ---------------------------------------------------------------- progress
    def progress(self) -> None:
        """Progress NIXL and this endpoint's requests once, reporting nothing (completions
        wait for :meth:`poll`)."""
        self._check_open()
        self._progress()

    def poll(self) -> Progress:
        """Progress NIXL once; return (and forget) requests that completed or failed since the
        last call.  Call it regularly from the engine loop."""
        self._check_open()
        self._progress()
        done = [rid for rid, err in self._finished.items() if err is None]
        failed = {rid: err for rid, err in self._finished.items() if err is not None}
        self._finished.clear()
        return Progress(done, failed)

    def wait(self, request_id: str, *, timeout_s: float | None = None) -> None:
        """Block until ``request_id`` completes (returns) or fails (raises its TransferError).

        The wait is bounded by the request's own deadline; ``timeout_s`` gives up earlier
        with :class:`WaitTimeoutError`, the request still active.  While waiting, every
        endpoint created in this thread progresses, so two endpoints of one process (the
        two sides of a test, say) never wait on each other.
        """
        self._check_open()
        if request_id not in self._requests and request_id not in self._finished:
            raise UnknownRequestError(
                f"{self.label}: unknown request {request_id!r} (never started here, or "
                f"already reported by poll() or wait())"
            )
        deadline = None if timeout_s is None else now() + self._timeout_arg(timeout_s)
        waiter = Backoff()
        while request_id not in self._finished:
            self._progress()
            if request_id in self._finished:
                break
            for other in _thread_endpoints(self):
                other.progress()
            if deadline is not None and now() > deadline:
                raise WaitTimeoutError(
                    f"{self.label}: request {request_id!r} still in flight after "
                    f"{timeout_s:.1f} s (it stays active)",
                    request_id=request_id,
                )
            waiter.sleep()
        err = self._finished.pop(request_id)
        if err is not None:
            raise err

    def wait_all(self, request_ids: Iterable[str], *, timeout_s: float | None = None) -> None:
        """:meth:`wait` for several requests; raises the first failure."""
        errors = []
        for rid in list(request_ids):
            try:
                self.wait(rid, timeout_s=timeout_s)
            except TransferError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def status(self, request_id: str) -> str:
        """``"active"``, ``"done"``, ``"failed"`` (whether or not poll/wait reported it yet;
        kept for the last 4096 finished requests) or ``"unknown"``."""
        if request_id in self._requests:
            return "active"
        if request_id in self._finished:
            return "failed" if self._finished[request_id] is not None else "done"
        info = self._info.get(request_id)
        if info is not None:
            return "done" if info.ok else "failed"
        return "unknown"

    def _progress(self) -> None:
        """One round: handshakes, notifications, strategies' work, completions, deadlines."""
        self._admission.service()
        try:
            notifs = self.agent.get_new_notifs()
        except nixl_compat.nixl_errors():
            notifs = {}
        except UnicodeDecodeError:  # a sender's name NIXL's binding cannot decode
            self.telemetry.add("dropped_malformed")
            notifs = {}
        count = 0
        for sender, msgs in notifs.items():
            if not isinstance(sender, str):
                sender = bytes(sender).decode("utf-8", "replace")
            for m in msgs:
                self.telemetry.add("notifs_received")
                self._on_notif(sender, bytes(m))
            count += len(msgs)
        if count >= _LARGE_BATCH:
            # a flood: the batch NIXL queued for us is gone now; give its memory back
            del notifs
            _trim_heap()
        t = now()
        staged = self._staged
        if staged is not None and staged.busy():
            staged.progress(t)
        if self._zero_copy.busy():
            self._zero_copy.progress(t)
        for req in list(self._requests.values()):
            if not self.active(req):
                continue  # failed meanwhile (e.g. its peer died while checking another)
            if req.kind != "expect":
                if all(s.complete(req) for s in self._strategies):
                    self._complete_initiator(req)
            elif staged is not None:
                self._maybe_complete_expect(req)
            if self.active(req) and t > req.deadline:
                self._timeout(req)
        if self._early:
            self._early.expire(t, self.timeout_s)

    def _complete_initiator(self, req: Request) -> None:
        peers = self._moved_with(req)
        self._release(req, failed=False)
        msg = Done(req.rid)
        for peer in req.notify:
            try:
                self._send(peer.name, msg)
            except nixl_compat.nixl_errors() as e:
                self.telemetry.add("notify_errors")
                if nixl_compat.is_disconnect(e):
                    self._mark_dead(peer, "NIXL reported a remote disconnect")
                if req.kind == "push":  # the target cannot learn that its data arrived
                    self._fail(
                        req,
                        PeerDisconnectedError(
                            f"{self.label}: request {req.rid!r}: data written but {peer.label} "
                            f"could not be notified ({nixl_compat.error_name(e)})",
                            peer=peer.label,
                            request_id=req.rid,
                        ),
                        notify_peers=False,
                    )
                    return
        self._finish(req, None, peers)

    def _moved_with(self, req: Request) -> list[str]:
        """Labels of the peers the request moved bytes with (initiators) or whose ``DONE``
        counted (passive side)."""
        if req.kind == "expect":
            return [hs.rank_label(self.peer_role, r) for r in sorted(req.got)]
        return list(req.strategies)

    def _mark_dead(self, peer: Peer, reason: str) -> None:
        """Note a dead peer and fail every other request that needs it."""
        self._saw_dead = True
        if peer.alive:
            peer.alive = False
            peer.dead_reason = reason
            self._peer_dead(peer, reason, error_cls=PeerDisconnectedError)
            for s in self._strategies:
                s.peer_dead(peer)

    def _peer_dead(self, peer: Peer, reason: str, *, error_cls: type[TransferError]) -> None:
        for req in list(self._requests.values()):
            if req.kind == "expect":
                involved = req.expects(peer) and (
                    peer.rank not in req.got or any(s.involves(req, peer) for s in self._strategies)
                )
            else:
                involved = any(s.involves(req, peer) for s in self._strategies)
                involved = involved or (req.kind == "push" and any(p is peer for p in req.notify))
            if involved:
                self._fail(
                    req,
                    error_cls(
                        f"{self.label}: request {req.rid!r}: {peer.label} disconnected ({reason})",
                        peer=peer.label,
                        request_id=req.rid,
                    ),
                )

    def _timeout(self, req: Request) -> None:
        if req.kind == "expect" and req.expected is None:
            err = TransferTimeoutError(
                f"{self.label}: request {req.rid!r} timed out after {req.timeout_s:.1f} s: no "
                f"{self.peer_role} rank sent anything for it",
                request_id=req.rid,
            )
        elif req.kind == "expect":
            missing = sorted((req.expected or frozenset()) - req.got)
            names = ", ".join(hs.rank_label(self.peer_role, r) for r in missing)
            err = TransferTimeoutError(
                f"{self.label}: request {req.rid!r} timed out after {req.timeout_s:.1f} s "
                f"waiting for {names} ({len(req.got)} of {len(req.expected or ())} "
                f"{self.peer_role} ranks notified)",
                peer=hs.rank_label(self.peer_role, missing[0]) if missing else None,
                request_id=req.rid,
            )
        else:
            slow = [p for s in self._strategies for p in s.pending(req)]
            err = TransferTimeoutError(
                f"{self.label}: request {req.rid!r} timed out after {req.timeout_s:.1f} s; "
                f"transfers with {', '.join(w for _, w in slow) or 'no peer'} still in progress",
                peer=slow[0][0] if slow else None,
                request_id=req.rid,
            )
        self._fail(req, err)

    def _release(self, req: Request, *, failed: bool) -> bool:
        """Every strategy releases what ``req`` holds (once); True when none of this side's
        writes into a peer's memory still runs."""
        if req.released:
            return True
        req.released = True
        clean = True
        for s in self._strategies:
            clean = s.release(req, failed) and clean
        return clean

    def _fail(self, req: Request, err: TransferError, *, notify_peers: bool = True) -> None:
        moved = self._moved_with(req)
        involved: dict[str, Peer] = {}
        for s in self._strategies:
            involved.update({p.name: p for p in s.peers(req)})
        rel = True
        try:
            rel = self._release(req, failed=True)
        finally:
            if notify_peers:
                involved.update({p.name: p for p in req.notify})
                if req.kind == "expect":
                    involved.update({p.name: p for p in self._peers.values() if req.expects(p)})
                for peer in involved.values():
                    if peer.alive and peer.label != err.peer:
                        self._send_quiet(peer.name, Fail(req.rid, str(err), rel))
            self._finish(req, err, moved)

    def _finish(self, req: Request, err: TransferError | None, peers: list[str]) -> None:
        if self._requests.pop(req.rid, None) is None:
            return
        self._release(req, failed=err is not None)
        self._finished[req.rid] = err
        self.telemetry.add("requests_failed" if err else "requests_done")
        if err is None and req.kind != "expect":
            self.telemetry.add("bytes_completed", req.nbytes)
        self._info[req.rid] = CompletionInfo(
            request_id=req.rid,
            kind=req.kind,
            ok=err is None,
            error=None if err is None else str(err),
            peers=peers,
            expected=[hs.rank_label(self.peer_role, r) for r in sorted(req.expected or ())],
            notified=[p.label for p in req.notify] if err is None else [],
            bytes=req.nbytes,
            descriptors=req.descriptors,
            seconds=now() - req.started,
            strategy=_summary(req.strategies),
            strategies=dict(req.strategies),
            chunks=req.chunks,
            engine=req.engine,
        )
        while len(self._info) > _MAX_INFO:
            self._info.pop(next(iter(self._info)))

    def completion_info(self, request_id: str) -> CompletionInfo:
        """How a recently finished request ended (kept for the last 4096 requests); see
        :class:`~layoutc.runtime.endpoint.results.CompletionInfo` (it reads like a dict too).
        Raises :class:`UnknownRequestError` for a request not (or no longer) known."""
        info = self._info.get(request_id)
        if info is None:
            raise UnknownRequestError(
                f"{self.label}: no completion info for request {request_id!r} (still active, "
                f"never started here, or older than the last {_MAX_INFO} requests)"
            )
        return info

    # ---------------------------------------------------------------- notifications
    def _send(self, peer_name: str, msg: Message) -> None:
        peer = self._peers.get(peer_name)
        if peer is None:
            self.telemetry.add("notify_errors")  # (dropped meanwhile: nothing to tell)
            return
        self.agent.send_notif(peer_name, self._admission.notif(peer, msg))
        self.telemetry.add("notifs_sent")

    def _send_quiet(self, peer_name: str, msg: Message) -> None:
        try:
            self._send(peer_name, msg)
        except nixl_compat.nixl_errors():
            self.telemetry.add("notify_errors")

    def _on_notif(self, sender: str, raw: bytes) -> None:
        """One notification: authenticated, decoded and handled -- or dropped and counted.
        Nothing a peer sends raises out of here."""
        if not protocol.is_layoutc(raw):
            if len(self.other_notifs) < _MAX_OTHER_NOTIFS:
                self.other_notifs.append((sender, raw))
            else:
                self.telemetry.add("dropped_other_notifs")
            return
        opened = self._admission.open(sender, raw)
        if opened is None:
            return
        peer, msg = opened
        try:
            self._on_message(peer, msg, len(raw))
        except Exception:  # noqa: BLE001 - a peer's message must never break the engine loop
            self.telemetry.add("dropped_failed")
            if self._logged < _MAX_LOGGED:
                self._logged += 1
                log.exception("%s: handling a message of %s failed", self.label, peer.label)

    def _on_message(self, peer: Peer, msg: Message, nbytes: int) -> None:
        sender = peer.name
        if isinstance(msg, Ping):
            return
        if isinstance(msg, SReq):
            # the destination's block ids are distinct: no staged request holds more blocks
            # than the destination's buffers
            dst_blocks = self.num_blocks if self.role == "decode" else peer.num_blocks
            if msg.blocks.shape[0] > dst_blocks:
                self.telemetry.add("dropped_malformed")
                return
        req = self._requests.get(msg.rid)
        if req is None:
            if isinstance(msg, Fail) or (
                isinstance(msg, STAGED_KINDS) and not isinstance(msg, SReq)
            ):
                for s in self._strategies:
                    s.on_stale(sender, msg)  # a late message of an ended request
                if not isinstance(msg, Fail):
                    return
            if msg.rid in self._finished:
                return
            if not self._early.add(msg.rid, now(), sender, msg, nbytes):
                self.telemetry.add("dropped_early_overflow")
            return
        self._on_request_msg(req, sender, msg)

    def _on_request_msg(self, req: Request, sender: str, msg: Message) -> None:
        peer = self._peers.get(sender)
        label = peer.label if peer else repr(sender)
        if isinstance(msg, Fail):
            if peer is not None and (
                req.kind != "expect" or req.expects(peer) or any(p is peer for p in req.notify)
            ):
                self._fail(
                    req,
                    RemoteFailureError(
                        f"{self.label}: request {req.rid!r}: {label} failed it: {msg.error}",
                        peer=label,
                        request_id=req.rid,
                    ),
                    notify_peers=False,
                )
                if msg.released:
                    for s in self._strategies:
                        s.on_stale(sender, msg)
            return
        if peer is None:
            return
        if isinstance(msg, STAGED_KINDS):
            if self._staged is None:
                return
            if isinstance(msg, SReq):
                if req.kind != "expect" or not self._take_peer(req, peer):
                    return
            self._staged.on_message(req, peer, msg)
            if self.active(req) and req.kind == "expect":
                self._maybe_complete_expect(req)
            return
        if not isinstance(msg, Done) or req.kind != "expect":
            return
        if not self._take_peer(req, peer):
            return
        for s in self._strategies:
            s.on_message(req, peer, msg)
        if peer.label not in req.strategies and self._moves_bytes_with(peer):
            req.strategies[peer.label] = "zero-copy"
            self.telemetry.add("zero_copy_peer_requests")
        req.got.add(peer.rank)
        self._maybe_complete_expect(req)

    def _take_peer(self, req: Request, peer: Peer) -> bool:
        """Does passive ``req`` take a message of ``peer``?  The first peer to send one fixes
        the request's engine (and so its plan, when that was not known yet)."""
        if not req.engine_ok(peer):
            return False
        plan = req.plan if req.plan is not None else peer.plan
        if peer.plan is not plan or peer.rank not in self._expected_of(plan):
            return False
        if req.plan is None:
            self._set_plan(req, plan)
        if req.engine is None:
            req.engine = peer.engine
        return True

    def _moves_bytes_with(self, peer: Peer) -> bool:
        if self.role == "prefill":
            return self.rank in peer.plan.rank(peer.rank).sources
        return peer.rank in peer.plan.rank(self.rank).sources

    def _maybe_complete_expect(self, req: Request) -> None:
        if req.expected is None:
            return
        if req.got >= req.expected and all(s.complete(req) for s in self._strategies):
            self._finish(req, None, self._moved_with(req))

    # ---------------------------------------------------------------- statistics
    def stats(self) -> Stats:
        """Counters: open handles, registrations, bytes and descriptors posted, requests
        (:class:`~layoutc.runtime.endpoint.results.Stats`; it reads like a dict too)."""
        c = self.telemetry.counters
        extra: dict[str, int | float] = {}
        for strat in self._strategies:
            extra.update(strat.stats())
        return Stats(
            **c,
            xfer_handles_open=c["xfer_handles_created"] - c["xfer_handles_released"],
            requests_active=len(self._requests),
            peers=len(self._peers),
            messages_dropped=sum(c[k] for k in DROP_COUNTERS),
            early_messages=self._early.count,
            extra=extra,
        )


def finite_timeout(value: Any, what: str, who: str = "") -> float:
    """``value`` as seconds: a finite number > 0 (not a bool), else :class:`UsageError`."""
    try:
        t = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        t = math.nan
    if not 0 < t < math.inf:
        raise UsageError(
            f"{who + ': ' if who else ''}{what} must be a finite number > 0, got {value!r}"
        )
    return t


#: Open endpoints of this process (``wait`` progresses those of its thread).
_LIVE: weakref.WeakSet[Endpoint] = weakref.WeakSet()


def _thread_endpoints(ep: Endpoint) -> list[Endpoint]:
    """The other open endpoints created in ``ep``'s thread."""
    return [o for o in list(_LIVE) if o is not ep and o.in_thread(ep)]


def _summary(strategies: dict[str, str]) -> str | None:
    kinds = set(strategies.values())
    if not kinds:
        return None
    return kinds.pop() if len(kinds) == 1 else "mixed"
