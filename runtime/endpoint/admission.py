"""Who may become an endpoint's peer: handshakes, keys, and the handshake socket.

An endpoint admits a peer through one of two handshakes, both ending with the same checks
(:meth:`Admission.candidate`: the header's types and ranges, then the plan), the same rule for
a peer already in the same place (:meth:`Admission.decide`) and the same loading
(:meth:`Admission.load`: NIXL metadata, then every announced buffer checked against the
memory that metadata registers):

* **Handshake bytes** (:meth:`Admission.handshake_bytes` / :meth:`Admission.add_peer`), over
  any byte channel the engine has: each side's bytes carry a fresh nonce of its endpoint and are
  sealed under a key of (auth key, that nonce) -- encrypted when an auth key is set, so only
  key holders read the metadata; authenticated either way.  Both sides derive the pair's keys
  from the two nonces (and the auth key); nothing else is exchanged.
* **The handshake socket** (``listen_port`` / :meth:`Admission.connect`), layoutc's own TCP
  socket, bound where the caller says (default ``127.0.0.1``)::

      client                                      server (serviced from poll())
      HELLO     {agent, role, nonce_c, keyed}  ─►
                                               ◄─ CHALLENGE {agent, role, nonce_s, keyed, proof_s}
      (checks proof_s: the server holds the key)
      PROOF     proof_c                        ─►  (checks proof_c: O(1) work before this)
      PAYLOAD   box(header + metadata)         ─►  validates, loads, installs (unconfirmed)
                                               ◄─ PAYLOAD box(header + metadata) | REFUSE reason
      (validates, loads, installs)
      OK        confirmation                   ─►  confirmed | REFUSE: the peer is dropped

  Proofs are HMACs over the transcript (both hellos) under per-role keys of the pair; the
  payloads are boxes under per-role keys (:class:`~layoutc.runtime.auth.Box`, encrypted when
  keyed).  So neither side releases its agent metadata before the other proved the key.
  The server needs no thread: :meth:`Admission.service` runs at the start of every ``poll()``
  / ``progress()``, non-blocking (an ``accept`` and a ``recv`` per pending connection);
  at most :data:`MAX_PENDING` connections wait at once, each for at most
  :data:`HANDSHAKE_TIMEOUT_S`, each frame capped by its state (a hello: 4 KiB).

**A live peer is replaced** -- same agent name, or same (engine, rank) -- only by a handshake
that proves the auth key (a socket handshake with a key; handshake bytes with a key made later
than the live peer's), or once the live peer is known dead: marked dead by NIXL, or failing a
probe (``PING`` until NIXL reports a disconnect, for :data:`PROBE_S`).  Re-adding the same
handshake bytes is a no-op.

**Messages** (:meth:`Admission.notif` / :meth:`Admission.open`): every notification carries the
epoch of its pair's handshake, a sequence number and an HMAC-SHA256 tag
(:class:`~layoutc.runtime.auth.Channel`); messages of unknown senders, old epochs, with bad
tags or replayed are dropped and counted before any decoding.
"""

from __future__ import annotations

import hashlib
import logging
import select
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .. import auth, nixl_compat, protocol
from .. import handshake as hs
from ..errors import CallOrderError, HandshakeError, TransferTimeoutError, UsageError
from ..plan import Plan
from ..protocol import Message, Ping, ProtocolError
from ..telemetry import Telemetry
from .buffers import LocalPages, side_of
from .peers import Peer, peer_from_header
from .plans import PlanSet
from .requests import Backoff, now

__all__ = ["Admission", "AdmissionHost", "HANDSHAKE_TIMEOUT_S", "MAX_PENDING", "PROBE_S"]

log = logging.getLogger("layoutc.runtime")

#: Seconds a live peer in the way of a new handshake is probed before the handshake is refused.
PROBE_S = 0.5
#: Socket handshakes in progress at once (more: the oldest that has not proved the key goes).
MAX_PENDING = 16
#: Longest a socket handshake may take on the server.
HANDSHAKE_TIMEOUT_S = 30.0
#: Refused handshakes remembered for ``wait_for_peers``.
MAX_REFUSALS = 16
#: Epochs of dropped peers remembered (their sequence numbers), so that handshake bytes
#: added again cannot reopen a replay window.
MAX_RETIRED = 4096
#: New connections accepted per service round.
ACCEPTS_PER_ROUND = 8


