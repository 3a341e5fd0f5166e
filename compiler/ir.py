"""Intermediate representations between the passes.

* :class:`Unit` - a spec after name resolution: every declaration of the file and of the
  family spec it uses, by name, in source order.
* :class:`BoundSpec` - a unit with every parameter bound to a value (one engine side): integer
  sizes, dtypes, pages.  TP-independent.
* :class:`RankedSpec` - a bound spec at one TP size: per-state local shapes, byte sizes, page
  offsets and strides.  This is what the planner and the verifier consume.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..runtime.plan import DTYPE_SIZES
from . import ast
from .diagnostics import Diagnostic
from .limits import DEFAULT, Limits

DTYPES = DTYPE_SIZES  # dtype name -> bytes
PAGE_UNITS = ("kernel_block", "logical_block")


@dataclass
class Unit:
    """Resolved declarations of one spec (family items first, then the spec's own)."""

    path: str
    sha256: str
    params: dict[str, ast.Param] = field(default_factory=dict)
    defaults: dict[str, ast.Expr | None] = field(default_factory=dict)  # after `use` bindings
    lets: dict[str, ast.Let] = field(default_factory=dict)
    states: dict[str, ast.State] = field(default_factory=dict)
    pages: dict[str, ast.Page] = field(default_factory=dict)
    layers: dict[str, ast.Layer] = field(default_factory=dict)
    stride: ast.Stride | None = None
    kernel_blocks: ast.KernelBlocks | None = None
    state_page: dict[str, str] = field(default_factory=dict)
    pending: list[Diagnostic] = field(default_factory=list)  # unit-pass errors, not yet raised
    limits: Limits = DEFAULT


# --- bound (values known, TP not yet) ---------------------------------------------------------


@dataclass(frozen=True)
class SegmentIR:
    name: str
    size: int  # global elements (of one kernel block, for a paged dim)
    unit: int | None  # None: replicated; else split over tp in units of `unit` elements
    span: ast.Span
    dims: tuple[DimIR, ...] = ()  # a structured segment's own dims (then `unit` is None)


@dataclass(frozen=True)
class DimIR:
    name: str
    segments: tuple[SegmentIR, ...]
    paged: bool
    span: ast.Span

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)

    @property
    def structured(self) -> bool:
        return any(s.dims for s in self.segments)


@dataclass(frozen=True)
class StateIR:
    name: str
    dtype: str
    itemsize: int
    dims: tuple[DimIR, ...]
    page: str
    span: ast.Span


@dataclass(frozen=True)
class PageIR:
    name: str
    states: tuple[str, ...]
    per: str
    span: ast.Span


@dataclass(frozen=True)
class LayerIR:
    name: str
    pages: tuple[str, ...]
    count: int | None
    span: ast.Span | None = None


@dataclass(frozen=True)
class BoundSpec:
    unit: Unit
    params: tuple[tuple[str, int | str], ...]  # every parameter, sorted by name
    states: tuple[StateIR, ...]
    pages: tuple[PageIR, ...]
    layers: tuple[LayerIR, ...]
    kernel_blocks: int

    def state(self, name: str) -> StateIR:
        return next(s for s in self.states if s.name == name)

    def page(self, name: str) -> PageIR:
        return next(p for p in self.pages if p.name == name)


# --- at one TP size ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RankedState:
    ir: StateIR
    offset: int  # bytes from the page start
    nbytes: int  # per rank (equal on every rank)


@dataclass(frozen=True)
class RankedPage:
    ir: PageIR
    nbytes: int
    kernel_stride: int


@dataclass(frozen=True)
class RankedSpec:
    bound: BoundSpec
    tp: int
    states: tuple[RankedState, ...]
    pages: tuple[RankedPage, ...]

    @property
    def kernel_blocks(self) -> int:
        return self.bound.kernel_blocks

    def state(self, name: str) -> RankedState:
        return next(s for s in self.states if s.ir.name == name)

    def page(self, name: str) -> RankedPage:
        return next(p for p in self.pages if p.ir.name == name)
