"""layoutc's handshake socket: the server an endpoint runs on ``listen_port``, and
:func:`connect`, its client.

The exchange (frames of :mod:`~layoutc.runtime.protocol`: ``kind | u32 length | payload``)::

    client                                      server (serviced from poll())
    HELLO     {agent, role, nonce_c, keyed}  ─►
                                             ◄─ CHALLENGE {agent, role, nonce_s, keyed, proof_s}
    (checks proof_s: the server holds the key)
    PROOF     proof_c                        ─►  (checks proof_c: O(1) work before this)
    PAYLOAD   box(header + metadata)         ─►  validates, loads, installs (unconfirmed)
                                             ◄─ PAYLOAD box(header + metadata) | REFUSE reason
    (validates, loads, installs)
    OK        confirmation                   ─►  confirmed | REFUSE: the peer is dropped

The pair keys come from both nonces and the auth key (:func:`~layoutc.runtime.auth.pair_keys`);
proofs are HMACs over the transcript (both hellos) under per-role keys, so neither side
releases its agent metadata (in a box under a per-role key, encrypted when keyed) before the
other proved the key.  Without an auth key the proofs only bind the transcript: whoever reaches
the socket can handshake, so it binds ``127.0.0.1`` unless told otherwise.

The server needs no thread (NIXL's progress thread is off and the box has two cores): the
endpoint calls :meth:`HandshakeServer.service` at the start of every ``poll()`` /
``progress()``; it accepts and reads without blocking.  At most :data:`MAX_PENDING` handshakes
wait at once (a new one evicts the oldest that has not proved the key), each for at most
:data:`HANDSHAKE_TIMEOUT_S`; each frame is capped by the state it may arrive in (a hello: 4 KiB,
a proof: 4 KiB), and the work before the proof is checked is O(1): a JSON hello of at most
4 KiB and two HMACs.  Admission itself (checks, the rule for a peer in the same place, loading)
is :class:`~.admission.Admission`'s.
"""

from __future__ import annotations

import hashlib
import logging
import select
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import auth, protocol
from ..errors import HandshakeError, LayoutcError, TransferTimeoutError, UsageError
from ..protocol import ProtocolError
from .peers import Peer
from .requests import now

if TYPE_CHECKING:
    from .admission import Admission, Candidate

__all__ = ["HANDSHAKE_TIMEOUT_S", "MAX_PENDING", "HandshakeServer", "connect"]

log = logging.getLogger("layoutc.runtime")

#: Socket handshakes in progress at once (more: the oldest that has not proved the key goes).
MAX_PENDING = 16
#: Longest a socket handshake may take on the server.
HANDSHAKE_TIMEOUT_S = 30.0
#: New connections accepted per service round.
ACCEPTS_PER_ROUND = 8
#: While no handshake is in progress, the socket is looked at this often (a poll costs
#: nothing more in between).
ACCEPT_EVERY_S = 0.001
#: Seconds between probes of a live peer in the way of a handshake.
PROBE_EVERY_S = 0.005
#: Frame size limits by state.
_LIMITS = {
    "hello": protocol.MAX_HELLO_BYTES,
    "proof": 4096,
    "payload": protocol.MAX_HANDSHAKE_BYTES,
    "confirm": 4 * protocol.MAX_TEXT_CHARS,
}


@dataclass(eq=False)
class _Conn:
    """One socket handshake (server side, or the client's)."""

    sock: socket.socket
    where: str
    deadline: float
    state: str = "hello"  # hello, proof, payload, probing, confirm, closing, closed
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    keys: auth.PairKeys | None = None
    transcript: bytes = b""
    agent: str = ""
    cand: Candidate | None = None
    probe_next: float = 0.0
    probe_end: float = 0.0
    peer: Peer | None = None  # installed, waiting for the client's confirmation
    instance: bytes = b""  # the peer endpoint's instance (its hello)
    shut: bool = False  # our side of the connection is shut (closing)

    def flush(self) -> None:
        while self.outbuf:
            try:
                n = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            del self.outbuf[:n]

    def fill(self, limit: int) -> bool:
        """Read what arrived (at most one frame of ``limit`` bytes); True at end of file."""
        cap = limit + 16
        while len(self.inbuf) < cap:
            try:
                chunk = self.sock.recv(min(1 << 20, cap - len(self.inbuf)))
            except (BlockingIOError, InterruptedError):
                return False
            if not chunk:
                return True
            self.inbuf += chunk
        return False

    def send(self, kind: bytes, payload: bytes) -> None:
        self.outbuf += protocol.encode_frame(kind, payload)
        self.flush()


