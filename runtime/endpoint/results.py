"""What an engine reads back from an endpoint: typed results that also read like dicts.

:class:`CompletionInfo` (how a request ended), :class:`Stats` (the endpoint's counters) and
:class:`PeerInfo` (a connected peer) are frozen dataclasses; ``info["bytes"]``,
``info.get("strategy")``, ``"peers" in info`` and ``dict(info.items())`` keep working for code
written against the dicts they replace.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CompletionInfo", "PeerInfo", "Stats"]


class _Record:
    """Dict-style read access to a dataclass's fields (and ``extra``, when it has one)."""

    def _extra(self) -> dict[str, Any]:
        return getattr(self, "extra", None) or {}

    def _fields(self) -> list[str]:
        return [n for n in getattr(self, "__dataclass_fields__", {}) if n != "extra"]

    def keys(self) -> list[str]:
        return self._fields() + list(self._extra())

    def __getitem__(self, key: str) -> Any:
        if key in self._fields():
            return getattr(self, key)
        try:
            return self._extra()[key]
        except KeyError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def items(self) -> list[tuple[str, Any]]:
        return [(k, self[k]) for k in self.keys()]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.items())


@dataclass(frozen=True)
class CompletionInfo(_Record):
    """How a finished request ended (``Endpoint.completion_info``).

    ``kind``: ``"pull"``, ``"push"`` or ``"expect"``; ``peers``: for ``expect`` the ranks
    whose ``DONE`` was counted, otherwise the ranks bytes moved with; ``expected``: the ranks
    a passive request waited for; ``notified``: ranks sent ``DONE``; ``bytes`` and
    ``descriptors`` (NIXL descriptor indices and chunk transfers) this side posted;
    ``strategy``: ``"zero-copy"``, ``"staged"``, ``"mixed"`` or None (no byte moved with any
    peer); ``strategies``: peer label -> strategy; ``chunks``: staged chunks on this side.
    """

    request_id: str
    kind: str
    ok: bool
    error: str | None
    peers: list[str]
    expected: list[str]
    notified: list[str]
    bytes: int
    descriptors: int
    seconds: float
    strategy: str | None
    strategies: dict[str, str]
    chunks: int
    engine: str | None = None


@dataclass(frozen=True)
class PeerInfo(_Record):
    """A connected peer (``Endpoint.peers()``)."""

    name: str  # NIXL agent name
    label: str  # e.g. "prefill rank 1"
    engine: str
    rank: int
    tp: int
    alive: bool
    reason: str  # why it is not alive ("" while it is)


@dataclass(frozen=True)
class Stats(_Record):
    """An endpoint's counters (``Endpoint.stats()``); ``extra`` holds those of its
    strategies (staging slots, time spent in pack/unpack, packing ahead).  The ``dropped_*``
    counters say why peer messages were dropped (``messages_dropped``: all of them)."""

    registrations: int
    registered_bytes: int
    xfer_handles_created: int
    xfer_handles_released: int
    xfer_handles_open: int
    release_errors: int
    dlist_handles_open: int
    descriptors_prepped: int
    descriptors_posted: int
    bytes_posted: int
    transfers_posted: int
    requests_done: int
    requests_failed: int
    requests_active: int
    notifs_sent: int
    notifs_received: int
    notify_errors: int
    messages_dropped: int
    peers: int
    staging_bytes: int
    bytes_completed: int
    staged_peer_requests: int
    zero_copy_peer_requests: int
    chunk_transfers: int
    chunks_packed: int
    chunks_unpacked: int
    bytes_packed: int
    bytes_unpacked: int
    #: peer messages dropped, by reason (``messages_dropped`` is their sum)
    dropped_malformed: int = 0
    dropped_unknown_sender: int = 0
    dropped_old_epoch: int = 0
    dropped_bad_mac: int = 0
    dropped_replayed: int = 0
    dropped_early_overflow: int = 0
    dropped_other_notifs: int = 0
    dropped_failed: int = 0
    #: handshakes refused after the key was proved (mismatch, a live peer in the way), and
    #: socket handshakes abandoned (malformed, unproven, too many at once, timed out)
    handshakes_refused: int = 0
    handshakes_dropped: int = 0
    handshakes_pending: int = 0
    peers_replaced: int = 0
    #: messages kept for requests not started here yet
    early_messages: int = 0
    extra: dict[str, int | float] = field(default_factory=dict)
