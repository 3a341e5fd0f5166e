"""Pass 1: load `use`d family specs, collect declarations, check names.

Reports duplicate declarations, unknown names in expressions, pages naming unknown states,
states in no page or in two pages, layers naming unknown pages, repeated `stride` or
`kernel_blocks`, and `use` cycles or missing files.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import ast
from ..diagnostics import Sink
from ..ir import DTYPES, Unit
from ..limits import DEFAULT, Limits, flag_of

FUNCTIONS = {"max": (1, None), "min": (1, None), "ceil_div": (2, 2), "align": (2, 2)}

#: Words of a dim declaration; a dim or segment named like one is a misplaced keyword.
_DIM_KEYWORDS = ("split", "tp", "by", "paged", "concat")

Loader = Callable[[str, ast.Span, str], "tuple[ast.Module, str] | None"]


def _names_in(expr: ast.Expr):
    if isinstance(expr, ast.Name):
        yield expr
    elif isinstance(expr, ast.BinOp):
        yield from _names_in(expr.left)
        yield from _names_in(expr.right)
    elif isinstance(expr, ast.Neg):
        yield from _names_in(expr.operand)
    elif isinstance(expr, ast.Call):
        for a in expr.args:
            yield from _names_in(a)


def _calls_in(expr: ast.Expr):
    if isinstance(expr, ast.Call):
        yield expr
        for a in expr.args:
            yield from _calls_in(a)
    elif isinstance(expr, ast.BinOp):
        yield from _calls_in(expr.left)
        yield from _calls_in(expr.right)
    elif isinstance(expr, ast.Neg):
        yield from _calls_in(expr.operand)


def _collect(
    module: ast.Module,
    unit: Unit,
    sink: Sink,
    load: Loader,
    stack: tuple[str, ...],
    limits: Limits,
) -> None:
    seen: dict[str, ast.Span] = {}
    seen_layers: dict[str, ast.Span] = {n: ly.span for n, ly in unit.layers.items()}
    for kind in ("params", "lets", "states", "pages"):
        for name, node in getattr(unit, kind).items():
            seen[name] = node.span

    def declare(name: str, span: ast.Span, what: str) -> bool:
        table = seen_layers if what == "layer" else seen
        if name in table:
            prev = table[name]
            sink.error(f"duplicate name '{name}' ({what}); first declared at {prev}", span, "E010")
            return False
        table[name] = span
        return True

    uses = [it for it in module.items if isinstance(it, ast.Use)]
    for extra in uses[1:]:
        sink.error("a spec may `use` one family spec only", extra.span, "E011")
    for use in uses[:1]:
        if len(stack) > limits.max_use_depth:
            sink.error(
                f"`use` chain longer than {limits.max_use_depth} ({flag_of('max_use_depth')})",
                use.span,
                "E067",
            )
            continue
        loaded = load(use.path, use.span, module.path)
        if loaded is None:
            continue
        family, resolved = loaded
        if resolved in stack:
            sink.error(f"`use` cycle: {' -> '.join(stack + (resolved,))}", use.span, "E012")
            continue
        _collect(family, unit, sink, load, stack + (resolved,), limits)
        seen.update({n: unit.params[n].span for n in unit.params})
        for kind in ("lets", "states", "pages"):
            for name, node in getattr(unit, kind).items():
                seen[name] = node.span
        seen_layers.update({n: ly.span for n, ly in unit.layers.items()})
        for b in use.bindings:
            if b.name not in unit.params:
                known = ", ".join(sorted(unit.params)) or "none"
                sink.error(
                    f"'{b.name}' is not a parameter of {use.path} (parameters: {known})",
                    b.span,
                    "E013",
                )
            else:
                unit.defaults[b.name] = b.value

    for it in module.items:
        if isinstance(it, ast.Param):
            if declare(it.name, it.span, "param"):
                unit.params[it.name] = it
                unit.defaults[it.name] = it.default
        elif isinstance(it, ast.Let):
            if declare(it.name, it.span, "let"):
                unit.lets[it.name] = it
        elif isinstance(it, ast.State):
            if declare(it.name, it.span, "state"):
                unit.states[it.name] = it
        elif isinstance(it, ast.Page):
            if declare(it.name, it.span, "page"):
                unit.pages[it.name] = it
        elif isinstance(it, ast.Layer):
            if declare(it.name, it.span, "layer"):
                unit.layers[it.name] = it
        elif isinstance(it, ast.Stride):
            if unit.stride is not None and unit.stride.span.file == it.span.file:
                sink.error(f"second `stride`; first at {unit.stride.span}", it.span, "E014")
            unit.stride = it
        elif isinstance(it, ast.KernelBlocks):
            if unit.kernel_blocks is not None and unit.kernel_blocks.span.file == it.span.file:
                sink.error(
                    f"second `kernel_blocks`; first at {unit.kernel_blocks.span}", it.span, "E014"
                )
            unit.kernel_blocks = it


def _check_refs(unit: Unit, sink: Sink) -> None:
    values = set(unit.params) | set(unit.lets)
    order = list(unit.params) + list(unit.lets)

    def check_expr(
        expr: ast.Expr | None, allowed: set[str], where: str, dtype: bool = False
    ) -> None:
        if expr is None:
            return
        for n in _names_in(expr):
            if n.name not in allowed and n.name not in DTYPES:
                hint = ""
                if n.name in unit.pages and "page" not in where:
                    hint = " (page sizes may be used only in `stride`)"
                elif "dtype" in where or dtype:
                    hint = f" (dtypes: {', '.join(sorted(DTYPES))})"
                sink.error(f"unknown name '{n.name}' in {where}{hint}", n.span, "E020")
        for c in _calls_in(expr):
            if c.func not in FUNCTIONS:
                known = ", ".join(sorted(FUNCTIONS))
                sink.error(f"unknown function '{c.func}' (functions: {known})", c.span, "E021")
                continue
            lo, hi = FUNCTIONS[c.func]
            if len(c.args) < lo or (hi is not None and len(c.args) > hi):
                want = f"{lo}" if lo == hi else f"at least {lo}"
                sink.error(
                    f"'{c.func}' takes {want} argument(s), got {len(c.args)}", c.span, "E021"
                )

    # parameters and lets may refer to those declared before them (no cycles by construction)
    for i, name in enumerate(order):
        earlier = set(order[:i])
        if name in unit.params:
            check_expr(
                unit.defaults.get(name),
                earlier,
                f"the default of '{name}'",
                unit.params[name].type == "dtype",
            )
        else:
            check_expr(unit.lets[name].value, earlier, f"'let {name}'")
    for st in unit.states.values():
        check_expr(st.dtype, values, f"the dtype of state '{st.name}'")
        _check_dims(st, st.dims, f"state '{st.name}'", values, check_expr, sink)
        structured = [d for d in st.dims if any(seg.dims for seg in d.segments)]
        for extra in structured[1:]:
            sink.error(
                f"state '{st.name}' has a second dim with structured segments ('{extra.name}'); "
                "a state may have one",
                extra.span,
                "E036",
            )
        comps = component_dims(st)
        reported: set[tuple[ast.Span, ...]] = set()
        for dims in comps:
            split_dims = [d for d in dims if any(seg.split is not None for seg in d.segments)]
            if len(split_dims) > 1 and (split_dims[0].span, split_dims[1].span) not in reported:
                reported.add((split_dims[0].span, split_dims[1].span))
                a, b = split_dims[0], split_dims[1]
                sink.error(
                    f"state '{st.name}' is split over tp in two dims ('{a.name}' and "
                    f"'{b.name}'); a state can be split in one dim only (the ranks would not "
                    "hold all of it)",
                    b.span,
                    "E035",
                )
            paged = [d for d in dims if d.paged]
            if len(paged) > 1 and (paged[1].span,) not in reported:
                reported.add((paged[1].span,))
                sink.error(f"state '{st.name}' has more than one paged dim", paged[1].span, "E030")
        with_paged = [any(d.paged for d in dims) for dims in comps]
        if any(with_paged) and not all(with_paged):
            seg = structured[0].segments[with_paged.index(False)]
            sink.error(
                f"state '{st.name}': segment '{seg.name}' has no paged dim but another segment "
                "of the state does; give each structured segment its token dim, or none",
                seg.span,
                "E030",
            )
        if not st.dims:
            sink.error(f"state '{st.name}' has no dims", st.span, "E031")
    for pg in unit.pages.values():
        if not pg.states:
            sink.error(f"page '{pg.name}' holds no state", pg.span, "E032")
        for s in pg.states:
            if s.name not in unit.states:
                sink.error(f"page '{pg.name}' names unknown state '{s.name}'", s.span, "E022")
            elif s.name in unit.state_page:
                other = unit.state_page[s.name]
                sink.error(f"state '{s.name}' is already in page '{other}'", s.span, "E033")
            else:
                unit.state_page[s.name] = pg.name
    for st in unit.states.values():
        if st.name not in unit.state_page:
            sink.error(f"state '{st.name}' is in no page; add it to a `page`", st.span, "E034")
    for ly in unit.layers.values():
        check_expr(ly.count, values, f"the count of layer '{ly.name}'")
        for p in ly.pages:
            if p.name not in unit.pages:
                sink.error(f"layer '{ly.name}' names unknown page '{p.name}'", p.span, "E022")
    if unit.stride is not None:
        check_expr(unit.stride.value, values | set(unit.pages), "`stride` (page sizes)")
    if unit.kernel_blocks is not None:
        check_expr(unit.kernel_blocks.value, values, "`kernel_blocks`")


def component_dims(st: ast.State) -> list[tuple[ast.Dim, ...]]:
    """The dims of each component of a state: one list, or one per structured segment (the dims
    before the structured dim, the segment's own dims, the dims after it)."""
    j = next((i for i, d in enumerate(st.dims) if any(seg.dims for seg in d.segments)), None)
    if j is None:
        return [st.dims]
    outer, inner = st.dims[:j], st.dims[j + 1 :]
    out = []
    for seg in st.dims[j].segments:
        sub = seg.dims or (ast.Dim(seg.name, (seg,), False, False, seg.span),)
        out.append((*outer, *sub, *inner))
    return out


def _check_dims(
    st: ast.State,
    dims: tuple[ast.Dim, ...],
    where: str,
    values: set[str],
    check_expr: Callable[[ast.Expr | None, set[str], str], None],
    sink: Sink,
) -> None:
    """Names, sizes and split units of `dims` (a state's, or a structured segment's own)."""
    dim_names: dict[str, ast.Span] = {}
    for d in dims:
        parts: list[ast.Dim | ast.Segment] = [d, *d.segments]
        misplaced = [x for x in parts if x.name in _DIM_KEYWORDS]
        if misplaced:
            # `head 8 paged split tp` parses `split` as the name of a new dim
            sink.error(
                f"'{misplaced[0].name}' is out of place in {where}: a dim reads "
                "`NAME SIZE [split tp [by UNIT]] [paged]`",
                misplaced[0].span,
                "E023",
            )
            continue
        if d.name in dim_names:
            sink.error(f"duplicate dim '{d.name}' in {where}", d.span, "E010")
        dim_names[d.name] = d.span
        seg_names: set[str] = set()
        for seg in d.segments:
            if d.is_concat and seg.name in seg_names:
                sink.error(f"duplicate segment '{seg.name}' in dim '{d.name}'", seg.span, "E010")
            seg_names.add(seg.name)
            if seg.size is None:  # structured: its own dims
                if not seg.dims:
                    sink.error(f"segment '{seg.name}' of '{d.name}' has no dims", seg.span, "E031")
                _check_dims(
                    st,
                    seg.dims,
                    f"segment '{seg.name}' of state '{st.name}'",
                    values,
                    check_expr,
                    sink,
                )
                continue
            check_expr(seg.size, values, f"the size of '{seg.name}'")
            if seg.split is not None:
                check_expr(seg.split.unit, values, f"the split unit of '{seg.name}'")


def resolve(
    module: ast.Module, sha256: str, load: Loader, sink: Sink, limits: Limits = DEFAULT
) -> Unit:
    unit = Unit(path=module.path, sha256=sha256, limits=limits)
    _collect(module, unit, sink, load, (module.path,), limits)
    _check_refs(unit, sink)
    if not unit.states and not sink.diagnostics:
        sink.error(
            "spec declares no state; a spec needs at least one `state` and a `page` holding it",
            ast.Span(module.path, 1, 1, 1, 1),
            "E031",
        )
    return unit