class AdmissionHost(Protocol):
    """What :class:`Admission` uses of its endpoint."""

    agent: Any
    name: str
    label: str
    role: str
    peer_role: str
    rank: int
    plans: PlanSet
    plan: Plan
    pages: LocalPages
    kinds: dict[str, tuple[str, ...]]
    timeout_s: float
    telemetry: Telemetry

    def header(self) -> dict[str, Any]:
        """The layout header this endpoint publishes."""

    def drop_peer(self, peer: Peer, reason: str) -> None:
        """Forget ``peer``: its requests fail with ``reason``, strategies release what they
        keep for it, its metadata is unloaded."""

    def mark_dead(self, peer: Peer, reason: str) -> None:
        """``peer`` is known dead: fail every request that needs it."""

    def progress(self) -> None:
        """One progress round of the endpoint (notifications are handled)."""

    def progress_others(self) -> None:
        """One progress round of the other endpoints of this thread."""


@dataclass(eq=False)
class Candidate:
    """A peer whose handshake passed every check, before it is loaded."""

    name: str
    header: dict[str, Any]
    label: str
    plan: Plan
    metadata: bytes
    keys: auth.PairKeys
    issued: int  # when the peer made the handshake (ns)
    fresh: bool  # proved the auth key in a challenge of this endpoint (socket, keyed)


@dataclass(eq=False)
class _Conn:
    """One socket handshake on the server side."""

    sock: socket.socket
    where: str
    deadline: float
    state: str = "hello"  # hello, proof, payload, probing, confirm, closing
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    keys: auth.PairKeys | None = None
    transcript: bytes = b""
    agent: str = ""
    cand: Candidate | None = None
    conflicts: list[Peer] = field(default_factory=list)
    probe_next: float = 0.0
    probe_end: float = 0.0
    peer: Peer | None = None


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


