"""Requests as an endpoint tracks them, and what ``poll()`` reports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import TransferError
from ..plan import Plan
from ..protocol import Message
from .peers import Peer

__all__ = ["Backoff", "EarlyMessages", "Progress", "Request", "now"]

_SLEEP_MIN_S = 50e-6
_SLEEP_MAX_S = 2e-3


def now() -> float:
    return time.monotonic()


@dataclass(eq=False)
class Request:
    """One request on this endpoint: ``kind`` is ``"pull"``/``"push"`` (this side initiates)
    or ``"expect"`` (the passive side, waiting for its peers' ``DONE``)."""

    rid: str
    kind: str
    engine: str | None
    started: float
    deadline: float
    timeout_s: float
    notify: list[Peer] = field(default_factory=list)  # initiator: peers sent DONE at the end
    plan: Plan | None = None  # the plan with the peer engine (passive: once it is known)
    expected: frozenset[int] | None = None  # passive: peer ranks whose DONE completes it
    got: set[int] = field(default_factory=set)
    nbytes: int = 0
    descriptors: int = 0
    strategies: dict[str, str] = field(default_factory=dict)  # peer label -> strategy
    chunks: int = 0
    released: bool = False  # the strategies released what the request held
    num_tokens: int | None = None  # the request's tokens (pairs with a token remap)

    def engine_ok(self, peer: Peer) -> bool:
        return self.engine is None or self.engine == peer.engine

    def expects(self, peer: Peer) -> bool:
        """Does this passive request wait for ``peer``'s ``DONE``?"""
        return (
            self.expected is not None
            and peer.rank in self.expected
            and self.engine_ok(peer)
            and (self.plan is None or peer.plan is self.plan)
        )


class Progress(NamedTuple):
    """What ``Endpoint.poll()`` learned: requests that completed and requests that failed."""

    done: list[str]
    failed: dict[str, TransferError]


class Backoff:
    """Sleep between polls: 50 µs doubling to 2 ms (no hot spin, low latency)."""

    def __init__(self) -> None:
        self.delay = _SLEEP_MIN_S

    def sleep(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, _SLEEP_MAX_S)


class EarlyMessages:
    """Messages of requests not started here yet (a ``DONE`` before ``expect()``), by request
    id in arrival order, bounded per sender in count and bytes; they expire after a while."""

    def __init__(self, per_sender: int, bytes_per_sender: int) -> None:
        self.per_sender = per_sender
        self.bytes_per_sender = bytes_per_sender
        self._msgs: dict[str, list[tuple[float, str, Message]]] = {}
        self._sizes: dict[str, list[int]] = {}  # by request id, per message
        self._held: dict[str, list[int]] = {}  # by sender: [messages, bytes]
        self.count = 0

    def __bool__(self) -> bool:
        return bool(self._msgs)

    def __contains__(self, rid: object) -> bool:
        return rid in self._msgs

    def add(self, rid: str, t: float, sender: str, msg: Message, nbytes: int) -> bool:
        """Keep ``msg``; False (not kept) when ``sender`` already holds its share."""
        held = self._held.setdefault(sender, [0, 0])
        if held[0] >= self.per_sender or held[1] + nbytes > self.bytes_per_sender:
            return False
        held[0] += 1
        held[1] += nbytes
        self._msgs.setdefault(rid, []).append((t, sender, msg))
        self._sizes.setdefault(rid, []).append(nbytes)
        self.count += 1
        return True

    def pop(
        self, rid: str, default: list[tuple[float, str, Message]] | None = None
    ) -> list[tuple[float, str, Message]]:
        """The messages kept for ``rid`` (forgotten here)."""
        msgs = self._msgs.pop(rid, None)
        if msgs is None:
            return [] if default is None else default
        for (_, sender, _m), n in zip(msgs, self._sizes.pop(rid)):
            held = self._held[sender]
            held[0] -= 1
            held[1] -= n
            if held[0] == 0:
                del self._held[sender]
        self.count -= len(msgs)
        return msgs

    def expire(self, t: float, age: float) -> None:
        """Forget requests whose first message is older than ``age`` seconds."""
        while self._msgs:
            rid, msgs = next(iter(self._msgs.items()))
            if t - msgs[0][0] <= age:
                return
            self.pop(rid)

    def forget(self, sender: str) -> None:
        """Forget every message of ``sender`` (dropped or replaced)."""
        if sender not in self._held:
            return
        for rid in list(self._msgs):
            msgs, sizes = self._msgs[rid], self._sizes[rid]
            keep = [(m, n) for m, n in zip(msgs, sizes) if m[1] != sender]
            if len(keep) == len(msgs):
                continue
            self.count -= len(msgs) - len(keep)
            if keep:
                self._msgs[rid] = [m for m, _ in keep]
                self._sizes[rid] = [n for _, n in keep]
            else:
                del self._msgs[rid], self._sizes[rid]
        del self._held[sender]
