"""The worked numbers of docs/vllm-reference.md §4-§6, reproduced exactly.

§6 gives SSM offsets from the Mamba page start; the plan JSON counts from each state's start
(docs/design.md §4, "Outputs"), so SSM offsets below are §6's minus the conv bytes.
"""

from __future__ import annotations

from planner_cases import NANO, NEMOTRON_H_8B, compile_pair


def reads(plan, rank, state=None):
    return [
        (r["state"], r["prefill_rank"], r["decode_offset"], r["prefill_offset"], r["nbytes"])
        for r in plan.iter_reads(rank)
        if state is None or r["state"] == state
    ]


def test_nano_state_sizes_per_tp():
    for tp, conv, ssm in ((1, 36864, 2097152), (2, 18432, 1048576), (4, 9216, 524288)):
        plan = compile_pair("vllm_hybrid_mamba2", tp, tp, NANO)
        assert plan.decode.state("conv").nbytes == conv
        assert plan.decode.state("ssm").nbytes == ssm
        assert plan.decode.state("ssm").offset == conv  # conv | ssm in the Mamba page


def test_nano_1_to_2():
    plan = compile_pair("vllm_hybrid_mamba2", 1, 2, NANO)
    assert reads(plan, 0, "conv") == [
        ("conv", 0, 0, 0, 12288),
        ("conv", 0, 12288, 24576, 3072),
        ("conv", 0, 15360, 30720, 3072),
    ]
    assert reads(plan, 1, "conv") == [
        ("conv", 0, 0, 12288, 12288),
        ("conv", 0, 12288, 27648, 3072),
        ("conv", 0, 15360, 33792, 3072),
    ]
    # §6: ssm at 36864 and 36864 + 1048576 from the Mamba page start
    assert reads(plan, 0, "ssm") == [("ssm", 0, 0, 36864 - 36864, 1048576)]
    assert reads(plan, 1, "ssm") == [("ssm", 0, 0, 36864 + 1048576 - 36864, 1048576)]
    # FA: K=2 heads, D rank 1 holds head 1: K half and V half of that head
    head = 16 * 128 * 2
    assert reads(plan, 1, "kv") == [("kv", 0, 0, head, head), ("kv", 0, head, 3 * head, head)]


def test_nano_2_to_4():
    plan = compile_pair("vllm_hybrid_mamba2", 2, 4, NANO)
    assert reads(plan, 1, "conv") == [
        ("conv", 0, 0, 6144, 6144),
        ("conv", 0, 6144, 13824, 1536),
        ("conv", 0, 7680, 16896, 1536),
    ]
    assert reads(plan, 1, "ssm") == [("ssm", 0, 0, 18432 + 524288 - 18432, 524288)]
    # D replicated (TP 4 > K 2): ranks 0,1 read P0's head 0; 2,3 read P1's only head (offset 0)
    for d, p in ((0, 0), (1, 0), (2, 1), (3, 1)):
        assert {r[1] for r in reads(plan, d, "kv")} == {p}
        assert reads(plan, d, "kv")[0][3] == 0


def test_nano_4_to_2():
    plan = compile_pair("vllm_hybrid_mamba2", 4, 2, NANO)
    r0 = plan.rank(0)
    assert r0.sources == (0, 1)
    got = sorted(reads(plan, 0, "conv") + reads(plan, 0, "ssm"), key=lambda r: (r[1], r[0], r[2]))
    assert got == [
        ("conv", 0, 0, 0, 6144),
        ("conv", 0, 12288, 6144, 1536),
        ("conv", 0, 15360, 7680, 1536),
        ("ssm", 0, 0, 0, 524288),
        ("conv", 1, 6144, 0, 6144),
        ("conv", 1, 13824, 6144, 1536),
        ("conv", 1, 16896, 7680, 1536),
        ("ssm", 1, 524288, 0, 524288),
    ]
    # FA only from P0 (P1 holds the same replicated head); D rank 1 from P2
    assert {r[1] for r in reads(plan, 0, "kv")} == {0}
    assert {r[1] for r in reads(plan, 1, "kv")} == {2}


