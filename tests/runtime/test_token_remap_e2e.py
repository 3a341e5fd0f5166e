"""Engines holding different tokens per logical block, end to end.

Real NIXL agents over UCX in separate processes, host memory.  Requests of prompt lengths at,
just below and just above the block boundaries of both sides are all in flight at once; every
byte of every decode buffer is checked: the tags of the request's tokens (whole windows) and
of its per-request Mamba state in its blocks, the sentinel everywhere else.
"""

from __future__ import annotations

import pytest
from layoutc.runtime.errors import BlockIdError, UsageError
from rt_plans import GQA4, HYBRID, PeerValuePlans, compiled
from rt_workers import connect_all, ranks_fixture, run_token_requests  # noqa: F401 (`ranks`)

pytestmark = pytest.mark.timeout(600)

NB = 64


def test_hybrid_pull_16_token_prefill_blocks_into_48_token_decode_blocks(ranks):
    """Prefill TP 1 with 16-token blocks, decode TP 2 with 48: attention by token windows, the
    Mamba state block to block."""
    plan = compiled(
        "vllm_hybrid_mamba2",
        1,
        2,
        {**HYBRID, "prefill.block_size": 16, "decode.block_size": 48},
    )
    lengths = [1, 15, 16, 17, 47, 48, 49, 95, 96, 97, 150]
    run_token_requests(ranks, plan, "pull", lengths, ["attention", "mamba"], seed=1)


def test_push_64_token_blocks_of_vllm_cpu_page_into_16_token_blocks(ranks):
    """vLLM's CPU page (K transposed inside a head): prefill TP 2 with 64-token blocks pushes
    into decode TP 1 with 16-token blocks."""
    plan = compiled(
        "vllm_cpu_attn",
        2,
        1,
        {**GQA4, "prefill.block_size": 64, "decode.block_size": 16},
    )
    lengths = [1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 200]
    run_token_requests(ranks, plan, "push", lengths, ["attention"], seed=2)


def test_token_mapping_needs_num_tokens_and_enough_blocks(ranks):
    plan = compiled("vllm_flashinfer", 1, 1, {**GQA4, "decode.block_size": 32})
    pre = ranks.rank(plan, "prefill", 0, num_blocks=NB, layers=2)
    dec = ranks.rank(plan, "decode", 0, num_blocks=NB, layers=2)
    connect_all([pre], [dec])
    with pytest.raises(UsageError, match="pass num_tokens="):
        dec.call("pull", "a", [1, 2], [3, 4, 5])
    with pytest.raises(BlockIdError, match="70 tokens need 3 decode block ids"):
        dec.call("pull", "b", [1, 2], [3, 4, 5, 6, 7], num_tokens=70)
    with pytest.raises(BlockIdError, match="70 tokens need 5 prefill block ids"):
        dec.call("pull", "c", [1, 2, 9], [3, 4], num_tokens=70)
    with pytest.raises(UsageError, match="strategy 'staged' cannot move"):
        dec.call("pull", "d", [1], [3], num_tokens=16, strategy="staged")
    with pytest.raises(UsageError, match="num_tokens must be an int"):
        dec.call("pull", "e", [1], [3], num_tokens=1.5)
    # more ids than the tokens need: the rest is untouched
    pre.call("tag_tokens", 0, [3, 4, 5, 6], 16)
    pre.call("expect", "f", num_tokens=33)
    dec.call("pull", "f", [7, 8, 9], [3, 4, 5, 6], num_tokens=33)
    assert dec.call("wait", "f").ok and pre.call("wait", "f").ok
    assert dec.call("verify_tokens", [(0, [7, 8], 33)], 16) > 0


def test_block_size_learned_from_the_peers_handshake(ranks):
    """Each engine knows only its own block size; the plan for the pair is made when the
    peer's handshake announces its own (``plan_for_peer``)."""
    sets = dict(HYBRID)
    plan = compiled(
        "vllm_hybrid_mamba2", 1, 2, {**sets, "prefill.block_size": 16, "decode.block_size": 48}
    )
    take = ("block_size",)
    sources = (
        PeerValuePlans("vllm_hybrid_mamba2", "prefill", sets, {"block_size": 16}, take),
        PeerValuePlans("vllm_hybrid_mamba2", "decode", sets, {"block_size": 48}, take),
    )
    lengths = [1, 47, 48, 49, 100]
    pre, dec = run_token_requests(
        ranks, plan, "pull", lengths, ["attention", "mamba"], seed=4, sources=sources
    )
    for r in pre + dec:
        assert r.call("stats")["peers"] == len(dec if r in pre else pre)
