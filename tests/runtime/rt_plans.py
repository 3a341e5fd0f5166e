"""Compiled plans for the runtime tests (small models: a few KiB per page)."""

from __future__ import annotations

import functools
from pathlib import Path

from layoutc.compiler.api import compile_plan

SPECS = Path(__file__).resolve().parents[2] / "specs"

#: Small models (a few KiB per page) for every family spec.
GQA4 = dict(num_key_value_heads=4, head_dim=32, block_size=16)
GQA6 = dict(num_key_value_heads=6, head_dim=32, block_size=16)
MLA = dict(kv_lora_rank=64, qk_rope_head_dim=16, block_size=16)
HYBRID = dict(
    num_key_value_heads=2,
    head_dim=32,
    block_size=16,
    mamba_num_heads=8,
    mamba_head_dim=16,
    n_groups=2,
    ssm_state_size=16,
)


@functools.cache
def _compiled(spec: str, p: int, d: int, sets: tuple) -> object:
    return compile_plan(str(SPECS / f"{spec}.layout"), p, d, dict(sets))


def compiled(spec: str, p: int, d: int, sets: dict | None = None):
    """A real compiled Plan of ``specs/<spec>.layout`` (cached)."""
    return _compiled(spec, p, d, tuple(sorted((sets or {}).items())))
