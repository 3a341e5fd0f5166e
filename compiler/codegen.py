"""Plans -> one Python module per spec (jinja2).  Deterministic byte for byte."""

from __future__ import annotations

import functools
from typing import Any

import jinja2

from .. import __version__
from ..runtime.layout import DimDesc
from ..runtime.plan import Plan, RunGroup, SideLayout
from .ir import Unit
from .pyfmt import comment, escape, fmt, string


@functools.lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    """Every text a template places is a Python literal (``pystr``), a comment (``comment``)
    or docstring text (``doc``): never pasted as code."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("layoutc.compiler", "templates"),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )
    env.filters.update(pystr=string, comment=comment, doc=escape)
    return env


def _dims_table(dims: tuple[DimDesc, ...]) -> tuple[Any, ...]:
    return tuple(
        (
            d.name,
            d.paged,
            tuple(
                (g.name, g.size, g.unit, _dims_table(g.dims))
                if g.dims
                else (g.name, g.size, g.unit)
                for g in d.segments
            ),
        )
        for d in dims
    )


def module_format(plans: list[Plan]) -> tuple[int, int]:
    """The oldest plan format that holds `plans` (1.2 for token remaps, 1.1 for structured
    segments), so a module is readable by every runtime that can read it."""
    if any(pl.remap is not None for pl in plans):
        return (1, 2)
    structured = any(d.structured for pl in plans for s in pl.decode.states for d in s.dims)
    return (1, 1) if structured else (1, 0)


def _side_table(side: SideLayout) -> tuple[Any, ...]:
    return (
        side.tp,
        side.kernel_blocks,
        tuple((p.name, p.states, p.nbytes, p.per, p.kernel_stride) for p in side.pages),
        tuple(
            (
                s.name,
                s.page,
                s.dtype,
                s.offset,
                s.nbytes,
                s.itemsize,
                _dims_table(s.dims),
            )
            for s in side.states
        ),
    )


def _group(g: RunGroup, pages: tuple[str, ...], states: tuple[str, ...]) -> tuple:
    row = (
        pages.index(g.page),
        g.prefill_rank,
        g.decode_offset,
        g.prefill_offset,
        g.nbytes,
        g.shape,
        g.decode_stride,
        g.prefill_stride,
        -1 if g.state is None else states.index(g.state),
    )
    return row if g.token_stride == (0, 0) else (*row, g.token_stride)


def render_module(unit: Unit, source: str, plans: list[Plan], command: str) -> str:
    """The text of the generated module for `plans` (one per compiled pair, same spec)."""
    plans = sorted(plans, key=lambda p: (p.prefill_tp, p.decode_tp))
    spec = plans[0].spec
    sides: dict[tuple[str, int], tuple] = {}
    pairs: dict[tuple[int, int], tuple] = {}
    for pl in plans:
        sides[("prefill", pl.prefill_tp)] = _side_table(pl.prefill)
        sides[("decode", pl.decode_tp)] = _side_table(pl.decode)
        pages = pl.decode.page_names
        states = tuple(s.name for s in pl.decode.states)
        pairs[(pl.prefill_tp, pl.decode_tp)] = tuple(
            (
                r.rank,
                r.sources,
                r.notify_only,
                tuple(_group(g, pages, states) for g in r.reads),
                tuple(_group(g, pages, states) for g in r.posts),
            )
            for r in pl.ranks
        )
    sides = dict(sorted(sides.items()))
    remap = {
        (pl.prefill_tp, pl.decode_tp): (
            pl.remap.chunk_tokens,
            pl.remap.prefill_kernel_tokens,
            pl.remap.prefill_kernel_blocks,
            pl.remap.decode_kernel_tokens,
            pl.remap.decode_kernel_blocks,
        )
        for pl in plans
        if pl.remap is not None
    }
    spans = [(f"state {s.name}", str(s.span)) for s in unit.states.values()]
    spans += [(f"page {p.name}", str(p.span)) for p in unit.pages.values()]
    params = {
        "prefill": dict(plans[0].prefill.params),
        "decode": dict(plans[0].decode.params),
    }
    view = {
        "version": __version__,
        "source": source,
        "sha256": unit.sha256,
        "spec": spec,
        "pairs_text": ", ".join(f"{p}:{d}" for p, d in pairs),
        "first_pair": next(iter(pairs)),
        "command": command,
        "plan_format": fmt(module_format(plans)),
        "spans": spans,
        "spans_dict": fmt(dict(spans), 0, "SPANS = "),
        "params": fmt(params, 0, "PARAMS = "),
        "layer_kinds": fmt(plans[0].layer_kinds, 0, "LAYER_KINDS = "),
        "sides": fmt(sides, 0, "SIDES = "),
        "pairs": fmt(pairs, 0, "PAIRS = "),
        "remap": fmt(remap, 0, "REMAP = ") if remap else "",
        "compiled_pairs": fmt(tuple(pairs)),
    }
    return _env().get_template("plan_module.py.j2").render(**view)
