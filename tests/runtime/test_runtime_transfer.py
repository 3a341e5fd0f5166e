"""End-to-end transfers between real NIXL agents in separate processes, every byte verified.

Plans are compiled from the family specs; prefill pages hold tagged bytes and each decode
rank checks every byte of its buffers against its *own* logical identity (so a wrong run,
rank or block cannot pass), and that nothing outside the requests' blocks was touched.
"""

from __future__ import annotations

import numpy as np
import pytest
from rt_plans import GQA4, GQA6, HYBRID, MLA, compiled
from rt_workers import connect_all, ranks_fixture, run_requests  # noqa: F401 (`ranks`)

pytestmark = pytest.mark.timeout(120)

CASES = {
    "flashinfer P4>D2": ("vllm_flashinfer", 4, 2, GQA4),
    "flashinfer P2<D4": ("vllm_flashinfer", 2, 4, GQA4),
    "flashinfer 2->3 (6 heads)": ("vllm_flashinfer", 2, 3, GQA6),
    "flash_attn k|v 1->4 (2 heads, replicated)": (
        "vllm_flash_attn",
        1,
        4,
        dict(GQA4, num_key_value_heads=2),
    ),
    "mla 4->2 (notify-only ranks)": ("vllm_mla", 4, 2, MLA),
    "hybrid 2->4 (replicated heads and B/C groups)": ("vllm_hybrid_mamba2", 2, 4, HYBRID),
    "hybrid 4->1": ("vllm_hybrid_mamba2", 4, 1, dict(HYBRID, n_groups=4)),
}
NB_PREFILL, NB_DECODE = 40, 36  # logical blocks per buffer (different on each side)
REQUESTS, BLOCKS = 3, 6


def _block_ids(seed: int):
    rng = np.random.default_rng(seed)
    p = rng.permutation(NB_PREFILL)[: REQUESTS * BLOCKS].reshape(REQUESTS, BLOCKS)
    d = rng.permutation(NB_DECODE)[: REQUESTS * BLOCKS].reshape(REQUESTS, BLOCKS)
    return p, d


def _setup(ranks, plan, layers=2):
    pre = ranks.ranks(
        [(plan, "prefill", r) for r in range(plan.prefill_tp)], num_blocks=NB_PREFILL, layers=layers
    )
    dec = ranks.ranks(
        [(plan, "decode", r) for r in range(plan.decode_tp)], num_blocks=NB_DECODE, layers=layers
    )
    connect_all(pre, dec)
    return pre, dec


@pytest.mark.parametrize("mode", ["pull", "push"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_byte_arrives(ranks, case, mode):
    spec, p_tp, d_tp, sets = CASES[case]
    plan = compiled(spec, p_tp, d_tp, sets)
    pre, dec = _setup(ranks, plan, layers=3)
    pb, db = _block_ids(hash(case) % 1000)
    infos, verified = run_requests(pre, dec, mode, pb, db)
    initiators = dec if mode == "pull" else pre
    for r in pre + dec:
        for info in infos[r.label]:
            assert info["ok"]
            if r.role == "prefill" and mode == "pull":
                # completion accounting: exactly the plan's readers notified this rank
                assert info["peers"] == [f"decode rank {d}" for d in plan.readers(r.rank)]
            if r.role == "decode" and mode == "push":
                srcs = plan.rank(r.rank).sources
                assert info["peers"] == [f"prefill rank {p}" for p in srcs]
            if r in initiators:
                assert info["bytes"] > 0 or r.role == "prefill"
    assert sum(verified.values()) > 0
    posted = sum(r.call("stats")["descriptors_posted"] for r in initiators)
    assert posted > 0


def test_layer_subset_moves_only_those_layers(ranks):
    plan = compiled("vllm_hybrid_mamba2", 2, 4, HYBRID)
    pre, dec = _setup(ranks, plan, layers=4)
    pb, db = _block_ids(3)
    for r in pre:
        r.call("tag", 0, pb[0])
        r.call("expect", "r0")
    for r in dec:
        r.call("pull", "r0", db[0], pb[0], layers=[1, 2])
    for r in dec + pre:
        r.call("wait", "r0")
    for r in dec:
        r.call("verify", [(0, db[0])], layers=[1, 2])  # layers 0 and 3 untouched


def test_prefill_completes_only_after_every_reader_notified(ranks):
    plan = compiled("vllm_flashinfer", 2, 4, GQA4)
    assert plan.readers(0) == (0, 1)
    pre, dec = _setup(ranks, plan)
    pb, db = _block_ids(5)
    p0 = pre[0]
    p0.call("tag", 0, pb[0])
    p0.call("expect", "r0")
    dec[0].call("pull", "r0", db[0], pb[0])
    dec[0].call("wait", "r0")
    with pytest.raises(TimeoutError):
        p0.call("wait", "r0", within=1.0)  # one of two readers: not complete
    dec[1].call("pull", "r0", db[0], pb[0])
    dec[1].call("wait", "r0")
    info = p0.call("wait", "r0")
    assert info["peers"] == ["decode rank 0", "decode rank 1"]


def test_zero_block_request_completes_with_notifications(ranks):
    plan = compiled("vllm_flashinfer", 1, 2, GQA4)
    pre, dec = _setup(ranks, plan)
    pre[0].call("expect", "empty")
    for r in dec:
        r.call("pull", "empty", [], [])
    for r in dec + pre:
        assert r.call("wait", "empty")["ok"]
    for r in dec:
        r.call("verify", [])  # nothing written anywhere
