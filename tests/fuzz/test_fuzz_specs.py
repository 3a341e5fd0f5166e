"""Fuzzing the compiler with mutated specs: every input ends in exit 0 with a verified plan or
exit 1 with a located diagnostic — never a crash, a traceback, a hang or an unverified plan.

Mutations start from every shipped family spec with its parameters bound to realistic values
(so the unmutated spec compiles), then flip, insert and delete bytes or swap tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layoutc.compiler.cli import main
from layoutc.compiler.pipeline import Compiler, SideSets
from layoutc.compiler.verify import verify_plan

SPECS = Path(__file__).resolve().parents[2] / "specs"
VALUES = {
    "num_key_value_heads": 4,
    "head_dim": 32,
    "kv_lora_rank": 64,
    "qk_rope_head_dim": 16,
    "mamba_num_heads": 8,
    "mamba_head_dim": 8,
    "n_groups": 2,
    "ssm_state_size": 16,
    "linear_num_key_heads": 4,
    "linear_num_value_heads": 8,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "mamba_intermediate_size": 64,
}
LOCATED = re.compile(r"^\S+:\d+:\d+: error\[E\d+\]: ", re.M)


def bound_text(name: str) -> str:
    """The family spec with every parameter that lacks a default given one."""
    text = (SPECS / name).read_text()
    for k, v in VALUES.items():
        text = re.sub(rf"^(param {k}: int)(\s)", rf"\1 = {v}\2", text, flags=re.M)
    return text


FAMILIES = sorted(p.name for p in SPECS.glob("*.layout"))
BASES = {n: bound_text(n) for n in FAMILIES}
TOKENS = [
    "0",
    "-1",
    "3",
    "7",
    "1000000",
    "4096",
    "split",
    "tp",
    "by",
    "paged",
    "concat",
    "{",
    "}",
    "[",
    "]",
    "(",
    ")",
    "=",
    ":",
    ",",
    "*",
    "/",
    "//",
    "%",
    "state",
    "page",
    "param",
    "let",
    "stride",
    "layer",
    "kernel_blocks",
    "use",
    "per",
    "logical_block",
    "fp8",
    "bf17",
    "x",
    "head",
    "max",
    "min(",
    '"vllm_mla.layout"',
    "\n",
    "#",
    "\x00",
    "\xff",
]


def run_plan(tmp_path: Path, data: bytes, p: int, d: int, capsys) -> int:
    spec = tmp_path / "fuzz.layout"
    spec.write_bytes(data)
    rc = main(
        ["plan", str(spec), "--prefill-tp", str(p), "--decode-tp", str(d), "--format", "json"]
    )
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert rc in (0, 1), (rc, err)
    if rc == 0:
        doc = json.loads(out)
        assert doc["prefill_tp"] == p and doc["decode_tp"] == d
        # recompile and verify independently of the CLI path
        c = Compiler()
        unit = c.load(str(spec))
        pb, db = c.bind(unit, SideSets())
        verify_plan(c.plan(unit, pb, db, p, d))
    else:
        assert LOCATED.search(err), err
    return rc


@st.composite
def byte_mutation(draw):
    base = bytearray(BASES[draw(st.sampled_from(FAMILIES))].encode())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        i = draw(st.integers(0, len(base) - 1))
        if op == "flip":
            base[i] = draw(st.integers(0, 255))
        elif op == "insert":
            base[i:i] = draw(st.binary(min_size=1, max_size=4))
        else:
            del base[i : i + draw(st.integers(1, 8))]
    return bytes(base)


@st.composite
def token_mutation(draw):
    text = BASES[draw(st.sampled_from(FAMILIES))]
    parts = re.split(r"(\s+)", text)
    for _ in range(draw(st.integers(1, 3))):
        words = [i for i, w in enumerate(parts) if w.strip()]
        i = draw(st.sampled_from(words))
        op = draw(st.sampled_from(["replace", "delete", "duplicate"]))
        if op == "replace":
            parts[i] = draw(st.sampled_from(TOKENS))
        elif op == "delete":
            parts[i] = ""
        else:
            parts[i] = parts[i] + " " + parts[i]
    return "".join(parts).encode("utf-8", errors="surrogateescape")


SETTINGS = dict(
    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def test_unmutated_bases_compile(tmp_path, capsys):
    """The bases the mutations start from are valid specs: they compile (exit 0)."""
    for name in FAMILIES:
        assert run_plan(tmp_path, BASES[name].encode(), 2, 4, capsys) == 0, name


@pytest.mark.timeout(240)
@settings(max_examples=250, **SETTINGS)
@given(byte_mutation(), st.sampled_from([1, 2, 3, 4]), st.sampled_from([1, 2, 4, 8]))
def test_byte_mutations(tmp_path, capsys, data, p, d):
    run_plan(tmp_path, data, p, d, capsys)


@pytest.mark.timeout(240)
@settings(max_examples=250, **SETTINGS)
@given(token_mutation(), st.sampled_from([1, 2, 3, 4]), st.sampled_from([1, 2, 4, 8]))
def test_token_mutations(tmp_path, capsys, data, p, d):
    run_plan(tmp_path, data, p, d, capsys)


@pytest.mark.timeout(120)
@settings(max_examples=150, **SETTINGS)
@given(st.binary(max_size=300), st.sampled_from([1, 2]), st.sampled_from([1, 4]))
def test_random_bytes(tmp_path, capsys, data, p, d):
    run_plan(tmp_path, data, p, d, capsys)
