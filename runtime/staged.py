"""The staged strategy inside an :class:`~layoutc.runtime.endpoint.Endpoint` (DESIGN.md §4).

The source rank (always the prefill side) packs every byte one request sends to one peer into
its registered staging buffer, chunk by chunk; each chunk crosses with ONE NIXL transfer into
the destination's staging buffer (always the decode side), which unpacks it into its pages.
Pack and unpack are :func:`staging.pack` / :func:`staging.unpack` over a
:class:`staging.StagingLayout` of the (decode rank, prefill rank) pair, so both sides agree on
the stream order (rows outer, blocks inner).

Staging buffer and slots
------------------------
Each endpoint allocates ONE staging tensor (``staging_bytes``, default 64 MiB, on the
endpoint's device) when it registers its layers, registers it once, and publishes its address
and slot size in the handshake header.  The buffer is cut into ``staging_slots`` equal slots
(default 4); a chunk is at most one slot of either side.  On the source a slot holds one packed
chunk until it has crossed; on the destination it holds one chunk from the moment it is
*granted* until it is unpacked.  Slots are shared by every peer and request, handed out in
turn, and reused for the life of the endpoint.

Protocol (notifications ``LC1 {json}``; the initiator decides the strategy per peer)
-------------------------------------------------------------------------------------
* ``SREQ`` -- initiator to peer: the request is staged with this peer.  Carries the *peer's*
  block ids, the layers, chunk size, chunk count, stream bytes (both sides compute them and
  must agree), the mover policy, and (when the initiator is the destination) the first grants.
  A passive endpoint acts on it once :meth:`Endpoint.expect` marked the request ready.
* ``GNT`` -- destination to source: chunk ``c`` may land in destination slot ``s``.
* The source packs a granted chunk into one of its slots, then either WRITEs it into the
  granted slot with ``DAT`` attached (the notification arrives after the data), or sends
  ``RDY`` (chunk ``c`` is packed in source slot ``s``) and the destination READs it and
  answers ``ACK`` (the source slot is free again).  Who moves each chunk (``mover``):
  ``reader`` (the destination READs every chunk), ``writer`` (the source WRITEs every chunk) or
  ``alternate`` (even chunks written, odd chunks read), or ``adaptive`` (the source writes a
  chunk itself only when it has nothing else to pack; the default on host memory, where the
  copy through the kernel (CMA) costs the process that posts it, so pack, copy and unpack
  balance over two cores).  On GPUs the source writes every chunk (no RDY/ACK round trip).
* The destination unpacks a chunk as soon as it has landed, frees the slot and grants the
  next chunk.
* Packing ahead: a prefill rank given its block ids in ``expect`` makes the source contexts of
  the readers it expects to stage at once and packs before any grant; the reader's ``SREQ``
  takes such a context up when it asks for the same bytes (else it is dropped).  Otherwise a
  source packs only granted chunks; a granted chunk that finds no free slot takes back the
  slot of the newest chunk packed without a grant (packed again later), so chunks packed
  ahead never hold up a request that was asked for.

Completion keeps its meaning: a pull completes on the decode rank only when every chunk of
every staged peer is unpacked (and every zero-copy transfer is ``DONE``), then it notifies
``DONE`` as before; a push completes on the prefill rank when every chunk has crossed, and the
decode's ``expect`` completes only when every source sent ``DONE`` *and* every staged chunk is
unpacked.  A failed request releases its transfer handles at once; slots the peer might still
touch (granted ones, packed ones announced with ``RDY``) are held back until the peer says it
is done with them (``FAIL`` with ``rel``, a late ``ACK``/``DAT``), dies, or ``timeout_s``
passes, so a stale transfer can never corrupt a later request's chunk.
"""

from __future__ import annotations

import base64
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import nixl_compat
from .errors import TransferError, TransferFailedError
from .staging import BoundPages, FusedLaunch, StagingLayout, Stream, _triton_kernel, pack, unpack

if TYPE_CHECKING:  # pragma: no cover
    from .endpoint import Endpoint

__all__ = [
    "DEFAULT_STAGING_BYTES",
    "DEFAULT_STAGING_SLOTS",
    "MOVERS",
    "STRATEGIES",
    "SlotPool",
    "StagedCtx",
    "StagedEngine",
]

STRATEGIES = ("zero-copy", "staged", "auto")
MOVERS = ("reader", "writer", "alternate", "adaptive")
DEFAULT_STAGING_BYTES = 64 << 20
DEFAULT_STAGING_SLOTS = 4
_SLOT_ALIGN = 4096
#: A staged context that made no progress for this long sends its peer a ``PING``: NIXL
#: raises a remote-disconnect error on a send to a dead process, so a request waiting for a
#: dead peer fails within about a second instead of at its deadline.
PROBE_S = 0.5
_STAGED_MSGS = frozenset({"SREQ", "GNT", "RDY", "ACK", "DAT"})


