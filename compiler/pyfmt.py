"""Black/ruff-format compatible rendering of nested Python literals (for generated modules).

The rule is black's: a collection goes on one line when it fits; otherwise it is exploded,
one element per line with a trailing comma, and each element is laid out the same way.
"""

from __future__ import annotations

from typing import Any

LINE = 100
INDENT = "    "


def _atom(v: Any) -> str | None:
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
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
