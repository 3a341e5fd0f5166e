"""The narrow interface between an endpoint and the strategies that move its bytes.

A *strategy* (zero-copy, staged, ...) implements :class:`Strategy`; the endpoint calls
nothing else of it.  A strategy sees the endpoint only through :class:`Host`, and touches
nothing else of it.  The endpoint decides per (request, peer) which strategy moves the bytes
(``estimate``: the cost model's prediction), hands each one its :class:`PeerJob`\\ s, routes
the peer messages of its requests to it, and asks it at every poll whether its part of a
request is complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..descriptors import BlockRuns, PairTable
from ..errors import TransferError
from ..plan import Plan
from ..protocol import Message
from ..telemetry import Telemetry
from .peers import Peer
from .requests import Request

__all__ = ["Host", "PeerJob", "Strategy"]


@dataclass(eq=False)
class JobPart:
    """The blocks of one layer kind (KV-cache group) of a request, with one peer."""

    kind: str | None  # the layer kind (None: every layer has these block ids)
    local: np.ndarray  # this side's logical block ids
    remote: np.ndarray  # the peer's
    layers: np.ndarray | None  # the layers they apply to (None: all)
    rows: np.ndarray | slice  # rows of the pair's table in those layers
    runs: BlockRuns  # blocks consecutive on both sides
    nbytes: int  # bytes the part moves
    posted: int  # descriptors zero-copy would post for it (after NIXL's merges)
    #: the part's descriptors, (local, remote) ``Nx3`` rows, when they are not a block-to-
    #: block indexing of the table (a token remap); only zero-copy moves such parts
    explicit: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(eq=False)
class PeerJob:
    """The bytes one request moves with one peer (built by the endpoint, validated)."""

    req: Request
    peer: Peer
    op: str  # "READ" (this side pulls) or "WRITE" (this side pushes)
    table: PairTable
    parts: list[JobPart]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def posted(self) -> int:
        return sum(p.posted for p in self.parts)


class Host(Protocol):
    """What a strategy may use of its endpoint."""

    agent: Any  # the endpoint's NIXL agent
    label: str  # e.g. "decode rank 0"
    role: str
    rank: int
    mem_type: str  # "DRAM" or "VRAM"
    timeout_s: float
    telemetry: Telemetry

    def send(self, peer: Peer, msg: Message) -> None:
        """Send ``msg`` to ``peer`` (raises NIXL's errors)."""

    def notif_bytes(self, peer: Peer, msg: Message) -> bytes:
        """``msg`` to ``peer`` as notification bytes (authenticated; each call numbers a new
        message), e.g. to attach to a transfer."""

    def fail(self, req: Request, err: TransferError) -> None:
        """Fail ``req`` (its peers are told, every strategy releases it)."""

    def peer_error(self, req: Request, peer: Peer, exc: BaseException, doing: str) -> None:
        """NIXL raised ``exc`` while ``doing`` something for ``req`` with ``peer``: fail the
        request (and every other one that needs the peer, when the peer is gone)."""

    def active(self, req: Request) -> bool:
        """Is ``req`` still in flight (not completed, failed or cancelled)?"""

    def local_block_ids(
        self, blocks: Any, rid: str, *, peer: str | None = None, unique: bool = False
    ) -> np.ndarray:
        """This rank's block ids of request ``rid``, validated."""

    def layer_selection(self, layers: Any, rid: str) -> np.ndarray | None:
        """Validated, sorted layer indices (None: all layers)."""

    def layer_pages(self) -> list[tuple[str, ...]]:
        """Pages of each registered layer."""

    def buffers(self) -> list[dict[str, Any]]:
        """The registered tensors: ``buffers[layer][page]``."""

    def plan_for(self, peer: Peer) -> Plan:
        """The plan the endpoint uses with ``peer``."""

    def pair_ranks(self, peer: Peer) -> tuple[int, int]:
        """(decode rank, prefill rank) of this endpoint and ``peer``."""


class Strategy(Protocol):
    """One way of moving a request's bytes with a peer."""

    name: str

    def advertise(self) -> dict[str, Any]:
        """Fields this strategy adds to the endpoint's handshake header."""

    def estimate(self, job: PeerJob) -> float | None:
        """Predicted seconds to move ``job`` (None: this strategy cannot move it)."""

    def start(self, req: Request, jobs: list[PeerJob]) -> None:
        """Start moving ``jobs`` (all of ``req``'s peers this strategy was chosen for); a
        failure is reported through :meth:`Host.fail` or :meth:`Host.peer_error`."""

    def prepare(self, job: PeerJob) -> None:
        """The passive side of ``job.req`` expects ``job`` (its own ids as both sides' ids):
        get ready before the initiator asks (or do nothing)."""

    def on_message(self, req: Request, peer: Peer, msg: Message) -> None:
        """A message of ``peer`` for the active request ``req``."""

    def on_stale(self, peer_name: str, msg: Message) -> None:
        """A message for a request that ended here."""

    def progress(self, now: float) -> None:
        """One round of work (poll transfers, launch kernels, post chunks)."""

    def complete(self, req: Request) -> bool:
        """Is this strategy's part of ``req`` done?"""

    def involves(self, req: Request, peer: Peer) -> bool:
        """Does this strategy still wait on ``peer`` for ``req``?"""

    def peers(self, req: Request) -> list[Peer]:
        """Peers this strategy moved (or moves) bytes of ``req`` with."""

    def pending(self, req: Request) -> list[tuple[str, str]]:
        """(peer label, what is unfinished) for a timeout message."""

    def release(self, req: Request, failed: bool) -> bool:
        """Release what ``req`` holds (once).  Returns True when none of this side's writes
        into the peer's memory is still running (the peer may reuse it)."""

    def forget_peer(self, peer: Peer) -> None:
        """``peer`` was dropped or replaced: forget what is kept for it."""

    def peer_dead(self, peer: Peer) -> None:
        """``peer`` is known dead (it cannot touch our memory any more)."""

    def busy(self) -> bool:
        """Is there work for :meth:`progress`?"""

    def stats(self) -> dict[str, int | float]:
        """Counters of this strategy for ``Endpoint.stats()``."""

    def close(self) -> None:
        """Release registrations and handles."""
