"""The one way layoutc's tools start and drive worker processes.

A :class:`Worker` is a process (multiprocessing *spawn*) hosting a *handler*: an object made
in the child by a factory named ``"module:attr"``, called as ``factory(channel, *args)``.
The parent calls the handler's methods by name (:meth:`Worker.call`, or :meth:`Worker.send`
then :meth:`Worker.result`); the return value (or the exception, pickled) comes back.  Every
wait has a deadline: a worker that does not answer in time, or dies, raises
:class:`WorkerError` naming it, never a hang.

Between calls the child calls the handler's ``tick()`` (if it has one) so that the endpoints
it holds keep progressing, as in an engine loop; ``busy()`` (optional) says whether to tick
again at once.  While a long call runs, the handler can talk to the parent through its
:class:`Channel`: :meth:`Channel.emit` sends an event (collected in :attr:`Worker.events`),
:meth:`Channel.posted` reads a control message the parent sent with :meth:`Worker.post`.

A handler may define ``close()``, called when the worker is stopped.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import select
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from typing import Any

from layoutc.runtime.errors import LayoutcError

__all__ = [
    "Channel",
    "Stopped",
    "Worker",
    "WorkerDied",
    "WorkerError",
    "WorkerTimeout",
    "end_process",
    "readable",
]

#: Default seconds a call may take.
CALL_TIMEOUT_S = 120.0
#: Seconds a new worker may take to start (Python, torch and NIXL imports).
START_TIMEOUT_S = 120.0


class WorkerError(LayoutcError):
    """A worker failed: it raised an unexpected exception (the message carries its
    traceback), died, or did not answer in time."""


class WorkerTimeout(WorkerError, TimeoutError):
    """A worker did not answer within its deadline."""


class WorkerDied(WorkerError):
    """A worker process ended (killed, crashed) while the parent waited for it."""


class Stopped(Exception):
    """Raised in the child when the parent posts ``"stop"`` during a long call."""


# --------------------------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------------------------
class Channel:
    """The child's end of the pipe, as a handler sees it."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.inbox: deque[tuple[Any, ...]] = deque()  # calls that arrived during a call
        self.posts: deque[Any] = deque()

    def emit(self, *event: Any) -> None:
        """Send an event to the parent (it lands in :attr:`Worker.events`)."""
        self.conn.send(("event", event))

    def _drain(self, timeout: float) -> None:
        if not self.conn.poll(timeout):
            return
        while True:
            msg = self.conn.recv()
            if msg[0] == "post":
                if msg[1] == "stop":
                    raise Stopped()
                self.posts.append(msg[1])
            else:
                self.inbox.append(msg)
            if not self.conn.poll(0):
                return

    def posted(self, timeout: float = 0.0) -> Any:
        """The next control message the parent posted, or None (waits up to ``timeout``).
        A posted ``"stop"`` raises :class:`Stopped`."""
        if not self.posts:
            self._drain(timeout)
        return self.posts.popleft() if self.posts else None

    def wait_posted(self, want: Any, timeout: float) -> None:
        """Wait for the control message ``want``; :class:`WorkerTimeout` after ``timeout``."""
        end = time.monotonic() + timeout
        while True:
            msg = self.posted(min(0.05, max(0.0, end - time.monotonic())))
            if msg == want:
                return
            if time.monotonic() > end:
                raise WorkerTimeout(f"no {want!r} from the parent within {timeout:.0f} s")


def _load(path: str) -> Callable[..., Any]:
    module, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _prepare(device: str | None, threads: int | None, env: dict[str, str]) -> None:
    from layoutc.runtime import nixl_compat

    os.environ.update(env)
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    for k, v in nixl_compat.NO_MULTICAST_ENV.items():  # in every process, whatever its device
        os.environ.setdefault(k, v)
    if device is None:
        return
    if device != "cpu":
        nixl_compat.prepare_cuda_env()
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    if device.startswith("cuda:"):
        torch.cuda.set_device(int(device.split(":", 1)[1]))  # one GPU per worker, as an engine


