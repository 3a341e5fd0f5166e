"""Engines holding different tokens per logical block: plans with a token remap.

Each case compiles a plan (verified inside the compiler), then moves one request through
simulated memory with the runtime's own descriptor code (``build_pair_table`` and
``window_descriptors``, the rows an endpoint posts) -- pull, from every decode rank's side,
and push, from every prefill rank's side -- and checks every byte against its logical
identity: the request's tokens below ``num_tokens`` arrive on decode in the decode engine's
blocks, per-request (Mamba) state arrives block to block, blocks outside the request and rows
past the request's last window are untouched.  The real multi-process transfer is in
``tests/runtime/test_engine_api.py``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from layoutc.compiler.api import compile_plan
from layoutc.compiler.diagnostics import InternalError
from layoutc.compiler.verify import verify_plan
from layoutc.runtime.descriptors import Segment, build_pair_table, window_descriptors
from layoutc.runtime.plan import Plan, RankPlan
from layoutc.runtime.tags import PageTagger, TokenPageTagger, block_keys

POOL = 7  # logical blocks in every pool
REQUEST = 3


class Memory:
    """One rank's registered buffers: one page per (layer, page) in one flat array."""

    def __init__(self, plan: Plan, role: str, rank: int, layer_pages: list[tuple[str, ...]]):
        side = plan.decode if role == "decode" else plan.prefill
        self.segments: dict[tuple[int, str], Segment] = {}
        addr = 0
        for layer, pages in enumerate(layer_pages):
            for page in pages:
                pl = side.page(page)
                n = pl.buffer_bytes(POOL)
                self.segments[(layer, page)] = Segment(
                    layer, page, addr, n, 0, pl.logical_stride, POOL
                )
                addr += n
        rng = np.random.default_rng(rank + (100 if role == "decode" else 0))
        self.mem = rng.integers(0, 256, addr, dtype=np.uint8)

    def page(self, layer: int, page: str) -> np.ndarray:
        s = self.segments[(layer, page)]
        return self.mem[s.addr : s.addr + s.nbytes].reshape(POOL, s.logical_stride)


