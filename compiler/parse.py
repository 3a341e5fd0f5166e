"""Text -> AST.  The grammar ships in the package (`layoutc/grammar/layout.lark`)."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

from lark import Lark, Token, Transformer, Tree, UnexpectedInput, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken, VisitError

from . import ast
from .diagnostics import Diagnostic, LayoutSyntaxError
from .limits import DEFAULT, Limits, flag_of

# Friendly names for terminals in "expected ..." messages.
_TERMINAL_NAMES = {
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LBRACKET": "'['",
    "RBRACKET": "']'",
    "LPAR": "'('",
    "RPAR": "')'",
    "COLON": "':'",
    "COMMA": "','",
    "EQUAL": "'='",
    "PLUS": "'+'",
    "MINUS": "'-'",
    "TIMES": "'*'",
    "FLOORDIV": "'//'",
    "SLASH": "'/'",
    "PERCENT": "'%'",
    "NAME": "a name",
    "INT": "an integer",
    "STRING": "a quoted path",
    "PAGE_UNIT": "kernel_block or logical_block",
    "$END": "end of file",
}
_KEYWORDS = (
    "USE",
    "PARAM",
    "LET",
    "STATE",
    "PAGE",
    "STRIDE",
    "LAYER",
    "KERNEL_BLOCKS",
    "CONCAT",
    "SPLIT",
    "TP",
    "BY",
    "PAGED",
    "PER",
)
for _k in _KEYWORDS:
    _TERMINAL_NAMES[_k] = f"'{_k.lower()}'"


@functools.lru_cache(maxsize=1)
def parser() -> Lark:
    text = resources.files("layoutc.grammar").joinpath("layout.lark").read_text("utf-8")
    return Lark(text, parser="lalr", propagate_positions=True, maybe_placeholders=False)


def _span(path: str, meta: Any) -> ast.Span:
    return ast.Span(path, meta.line, meta.column, meta.end_line, meta.end_column)


def _tok_span(path: str, tok: Token) -> ast.Span:
    return ast.Span(path, tok.line or 1, tok.column or 1, tok.end_line or 1, tok.end_column or 1)


@v_args(meta=True)
class _Build(Transformer):
    """Builds AST nodes only; all checking happens in the passes."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def _s(self, meta) -> ast.Span:
        return _span(self.path, meta)

    # expressions
    def int_lit(self, meta, ch):
        return ast.Int(int(str(ch[0]).replace("_", "")), self._s(meta))

    def name_ref(self, meta, ch):
        return ast.Name(str(ch[0]), self._s(meta))

    def call(self, meta, ch):
        args = [c for c in ch[2].children if not isinstance(c, Token)] if len(ch) == 4 else []
        return ast.Call(str(ch[0]), tuple(args), self._s(meta))

    def paren(self, meta, ch):
        return ch[1]

    def neg(self, meta, ch):
        return ast.Neg(ch[1], self._s(meta))

    def _bin(self, meta, ch):
        return ast.BinOp(str(ch[1]), ch[0], ch[2], self._s(meta))

    add = sub = mul = floordiv = exactdiv = mod = _bin

    # declarations
    def binding(self, meta, ch):
        return ast.Binding(str(ch[0]), ch[2], self._s(meta))

    def use_decl(self, meta, ch):
        path = str(ch[1])[1:-1]
        binds = tuple(c for c in ch if isinstance(c, ast.Binding))
        return ast.Use(path, binds, self._s(meta))

    def param_decl(self, meta, ch):
        default = ch[5] if len(ch) > 5 else None
        return ast.Param(
            str(ch[1]), str(ch[3]), default, self._s(meta), _tok_span(self.path, ch[3])
        )

    def let_decl(self, meta, ch):
        return ast.Let(str(ch[1]), ch[3], self._s(meta))

    def dist(self, meta, ch):
        return ast.Split(ch[3] if len(ch) > 3 else None, self._s(meta))

    def paged(self, meta, ch):
        return True

    def segment(self, meta, ch):
        split = ch[2] if len(ch) > 2 else None
        return ast.Segment(str(ch[0]), ch[1], split, self._s(meta))

    def struct_segment(self, meta, ch):
        dims = tuple(c for c in ch if isinstance(c, ast.Dim))
        return ast.Segment(str(ch[0]), None, None, self._s(meta), dims)

    def plain_dim(self, meta, ch):
        split = next((c for c in ch[2:] if isinstance(c, ast.Split)), None)
        paged = any(c is True for c in ch[2:])
        seg = ast.Segment(str(ch[0]), ch[1], split, self._s(meta))
        return ast.Dim(str(ch[0]), (seg,), False, paged, self._s(meta))

    def concat_dim(self, meta, ch):
        segs = tuple(c for c in ch if isinstance(c, ast.Segment))
        return ast.Dim(str(ch[0]), segs, True, False, self._s(meta))

    def state_decl(self, meta, ch):
        dims = tuple(c for c in ch if isinstance(c, ast.Dim))
        return ast.State(str(ch[1]), ch[3], dims, self._s(meta))

    def name_list(self, meta, ch):
        return tuple(ast.Name(str(t), _tok_span(self.path, t)) for t in ch if t.type == "NAME")

    def page_decl(self, meta, ch):
        per = str(ch[7]) if len(ch) > 7 else "kernel_block"
        return ast.Page(str(ch[1]), ch[4], per, self._s(meta))

    def stride_decl(self, meta, ch):
        return ast.Stride(ch[1], self._s(meta))

    def layer_decl(self, meta, ch):
        count = ch[7] if len(ch) > 7 else None
        return ast.Layer(str(ch[1]), ch[4], count, self._s(meta))

    def kernel_decl(self, meta, ch):
        return ast.KernelBlocks(ch[1], self._s(meta))

    def start(self, meta, ch):
        return tuple(ch)


