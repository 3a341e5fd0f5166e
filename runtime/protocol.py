"""The wire protocol between endpoints: handshake framing and typed, validated messages.

This is the one place that parses what a peer sends.  Nothing here talks to NIXL or holds
keys (those are :mod:`.auth`'s); every function that reads peer bytes raises only
:class:`ProtocolError` (or :class:`~layoutc.runtime.errors.HandshakeError` for handshakes),
whatever the bytes.

Handshake bytes (``Endpoint.handshake_bytes``; any byte channel can carry them)::

    b"LAYOUTC-HS/2\n" | u32 len | hello (JSON) | box
    hello = {"format": 2, "agent": name, "nonce": hex, "keyed": bool, "issued": ns}
    box   = Box(blob key of (auth key, nonce, agent)).seal(aad=magic+hello, u32 len | header | metadata)

(the header's fields and their check against a plan: :mod:`.handshake`; the box:
:class:`.auth.Box`, encrypted when an auth key is set.)

Handshake socket (``Endpoint.connect`` / ``listen_port``): frames ``kind (1 byte) | u32 length |
payload``, see :mod:`.endpoint.admission` for the exchange.

Messages travel as NIXL notifications::

    b"LC2 " | epoch (8) | sequence number (u64) | tag (16) | body

(epoch, sequence number and tag: :class:`.auth.Channel`), the body a JSON object whose ``"t"``
names the kind (the keys are kept short: a request moves many of them):

=======  ====================================================  =================================
kind     keys                                                  meaning
=======  ====================================================  =================================
DONE     ``r`` request id                                      the request completed there
FAIL     ``r``, ``e`` reason, ``rel`` bool                     it failed there (``rel``: none of
                                                               its writes into our slots runs)
SREQ     ``r``, ``k`` kind, ``b`` block ids, ``l`` layers,     a staged request (see
         ``c`` chunk bytes, ``n`` chunks, ``z`` stream         :mod:`.staged`)
         bytes, ``m`` mover, ``g`` grants [[chunk, slot]]
GNT      ``r``, ``k``, ``g`` grants                            destination slots granted
RDY      ``r``, ``k``, ``c`` chunk, ``s`` source slot          a chunk is packed, read it
ACK      ``r``, ``k``, ``c``                                   the chunk was read
DAT      ``r``, ``k``, ``c``                                   the chunk was written
PING     (none)                                                is the peer still there?
=======  ====================================================  =================================

``k`` is the layer kind (KV-cache group) a staged transfer carries, or null when the request's
block ids apply to every layer; a request staged per kind has one staged transfer per kind.

:func:`decode_body` returns one of the message classes below or raises
:class:`ProtocolError` for a malformed one (wrong types, values out of range, oversized,
unreadable).  It never raises anything else, whatever the bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import HandshakeError, LayoutcError

__all__ = [
    "Ack",
    "Dat",
    "Done",
    "Fail",
    "Gnt",
    "Handshake",
    "MOVERS",
    "Message",
    "Ping",
    "ProtocolError",
    "Rdy",
    "SReq",
    "STAGED_KINDS",
    "decode_body",
    "decode_handshake",
    "decode_ids",
    "encode_body",
    "encode_handshake",
    "encode_ids",
    "frame",
    "name_problem",
    "sanitize",
    "split_frame",
]

NOTIF_PREFIX = b"LC2 "
#: Prefixes of layoutc's notifications, this format's and older ones (dropped as malformed).
NOTIF_PREFIXES = (b"LC1 ", NOTIF_PREFIX)
HS_MAGIC = b"LAYOUTC-HS/2\n"
HS_MAGIC_OLD = b"LAYOUTC-HS/1\n"
HS_FORMAT = 2
_LEN = struct.Struct(">I")
_FRAME_HEAD = len(NOTIF_PREFIX) + 8 + 8 + 16  # prefix, epoch, sequence number, tag

#: Who copies staged chunks (:mod:`.staged`).
MOVERS = ("reader", "writer", "alternate", "adaptive")

#: Largest notification decoded (a staged request of ~8 M block ids in base64).
MAX_MESSAGE_BYTES = 48 << 20
#: Largest handshake header.
MAX_HEADER_BYTES = 16 << 20
#: Largest NIXL agent metadata accepted from a peer.
MAX_METADATA_BYTES = 16 << 20
#: Largest hello (the clear part of handshake bytes; the first frames on the socket).
MAX_HELLO_BYTES = 4096
#: Longest request id or reason text accepted from a peer.
MAX_ID_CHARS = 1024
MAX_TEXT_CHARS = 8192
#: Longest agent name or engine id (characters).
MAX_NAME_CHARS = 256
#: Chunk sizes, counts, slots and layer indices stay below this.
MAX_INDEX = (1 << 31) - 1
#: Longest list of grants or layers in one message (an endpoint has far fewer slots, layers).
MAX_LIST = 1 << 16


class ProtocolError(LayoutcError):
    """A peer's message is malformed (dropped and counted; never raised to an engine)."""


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Done:
    rid: str