def _blocks(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.permutation(POOL)[:n].astype(np.int64)


def _layer_pages(plan: Plan) -> tuple[list[str], list[tuple[str, ...]]]:
    kinds = [k for k, _ in plan.layer_kinds] or ["default"]
    pages = dict(plan.layer_kinds) or {"default": plan.decode.page_names}
    return kinds, [tuple(pages[k]) for k in kinds]


def simulate(plan: Plan, num_tokens: int, direction: str, seed: int = 0) -> None:
    """Move one request of ``num_tokens`` tokens and check every decode byte."""
    rm = plan.remap
    assert rm is not None
    rng = np.random.default_rng(seed)
    kinds, layer_pages = _layer_pages(plan)
    per_kernel = {
        k: plan.decode.page(pages[0]).per == "kernel" for k, pages in zip(kinds, layer_pages)
    }
    # the request's block ids per kind on each side
    ids = {}
    for k in kinds:
        if per_kernel[k]:
            np_, nd = rm.blocks_for("prefill", num_tokens), rm.blocks_for("decode", num_tokens)
        else:
            np_ = nd = 1  # a request's Mamba state: one block
        assert max(np_, nd) <= POOL, "raise POOL for this case"
        ids[k] = (_blocks(rng, np_), _blocks(rng, nd))
    pre = [Memory(plan, "prefill", p, layer_pages) for p in range(plan.prefill_tp)]
    dec = [Memory(plan, "decode", d, layer_pages) for d in range(plan.decode_tp)]
    # prefill pages hold the request's tags
    for p, m in enumerate(pre):
        for layer, (k, pages) in enumerate(zip(kinds, layer_pages)):
            for page in pages:
                if per_kernel[k]:
                    TokenPageTagger(plan.prefill, p, page, rm.chunk_tokens).fill(
                        m.page(layer, page), ids[k][0], layer, REQUEST
                    )
                else:
                    keys = block_keys(layer, REQUEST, np.arange(ids[k][0].shape[0]))
                    PageTagger(plan.prefill, p, page).fill(m.page(layer, page), ids[k][0], keys)
    before = [m.mem.copy() for m in dec]
    for d in range(plan.decode_tp):
        for p in plan.rank(d).sources:
            local_is_decode = direction == "pull"
            a, b = (dec[d], pre[p]) if local_is_decode else (pre[p], dec[d])
            table = build_pair_table(
                plan,
                decode_rank=d,
                prefill_rank=p,
                local_is_decode=local_is_decode,
                layer_pages=layer_pages,
                local_segments=a.segments,
                remote_segments=b.segments,
            )
            assert table is not None
            lrole, rrole = ("decode", "prefill") if local_is_decode else ("prefill", "decode")
            for layer, k in enumerate(kinds):
                pid, did = ids[k]
                lids, rids = (did, pid) if local_is_decode else (pid, did)
                loc, rem, nbytes = window_descriptors(
                    table,
                    table.rows_for_layers(np.array([layer])),
                    lids,
                    rids,
                    rm.windows(lrole, num_tokens),
                    rm.windows(rrole, num_tokens),
                )
                assert int(loc[:, 1].sum()) == int(rem[:, 1].sum()) == nbytes
                src, dst = (b, a) if local_is_decode else (a, b)
                s_rows, d_rows = (rem, loc) if local_is_decode else (loc, rem)
                for (sa, n, _), (da, _, _) in zip(s_rows.tolist(), d_rows.tolist()):
                    dst.mem[da : da + n] = src.mem[sa : sa + n]
    # every decode byte: the request's tokens (and state) tagged right, the rest unchanged
    last = -(-num_tokens // rm.chunk_tokens) * rm.chunk_tokens  # past the last window
    for d, m in enumerate(dec):
        touched = np.zeros(m.mem.shape[0], dtype=bool)
        for layer, (k, pages) in enumerate(zip(kinds, layer_pages)):
            did = ids[k][1]
            for page in pages:
                buf = m.page(layer, page)
                seg = m.segments[(layer, page)]
                if per_kernel[k]:
                    tg = TokenPageTagger(plan.decode, d, page, rm.chunk_tokens)
                    assert tg.mismatches(buf, did, layer, REQUEST, num_tokens) == 0, (layer, d)
                    for off, t, token in tg.tags(layer, REQUEST, np.arange(did.shape[0])):
                        isz = t.shape[1] // token.shape[1]
                        moved = np.repeat(token < last, isz, axis=1)
                        for i, blk in enumerate(did.tolist()):
                            start = seg.addr + blk * seg.logical_stride + off
                            touched[start : start + t.shape[1]] |= moved[i]
                else:
                    keys = block_keys(layer, REQUEST, np.arange(did.shape[0]))
                    for off, t in PageTagger(plan.decode, d, page).tags(keys):
                        assert np.array_equal(buf[did, off : off + t.shape[1]], t), (layer, d)
                        for blk in did.tolist():
                            start = seg.addr + blk * seg.logical_stride + off
                            touched[start : start + t.shape[1]] = True
        assert np.array_equal(m.mem[~touched], before[d][~touched]), f"decode rank {d}"


def _boundary_tokens(rm) -> list[int]:
    """Token counts at, just below and just above the block boundaries of both sides."""
    pb = rm.prefill_kernel_tokens * rm.prefill_kernel_blocks
    db = rm.decode_kernel_tokens * rm.decode_kernel_blocks
    both = math.lcm(pb, db)
    out = {1, rm.chunk_tokens - 1, rm.chunk_tokens, rm.chunk_tokens + 1}
    for b in (pb, db, both):
        out |= {b - 1, b, b + 1}
    top = min(pb, db) * (POOL - 1)
    return sorted(t for t in out if 0 < t <= top and t <= max(pb, db) * 2 + 1)


LLAMA = {"num_key_value_heads": 8, "head_dim": 16, "kv_dtype": "fp16"}
SIX = {"num_key_value_heads": 6, "head_dim": 8, "kv_dtype": "fp32"}
MLA = {"kv_lora_rank": 32, "qk_rope_head_dim": 8}

# (spec, sets, (prefill tp, decode tp))
CASES = [
    ("vllm_flashinfer", {**LLAMA, "prefill.block_size": 16, "decode.block_size": 32}, (2, 4)),
    ("vllm_flashinfer", {**LLAMA, "prefill.block_size": 32, "decode.block_size": 16}, (4, 1)),
    ("vllm_flashinfer", {**LLAMA, "prefill.block_size": 16, "decode.block_size": 48}, (1, 2)),
    (
        "vllm_flashinfer",
        {**LLAMA, "prefill.block_size": 16, "prefill.kernel_blocks": 3, "decode.block_size": 32},
        (2, 2),
    ),
    ("vllm_flash_attn", {**SIX, "prefill.block_size": 16, "decode.block_size": 64}, (2, 3)),
    ("vllm_cpu_attn", {**SIX, "prefill.block_size": 32, "decode.block_size": 128}, (3, 2)),
    ("vllm_cpu_attn", {**LLAMA, "prefill.block_size": 128, "decode.block_size": 48}, (1, 8)),
    ("vllm_mla", {**MLA, "prefill.block_size": 64, "decode.block_size": 16}, (2, 4)),
]


@pytest.mark.parametrize("direction", ["pull", "push"])
@pytest.mark.parametrize(("spec", "sets", "tps"), CASES, ids=lambda x: str(x)[:40])
def test_different_tokens_per_block_move_every_token_right(spec, sets, tps, direction):
    plan = compile_plan(spec, *tps, sets)
    assert plan.remap is not None
    for n in _boundary_tokens(plan.remap):
        simulate(plan, n, direction, seed=n)


NEMOTRON_SMALL = {"num_attention_layers": 1, "num_mamba_layers": 1}


@pytest.mark.parametrize(
    ("tps", "kbs"),
    [((4, 2), (66, 131)), ((2, 4), (131, 66)), ((4, 1), (66, 131))],
    ids=["P4-1056_D2-2096", "P2-2096_D4-1056", "P4-1056_D1-2096"],
)
def test_nemotron_3_nano_block_sizes_vllm_picks_per_tp(tps, kbs):
    """vLLM's Nemotron-3-Nano defaults: 1,056 tokens per block at TP 4, 2,096 at TP 1-2
    (16-token kernel blocks); the Mamba state moves block to block."""
    sets = {
        **NEMOTRON_SMALL,
        "prefill.kernel_blocks": kbs[0],
        "decode.kernel_blocks": kbs[1],
    }
    plan = compile_plan("nemotron_3_nano_30b_a3b", *tps, sets)
    rm = plan.remap
    assert rm is not None and rm.chunk_tokens == 16
    pb, db = 16 * kbs[0], 16 * kbs[1]
    for n in sorted({1, 15, 16, 17, pb - 1, pb, pb + 1, db - 1, db, db + 1}):
        simulate(plan, n, "pull", seed=n)
    simulate(plan, db + 1, "push", seed=1)


def test_a_wrong_token_stride_or_window_is_an_internal_error():
    """The compiler's check catches a run shifted by a token, a wrong token stride and a
    window run that leaves the window."""
    plan = compile_plan("vllm_flashinfer", 2, 4, {**LLAMA, "decode.block_size": 32})
    verify_plan(plan)

    def mutated(**change) -> Plan:
        r = plan.ranks[1]
        g = dataclasses.replace(r.reads[0], **change)
        ranks = list(plan.ranks)
        ranks[1] = RankPlan(r.rank, r.sources, r.notify_only, (g, *r.reads[1:]), r.posts)
        return dataclasses.replace(plan, ranks=tuple(ranks))

    g0 = plan.ranks[1].reads[0]
    dts, pts = g0.token_stride
    for change in (
        {"token_stride": (dts, pts * 2)},
        {"token_stride": (dts * 2, pts)},
        {"decode_offset": g0.decode_offset + dts},
        {"prefill_offset": g0.prefill_offset + pts},
        {"nbytes": g0.nbytes + dts},
    ):
        with pytest.raises(InternalError):
            verify_plan(mutated(**change))


def test_windows_place_tokens_on_each_side():
    plan = compile_plan("vllm_flashinfer", 1, 1, {**LLAMA, "decode.block_size": 48})
    rm = plan.remap
    assert rm is not None and rm.chunk_tokens == 16
    block, kernel, row = rm.windows("decode", 100)  # 7 windows of 16 tokens
    assert block.tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert kernel.tolist() == [0] * 7
    assert row.tolist() == [0, 16, 32, 0, 16, 32, 0]
    assert rm.windows("prefill", 100)[0].tolist() == list(range(7))
    assert rm.blocks_for("decode", 96) == 2 and rm.blocks_for("decode", 97) == 3
