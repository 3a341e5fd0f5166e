"""The side channel: a prefill engine serves its workers' handshake payloads and lease
renewals at ``VLLM_NIXL_SIDE_CHANNEL_HOST:VLLM_NIXL_SIDE_CHANNEL_PORT`` (+ the data-parallel
index), the address its ``kv_transfer_params`` advertise (``remote_host``/``remote_port``).

One ZMQ ROUTER socket in the engine-core process (:class:`SideChannelServer`, a daemon
thread); decode workers ask with a REQ socket per query (:func:`query`).  Messages are JSON
objects of at most :data:`MAX_MESSAGE` bytes:

==========================================  ==============================================
request                                     reply
==========================================  ==============================================
``{"v": 1, "op": "meta", "tp_rank": r}``    ``{"ok": true, "payload": {...}, "clock": t}``
``{"v": 1, "op": "hb", "req": [ids]}``      ``{"ok": true, "leases": {id: deadline}, "clock": t}``
anything else                               ``{"ok": false, "error": "..."}``
==========================================  ==============================================

``clock`` is the server's ``time.perf_counter()`` (lease deadlines are in that clock); a
reader estimates the offset to its own clock from the query's round trip.  A bad request gets
an error reply and never stops the server.  Needs pyzmq (a vLLM dependency), not vLLM.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import SideChannelError

__all__ = ["MAX_MESSAGE", "SideChannelServer", "query", "zmq_address"]

#: Largest message accepted either way (bytes).
MAX_MESSAGE = 1 << 20
PROTOCOL = 1


def zmq_address(host: str, port: int) -> str:
    """``tcp://host:port`` (IPv6 addresses in brackets)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SideChannelError(f"not a JSON message ({type(e).__name__})") from None
    if not isinstance(msg, dict):
        raise SideChannelError(f"expected a JSON object, got {type(msg).__name__}")
    return msg


class SideChannelServer:
    """Serves requests on ``host:port`` with ``handler(message) -> reply`` (both dicts) in a
    daemon thread.  ``handler`` raising :class:`SideChannelError` sends its message back as
    the error; anything else it raises is reported as an internal error."""

    def __init__(self, host: str, port: int, handler: Callable[[dict[str, Any]], dict[str, Any]]):
        import zmq

        self.address = zmq_address(host, port)
        self._handler = handler
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        self._sock.setsockopt(zmq.RCVTIMEO, 200)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.bind(self.address)
        except zmq.ZMQError as e:
            self._sock.close()
            self._ctx.term()
            raise SideChannelError(f"cannot listen on {self.address}: {e}") from None
        self.requests = 0
        self.rejected = 0
        self._thread = threading.Thread(
            target=self._serve, name="layoutc-side-channel", daemon=True
        )
        self._thread.start()

    def _reply(self, msg: dict[str, Any]) -> dict[str, Any]:
        if msg.get("v") != PROTOCOL:
            raise SideChannelError(f"side-channel protocol {msg.get('v')!r}, expected {PROTOCOL}")
        return self._handler(msg)

    def _serve(self) -> None:
        import zmq

        while not self._stop.is_set():
            try:
                frames = self._sock.recv_multipart()
            except zmq.Again:
                continue
            except zmq.ZMQError:
                if self._stop.is_set():
                    break
                continue
            if len(frames) != 3 or frames[1] != b"":
                self.rejected += 1
                continue  # not a REQ client: nothing to answer
            self.requests += 1
            try:
                reply = self._reply(_decode(frames[2]))
            except SideChannelError as e:
                self.rejected += 1
                reply = {"ok": False, "error": str(e)}
            except Exception as e:  # noqa: BLE001 - the server must outlive a bad request
                self.rejected += 1
                reply = {"ok": False, "error": f"internal error: {type(e).__name__}"}
            data = json.dumps(reply).encode()
            if len(data) > MAX_MESSAGE:
                data = json.dumps({"ok": False, "error": "reply too large"}).encode()
            try:
                self._sock.send_multipart([frames[0], b"", data])
            except zmq.ZMQError:
                continue
        self._sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._ctx.term()


def query(
    host: str, port: int, message: dict[str, Any], timeout_s: float
) -> tuple[dict[str, Any], float]:
    """Send ``message`` to the side channel at ``host:port``; return (the reply, the offset
    of the server's clock to this process's ``time.perf_counter()``).  Raises
    :class:`SideChannelError` on no answer within ``timeout_s``, an invalid reply or an error
    reply."""
    import zmq

    address = zmq_address(host, port)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    ms = max(1, int(timeout_s * 1000))
    for opt, val in (
        (zmq.LINGER, 0),
        (zmq.RCVTIMEO, ms),
        (zmq.SNDTIMEO, ms),
        (zmq.MAXMSGSIZE, MAX_MESSAGE),
    ):
        sock.setsockopt(opt, val)
    try:
        sock.connect(address)
        t0 = time.perf_counter()
        sock.send(json.dumps({"v": PROTOCOL, **message}).encode())
        raw = sock.recv()
        t1 = time.perf_counter()
    except zmq.Again:
        raise SideChannelError(
            f"no answer from the side channel at {address} within {timeout_s:.1f} s"
        ) from None
    except zmq.ZMQError as e:
        raise SideChannelError(f"side channel at {address}: {e}") from None
    finally:
        sock.close()
    reply = _decode(raw)
    if reply.get("ok") is not True:
        err = reply.get("error")
        raise SideChannelError(
            f"side channel at {address} refused: {err if isinstance(err, str) else reply!r:.200}"
        )
    clock = reply.get("clock")
    if not isinstance(clock, int | float) or isinstance(clock, bool) or not math.isfinite(clock):
        raise SideChannelError(f"side channel at {address} sent no clock")
    return reply, float(clock) - (t0 + t1) / 2
