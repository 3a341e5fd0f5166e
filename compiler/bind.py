"""Bind parameters to values (one engine side) and evaluate every size: Unit -> BoundSpec."""

from __future__ import annotations

from collections.abc import Iterator

from ..runtime.errors import UsageError
from . import ast
from .diagnostics import Sink
from .ir import DTYPES, BoundSpec, DimIR, LayerIR, PageIR, SegmentIR, StateIR, Unit
from .limits import flag_of

Value = int | str


class _Poison(Exception):
    """An error was reported while evaluating; the value is unknown."""


def parse_value(unit: Unit, name: str, text: str) -> Value:
    """Parse a `--set NAME=VALUE` value for parameter `name` of `unit`."""
    if name not in unit.params:
        known = ", ".join(sorted(unit.params)) or "none"
        raise UsageError(f"--set {name}={text}: '{name}' is not a parameter (parameters: {known})")
    typ = unit.params[name].type
    if typ == "dtype":
        if text not in DTYPES:
            raise UsageError(
                f"--set {name}={text}: not a dtype (dtypes: {', '.join(sorted(DTYPES))})"
            )
        return text
    digits = text.replace("_", "")
    if len(digits) > 40:
        raise UsageError(f"--set {name}: the value has {len(digits)} digits; not an integer here")
    try:
        value = int(digits, 0)
    except ValueError:
        raise UsageError(f"--set {name}={text}: '{text}' is not an integer") from None
    if not unit.limits.int_ok(value):
        raise UsageError(
            f"--set {name}={text}: does not fit in {unit.limits.max_int_bits} bits "
            f"({flag_of('max_int_bits')})"
        )
    return value


