"""Black/ruff-format compatible rendering of nested Python literals (for generated modules).

The rule is black's: a collection goes on one line when it fits; otherwise it is exploded,
one element per line with a trailing comma, and each element is laid out the same way.
"""

from __future__ import annotations

from typing import Any

LINE = 100
INDENT = "    "


def escape(text: str) -> str:
    """``text`` as the inside of a double-quoted Python string literal (or a docstring):
    printable ASCII stays, backslashes and double quotes are escaped, everything else
    (newlines, control characters, non-ASCII) becomes an escape sequence.  Pasting the result
    between ``"..."`` (or ``\"\"\"...\"\"\"``) gives back exactly ``text``."""
    out = []
    for c in text:
        o = ord(c)
        if c == "\\":
            out.append("\\\\")
        elif c == '"':
            out.append('\\"')
        elif 0x20 <= o < 0x7F:
            out.append(c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c == "\r":
            out.append("\\r")
        elif o <= 0xFF:
            out.append(f"\\x{o:02x}")
        elif o <= 0xFFFF:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    return "".join(out)


def string(text: str) -> str:
    """A Python string literal of ``text`` (double quotes, black style)."""
    return '"' + escape(text) + '"'


def comment(text: str) -> str:
    """``text`` made safe for a ``#`` comment: one line, printable ASCII (escapes as in
    :func:`escape`, quotes kept)."""
    return escape(text).replace('\\"', '"')


def _atom(v: Any) -> str | None:
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return string(v)
    return None


def _brackets(v: Any) -> tuple[str, str]:
    if isinstance(v, tuple):
        return "(", ")"
    if isinstance(v, list):
        return "[", "]"
    return "{", "}"


def _items(v: Any) -> list[tuple[str | None, Any]]:
    if isinstance(v, dict):
        return [(flat(k), x) for k, x in v.items()]
    return [(None, x) for x in v]


def flat(v: Any) -> str:
    """One-line form."""
    a = _atom(v)
    if a is not None:
        return a
    o, c = _brackets(v)
    parts = [(k + ": " if k else "") + flat(x) for k, x in _items(v)]
    if isinstance(v, tuple) and len(v) == 1:
        return f"({parts[0]},)"
    return o + ", ".join(parts) + c


def fmt(v: Any, indent: int = 0, prefix: str = "", suffix: str = "") -> str:
    """`prefix + v + suffix` at `indent` levels, split black-style when too long."""
    pad = INDENT * indent
    one = pad + prefix + flat(v) + suffix
    if len(one) <= LINE or _atom(v) is not None:
        return one
    o, c = _brackets(v)
    lines = [pad + prefix + o]
    for k, x in _items(v):
        lines.append(fmt(x, indent + 1, (k + ": ") if k else "", ","))
    lines.append(pad + c + suffix)
    return "\n".join(lines)
