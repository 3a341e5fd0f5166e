"""The wire protocol between endpoints: handshake framing and typed, validated messages.

This is the one place that parses what a peer sends.  Nothing here talks to NIXL.

Handshake bytes (any byte channel can carry them)::

    b"LAYOUTC-HS/1\\n" | u32 big-endian header length | header (UTF-8 JSON) | agent metadata

(the header's fields and their check against a plan: :mod:`.handshake`).

Messages travel as NIXL notifications, ``b"LC1 "`` followed by a JSON object whose ``"t"``
names the kind (the keys are kept short: a request moves many of them):

=======  ====================================================  =================================
kind     keys                                                  meaning
=======  ====================================================  =================================
HDR      ``h`` header, ``reply`` bool                          handshake over NIXL's listener
NAK      ``e`` reason, ``field``                               the handshake was refused
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

:func:`decode` returns one of the message classes below, ``None`` for a notification that is
not layoutc's, or raises :class:`ProtocolError` for a malformed one (wrong types, values out of
range, oversized, unreadable).  It never raises anything else, whatever the bytes.
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
    "Hdr",
    "MOVERS",
    "Message",
    "Nak",
    "Ping",
    "ProtocolError",
    "Rdy",
    "SReq",
    "STAGED_KINDS",
    "decode",
    "decode_handshake",
    "decode_ids",
    "encode",
    "encode_handshake",
    "encode_ids",
]

NOTIF_PREFIX = b"LC1 "
HS_MAGIC = b"LAYOUTC-HS/1\n"
HS_FORMAT = 1
_LEN = struct.Struct(">I")

#: Who copies staged chunks (:mod:`.staged`).
MOVERS = ("reader", "writer", "alternate", "adaptive")

#: Largest notification decoded (a staged request of ~8 M block ids in base64).
MAX_MESSAGE_BYTES = 48 << 20
#: Largest handshake header.
MAX_HEADER_BYTES = 16 << 20
#: Longest request id or reason text accepted from a peer.
MAX_ID_CHARS = 1024
MAX_TEXT_CHARS = 8192
#: Chunk sizes, counts, slots and layer indices stay below this.
MAX_INDEX = (1 << 31) - 1


class ProtocolError(LayoutcError):
    """A peer's message is malformed (dropped and counted; never raised to an engine)."""


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hdr:
    header: dict[str, Any]
    reply: bool


@dataclass(frozen=True)
class Nak:
    error: str
    field: str | None


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


Message = Hdr | Nak | Done | Fail | SReq | Gnt | Rdy | Ack | Dat | Ping

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
    if isinstance(msg, Hdr):
        return {"t": "HDR", "h": msg.header, "reply": msg.reply}
    if isinstance(msg, Nak):
        return {"t": "NAK", "e": msg.error, "field": msg.field}
    if isinstance(msg, Ping):
        return {"t": "PING"}
    raise TypeError(f"not a layoutc message: {msg!r}")


def encode(msg: Message) -> bytes:
    return NOTIF_PREFIX + json.dumps(to_json(msg), separators=(",", ":")).encode()


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
    if not isinstance(v, list):
        raise ProtocolError("grants must be a list")
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
    if not isinstance(v, list) or any(type(x) is not int or not 0 <= x <= MAX_INDEX for x in v):
        raise ProtocolError("layers must be a list of non-negative integers")
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
    if t == "HDR":
        h = obj.get("h")
        if not isinstance(h, dict):
            raise ProtocolError("a handshake header must be a JSON object")
        return Hdr(h, bool(obj.get("reply") is True))
    if t == "NAK":
        f = obj.get("field")
        return Nak(_text(obj.get("e")), f if isinstance(f, str) else None)
    if t == "PING":
        return Ping()
    raise ProtocolError(f"unknown message kind {str(t)[:32]!r}")


def _text(v: Any) -> str:
    """A peer's free text (a reason), shortened and stripped of control characters."""
    s = v if isinstance(v, str) else repr(v)
    s = s[:MAX_TEXT_CHARS]
    return "".join(c if c.isprintable() or c == " " else "?" for c in s)


def is_layoutc(raw: bytes) -> bool:
    return raw.startswith(NOTIF_PREFIX)


def decode(raw: bytes) -> Message | None:
    """A peer's notification: the message, ``None`` when it is not layoutc's (no ``LC1 ``
    prefix), or :class:`ProtocolError`."""
    if not is_layoutc(raw):
        return None
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(raw)} bytes (at most {MAX_MESSAGE_BYTES})")
    return _decode_obj(load_json(raw[len(NOTIF_PREFIX) :], "message"))


# --------------------------------------------------------------------------------------------
# Handshake framing
# --------------------------------------------------------------------------------------------
def encode_handshake(header: dict[str, Any], agent_metadata: bytes) -> bytes:
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return HS_MAGIC + _LEN.pack(len(body)) + body + bytes(agent_metadata)


def decode_handshake(data: Any, *, who: str) -> tuple[dict[str, Any], bytes]:
    """Split handshake bytes into (header, agent metadata); garbage → :class:`HandshakeError`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise HandshakeError(
            f"{who}: handshake must be bytes, got {type(data).__name__}", field="format"
        )
    data = bytes(data)
    if not data.startswith(HS_MAGIC) or len(data) < len(HS_MAGIC) + _LEN.size:
        raise HandshakeError(
            f"{who}: not a layoutc handshake (expected it to start with {HS_MAGIC!r}, got "
            f"{data[:16]!r}); pass the bytes of Endpoint.handshake_bytes()",
            field="format",
        )
    (n,) = _LEN.unpack_from(data, len(HS_MAGIC))
    start = len(HS_MAGIC) + _LEN.size
    if n > MAX_HEADER_BYTES:
        raise HandshakeError(
            f"{who}: handshake header of {n} bytes (at most {MAX_HEADER_BYTES})", field="format"
        )
    if len(data) < start + n:
        raise HandshakeError(f"{who}: truncated layoutc handshake", field="format")
    return parse_header(data[start : start + n], who=who), data[start + n :]


def parse_header(body: bytes, *, who: str) -> dict[str, Any]:
    try:
        header = load_json(body, "layoutc handshake header")
    except ProtocolError as e:
        raise HandshakeError(f"{who}: {e}") from None
    if not isinstance(header, dict):
        raise HandshakeError(f"{who}: layoutc handshake header is not an object")
    return header