@dataclass(frozen=True)
class Fail:
    rid: str
    error: str
    released: bool


@dataclass(frozen=True, eq=False)
class SReq:
    rid: str
    kind: str | None
    blocks: np.ndarray
    layers: tuple[int, ...] | None
    chunk: int
    n: int
    total: int
    mover: str
    grants: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Gnt:
    rid: str
    kind: str | None
    grants: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Rdy:
    rid: str
    kind: str | None
    chunk: int
    slot: int


@dataclass(frozen=True)
class Ack:
    rid: str
    kind: str | None
    chunk: int


@dataclass(frozen=True)
class Dat:
    rid: str
    kind: str | None
    chunk: int


@dataclass(frozen=True)
class Ping:
    pass


Message = Done | Fail | SReq | Gnt | Rdy | Ack | Dat | Ping

#: Messages of the staged protocol (routed to the staged strategy).
STAGED_KINDS: tuple[type, ...] = (SReq, Gnt, Rdy, Ack, Dat)


# --------------------------------------------------------------------------------------------
# Block ids: little-endian int32 (or int64) bytes in base64
# --------------------------------------------------------------------------------------------
def encode_ids(ids: np.ndarray) -> dict[str, str]:
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0 or (int(ids.max()) < 2**31 and int(ids.min()) >= 0):
        return {"d": "i4", "v": base64.b64encode(ids.astype("<i4").tobytes()).decode()}
    return {"d": "i8", "v": base64.b64encode(ids.astype("<i8").tobytes()).decode()}


def decode_ids(obj: Any) -> np.ndarray:
    if not isinstance(obj, dict) or obj.get("d") not in ("i4", "i8"):
        raise ProtocolError("malformed block ids")
    v = obj.get("v", "")
    if not isinstance(v, str):
        raise ProtocolError("malformed block ids")
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("malformed block ids (not base64)") from None
    dt = "<i4" if obj["d"] == "i4" else "<i8"
    if len(raw) % np.dtype(dt).itemsize:
        raise ProtocolError("malformed block ids (length)")
    return np.frombuffer(raw, dtype=dt).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------
def _grants(g: tuple[tuple[int, int], ...] | list[list[int]]) -> list[list[int]]:
    return [[int(c), int(s)] for c, s in g]


def to_json(msg: Message) -> dict[str, Any]:
    """The message as the JSON object that crosses the wire."""
    if isinstance(msg, Done):
        return {"t": "DONE", "r": msg.rid}
    if isinstance(msg, Fail):
        return {"t": "FAIL", "r": msg.rid, "e": msg.error, "rel": msg.released}
    if isinstance(msg, SReq):
        return {
            "t": "SREQ",
            "r": msg.rid,
            "k": msg.kind,
            "b": encode_ids(msg.blocks),
            "l": None if msg.layers is None else [int(x) for x in msg.layers],
            "c": msg.chunk,
            "n": msg.n,
            "z": msg.total,
            "m": msg.mover,
            "g": _grants(msg.grants),
        }
    if isinstance(msg, Gnt):
        return {"t": "GNT", "r": msg.rid, "k": msg.kind, "g": _grants(msg.grants)}
    if isinstance(msg, Rdy):
        return {"t": "RDY", "r": msg.rid, "k": msg.kind, "c": msg.chunk, "s": msg.slot}
    if isinstance(msg, Ack):
        return {"t": "ACK", "r": msg.rid, "k": msg.kind, "c": msg.chunk}
    if isinstance(msg, Dat):
        return {"t": "DAT", "r": msg.rid, "k": msg.kind, "c": msg.chunk}
    if isinstance(msg, Ping):
        return {"t": "PING"}
    raise TypeError(f"not a layoutc message: {msg!r}")


