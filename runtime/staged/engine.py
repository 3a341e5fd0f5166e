"""The staged strategy (docs/design.md §6): pack into a registered staging buffer, one transfer per
chunk, unpack at the peer.

The source rank (always the prefill side) packs every byte one request sends to one peer into
its registered staging buffer, chunk by chunk; each chunk crosses with ONE NIXL transfer into
the destination's staging buffer (always the decode side), which unpacks it into its pages.
Pack and unpack are :func:`~layoutc.runtime.staging.pack` / ``unpack`` over a
:class:`~layoutc.runtime.staging.StagingLayout` of the (decode rank, prefill rank) pair, so
both sides agree on the stream order (rows outer, blocks inner).

Staging buffer and slots
------------------------
Each endpoint allocates ONE staging tensor (``staging_bytes``, default 64 MiB, on the
endpoint's device) when it registers its layers, registers it once, and publishes its address
and slot size in the handshake header.  The buffer is cut into ``staging_slots`` equal slots
(default 4); a chunk is at most one slot of either side.  On the source a slot holds one packed
chunk until it has crossed; on the destination it holds one chunk from the moment it is
*granted* until it is unpacked.  Slots are shared by every peer and request, handed out in
turn, and reused for the life of the endpoint.

Protocol (messages of :mod:`~layoutc.runtime.protocol`; the initiator decides the strategy)
---------------------------------------------------------------------------------------------
* ``SREQ`` -- initiator to peer: the request is staged with this peer.  Carries the *peer's*
  block ids, the layers, chunk size, chunk count, stream bytes (both sides compute them and
  must agree), the mover policy, and (when the initiator is the destination) the first grants.
  A passive endpoint acts on it once its ``expect()`` marked the request ready.
* ``GNT`` -- destination to source: chunk ``c`` may land in destination slot ``s``.
* The source packs a granted chunk into one of its slots, then either WRITEs it into the
  granted slot with ``DAT`` attached (the notification arrives after the data), or sends
  ``RDY`` (chunk ``c`` is packed in source slot ``s``) and the destination READs it and
  answers ``ACK`` (the source slot is free again).  Who moves each chunk (``mover``):
  ``reader`` (the destination READs every chunk), ``writer`` (the source WRITEs every chunk),
  ``alternate`` (even chunks written, odd chunks read), or ``adaptive`` (the source writes a
  chunk itself only when it has nothing else to pack; the default on host memory, where the
  copy through the kernel (CMA) costs the process that posts it, so pack, copy and unpack
  balance over two cores).  On GPUs the source writes every chunk (no RDY/ACK round trip).
* Pipelining: pack and unpack run on lanes of their own (:mod:`.lanes`: a CUDA stream each on
  GPUs, inline or a worker thread each on host memory) beside NIXL's transfers, so chunk
  ``k + 1`` packs while chunk ``k`` crosses and chunk ``k - 1`` unpacks, within the slots both
  sides have (the grants are the back-pressure).  With host staging beside GPU pages
  (:mod:`.memory`) a pack is a kernel into a device bounce buffer plus a copy to host memory,
  an unpack the reverse, each on its lane's stream.
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

import contextlib
import math
import time
from collections import deque
from typing import Any

import numpy as np

from .. import nixl_compat
from ..costmodel import CostModel
from ..endpoint.host import Host, JobPart, PeerJob
from ..endpoint.peers import Peer
from ..endpoint.requests import Request
from ..errors import TransferError, TransferFailedError, UsageError
from ..protocol import MOVERS, Ack, Dat, Done, Fail, Gnt, Message, Ping, Rdy, SReq
from ..staging import BoundPages, FusedLaunch, StagingLayout, count_ops, pack, triton_kernel, unpack
from .context import ChunkXfer, StagedCtx, progress_mark
from .lanes import LANE_KINDS, Fence, Lane, default_lanes, make_lane
from .memory import STAGING_MEMORY, StagingMemory
from .slots import PinnedRing, SlotPool

__all__ = [
    "DEFAULT_STAGING_BYTES",
    "DEFAULT_STAGING_SLOTS",
    "MOVERS",
    "Staged",
    "check_staged_options",
]

DEFAULT_STAGING_BYTES = 64 << 20
DEFAULT_STAGING_SLOTS = 4
#: A staged context that made no progress for this long sends its peer a ``PING``: NIXL
#: raises a remote-disconnect error on a send to a dead process, so a request waiting for a
#: dead peer fails within about a second instead of at its deadline.
PROBE_S = 0.5


def check_staged_options(device_type: str, memory: str, lanes: str | None) -> None:
    """Refuse (:class:`UsageError`) staging options that do not fit pages on
    ``device_type`` (``"cpu"`` or ``"cuda"``)."""
    if memory not in STAGING_MEMORY:
        raise UsageError(
            f"staging_memory must be one of {', '.join(STAGING_MEMORY)}, got {memory!r}"
        )
    if lanes is None:
        return
    if lanes not in LANE_KINDS:
        raise UsageError(f"staged_lanes must be one of {', '.join(LANE_KINDS)}, got {lanes!r}")
    want = {"cuda": ("stream", "inline"), "cpu": ("thread", "inline")}[device_type]
    if lanes not in want:
        raise UsageError(
            f"staged_lanes {lanes!r} does not run {'GPU' if device_type == 'cuda' else 'host'} "
            f"pages (use one of {', '.join(want)})"
        )


class Staged:
    """Staging slots and staged contexts of one endpoint (implements
    :class:`~layoutc.runtime.endpoint.host.Strategy`); driven by the endpoint's progress."""

    name = "staged"

    def __init__(
        self,
        host: Host,
        memory: StagingMemory,
        slots: int,
        mover: str | None,
        cost_model: CostModel,
        lanes: str | None = None,
    ) -> None:
        self.host = host
        self.tel = host.telemetry
        self.cost_model = cost_model
        self.memory = memory
        self.pool = SlotPool(memory.tensor, slots, mem_type=memory.mem_type)
        self.mem_type = host.mem_type  # the pages'
        self.device_type = "cuda" if host.mem_type == "VRAM" else "cpu"
        #: GPU pages, host staging: pack = kernel into a device bounce buffer + copy to host
        self.bounce = bool(memory.bounce) and self.device_type == "cuda"
        self.reg: Any = None
        self.mover_override = mover
        # request id -> (peer name, kind) -> context
        self.ctxs: dict[str, dict[tuple[str, str | None], StagedCtx]] = {}
        self.src: deque[StagedCtx] = deque()  # contexts that pack (round robin)
        self.dst: deque[StagedCtx] = deque()  # contexts that need grants (round robin)
        self.active: list[StagedCtx] = []
        self.layouts: dict[str, tuple[StagingLayout, BoundPages]] = {}  # by peer name
        # host seconds spent packing, unpacking and posting chunk transfers (on host memory a
        # transfer copies synchronously inside ``transfer()``; on GPUs these are launch costs)
        self.busy_s = {"pack_s": 0.0, "unpack_s": 0.0, "post_s": 0.0}
        # Pack and unpack run on lanes (``lanes``): CUDA streams on GPUs, inline (in the
        # poll) or worker threads on host memory; a chunk's transfer is NIXL's.
        self.lane_kind = lanes or default_lanes(self.device_type)
        self._device = memory.device if self.device_type == "cuda" else None
        self.lanes: dict[str, Lane] = {
            what: make_lane(self.lane_kind, what, self.device_type, self._device)
            for what in ("pack", "unpack")
        }
        # Heavy operations in arrival order: ("read" | "write" | "unpack", ctx, chunk).  A
        # poll does at most ``budget`` of those that block it (chunks already on their way
        # first, then a new pack) and returns, so notifications keep flowing and endpoints
        # sharing a thread take turns: a transfer between host buffers copies inside
        # ``transfer()`` (CMA: a 16 MiB chunk takes 1-2 ms), and so does an inline pack or
        # unpack on host memory.  Launches on an asynchronous lane and GPU transfers do not
        # block: no limit.
        self.todo: deque[tuple[str, StagedCtx, int]] = deque()
        self.budget = 1
        self.blocking_xfers = self.pool.mem_type == "DRAM"
        self.blocking_kernels = not self.lanes["pack"].asynchronous
        self._bounce_bufs: dict[str, Any] = {}  # lane -> device buffer of one slot (bounce)
        # slots whose pack or unpack still runs after their request ended: freed once done
        self.draining: list[tuple[Fence, int]] = []
        self._ids_ring = PinnedRing(self._device) if self._device is not None else None
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

    def _mark(self, what: str, ctx: StagedCtx, c: int = -1) -> None:
        """A trace mark of ``ctx`` (message arrivals, finished kernels)."""
        if self.tel.trace is not None:
            self.tel.mark(f"{what} {ctx.peer.label} c{c}")

    def _current(self, ctx: StagedCtx) -> bool:
        """Is ``ctx`` still the live context of its (request, peer)?"""
        return self.host.active(ctx.req) and self.ctxs.get(ctx.req.rid, {}).get(ctx.key) is ctx

    # -- set-up ----------------------------------------------------------------------------
    def register(self) -> None:
        arr = np.array([[self.pool.addr, self.pool.slots * self.pool.slot_bytes, self.pool.devid]])
        self.reg = self.host.agent.register_memory(arr.astype(np.uint64), self.pool.mem_type)

    def close(self) -> None:
        if self.reg is not None:
            try:
                self.host.agent.deregister_memory(self.reg)
            except nixl_compat.nixl_errors():
                pass
            self.reg = None
        for lane in self.lanes.values():
            lane.close()  # (a thread lane finishes the work it was given)
        for fence, _s in self.draining:
            fence.wait(5.0)
        self.draining.clear()
        if self._device is not None:
            import torch

            torch.cuda.synchronize(self._device)  # no copy touches the staging buffer now
        self.memory.release()

    def advertise(self) -> dict[str, Any]:
        return {"staging": self.pool.info()}

    def forget_peer(self, peer: Peer) -> None:
        self.layouts.pop(peer.name, None)
        self.pool.release_held(peer=peer.name)

    def peer_dead(self, peer: Peer) -> None:
        """A dead (or replaced) peer cannot touch our slots any more."""
        self.pool.release_held(peer=peer.name)

    def layout_for(self, peer: Peer) -> tuple[StagingLayout, BoundPages]:
        hit = self.layouts.get(peer.name)
        if hit is None:
            host = self.host
            d, p = host.pair_ranks(peer)
            lay = StagingLayout.build(
                host.plan_for(peer), decode_rank=d, prefill_rank=p, layer_pages=host.layer_pages()
            )
            hit = self.layouts[peer.name] = (lay, BoundPages(lay, host.buffers(), host.role))
        return hit

    def default_mover(self) -> str:
        """Who copies the chunks of a request this endpoint initiates.

        Host memory: ``adaptive`` -- a CMA copy is done by the process that posts it, so the
        source writes a packed chunk itself only when it has nothing else to pack and lets
        the destination read it otherwise (docs/benchmarks.md compares the policies).  GPUs:
        ``writer`` -- the copy engines do the work whoever posts it, and the source posting
        as soon as a chunk is packed saves the RDY/ACK round trip (and does not depend on
        UCX_CUDA_IPC_ENABLE_GET_ZCOPY); with host staging (``bounce``) too: a link carries
        what the source sends, and the source's one process posting every chunk is what a
        single descriptor over the same link does.
        """
        if self.mover_override is not None:
            return self.mover_override
        return "adaptive" if self.mem_type == "DRAM" else "writer"

    def chunk_bytes(self, peer: Peer) -> int | None:
        """Chunk size with ``peer`` (the smaller slot of both sides); None: peer has no staging."""
        st = peer.staging
        if st is None:
            return None
        return min(self.pool.slot_bytes, st.slot_bytes)

    def kernel(self) -> str:
        """How pack/unpack run here (for the cost model's count of kernel calls)."""
        if self.mem_type == "DRAM":
            return "per-row"
        return "fused" if triton_kernel() is not None else "grouped"

    # -- choosing -------------------------------------------------------------------------------
    def estimate(self, job: PeerJob) -> float | None:
        chunk = self.chunk_bytes(job.peer)
        if chunk is None:
            return None
        lay, _ = self.layout_for(job.peer)
        n_chunks = n_ops = 0
        for part in job.parts:
            n_rows = int(job.table.row_nbytes[part.rows].shape[0])
            c = -(-part.nbytes // chunk)
            g = lay.groups_for_layers(part.layers)
            n_groups = lay.num_groups if g is None else int(g.shape[0])
            n_chunks += c
            n_ops += count_ops(self.kernel(), n_rows, n_groups, c)
        return self.cost_model.staged_s(job.nbytes, n_chunks, n_ops, bounce=self.bounce)

    # -- contexts --------------------------------------------------------------------------
    def new_ctx(
        self,
        req: Request,
        peer: Peer,
        *,
        kind: str | None,
        blocks: np.ndarray,
        layers: np.ndarray | None,
        chunk: int,
        mover: str,
        ahead: bool = False,
    ) -> StagedCtx:
        t0 = self.tel.clock()
        lay, bound = self.layout_for(peer)
        stream = lay.stream(int(blocks.shape[0]), layers)
        total = stream.total_bytes
        self.tel.span("~new-ctx", t0)
        ctx = StagedCtx(
            req=req,
            peer=peer,
            kind=kind,
            layers=layers,
            role="src" if self.host.role == "prefill" else "dst",
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
            ready=self.lanes["pack" if self.host.role == "prefill" else "unpack"].ready(),
        )
        self.ctxs.setdefault(req.rid, {})[ctx.key] = ctx
        self.active.append(ctx)
        if ctx.role == "src":
            self.src.append(ctx)
        else:
            self.dst.append(ctx)
        return ctx

    def start(self, req: Request, jobs: list[PeerJob]) -> None:
        """Contexts for the request's staged peers, the first grants (on a destination), then
        one ``SREQ`` per peer."""
        if not jobs:
            return
        t0 = self.tel.clock()
        made: list[tuple[StagedCtx, JobPart]] = []
        for job in jobs:
            for part in job.parts:
                if part.nbytes == 0:
                    continue
                ctx = self.new_ctx(
                    req,
                    job.peer,
                    kind=part.kind,
                    blocks=part.local,
                    layers=part.layers,
                    chunk=self.chunk_bytes(job.peer) or 1,
                    mover=self.default_mover(),
                )
                req.nbytes += ctx.total
                req.chunks += ctx.n
                made.append((ctx, part))
        grants = self.grant_initial([c for c, _ in made]) if self.host.role == "decode" else {}
        for ctx, part in made:
            msg = SReq(
                rid=req.rid,
                kind=part.kind,
                blocks=part.remote,
                layers=None if part.layers is None else tuple(int(x) for x in part.layers),
                chunk=ctx.chunk,
                n=ctx.n,
                total=ctx.total,
                mover=ctx.mover,
                grants=tuple(grants.get(ctx.key, [])),
            )
            try:
                self.host.send(ctx.peer, msg)
            except nixl_compat.nixl_errors() as e:
                self.host.peer_error(req, ctx.peer, e, "requesting")
                return
        self.tel.span("~start-sreq", t0)

    def grant_initial(
        self, ctxs: list[StagedCtx]
    ) -> dict[tuple[str, str | None], list[tuple[int, int]]]:
        """Hand free slots to new destination contexts in turn (the grants sent with SREQ)."""
        out: dict[tuple[str, str | None], list[tuple[int, int]]] = {c.key: [] for c in ctxs}
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
                    out[ctx.key].append((c, s))
                    progress = True
        return out

    def prepare(self, job: PeerJob) -> None:
        """Pack ahead: a source context made when the request is ready (``expect(blocks=)``),
        before the peer asks: chunks are packed into free slots at once and cross when the
        peer's ``SREQ`` (with its grants) arrives and matches (all layers, the same block
        ids); otherwise (another selection, or the peer moves the bytes zero-copy) it is
        dropped."""
        mine = self.ctxs.get(job.req.rid, {})
        for part in job.parts:
            if (job.peer.name, part.kind) in mine or part.nbytes == 0:
                continue
            self.ahead["made"] += 1
            self.new_ctx(
                job.req,
                job.peer,
                kind=part.kind,
                blocks=part.local,
                layers=part.layers,
                chunk=self.chunk_bytes(job.peer) or 1,
                mover=self.default_mover(),
                ahead=True,
            )
        self.pack_now(1)  # its first chunk now (on its GPU); the rest as polls go

    def pack_now(self, budget: int | None = None) -> None:
        """On an asynchronous lane (a GPU stream, a thread), submit packs into free slots at
        once (``budget``: at most that many) rather than at the next poll; an inline pack
        copies, so it waits for the poll."""
        if not self.blocking_kernels:
            with self.on_device():
                self._pack_more(1 << 30 if budget is None else budget, count=True)

    def drop_ahead(self, req: Request, ctx: StagedCtx) -> None:
        """Forget a context packed ahead that its peer did not take up (its slots go back:
        a later pack into one is queued behind the kernel still writing it)."""
        self.ahead["dropped"] += 1
        mine = self.ctxs.get(req.rid, {})
        if mine.get(ctx.key) is ctx:
            del mine[ctx.key]
        self._release_ctx(ctx, False, 0.0)

    def _grant_cap(self) -> int:
        waiting = sum(1 for c in self.dst if c.next_grant < c.n)
        return max(1, math.ceil(self.pool.slots / max(1, waiting)))

    # -- messages ----------------------------------------------------------------------------
    def on_message(self, req: Request, peer: Peer, msg: Message) -> None:
        if isinstance(msg, SReq):
            with self.on_device():
                self._on_sreq(req, peer, msg)
            return
        if isinstance(msg, Done):
            for other in list(self.ctxs.get(req.rid, {}).values()):
                if other.peer is peer and other.ahead:
                    self.drop_ahead(req, other)  # the reader moved the bytes zero-copy
            return
        if not isinstance(msg, Gnt | Rdy | Ack | Dat):
            return
        ctx = self.ctxs.get(req.rid, {}).get((peer.name, msg.kind))
        if ctx is None:
            return
        if isinstance(msg, Gnt) and ctx.role == "src":
            self._mark("gnt", ctx)
            for c, s in msg.grants:
                if c < ctx.n and s < ctx.peer_slots():
                    ctx.peer_grants[c] = s
        elif isinstance(msg, Rdy) and ctx.role == "dst":
            c = msg.chunk
            if c in ctx.grants and c not in ctx.reads and c not in ctx.to_read:
                if msg.slot < ctx.peer_slots():
                    ctx.to_read[c] = msg.slot
                    self.todo.append(("read", ctx, c))
        elif isinstance(msg, Ack) and ctx.role == "src":
            if msg.chunk in ctx.waiting_ack:
                self._mark("acked", ctx, msg.chunk)
                self.pool.give(ctx.waiting_ack.pop(msg.chunk))
                ctx.moved += 1
        elif isinstance(msg, Dat) and ctx.role == "dst":
            c = msg.chunk
            if c in ctx.grants and c not in ctx.landed and all(u[0] != c for u in ctx.unpacking):
                ctx.landed.add(c)
                self.todo.append(("unpack", ctx, c))
                self._mark("dat", ctx, c)

    def _on_sreq(self, req: Request, peer: Peer, msg: SReq) -> None:
        """A peer staged a request with us (we are the passive side: ``expect``)."""
        host = self.host
        rid = req.rid
        old = self.ctxs.get(rid, {}).get((peer.name, msg.kind))
        if old is not None and not old.ahead:
            return  # a duplicate
        req.strategies[peer.label] = "staged"
        self.tel.add("staged_peer_requests")
        if self.tel.trace is not None:
            self.tel.mark(f"sreq-in {peer.label}")
        t_in = self.tel.clock()
        try:
            layers = None if msg.layers is None else host.layer_selection(list(msg.layers), rid)
            blocks = host.local_block_ids(
                msg.blocks, rid, peer=peer.label, unique=host.role == "decode"
            )
        except (TransferError, ValueError) as e:
            self._refuse(req, peer, str(e))
            return
        chunk, n, total = msg.chunk, msg.n, msg.total
        if not 0 < chunk <= self.pool.slot_bytes:
            self._refuse(
                req,
                peer,
                f"chunk of {chunk} bytes does not fit a staging slot of {self.pool.slot_bytes}",
            )
            return
        self.tel.span("~sreq-checks", t_in)
        if old is not None:
            if (
                _same_layers(old.layers, layers)
                and old.chunk == chunk
                and old.n == n
                and old.total == total
                and np.array_equal(old.blocks, blocks)
            ):
                old.ahead = False  # the request the source packed ahead: go on with it
                self.ahead["taken"] += 1
                old.mover = msg.mover
                self._take_grants(old, msg.grants)
                req.chunks += old.n
                self._mark("sreq-ahead", old)
                return
            self.drop_ahead(req, old)  # another selection of layers or blocks: start over
        ctx = self.new_ctx(
            req, peer, kind=msg.kind, blocks=blocks, layers=layers, chunk=chunk, mover=msg.mover
        )
        req.chunks += ctx.n
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
            self._take_grants(ctx, msg.grants)
        elif not ctx.complete:
            g = self.grant_initial([ctx])[ctx.key]
            if g:
                self._send(ctx, Gnt(rid, ctx.kind, tuple(g)))

    def _take_grants(self, ctx: StagedCtx, grants: tuple[tuple[int, int], ...]) -> None:
        for c, s in grants:
            if c < ctx.n and s < ctx.peer_slots():
                ctx.peer_grants[c] = s

    def _refuse(self, req: Request, peer: Peer, why: str) -> None:
        self.host.fail(
            req,
            TransferFailedError(
                f"{self.host.label}: request {req.rid!r}: staged transfer with {peer.label} "
                f"refused: {why}",
                peer=peer.label,
                request_id=req.rid,
            ),
        )

    def on_stale(self, peer_name: str, msg: Message) -> None:
        """A staged message for a request that ended here: release slots it held back."""
        if isinstance(msg, Ack | Dat) or (isinstance(msg, Fail) and msg.released):
            self.pool.release_held(peer=peer_name, rid=msg.rid)

    def _send(self, ctx: StagedCtx, msg: Message) -> bool:
        try:
            self.host.send(ctx.peer, msg)
            return True
        except nixl_compat.nixl_errors() as e:
            self.host.peer_error(ctx.req, ctx.peer, e, "notifying")
            return False

    # -- moving bytes -------------------------------------------------------------------------
    def _post(self, ctx: StagedCtx, op: str, x: ChunkXfer, remote_slot: int) -> bool:
        """Post one chunk transfer (``initialize_xfer``, one row on each side).

        ``x`` is already in ``ctx.reads``/``ctx.writes`` so that a failure here (which fails
        the request and runs :meth:`finish`) finds its slot.  Returns False on failure.
        """
        host = self.host
        s, e = ctx.bounds(x.chunk)
        x.nbytes = nbytes = e - s
        loc = np.array([[self.pool.slot_addr(x.slot), nbytes, self.pool.devid]], np.uint64)
        st = ctx.peer.staging
        assert st is not None  # a staged peer announced its staging buffer
        rem = np.array([[st.slot_addr(remote_slot), nbytes, st.devid]], np.uint64)
        self._mark("post", ctx, x.chunk)
        notif = b""
        if op == "WRITE":
            notif = host.notif_bytes(ctx.peer, Dat(ctx.req.rid, ctx.kind, x.chunk))
        t0 = self.tel.clock()
        try:
            ld = host.agent.get_xfer_descs(loc, self.pool.mem_type)
            rd = host.agent.get_xfer_descs(rem, st.mem)
            x.handle = host.agent.initialize_xfer(op, ld, rd, ctx.peer.name, notif)
        except nixl_compat.nixl_errors() as err:
            host.peer_error(ctx.req, ctx.peer, err, "preparing")
            return False
        self.tel.span("~xfer-init", t0)
        host.telemetry.add("xfer_handles_created", 1)
        t0 = time.perf_counter()
        try:
            x.state = host.agent.transfer(x.handle)
        except nixl_compat.nixl_errors() as err:
            x.state = "ERR"
            host.peer_error(ctx.req, ctx.peer, err, "posting")
            return False
        finally:
            self.busy_s["post_s"] += time.perf_counter() - t0
            self.tel.span("~xfer-post", t0)
        host.telemetry.add("transfers_posted", 1)
        host.telemetry.add("descriptors_posted", 1)
        host.telemetry.add("bytes_posted", nbytes)
        host.telemetry.add("chunk_transfers", 1)
        ctx.req.descriptors += 1
        if x.state == "ERR":
            self._err(ctx, x)
            return False
        return True

    def _err(self, ctx: StagedCtx, x: ChunkXfer) -> None:
        self.host.fail(
            ctx.req,
            TransferFailedError(
                f"{self.host.label}: request {ctx.req.rid!r}: NIXL reported ERR for staged chunk "
                f"{x.chunk} with {ctx.peer.label}",
                peer=ctx.peer.label,
                request_id=ctx.req.rid,
            ),
        )

    def _release(self, x: ChunkXfer) -> None:
        if x.handle is None:
            return
        try:
            x.handle.release()
            self.host.telemetry.add("xfer_handles_released", 1)
        except nixl_compat.nixl_errors():
            self.host.telemetry.add("release_errors", 1)
        x.handle = None

    def _read(self, ctx: StagedCtx, c: int) -> None:
        remote_slot = ctx.to_read.pop(c)
        s = ctx.grants.get(c)
        if s is None or c in ctx.reads:
            return
        x = ctx.reads[c] = ChunkXfer(None, c, s, 0, "INIT")
        self._post(ctx, "READ", x, remote_slot)

    def _write(self, ctx: StagedCtx, c: int) -> None:
        s, remote_slot = ctx.to_write.pop(c)
        x = ctx.writes[c] = ChunkXfer(None, c, s, 0, "INIT")
        self._post(ctx, "WRITE", x, remote_slot)

    def _kernel_failed(self, ctx: StagedCtx, what: str, e: BaseException) -> None:
        self.host.fail(
            ctx.req,
            TransferFailedError(
                f"{self.host.label}: request {ctx.req.rid!r}: {what} for {ctx.peer.label} "
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
            for other in self.ctxs.get(ctx.req.rid, {}).values():  # same ids, another peer
                if other.dev_blocks is not None and (
                    other.blocks is ctx.blocks or np.array_equal(other.blocks, ctx.blocks)
                ):
                    ctx.dev_blocks = other.dev_blocks
                    return ctx.dev_blocks
            t0 = self.tel.clock()
            ctx.dev_blocks = self._ids_ring.to_device(ctx.blocks)
            self.tel.span("~ids-to-device", t0)
        return ctx.dev_blocks

    def _move(self, ctx: StagedCtx, st: Any, a: int, b: int, fn: Any, dev_ids: Any) -> None:
        """Pack (``fn`` = :func:`pack`) or unpack stream bytes ``[a, b)`` of ``ctx`` to or
        from ``st`` (contiguous bytes on the pages' device): on a GPU with triton one launch
        of the context's :class:`FusedLaunch` (host time: the launch), elsewhere ``fn``
        itself."""
        if self._fused is None:
            self._fused = self.device_type == "cuda" and triton_kernel() is not None
        if not self._fused:
            fn(
                ctx.bound,
                ctx.layout,
                ctx.blocks,
                st,
                self.host.role,
                start=a,
                end=b,
                stream=ctx.stream,
                device_block_ids=dev_ids,
            )
            return
        if ctx.launch is None:
            ctx.launch = FusedLaunch(ctx.bound, ctx.stream, into_stage=fn is pack)
        ctx.launch(st, a, b, dev_ids)

    def _bounce_buf(self, what: str, nbytes: int) -> Any:
        """The device bounce buffer of lane ``what`` (one slot; made on the lane's stream,
        which orders every use of it), its first ``nbytes``."""
        buf = self._bounce_bufs.get(what)
        if buf is None:
            import torch

            buf = torch.empty(self.pool.slot_bytes, dtype=torch.uint8, device=self._device)
            self._bounce_bufs[what] = buf
        return buf[:nbytes]

    def _work(self, ctx: StagedCtx, s: int, a: int, b: int, fn: Any) -> Any:
        """The work of packing or unpacking chunk bytes ``[a, b)`` of ``ctx`` through slot
        ``s``, to run on the lane: the kernel, and with host staging the copy between the
        host slot and the lane's device bounce buffer (pack: kernel then device-to-host;
        unpack: host-to-device then kernel), all queued on the lane's stream."""
        slot = self.pool.view(s, b - a)
        what = "pack" if fn is pack else "unpack"

        def work() -> None:
            dev_ids = self._device_ids(ctx)
            if not self.bounce:
                self._move(ctx, slot, a, b, fn, dev_ids)
                return
            buf = self._bounce_buf(what, b - a)
            if fn is pack:
                self._move(ctx, buf, a, b, fn, dev_ids)
                slot.copy_(buf, non_blocking=True)
            else:
                buf.copy_(slot, non_blocking=True)
                self._move(ctx, buf, a, b, fn, dev_ids)

        return work

    def _launch(self, ctx: StagedCtx, c: int, s: int, fn: Any) -> None:
        """Pack (``fn`` = :func:`pack`) or unpack chunk ``c`` through slot ``s`` on its lane,
        count it and fence it (``ctx.packing`` / ``ctx.unpacking``); a failure to launch
        fails the request (a pack's slot goes back first: it is not the context's yet).
        The context's first work waits for what the caller queued before the context was
        made (``ctx.ready``)."""
        what = "pack" if fn is pack else "unpack"
        a, b = ctx.bounds(c)
        self._mark(f"{what}-start", ctx, c)
        t0 = time.perf_counter()
        try:
            fence = self.lanes[what].submit(self._work(ctx, s, a, b, fn), ctx.ready)
        except Exception as e:  # noqa: BLE001 - a kernel failure fails the request
            if fn is pack:
                self.pool.give(s)
            self._kernel_failed(ctx, f"{what}ing staged chunk {c}", e)
            return
        ctx.ready = None
        self.busy_s[f"{what}_s"] += time.perf_counter() - t0
        self.tel.span(f"~{what}-call", t0)
        self.host.telemetry.add(f"chunks_{what}ed", 1)
        self.host.telemetry.add(f"bytes_{what}ed", b - a)
        (ctx.packing if fn is pack else ctx.unpacking).append((c, s, fence))

    def _fence_failed(self, ctx: StagedCtx, c: int, fence: Fence, what: str) -> bool:
        """Did the work behind ``fence`` raise?  Then the request fails (True)."""
        if fence.error is None:
            return False
        self._kernel_failed(ctx, f"{what}ing staged chunk {c}", fence.error)
        return True

    # -- progress -----------------------------------------------------------------------------
    def pump(self, now: float) -> None:
        """One round of staged work: transfers, unpacks, packs, grants; then held slots."""
        with self.on_device():
            self._pump(now)

    def _pump(self, now: float) -> None:
        if self.pool.held:
            self.pool.release_held(now=now)
        if self.draining:
            keep = []
            for fence, s in self.draining:
                if fence.done():
                    self.pool.give(s)
                else:
                    keep.append((fence, s))
            self.draining = keep
        for ctx in list(self.active):
            if not self._current(ctx):
                continue
            before = progress_mark(ctx)
            if ctx.role == "dst":
                self._pump_dst(ctx)
            else:
                self._pump_src(ctx)
            if progress_mark(ctx) != before:
                ctx.last_progress = now
            elif (
                not ctx.complete
                and now - ctx.last_progress > PROBE_S
                and now - ctx.last_probe > PROBE_S
                and self.host.active(ctx.req)
            ):
                ctx.last_probe = now
                self._send(ctx, Ping())
        budget = self._do_todo(self.budget)
        if budget > 0:
            self._pack_more(budget)
        self._grant_more()

    def _do_todo(self, budget: int) -> int:
        """Run queued reads, writes and unpacks (oldest first); those that block the poll
        (a transfer between host buffers, an inline unpack) count against ``budget``."""
        while self.todo and budget > 0:
            kind, ctx, c = self.todo.popleft()
            if not self._current(ctx):
                continue  # the request ended; finish() released its slots
            t0 = self.tel.clock()
            if kind == "read":
                if c not in ctx.to_read:
                    continue
                self._read(ctx, c)
                blocking = self.blocking_xfers
            elif kind == "write":
                if c not in ctx.to_write:
                    continue
                self._write(ctx, c)
                blocking = self.blocking_xfers
            else:
                if c not in ctx.landed:
                    continue
                ctx.landed.discard(c)
                # (the slot stays the context's: finish() frees it on failure)
                self._launch(ctx, c, ctx.grants[c], unpack)
                blocking = self.blocking_kernels
            self.tel.span(kind, t0)
            if blocking:
                budget -= 1
        return budget

    def _settle(self, ctx: StagedCtx, xs: dict[int, ChunkXfer], c: int, mark: str) -> bool | None:
        """Poll chunk transfer ``c`` of ``xs`` (``ctx.reads`` or ``ctx.writes``): None when
        the request failed (reported), True when it finished (marked, its handle released,
        removed from ``xs``), False while it runs."""
        x = xs[c]
        if x.state == "PROC":
            try:
                x.state = self.host.agent.check_xfer_state(x.handle)
            except nixl_compat.nixl_errors() as e:
                self.host.peer_error(ctx.req, ctx.peer, e, "checking")
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
                if not self._send(ctx, Ack(ctx.req.rid, ctx.kind, c)):
                    return
        if ctx.unpacking:
            keep = []
            for c, s, fence in ctx.unpacking:
                if fence.done():
                    if self._fence_failed(ctx, c, fence, "unpack"):
                        return
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
            if self._fence_failed(ctx, c, fence, "pack"):
                return
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
                if not self._send(ctx, Rdy(ctx.req.rid, ctx.kind, c, s)):
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
            if ctx.ahead != ahead or not self.host.active(ctx.req):
                continue
            c = ctx.next_pack
            if c < ctx.n and (ahead or c in ctx.peer_grants):
                return ctx
        return None

    def _pack_more(self, budget: int, *, count: bool = False) -> None:
        """Pack granted chunks into free source slots, one context after the other.

        Contexts packed ahead (``expect(blocks=)``) pack before any grant, but only into
        slots nobody else wants: a granted chunk that finds no free slot takes back the slot
        of the newest chunk packed without a grant (packed again later), so chunks packed
        speculatively can never hold up one that was asked for.  ``budget`` counts the packs
        that block the poll (inline ones), or every pack with ``count``."""
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
                s = self.pool.free.popleft()
            c = ctx.next_pack
            ctx.next_pack += 1
            t0 = self.tel.clock()
            self._launch(ctx, c, s, pack)
            self.tel.span("pack", t0)
            if self.blocking_kernels or count:
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
        pending: dict[int, tuple[StagedCtx, list[tuple[int, int]]]] = {}
        cap = self._grant_cap()
        while self.pool.free:
            given = False
            for _ in range(len(self.dst)):
                ctx = self.dst[0]
                self.dst.rotate(-1)
                if not self.host.active(ctx.req):
                    continue
                if ctx.next_grant < ctx.n and len(ctx.grants) < cap:
                    s = self.pool.free.popleft()  # (the loop runs while one is free)
                    c = ctx.next_grant
                    ctx.grants[c] = s
                    ctx.next_grant += 1
                    pending.setdefault(id(ctx), (ctx, []))[1].append((c, s))
                    given = True
                    break
            if not given:
                break
        for ctx, g in pending.values():
            if self.host.active(ctx.req):
                self._send(ctx, Gnt(ctx.req.rid, ctx.kind, tuple(g)))
        self._prune(self.dst)

    def _prune(self, q: deque[StagedCtx]) -> None:
        for ctx in list(q):
            gone = not self._current(ctx)
            done = (ctx.next_grant if ctx.role == "dst" else ctx.next_pack) >= ctx.n
            if gone or done:
                _discard(q, ctx)

    # -- endings ------------------------------------------------------------------------------
    def progress(self, now: float) -> None:
        if self.active or self.pool.held or self.draining:
            self.pump(now)

    def busy(self) -> bool:
        return bool(self.active or self.pool.held or self.draining)

    def _counted(self, req: Request) -> list[StagedCtx]:
        """The request's contexts whose completion counts: on a passive source (prefill
        ``expect``) none -- its readers' ``DONE`` says enough (they unpack first)."""
        mine = self.ctxs.get(req.rid, {}).values()
        return [c for c in mine if req.kind != "expect" or c.role == "dst"]

    def complete(self, req: Request) -> bool:
        """Every staged chunk has crossed (and, on a destination, been unpacked)."""
        return all(c.complete for c in self._counted(req))

    def involves(self, req: Request, peer: Peer) -> bool:
        return any(c.peer is peer and not c.complete for c in self._counted(req))

    def peers(self, req: Request) -> list[Peer]:
        return [c.peer for c in self.ctxs.get(req.rid, {}).values() if not c.ahead]

    def pending(self, req: Request) -> list[tuple[str, str]]:
        out = []
        for c in self.ctxs.get(req.rid, {}).values():
            if not c.complete:
                done = c.unpacked if c.role == "dst" else c.moved
                out.append((c.peer.label, f"{c.peer.label} (staged, {done} of {c.n} chunks done)"))
        return out

    def release(self, req: Request, failed: bool) -> bool:
        """Release what the request's contexts hold.

        On success every slot goes back.  On failure, slots the (live) peer may still touch
        are held back: on the destination the granted slots (the source may still WRITE
        into them), on the source the slots announced with ``RDY`` (the destination may
        still READ them).  Returns True when none of this side's WRITEs into the peer's
        slots is still running (the ``rel`` flag of ``FAIL``: the peer may reuse them).
        """
        clean = True
        until = time.monotonic() + self.host.timeout_s
        for ctx in self.ctxs.pop(req.rid, {}).values():
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
        # slots whose pack or unpack still runs on a lane go back once it finished
        running = {s: f for _, s, f in (*ctx.packing, *ctx.unpacking) if not f.done()}
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
            if s in running:
                self.draining.append((running[s], s))
            else:
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

    def stats(self) -> dict[str, int | float]:
        return {
            "staging_slots_free": len(self.pool.free),
            "staging_slots_held": len(self.pool.held),
            "staging_slots_draining": len(self.draining),
            **{f"staged_ahead_{k}": v for k, v in self.ahead.items()},
            **{f"staged_{k}": round(v, 6) for k, v in self.busy_s.items()},
        }


def _same_layers(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b))


def _discard(q: Any, item: Any) -> None:
    """Remove ``item`` (by identity) if present (``deque.remove`` formats a repr on a miss)."""
    for i, x in enumerate(q):
        if x is item:
            del q[i]
            return
