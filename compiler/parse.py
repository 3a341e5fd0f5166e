"""Text -> AST.  The grammar ships in the package (`layoutc/grammar/layout.lark`)."""

from __future__ import annotations

import functools
from importlib import resources

from lark import Lark, Token, Transformer, UnexpectedInput, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken, VisitError

from . import ast
from .diagnostics import Diagnostic, LayoutSyntaxError

# Friendly names for terminals in "expected ..." messages.
_TERMINAL_NAMES = {
    "LBRACE": "'{'", "RBRACE": "'}'", "LBRACKET": "'['", "RBRACKET": "']'", "LPAR": "'('",
    "RPAR": "')'", "COLON": "':'", "COMMA": "','", "EQUAL": "'='", "PLUS": "'+'", "MINUS": "'-'",
    "TIMES": "'*'", "FLOORDIV": "'//'", "SLASH": "'/'", "PERCENT": "'%'", "NAME": "a name",
    "INT": "an integer", "STRING": "a quoted path", "PAGE_UNIT": "kernel_block or logical_block",
    "$END": "end of file",
}
_KEYWORDS = ("USE", "PARAM", "LET", "STATE", "PAGE", "STRIDE", "LAYER", "KERNEL_BLOCKS",
             "CONCAT", "SPLIT", "TP", "BY", "PAGED", "PER")
for _k in _KEYWORDS:
    _TERMINAL_NAMES[_k] = f"'{_k.lower()}'"


@functools.lru_cache(maxsize=1)
def parser() -> Lark:
    text = resources.files("layoutc").joinpath("grammar/layout.lark").read_text("utf-8")
    return Lark(text, parser="lalr", propagate_positions=True, maybe_placeholders=False)


def _span(path: str, meta) -> ast.Span:
    return ast.Span(path, meta.line, meta.column, meta.end_line, meta.end_column)


def _tok_span(path: str, tok: Token) -> ast.Span:
    return ast.Span(path, tok.line, tok.column, tok.end_line, tok.end_column)


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
        return ast.Param(str(ch[1]), str(ch[3]), default, self._s(meta), _tok_span(self.path, ch[3]))

    def let_decl(self, meta, ch):
        return ast.Let(str(ch[1]), ch[3], self._s(meta))

    def dist(self, meta, ch):
        return ast.Split(ch[3] if len(ch) > 3 else None, self._s(meta))

    def paged(self, meta, ch):
        return True

    def segment(self, meta, ch):
        split = ch[2] if len(ch) > 2 else None
        return ast.Segment(str(ch[0]), ch[1], split, self._s(meta))

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


def _expected(exc: UnexpectedInput) -> str:
    names = sorted({_TERMINAL_NAMES.get(t, t) for t in getattr(exc, "expected", ()) or ()})
    if not names:
        return ""
    if len(names) > 6:
        names = names[:6] + ["..."]
    return "; expected " + ", ".join(names)


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
            msg = f"unexpected {_TERMINAL_NAMES.get(tok.type, tok.type)} {str(tok)!r}"
            msg += _expected(exc)
    elif isinstance(exc, UnexpectedCharacters):
        ch = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else ""
        msg = f"unexpected character {ch!r}"
    elif isinstance(exc, UnexpectedEOF):
        msg = "unexpected end of file" + _expected(exc)
        line, col = _end_position(text)
    else:  # pragma: no cover - lark has no other kinds
        msg = str(exc).splitlines()[0]
    span = ast.Span(path, line, col, line, col + width)
    return LayoutSyntaxError([Diagnostic(msg, span, "E001")])


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
        raise LayoutSyntaxError([Diagnostic("spec contains a NUL byte (binary file?)", span, "E002")])
    return text


def parse(path: str, text: str) -> ast.Module:
    """Parse one file; raise LayoutSyntaxError with a located diagnostic."""
    try:
        tree = parser().parse(text)
    except UnexpectedInput as exc:
        raise _syntax_error(path, text, exc) from None
    try:
        items = _Build(path).transform(tree)
    except VisitError as exc:  # pragma: no cover - the builder does not raise
        raise exc.orig_exc from None
    return ast.Module(path, items)
