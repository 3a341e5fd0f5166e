"""What a decode worker knows of its prefill engines' leases.

A prefill engine holds a request's blocks until every reader is done or its lease ends
(``kv_lease_duration``); a request queued on decode has its lease renewed over the prefill's
side channel (``hb``), whose answer carries the new deadlines in the prefill's clock and that
clock.  :class:`Leases` keeps those deadlines and each engine's clock offset, whether or not
this worker has met the engine over NIXL yet (a request may wait in the queue before the
first load from a new prefill engine), so that a load is refused when its lease ended.

Thread-safe: renewals land from helper threads, loads read from the transfer thread.
Bounded: at most :data:`MAX_PER_ENGINE` deadlines per engine and :data:`MAX_ENGINES`
engines (the oldest go first).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Collection, Mapping
from typing import Any

__all__ = ["MAX_ENGINES", "MAX_PER_ENGINE", "Leases"]

MAX_PER_ENGINE = 1 << 16
MAX_ENGINES = 1024


class Leases:
    """Lease deadlines (prefill clock) by engine and request, and the engines' clock offsets
    (their clock minus ours)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deadlines: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._offsets: dict[str, float] = {}

    def offset(self, engine_id: str) -> float | None:
        with self._lock:
            return self._offsets.get(engine_id)

    def renewed(
        self, engine_id: str, offset: float, leases: Mapping[Any, Any], asked: Collection[str]
    ) -> int:
        """Take a renewal's answer: the deadlines of the requests asked about (later ones
        only; values that are not finite numbers are ignored).  Returns how many were taken."""
        taken = 0
        with self._lock:
            self._offsets[engine_id] = offset
            mine = self._touch(engine_id)
            for rid, deadline in leases.items():
                if (
                    rid in asked
                    and isinstance(deadline, int | float)
                    and not isinstance(deadline, bool)
                    and math.isfinite(deadline)
                ):
                    mine[rid] = max(mine.get(rid, float("-inf")), float(deadline))
                    taken += 1
            while len(mine) > MAX_PER_ENGINE:
                del mine[min(mine, key=mine.__getitem__)]
        return taken

    def deadline(self, engine_id: str, request_id: str) -> float | None:
        with self._lock:
            return self._deadlines.get(engine_id, {}).get(request_id)

    def take(self, engine_id: str, request_id: str) -> float | None:
        """The request's renewed deadline, forgotten here (a load of it starts: its lease no
        longer matters after that check)."""
        with self._lock:
            return self._deadlines.get(engine_id, {}).pop(request_id, None)

    def _touch(self, engine_id: str) -> dict[str, float]:
        mine = self._deadlines.setdefault(engine_id, {})
        self._deadlines.move_to_end(engine_id)
        while len(self._deadlines) > MAX_ENGINES:
            old, _ = self._deadlines.popitem(last=False)
            self._offsets.pop(old, None)
        return mine
