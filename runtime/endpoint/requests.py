"""Requests as an endpoint tracks them, and what ``poll()`` reports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import TransferError
from ..plan import Plan
from .peers import Peer

__all__ = ["Backoff", "Progress", "Request", "now"]

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