def encode_ids(ids: np.ndarray) -> dict[str, str]:
    """Block ids as compact JSON: little-endian int32 (or int64) bytes in base64."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0 or (int(ids.max()) < 2**31 and int(ids.min()) >= 0):
        return {"d": "i4", "v": base64.b64encode(ids.astype("<i4").tobytes()).decode()}
    return {"d": "i8", "v": base64.b64encode(ids.astype("<i8").tobytes()).decode()}


def decode_ids(obj: Any) -> np.ndarray:
    if not isinstance(obj, dict) or obj.get("d") not in ("i4", "i8"):
        raise ValueError("malformed block ids")
    raw = base64.b64decode(str(obj.get("v", "")), validate=True)
    dt = "<i4" if obj["d"] == "i4" else "<i8"
    if len(raw) % np.dtype(dt).itemsize:
        raise ValueError("malformed block ids")
    return np.frombuffer(raw, dtype=dt).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Slots
# --------------------------------------------------------------------------------------------
class SlotPool:
    """The registered staging tensor, cut into equal slots handed out in turn."""

    def __init__(self, tensor: Any, slots: int) -> None:
        self.tensor = tensor
        nbytes = int(tensor.numel() * tensor.element_size())
        self.slot_bytes = (nbytes // slots) // _SLOT_ALIGN * _SLOT_ALIGN
        if self.slot_bytes < _SLOT_ALIGN:
            raise ValueError(
                f"staging buffer of {nbytes} bytes is too small for {slots} slots of at least "
                f"{_SLOT_ALIGN} bytes"
            )
        self.slots = slots
        self.addr = int(tensor.data_ptr())
        self.devid = (tensor.device.index or 0) if tensor.device.type == "cuda" else 0
        self.free: deque[int] = deque(range(slots))
        # slot -> (until, peer name, request id): held back after a failure
        self.held: dict[int, tuple[float, str, str]] = {}
        self.b8 = tensor.reshape(-1)

    def take(self) -> int | None:
        return self.free.popleft() if self.free else None

    def give(self, s: int) -> None:
        self.free.append(s)

    def hold(self, s: int, until: float, peer: str, rid: str) -> None:
        self.held[s] = (until, peer, rid)

    def release_held(
        self, *, now: float | None = None, peer: str | None = None, rid: str | None = None
    ) -> int:
        """Free held slots that expired (``now``) or belong to ``peer`` (and ``rid``)."""
        out = 0
        for s, (until, p, r) in list(self.held.items()):
            expired = now is not None and now >= until
            match = peer is not None and p == peer and (rid is None or r == rid)
            if expired or match:
                del self.held[s]
                self.free.append(s)
                out += 1
        return out

    def view(self, s: int, nbytes: int) -> Any:
        off = s * self.slot_bytes
        return self.b8[off : off + nbytes]

    def slot_addr(self, s: int) -> int:
        return self.addr + s * self.slot_bytes

    def info(self) -> dict[str, int]:
        return {
            "addr": self.addr,
            "nbytes": self.slots * self.slot_bytes,
            "devid": self.devid,
            "slots": self.slots,
            "slot_bytes": self.slot_bytes,
        }


class _PinnedRing:
    """Block ids on their way to the GPU: a pinned host ring and copies queued on the stream.

    ``torch.from_numpy(ids).to(device)`` copies from pageable memory and so waits for the
    GPU -- for every kernel already queued and, with several processes on one GPU, for their
    time slices (0.1-0.4 ms of host time per request measured on an H100); allocating pinned
    memory per request may synchronize too.  The ring is allocated once and each request's
    ids are ONE queued copy (no event: with several processes on one GPU every CUDA call
    costs 0.1-0.3 ms of host time).  Before the ring wraps, the device is synchronized, so
    every copy queued from it has read its bytes (once per ``capacity`` block ids).
    """

    def __init__(self, device: Any, capacity: int = 1 << 18) -> None:
        import torch

        self.device = device
        self.host = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
        self.np = self.host.numpy()
        self.pos = 0

    def to_device(self, ids: np.ndarray) -> Any:
        import torch

        n = int(ids.shape[0])
        if n > self.host.shape[0]:  # a huge request: a plain (synchronous) copy
            return torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)
        if self.pos + n > self.host.shape[0]:
            torch.cuda.synchronize(self.device)
            self.pos = 0
        a, b = self.pos, self.pos + n
        self.np[a:b] = ids
        self.pos = b
        with torch.cuda.device(self.device):
            out = torch.empty(n, dtype=torch.int64, device=self.device)
            out.copy_(self.host[a:b], non_blocking=True)
        return out


class _Fence:
    """Completion of queued device work (a CUDA event, taken from and given back to a pool:
    creating one is a driver call); host-memory work is already done."""

    __slots__ = ("ev", "pool")

    def __init__(self, device_type: str, pool: list[Any] | None = None) -> None:
        self.ev = None
        self.pool = pool
        if device_type == "cuda":
            import torch

            ev = pool.pop() if pool else torch.cuda.Event()
            ev.record()
            self.ev = ev

    def done(self) -> bool:
        if self.ev is None:
            return True
        if not self.ev.query():
            return False
        if self.pool is not None:
            self.pool.append(self.ev)
        self.ev = None
        return True


# --------------------------------------------------------------------------------------------
# Per (request, peer)
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _ChunkXfer:
    handle: Any
    chunk: int
    slot: int  # the local slot the transfer reads (WRITE) or fills (READ)
    nbytes: int
    state: str = "PROC"


@dataclass(eq=False, repr=False)
class StagedCtx:
    """One staged (request, peer): this side is the source ("src") or destination ("dst")."""

    req: Any
    peer: Any
    role: str
    layout: StagingLayout
    bound: BoundPages
    blocks: np.ndarray
    dev_blocks: Any
    stream: Stream
    launch: Any  # FusedLaunch of this context (GPU with triton; made at first use)
    chunk: int
    n: int
    total: int
    mover: str
    # destination
    next_grant: int = 0
    grants: dict[int, int] = field(default_factory=dict)  # chunk -> local slot
    reads: dict[int, _ChunkXfer] = field(default_factory=dict)
    unpacking: list[tuple[int, int, _Fence]] = field(default_factory=list)
    unpacked: int = 0
    # source
    ahead: bool = False  # made by ``expect(blocks=)``: packing before the peer's SREQ
    peer_grants: dict[int, int] = field(default_factory=dict)  # chunk -> remote slot
    next_pack: int = 0
    packing: list[tuple[int, int, _Fence]] = field(default_factory=list)
    packed: dict[int, int] = field(default_factory=dict)  # chunk -> local slot (no grant yet)
    waiting_ack: dict[int, int] = field(default_factory=dict)  # chunk -> local slot (RDY sent)
    to_write: dict[int, tuple[int, int]] = field(default_factory=dict)  # c -> (slot, remote)
    writes: dict[int, _ChunkXfer] = field(default_factory=dict)
    to_read: dict[int, int] = field(default_factory=dict)  # chunk -> remote slot (RDY got)
    landed: set[int] = field(default_factory=set)  # chunks in their slot, to unpack
    moved: int = 0
    last_progress: float = field(default_factory=time.monotonic)
    last_probe: float = 0.0

    def __repr__(self) -> str:
        return (
            f"StagedCtx({self.req.rid!r}, {self.peer.label}, {self.role}, "
            f"{self.unpacked if self.role == 'dst' else self.moved}/{self.n} chunks)"
        )

    def bounds(self, c: int) -> tuple[int, int]:
        s = c * self.chunk
        return s, min(s + self.chunk, self.total)

    def written_by_source(self, c: int) -> bool:
        if self.mover == "writer":
            return True
        if self.mover == "reader":
            return False
        return c % 2 == 0

    @property
    def complete(self) -> bool:
        return (self.unpacked if self.role == "dst" else self.moved) >= self.n

    def in_flight(self) -> bool:
        """Transfers of this context still running (this side is the mover)."""
        return any(x.state == "PROC" for x in (*self.reads.values(), *self.writes.values()))


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------
class StagedEngine:
    """Staging slots and staged contexts of one endpoint; driven by the endpoint's progress."""

    def __init__(self, ep: Endpoint, tensor: Any, slots: int, mover: str | None) -> None:
        self.ep = ep
        self.pool = SlotPool(tensor, slots)
        self.mem_type = ep.mem_type
        self.device_type = "cuda" if ep.mem_type == "VRAM" else "cpu"
        self.reg: Any = None
        self.mover_override = mover
        self.src: deque[StagedCtx] = deque()  # contexts that pack (round robin)
        self.dst: deque[StagedCtx] = deque()  # contexts that need grants (round robin)
        self.active: list[StagedCtx] = []
        self.layouts: dict[str, tuple[StagingLayout, BoundPages]] = {}  # by peer name
        # host seconds spent packing, unpacking and posting chunk transfers (on host memory a
        # transfer copies synchronously inside ``transfer()``; on GPUs these are launch costs)
        self.busy = {"pack_s": 0.0, "unpack_s": 0.0, "post_s": 0.0}
        # Heavy operations in arrival order: ("read" | "write" | "unpack", ctx, chunk).  On
        # host memory each one copies synchronously (a 16 MiB chunk: 1-2 ms), so a poll does
        # at most ``budget`` of them (chunks already on their way first, then a new pack) and
        # returns: notifications keep flowing and endpoints sharing a thread take turns.  On
        # GPUs they are launches and transfers posted asynchronously: no limit.
        self.todo: deque[tuple[str, StagedCtx, int]] = deque()
        #: (op, start, end) of every heavy operation when tracing (``trace = []``)
        self.trace: list[tuple[str, float, float]] | None = None
        self.budget = 1 if self.mem_type == "DRAM" else 1 << 30
        self._device = tensor.device if self.device_type == "cuda" else None
        self._ids_ring = _PinnedRing(tensor.device) if self._device is not None else None
        self._events: list[Any] = []  # CUDA events of finished fences, for reuse
        self._fused: bool | None = None  # pack/unpack as FusedLaunch (decided at first use)
        # contexts packed ahead (expect(blocks=)): made, taken up by the peer's SREQ, dropped
        self.ahead = {"made": 0, "taken": 0, "dropped": 0, "evicted": 0}

    def on_device(self) -> Any:
        """A context making the staging buffer's GPU current (kernels, events and copies
        go to its streams), so that endpoints on different GPUs can share a process."""
        if self._device is None:
            return contextlib.nullcontext()
        import torch

        return torch.cuda.device(self._device)

    def _t(self) -> float:
        return time.perf_counter() if self.trace is not None else 0.0

    def _span(self, what: str, t0: float) -> None:
        """A trace entry ``what`` from ``t0`` (a :meth:`_t`) to now, when tracing (``~``-names
        are spans nested in a heavy operation)."""
        if self.trace is not None:
            self.trace.append((what, t0, time.perf_counter()))

    def _mark(self, what: str, ctx: StagedCtx, c: int = -1) -> None:
        """A zero-length trace entry ``@what`` (message arrivals, finished kernels), so that a
        trace merged across processes reads as a timeline of the request."""
        if self.trace is not None:
            t = time.perf_counter()
            self.trace.append((f"@{what} {ctx.peer.label} c{c}", t, t))

    # -- set-up ----------------------------------------------------------------------------
    def register(self) -> None:
        arr = np.array([[self.pool.addr, self.pool.slots * self.pool.slot_bytes, self.pool.devid]])
        self.reg = self.ep.agent.register_memory(arr.astype(np.uint64), self.mem_type)

    def deregister(self) -> None:
        if self.reg is not None:
            try:
                self.ep.agent.deregister_memory(self.reg)
            except nixl_compat.nixl_errors():
                pass
            self.reg = None

    def forget_peer(self, name: str) -> None:
        self.layouts.pop(name, None)
        self.pool.release_held(peer=name)

    def layout_for(self, peer: Any) -> tuple[StagingLayout, BoundPages]:
        hit = self.layouts.get(peer.name)
        if hit is None:
            ep = self.ep
            d, p = (ep.rank, peer.rank) if ep.role == "decode" else (peer.rank, ep.rank)
            lay = StagingLayout.build(
                ep.plan,
                decode_rank=d,
                prefill_rank=p,
                layer_pages=[ep.kinds[k] for k in ep._layer_kinds],
            )
            hit = self.layouts[peer.name] = (lay, BoundPages(lay, ep._buffers, ep.role))
        return hit

    def default_mover(self, op: str) -> str:
        """Who copies the chunks of a request this endpoint initiates.

        Host memory: ``adaptive`` -- a CMA copy is done by the process that posts it, so the
        source writes a packed chunk itself only when it has nothing else to pack and lets
        the destination read it otherwise; on the 2-core box it matched or beat ``alternate``
        (even chunks written, odd ones read; +3 % and +6 % in two interleaved comparisons)
        and beat ``reader`` by ~20 %.  GPUs:
        ``writer`` -- the copy engines do the work whoever posts it, and the source posting
        as soon as a chunk is packed saves the RDY/ACK round trip (and does not depend on
        UCX_CUDA_IPC_ENABLE_GET_ZCOPY).
        """
        if self.mover_override is not None:
            return self.mover_override
        return "adaptive" if self.mem_type == "DRAM" else "writer"

    def chunk_bytes(self, peer: Any) -> int | None:
        """Chunk size with ``peer`` (the smaller slot of both sides); None: peer has no staging."""
        st = peer.staging
        if not st:
            return None
        return min(self.pool.slot_bytes, int(st["slot_bytes"]))

    # -- contexts --------------------------------------------------------------------------
    def new_ctx(
        self,
        req: Any,
        peer: Any,
        *,
        blocks: np.ndarray,
        layers: np.ndarray | None,
        chunk: int,
        mover: str,
        ahead: bool = False,
    ) -> StagedCtx:
        t0 = self._t()
        lay, bound = self.layout_for(peer)
        stream = lay.stream(int(blocks.shape[0]), layers)
        total = stream.total_bytes
        self._span("~new-ctx", t0)
        ctx = StagedCtx(
            req=req,
            peer=peer,
            role="src" if self.ep.role == "prefill" else "dst",
            layout=lay,
            bound=bound,
            blocks=blocks,
            dev_blocks=None,  # on the GPU: copied at the first pack or unpack (_device_ids)
            stream=stream,
            launch=None,
            chunk=chunk,
            n=math.ceil(total / chunk) if total else 0,
            total=total,
            mover=mover,
            ahead=ahead,
        )
        req.staged[peer.name] = ctx
        self.active.append(ctx)
        if ctx.role == "src":
            self.src.append(ctx)
        else:
            self.dst.append(ctx)
        return ctx

    def grant_initial(self, ctxs: list[StagedCtx]) -> dict[str, list[list[int]]]:
        """Hand free slots to new destination contexts in turn (the grants sent with SREQ)."""
        out: dict[str, list[list[int]]] = {c.peer.name: [] for c in ctxs}
        cap = self._grant_cap()
        progress = True
        while progress:
            progress = False
            for ctx in ctxs:
                if ctx.next_grant < ctx.n and len(ctx.grants) < cap:
                    s = self.pool.take()
                    if s is None:
                        return out
                    c = ctx.next_grant
                    ctx.grants[c] = s
                    ctx.next_grant += 1
                    out[ctx.peer.name].append([c, s])
                    progress = True
        return out

    def pack_ahead(self, req: Any, peer: Any, blocks: np.ndarray) -> StagedCtx:
        """A source context made when the request is ready (``expect(blocks=)``), before the
        peer asks: chunks are packed into free slots at once and cross when the peer's
        ``SREQ`` (with its grants) arrives and matches (all layers, the same block ids);
        otherwise (another selection, or the peer moves the bytes zero-copy) it is dropped."""
        chunk = self.chunk_bytes(peer) or 1
        self.ahead["made"] += 1
        return self.new_ctx(
            req,
            peer,
            blocks=blocks,
            layers=None,
            chunk=chunk,
            mover=self.default_mover("pull"),
            ahead=True,
        )

    def pack_now(self, budget: int | None = None) -> None:
        """On a GPU, launch packs into free slots at once (``budget``: at most that many)
        rather than at the next poll; on host memory packing copies, so it waits for the
        poll."""
        if self.mem_type != "DRAM":
            with self.on_device():
                self._pack_more(self.budget if budget is None else budget)

    def drop_ahead(self, req: Any, ctx: StagedCtx) -> None:
        """Forget a context packed ahead that its peer did not take up (its slots go back:
        a later pack into one is queued behind the kernel still writing it)."""
        self.ahead["dropped"] += 1
        if req.staged.get(ctx.peer.name) is ctx:
            del req.staged[ctx.peer.name]
        self._release_ctx(ctx, False, 0.0)

    def _grant_cap(self) -> int:
        waiting = sum(1 for c in self.dst if c.next_grant < c.n)
        return max(1, math.ceil(self.pool.slots / max(1, waiting)))

    # -- messages ----------------------------------------------------------------------------
    def sreq(self, ctx: StagedCtx, peer_blocks: np.ndarray, layers: np.ndarray | None, grants):
        return {
            "t": "SREQ",
            "r": ctx.req.rid,
            "b": encode_ids(peer_blocks),
            "l": None if layers is None else [int(x) for x in layers],
            "c": ctx.chunk,
            "n": ctx.n,
            "z": ctx.total,
            "m": ctx.mover,
            "g": grants,
        }

    def on_sreq(self, req: Any, peer: Any, msg: dict[str, Any]) -> None:
        """A peer staged a request with us (we are the passive side: ``expect``)."""
        ep = self.ep
        rid = req.rid
        old = req.staged.get(peer.name)
        if old is not None and not old.ahead:
            return  # a duplicate
        t_in = self._t()
        if self.trace is not None:
            self.trace.append((f"@sreq-in {peer.label}", t_in, t_in))
        try:
            blocks = decode_ids(msg.get("b"))
            layers = msg.get("l")
            if layers is not None:
                layers = ep._layers_arg(layers, rid)
            chunk = int(msg.get("c", 0))
            n = int(msg.get("n", -1))
            total = int(msg.get("z", -1))
            mover = msg.get("m")
            if mover not in MOVERS:
                raise ValueError(f"unknown mover {mover!r}")
            grants = [(int(c), int(s)) for c, s in (msg.get("g") or [])]
        except (TypeError, ValueError, KeyError) as e:
            self._refuse(req, peer, f"malformed staged request ({e})")
            return
        try:
            blocks = ep.local_block_ids(blocks, rid, peer=peer.label, unique=ep.role == "decode")
        except TransferError as e:
            self._refuse(req, peer, str(e))
            return
        if not 0 < chunk <= self.pool.slot_bytes:
            self._refuse(
                req,
                peer,
                f"chunk of {chunk} bytes does not fit a staging slot of {self.pool.slot_bytes}",
            )
            return
        self._span("~sreq-checks", t_in)
        if old is not None:
            if (
                layers is None
                and old.chunk == chunk
                and old.n == n
                and old.total == total
                and np.array_equal(old.blocks, blocks)
            ):
                old.ahead = False  # the request the source packed ahead: go on with it
                self.ahead["taken"] += 1
                old.mover = mover
                old.peer_grants.update(grants)
                self._mark("sreq-ahead", old)
                return
            self.drop_ahead(req, old)  # another selection of layers or blocks: start over
        ctx = self.new_ctx(req, peer, blocks=blocks, layers=layers, chunk=chunk, mover=mover)
        self._mark("sreq", ctx)
        if ctx.total != total or ctx.n != n:
            self._refuse(
                req,
                peer,
                f"staging stream mismatch: {peer.label} counts {total} bytes in {n} chunks, "
                f"this rank {ctx.total} bytes in {ctx.n} chunks",
            )
            return
        if ctx.role == "src":
            ctx.peer_grants.update(grants)
        elif not ctx.complete:
            g = self.grant_initial([ctx])[peer.name]
            if g:
                self._send(ctx, {"t": "GNT", "r": rid, "g": g})

    def _refuse(self, req: Any, peer: Any, why: str) -> None:
        self.ep._fail(
            req,
            TransferFailedError(
                f"{self.ep.label}: request {req.rid!r}: staged transfer with {peer.label} "
                f"refused: {why}",
                peer=peer.label,
                request_id=req.rid,
            ),
        )

    def on_msg(self, req: Any, peer: Any, msg: dict[str, Any]) -> None:
        t = msg.get("t")
        if t == "SREQ":
            with self.on_device():
                self.on_sreq(req, peer, msg)
            return
        ctx = req.staged.get(peer.name)
        if ctx is None:
            return
        try:
            if t == "GNT" and ctx.role == "src":
                self._mark("gnt", ctx)
                for c, s in msg.get("g") or []:
                    ctx.peer_grants[int(c)] = int(s)
            elif t == "RDY" and ctx.role == "dst":
                c = int(msg["c"])
                if c in ctx.grants and c not in ctx.reads and c not in ctx.to_read:
                    ctx.to_read[c] = int(msg["s"])
                    self.todo.append(("read", ctx, c))
            elif t == "ACK" and ctx.role == "src":
                s = ctx.waiting_ack.pop(int(msg["c"]), None)
                if s is not None:
                    self.pool.give(s)
                    ctx.moved += 1
            elif t == "DAT" and ctx.role == "dst":
                c = int(msg["c"])
                if (
                    c in ctx.grants
                    and c not in ctx.landed
                    and all(u[0] != c for u in ctx.unpacking)
                ):
                    ctx.landed.add(c)
                    self.todo.append(("unpack", ctx, c))
                    self._mark("dat", ctx, c)
        except (TypeError, ValueError, KeyError):
            return

    def on_stale(self, sender: str, msg: dict[str, Any]) -> None:
        """A staged message for a request that ended here: release slots it held back."""
        if msg.get("t") in ("ACK", "DAT") or (msg.get("t") == "FAIL" and msg.get("rel")):
            rid = msg.get("r")
            if isinstance(rid, str):
                self.pool.release_held(peer=sender, rid=rid)

    def _send(self, ctx: StagedCtx, msg: dict[str, Any]) -> bool:
        try:
            self.ep._send(ctx.peer.name, msg)
            return True
        except nixl_compat.nixl_errors() as e:
            self.ep._xfer_exception(ctx.req, ctx.peer, e, "notifying")
            return False

    # -- moving bytes -------------------------------------------------------------------------
    def _post(self, ctx: StagedCtx, op: str, x: _ChunkXfer, remote_slot: int) -> bool:
        """Post one chunk transfer (``initialize_xfer``, one row on each side).

        ``x`` is already in ``ctx.reads``/``ctx.writes`` so that a failure here (which fails
        the request and runs :meth:`finish`) finds its slot.  Returns False on failure.
        """
        ep = self.ep
        s, e = ctx.bounds(x.chunk)
        x.nbytes = nbytes = e - s
        loc = np.array([[self.pool.slot_addr(x.slot), nbytes, self.pool.devid]], np.uint64)
        st = ctx.peer.staging
        rem = np.array(
            [[int(st["addr"]) + remote_slot * int(st["slot_bytes"]), nbytes, int(st["devid"])]],
            np.uint64,
        )
        notif = b""
        if op == "WRITE":
            notif = _notif_bytes({"t": "DAT", "r": ctx.req.rid, "c": x.chunk})
        t0 = self._t()
        try:
            ld = ep.agent.get_xfer_descs(loc, self.mem_type)
            rd = ep.agent.get_xfer_descs(rem, ctx.peer.mem_type)
            x.handle = ep.agent.initialize_xfer(op, ld, rd, ctx.peer.name, notif)
        except nixl_compat.nixl_errors() as err:
            ep._xfer_exception(ctx.req, ctx.peer, err, "preparing")
            return False
        self._span("~xfer-init", t0)
        ep._stats["xfer_handles_created"] += 1
        t0 = time.perf_counter()
        try:
            x.state = ep.agent.transfer(x.handle)
        except nixl_compat.nixl_errors() as err:
            x.state = "ERR"
            ep._xfer_exception(ctx.req, ctx.peer, err, "posting")
            return False
        finally:
            self.busy["post_s"] += time.perf_counter() - t0
            self._span("~xfer-post", t0)
        ep._stats["transfers_posted"] += 1
        ep._stats["descriptors_posted"] += 1
        ep._stats["bytes_posted"] += nbytes
        ep._stats["chunk_transfers"] += 1
        ctx.req.descriptors += 1
        if x.state == "ERR":
            self._err(ctx, x)
            return False
        return True

    def _err(self, ctx: StagedCtx, x: _ChunkXfer) -> None:
        self.ep._fail(
            ctx.req,
            TransferFailedError(
                f"{self.ep.label}: request {ctx.req.rid!r}: NIXL reported ERR for staged chunk "
                f"{x.chunk} with {ctx.peer.label}",
                peer=ctx.peer.label,
                request_id=ctx.req.rid,
            ),
        )

    def _release(self, x: _ChunkXfer) -> None:
        if x.handle is None:
            return
        try:
            x.handle.release()
            self.ep._stats["xfer_handles_released"] += 1
        except nixl_compat.nixl_errors():
            self.ep._stats["release_errors"] += 1
        x.handle = None

    def _read(self, ctx: StagedCtx, c: int) -> None:
        remote_slot = ctx.to_read.pop(c)
        s = ctx.grants.get(c)
        if s is None or c in ctx.reads:
            return
        x = ctx.reads[c] = _ChunkXfer(None, c, s, 0, "INIT")
        self._post(ctx, "READ", x, remote_slot)

    def _write(self, ctx: StagedCtx, c: int) -> None:
        s, remote_slot = ctx.to_write.pop(c)
        x = ctx.writes[c] = _ChunkXfer(None, c, s, 0, "INIT")
        self._post(ctx, "WRITE", x, remote_slot)

    def _kernel_failed(self, ctx: StagedCtx, what: str, e: BaseException) -> None:
        self.ep._fail(
            ctx.req,
            TransferFailedError(
                f"{self.ep.label}: request {ctx.req.rid!r}: {what} for {ctx.peer.label} "
                f"failed: {type(e).__name__}: {e}",
                peer=None,
                request_id=ctx.req.rid,
            ),
        )

    def _device_ids(self, ctx: StagedCtx) -> Any:
        """The context's block ids on the GPU (None on host memory), copied on first use:
        a destination needs them only when its first chunk lands, so a pull sends its
        request before paying for the copy."""
        if ctx.dev_blocks is None and self._ids_ring is not None:
            for other in ctx.req.staged.values():  # another peer of the request, same ids
                if other.dev_blocks is not None and (
                    other.blocks is ctx.blocks or np.array_equal(other.blocks, ctx.blocks)
                ):
                    ctx.dev_blocks = other.dev_blocks
                    return ctx.dev_blocks
            t0 = self._t()
            ctx.dev_blocks = self._ids_ring.to_device(ctx.blocks)
            self._span("~ids-to-device", t0)
        return ctx.dev_blocks

    def _move(self, ctx: StagedCtx, s: int, a: int, b: int, fn: Any) -> None:
        """Pack (``fn`` = :func:`pack`) or unpack stream bytes ``[a, b)`` of ``ctx`` to or
        from slot ``s``: on a GPU with triton one launch of the context's
        :class:`FusedLaunch` (host time: the launch), elsewhere ``fn`` itself."""
        if self._fused is None:
            self._fused = self.device_type == "cuda" and _triton_kernel() is not None
        if not self._fused:
            fn(
                ctx.bound,
                ctx.layout,
                ctx.blocks,
                self.pool.view(s, b - a),
                self.ep.role,
                start=a,
                end=b,
                stream=ctx.stream,
                device_block_ids=self._device_ids(ctx),
            )
            return
        if ctx.launch is None:
            ctx.launch = FusedLaunch(ctx.bound, ctx.stream, into_stage=fn is pack)
        ctx.launch(self.pool.view(s, b - a), a, b, self._device_ids(ctx))

    def _launch(self, ctx: StagedCtx, c: int, s: int, fn: Any) -> None:
        """Pack (``fn`` = :func:`pack`) or unpack chunk ``c`` through slot ``s``, count it
        and fence it (``ctx.packing`` / ``ctx.unpacking``); a kernel failure fails the
        request (a pack's slot goes back first: it is not the context's yet)."""
        what = "pack" if fn is pack else "unpack"
        a, b = ctx.bounds(c)
        t0 = time.perf_counter()
        try:
            self._move(ctx, s, a, b, fn)
        except Exception as e:  # noqa: BLE001 - a kernel failure fails the request
            if fn is pack:
                self.pool.give(s)
            self._kernel_failed(ctx, f"{what}ing staged chunk {c}", e)
            return
        self.busy[f"{what}_s"] += time.perf_counter() - t0
        self._span(f"~{what}-call", t0)
        t0 = self._t()
        self.ep._stats[f"chunks_{what}ed"] += 1
        self.ep._stats[f"bytes_{what}ed"] += b - a
        fences = ctx.packing if fn is pack else ctx.unpacking
        fences.append((c, s, _Fence(self.device_type, self._events)))
        self._span("~fence", t0)

    # -- progress -----------------------------------------------------------------------------
    def pump(self, now: float) -> None:
        """One round of staged work: transfers, unpacks, packs, grants; then held slots."""
        with self.on_device():
            self._pump(now)

    def _pump(self, now: float) -> None:
        if self.pool.held:
            self.pool.release_held(now=now)
        for ctx in list(self.active):
            if ctx.req.rid not in self.ep._requests or ctx.req.staged.get(ctx.peer.name) is not ctx:
                continue
            before = _progress_mark(ctx)
            if ctx.role == "dst":
                self._pump_dst(ctx)
            else:
                self._pump_src(ctx)
            if _progress_mark(ctx) != before:
                ctx.last_progress = now
            elif (
                not ctx.complete
                and now - ctx.last_progress > PROBE_S
                and now - ctx.last_probe > PROBE_S
                and ctx.req.rid in self.ep._requests
            ):
                ctx.last_probe = now
                self._send(ctx, {"t": "PING"})
        budget = self._do_todo(self.budget)
        if budget > 0:
            self._pack_more(budget)
        self._grant_more()

    def _do_todo(self, budget: int) -> int:
        """Run queued reads, writes and unpacks (oldest first) within ``budget``."""
        while self.todo and budget > 0:
            kind, ctx, c = self.todo.popleft()
            if ctx.req.rid not in self.ep._requests or ctx.req.staged.get(ctx.peer.name) is not ctx:
                continue  # the request ended; finish() released its slots
            t0 = self._t()
            if kind == "read":
                if c not in ctx.to_read:
                    continue
                self._read(ctx, c)
            elif kind == "write":
                if c not in ctx.to_write:
                    continue
                self._write(ctx, c)
            else:
                if c not in ctx.landed:
                    continue
                ctx.landed.discard(c)
                # (the slot stays the context's: finish() frees it on failure)
                self._launch(ctx, c, ctx.grants[c], unpack)
            self._span(kind, t0)
            budget -= 1
        return budget

    def _settle(self, ctx: StagedCtx, xs: dict[int, _ChunkXfer], c: int, mark: str) -> bool | None:
        """Poll chunk transfer ``c`` of ``xs`` (``ctx.reads`` or ``ctx.writes``): None when
        the request failed (reported), True when it finished (marked, its handle released,
        removed from ``xs``), False while it runs."""
        x = xs[c]
        if x.state == "PROC":
            try:
                x.state = self.ep.agent.check_xfer_state(x.handle)
            except nixl_compat.nixl_errors() as e:
                self.ep._xfer_exception(ctx.req, ctx.peer, e, "checking")
                return None
        if x.state == "ERR":
            self._err(ctx, x)
            return None
        if x.state != "DONE":
            return False
        self._mark(mark, ctx, c)
        self._release(x)
        del xs[c]
        return True

    def _pump_dst(self, ctx: StagedCtx) -> None:
        for c in list(ctx.reads):
            done = self._settle(ctx, ctx.reads, c, "read")
            if done is None:
                return
            if done:
                ctx.landed.add(c)
                self.todo.append(("unpack", ctx, c))
                if not self._send(ctx, {"t": "ACK", "r": ctx.req.rid, "c": c}):
                    return
        if ctx.unpacking:
            keep = []
            for c, s, fence in ctx.unpacking:
                if fence.done():
                    self._mark("unpacked", ctx, c)
                    del ctx.grants[c]
                    self.pool.give(s)
                    ctx.unpacked += 1
                else:
                    keep.append((c, s, fence))
            ctx.unpacking = keep

    def _pump_src(self, ctx: StagedCtx) -> None:
        for c, x in list(ctx.writes.items()):
            done = self._settle(ctx, ctx.writes, c, "written")
            if done is None:
                return
            if done:
                self.pool.give(x.slot)
                ctx.moved += 1
        i = 0
        while i < len(ctx.packing):
            c, s, fence = ctx.packing[i]
            if not fence.done():
                i += 1
                continue
            del ctx.packing[i]
            self._mark("packed", ctx, c)
            ctx.packed[c] = s
        # a packed chunk crosses once the destination granted it a slot
        for c in [c for c in ctx.packed if c in ctx.peer_grants]:
            s = ctx.packed.pop(c)
            if ctx.mover == "adaptive":
                write = not self._more_to_pack()
            else:
                write = ctx.written_by_source(c)
            if write:
                ctx.to_write[c] = (s, ctx.peer_grants.pop(c))
                self.todo.append(("write", ctx, c))
            else:
                ctx.peer_grants.pop(c, None)
                ctx.waiting_ack[c] = s
                if not self._send(ctx, {"t": "RDY", "r": ctx.req.rid, "c": c, "s": s}):
                    return

    def _more_to_pack(self) -> bool:
        """Could this (source) side pack another chunk of a requested context right now?
        The ``adaptive`` mover writes a packed chunk itself only when it could not: packing
        is the source's job alone and unpacking the destination's, the copy in between goes
        to whichever side would otherwise wait (on host memory each copy costs the process
        that posts it).  Contexts packed ahead do not count: they only use spare slots."""
        if not self.pool.free:
            return False
        return self._next_to_pack(ahead=False) is not None

    def _next_to_pack(self, *, ahead: bool) -> StagedCtx | None:
        """The next source context (in turn) with a chunk to pack: among the requested ones
        (``ahead=False``) a chunk the destination granted (packing only granted chunks is
        what keeps slots on both sides from waiting on each other), among those packed
        ahead any chunk."""
        for _ in range(len(self.src)):
            ctx = self.src[0]
            self.src.rotate(-1)
            if ctx.ahead != ahead or ctx.req.rid not in self.ep._requests:
                continue
            c = ctx.next_pack
            if c < ctx.n and (ahead or c in ctx.peer_grants):
                return ctx
        return None

    def _pack_more(self, budget: int) -> None:
        """Pack granted chunks into free source slots, one context after the other.

        Contexts packed ahead (``expect(blocks=)``) pack before any grant, but only into
        slots nobody else wants: a granted chunk that finds no free slot takes back the slot
        of the newest chunk packed without a grant (packed again later), so chunks packed
        speculatively can never hold up one that was asked for."""
        while self.src and budget > 0:
            ctx = self._next_to_pack(ahead=False)
            if ctx is not None:
                s = self.pool.take()
                if s is None:
                    s = self._evict_speculative()
                    if s is None:
                        break
            else:
                ctx = self._next_to_pack(ahead=True)
                if ctx is None or not self.pool.free:
                    break
                s = self.pool.take()
            c = ctx.next_pack
            ctx.next_pack += 1
            t0 = self._t()
            self._launch(ctx, c, s, pack)
            self._span("pack", t0)
            budget -= 1
        self._prune(self.src)

    def _evict_speculative(self) -> int | None:
        """A slot taken back from the newest chunk packed without a grant (a context packed
        ahead, or one taken up since whose destination has not granted that chunk yet);
        packed or still packing, the next pack into the slot is queued behind it.  The chunk
        is packed again later."""
        for ctx in reversed(self.active):
            if ctx.role != "src" or ctx.next_pack == 0:
                continue
            c = ctx.next_pack - 1
            if c in ctx.peer_grants:
                continue
            s = ctx.packed.pop(c, None)
            if s is None:
                for i, (ci, si, _f) in enumerate(ctx.packing):
                    if ci == c:
                        s = si
                        del ctx.packing[i]
                        break
            if s is None:
                continue
            ctx.next_pack = c
            if not any(x is ctx for x in self.src):
                self.src.append(ctx)  # (pruned once fully packed)
            self.ahead["evicted"] += 1
            return s
        return None

    def _grant_more(self) -> None:
        """Hand free slots to destination contexts waiting for grants, one after the other."""
        if not self.dst:
            return
        pending: dict[int, tuple[StagedCtx, list[list[int]]]] = {}
        cap = self._grant_cap()
        while self.pool.free:
            given = False
            for _ in range(len(self.dst)):
                ctx = self.dst[0]
                self.dst.rotate(-1)
                if ctx.req.rid not in self.ep._requests:
                    continue
                if ctx.next_grant < ctx.n and len(ctx.grants) < cap:
                    s = self.pool.take()
                    c = ctx.next_grant
                    ctx.grants[c] = s
                    ctx.next_grant += 1
                    pending.setdefault(id(ctx), (ctx, []))[1].append([c, s])
                    given = True
                    break
            if not given:
                break
        for ctx, g in pending.values():
            if ctx.req.rid in self.ep._requests:
                self._send(ctx, {"t": "GNT", "r": ctx.req.rid, "g": g})
        self._prune(self.dst)

    def _prune(self, q: deque[StagedCtx]) -> None:
        for ctx in list(q):
            gone = (
                ctx.req.rid not in self.ep._requests or ctx.req.staged.get(ctx.peer.name) is not ctx
            )
            done = (ctx.next_grant if ctx.role == "dst" else ctx.next_pack) >= ctx.n
            if gone or done:
                _discard(q, ctx)

    # -- endings ------------------------------------------------------------------------------
    def finish(self, req: Any, failed: bool, now: float) -> bool:
        """Release what the request's contexts hold.

        On success every slot goes back.  On failure, slots the (live) peer may still touch
        are held back: on the destination the granted slots (the source may still WRITE
        into them), on the source the slots announced with ``RDY`` (the destination may
        still READ them).  Returns True when none of this side's WRITEs into the peer's
        slots is still running (the ``rel`` flag of ``FAIL``: the peer may reuse them).
        """
        clean = True
        until = now + self.ep.timeout_s
        for ctx in req.staged.values():
            clean = self._release_ctx(ctx, failed and ctx.peer.alive, until) and clean
        return clean

    def _release_ctx(self, ctx: StagedCtx, hold: bool, until: float) -> bool:
        """Take ``ctx`` out of the queues, release its transfer handles and its slots (those
        the peer may still touch held back until ``until`` when ``hold``); True when none of
        its WRITEs into the peer's slots is still running."""
        for q in (self.active, self.src, self.dst):
            _discard(q, ctx)
        clean = not any(x.state == "PROC" for x in ctx.writes.values()) or not ctx.peer.alive
        for xs in (ctx.reads, ctx.writes):
            for x in xs.values():
                self._release(x)
        held: set[int] = set()
        free: set[int] = set()
        if ctx.role == "dst":
            unpacking = {s for _, s, _ in ctx.unpacking}
            for s in ctx.grants.values():
                (held if hold and s not in unpacking else free).add(s)
        else:
            free.update(s for _, s, _ in ctx.packing)
            free.update(ctx.packed.values())
            free.update(x.slot for x in ctx.writes.values())
            free.update(s for s, _ in ctx.to_write.values())
            for s in ctx.waiting_ack.values():
                (held if hold else free).add(s)
        for s in free - held:
            self.pool.give(s)
        for s in held:
            self.pool.hold(s, until, ctx.peer.name, ctx.req.rid)
        for part in (
            ctx.reads,
            ctx.writes,
            ctx.grants,
            ctx.unpacking,
            ctx.packing,
            ctx.packed,
            ctx.waiting_ack,
            ctx.to_write,
            ctx.to_read,
            ctx.landed,
        ):
            part.clear()
        return clean

    def peer_gone(self, name: str) -> None:
        """A dead (or replaced) peer cannot touch our slots any more."""
        self.pool.release_held(peer=name)

    def stats(self) -> dict[str, int]:
        return {
            "staging_slots_free": len(self.pool.free),
            "staging_slots_held": len(self.pool.held),
            **{f"staged_ahead_{k}": v for k, v in self.ahead.items()},
            **{f"staged_{k}": round(v, 6) for k, v in self.busy.items()},
        }


def _progress_mark(ctx: StagedCtx) -> tuple[int, ...]:
    return (
        ctx.unpacked,
        ctx.moved,
        ctx.next_pack,
        ctx.next_grant,
        len(ctx.peer_grants),
        len(ctx.reads),
        len(ctx.writes),
        len(ctx.unpacking),
        len(ctx.packing),
        len(ctx.packed),
        len(ctx.to_read),
        len(ctx.to_write),
        len(ctx.landed),
    )


def _discard(q: Any, item: Any) -> None:
    """Remove ``item`` (by identity) if present (``deque.remove`` formats a repr on a miss)."""
    for i, x in enumerate(q):
        if x is item:
            del q[i]
            return


def _notif_bytes(msg: dict[str, Any]) -> bytes:
    import json

    return b"LC1 " + json.dumps(msg).encode()


def is_staged_msg(t: Any) -> bool:
    return t in _STAGED_MSGS
