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
  socket (:mod:`.handshake_socket`), bound where the caller says (default ``127.0.0.1``): a
  challenge-response in which both sides prove the key before either releases its agent
  metadata.

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

import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .. import auth, nixl_compat, protocol
from .. import handshake as hs
from ..errors import CallOrderError, HandshakeError, TransferTimeoutError
from ..plan import Plan
from ..protocol import Message, Ping, ProtocolError
from ..telemetry import Telemetry
from . import handshake_socket
from .buffers import LocalPages, side_of
from .peers import Peer, peer_from_header
from .plans import PlanSet
from .requests import Backoff, now

__all__ = ["Admission", "AdmissionHost", "Candidate", "PROBE_S"]

#: Seconds a live peer in the way of a new handshake is probed before the handshake is refused.
PROBE_S = 0.5
#: Refused handshakes remembered for ``wait_for_peers``.
MAX_REFUSALS = 16
#: Epochs of dropped peers remembered (their sequence numbers), so that handshake bytes
#: added again cannot reopen a replay window.
MAX_RETIRED = 4096


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
    instance: bytes = b""  # the peer endpoint's own nonce (names its instance)


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
        self.busy = False  # inside a synchronous handshake: the socket waits
        self.probe_s = PROBE_S
        self.listen_host = listen_host
        self.server: handshake_socket.HandshakeServer | None = None
        if listen_port is not None:
            self.server = handshake_socket.HandshakeServer(self, listen_host, listen_port)

    @property
    def keyed(self) -> bool:
        return self.psk is not None

    # ---------------------------------------------------------------- the socket
    @property
    def listen_port(self) -> int | None:
        return None if self.server is None else self.server.port

    def close(self) -> None:
        """Close the handshake socket and the handshakes in progress."""
        if self.server is not None:
            self.server.close()
            self.server = None

    def service(self) -> None:
        """Progress the handshake socket (non-blocking; not inside a handshake of this
        endpoint's own)."""
        if self.server is not None and not self.busy:
            self.server.service()

    def connect(self, host: str, port: int, peer_name: str | None, timeout: float) -> str:
        self.busy = True
        try:
            return handshake_socket.connect(self, host, port, peer_name, timeout)
        finally:
            self.busy = False

    def key_hint(self, peer_keyed: bool | None = None) -> str:
        """Why two endpoints' keys do not agree, and the fix."""
        if peer_keyed is not None and peer_keyed != self.keyed:
            why = (
                "the peer uses an auth key, this endpoint has none"
                if peer_keyed
                else "this endpoint requires an auth key and the peer has none"
            )
        else:
            why = "the two endpoints hold different auth keys"
        return f"{why}: give both the same auth_key= (or $LAYOUTC_AUTH_KEY)"

    def keys_with(self, agent: str, peer_nonce: bytes, local_nonce: bytes) -> auth.PairKeys:
        host = self.host
        return auth.pair_keys(
            self.psk,
            local_role=host.role,
            local_name=host.name,
            local_nonce=local_nonce,
            peer_name=agent,
            peer_nonce=peer_nonce,
        )

    def refused(self, err: HandshakeError) -> None:
        """A handshake that proved the key (or none is set) was refused (``wait_for_peers``)."""
        self.refusals.append((err, self.keyed))
        self.tel.add("handshakes_refused")

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
            params = header["layout"]["params"]
            plan = host.plans.for_peer(peer_tp, f"{host.label}: {who}", params)
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

    def own_name(self, name: str, label: str) -> HandshakeError:
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
        instance: bytes = b"",
    ) -> Candidate:
        """Every check of a peer's header (:class:`HandshakeError` on the first that fails)."""
        label, plan = self.validate(header)
        name = header["agent"]
        if name == self.host.name:
            raise self.own_name(name, label)
        return Candidate(name, header, label, plan, metadata, keys, issued, fresh, instance)

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

    def live_error(self, cand: Candidate, old: Peer) -> HandshakeError:
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

    def probe(self, peer: Peer) -> bool:
        """Probe ``peer`` for up to :data:`PROBE_S`; True when it is (now known) dead."""
        end = now() + self.probe_s
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
        h = cand.header
        regions = {
            h["mem_type"]: [entry[:3] for layer in h["layers"] for entry in layer["pages"].values()]
        }
        st = h.get("staging")
        if st is not None:  # (a GPU endpoint may stage in host memory)
            regions.setdefault(st.get("mem", h["mem_type"]), []).append(
                [st["addr"], st["nbytes"], st["devid"]]
            )
        agent = self.host.agent
        try:
            for mem, rows in regions.items():
                descs = agent.get_xfer_descs(np.array(rows, dtype=np.uint64).reshape(-1, 3), mem)
                if not agent.check_remote_metadata(cand.name, descs):
                    return False
            return True
        except nixl_compat.nixl_errors():
            return False

    def load(self, cand: Candidate, conflicts: list[Peer]) -> None:
        """Load the candidate's metadata and check its buffers, then drop the peers it
        replaces.  A peer of the same agent name goes first (NIXL holds one metadata per
        name): when loading then fails, it is gone already (it was dead, or outranked by a
        proof of the key); the others stay."""
        host, me, label, name = self.host, self.host.label, cand.label, cand.name
        current = [old for old in conflicts if self.peers.get(old.name) is old]

        def drop(old: Peer) -> None:
            self.tel.add("peers_replaced")
            host.drop_peer(old, f"{old.label} was replaced by a new handshake (restarted)")

        for old in current:
            if old.name == name:
                drop(old)
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
        for old in current:
            if old.name != name:
                drop(old)

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
        peer.instance = cand.instance
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
        keys = self.keys_with(shake.hello.agent, shake.hello.nonce, self.nonce)
        cand = self.candidate(
            shake.header,
            shake.metadata,
            keys=keys,
            issued=shake.hello.issued,
            fresh=False,
            instance=shake.hello.nonce,
        )
        current = self.peers.get(cand.name)
        if (
            current is not None
            and current.alive
            and current.channel is not None
            and auth.same(current.channel.epoch, keys.epoch)
        ):
            return current.label  # the same handshake again
        return self.admit_now(cand).label

    def admit_now(self, cand: Candidate) -> Peer:
        """Make way for the candidate (probing live peers in its place, up to
        :data:`PROBE_S`), load it and install it; :class:`HandshakeError` when a live peer
        stays in the way or loading fails."""
        self.busy, busy = True, self.busy
        try:
            for old in self.conflicts(cand):
                if self.decide(cand, old) == "probe" and not self.probe(old):
                    raise self.live_error(cand, old)
            self.load(cand, self.conflicts(cand))
        finally:
            self.busy = busy
        return self.install(cand)

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