def _transcript(hello: bytes, challenge: bytes) -> bytes:
    h = hashlib.sha256(b"layoutc/2 socket")
    for part in (hello, challenge):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def _finish(keys: auth.PairKeys, transcript: bytes) -> bytes:
    return auth.mac(keys.confirm_local, b"ok", transcript)


def _check_finish(keys: auth.PairKeys, transcript: bytes, got: bytes) -> bool:
    return auth.same(auth.mac(keys.confirm_peer, b"ok", transcript), got)


def _reason(payload: bytes) -> str:
    return protocol.sanitize(payload[: protocol.MAX_TEXT_CHARS].decode("utf-8", "replace"))


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------
class HandshakeServer:
    """The handshake socket of one endpoint (see the module)."""

    def __init__(self, adm: Admission, host: str, port: int) -> None:
        self.adm = adm
        self.label = adm.host.label
        self.tel = adm.tel
        self.conns: list[_Conn] = []
        if not isinstance(host, str) or not host:
            raise UsageError(f"{self.label}: listen_host must be a host name or address")
        if type(port) is not int or not 0 <= port < 1 << 16:
            raise UsageError(f"{self.label}: listen_port must be a port number, got {port!r}")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, addr = infos[0]
            srv = socket.socket(family, socket.SOCK_STREAM)
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(addr)
            srv.listen(MAX_PENDING)
            srv.setblocking(False)
        except OSError as e:
            raise UsageError(
                f"{self.label}: cannot listen for handshakes on {host}:{port}: {e.strerror or e}"
            ) from None
        self.sock: socket.socket | None = srv
        self.next_accept = 0.0
        self.host = host
        self.port = int(srv.getsockname()[1])
        if host not in ("127.0.0.1", "::1", "localhost") and not adm.keyed:
            log.warning(
                "%s: handshake socket on %s:%d without an auth key: any host that reaches it "
                "can become a peer (set auth_key= or LAYOUTC_AUTH_KEY; see docs/security.md)",
                self.label,
                host,
                self.port,
            )

    def close(self) -> None:
        for conn in list(self.conns):
            self._close(conn)
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def service(self) -> None:
        """Accept, read and answer what arrived (non-blocking)."""
        if self.sock is None:
            return
        t = now()
        if not self.conns and t < self.next_accept:
            return  # (an idle socket is looked at once per ACCEPT_EVERY_S)
        self.next_accept = t + ACCEPT_EVERY_S
        self._accept(t)
        for conn in list(self.conns):
            self._step(conn, t)
        self.tel.counters["handshakes_pending"] = len(self.conns)

    def _accept(self, t: float) -> None:
        assert self.sock is not None
        for _ in range(ACCEPTS_PER_ROUND):
            try:
                sock, addr = self.sock.accept()
            except OSError:  # (BlockingIOError: nobody waits)
                return
            sock.setblocking(False)
            if len(self.conns) >= MAX_PENDING:
                unproven = [c for c in self.conns if c.state in ("hello", "proof")]
                if not unproven:
                    self.tel.add("handshakes_dropped")
                    sock.close()
                    continue
                self._end(unproven[0], "too many handshakes at once")
            timeout = min(HANDSHAKE_TIMEOUT_S, max(1.0, self.adm.host.timeout_s))
            where = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            self.conns.append(_Conn(sock, where, t + timeout))

    def _close(self, conn: _Conn) -> None:
        try:
            conn.sock.close()
        except OSError:
            pass
        conn.state = "closed"
        if conn in self.conns:
            self.conns.remove(conn)

    def _drop_unconfirmed(self, conn: _Conn, reason: str) -> None:
        peer, conn.peer = conn.peer, None
        if peer is not None and not peer.confirmed and self.adm.peers.get(peer.name) is peer:
            self.adm.host.drop_peer(peer, reason)

    def _end(self, conn: _Conn, why: str) -> None:
        """Abandon a handshake (and the peer it installed, unconfirmed)."""
        label = conn.peer.label if conn.peer is not None else ""
        self._drop_unconfirmed(conn, f"{label}'s handshake did not finish ({why})")
        self.tel.add("handshakes_dropped")
        self._close(conn)

    def _refuse(self, conn: _Conn, reason: str, err: HandshakeError | None = None) -> None:
        """Send the reason and close; a refusal after the key was proved is remembered."""
        if err is not None:
            self.adm.refused(err)
        else:
            self.tel.add("handshakes_dropped")
        self._drop_unconfirmed(conn, reason)
        conn.state = "closing"
        conn.deadline = min(conn.deadline, now() + 1.0)
        try:
            conn.send(protocol.F_REFUSE, reason.encode("utf-8", "replace"))
        except OSError:
            self._close(conn)

    def _step(self, conn: _Conn, t: float) -> None:
        try:
            conn.flush()
            if conn.state == "closing":
                self._closing(conn, t)
                return
            if t > conn.deadline:
                self._end(conn, "timed out")
                return
            if conn.state == "probing":
                self._probe_step(conn, t)
                return
            eof = conn.fill(_LIMITS.get(conn.state, 0))
            while conn.state in _LIMITS:
                fr = protocol.take_frame(conn.inbuf, _LIMITS[conn.state])
                if fr is None:
                    break
                self._on_frame(conn, *fr)
            if eof and conn.state not in ("closing", "closed"):
                self._end(conn, "the peer closed the connection")
        except (OSError, ProtocolError) as e:
            self._end(conn, type(e).__name__)
        except HandshakeError as e:
            self._refuse(conn, str(e), e if conn.state in ("payload", "probing") else None)
        except LayoutcError as e:  # e.g. layers not registered yet
            self._refuse(conn, str(e))
        except Exception:  # noqa: BLE001 - a peer's handshake must never break the engine loop
            log.exception("%s: a socket handshake from %s failed", self.label, conn.where)
            self._end(conn, "internal error")

    def _closing(self, conn: _Conn, t: float) -> None:
        """After a refusal: once the reason is out, half-close and drain what the peer still
        sends (closing with unread bytes would reset the connection and lose the reason)."""
        if t > conn.deadline:
            self._close(conn)
            return
        if conn.outbuf:
            return
        if not conn.shut:
            conn.shut = True
            conn.sock.shutdown(socket.SHUT_WR)
        for _ in range(16):
            try:
                if not conn.sock.recv(1 << 16):
                    self._close(conn)
                    return
            except (BlockingIOError, InterruptedError):
                return

    def _on_frame(self, conn: _Conn, kind: bytes, payload: bytes) -> None:
        if conn.state == "hello" and kind == protocol.F_HELLO:
            self._on_hello(conn, payload)
        elif conn.state == "proof" and kind == protocol.F_PROOF:
            assert conn.keys is not None
            if not conn.keys.check_proof(conn.transcript, payload):
                self._refuse(
                    conn, f"{self.label}: the handshake proof fails: {self.adm.key_hint()}"
                )
                return
            conn.state = "payload"
        elif conn.state == "payload" and kind == protocol.F_PAYLOAD:
            self._on_payload(conn, payload)
        elif conn.state == "confirm" and kind == protocol.F_OK and conn.peer is not None:
            assert conn.keys is not None
            if not _check_finish(conn.keys, conn.transcript, payload):
                self._end(conn, "bad confirmation")
                return
            conn.peer.confirmed = True
            conn.peer = None
            self._close(conn)
        elif conn.state == "confirm" and kind == protocol.F_REFUSE and conn.peer is not None:
            label = conn.peer.label
            self.adm.refused(
                HandshakeError(
                    f"{self.label}: {label} refused the handshake: {_reason(payload)}", peer=label
                )
            )
            self._drop_unconfirmed(conn, f"{label} refused the handshake")
            self._close(conn)
        else:
            self._end(conn, f"unexpected frame {kind!r} in state {conn.state}")

    def _on_hello(self, conn: _Conn, payload: bytes) -> None:
        adm, host, me = self.adm, self.adm.host, self.label
        try:
            hello = protocol.parse_hello(payload, who=me)
        except HandshakeError as e:
            self._refuse(conn, str(e))
            return
        if hello.role != host.peer_role:
            self._refuse(
                conn,
                f"{me}: a {host.role} endpoint only talks to {host.peer_role} ranks, not to "
                f"a {hello.role or 'unnamed'} rank",
            )
            return
        if hello.keyed != adm.keyed:
            self._refuse(conn, f"{me}: {adm.key_hint(hello.keyed)}")
            return
        if hello.agent == host.name:
            self._refuse(conn, str(adm.own_name(hello.agent, "a peer")))
            return
        nonce = auth.new_nonce()
        conn.agent = hello.agent
        conn.keys = adm.keys_with(hello.agent, hello.nonce, nonce)
        conn.instance = hello.instance
        core = protocol.Hello(host.name, nonce, adm.keyed, role=host.role, instance=adm.nonce)
        conn.transcript = _transcript(payload, core.encode())
        chal = protocol.Hello(
            host.name,
            nonce,
            adm.keyed,
            role=host.role,
            proof=conn.keys.proof(conn.transcript),
            instance=adm.nonce,
        )
        conn.state = "proof"
        conn.send(protocol.F_CHALLENGE, chal.encode())

    def _on_payload(self, conn: _Conn, payload: bytes) -> None:
        keys = conn.keys
        assert keys is not None
        data = auth.Box(keys.box_peer, keys.keyed).open(conn.transcript, payload)
        if data is None:
            self._refuse(conn, f"{self.label}: the handshake payload fails authentication")
            return
        header, md = protocol.unpack_payload(data, who=self.label)
        if header.get("agent") != conn.agent:
            raise HandshakeError(
                f"{self.label}: the handshake's header is of another agent", field="agent"
            )
        adm = self.adm
        cand = adm.candidate(
            header, md, keys=keys, issued=time.time_ns(), fresh=adm.keyed, instance=conn.instance
        )
        conn.cand = cand
        if any(adm.decide(cand, old) == "probe" for old in adm.conflicts(cand)):
            conn.state = "probing"
            conn.probe_end = now() + adm.probe_s
            conn.deadline = max(conn.deadline, conn.probe_end + 1.0)
            self._probe_step(conn, now())
            return
        self._admit(conn)

    def _probe_step(self, conn: _Conn, t: float) -> None:
        adm, cand = self.adm, conn.cand
        assert cand is not None
        live = [old for old in adm.conflicts(cand) if adm.decide(cand, old) == "probe"]
        if live and t >= conn.probe_next:
            for old in live:
                adm.ping(old)
            conn.probe_next = t + PROBE_EVERY_S
            live = [old for old in live if old.alive]
        if not live:
            conn.state = "payload"  # (a refusal from here on is remembered)
            self._admit(conn)
        elif t > conn.probe_end:
            conn.state = "payload"
            raise adm.live_error(cand, live[0])

    def _admit(self, conn: _Conn) -> None:
        adm, cand, keys = self.adm, conn.cand, conn.keys
        assert cand is not None and keys is not None
        for old in adm.conflicts(cand):  # (the place may have changed while probing)
            if adm.decide(cand, old) == "probe":
                raise adm.live_error(cand, old)
        adm.load(cand, adm.conflicts(cand))
        conn.peer = adm.install(cand, confirmed=False)
        host = adm.host
        mine = protocol.pack_payload(host.header(), host.agent.get_agent_metadata())
        conn.state = "confirm"
        conn.send(
            protocol.F_PAYLOAD, auth.Box(keys.box_local, keys.keyed).seal(conn.transcript, mine)
        )


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------
def connect(adm: Admission, host_: str, port: int, peer_name: str | None, timeout: float) -> str:
    """Handshake with the server at ``host_:port``; the peer's label once it is installed."""
    me = adm.host.label
    if not isinstance(host_, str) or not host_:
        raise UsageError(f"{me}: connect() needs a host name or address, got {host_!r}")
    if type(port) is not int or not 0 < port < 1 << 16:
        raise UsageError(f"{me}: connect() needs a port number, got {port!r}")
    if peer_name is not None:
        problem = protocol.name_problem(peer_name, "peer_name")
        if problem:
            raise UsageError(f"{me}: {problem}")
    where = f"{host_}:{port}"
    deadline = now() + timeout
    try:
        sock = socket.create_connection((host_, port), timeout=max(0.01, timeout))
    except ConnectionRefusedError:
        raise HandshakeError(
            f"{me}: nothing listens for handshakes at {where} (connection refused): is the "
            f"peer's Endpoint created with listen_port={port}, and its listen_host an address "
            f"this host reaches?",
            field="connect",
        ) from None
    except TimeoutError:
        raise TransferTimeoutError(
            f"{me}: no connection to {where} within {timeout:.1f} s", peer=peer_name
        ) from None
    except OSError as e:
        raise HandshakeError(
            f"{me}: cannot connect to {where}: {e.strerror or e}", field="connect"
        ) from None
    with sock:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Client(adm, _Conn(sock, where, deadline), peer_name, timeout).run()


