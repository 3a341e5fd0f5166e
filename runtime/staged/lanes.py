"""Where the staged strategy's pack and unpack work runs: *lanes*, and fences on their work.

A lane is an ordered queue of work (FIFO): work submitted to one lane runs in submission
order; work on different lanes may run at the same time.  The staged engine packs on one
lane and unpacks on another, while NIXL moves the chunks in between, so that chunk ``k + 1``
is packed while chunk ``k`` crosses and chunk ``k - 1`` is unpacked.  Each submission returns
a :class:`Fence` the engine polls (never waits on) from its progress loop.

Kinds (``Endpoint(staged_lanes=...)``):

* ``"stream"`` (GPUs, the default there): a CUDA stream per lane; work is queued kernels and
  copies, a fence is a CUDA event.  The first work of each staged context waits for what the
  caller had queued on its own (current) stream when the context was made (the engine's
  writes into the pages it packs), through an event, never a host synchronisation.
* ``"thread"`` (host memory): a worker thread per lane; a fence is a flag the thread sets.
  torch's gathers and scatters and NIXL's copies between processes release the GIL, so a
  pack, a transfer and an unpack of one process run at the same time.
* ``"inline"`` (host memory, the default there): the work runs at once, in the caller's
  thread, and its fence is already done (on a GPU: queued on the caller's current stream,
  as the engine did before lanes).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = [
    "DONE",
    "LANE_KINDS",
    "EventFence",
    "Fence",
    "Lane",
    "ThreadFence",
    "default_lanes",
    "make_lane",
]

#: The lane kinds an endpoint accepts (``staged_lanes``).
LANE_KINDS = ("stream", "thread", "inline")


class Fence:
    """Completion of submitted work.  ``done()`` never blocks; ``error`` is the exception the
    work raised (thread lanes; a CUDA launch error is raised by ``submit`` itself)."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> bool:
        return True


#: A fence on work that already ran.
DONE = Fence()


class EventFence(Fence):
    """A CUDA event recorded after the work; taken from and given back to ``pool`` (creating
    one is a driver call).  An event waited on by another stream is never pooled."""

    __slots__ = ("ev", "pool")

    def __init__(self, ev: Any, pool: list[Any] | None) -> None:
        super().__init__()
        self.ev = ev
        self.pool = pool

    def done(self) -> bool:
        ev = self.ev
        if ev is None:
            return True
        if not ev.query():
            return False
        if self.pool is not None:
            self.pool.append(ev)
        self.ev = None
        return True

    def wait(self, timeout: float | None = None) -> bool:
        if self.ev is not None:
            self.ev.synchronize()
        return self.done()


class ThreadFence(Fence):
    """Set by a thread lane once its work finished (or raised)."""

    __slots__ = ("_flag", "_event")

    def __init__(self) -> None:
        super().__init__()
        self._flag = False
        self._event = threading.Event()

    def set(self) -> None:
        self._flag = True
        self._event.set()

    def done(self) -> bool:
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)


class Lane:
    """Runs work in submission order (this base class: at once, in the caller's thread)."""

    kind = "inline"
    #: does :meth:`submit` return before the work ran?
    asynchronous = False

    def __init__(self, name: str) -> None:
        self.name = name

    def submit(self, work: Callable[[], None], after: Fence | None = None) -> Fence:
        """Run ``work`` after everything submitted before (and after ``after``)."""
        work()
        return DONE

    def ready(self) -> Fence | None:
        """A fence on what the caller queued on its own stream so far (GPU lanes), to pass
        as ``after`` to the first work that reads or writes the caller's pages."""
        return None

    def close(self) -> None:
        """Stop taking work (work already submitted still runs)."""


class _CurrentStreamLane(Lane):
    """GPU work queued on the caller's current stream (``"inline"`` on a GPU)."""

    asynchronous = True

    def __init__(self, name: str, device: Any) -> None:
        super().__init__(name)
        self.device = device
        self._events: list[Any] = []

    def _record(self, stream: Any) -> EventFence:
        import torch

        ev = self._events.pop() if self._events else torch.cuda.Event()
        ev.record(stream)
        return EventFence(ev, self._events)

    def submit(self, work: Callable[[], None], after: Fence | None = None) -> Fence:
        import torch

        work()
        return self._record(torch.cuda.current_stream(self.device))


class StreamLane(_CurrentStreamLane):
    """GPU work queued on a CUDA stream of its own."""

    kind = "stream"

    def __init__(self, name: str, device: Any) -> None:
        super().__init__(name, device)
        import torch

        self.stream = torch.cuda.Stream(device=device)

    def submit(self, work: Callable[[], None], after: Fence | None = None) -> Fence:
        import torch

        s = self.stream
        with torch.cuda.stream(s):
            if isinstance(after, EventFence) and after.ev is not None:
                s.wait_event(after.ev)
            work()
            return self._record(s)

    def ready(self) -> Fence | None:
        import torch

        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return EventFence(ev, None)  # (waited on by the lane: never back in a pool)


class ThreadLane(Lane):
    """Host work run by a worker thread of its own, in submission order."""

    kind = "thread"
    asynchronous = True

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._q: queue.SimpleQueue[tuple[Callable[[], None], Fence | None, ThreadFence] | None]
        self._q = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, work: Callable[[], None], after: Fence | None = None) -> Fence:
        if self._closed:
            raise RuntimeError(f"staged lane {self.name!r} is closed")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"layoutc-{self.name}", daemon=True
            )
            self._thread.start()
        f = ThreadFence()
        self._q.put((work, after, f))
        return f

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            work, after, fence = item
            try:
                if after is not None:
                    after.wait()
                work()
            except BaseException as e:  # noqa: BLE001 - handed to the engine by the fence
                fence.error = e
            fence.set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=30.0)


def default_lanes(device_type: str) -> str:
    """The lane kind an endpoint uses unless told: ``"stream"`` on GPUs, ``"inline"`` on host
    memory (where one poll performs one copy; docs/benchmarks.md compares the kinds)."""
    return "stream" if device_type == "cuda" else "inline"


def make_lane(kind: str, name: str, device_type: str, device: Any = None) -> Lane:
    """A lane of ``kind`` for work on ``device_type`` (``"cpu"`` or ``"cuda"``)."""
    if kind not in LANE_KINDS:
        raise ValueError(f"staged lanes must be one of {', '.join(LANE_KINDS)}, got {kind!r}")
    if device_type == "cuda":
        if kind == "thread":
            raise ValueError("staged lanes 'thread' run host memory; GPU pages use 'stream'")
        return StreamLane(name, device) if kind == "stream" else _CurrentStreamLane(name, device)
    if kind == "stream":
        raise ValueError("staged lanes 'stream' need GPU pages; host memory uses 'thread'")
    return ThreadLane(name) if kind == "thread" else Lane(name)