class Evaluator:
    def __init__(
        self,
        unit: Unit,
        overrides: dict[str, Value],
        sink: Sink,
        extra: dict[str, int] | None = None,
    ):
        self.unit = unit
        self.overrides = overrides
        self.sink = sink
        self.cache: dict[str, Value | None] = {}
        self.extra = extra or {}

    def lookup(self, name: str, span: ast.Span) -> Value:
        if name in self.extra:
            return self.extra[name]
        if name not in self.cache:
            self.cache[name] = None
            try:
                self.cache[name] = self._define(name, span)
            except _Poison:
                pass
        v = self.cache[name]
        if v is None:
            raise _Poison
        return v

    def _define(self, name: str, span: ast.Span) -> Value:
        unit = self.unit
        if name in unit.params:
            if name in self.overrides:
                return self.overrides[name]
            default = unit.defaults.get(name)
            if default is None:
                p = unit.params[name]
                self.sink.error(
                    f"parameter '{name}' has no default and no value; pass --set {name}=VALUE",
                    p.span,
                    "E050",
                )
                raise _Poison
            value = self.eval(default)
            if isinstance(value, int) != (unit.params[name].type == "int"):
                raise _Poison  # a type error, reported by the types pass
            return value
        if name in unit.lets:
            return self.eval(unit.lets[name].value)
        if name in DTYPES:
            return name
        raise _Poison  # unknown names were reported by the resolve pass

    def eval(self, e: ast.Expr) -> Value:
        value = self._eval(e)
        if isinstance(value, int) and not self.unit.limits.int_ok(value):
            self.sink.error(
                f"value {_short(value)} does not fit in {self.unit.limits.max_int_bits} bits "
                f"({flag_of('max_int_bits')})",
                e.span,
                "E065",
            )
            raise _Poison
        return value

    def _eval(self, e: ast.Expr) -> Value:
        if isinstance(e, ast.Int):
            return e.value
        if isinstance(e, ast.Name):
            return self.lookup(e.name, e.span)
        if isinstance(e, ast.Neg):
            return -self._int(e.operand)
        if isinstance(e, ast.BinOp):
            a, b = self._int(e.left), self._int(e.right)
            if e.op == "+":
                return a + b
            if e.op == "-":
                return a - b
            if e.op == "*":
                return a * b
            if b == 0:
                self.sink.error(f"division by zero in '{e.op}'", e.span, "E051")
                raise _Poison
            if e.op == "//":
                return a // b
            if e.op == "%":
                return a % b
            if a % b:
                self.sink.error(
                    f"{a} / {b} is not exact (use // for floor division)", e.span, "E052"
                )
                raise _Poison
            return a // b
        if isinstance(e, ast.Call):
            args = [self._int(a) for a in e.args]
            if e.func == "max":
                return max(args)
            if e.func == "min":
                return min(args)
            if args[1] <= 0:
                self.sink.error(f"'{e.func}' needs a positive second argument", e.span, "E051")
                raise _Poison
            if e.func == "ceil_div":
                return -(-args[0] // args[1])
            if e.func == "align":
                return -(-args[0] // args[1]) * args[1]
        raise _Poison

    def _int(self, e: ast.Expr) -> int:
        v = self.eval(e)
        if not isinstance(v, int):
            raise _Poison  # reported by the types pass
        return v

    def positive(self, e: ast.Expr, what: str) -> int | None:
        try:
            v = self._int(e)
        except _Poison:
            return None
        if v <= 0:
            self.sink.error(f"{what} must be positive, got {v}", e.span, "E053")
            return None
        return v

    def maybe(self, e: ast.Expr) -> Value | None:
        try:
            return self.eval(e)
        except _Poison:
            return None


def _bind_dims(ev: Evaluator, dims: tuple[ast.Dim, ...], sink: Sink) -> tuple[DimIR, ...]:
    out = []
    for d in dims:
        segs = []
        for seg in d.segments:
            if seg.size is None:  # structured: its own dims, split inside them
                sub = _bind_dims(ev, seg.dims, sink)
                n = 1
                for x in sub:
                    n *= x.size
                segs.append(SegmentIR(seg.name, n, None, seg.span, sub))
                continue
            size = ev.positive(seg.size, f"size of '{seg.name}'")
            unit_ = None
            if seg.split is not None:
                unit_ = 1
                if seg.split.unit is not None:
                    unit_ = ev.positive(seg.split.unit, f"split unit of '{seg.name}'")
                if size is not None and unit_ is not None and size % unit_:
                    sink.error(
                        f"'{seg.name}' has {size} elements, not a multiple of its split "
                        f"unit {unit_}",
                        seg.split.span,
                        "E054",
                    )
            if d.paged and seg.split is not None:
                sink.error(f"paged dim '{d.name}' cannot be split over tp", seg.span, "E055")
            if size is not None and (seg.split is None or unit_ is not None):
                segs.append(SegmentIR(seg.name, size, unit_, seg.span))
        out.append(DimIR(d.name, tuple(segs), d.paged, d.span))
    return tuple(out)


def _all_dims(dims: tuple[DimIR, ...]) -> Iterator[DimIR]:
    for d in dims:
        yield d
        for s in d.segments:
            yield from _all_dims(s.dims)


def _short(value: int) -> str:
    text = str(abs(value))
    sign = "-" if value < 0 else ""
    return sign + (text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)")


def bind(unit: Unit, overrides: dict[str, Value], sink: Sink) -> BoundSpec:
    ev = Evaluator(unit, overrides, sink)
    params = []
    for name, p in unit.params.items():
        try:
            params.append((name, ev.lookup(name, p.span)))
        except _Poison:
            pass
    for name, let in unit.lets.items():
        try:
            ev.lookup(name, let.span)
        except _Poison:
            pass
    states = []
    for st in unit.states.values():
        if st.name not in unit.state_page:
            continue  # reported by the resolve pass
        dtype = ev.maybe(st.dtype)
        if isinstance(dtype, str) and dtype not in DTYPES:
            sink.error(f"unknown dtype '{dtype}'", st.dtype.span, "E042")
        dims = _bind_dims(ev, st.dims, sink)
        paged = [(d, s) for d in _all_dims(dims) if d.paged for s in d.segments]
        structured = any(d.structured for d in dims)  # else two paged dims are E030
        if structured and len({s.size for _, s in paged}) > 1:
            sizes = ", ".join(f"'{d.name}' {s.size}" for d, s in paged)
            sink.error(
                f"state '{st.name}' has paged dims of different sizes ({sizes}); its tokens "
                "per kernel block must be one number",
                paged[1][0].span,
                "E056",
            )
        if isinstance(dtype, str) and dtype in DTYPES:
            states.append(
                StateIR(
                    st.name, dtype, DTYPES[dtype], tuple(dims), unit.state_page[st.name], st.span
                )
            )
    pages = tuple(
        PageIR(p.name, tuple(s.name for s in p.states), p.per, p.span) for p in unit.pages.values()
    )
    layers = []
    for ly in unit.layers.values():
        count = ev.positive(ly.count, f"count of layer '{ly.name}'") if ly.count else None
        layers.append(LayerIR(ly.name, tuple(p.name for p in ly.pages), count, ly.span))
    kb = 1
    if unit.kernel_blocks is not None:
        kb = ev.positive(unit.kernel_blocks.value, "`kernel_blocks`") or 1
    return BoundSpec(unit, tuple(sorted(params)), tuple(states), pages, tuple(layers), kb)
