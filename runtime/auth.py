"""Keys, proofs and message authentication between two endpoints (stdlib only).

Every message between two endpoints carries an HMAC-SHA256 tag keyed from a *pair key* that
both derive from the handshake's fresh nonces (one from each side) and, when set, the
pre-shared ``auth_key`` (``LAYOUTC_AUTH_KEY``).  No key ever crosses the wire.

Derivation (HKDF-SHA256, RFC 5869, built on :mod:`hmac`)::

    ikm   = auth_key (or b"") || nonce_prefill || nonce_decode        (nonces: 32 random bytes)
    prk   = HKDF-Extract(salt=b"layoutc/2 pair", ikm)
    info  = b"layoutc/2" || name_prefill || name_decode                (length-prefixed)
    key(purpose) = HKDF-Expand(prk, info || purpose, 32)
    epoch = SHA-256(b"layoutc/2 epoch" || nonce_prefill || nonce_decode || info)[:8]

Purposes: ``msg p2d`` / ``msg d2p`` (message tags, one key per direction, so a message cannot
be reflected), ``confirm p`` / ``confirm d`` (handshake proofs), ``box p`` / ``box d``
(handshake payloads).

A message tag covers the epoch, a 64-bit per-pair sequence number and the body
(:class:`Channel`).  Notifications may arrive out of order (a notification attached to a
transfer leaves when the transfer completes, after messages sent later; 180 places were seen
on host memory), so the receiver keeps a sliding window of :data:`WINDOW` sequence numbers
(:class:`ReplayWindow`, as IPsec does): a number seen before, or older than the window, is a
replay.

Handshake payloads (layout header and NIXL agent metadata) travel in a *box*: with an
``auth_key`` they are encrypted (SHAKE-256 keystream keyed from the key and a fresh nonce) and
then authenticated (HMAC-SHA256 over everything, encrypt-then-MAC), so only key holders can
read an endpoint's metadata; without one they are only authenticated (anyone who reads the
channel can read them: the channel itself must be trusted).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
from dataclasses import dataclass, field

from .errors import UsageError

__all__ = [
    "KEY_ENV",
    "NONCE_BYTES",
    "TAG_BYTES",
    "WINDOW",
    "Box",
    "Channel",
    "PairKeys",
    "ReplayWindow",
    "load_key",
    "new_nonce",
    "pair_keys",
]

KEY_ENV = "LAYOUTC_AUTH_KEY"
#: Shortest auth key accepted (bytes).
MIN_KEY_BYTES = 16
NONCE_BYTES = 32
EPOCH_BYTES = 8
#: Bytes of a message tag (HMAC-SHA256 truncated to 128 bits).
TAG_BYTES = 16
#: Sequence numbers a receiver remembers behind the highest one it accepted.
WINDOW = 8192
_U64 = struct.Struct(">Q")
_DIGEST = hashlib.sha256


def load_key(value: str | bytes | None) -> bytes | None:
    """The pre-shared key: ``value`` (``auth_key=``), else ``$LAYOUTC_AUTH_KEY``; None when
    neither is set."""
    if value is None:
        value = os.environ.get(KEY_ENV) or None
        if value is None:
            return None
        where = f"${KEY_ENV}"
    else:
        where = "auth_key"
    if isinstance(value, str):
        try:
            key = value.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{where} must be valid UTF-8 text or bytes") from None
    elif isinstance(value, bytes | bytearray):
        key = bytes(value)
    else:
        raise UsageError(f"{where} must be str or bytes, got {type(value).__name__}")
    if len(key) < MIN_KEY_BYTES:
        raise UsageError(
            f"{where} must have at least {MIN_KEY_BYTES} bytes (got {len(key)}); make one with "
            f'`python -c "import secrets; print(secrets.token_hex(32))"`'
        )
    return key


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def _lp(*parts: bytes) -> bytes:
    """Length-prefixed concatenation (unambiguous)."""
    return b"".join(_U64.pack(len(p)) + p for p in parts)


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, _DIGEST).digest()


def hkdf_expand(prk: bytes, info: bytes, n: int = 32) -> bytes:
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = hmac.new(prk, t + info + bytes([i]), _DIGEST).digest()
        out += t
        i += 1
    return out[:n]


def mac(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over the length-prefixed ``parts`` (full 32 bytes)."""
    return hmac.new(key, _lp(*parts), _DIGEST).digest()


def same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


@dataclass(frozen=True)
class PairKeys:
    """The keys of one handshake between this endpoint and a peer (one epoch)."""

    epoch: bytes
    send: bytes  # message tags this side sends
    recv: bytes  # message tags the peer sends
    confirm_local: bytes  # this side's handshake proof
    confirm_peer: bytes  # the peer's
    box_local: bytes  # payloads this side sends
    box_peer: bytes  # payloads the peer sends
    keyed: bool  # derived with an auth key

    def proof(self, transcript: bytes) -> bytes:
        return mac(self.confirm_local, b"proof", transcript)

    def check_proof(self, transcript: bytes, proof: bytes) -> bool:
        return same(mac(self.confirm_peer, b"proof", transcript), proof)


