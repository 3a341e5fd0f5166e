"""Diagnostics: collected, located errors rendered as `file:line:col: error: message`."""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field

from ..runtime.errors import LayoutcError
from .ast import Span


@dataclass(frozen=True)
class Diagnostic:
    message: str
    span: Span | None = None
    code: str = "E000"
    severity: str = "error"
    notes: tuple[str, ...] = ()

    def sort_key(self) -> tuple:
        s = self.span
        return (s.file, s.line, s.col, self.message) if s else ("", 0, 0, self.message)


class LayoutError(LayoutcError):
    """One or more diagnostics about a spec.  Rendered by :func:`render`."""

    def __init__(self, diagnostics: list[Diagnostic] | Diagnostic):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = sorted(diagnostics, key=Diagnostic.sort_key)
        super().__init__("; ".join(d.message for d in self.diagnostics))


class LayoutSyntaxError(LayoutError):
    pass


class LayoutSemanticError(LayoutError):
    pass


class InternalError(LayoutcError, RuntimeError):
    """A compiler bug: an emitted plan failed verification.  Never shown as a spec error."""


@dataclass
class Sink:
    """Collects diagnostics from the passes; `raise_if_any` ends a stage with all of them."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def error(self, message: str, span: Span | None, code: str = "E000", *notes: str) -> None:
        self.diagnostics.append(Diagnostic(message, span, code, "error", tuple(notes)))

    def raise_if_any(self, cls: type[LayoutError] = LayoutSemanticError) -> None:
        if self.diagnostics:
            raise cls(list(self.diagnostics))


class Sources:
    """Source texts by display path, attached at the boundary for rendering."""

    def __init__(self) -> None:
        self._texts: dict[str, str] = {}

    def add(self, path: str, text: str) -> None:
        self._texts[path] = text

    def line(self, path: str, line: int) -> str | None:
        text = self._texts.get(path)
        if text is None:
            return None
        lines = text.split("\n")
        return lines[line - 1] if 1 <= line <= len(lines) else None


def _one_column(c: str) -> str:
    """`c` if it takes exactly one terminal column, else `?` (keeps the caret under its column:
    control, combining and wide characters, and the replacement character of undecodable bytes)."""
    if not c.isprintable() or c == "\ufffd" or unicodedata.combining(c):
        return "?"
    if unicodedata.east_asian_width(c) in ("W", "F"):
        return "?"
    return c


def render(err: LayoutError, sources: Sources, fmt: str = "human") -> str:
    """All diagnostics of `err`, in `human` (with source line and caret) or `json` format."""
    if fmt == "json":
        return json.dumps(
            [
                {
                    "file": d.span.file if d.span else None,
                    "line": d.span.line if d.span else None,
                    "col": d.span.col if d.span else None,
                    "severity": d.severity,
                    "code": d.code,
                    "message": d.message,
                    "notes": list(d.notes),
                }
                for d in err.diagnostics
            ],
            indent=2,
        )
    out: list[str] = []
    for d in err.diagnostics:
        if d.span is None:
            out.append(f"layoutc: {d.severity}[{d.code}]: {d.message}")
        else:
            s = d.span
            out.append(f"{s.file}:{s.line}:{s.col}: {d.severity}[{d.code}]: {d.message}")
            if fmt == "human":
                src = sources.line(s.file, s.line)
                if src is not None:
                    src = "".join(map(_one_column, src.replace("\t", " ")))
                    col = s.col
                    width = (s.end_col - s.col) if s.end_line == s.line else len(src) - s.col + 1
                    width = max(1, min(width, 80))
                    if len(src) > 100:  # long (or binary) lines: a window around the caret
                        start = max(0, col - 40)
                        src = src[start : start + 100]
                        col -= start
                    out.append(f"  {src}")
                    out.append("  " + " " * (col - 1) + "^" + "~" * (width - 1))
        for note in d.notes:
            out.append(f"  note: {note}")
    n = len(err.diagnostics)
    if fmt == "human" and n > 1:
        out.append(f"{n} errors")
    return "\n".join(out)
