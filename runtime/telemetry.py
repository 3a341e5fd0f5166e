"""Counters and an optional trace of one endpoint.

:class:`Telemetry` holds the counters ``Endpoint.stats()`` reports (handles, registrations,
bytes and descriptors posted, requests, staged chunks) and, when a tool turns tracing on, a
list of timed spans: ``(what, start, end)`` in ``time.perf_counter`` seconds.  Span names
starting with ``~`` are nested in a heavy operation; ``@what`` entries are zero-length marks
(message arrivals, finished kernels), so that traces of several processes merge into one
timeline of a request.  With tracing off (the default) :meth:`Telemetry.clock` returns 0 and
spans cost one attribute test.
"""

from __future__ import annotations

import time

__all__ = ["COUNTERS", "DROP_COUNTERS", "Telemetry"]

#: Peer messages dropped, by reason (``Endpoint.stats()`` sums them as ``messages_dropped``).
DROP_COUNTERS = (
    "dropped_malformed",  # not a layoutc frame of this format, truncated, oversized, bad values
    "dropped_unknown_sender",  # from an agent that completed no handshake here
    "dropped_old_epoch",  # of an earlier handshake of the sender
    "dropped_bad_mac",  # the tag does not verify
    "dropped_replayed",  # a sequence number seen before, or behind the window
    "dropped_early_overflow",  # for a request not started here, the sender's share full
    "dropped_other_notifs",  # not layoutc's, beyond what ``other_notifs`` keeps
    "dropped_failed",  # its handling raised (a bug; logged)
)

#: Counters every endpoint keeps (``Endpoint.stats()`` adds derived values).
COUNTERS = (
    "registrations",
    "registered_bytes",
    "xfer_handles_created",
    "xfer_handles_released",
    "release_errors",
    "dlist_handles_open",
    "descriptors_prepped",
    "descriptors_posted",
    "bytes_posted",
    "transfers_posted",
    "requests_done",
    "requests_failed",
    "notifs_sent",
    "notifs_received",
    "notify_errors",
    "staging_bytes",
    "bytes_completed",
    "staged_peer_requests",
    "zero_copy_peer_requests",
    "chunk_transfers",
    "chunks_packed",
    "chunks_unpacked",
    "bytes_packed",
    "bytes_unpacked",
    *DROP_COUNTERS,
    "handshakes_refused",  # proved the key (or none is set), then refused: mismatch, live peer
    "handshakes_dropped",  # socket handshakes abandoned: malformed, unproven, too many, timed out
    "handshakes_pending",  # socket handshakes in progress now
    "peers_replaced",  # live or dead peers replaced by a new handshake of their place
)


class Telemetry:
    """Counters (``counters[name]``) and the trace (``trace``: None when off)."""

    __slots__ = ("counters", "trace")

    def __init__(self) -> None:
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.trace: list[tuple[str, float, float]] | None = None

    def add(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def start_trace(self) -> None:
        self.trace = []

    def stop_trace(self) -> list[tuple[str, float, float]]:
        out, self.trace = self.trace or [], None
        return out

    def clock(self) -> float:
        """Now, when tracing (for a later :meth:`span`); 0.0 otherwise."""
        return time.perf_counter() if self.trace is not None else 0.0

    def span(self, what: str, t0: float) -> None:
        """A trace entry ``what`` from ``t0`` (a :meth:`clock`) to now, when tracing."""
        if self.trace is not None:
            self.trace.append((what, t0, time.perf_counter()))

    def mark(self, what: str) -> None:
        """A zero-length trace entry ``@what``, when tracing."""
        if self.trace is not None:
            t = time.perf_counter()
            self.trace.append((f"@{what}", t, t))
