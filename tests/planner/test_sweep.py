"""Tag simulation over every family spec x TP pairs in {1,2,3,4,6,8,16}^2 x parameter sets.

The compiler verifies every plan it emits; here each plan is verified again explicitly, and a
pair is refused exactly when some split dim cannot be divided (computed independently).
"""

from __future__ import annotations

import itertools

import pytest
from layoutc.compiler.diagnostics import LayoutError
from layoutc.compiler.verify import verify_plan
from planner_cases import compile_pair

TPS = (1, 2, 3, 4, 6, 8, 16)

HYBRID_BASE = dict(head_dim=64, mamba_head_dim=16, ssm_state_size=16, conv_kernel=4)
CASES = [
    # (spec, parameters, split sizes in units: each must divide or be divided by both TPs)
    ("vllm_flashinfer", dict(num_key_value_heads=8, head_dim=128), [8]),
    ("vllm_flashinfer", dict(num_key_value_heads=6, head_dim=64, kv_dtype="fp8"), [6]),
    ("vllm_flash_attn", dict(num_key_value_heads=4, head_dim=128, kv_dtype="fp32"), [4]),
    ("vllm_flash_attn", dict(num_key_value_heads=12, head_dim=64, block_size=32), [12]),
    ("vllm_mla", dict(kv_lora_rank=512, qk_rope_head_dim=64), []),
    ("vllm_mla", dict(kv_lora_rank=64, qk_rope_head_dim=16, kv_dtype="fp8"), []),
    (
        "vllm_hybrid_mamba2",
        dict(HYBRID_BASE, num_key_value_heads=2, mamba_num_heads=16, n_groups=8),
        [2, 16, 8],
    ),
    (
        "vllm_hybrid_mamba2",
        dict(
            HYBRID_BASE,
            num_key_value_heads=8,
            mamba_num_heads=48,
            n_groups=1,
            num_speculative_tokens=2,
            kv_dtype="fp8",
        ),
        [8, 48, 1],
    ),
    (
        "vllm_hybrid_mamba2",
        dict(
            HYBRID_BASE,
            num_key_value_heads=4,
            mamba_num_heads=24,
            n_groups=2,
            conv_dtype="fp32",
            ssm_dtype="bf16",
        ),
        [4, 24, 2],
    ),
    (
        "vllm_hybrid_mamba2",
        dict(
            HYBRID_BASE,
            num_key_value_heads=6,
            mamba_num_heads=12,
            n_groups=6,
            num_speculative_tokens=1,
        ),
        [6, 12, 6],
    ),
]


def allowed(units: list[int], tp: int) -> bool:
    return all(u % tp == 0 or tp % u == 0 for u in units)


@pytest.mark.parametrize(
    "spec,params,units", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_sweep(spec, params, units):
    planned = 0
    for p, d in itertools.product(TPS, TPS):
        ok = allowed(units, p) and allowed(units, d)
        try:
            plan = compile_pair(spec, p, d, params)
        except LayoutError as e:
            assert not ok, f"{p}->{d} refused: {e}"
            assert "cannot be split" in str(e)
            continue
        assert ok, f"{p}->{d} should have been refused"
        verify_plan(plan)
        assert plan.prefill_tp == p and plan.decode_tp == d
        # every prefill rank hears from someone; every decode rank reads something
        assert sorted({q for r in plan.ranks for q in r.notified}) == list(range(p))
        assert all(r.sources for r in plan.ranks)
        planned += 1
    assert planned >= 9


def test_realistic_nano_sweep():
    from planner_cases import NANO

    n = 0
    for p, d in itertools.product((1, 2, 4, 8, 16), repeat=2):
        try:
            plan = compile_pair("vllm_hybrid_mamba2", p, d, dict(NANO, num_speculative_tokens=1))
        except LayoutError:
            assert max(p, d) >= 8 and False, "Nemotron-3-Nano shapes allow every pair up to 16"
        verify_plan(plan)
        n += 1
    assert n == 25
