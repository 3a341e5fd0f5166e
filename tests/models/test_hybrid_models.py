"""Hybrid models from their Hugging Face configs: Qwen3-Next / Qwen3.5 (gated DeltaNet),
Falcon-H1 (attention and Mamba2 in every layer), Jamba (Mamba1) and Granite-4.0-H, checked
against vLLM's state shapes (`MambaStateShapeCalculator`, restated here from the config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from layoutc.compiler.api import compile_plan
from layoutc.compiler.hf_init import init_from_hf

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
MODELS = ROOT / "specs" / "models"


def config_of(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def sizes(spec: str | Path, p: int, d: int, sets: dict | None = None) -> dict[str, tuple[int, int]]:
    plan = compile_plan(str(spec), p, d, sets)
    return {s.name: (s.nbytes, plan.decode.state(s.name).nbytes) for s in plan.prefill.states}


def binding(text: str, name: str) -> str:
    line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"{name} "))
    return line.split("=", 1)[1].split("#", 1)[0].strip()


def test_qwen3_next_matches_vllm_gdn_state_shapes():
    """vLLM: conv (key_dim*2 + value_dim) / tp columns x (kernel - 1) rows; recurrent
    (v heads / tp, v dim, k dim); both in the model dtype ('auto')."""
    spec = MODELS / "qwen3_next_80b_a3b.layout"
    for tp in (1, 2, 4, 8):
        got = sizes(spec, tp, tp)
        conv = (128 * 16 * 2 + 128 * 32) // tp * 3 * 2
        assert got["conv"] == (conv, conv)
        assert got["recurrent"] == ((32 // tp) * 128 * 128 * 2,) * 2
        assert got["kv"] == ((2 * max(1, 2 // tp) * 16 * 256 * 2),) * 2
    text = spec.read_text()
    assert binding(text, "num_attention_layers") == "12"
    assert binding(text, "num_linear_attention_layers") == "36"
    assert binding(text, "kernel_blocks") == "34"  # 544 tokens hold 1 MiB + 48 KiB at TP 1
    assert "(LLL*) x 12" in text  # the config's layer order, kept in the header


def test_gdn_conv_reads_q_k_v_apart_when_tp_changes():
    """1 -> 2: decode rank 1 holds q, k, v heads from the second half of each segment."""
    plan = compile_plan(str(MODELS / "qwen3_next_80b_a3b.layout"), 1, 2)
    col = 3 * 2  # bytes per conv column (3 rows, bf16)
    reads = [(x["prefill_offset"], x["nbytes"]) for x in plan.iter_reads(1) if x["state"] == "conv"]
    q, k, v = 1024 * col, 1024 * col, 2048 * col  # rank 1's half of each segment
    assert sorted(reads) == [(q, q), (2 * q + k, k), (2 * q + 2 * k + v, v)]


def test_qwen3_5_text_config_and_its_ssm_dtype():
    cfg = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "qwen3_5_moe_text",
            "num_hidden_layers": 8,
            "layer_types": ["linear_attention"] * 3 + ["full_attention"],
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "head_dim": 256,
            "linear_num_key_heads": 16,
            "linear_num_value_heads": 64,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
            "linear_conv_kernel_dim": 4,
            "mamba_ssm_dtype": "float32",
        },
    }
    with pytest.raises(Exception, match="layer_types' describes 4 layers"):
        init_from_hf(cfg)
    cfg["text_config"]["layer_types"] *= 2
    text = init_from_hf(cfg)
    assert 'use "vllm_hybrid_gdn.layout"' in text and "text_config" in text
    assert binding(text, "recurrent_dtype") == "fp32"  # vLLM's Qwen3.5 hook
    assert binding(text, "num_attention_layers") == "2"


def test_falcon_h1_keeps_attention_and_mamba_in_every_layer():
    text = (MODELS / "falcon_h1_7b.layout").read_text()
    assert binding(text, "num_attention_layers") == "44"
    assert binding(text, "num_mamba_layers") == "44"
    spec = MODELS / "falcon_h1_7b.layout"
    # n_groups 1: B and C replicated, one group per rank (vLLM's extra_groups_for_head_shards)
    for tp in (1, 2, 4, 8):
        conv = (24 // tp * 128 + 2 * 256) * 3 * 2
        assert sizes(spec, tp, tp)["conv"] == (conv, conv)
        assert sizes(spec, tp, tp)["ssm"] == ((24 // tp) * 128 * 256 * 2,) * 2
    # a d_ssm that does not match heads x head dim is refused
    with pytest.raises(Exception, match="mamba_d_ssm is 4096"):
        init_from_hf(config_of("falcon_h1_7b") | {"mamba_d_ssm": 4096})


def test_falcon_h1_one_group_moves_the_right_bytes_where_vllm_does_not():
    """n_groups 1 < TP: every decode rank reads its one B and C group from one prefill rank."""
    plan = compile_plan(str(MODELS / "falcon_h1_7b.layout"), 1, 2)
    col = 3 * 2
    for r in plan.ranks:
        conv = sorted(
            (x["prefill_offset"], x["nbytes"])
            for x in plan.iter_reads(r.rank)
            if x["state"] == "conv"
        )
        x = 1536 * col
        # x: the rank's half; B | C: the whole (replicated) group of each, adjacent on both
        # sides (and, on rank 1, right after its half of x on both sides)
        bc = 2 * 256 * col
        assert conv == ([(0, x), (2 * x, bc)] if r.rank == 0 else [(x, x + bc)])


def test_jamba_layers_from_period_and_offset_or_block_types():
    text = (MODELS / "jamba_v0_1.layout").read_text()
    assert binding(text, "num_attention_layers") == "4"
    assert binding(text, "num_mamba_layers") == "28"
    assert binding(text, "mamba_intermediate_size") == "8192"
    assert "(MMMM*MMM) x 4" in text
    cfg = config_of("jamba_v0_1")
    cfg["layers_block_type"] = ["attention" if i % 4 == 0 else "mamba" for i in range(32)]
    text = init_from_hf(cfg)
    assert binding(text, "num_attention_layers") == "8"
    spec = MODELS / "jamba_v0_1.layout"
    for tp in (1, 2, 4, 8):
        got = sizes(spec, tp, tp)
        assert got["conv"] == ((8192 // tp * 3 * 2),) * 2
        assert got["ssm"] == ((8192 // tp * 16 * 2),) * 2


def test_granite_4_h_small():
    text = (MODELS / "granite_4_0_h_small.layout").read_text()
    assert binding(text, "num_attention_layers") == "4"
    assert binding(text, "num_mamba_layers") == "36"
    assert binding(text, "mamba_head_dim") == "64"
    assert binding(text, "kernel_blocks") == "33"


@pytest.mark.parametrize(
    "name", ["qwen3_next_80b_a3b", "falcon_h1_7b", "jamba_v0_1", "granite_4_0_h_small"]
)
def test_hybrid_pairs_with_different_block_sizes(name):
    """A decode engine with half the kernel block (twice the kernel blocks) still gets every
    token of the logical block (the planner checks each plan; here the reads are counted)."""
    spec = MODELS / f"{name}.layout"
    kb = int(binding(spec.read_text(), "kernel_blocks"))
    sets = {"decode.block_size": 8, "decode.kernel_blocks": 2 * kb}
    plan = compile_plan(str(spec), 2, 4, sets)
    kv = plan.decode.state("kv")
    for r in plan.ranks:
        got = sum(g.nbytes * g.count for g in r.reads if g.state == "kv")
        assert got == kv.nbytes * 2 * kb