class _Client:
    def __init__(self, adm: Admission, conn: _Conn, peer_name: str | None, timeout: float) -> None:
        self.adm = adm
        self.conn = conn
        self.peer_name = peer_name
        self.timeout = timeout
        self.me = adm.host.label
        conn.state = "client"

    def wait(self, kinds: tuple[bytes, ...], limit: int) -> tuple[bytes, bytes]:
        """The next frame (of ``kinds``), progressing the endpoints of this thread meanwhile
        (a peer in this thread answers from its own poll)."""
        conn, me = self.conn, self.me
        delay = 50e-6
        while True:
            try:
                conn.flush()
                eof = conn.fill(limit)
                fr = protocol.take_frame(conn.inbuf, limit)
            except (OSError, ProtocolError) as e:
                raise HandshakeError(
                    f"{me}: the handshake with {conn.where} broke ({type(e).__name__}: {e})",
                    field="connect",
                ) from None
            if fr is not None:
                if fr[0] not in kinds:
                    raise HandshakeError(
                        f"{me}: unexpected handshake frame {fr[0]!r} from {conn.where}",
                        field="connect",
                    )
                return fr
            if eof:
                raise HandshakeError(
                    f"{me}: {conn.where} closed the handshake connection (is it a layoutc "
                    f"endpoint of this version?)",
                    field="connect",
                )
            if now() > conn.deadline:
                raise TransferTimeoutError(
                    f"{me}: {conn.where} did not answer the handshake within "
                    f"{self.timeout:.1f} s (is it polling?)"
                )
            self.adm.host.progress()
            self.adm.host.progress_others()
            try:
                select.select([conn.sock], [conn.sock] if conn.outbuf else [], [], delay)
            except (OSError, ValueError):
                pass
            delay = min(delay * 2, 0.002)

    def refuse(self, err: HandshakeError) -> HandshakeError:
        """Tell the server why (best effort); the error to raise."""
        try:
            self.conn.send(protocol.F_REFUSE, str(err).encode("utf-8", "replace"))
        except OSError:
            pass
        return err

    def run(self) -> str:
        adm, host, me, conn = self.adm, self.adm.host, self.me, self.conn
        where = conn.where
        nonce = auth.new_nonce()
        hello = protocol.Hello(
            host.name, nonce, adm.keyed, role=host.role, instance=adm.nonce
        ).encode()
        conn.outbuf += protocol.encode_frame(protocol.F_HELLO, hello)
        kind, payload = self.wait(
            (protocol.F_CHALLENGE, protocol.F_REFUSE), protocol.MAX_HELLO_BYTES
        )
        if kind == protocol.F_REFUSE:
            raise HandshakeError(
                f"{me}: {where} refused the handshake: {_reason(payload)}", field="refused"
            )
        chal = protocol.parse_hello(payload, who=me)
        if chal.role != host.peer_role:
            raise self.refuse(
                HandshakeError(
                    f"{me}: {chal.agent!r} at {where} is a {chal.role} endpoint, but a "
                    f"{host.role} endpoint only talks to {host.peer_role} ranks",
                    field="role",
                    peer_value=chal.role,
                    local_value=host.peer_role,
                )
            )
        if self.peer_name is not None and chal.agent != self.peer_name:
            raise self.refuse(
                HandshakeError(
                    f"{me}: expected agent {self.peer_name!r} at {where}, found {chal.agent!r}",
                    field="agent",
                    peer_value=chal.agent,
                    local_value=self.peer_name,
                )
            )
        if chal.agent == host.name:
            raise self.refuse(adm.own_name(chal.agent, repr(chal.agent)))
        current = adm.peers.get(chal.agent)
        if (
            current is not None
            and current.alive
            and current.confirmed
            and chal.instance
            and current.instance == chal.instance
        ):
            # already connected to this very endpoint: nothing to do (the server drops this
            # unfinished handshake; no metadata crossed)
            self.refuse(HandshakeError(f"{me}: already connected", field="connect"))
            return current.label
        if chal.keyed != adm.keyed:
            raise self.refuse(
                HandshakeError(f"{me}: {where}: {adm.key_hint(chal.keyed)}", field="auth")
            )
        keys = adm.keys_with(chal.agent, chal.nonce, nonce)
        core = protocol.Hello(
            chal.agent, chal.nonce, chal.keyed, role=chal.role, instance=chal.instance
        ).encode()
        transcript = _transcript(hello, core)
        if not keys.check_proof(transcript, chal.proof):
            raise self.refuse(
                HandshakeError(
                    f"{me}: {chal.agent!r} at {where} did not prove the auth key: {adm.key_hint()}",
                    field="auth",
                )
            )
        conn.outbuf += protocol.encode_frame(protocol.F_PROOF, keys.proof(transcript))
        mine = protocol.pack_payload(host.header(), host.agent.get_agent_metadata())
        conn.outbuf += protocol.encode_frame(
            protocol.F_PAYLOAD, auth.Box(keys.box_local, keys.keyed).seal(transcript, mine)
        )
        kind, payload = self.wait(
            (protocol.F_PAYLOAD, protocol.F_REFUSE), protocol.MAX_HANDSHAKE_BYTES
        )
        if kind == protocol.F_REFUSE:
            raise HandshakeError(
                f"{me}: {chal.agent!r} at {where} refused the handshake: {_reason(payload)}",
                peer=chal.agent,
                field="refused",
            )
        data = auth.Box(keys.box_peer, keys.keyed).open(transcript, payload)
        if data is None:
            raise self.refuse(
                HandshakeError(
                    f"{me}: the handshake payload of {where} fails authentication", field="auth"
                )
            )
        try:
            header, md = protocol.unpack_payload(data, who=me)
            if header.get("agent") != chal.agent:
                raise HandshakeError(
                    f"{me}: {where} sent the header of another agent", field="agent"
                )
            cand = adm.candidate(
                header,
                md,
                keys=keys,
                issued=time.time_ns(),
                fresh=adm.keyed,
                instance=chal.instance,
            )
            peer = adm.admit_now(cand)
        except HandshakeError as e:
            raise self.refuse(e) from None
        conn.outbuf += protocol.encode_frame(protocol.F_OK, _finish(keys, transcript))
        end = now() + 1.0
        while conn.outbuf and now() < end:
            try:
                conn.flush()
            except OSError:
                break
            if conn.outbuf:
                select.select([], [conn.sock], [], 0.01)
        return peer.label
