"""Pass 3 (per TP size): divisibility of every split, per-rank byte sizes, page offsets, stride.

Errors name the dim or segment and both numbers, at the declaration:
`dim 'head' of state 'kv' (6 heads) cannot be split over tp 4: needs 6 % 4 == 0 or 4 % 6 == 0`.
"""

from __future__ import annotations

from ...runtime.layout import ShardError, shard
from ..bind import Evaluator
from ..diagnostics import Sink
from ..ir import BoundSpec, DimIR, RankedPage, RankedSpec, RankedState, StateIR
from ..limits import flag_of
from .resolve import _names_in as _names


def _local_elems(
    state: StateIR, dims: tuple[DimIR, ...], tp: int, sink: Sink, role: str
) -> int | None:
    """Elements of `dims` one rank holds at `tp` (None, with errors, when a split fails)."""
    n = 1
    ok = True
    for d in dims:
        size = 0
        for seg in d.segments:
            if seg.dims:
                sub = _local_elems(state, seg.dims, tp, sink, role)
                ok = ok and sub is not None
                size += sub or 0
                continue
            try:
                size += shard(seg.size, seg.unit, tp, 0)[1]
            except ShardError:
                ok = False
                units = seg.size // (seg.unit or 1)
                what = (
                    f"dim '{d.name}'"
                    if len(d.segments) == 1
                    else f"segment '{seg.name}' of '{d.name}'"
                )
                size_txt = f"size {units}" if seg.unit == 1 else f"{units} units of {seg.unit}"
                sink.error(
                    f"{what} of state '{state.name}' ({size_txt}) cannot be split "
                    f"over {role}tp {tp} (needs {units} % {tp} == 0 or {tp} % {units} == 0)",
                    seg.span,
                    "E060",
                )
        n *= size
    return n if ok else None


def rank(bound: BoundSpec, tp: int, sink: Sink, role: str = "") -> RankedSpec | None:
    """Lay out `bound` at TP size `tp`; None (with diagnostics) when it cannot be."""
    role_txt = f"{role} " if role else ""
    if tp <= 0:
        sink.error(f"{role_txt}tp must be positive, got {tp}", None, "E061")
        return None
    sizes = {}
    for st in bound.states:
        n = _local_elems(st, st.dims, tp, sink, role_txt)
        if n is not None:
            sizes[st.name] = n * st.itemsize
    if len(sizes) != len(bound.states):
        return None
    kb = bound.kernel_blocks
    states = []
    page_bytes = {}
    for pg in bound.pages:
        off = 0
        for s in pg.states:
            states.append(RankedState(bound.state(s), off, sizes[s]))
            off += sizes[s]
        page_bytes[pg.name] = off
    need = {
        pg.name: page_bytes[pg.name] if pg.per == "kernel_block" else -(-page_bytes[pg.name] // kb)
        for pg in bound.pages
    }
    strides = dict(need)
    unit = bound.unit
    if unit.stride is not None:
        ev = Evaluator(unit, dict(bound.params), sink, extra=need)
        value = ev.maybe(unit.stride.value)
        if not isinstance(value, int):
            return None
        named = {n.name for n in _names(unit.stride.value)} & set(need) or set(need)
        bad = False
        for name in sorted(named):
            if value < need[name]:
                bad = True
                pg = bound.page(name)
                unit_txt = (
                    "kernel block"
                    if pg.per == "kernel_block"
                    else f"logical block of {kb} kernel blocks"
                )
                sink.error(
                    f"page overflow at {role_txt}tp {tp}: page '{name}' needs {page_bytes[name]} "
                    f"bytes per {unit_txt} but the stride is {value}"
                    + (
                        ""
                        if pg.per == "kernel_block"
                        else f" per kernel block ({value * kb} per logical block)"
                    ),
                    unit.stride.span,
                    "E062",
                )
            strides[name] = value
        if bad:
            return None
    if not _within_limits(bound, tp, role_txt, strides, sink):
        return None
    pages = tuple(RankedPage(pg, page_bytes[pg.name], strides[pg.name]) for pg in bound.pages)
    return RankedSpec(bound, tp, tuple(states), pages)


def _within_limits(
    bound: BoundSpec, tp: int, role_txt: str, strides: dict[str, int], sink: Sink
) -> bool:
    """Page strides and the bytes of one logical block against the compiler's limits."""
    unit, limits, kb = bound.unit, bound.unit.limits, bound.kernel_blocks
    for pg in bound.pages:
        if strides[pg.name] > limits.max_page_stride:
            sink.error(
                f"page '{pg.name}' has a stride of {strides[pg.name]} bytes per kernel block on "
                f"{role_txt}tp {tp}; the limit is {limits.max_page_stride} "
                f"({flag_of('max_page_stride')})",
                unit.stride.span if unit.stride is not None else pg.span,
                "E063",
            )
            return False
    total = kb * sum(strides.values())
    if total > limits.max_bytes:
        biggest = max(bound.pages, key=lambda pg: strides[pg.name])
        parts = ", ".join(f"'{pg.name}' {strides[pg.name]}" for pg in bound.pages)
        where = (
            unit.kernel_blocks.span if unit.kernel_blocks is not None and kb > 1 else biggest.span
        )
        sink.error(
            f"one logical block of a layer takes {total} bytes on {role_txt}tp {tp} "
            f"(kernel_blocks {kb} x page strides {parts}); the limit is {limits.max_bytes} "
            f"({flag_of('max_bytes')})",
            where,
            "E063",
        )
        return False
    return True