def encode_body(msg: Message) -> bytes:
    """The message's body (JSON), what a frame authenticates."""
    return json.dumps(to_json(msg), separators=(",", ":")).encode()


def frame(epoch: bytes, seq: bytes, tag: bytes, body: bytes) -> bytes:
    """A notification: prefix, epoch, sequence number and tag (:class:`.auth.Channel`), body."""
    return NOTIF_PREFIX + epoch + seq + tag + body


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------
def load_json(body: bytes, what: str) -> Any:
    """JSON from a peer: any failure (bad UTF-8, syntax, nesting, huge numbers) is a
    :class:`ProtocolError`."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:  # JSONDecodeError is one
        raise ProtocolError(f"unreadable {what} ({type(e).__name__})") from None


def _int(obj: dict[str, Any], key: str, lo: int = 0, hi: int = MAX_INDEX) -> int:
    v = obj.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise ProtocolError(f"{key!r} must be an integer in [{lo}, {hi}]")
    return v


def _str(obj: dict[str, Any], key: str, limit: int, *, empty: bool = False) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or len(v) > limit or (not empty and not v):
        raise ProtocolError(f"{key!r} must be a string of at most {limit} characters")
    return v


def _rid(obj: dict[str, Any]) -> str:
    return _str(obj, "r", MAX_ID_CHARS)


def _kind(obj: dict[str, Any]) -> str | None:
    k = obj.get("k")
    if k is None:
        return None
    if not isinstance(k, str) or not 0 < len(k) <= MAX_ID_CHARS:
        raise ProtocolError("'k' must be a layer kind name or null")
    return k


def _grant_list(v: Any) -> tuple[tuple[int, int], ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or len(v) > MAX_LIST:
        raise ProtocolError(f"grants must be a list of at most {MAX_LIST}")
    out = []
    for g in v:
        if (
            not isinstance(g, list)
            or len(g) != 2
            or any(type(x) is not int or not 0 <= x <= MAX_INDEX for x in g)
        ):
            raise ProtocolError("a grant must be [chunk, slot] of non-negative integers")
        out.append((g[0], g[1]))
    return tuple(out)


def _layers(v: Any) -> tuple[int, ...] | None:
    if v is None:
        return None
    if (
        not isinstance(v, list)
        or len(v) > MAX_LIST
        or any(type(x) is not int or not 0 <= x <= MAX_INDEX for x in v)
    ):
        raise ProtocolError(f"layers must be a list of at most {MAX_LIST} non-negative integers")
    return tuple(v)


def _decode_obj(obj: Any) -> Message:
    if not isinstance(obj, dict):
        raise ProtocolError("a message must be a JSON object")
    t = obj.get("t")
    if t == "DONE":
        return Done(_rid(obj))
    if t == "FAIL":
        rel = obj.get("rel", False)
        if not isinstance(rel, bool):
            raise ProtocolError("'rel' must be a boolean")
        return Fail(_rid(obj), _text(obj.get("e")), rel)
    if t == "SREQ":
        mover = obj.get("m")
        if mover not in MOVERS:
            raise ProtocolError(f"unknown mover {mover!r}")
        return SReq(
            rid=_rid(obj),
            kind=_kind(obj),
            blocks=decode_ids(obj.get("b")),
            layers=_layers(obj.get("l")),
            chunk=_int(obj, "c", 1),
            n=_int(obj, "n"),
            total=_int(obj, "z", 0, 1 << 62),
            mover=mover,
            grants=_grant_list(obj.get("g")),
        )
    if t == "GNT":
        return Gnt(_rid(obj), _kind(obj), _grant_list(obj.get("g")))
    if t == "RDY":
        return Rdy(_rid(obj), _kind(obj), _int(obj, "c"), _int(obj, "s"))
    if t == "ACK":
        return Ack(_rid(obj), _kind(obj), _int(obj, "c"))
    if t == "DAT":
        return Dat(_rid(obj), _kind(obj), _int(obj, "c"))
    if t == "PING":
        return Ping()
    raise ProtocolError(f"unknown message kind {str(t)[:32]!r}")


def _text(v: Any) -> str:
    """A peer's free text (a reason), shortened and stripped of control characters."""
    return sanitize(v if isinstance(v, str) else f"<{type(v).__name__}>")