def pair_keys(
    psk: bytes | None,
    *,
    local_role: str,
    local_name: str,
    local_nonce: bytes,
    peer_name: str,
    peer_nonce: bytes,
) -> PairKeys:
    """The keys of the pair (this endpoint, a peer) for the nonces of one handshake."""
    local = (local_name.encode("utf-8"), local_nonce)
    peer = (peer_name.encode("utf-8"), peer_nonce)
    (pn, pnonce), (dn, dnonce) = (local, peer) if local_role == "prefill" else (peer, local)
    info = _lp(b"layoutc/2", pn, dn)
    prk = hkdf_extract(b"layoutc/2 pair", (psk or b"") + pnonce + dnonce)

    def key(purpose: bytes) -> bytes:
        return hkdf_expand(prk, info + purpose)

    epoch = _DIGEST(b"layoutc/2 epoch" + pnonce + dnonce + info).digest()[:EPOCH_BYTES]
    me, them = (b"p", b"d") if local_role == "prefill" else (b"d", b"p")
    return PairKeys(
        epoch=epoch,
        send=key(b"msg " + me + b"2" + them),
        recv=key(b"msg " + them + b"2" + me),
        confirm_local=key(b"confirm " + me),
        confirm_peer=key(b"confirm " + them),
        box_local=key(b"box " + me),
        box_peer=key(b"box " + them),
        keyed=psk is not None,
    )


# --------------------------------------------------------------------------------------------
# Messages: tags, sequence numbers, replay window
# --------------------------------------------------------------------------------------------
class ReplayWindow:
    """Sequence numbers accepted so far: the highest, and a bitmap of the :data:`WINDOW`
    below it."""

    __slots__ = ("hi", "mask", "size")

    def __init__(self, size: int = WINDOW, floor: int = 0) -> None:
        self.size = size
        self.hi = floor  # numbers <= floor count as seen
        self.mask = (1 << size) - 1

    def check(self, seq: int) -> bool:
        """Would ``seq`` be new?"""
        if seq > self.hi:
            return True
        back = self.hi - seq
        return back < self.size and not (self.mask >> back) & 1

    def accept(self, seq: int) -> None:
        if seq > self.hi:
            shift = seq - self.hi
            self.mask = (
                ((self.mask << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            )
            self.hi = seq
        else:
            self.mask |= 1 << (self.hi - seq)


@dataclass(eq=False)
class Channel:
    """Message authentication with one peer in one epoch: this side's sequence numbers and
    the peer's replay window."""

    keys: PairKeys
    sent: int = 0
    window: ReplayWindow = field(default_factory=ReplayWindow)

    @property
    def epoch(self) -> bytes:
        return self.keys.epoch

    def seal(self, body: bytes) -> tuple[bytes, bytes, bytes]:
        """(epoch, sequence number, tag) of the next message with ``body``."""
        self.sent += 1
        seq = _U64.pack(self.sent)
        return self.keys.epoch, seq, self._tag(self.keys.send, seq, body)

    def _tag(self, key: bytes, seq: bytes, body: bytes) -> bytes:
        # (epoch and sequence number have fixed sizes: the concatenation is unambiguous)
        return hmac.digest(key, self.keys.epoch + seq + body, "sha256")[:TAG_BYTES]

    def open(self, epoch: bytes, seq: bytes, tag: bytes, body: bytes) -> str | None:
        """None when the message is authentic and new (it is then remembered), else why not:
        ``"old_epoch"``, ``"bad_mac"`` or ``"replayed"``."""
        if not same(epoch, self.keys.epoch):
            return "old_epoch"
        if not same(self._tag(self.keys.recv, seq, body), tag):
            return "bad_mac"
        n = _U64.unpack(seq)[0]
        if n == 0 or not self.window.check(n):
            return "replayed"
        self.window.accept(n)
        return None


# --------------------------------------------------------------------------------------------
# Handshake payloads
# --------------------------------------------------------------------------------------------
class Box:
    """Encrypt-then-MAC for handshake payloads under one key.

    ``seal(aad, data)`` returns ``iv (16) || ciphertext || tag (32)``; the ciphertext is
    ``data`` XOR a SHAKE-256 keystream of (key, iv) when ``encrypt``, else ``data`` itself.
    ``open`` returns ``data`` or None (wrong key, altered, truncated).
    """

    IV = 16
    TAG = 32

    def __init__(self, key: bytes, encrypt: bool) -> None:
        self.key = key
        self.encrypt = encrypt
        self._enc = hkdf_expand(key, b"enc")
        self._mac = hkdf_expand(key, b"mac")

    def _xor(self, iv: bytes, data: bytes) -> bytes:
        if not self.encrypt or not data:
            return data
        stream = hashlib.shake_256(self._enc + iv).digest(len(data))
        n = int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")
        return n.to_bytes(len(data), "little")

    def seal(self, aad: bytes, data: bytes) -> bytes:
        iv = secrets.token_bytes(self.IV)
        body = iv + self._xor(iv, data)
        return body + mac(self._mac, aad, body)

    def open(self, aad: bytes, sealed: bytes) -> bytes | None:
        if len(sealed) < self.IV + self.TAG:
            return None
        body, tag = sealed[: -self.TAG], sealed[-self.TAG :]
        if not same(mac(self._mac, aad, body), tag):
            return None
        return self._xor(body[: self.IV], body[self.IV :])


def blob_key(psk: bytes | None, nonce: bytes, name: str) -> bytes:
    """The key of a one-way handshake blob (``Endpoint.handshake_bytes``): from the auth key
    and the sender's nonce, so any holder of the auth key can open it."""
    prk = hkdf_extract(b"layoutc/2 blob", (psk or b"") + nonce)
    return hkdf_expand(prk, _lp(b"layoutc/2 blob", name.encode("utf-8")))