def _serve(
    conn: Connection,
    handler: str,
    args: tuple[Any, ...],
    device: str | None,
    threads: int | None,
    env: dict[str, str],
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us (or our pipe closes)
    ch = Channel(conn)
    obj: Any = None
    try:
        _prepare(device, threads, env)
        obj = _load(handler)(ch, *args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        _send_exc(conn, e)
        conn.close()
        return
    conn.send(("start", os.getpid()))
    tick = getattr(obj, "tick", None)
    busy = getattr(obj, "busy", None)
    fd = conn.fileno()
    idle = 0.0005
    try:
        while True:
            if ch.inbox:
                msg = ch.inbox.popleft()
            else:
                # a busy handler checks the pipe with one select() (~2 us; Connection.poll(0)
                # builds a selector per call, ~20-40 us, which delays every progress round)
                if busy is not None and busy():
                    ready = bool(select.select([fd], [], [], 0)[0])
                else:
                    ready = conn.poll(idle if tick is not None else None)
                if not ready:
                    if tick is not None:
                        idle = 0.0005 if tick() else min(idle * 2, 0.002)
                    continue
                msg = conn.recv()
            kind = msg[0]
            if kind == "exit":
                handler, obj = obj, None
                try:
                    out = _close(handler)
                except Exception as e:  # noqa: BLE001 - shipped to the parent
                    _send_exc(conn, e)
                else:
                    conn.send(("ret", out))
                return
            if kind == "post":
                if msg[1] != "stop":
                    ch.posts.append(msg[1])
                continue
            _, method, a, kw = msg
            try:
                out = getattr(obj, method)(*a, **kw)
            except Stopped:
                conn.send(("exc", WorkerError("stopped by the parent")))
                continue
            except Exception as e:  # noqa: BLE001 - shipped to the parent
                _send_exc(conn, e)
                continue
            conn.send(("ret", out))
    except (EOFError, OSError, BrokenPipeError):
        pass  # the parent went away
    finally:
        try:
            _close(obj)
        except Exception:  # noqa: BLE001 - closing after a failure
            pass
        conn.close()


def _close(obj: Any) -> Any:
    if obj is None:
        return None
    close = getattr(obj, "close", None)
    return close() if close is not None else None


def _send_exc(conn: Connection, e: BaseException) -> None:
    text = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
    if not isinstance(e, LayoutcError | AssertionError | TimeoutError | ValueError | KeyError):
        e = WorkerError(text)
    try:
        conn.send(("exc", e))
    except Exception:  # noqa: BLE001 - not picklable: the text
        conn.send(("exc", WorkerError(text)))


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------
def end_process(proc: Any, grace_s: float) -> None:
    """Terminate ``proc`` if it is still alive, then kill it if it ignored that; each step
    waits up to ``grace_s`` for it to exit."""
    if proc.is_alive():
        proc.terminate()
        proc.join(grace_s)
    if proc.is_alive():
        proc.kill()
        proc.join(grace_s)


class Worker:
    """A worker process as the parent sees it (see the module docstring).

    ``handler``: ``"module:factory"``, called in the child as ``factory(channel, *args)``;
    ``device``: ``"cpu"`` or ``"cuda:N"`` -- torch is imported, its threads capped at
    ``threads`` and the GPU selected before the handler is made (None: nothing);
    ``env``: variables set in the child before anything is imported there;
    ``deadline``: a monotonic time no wait outlives by more than ``grace_s`` (a run's limit).
    """

    def __init__(
        self,
        handler: str,
        *args: Any,
        label: str = "worker",
        device: str | None = "cpu",
        threads: int | None = 1,
        daemon: bool = True,
        env: dict[str, str] | None = None,
        deadline: float | None = None,
        grace_s: float = 20.0,
    ) -> None:
        ctx = mp.get_context("spawn")
        self.label = label
        self.deadline = deadline
        self.grace_s = grace_s
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_serve,
            args=(child, handler, args, device, threads, dict(env or {})),
            daemon=daemon,
            name=f"layoutc-{label.replace(' ', '-')}",
        )
        self.proc.start()
        child.close()
        self.pid: int | None = None
        self.events: deque[tuple[Any, ...]] = deque()
        self.returns: deque[tuple[str, Any]] = deque()
        self.dead = False
        self.outstanding = 0

    # -- state ----------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not self.dead and self.proc.is_alive()

    @property
    def exitcode(self) -> int | None:
        return self.proc.exitcode

    def fileno(self) -> int:
        return self.conn.fileno()

    def _within(self, timeout: float) -> float:
        if self.deadline is None:
            return timeout
        return max(1.0, min(timeout, self.deadline + self.grace_s - time.monotonic()))

    # -- reading --------------------------------------------------------------------------------
    def _take(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "event":
            self.events.append(msg[1])
        elif kind == "start":
            self.pid = msg[1]
        else:  # "ret" | "exc"
            self.returns.append((kind, msg[1]))

    def _read(self, timeout: float, what: str) -> None:
        """Read one message (waiting up to ``timeout``)."""
        if self.dead:
            raise WorkerDied(f"{self.label}: the worker process ended (exit code {self.exitcode})")
        try:
            if not self.conn.poll(timeout):
                raise WorkerTimeout(f"{self.label}: no answer to {what!r} within {timeout:.0f} s")
            msg = self.conn.recv()
        except (EOFError, OSError):
            self.dead = True
            self.proc.join(1)
            raise WorkerDied(
                f"{self.label}: the worker process died ({what}; exit code {self.exitcode})"
            ) from None
        self._take(msg)

    def drain(self) -> None:
        """Read every message already there (events and returns), without waiting; a dead
        worker is noted (``dead``), not raised."""
        try:
            while not self.dead and self.conn.poll(0):
                self._take(self.conn.recv())
        except (EOFError, OSError):
            self.dead = True
            self.proc.join(1)

    def wait_event(
        self, match: Callable[[tuple[Any, ...]], bool], timeout: float
    ) -> tuple[Any, ...]:
        """The first event (oldest first, collected or still to come) for which ``match`` is
        true; earlier events are dropped.  :class:`WorkerTimeout` after ``timeout``."""
        end = time.monotonic() + self._within(timeout)
        while True:
            while self.events:
                ev = self.events.popleft()
                if match(ev):
                    return ev
            self._read(max(0.0, end - time.monotonic()), "an event")

    def ready(self, timeout: float = START_TIMEOUT_S) -> int:
        """Wait until the worker started (its handler exists); returns its pid."""
        end = time.monotonic() + self._within(timeout)
        while self.pid is None:
            if self.returns:  # the handler could not be made
                kind, value = self.returns.popleft()
                raise value if isinstance(value, BaseException) else WorkerError(str(value))
            self._read(max(0.0, end - time.monotonic()), "start")
        return self.pid

    # -- calling --------------------------------------------------------------------------------
    def send(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Start calling ``method`` in the child (collect it with :meth:`result`)."""
        try:
            self.conn.send(("call", method, args, kwargs))
        except (OSError, BrokenPipeError):
            self.dead = True
            raise WorkerDied(f"{self.label}: the worker process is gone ({method})") from None
        self.outstanding += 1

    def result(self, timeout: float = CALL_TIMEOUT_S, what: str = "call") -> Any:
        """The result of the oldest call sent (re-raises the child's exception)."""
        end = time.monotonic() + self._within(timeout)
        while not self.returns:
            self._read(max(0.0, end - time.monotonic()), what)
        self.outstanding -= 1
        kind, value = self.returns.popleft()
        if kind == "exc":
            raise value
        return value

    def call(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S, **kwargs: Any) -> Any:
        self.ready()
        self.send(method, *args, **kwargs)
        return self.result(timeout, method)

    def post(self, msg: Any) -> None:
        """A control message for the call running in the child (:meth:`Channel.posted`);
        ``"stop"`` ends it with :class:`WorkerError`."""
        try:
            self.conn.send(("post", msg))
        except (OSError, BrokenPipeError):
            self.dead = True

    # -- ending ---------------------------------------------------------------------------------
    def kill(self) -> None:
        """SIGKILL the worker (for fault injection); it is dead afterwards."""
        try:
            os.kill(self.proc.pid, signal.SIGKILL)  # type: ignore[arg-type]  # started: has a pid
        except ProcessLookupError:
            pass
        self.proc.join(5)
        self.dead = True

    def stop(self, timeout: float = 20.0) -> Any:
        """Ask the worker to close its handler and exit; returns what ``close()`` returned
        (None when it could not be asked).  Ends the process in any case."""
        out = None
        if self.alive:
            try:
                self.conn.send(("exit",))
                end = time.monotonic() + timeout
                while True:
                    self._read(max(0.0, end - time.monotonic()), "exit")
                    while self.returns and self.outstanding:  # answers to earlier calls
                        self.returns.popleft()
                        self.outstanding -= 1
                    if self.returns:
                        kind, value = self.returns.popleft()
                        out = value if kind == "ret" else None
                        break
            except (WorkerError, OSError, BrokenPipeError):
                pass
            self.proc.join(5)
        end_process(self.proc, 2)
        self.dead = True
        self.conn.close()
        return out


def readable(workers: Sequence[Worker], timeout: float) -> list[Worker]:
    """Workers with a message waiting (or whose process ended), waiting up to ``timeout``."""
    if not workers:
        time.sleep(timeout)
        return []
    by_conn = {w.conn: w for w in workers if not w.dead}
    ready = wait_connections(list(by_conn), timeout=timeout)
    return [by_conn[c] for c in ready]  # type: ignore[index]  # the conns given to wait()


def start_all(
    handler: str, specs: Iterable[tuple[str, tuple[Any, ...], dict[str, Any]]]
) -> list[Worker]:
    """Start one worker per ``(label, args, kwargs)`` and wait until all are ready."""
    workers = [Worker(handler, *args, label=label, **kw) for label, args, kw in specs]
    try:
        for w in workers:
            w.ready()
    except BaseException:
        for w in workers:
            w.stop(2)
        raise
    return workers
