"""The example specs (GDN conv, Mamba2 SD conv, NHD KV, Mamba1) plan and verify for every pair
their shapes allow: the layouts of docs/design.md §3 need no special case in the compiler."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from layoutc.compiler.diagnostics import LayoutError
from layoutc.compiler.pipeline import Compiler, SideSets
from layoutc.compiler.verify import verify_plan

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.layout"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_plans(path):
    c = Compiler()
    unit = c.load(str(path))
    pb, db = c.bind(unit, SideSets())
    planned = 0
    for p, d in itertools.product((1, 2, 3, 4, 8), repeat=2):
        try:
            plan = c.plan(unit, pb, db, p, d)
        except LayoutError as e:
            assert "cannot be split" in str(e)
            continue
        verify_plan(plan)
        planned += 1
    assert planned >= 16


def test_nhd_head_slices_are_one_strided_family():
    c = Compiler()
    unit = c.load(str(next(p for p in EXAMPLES if p.stem == "nhd_kv")))
    pb, db = c.bind(unit, SideSets())
    plan = c.plan(unit, pb, db, 2, 4)
    reads = plan.rank(1).reads
    # one strided run family per source: K and V x 16 tokens, each two heads wide
    assert len(reads) == 1 and reads[0].count == 2 * 16
    assert reads[0].nbytes == 2 * 128 * 2  # two heads of 128 bf16 per token
