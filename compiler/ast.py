"""The syntax tree of a .layout file: frozen dataclasses, each node with its source span."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Span:
    """A source range: 1-based line/column of the first and one-past-last character."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


# --- expressions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Int:
    value: int
    span: Span


@dataclass(frozen=True, slots=True)
class Name:
    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class BinOp:
    op: str  # "+", "-", "*", "//", "/", "%"
    left: Expr
    right: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Neg:
    operand: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Call:
    func: str
    args: tuple[Expr, ...]
    span: Span


Expr = Int | Name | BinOp | Neg | Call


# --- declarations ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Binding:
    name: str
    value: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Use:
    path: str
    bindings: tuple[Binding, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    type: str
    default: Expr | None
    span: Span
    type_span: Span


@dataclass(frozen=True, slots=True)
class Let:
    name: str
    value: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Split:
    """`split tp [by unit]`: contiguous chunks over the TP axis, in units of `unit` elements."""

    unit: Expr | None
    span: Span


@dataclass(frozen=True, slots=True)
class Segment:
    """One named piece of a dim: a plain dim is one segment, a `concat` dim several.

    A *structured* segment (`K { dim 128  token 16 paged }`) is a small array of its own: it
    has `dims` instead of a size and a split.
    """

    name: str
    size: Expr | None
    split: Split | None
    span: Span
    dims: tuple[Dim, ...] = ()


@dataclass(frozen=True, slots=True)
class Dim:
    name: str
    segments: tuple[Segment, ...]
    is_concat: bool
    paged: bool
    span: Span


@dataclass(frozen=True, slots=True)
class State:
    name: str
    dtype: Expr
    dims: tuple[Dim, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Page:
    name: str
    states: tuple[Name, ...]
    per: str  # "kernel_block" or "logical_block"
    span: Span


@dataclass(frozen=True, slots=True)
class Stride:
    value: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Layer:
    name: str
    pages: tuple[Name, ...]
    count: Expr | None
    span: Span


@dataclass(frozen=True, slots=True)
class KernelBlocks:
    value: Expr
    span: Span


def plain_segments(dims: tuple[Dim, ...]) -> Iterator[Segment]:
    """Every sized segment of `dims`, structured segments' own dims included."""
    for d in dims:
        for seg in d.segments:
            if seg.size is None:
                yield from plain_segments(seg.dims)
            else:
                yield seg


Item = Use | Param | Let | State | Page | Stride | Layer | KernelBlocks


@dataclass(frozen=True, slots=True)
class Module:
    """One parsed .layout file."""

    path: str
    items: tuple[Item, ...]
