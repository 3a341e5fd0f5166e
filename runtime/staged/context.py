"""What the staged strategy keeps per (request, peer) and per chunk transfer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..endpoint.peers import Peer
from ..endpoint.requests import Request
from ..staging import BoundPages, StagingLayout, Stream
from .lanes import Fence

__all__ = ["ChunkXfer", "StagedCtx", "progress_mark"]


@dataclass(eq=False)
class ChunkXfer:
    handle: Any
    chunk: int
    slot: int  # the local slot the transfer reads (WRITE) or fills (READ)
    nbytes: int
    state: str = "PROC"


@dataclass(eq=False, repr=False)
class StagedCtx:
    """One staged (request, peer): this side is the source ("src") or destination ("dst")."""

    req: Request
    peer: Peer
    kind: str | None  # the layer kind the context carries (None: every layer)
    layers: np.ndarray | None  # the layers whose rows it moves (None: all)
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
    #: what the context's first pack or unpack waits for (the caller's queued work when it
    #: was made; GPU lanes), None once that work was submitted
    ready: Fence | None = None
    # destination
    next_grant: int = 0
    grants: dict[int, int] = field(default_factory=dict)  # chunk -> local slot
    reads: dict[int, ChunkXfer] = field(default_factory=dict)
    unpacking: list[tuple[int, int, Fence]] = field(default_factory=list)
    unpacked: int = 0
    # source
    ahead: bool = False  # made by ``expect(blocks=)``: packing before the peer's SREQ
    peer_grants: dict[int, int] = field(default_factory=dict)  # chunk -> remote slot
    next_pack: int = 0
    packing: list[tuple[int, int, Fence]] = field(default_factory=list)
    packed: dict[int, int] = field(default_factory=dict)  # chunk -> local slot (no grant yet)
    waiting_ack: dict[int, int] = field(default_factory=dict)  # chunk -> local slot (RDY sent)
    to_write: dict[int, tuple[int, int]] = field(default_factory=dict)  # c -> (slot, remote)
    writes: dict[int, ChunkXfer] = field(default_factory=dict)
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

    @property
    def key(self) -> tuple[str, str | None]:
        """The context's key among a request's contexts: (peer name, kind)."""
        return self.peer.name, self.kind

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

    def peer_slots(self) -> int:
        """Slots of the peer's staging buffer (grants and ``RDY`` must name one of them)."""
        return self.peer.staging.slots if self.peer.staging is not None else 0

    def in_flight(self) -> bool:
        """Transfers of this context still running (this side is the mover)."""
        return any(x.state == "PROC" for x in (*self.reads.values(), *self.writes.values()))


def progress_mark(ctx: StagedCtx) -> tuple[int, ...]:
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