class Admission:
    """Handshakes, pair keys and message authentication of one endpoint (see the module)."""

    def __init__(
        self,
        host: AdmissionHost,
        peers: dict[str, Peer],
        *,
        auth_key: str | bytes | None,
        listen_host: str,
        listen_port: int | None,
    ) -> None:
        self.host = host
        self.peers = peers  # the endpoint's peers, by agent name (shared)
        self.tel = host.telemetry
        self.psk = auth.load_key(auth_key)
        #: nonce and time of this endpoint's handshake bytes
        self.nonce = auth.new_nonce()
        self.issued = time.time_ns()
        self.refusals: deque[tuple[HandshakeError, bool]] = deque(maxlen=MAX_REFUSALS)
        self._retired: OrderedDict[bytes, tuple[int, int]] = OrderedDict()
        self._conns: list[_Conn] = []
        self._busy = False  # inside a synchronous handshake: the socket waits
        self.server: socket.socket | None = None
        self.listen_host = listen_host
        self.listen_port: int | None = None
        if listen_port is not None:
            self._listen(listen_host, listen_port)

    @property
    def keyed(self) -> bool:
        return self.psk is not None

    # ---------------------------------------------------------------- socket server
    def _listen(self, host: str, port: int) -> None:
        if not isinstance(host, str) or not host:
            raise UsageError(f"{self.host.label}: listen_host must be a host name or address")
        if type(port) is not int or not 0 <= port < 1 << 16:
            raise UsageError(f"{self.host.label}: listen_port must be a port number, got {port!r}")
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
                f"{self.host.label}: cannot listen for handshakes on {host}:{port}: "
                f"{e.strerror or e}"
            ) from None
        self.server = srv
        self.listen_port = int(srv.getsockname()[1])
        if host not in ("127.0.0.1", "::1", "localhost"):
            log.info(
                "%s: handshake socket on %s:%d%s",
                self.host.label,
                host,
                self.listen_port,
                ""
                if self.keyed
                else " without an auth key: any host that reaches it can "
                "handshake (set auth_key= or LAYOUTC_AUTH_KEY)",
            )

    def close(self) -> None:
        """Close the socket and pending handshakes."""
        for conn in self._conns:
            self._close(conn)
        self._conns = []
        if self.server is not None:
            self.server.close()
            self.server = None

    def service(self) -> None:
        """Progress the handshake socket: accept, read, answer (non-blocking)."""
        if self._busy or self.server is None:
            return
        t = now()
        self._accept(t)
        for conn in list(self._conns):
            self._step(conn, t)
        self.tel.counters["handshakes_pending"] = len(self._conns)

    def _accept(self, t: float) -> None:
        assert self.server is not None
        for _ in range(ACCEPTS_PER_ROUND):
            try:
                sock, addr = self.server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            if len(self._conns) >= MAX_PENDING:
                unproven = [c for c in self._conns if c.state in ("hello", "proof")]
                if not unproven:
                    self.tel.add("handshakes_dropped")
                    sock.close()
                    continue
                self._end(unproven[0], "too many handshakes at once")
            timeout = min(HANDSHAKE_TIMEOUT_S, max(1.0, self.host.timeout_s))
            self._conns.append(_Conn(sock, f"{addr[0]}:{addr[1]}", t + timeout))

    def _close(self, conn: _Conn) -> None:
        try:
            conn.sock.close()
        except OSError:
            pass
        conn.state = "closed"
        if conn in self._conns:
            self._conns.remove(conn)

    def _end(self, conn: _Conn, why: str) -> None:
        """Abandon a handshake (nothing was admitted, or the admitted peer is dropped)."""
        if conn.peer is not None and not conn.peer.confirmed:
            self.host.drop_peer(conn.peer, f"{conn.peer.label}'s handshake did not finish ({why})")
        conn.peer = None
        self.tel.add("handshakes_dropped")
        self._close(conn)

    def _send_frame(self, conn: _Conn, kind: bytes, payload: bytes) -> None:
        conn.outbuf += protocol.encode_frame(kind, payload)
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.outbuf:
            try:
                n = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            del conn.outbuf[:n]

    def _refuse(self, conn: _Conn, reason: str, err: HandshakeError | None = None) -> None:
        """Send the reason and close; a refusal after the key was proved is remembered."""
        if err is not None:
            self.refusals.append((err, self.keyed))
            self.tel.add("handshakes_refused")
        else:
            self.tel.add("handshakes_dropped")
        if conn.peer is not None and not conn.peer.confirmed:
            self.host.drop_peer(conn.peer, reason)
            conn.peer = None
        conn.outbuf += protocol.encode_frame(protocol.F_REFUSE, reason.encode("utf-8", "replace"))
        conn.state = "closing"
        conn.deadline = min(conn.deadline, now() + 1.0)
        try:
            self._flush(conn)
        except OSError:
            self._close(conn)

    def _limit(self, conn: _Conn) -> int:
        if conn.state == "hello":
            return protocol.MAX_HELLO_BYTES
        if conn.state == "proof":
            return 4096
        if conn.state == "payload":
            return protocol.MAX_HANDSHAKE_BYTES
        if conn.state == "confirm":
            return 4 * protocol.MAX_TEXT_CHARS
        return 0

    def _fill(self, conn: _Conn) -> bool:
        """Read what arrived (at most one frame of the state's size); True at end of file."""
        cap = self._limit(conn) + 16
        while len(conn.inbuf) < cap:
            try:
                chunk = conn.sock.recv(min(1 << 20, cap - len(conn.inbuf)))
            except (BlockingIOError, InterruptedError):
                return False
            if not chunk:
                return True
            conn.inbuf += chunk
        return False

    def _step(self, conn: _Conn, t: float) -> None:
        try:
            self._flush(conn)
            if conn.state == "closing":
                if not conn.outbuf or t > conn.deadline:
                    self._close(conn)
                return
            if t > conn.deadline:
                self._end(conn, "timed out")
                return
            if conn.state == "probing":
                self._probe_step(conn, t)
                return
            eof = self._fill(conn)
            while conn.state in ("hello", "proof", "payload", "confirm"):
                fr = protocol.take_frame(conn.inbuf, self._limit(conn))
                if fr is None:
                    break
                self._on_frame(conn, *fr)
            if eof and conn.state not in ("closing", "closed"):
                self._end(conn, "the peer closed the connection")
        except (OSError, ProtocolError) as e:
            self._end(conn, f"{type(e).__name__}")
        except HandshakeError as e:
            self._refuse(conn, str(e), e if conn.state in ("payload", "probing") else None)

    def _on_frame(self, conn: _Conn, kind: bytes, payload: bytes) -> None:
        me = self.host.label
        if conn.state == "hello" and kind == protocol.F_HELLO:
            self._on_hello(conn, payload)
        elif conn.state == "proof" and kind == protocol.F_PROOF:
            assert conn.keys is not None
            if not conn.keys.check_proof(conn.transcript, payload):
                self._refuse(conn, f"{me}: the handshake proof fails: {self._key_hint()}")
                return
            conn.state = "payload"
        elif conn.state == "payload" and kind == protocol.F_PAYLOAD:
            self._on_payload(conn, payload)
        elif conn.state == "confirm" and kind == protocol.F_OK:
            assert conn.keys is not None and conn.peer is not None
            if not _check_finish(conn.keys, conn.transcript, payload):
                self._end(conn, "bad confirmation")
                return
            conn.peer.confirmed = True
            conn.peer = None
            self._close(conn)
        elif conn.state == "confirm" and kind == protocol.F_REFUSE:
            peer = conn.peer
            assert peer is not None
            why = _reason(payload)
            err = HandshakeError(
                f"{me}: {peer.label} refused the handshake: {why}", peer=peer.label
            )
            self.refusals.append((err, self.keyed))
            self.tel.add("handshakes_refused")
            self.host.drop_peer(peer, f"{peer.label} refused the handshake")
            conn.peer = None
            self._close(conn)
        else:
            self._end(conn, f"unexpected frame {kind!r} in state {conn.state}")

    def _key_hint(self) -> str:
        return (
            "the two endpoints have different auth keys"
            if self.keyed
            else "the peer uses an auth key, this endpoint has none"
        )

    def _on_hello(self, conn: _Conn, payload: bytes) -> None:
        me, host = self.host.label, self.host
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
        if hello.keyed != self.keyed:
            self._refuse(
                conn,
                f"{me}: "
                + (
                    "this endpoint requires an auth key and the peer has none"
                    if self.keyed
                    else "the peer uses an auth key, this endpoint has none"
                )
                + ": give both the same auth_key= (or $LAYOUTC_AUTH_KEY)",
            )
            return
        if hello.agent == host.name:
            self._refuse(conn, self._own_name(hello.agent, "a peer").args[0])
            return
        nonce = auth.new_nonce()
        conn.agent = hello.agent
        conn.keys = auth.pair_keys(
            self.psk,
            local_role=host.role,
            local_name=host.name,
            local_nonce=nonce,
            peer_name=hello.agent,
            peer_nonce=hello.nonce,
        )
        core = protocol.Hello(host.name, nonce, self.keyed, role=host.role)
        conn.transcript = _transcript(payload, core.encode())
        chal = protocol.Hello(
            host.name, nonce, self.keyed, role=host.role, proof=conn.keys.proof(conn.transcript)
        )
        conn.state = "proof"
        self._send_frame(conn, protocol.F_CHALLENGE, chal.encode())

    def _on_payload(self, conn: _Conn, payload: bytes) -> None:
        me = self.host.label
        keys = conn.keys
        assert keys is not None
        data = auth.Box(keys.box_peer, keys.keyed).open(conn.transcript, payload)
        if data is None:
            self._refuse(conn, f"{me}: the handshake payload fails authentication")
            return
        header, md = protocol.unpack_payload(data, who=me)
        if header.get("agent") != conn.agent:
            raise HandshakeError(f"{me}: the handshake's header is of another agent", field="agent")
        cand = self.candidate(header, md, keys=keys, issued=time.time_ns(), fresh=self.keyed)
        conn.cand = cand
        conn.conflicts = self.conflicts(cand)
        verdicts = [self.decide(cand, old) for old in conn.conflicts]
        if "probe" in verdicts:
            conn.state = "probing"
            conn.probe_end = now() + PROBE_S
            conn.deadline = max(conn.deadline, conn.probe_end + 1.0)
            self._probe_step(conn, now())
            return
        self._server_admit(conn)

    def _probe_step(self, conn: _Conn, t: float) -> None:
        cand = conn.cand
        assert cand is not None
        if t >= conn.probe_next:
            for old in conn.conflicts:
                if old.alive:
                    self.ping(old)
            conn.probe_next = t + 0.005
        if all(not old.alive for old in conn.conflicts):
            conn.state = "payload"  # (for the error classification)
            self._server_admit(conn)
        elif t > conn.probe_end:
            conn.state = "payload"
            raise self._live(cand, next(o for o in conn.conflicts if o.alive))

    def _server_admit(self, conn: _Conn) -> None:
        cand, keys = conn.cand, conn.keys
        assert cand is not None and keys is not None
        self.load(cand, conn.conflicts)
        conn.peer = self.install(cand, confirmed=False)
        payload = protocol.pack_payload(self.host.header(), self.host.agent.get_agent_metadata())
        conn.state = "confirm"
        self._send_frame(
            conn,
            protocol.F_PAYLOAD,
            auth.Box(keys.box_local, keys.keyed).seal(conn.transcript, payload),
        )

    # ---------------------------------------------------------------- checks
    def validate(self, header: dict[str, Any]) -> tuple[str, Plan]:
        """Check a peer's header (shape, then against the plan for its TP); (its label, that
        plan)."""
        host = self.host
        if not host.pages.registered:
            raise CallOrderError(f"{host.label}: call register_layers() before adding peers")
        hs.check_shape(header, me=host.label)
        who = hs.peer_name(header, host.peer_role)
        peer_tp = header["layout"]["tp"]
        if header["role"] == host.peer_role:
            plan = host.plans.for_peer(peer_tp, f"{host.label}: {who}")
        else:
            plan = host.plan  # (validate_header refuses the role, naming both)
        label = hs.validate_header(
            header,
            plan=plan,
            local_role=host.role,
            local_rank=host.rank,
            local_layers=host.pages.local_layers(),
            kinds=host.kinds,
        )
        engine = header["engine"]
        for other in self.peers.values():
            same = other.name == header["agent"] or other.rank == header["rank"]
            if other.engine == engine and other.tp != peer_tp and other.alive and not same:
                raise HandshakeError(
                    f"{host.label}: {label} of engine {engine!r} runs at TP {peer_tp}, but "
                    f"{other.label} of the same engine at TP {other.tp}",
                    peer=label,
                    field="tp",
                    peer_value=peer_tp,
                    local_value=other.tp,
                )
        return label, plan

    def _own_name(self, name: str, label: str) -> HandshakeError:
        return HandshakeError(
            f"{self.host.label}: {label} uses this endpoint's own agent name {name!r}; NIXL "
            f"tells agents apart by name: give the two engines different engine= ids "
            f"(the default name is '<engine>-<rank>') or pass name=",
            peer=label,
            field="agent",
            peer_value=name,
            local_value=self.host.name,
        )

    def candidate(
        self,
        header: dict[str, Any],
        metadata: bytes,
        *,
        keys: auth.PairKeys,
        issued: int,
        fresh: bool,
    ) -> Candidate:
        """Every check of a peer's header (:class:`HandshakeError` on the first that fails)."""
        label, plan = self.validate(header)
        name = header["agent"]
        if name == self.host.name:
            raise self._own_name(name, label)
        return Candidate(name, header, label, plan, metadata, keys, issued, fresh)

    def conflicts(self, cand: Candidate) -> list[Peer]:
        """Peers in the candidate's place: the same agent name, or the same (engine, rank)."""
        h = cand.header
        return [
            p
            for p in self.peers.values()
            if p.name == cand.name or (p.engine == h["engine"] and p.rank == h["rank"])
        ]

    def decide(self, cand: Candidate, old: Peer) -> str:
        """``"replace"`` ``old`` by the candidate, or ``"probe"`` it first (replace if dead)."""
        if not old.alive or cand.fresh:
            return "replace"
        if self.keyed and cand.issued > old.issued:
            return "replace"  # a later handshake that proves the key (a restarted rank)
        return "probe"

    def _live(self, cand: Candidate, old: Peer) -> HandshakeError:
        return HandshakeError(
            f"{self.host.label}: {cand.label} of engine {cand.header['engine']!r} (agent "
            f"{cand.name!r}) would replace {old.label} of engine {old.engine!r} (agent "
            f"{old.name!r}), which is connected and answering; a live peer is replaced only "
            f"by a handshake that proves the auth key (auth_key= or $LAYOUTC_AUTH_KEY on both "
            f"sides), or once it is known dead",
            peer=cand.label,
            field="agent",
            peer_value=cand.name,
            local_value=old.name,
        )

    def ping(self, peer: Peer) -> None:
        """Send ``peer`` a ``PING``; a disconnect NIXL reports marks it dead."""
        try:
            self.host.agent.send_notif(peer.name, self.notif(peer, Ping()))
        except nixl_compat.nixl_errors() as e:
            if nixl_compat.is_disconnect(e):
                self.host.mark_dead(peer, "NIXL reported a remote disconnect")
            else:
                self.host.mark_dead(peer, f"NIXL could not reach it ({nixl_compat.error_name(e)})")

    def _probe(self, peer: Peer) -> bool:
        """Probe ``peer`` for up to :data:`PROBE_S`; True when it is (now known) dead."""
        end = now() + PROBE_S
        delay = 0.001
        while peer.alive:
            self.ping(peer)
            if not peer.alive or now() > end:
                break
            self.host.progress()
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return not peer.alive

    def _inside(self, cand: Candidate) -> bool:
        """Is every buffer the candidate announced inside the memory its metadata registers?"""
        rows = [entry[:3] for layer in cand.header["layers"] for entry in layer["pages"].values()]
        st = cand.header.get("staging")
        if st is not None:
            rows.append([st["addr"], st["nbytes"], st["devid"]])
        arr = np.array(rows, dtype=np.uint64).reshape(-1, 3)
        agent = self.host.agent
        try:
            descs = agent.get_xfer_descs(arr, cand.header["mem_type"])
            return bool(agent.check_remote_metadata(cand.name, descs))
        except nixl_compat.nixl_errors():
            return False

    def load(self, cand: Candidate, conflicts: list[Peer]) -> None:
        """Drop the peers the candidate replaces, load its metadata and check its buffers."""
        host, me, label, name = self.host, self.host.label, cand.label, cand.name
        for old in conflicts:
            if old.name in self.peers:
                self.tel.add("peers_replaced")
                host.drop_peer(old, f"{old.label} was replaced by a new handshake (restarted)")
        agent = host.agent
        if name not in self.peers:
            try:
                agent.remove_remote_agent(name)  # (a leftover nobody uses)
            except nixl_compat.nixl_errors():
                pass
        try:
            loaded = agent.add_remote_agent(cand.metadata)
        except nixl_compat.nixl_errors() as e:
            raise HandshakeError(
                f"{me}: NIXL refused {label}'s agent metadata ({nixl_compat.error_name(e)})",
                peer=label,
                field="agent metadata",
            ) from None
        loaded = loaded.decode("utf-8", "replace") if isinstance(loaded, bytes) else str(loaded)
        if loaded != name:
            if loaded not in self.peers:
                try:
                    agent.remove_remote_agent(loaded)
                except nixl_compat.nixl_errors():
                    pass
            raise HandshakeError(
                f"{me}: {label}'s header names agent {name!r} but its metadata is for agent "
                f"{protocol.sanitize(loaded)!r}",
                peer=label,
                field="agent",
                peer_value=protocol.sanitize(loaded),
                local_value=name,
            )
        if not self._inside(cand):
            try:
                agent.remove_remote_agent(name)
            except nixl_compat.nixl_errors():
                pass
            raise HandshakeError(
                f"{me}: {label} announces buffers outside the memory its agent metadata registers",
                peer=label,
                field="layers",
            )

    def install(self, cand: Candidate, *, confirmed: bool = True) -> Peer:
        peer = peer_from_header(
            cand.name, cand.header, cand.label, cand.plan, side_of(cand.plan, self.host.peer_role)
        )
        channel = auth.Channel(cand.keys)
        old = self._retired.pop(cand.keys.epoch, None)
        if old is not None:  # the same handshake again: sequence numbers go on
            channel.sent = old[0]
            channel.window = auth.ReplayWindow(floor=old[1])
        peer.channel = channel
        peer.issued = cand.issued
        peer.confirmed = confirmed
        self.peers[cand.name] = peer
        return peer

    def retire(self, peer: Peer) -> None:
        """``peer`` is dropped: remember its epoch's sequence numbers."""
        ch = peer.channel
        if ch is None:
            return
        self._retired[ch.epoch] = (ch.sent, ch.window.hi)
        self._retired.move_to_end(ch.epoch)
        while len(self._retired) > MAX_RETIRED:
            self._retired.popitem(last=False)

    # ---------------------------------------------------------------- handshake bytes
    def handshake_bytes(self) -> bytes:
        header = self.host.header()
        md = self.host.agent.get_agent_metadata()
        return protocol.encode_handshake(
            header, md, nonce=self.nonce, psk=self.psk, issued=self.issued
        )

    def add_peer(self, data: Any) -> str:
        """Admit the peer of handshake bytes; :class:`HandshakeError` (nothing loaded, nothing
        dropped) on anything wrong with them.  Returns the peer's label."""
        host = self.host
        if not host.pages.registered:
            raise CallOrderError(f"{host.label}: call register_layers() before adding peers")
        shake = protocol.decode_handshake(data, who=host.label, psk=self.psk)
        keys = auth.pair_keys(
            self.psk,
            local_role=host.role,
            local_name=host.name,
            local_nonce=self.nonce,
            peer_name=shake.hello.agent,
            peer_nonce=shake.hello.nonce,
        )
        cand = self.candidate(
            shake.header, shake.metadata, keys=keys, issued=shake.hello.issued, fresh=False
        )
        current = self.peers.get(cand.name)
        if (
            current is not None
            and current.alive
            and current.channel is not None
            and auth.same(current.channel.epoch, keys.epoch)
        ):
            return current.label  # the same handshake again
        self._busy = True
        try:
            conflicts = self.conflicts(cand)
            for old in conflicts:
                if self.decide(cand, old) == "probe" and not self._probe(old):
                    raise self._live(cand, old)
            conflicts = [p for p in conflicts if p.name in self.peers]
            self.load(cand, conflicts)
        finally:
            self._busy = False
        return self.install(cand).label

    # ---------------------------------------------------------------- connect (client)
    def connect(self, host_: str, port: int, peer_name: str | None, timeout: float) -> str:
        me = self.host.label
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
                f"peer's Endpoint created with listen_port={port}, and its listen_host an "
                f"address this host reaches?",
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
        self._busy = True
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return self._client(_Conn(sock, where, deadline), peer_name, timeout)
        finally:
            self._busy = False
            sock.close()

    def _await(
        self, conn: _Conn, kinds: tuple[bytes, ...], limit: int, timeout: float
    ) -> tuple[bytes, bytes]:
        me = self.host.label
        delay = 50e-6
        conn.state = "client"
        while True:
            try:
                self._flush(conn)
                eof = False
                cap = limit + 16
                while len(conn.inbuf) < cap:
                    try:
                        chunk = conn.sock.recv(min(1 << 20, cap - len(conn.inbuf)))
                    except (BlockingIOError, InterruptedError):
                        break
                    if not chunk:
                        eof = True
                        break
                    conn.inbuf += chunk
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
                    f"{me}: {conn.where} did not answer the handshake within {timeout:.1f} s "
                    f"(is it polling?)"
                )
            self.host.progress()
            self.host.progress_others()
            try:
                select.select([conn.sock], [conn.sock] if conn.outbuf else [], [], delay)
            except (OSError, ValueError):
                pass
            delay = min(delay * 2, 0.002)

    def _client(self, conn: _Conn, peer_name: str | None, timeout: float) -> str:
        host, me, where = self.host, self.host.label, conn.where
        nonce = auth.new_nonce()
        hello = protocol.Hello(host.name, nonce, self.keyed, role=host.role).encode()
        conn.outbuf += protocol.encode_frame(protocol.F_HELLO, hello)
        kind, payload = self._await(
            conn, (protocol.F_CHALLENGE, protocol.F_REFUSE), protocol.MAX_HELLO_BYTES, timeout
        )
        if kind == protocol.F_REFUSE:
            raise HandshakeError(
                f"{me}: {where} refused the handshake: {_reason(payload)}", field="refused"
            )
        chal = protocol.parse_hello(payload, who=me)

        def refuse(err: HandshakeError) -> HandshakeError:
            conn.outbuf += protocol.encode_frame(protocol.F_REFUSE, str(err).encode("utf-8"))
            try:
                self._flush(conn)
            except OSError:
                pass
            return err

        if chal.role != host.peer_role:
            raise refuse(
                HandshakeError(
                    f"{me}: {chal.agent!r} at {where} is a {chal.role} endpoint, but a "
                    f"{host.role} endpoint only talks to {host.peer_role} ranks",
                    field="role",
                    peer_value=chal.role,
                    local_value=host.peer_role,
                )
            )
        if peer_name is not None and chal.agent != peer_name:
            raise refuse(
                HandshakeError(
                    f"{me}: expected agent {peer_name!r} at {where}, found {chal.agent!r}",
                    field="agent",
                    peer_value=chal.agent,
                    local_value=peer_name,
                )
            )
        if chal.agent == host.name:
            raise refuse(self._own_name(chal.agent, repr(chal.agent)))
        if chal.keyed != self.keyed:
            raise refuse(HandshakeError(f"{me}: {where}: {self._key_hint()}", field="auth"))
        keys = auth.pair_keys(
            self.psk,
            local_role=host.role,
            local_name=host.name,
            local_nonce=nonce,
            peer_name=chal.agent,
            peer_nonce=chal.nonce,
        )
        core = protocol.Hello(chal.agent, chal.nonce, chal.keyed, role=chal.role).encode()
        transcript = _transcript(hello, core)
        if not keys.check_proof(transcript, chal.proof):
            raise refuse(
                HandshakeError(
                    f"{me}: {chal.agent!r} at {where} did not prove the auth key: "
                    f"{self._key_hint() if not self.keyed else 'the two endpoints have different auth keys'}",
                    field="auth",
                )
            )
        conn.outbuf += protocol.encode_frame(protocol.F_PROOF, keys.proof(transcript))
        mine = protocol.pack_payload(host.header(), host.agent.get_agent_metadata())
        conn.outbuf += protocol.encode_frame(
            protocol.F_PAYLOAD, auth.Box(keys.box_local, keys.keyed).seal(transcript, mine)
        )
        kind, payload = self._await(
            conn, (protocol.F_PAYLOAD, protocol.F_REFUSE), protocol.MAX_HANDSHAKE_BYTES, timeout
        )
        if kind == protocol.F_REFUSE:
            raise HandshakeError(
                f"{me}: {chal.agent!r} at {where} refused the handshake: {_reason(payload)}",
                peer=chal.agent,
                field="refused",
            )
        data = auth.Box(keys.box_peer, keys.keyed).open(transcript, payload)
        if data is None:
            raise refuse(
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
            cand = self.candidate(header, md, keys=keys, issued=time.time_ns(), fresh=self.keyed)
            conflicts = self.conflicts(cand)
            for old in conflicts:
                if self.decide(cand, old) == "probe" and not self._probe(old):
                    raise self._live(cand, old)
            self.load(cand, [p for p in conflicts if p.name in self.peers])
        except HandshakeError as e:
            raise refuse(e) from None
        peer = self.install(cand)
        conn.outbuf += protocol.encode_frame(protocol.F_OK, _finish(keys, transcript))
        end = now() + 1.0
        while conn.outbuf and now() < end:
            try:
                self._flush(conn)
            except OSError:
                break
            if conn.outbuf:
                select.select([], [conn.sock], [], 0.01)
        return peer.label

    # ---------------------------------------------------------------- wait for peers
    def wait_for_peers(self, count: int | None, engine: str | None, timeout: float) -> list[str]:
        host = self.host
        deadline = now() + timeout
        waiter = Backoff()
        single = host.plans.single_peer_tp()
        while True:
            host.progress()
            keyed = [e for e, k in self.refusals if k]
            if keyed:
                self.refusals.clear()
                raise keyed[-1]
            have = [
                p
                for p in self.peers.values()
                if p.confirmed and (engine is None or p.engine == engine)
            ]
            if count is not None:
                want = count
            elif single is not None:
                want = single
            else:
                want = max(1, sum({p.engine: p.tp for p in have}.values()))
            if len(have) >= want:
                return sorted(p.label for p in have)
            if now() > deadline:
                msg = (
                    f"{host.label}: {len(have)} of {want} {host.peer_role} ranks connected "
                    f"after {timeout:.1f} s"
                )
                if self.refusals:
                    err = self.refusals[-1][0]
                    self.refusals.clear()
                    raise HandshakeError(
                        f"{msg}; refused: {err}",
                        peer=err.peer,
                        field=err.field,
                        peer_value=err.peer_value,
                        local_value=err.local_value,
                    )
                raise TransferTimeoutError(msg)
            waiter.sleep()

    # ---------------------------------------------------------------- messages
    def notif(self, peer: Peer, msg: Message) -> bytes:
        """``msg`` to ``peer`` as a notification: framed, numbered and tagged."""
        ch = peer.channel
        if ch is None:
            raise CallOrderError(f"{self.host.label}: no handshake with {peer.label}")
        body = protocol.encode_body(msg)
        epoch, seq, tag = ch.seal(body)
        return protocol.frame(epoch, seq, tag, body)

    def open(self, sender: str, raw: bytes) -> tuple[Peer, Message] | None:
        """The sender and message of an authentic, new, well-formed notification; None when it
        is dropped (and counted)."""
        try:
            epoch, seq, tag, body = protocol.split_frame(raw)
        except ProtocolError:
            self.tel.add("dropped_malformed")
            return None
        peer = self.peers.get(sender)
        if peer is None or peer.channel is None:
            self.tel.add("dropped_unknown_sender")
            return None
        why = peer.channel.open(epoch, seq, tag, body)
        if why is not None:
            self.tel.add(f"dropped_{why}")
            return None
        try:
            return peer, protocol.decode_body(body)
        except ProtocolError:
            self.tel.add("dropped_malformed")
            return None
