"""A hostile process for the runtime's security tests: raw NIXL agents and raw sockets.

The handler (:class:`Attacker`, a :mod:`layoutc.tools.harness` worker) holds NIXL agents of any
name -- a stranger's, or one named like a real peer -- that load a victim's agent metadata and
send it whatever notifications a test gives; and it speaks (or breaks) the handshake socket
protocol byte by byte.  It never uses an :class:`~layoutc.runtime.endpoint.Endpoint`: it has
no keys, only what it can read or replay.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from layoutc.tools.harness import Worker as HarnessWorker


class Attacker:
    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.agents: dict[str, Any] = {}
        self.buffers: dict[str, Any] = {}
        self.socks: list[socket.socket] = []

    # -- NIXL ------------------------------------------------------------------------------------
    def agent(self, name: str) -> bytes:
        """A raw NIXL agent ``name`` (progress thread off) with a small registered buffer; its
        metadata."""
        import torch
        from layoutc.runtime import nixl_compat

        a = nixl_compat.create_agent(name)
        t = torch.zeros(1 << 16, dtype=torch.uint8)
        a.register_memory(t)
        self.agents[name], self.buffers[name] = a, t
        return a.get_agent_metadata()

    def load(self, name: str, metadata: bytes) -> str:
        """Load a victim's metadata into agent ``name``; the victim's agent name."""
        got = self.agents[name].add_remote_agent(metadata)
        return got.decode() if isinstance(got, bytes) else str(got)

    def send(self, name: str, target: str, frames: list[bytes]) -> int:
        """Send ``frames`` from agent ``name`` to agent ``target`` (progressing as it goes)."""
        a = self.agents[name]
        for i, f in enumerate(frames):
            a.send_notif(target, f)
            if i % 64 == 63:
                a.get_new_notifs()
        self._flush(a)
        return len(frames)

    def flood(self, name: str, target: str, template: bytes, n: int) -> int:
        """Send ``template % i`` for i in range(n) (unique messages) from ``name``."""
        a = self.agents[name]
        for i in range(n):
            a.send_notif(target, template % i)
            if i % 64 == 63:
                a.get_new_notifs()
        self._flush(a)
        return n

    def _flush(self, a: Any) -> None:
        end = time.monotonic() + 0.2
        while time.monotonic() < end:
            a.get_new_notifs()
            time.sleep(0.001)

    def tick(self) -> bool:
        for a in self.agents.values():
            try:
                a.get_new_notifs()
            except Exception:  # noqa: BLE001 - a stranger does not care
                pass
        return False

    # -- the handshake socket --------------------------------------------------------------------
    def exchange(
        self, host: str, port: int, chunks: list[bytes], read_s: float = 1.0
    ) -> list[tuple[bytes, bytes]]:
        """Connect, send ``chunks`` (raw bytes), read for ``read_s``; the frames received
        (kind, payload) -- the last one ``(b"", rest)`` when bytes that are no frame remain."""
        from layoutc.runtime import protocol

        with socket.create_connection((host, port), timeout=5) as s:
            for c in chunks:
                s.sendall(c)
            s.settimeout(0.05)
            buf = bytearray()
            end = time.monotonic() + read_s
            while time.monotonic() < end:
                try:
                    data = s.recv(1 << 20)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                buf += data
        out = []
        while True:
            fr = protocol.take_frame(buf, 1 << 30)
            if fr is None:
                break
            out.append(fr)
        if buf:
            out.append((b"", bytes(buf)))
        return out

    def hold(self, host: str, port: int, n: int, data: bytes) -> int:
        """Open ``n`` connections, send ``data`` on each and keep them open."""
        for _ in range(n):
            s = socket.create_connection((host, port), timeout=5)
            if data:
                s.sendall(data)
            self.socks.append(s)
        return n

    def hold_closed(self) -> int:
        """How many of the held connections the server closed."""
        closed = 0
        for s in self.socks:
            s.setblocking(False)
            try:
                closed += s.recv(1 << 16) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        return closed

    def release(self) -> None:
        for s in self.socks:
            s.close()
        self.socks = []

    def close(self) -> None:
        self.release()


def attacker() -> HarnessWorker:
    return HarnessWorker("rt_attack:Attacker", label="attacker", device="cpu")
