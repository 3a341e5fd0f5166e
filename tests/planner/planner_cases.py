"""Specs and model parameters shared by the planner tests (a module of its own, so that
``from planner_cases import ...`` cannot pick up another folder's ``conftest``)."""

from __future__ import annotations

from pathlib import Path

from layoutc.compiler.pipeline import Compiler, SideSets

SPECS = Path(__file__).resolve().parents[2] / "specs"

NANO = dict(  # Nemotron-3-Nano-30B-A3B (docs/vllm-reference.md §6)
    num_key_value_heads=2,
    head_dim=128,
    mamba_num_heads=64,
    mamba_head_dim=64,
    n_groups=8,
    ssm_state_size=128,
    conv_kernel=4,
)
NEMOTRON_H_8B = dict(
    num_key_value_heads=8,
    head_dim=128,
    mamba_num_heads=128,
    mamba_head_dim=64,
    n_groups=8,
    ssm_state_size=128,
    conv_kernel=4,
)


def compile_pair(spec: str, p: int, d: int, sets: dict | None = None):
    """Compile (and, inside the compiler, verify) one pair of a spec in specs/."""
    c = Compiler()
    path = spec if spec.endswith(".layout") and "/" in spec else str(SPECS / f"{spec}.layout")
    unit = c.load(path)
    pb, db = c.bind(unit, SideSets.parse({k: str(v) for k, v in (sets or {}).items()}))
    return c.plan(unit, pb, db, p, d)