def test_nano_4_to_1_fa_targets():
    plan = compile_pair("vllm_hybrid_mamba2", 4, 1, NANO)
    assert {r[1] for r in reads(plan, 0, "kv")} == {0, 2}  # §5 table: FA targets [0, 2]
    assert {r[1] for r in reads(plan, 0, "ssm")} == {0, 1, 2, 3}


def test_nemotron_h_8b_conv():
    plan = compile_pair("vllm_hybrid_mamba2", 1, 1, NEMOTRON_H_8B)
    assert plan.decode.state("conv").nbytes == 10240 * 3 * 2
    r = reads(plan, 0)
    assert r[1:] == [("conv", 0, 0, 0, 10240 * 3 * 2), ("ssm", 0, 0, 0, 128 * 64 * 128 * 4)]
    plan = compile_pair("vllm_hybrid_mamba2", 1, 2, NEMOTRON_H_8B)
    x = [t for t in reads(plan, 1, "conv")]
    assert x[0] == ("conv", 0, 0, 49152 // 2, 49152 // 2)  # xb 49152 at TP 1


def test_gqa_replication_k8_tp16():
    """§4: K=8, D_TP=16, blocks-first, K half of one head = 4096 B."""
    k8 = dict(num_key_value_heads=8, head_dim=128)
    plan = compile_pair("vllm_flashinfer", 8, 16, k8)
    for d in range(16):
        # vLLM: K (0, 4096) and V (4096, 4096) of P rank d // 2 at offset 0 (post-fix formula);
        # both halves are contiguous on both sides here, so they form one run
        assert reads(plan, d) == [("kv", d // 2, 0, 0, 8192)]
    plan = compile_pair("vllm_flashinfer", 2, 16, k8)
    expect = {0: 0, 1: 0, 2: 4096, 3: 4096, 4: 8192, 5: 8192, 6: 12288, 7: 12288}
    for d in range(16):
        r = reads(plan, d)
        off = expect[d % 8]
        # K half at the head offset, V half one P K-half (4 heads) further
        assert r == [("kv", d // 8, 0, off, 4096), ("kv", d // 8, 4096, 16384 + off, 4096)]


def test_mla_single_read_and_notify_only():
    mla = dict(kv_lora_rank=512, qk_rope_head_dim=64)
    plan = compile_pair("vllm_mla", 4, 2, mla)
    assert (plan.rank(0).sources, plan.rank(0).notify_only) == ((0,), (1,))
    assert (plan.rank(1).sources, plan.rank(1).notify_only) == ((2,), (3,))
    assert [plan.readers(p) for p in range(4)] == [(0,), (0,), (1,), (1,)]
    plan = compile_pair("vllm_mla", 2, 4, mla)
    assert [r.sources for r in plan.ranks] == [(0,), (0,), (1,), (1,)]  # spread, never all on P0
    assert reads(plan, 3) == [("latent", 1, 0, 0, 16 * 576 * 2)]


def vllm_descriptors_per_block(plan, d):
    """vLLM's per-block descriptor count (docs/vllm-reference.md §3, §6): FA K and V per source,
    4 Mamba reads (x, B, C, ssm) per source."""
    srcs = {}
    for r in plan.iter_reads(d):
        srcs.setdefault(r["state"], set()).add(r["prefill_rank"])
    return {
        "attention": 2 * len(srcs.get("kv", ())),
        "mamba": 4 * len(srcs.get("conv", set()) | srcs.get("ssm", set())),
    }


def test_never_more_descriptors_than_vllm():
    for p, d in ((1, 1), (2, 2), (1, 2), (2, 4), (4, 2), (4, 1), (1, 4)):
        plan = compile_pair("vllm_hybrid_mamba2", p, d, NANO)
        for r in plan.ranks:
            ours = plan.descriptors_per_block(r.rank)
            theirs = vllm_descriptors_per_block(plan, r.rank)
            for page in ours:
                assert ours[page] <= theirs[page], (p, d, r.rank, page)


def test_homogeneous_merges_kv_and_conv_ssm():
    plan = compile_pair("vllm_hybrid_mamba2", 2, 2, NANO)
    assert plan.descriptors_per_block(0) == {"attention": 1, "mamba": 1}
