"""Compiler limits: what a spec may ask of the compiler before it is refused.

Each limit is reported as a located spec error (exit 1) naming the limit and the flag that
raises it, so a hostile or mistaken spec costs neither a traceback nor the machine's memory.
The defaults admit every shipped spec with room to spare.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Limits:
    #: Bytes one logical block of one layer describes on one rank: every page's kernel stride
    #: times kernel_blocks, summed over pages (padding and kernel blocks included).
    max_bytes: int = 1 << 30
    #: Nesting depth of one expression (operators, calls and parentheses).
    max_expr_depth: int = 64
    #: Length of a chain of `use`d specs (a model spec using a family is depth 1).
    max_use_depth: int = 8
    #: Bits of any integer a spec computes or writes (literals, parameters, lets, sizes).
    max_int_bits: int = 48
    #: Bytes of one page stride (per kernel block).
    max_page_stride: int = 1 << 30
    #: Byte runs one decode rank reads per logical block (kernel blocks included).
    max_runs: int = 1 << 20

    def int_ok(self, value: int) -> bool:
        return abs(value) < (1 << self.max_int_bits)


#: flag name, attribute, upper bound of the flag (so that a raised limit still keeps the
#: compiler's arithmetic inside 64-bit integers where numpy uses them), help text.
FLAGS: tuple[tuple[str, str, int, str], ...] = (
    (
        "--max-bytes",
        "max_bytes",
        1 << 50,
        "bytes one logical block of one layer may describe on a rank, padding and kernel "
        "blocks included (default 1 GiB)",
    ),
    ("--max-expr-depth", "max_expr_depth", 10_000, "nesting depth of an expression (default 64)"),
    ("--max-use-depth", "max_use_depth", 256, "length of a `use` chain (default 8)"),
    ("--max-int-bits", "max_int_bits", 62, "bits of any integer a spec computes (default 48)"),
    (
        "--max-page-stride",
        "max_page_stride",
        1 << 50,
        "bytes of a page stride per kernel block (default 1 GiB)",
    ),
    (
        "--max-runs",
        "max_runs",
        1 << 30,
        "byte runs one decode rank may read per logical block (default 1048576)",
    ),
)

DEFAULT = Limits()

assert {f.name for f in fields(Limits)} == {attr for _, attr, _, _ in FLAGS}


def flag_of(attr: str) -> str:
    return next(flag for flag, a, _, _ in FLAGS if a == attr)
