"""Hypothesis-generated layouts (random dims, splits, concats, pages) and TP pairs.

Every outcome must be a verified plan or a located spec error; never an internal error.
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layoutc.compiler.diagnostics import InternalError, LayoutError
from layoutc.compiler.pipeline import Compiler, SideSets
from layoutc.compiler.verify import verify_plan

DTYPES = ("fp8", "bf16", "fp16", "fp32")


@st.composite
def segment(draw, name, may_split=True):
    unit = draw(st.integers(1, 4))
    units = draw(st.integers(1, 8))
    size = unit * units
    kind = draw(st.sampled_from(["plain", "split", "split_by"] if may_split else ["plain"]))
    if kind == "plain":
        return f"{name} {size}"
    if kind == "split":
        return f"{name} {size} split tp"
    return f"{name} {size} split tp by {unit}"


@st.composite
def state(draw, name):
    dims = []
    n = draw(st.integers(1, 3))
    paged = draw(st.booleans())
    split_dim = draw(st.integers(0, n))  # at most one dim of a state is split (n: none)
    for i in range(n):
        split = i == split_dim
        if draw(st.integers(0, 3)) == 0:
            segs = [draw(segment(f"s{j}", split)) for j in range(draw(st.integers(1, 3)))]
            dims.append(f"d{i} concat {{ " + "  ".join(segs) + " }")
        else:
            dims.append(draw(segment(f"d{i}", split)))
    if paged:
        dims.insert(draw(st.integers(0, len(dims))), f"tok {draw(st.integers(1, 4))} paged")
    dtype = draw(st.sampled_from(DTYPES))
    return f"state {name} : {dtype} {{\n  " + "\n  ".join(dims) + "\n}\n"


@st.composite
def spec(draw):
    names = [f"st{i}" for i in range(draw(st.integers(1, 3)))]
    text = "".join(draw(state(n)) for n in names)
    split_at = draw(st.integers(1, len(names)))
    pages = [names[:split_at], names[split_at:]]
    pages = [p for p in pages if p]
    per = [draw(st.sampled_from(["", " per logical_block"])) for _ in pages]
    for i, (p, pr) in enumerate(zip(pages, per)):
        text += f"page pg{i} = [{', '.join(p)}]{pr}\n"
    if len(pages) == 2 and draw(st.booleans()):
        text += "stride max(pg0, pg1)\n"
    kb = draw(st.integers(1, 3))
    text += f"kernel_blocks {kb}\n"
    return text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec(), st.integers(1, 6), st.integers(1, 6))
def test_random_layouts_plan_or_located_error(text, p, d):
    c = Compiler()
    unit = c.load("random.layout", text.encode())
    pb, db = c.bind(unit, SideSets())
    try:
        plan = c.plan(unit, pb, db, p, d)
    except InternalError:  # pragma: no cover - the failure this test exists to find
        raise AssertionError(f"internal error for {p}->{d}:\n{text}") from None
    except LayoutError as e:
        assert all(diag.span is not None for diag in e.diagnostics), text
        assert "cannot be split" in str(e), str(e)
        return
    verify_plan(plan)


PAGED = """
param block_size: int = 16
param kernel_blocks: int = 1
param heads: int = 4
kernel_blocks kernel_blocks
state kv : bf16 {
  half 2
  head heads split tp
  token block_size paged
  dim 8
}
state meta : fp32 {
  head heads split tp
  n 3
}
page attention = [kv]
page extra = [meta] per logical_block
stride max(attention, extra)
layer attn = [attention]
layer meta = [extra]
"""


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from([1, 2, 4, 8, 16, 32]),
    st.sampled_from([1, 2, 4, 8]),
    st.sampled_from([1, 2, 4, 8, 16, 32]),
    st.sampled_from([1, 2, 4, 8]),
    st.sampled_from([(1, 2), (2, 1), (4, 4), (2, 8), (1, 1)]),
)
def test_different_block_sizes_are_planned_and_verified(pbs, pkb, dbs, dkb, tps):
    """Any two block sizes plan: the same tokens per logical block block to block, different
    ones with a token remap (windows of gcd tokens), verified either way."""
    c = Compiler()
    unit = c.load("paged.layout", PAGED.encode())
    sets = SideSets.parse(
        [
            f"prefill.block_size={pbs}",
            f"prefill.kernel_blocks={pkb}",
            f"decode.block_size={dbs}",
            f"decode.kernel_blocks={dkb}",
        ]
    )
    pb, db = c.bind(unit, sets)
    plan = c.plan(unit, pb, db, *tps)
    verify_plan(plan)
    assert plan.prefill.kernel_blocks == pkb and plan.decode.kernel_blocks == dkb
    if pbs * pkb == dbs * dkb:
        assert plan.remap is None
    else:
        assert plan.remap is not None and plan.remap.chunk_tokens == math.gcd(pbs, dbs)