_OPERATORS = {"PLUS", "MINUS", "TIMES", "FLOORDIV", "SLASH", "PERCENT"}
_WORDS = {"NAME": "a name", "INT": "an integer", "STRING": "a quoted path", "$END": "end of file"}


def _expected_rank(term: str) -> tuple[int, str]:
    if term in _KEYWORDS or term == "PAGE_UNIT":
        return (0, term)
    if term in _WORDS:
        return (2, "" if term == "NAME" else term)
    return (1, term)  # punctuation


def _expected(exc: UnexpectedInput) -> str:
    """`; expected ...` from the terminals the parser accepts at the error (most useful first)."""
    terms = set(getattr(exc, "accepts", None) or getattr(exc, "expected", None) or ())
    operator = len(terms & (_OPERATORS - {"MINUS"})) >= 3
    if operator:  # after an expression: any binary operator continues it
        terms -= _OPERATORS
    names = [_TERMINAL_NAMES.get(t, t) for t in sorted(terms, key=_expected_rank)]
    if operator:
        names.append("an operator")
    if not names:
        return ""
    if len(names) > 6:
        names = names[:6] + ["..."]
    return "; expected " + ", ".join(names)


def _describe(tok: Token) -> str:
    """A token as the user wrote it: `name 'x'`, `integer 3`, `'='`, `'split'`."""
    if tok.type == "NAME":
        return f"name {str(tok)!r}"
    if tok.type == "INT":
        return f"integer {tok}"
    if tok.type == "STRING":
        return f"string {tok}"
    return repr(str(tok))


def _unclosed_brace(text: str) -> tuple[int, int] | None:
    """Line and column of the first `{` that is never closed (ignoring comments and strings)."""
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if c == '"':
            ends = [x for x in (text.find('"', i + 1), text.find("\n", i + 1)) if x >= 0]
            i = min(ends) if ends else n
        elif c == "{":
            stack.append(i)
        elif c == "}" and stack:
            stack.pop()
        i += 1
    if not stack:
        return None
    pos = stack[0]
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _end_position(text: str) -> tuple[int, int]:
    """Line and column just after the last non-blank character (where the file stops)."""
    body = text.rstrip()
    line = body.count("\n") + 1
    col = len(body) - (body.rfind("\n") + 1) + 1
    return line, col


