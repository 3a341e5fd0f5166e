"""Pass 2: types.  Parameters are `int` or `dtype`; sizes are ints; a state's dtype is a dtype.

Type errors are reported where the offending expression is, e.g. `bf16 * 2`.
"""

from __future__ import annotations

from .. import ast
from ..diagnostics import Sink
from ..ir import DTYPES, Unit

TYPES = ("int", "dtype")


class _Types:
    def __init__(self, unit: Unit, sink: Sink):
        self.unit = unit
        self.sink = sink
        self.env: dict[str, str | None] = {}

    def of(self, expr: ast.Expr | None) -> str | None:
        """The type of an expression, or None when unknown (an error was already reported)."""
        if expr is None:
            return None
        if isinstance(expr, ast.Int):
            return "int"
        if isinstance(expr, ast.Name):
            if expr.name in self.env:
                return self.env[expr.name]
            if expr.name in self.unit.pages:
                return "int"
            if expr.name in DTYPES:
                return "dtype"
            return None
        if isinstance(expr, ast.Neg):
            self.want(expr.operand, "int", "an operand of '-'")
            return "int"
        if isinstance(expr, ast.BinOp):
            self.want(expr.left, "int", f"an operand of '{expr.op}'")
            self.want(expr.right, "int", f"an operand of '{expr.op}'")
            return "int"
        if isinstance(expr, ast.Call):
            for a in expr.args:
                self.want(a, "int", f"an argument of '{expr.func}'")
            return "int"
        raise AssertionError(expr)

    def want(self, expr: ast.Expr | None, typ: str, what: str) -> None:
        got = self.of(expr)
        if got is not None and got != typ and expr is not None:
            self.sink.error(f"{what} must be {_a(typ)}, not {_a(got)}", _span(expr), "E040")


def _a(typ: str) -> str:
    return {"int": "an int", "dtype": "a dtype"}.get(typ, typ)


def _span(expr: ast.Expr) -> ast.Span:
    return expr.span


def check_types(unit: Unit, sink: Sink) -> None:
    t = _Types(unit, sink)
    for name, p in unit.params.items():
        if p.type not in TYPES:
            sink.error(f"unknown type '{p.type}' (types: int, dtype)", p.type_span, "E041")
            t.env[name] = None
            continue
        t.env[name] = p.type
        default = unit.defaults.get(name)
        if default is not None:
            t.want(default, p.type, f"the default of '{name}'")
    for name, let in unit.lets.items():
        t.env[name] = t.of(let.value)
    for st in unit.states.values():
        t.want(st.dtype, "dtype", f"the dtype of state '{st.name}'")
        for seg in ast.plain_segments(st.dims):
            t.want(seg.size, "int", f"the size of '{seg.name}'")
            if seg.split is not None and seg.split.unit is not None:
                t.want(seg.split.unit, "int", f"the split unit of '{seg.name}'")
    for ly in unit.layers.values():
        t.want(ly.count, "int", f"the count of layer '{ly.name}'")
    if unit.stride is not None:
        t.want(unit.stride.value, "int", "`stride`")
    if unit.kernel_blocks is not None:
        t.want(unit.kernel_blocks.value, "int", "`kernel_blocks`")