def sanitize(s: str) -> str:
    """Text from a peer, fit for an error message: at most :data:`MAX_TEXT_CHARS` printable
    characters (others become ``?``)."""
    return "".join(c if c.isprintable() or c == " " else "?" for c in s[:MAX_TEXT_CHARS])


def is_layoutc(raw: bytes) -> bool:
    """Does the notification claim to be layoutc's (of any format)?"""
    return raw[:4] in NOTIF_PREFIXES


def split_frame(raw: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """(epoch, sequence number, tag, body) of a layoutc notification, or
    :class:`ProtocolError` (another format, truncated, oversized)."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(raw)} bytes (at most {MAX_MESSAGE_BYTES})")
    if not raw.startswith(NOTIF_PREFIX):
        raise ProtocolError(f"message format {raw[:3]!r} is not {NOTIF_PREFIX[:3]!r}")
    if len(raw) < _FRAME_HEAD + 2:
        raise ProtocolError(f"truncated message ({len(raw)} bytes)")
    p = len(NOTIF_PREFIX)
    return raw[p : p + 8], raw[p + 8 : p + 16], raw[p + 16 : _FRAME_HEAD], raw[_FRAME_HEAD:]


def decode_body(body: bytes) -> Message:
    """The message of an authenticated body, or :class:`ProtocolError`."""
    try:
        return _decode_obj(load_json(body, "message"))
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError, RecursionError, AttributeError) as e:
        # (a safety net: the checks above are meant to catch every malformed value)
        raise ProtocolError(f"malformed message ({type(e).__name__})") from None


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------
def name_problem(v: Any, what: str = "agent name") -> str | None:
    """Why ``v`` is not a usable agent name or engine id (None: it is): a non-empty str of at
    most :data:`MAX_NAME_CHARS` printable characters, valid UTF-8."""
    if not isinstance(v, str):
        return f"{what} must be a str, got {type(v).__name__}"
    if not v or len(v) > MAX_NAME_CHARS:
        return f"{what} must have 1 to {MAX_NAME_CHARS} characters, got {len(v)}"
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return f"{what} {v!r} is not valid UTF-8"
    if not v.isprintable():
        return f"{what} {v!r} has control characters"
    return None


# --------------------------------------------------------------------------------------------
# Handshake bytes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    """The clear part of a handshake: who, with which nonce, keyed or not."""

    agent: str
    nonce: bytes
    keyed: bool
    issued: int = 0  # time.time_ns() when the handshake bytes were made (0: a socket hello)
    role: str | None = None  # (socket hellos)
    proof: bytes = b""  # (a socket challenge: the server's proof)
    #: (socket hellos) the nonce of the sender's handshake bytes: names the endpoint instance
    #: (public; a client already connected to that instance need not handshake again)
    instance: bytes = b""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": HS_FORMAT,
            "agent": self.agent,
            "nonce": self.nonce.hex(),
            "keyed": self.keyed,
        }
        if self.issued:
            out["issued"] = self.issued
        if self.role is not None:
            out["role"] = self.role
        if self.proof:
            out["proof"] = self.proof.hex()
        if self.instance:
            out["instance"] = self.instance.hex()
        return out

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()


def _hex(v: Any, n: int) -> bytes | None:
    if not isinstance(v, str) or len(v) != 2 * n:
        return None
    try:
        return bytes.fromhex(v)
    except ValueError:
        return None


def parse_hello(data: bytes, *, who: str) -> Hello:
    """A peer's hello (at most :data:`MAX_HELLO_BYTES`), or :class:`HandshakeError`."""
    if len(data) > MAX_HELLO_BYTES:
        raise HandshakeError(f"{who}: handshake hello of {len(data)} bytes", field="format")
    try:
        obj = load_json(data, "handshake hello")
    except ProtocolError as e:
        raise HandshakeError(f"{who}: {e}", field="format") from None
    if not isinstance(obj, dict):
        raise HandshakeError(f"{who}: handshake hello is not a JSON object", field="format")
    fmt = obj.get("format")
    if fmt != HS_FORMAT or type(fmt) is not int:
        shown = fmt if type(fmt) is int else _text(fmt)
        raise HandshakeError(
            f"{who}: peer speaks handshake format {shown!r} but this runtime speaks "
            f"{HS_FORMAT}; install the same layoutc on both sides",
            field="format",
            peer_value=shown,
            local_value=HS_FORMAT,
        )
    agent = obj.get("agent")
    bad = name_problem(agent)
    if bad or not isinstance(agent, str):
        raise HandshakeError(f"{who}: peer's {bad}", field="agent")
    nonce = _hex(obj.get("nonce"), 32)
    keyed = obj.get("keyed")
    issued = obj.get("issued", 0)
    role = obj.get("role")
    proof = obj.get("proof")
    instance = obj.get("instance")
    if (
        nonce is None
        or not isinstance(keyed, bool)
        or type(issued) is not int
        or not 0 <= issued < 1 << 63
        or (role is not None and role not in ("prefill", "decode"))
        or (proof is not None and _hex(proof, 32) is None)
        or (instance is not None and _hex(instance, 32) is None)
    ):
        raise HandshakeError(f"{who}: malformed handshake hello from {agent!r}", field="format")
    return Hello(
        agent, nonce, keyed, issued, role, _hex(proof, 32) or b"", _hex(instance, 32) or b""
    )


def pack_payload(header: dict[str, Any], metadata: bytes) -> bytes:
    """Layout header and NIXL agent metadata, as one byte string."""
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return _LEN.pack(len(body)) + body + bytes(metadata)


def unpack_payload(data: bytes, *, who: str) -> tuple[dict[str, Any], bytes]:
    """(header, agent metadata) of :func:`pack_payload` bytes, or :class:`HandshakeError`."""
    if len(data) < _LEN.size:
        raise HandshakeError(f"{who}: truncated layoutc handshake", field="format")
    (n,) = _LEN.unpack_from(data, 0)
    if n > MAX_HEADER_BYTES:
        raise HandshakeError(
            f"{who}: handshake header of {n} bytes (at most {MAX_HEADER_BYTES})", field="format"
        )
    if len(data) < _LEN.size + n:
        raise HandshakeError(f"{who}: truncated layoutc handshake", field="format")
    md = data[_LEN.size + n :]
    if not md or len(md) > MAX_METADATA_BYTES:
        raise HandshakeError(
            f"{who}: agent metadata of {len(md)} bytes (1 to {MAX_METADATA_BYTES})",
            field="agent metadata",
        )
    return parse_header(data[_LEN.size : _LEN.size + n], who=who), md


@dataclass(frozen=True)
class Handshake:
    """Handshake bytes, opened: the hello, the layout header and the agent metadata."""

    hello: Hello
    header: dict[str, Any]
    metadata: bytes


#: Largest handshake bytes accepted.
MAX_HANDSHAKE_BYTES = (
    len(HS_MAGIC) + 2 * _LEN.size + MAX_HELLO_BYTES + MAX_HEADER_BYTES + MAX_METADATA_BYTES + 64
)


def encode_handshake(
    header: dict[str, Any],
    metadata: bytes,
    *,
    nonce: bytes,
    psk: bytes | None = None,
    issued: int = 0,
) -> bytes:
    """Handshake bytes of ``header`` and ``metadata`` (``Endpoint.handshake_bytes``): sealed
    in a box of the blob key of (``psk``, ``nonce``, agent), encrypted when ``psk`` is set."""
    from . import auth

    hello = Hello(str(header["agent"]), nonce, psk is not None, issued).encode()
    aad = HS_MAGIC + hello
    box = auth.Box(auth.blob_key(psk, nonce, str(header["agent"])), encrypt=psk is not None)
    return HS_MAGIC + _LEN.pack(len(hello)) + hello + box.seal(aad, pack_payload(header, metadata))


def decode_handshake(data: Any, *, who: str, psk: bytes | None = None) -> Handshake:
    """Open handshake bytes (checked, with ``psk``, the local auth key); anything wrong,
    whatever the bytes, is a :class:`HandshakeError` (``field`` ``"format"``, ``"auth"``,
    ``"agent"``, ``"agent metadata"``)."""
    from . import auth

    if not isinstance(data, bytes | bytearray | memoryview):
        raise HandshakeError(
            f"{who}: handshake must be bytes, got {type(data).__name__}", field="format"
        )
    data = bytes(data)
    if len(data) > MAX_HANDSHAKE_BYTES:
        raise HandshakeError(
            f"{who}: handshake of {len(data)} bytes (at most {MAX_HANDSHAKE_BYTES})",
            field="format",
        )
    if data.startswith(HS_MAGIC_OLD):
        raise HandshakeError(
            f"{who}: peer speaks handshake format 1 but this runtime speaks {HS_FORMAT}; "
            f"install the same layoutc on both sides",
            field="format",
            peer_value=1,
            local_value=HS_FORMAT,
        )
    if not data.startswith(HS_MAGIC) or len(data) < len(HS_MAGIC) + _LEN.size:
        raise HandshakeError(
            f"{who}: not a layoutc handshake (expected it to start with {HS_MAGIC!r}, got "
            f"{data[:16]!r}); pass the bytes of Endpoint.handshake_bytes()",
            field="format",
        )
    start = len(HS_MAGIC) + _LEN.size
    (n,) = _LEN.unpack_from(data, len(HS_MAGIC))
    if n > MAX_HELLO_BYTES or len(data) < start + n:
        raise HandshakeError(f"{who}: truncated or oversized handshake hello", field="format")
    raw_hello = data[start : start + n]
    hello = parse_hello(raw_hello, who=who)
    if hello.keyed and psk is None:
        raise HandshakeError(
            f"{who}: {hello.agent!r} sealed its handshake with an auth key, but this endpoint "
            f"has none: give both the same auth_key= (or $LAYOUTC_AUTH_KEY)",
            field="auth",
        )
    if not hello.keyed and psk is not None:
        raise HandshakeError(
            f"{who}: {hello.agent!r} has no auth key, but this endpoint requires one: give "
            f"both the same auth_key= (or $LAYOUTC_AUTH_KEY)",
            field="auth",
        )
    box = auth.Box(auth.blob_key(psk, hello.nonce, hello.agent), encrypt=hello.keyed)
    payload = box.open(HS_MAGIC + raw_hello, data[start + n :])
    if payload is None:
        raise HandshakeError(
            f"{who}: the handshake of {hello.agent!r} fails authentication (altered, "
            f"truncated, or sealed with another auth key)",
            field="auth",
        )
    header, md = unpack_payload(payload, who=who)
    if header.get("agent") != hello.agent:
        raise HandshakeError(
            f"{who}: handshake of {hello.agent!r} carries a header of agent "
            f"{_text(header.get('agent'))!r}",
            field="agent",
        )
    return Handshake(hello, header, md)


def parse_header(body: bytes, *, who: str) -> dict[str, Any]:
    try:
        header = load_json(body, "layoutc handshake header")
    except ProtocolError as e:
        raise HandshakeError(f"{who}: {e}", field="format") from None
    if not isinstance(header, dict):
        raise HandshakeError(f"{who}: layoutc handshake header is not an object", field="format")
    return header


# --------------------------------------------------------------------------------------------
# Handshake socket frames
# --------------------------------------------------------------------------------------------
#: Frame kinds on the handshake socket.
F_HELLO, F_CHALLENGE, F_PROOF, F_PAYLOAD, F_OK, F_REFUSE = b"H", b"C", b"A", b"P", b"K", b"R"
FRAME_KINDS = (F_HELLO, F_CHALLENGE, F_PROOF, F_PAYLOAD, F_OK, F_REFUSE)
_FRAME = struct.Struct(">cI")


def encode_frame(kind: bytes, payload: bytes) -> bytes:
    return _FRAME.pack(kind, len(payload)) + payload


def take_frame(buf: bytearray, limit: int) -> tuple[bytes, bytes] | None:
    """The first complete frame in ``buf`` (removed from it), None while incomplete; a frame
    of an unknown kind or longer than ``limit`` is a :class:`ProtocolError`."""
    if len(buf) < _FRAME.size:
        return None
    kind, n = _FRAME.unpack_from(buf, 0)
    if kind not in FRAME_KINDS:
        raise ProtocolError(f"unknown handshake frame {kind!r}")
    if n > limit:
        raise ProtocolError(f"handshake frame {kind!r} of {n} bytes (at most {limit} here)")
    if len(buf) < _FRAME.size + n:
        return None
    payload = bytes(buf[_FRAME.size : _FRAME.size + n])
    del buf[: _FRAME.size + n]
    return kind, payload