def _syntax_error(path: str, text: str, exc: UnexpectedInput) -> LayoutSyntaxError:
    line, col = max(exc.line, 1), max(exc.column, 1)
    width = 1
    if isinstance(exc, UnexpectedToken):
        tok = exc.token
        if tok.type == "$END":
            msg = "unexpected end of file" + _expected(exc)
            line, col = _end_position(text)
        else:
            width = max(1, len(str(tok)))
            msg = f"unexpected {_describe(tok)}" + _expected(exc)
    elif isinstance(exc, UnexpectedCharacters):
        pos = exc.pos_in_stream or 0
        ch = text[pos] if pos < len(text) else ""
        msg = f"unexpected character {ch!r}"
        if ch == '"':
            msg = "unterminated string: a quoted path must end on the same line"
    elif isinstance(exc, UnexpectedEOF):
        msg = "unexpected end of file" + _expected(exc)
        line, col = _end_position(text)
    else:  # pragma: no cover - lark has no other kinds
        msg = str(exc).splitlines()[0]
    notes: tuple[str, ...] = ()
    brace = _unclosed_brace(text)
    if brace is not None and brace <= (line, col):
        notes = (f"the '{{' at {path}:{brace[0]}:{brace[1]} is never closed; a '}}' is missing",)
    span = ast.Span(path, line, col, line, col + width)
    return LayoutSyntaxError([Diagnostic(msg, span, "E001", notes=notes)])


def decode_source(path: str, data: bytes, sources=None) -> str:
    """Decode spec bytes as UTF-8, reporting the first bad byte with its line and column."""
    if sources is not None:
        sources.add(path, data.decode("utf-8", errors="replace").replace("\x00", "\ufffd"))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start].decode("utf-8", errors="replace")
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        span = ast.Span(path, line, col, line, col + 1)
        raise LayoutSyntaxError(
            [Diagnostic(f"spec is not UTF-8 text (byte 0x{data[e.start]:02x})", span, "E002")]
        ) from None
    bad = next((i for i, c in enumerate(text) if c == "\x00"), None)
    if bad is not None:
        before = text[:bad]
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        span = ast.Span(path, line, col, line, col + 1)
        raise LayoutSyntaxError(
            [Diagnostic("spec contains a NUL byte (binary file?)", span, "E002")]
        )
    return text


#: Rules of the grammar that build an expression (their nesting is what `max_expr_depth` bounds).
_EXPR_RULES = frozenset(
    {"add", "sub", "mul", "floordiv", "exactdiv", "mod", "neg", "call", "paren", "args"}
)


def _tree_span(path: str, node: Tree | Token) -> ast.Span:
    if isinstance(node, Token):
        return _tok_span(path, node)
    return _span(path, node.meta)


def _check_tree(path: str, tree: Tree, limits: Limits) -> None:
    """Expression depth and integer literals, before anything recursive walks the tree."""
    diags: list[Diagnostic] = []
    max_digits = len(str(1 << limits.max_int_bits))
    stack: list[tuple[Tree | Token, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Token):
            if node.type == "INT":
                digits = str(node).replace("_", "")
                if len(digits) > max_digits or not limits.int_ok(int(digits)):
                    shown = (
                        digits if len(digits) <= 24 else f"{digits[:12]}...({len(digits)} digits)"
                    )
                    diags.append(
                        Diagnostic(
                            f"integer {shown} does not fit in {limits.max_int_bits} bits "
                            f"({flag_of('max_int_bits')})",
                            _tok_span(path, node),
                            "E065",
                        )
                    )
            continue
        if node.data in _EXPR_RULES and node.data != "args":
            depth += 1
            if depth > limits.max_expr_depth:
                diags.append(
                    Diagnostic(
                        f"expression nested more than {limits.max_expr_depth} deep "
                        f"({flag_of('max_expr_depth')})",
                        _tree_span(path, node),
                        "E066",
                    )
                )
                continue
        stack.extend((c, depth) for c in node.children)
    if diags:
        raise LayoutSyntaxError(diags[:20])


def parse(path: str, text: str, limits: Limits = DEFAULT) -> ast.Module:
    """Parse one file; raise LayoutSyntaxError with a located diagnostic."""
    try:
        tree = parser().parse(text)
    except UnexpectedInput as exc:
        raise _syntax_error(path, text, exc) from None
    _check_tree(path, tree, limits)
    try:
        items = _Build(path).transform(tree)
    except VisitError as exc:  # pragma: no cover - the builder does not raise
        raise exc.orig_exc from None
    return ast.Module(path, items)
