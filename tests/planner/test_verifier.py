"""The verifier must reject plans that move wrong bytes (it is the safety net of the compiler)."""

from __future__ import annotations

import dataclasses

import pytest
from layoutc.compiler.diagnostics import InternalError
from layoutc.compiler.verify import verify_plan
from planner_cases import NANO, compile_pair


def tamper(plan, rank, change, which="reads", state=None):
    r = plan.ranks[rank]
    groups = list(getattr(r, which))
    i = next(i for i, g in enumerate(groups) if state is None or g.state == state)
    groups[i] = change(groups[i])
    ranks = list(plan.ranks)
    ranks[rank] = dataclasses.replace(r, **{which: tuple(groups)})
    return dataclasses.replace(plan, ranks=tuple(ranks))


@pytest.mark.parametrize(
    "state,change,message",
    [
        (
            "ssm",
            lambda g: dataclasses.replace(g, prefill_offset=g.prefill_offset + 4),
            "wrong data",
        ),
        (
            "conv",
            lambda g: dataclasses.replace(g, decode_offset=g.decode_offset + 2),
            "exactly once",
        ),
        ("ssm", lambda g: dataclasses.replace(g, nbytes=g.nbytes - 4), "exactly once"),
        ("conv", lambda g: dataclasses.replace(g, nbytes=g.nbytes - 1), "aligned"),
        ("kv", lambda g: dataclasses.replace(g, prefill_rank=1), "sources"),
        ("kv", lambda g: dataclasses.replace(g, prefill_offset=10**9), "leaves"),
    ],
)
def test_verifier_catches_tampered_reads(state, change, message):
    plan = compile_pair("vllm_hybrid_mamba2", 1, 2, NANO)
    verify_plan(plan)
    with pytest.raises(InternalError, match=message):
        verify_plan(tamper(plan, 0, change, state=state))


def test_verifier_catches_posts_that_differ_from_reads():
    plan = compile_pair("vllm_hybrid_mamba2", 4, 2, NANO)
    bad = tamper(
        plan, 0, lambda g: dataclasses.replace(g, prefill_offset=g.prefill_offset + 8), "posts"
    )
    with pytest.raises(InternalError, match="posted runs"):
        verify_plan(bad)


def test_verifier_catches_a_swapped_replica_head():
    # D_TP 4 > K 2: ranks 2, 3 must read head 1; pointing rank 3 at P0 (head 0) is wrong data
    plan = compile_pair("vllm_flashinfer", 2, 4, dict(num_key_value_heads=2, head_dim=64))
    with pytest.raises(InternalError):
        verify_plan(tamper(plan, 3, lambda g: dataclasses.replace(g, prefill_rank=0)))


def test_verifier_catches_unnotified_prefill_rank():
    plan = compile_pair("vllm_mla", 4, 2, dict(kv_lora_rank=64, qk_rope_head_dim=16))
    ranks = [dataclasses.replace(r, notify_only=()) for r in plan.ranks]
    with pytest.raises(InternalError, match="never notified"):
        verify_plan(dataclasses.replace(plan, ranks=tuple(ranks)))
