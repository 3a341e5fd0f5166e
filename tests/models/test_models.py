"""Model specs from Hugging Face configs: `layoutc init --from-hf`, the shipped specs/models/.

Each fixture in tests/fixtures/hf/ is a small config.json with a model's public values; the
spec of the same name in specs/models/ must be exactly what `init` writes from it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from layoutc.compiler.cli import main
from layoutc.compiler.hf_init import init_from_hf

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
MODELS = ROOT / "specs" / "models"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))

#: The states each model's spec must have (its kind of cache).
STATES = {
    "llama_3_1_8b": ["kv"],
    "llama_3_1_70b": ["kv"],
    "qwen3_8b": ["kv"],
    "qwen2_5_7b": ["kv"],
    "deepseek_v3": ["latent"],
    "nemotron_h_8b": ["kv", "conv", "ssm"],
    "nemotron_3_nano_30b_a3b": ["kv", "conv", "ssm"],
    "granite_4_0_h_small": ["kv", "conv", "ssm"],
    "falcon_h1_7b": ["kv", "conv", "ssm"],
    "jamba_v0_1": ["kv", "conv", "ssm"],
    "qwen3_next_80b_a3b": ["kv", "conv", "recurrent"],
}
REQUIRED = {
    "llama_3_1_8b",
    "llama_3_1_70b",
    "qwen3_8b",
    "deepseek_v3",
    "nemotron_h_8b",
    "nemotron_3_nano_30b_a3b",
    "granite_4_0_h_small",
    "falcon_h1_7b",
    "jamba_v0_1",
    "qwen3_next_80b_a3b",
}
SUPPORTED_NAMES = (
    "LlamaForCausalLM",
    "Qwen3ForCausalLM",
    "DeepseekV3ForCausalLM",
    "NemotronHForCausalLM",
    "FalconH1ForCausalLM",
    "Qwen3NextForCausalLM",
    "JambaForCausalLM",
)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def config_of(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def plan_json(capsys, spec: Path, p: int, d: int, *extra) -> dict:
    rc, out, err = run(
        capsys, "plan", spec, "--prefill-tp", p, "--decode-tp", d, "--format", "json", *extra
    )
    assert rc == 0, err
    return json.loads(out)


def state_bytes(plan: dict) -> dict[str, tuple[int, int]]:
    return {s["name"]: (s["bytes"]["prefill"], s["bytes"]["decode"]) for s in plan["states"]}


def write_config(tmp_path: Path, config: dict, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


# --- the shipped specs ---------------------------------------------------------------------------


def test_every_required_model_has_a_fixture_and_a_spec():
    assert REQUIRED <= set(NAMES)
    assert set(NAMES) == set(STATES), "add the new fixture's states to STATES"
    assert sorted(p.stem for p in MODELS.glob("*.layout")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_shipped_spec_is_what_init_writes(name):
    """specs/models/NAME.layout == init(tests/fixtures/hf/NAME.json); regenerate with
    `layoutc init --from-hf tests/fixtures/hf/NAME.json -o specs/models/NAME.layout`."""
    text = init_from_hf(config_of(name), source_name=f"tests/fixtures/hf/{name}.json")
    assert (MODELS / f"{name}.layout").read_text() == text


def test_cli_writes_the_same_text_as_the_function(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    rc, out, _ = run(capsys, "init", "--from-hf", "tests/fixtures/hf/qwen3_8b.json")
    assert rc == 0
    assert out == (MODELS / "qwen3_8b.layout").read_text()
    # -o: written once, then unchanged
    target = tmp_path / "qwen3.layout"
    assert run(capsys, "init", "--from-hf", "tests/fixtures/hf/qwen3_8b.json", "-o", target)[0] == 0
    assert target.read_text() == out
    rc, _, err = run(capsys, "init", "--from-hf", "tests/fixtures/hf/qwen3_8b.json", "-o", target)
    assert rc == 0 and "unchanged" in err


# --- init, then plan 2 -> 4 ----------------------------------------------------------------------


def _get(config: dict, *keys: str) -> int:
    return next(config[k] for k in keys if k in config)


def _heads(n: int, tp: int) -> int:
    """Units a rank holds: n / tp, or one (replicated) when tp > n."""
    return max(1, n // tp)


def expected_bytes(config: dict, name: str, tp: int) -> dict[str, int]:
    """Per-rank bytes of one page of each state, from the config alone (vLLM's formulas)."""
    e = DTYPE_BYTES[config["torch_dtype"]]
    if STATES[name] == ["latent"]:  # block 64 (FlashMLA), replicated
        return {"latent": 64 * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * e}
    k = config["num_key_value_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    out = {"kv": 2 * _heads(k, tp) * 16 * hd * e}
    if "recurrent" in STATES[name]:  # GDN: conv q | k | v, recurrent [v head][v dim][k dim]
        nk, nv = config["linear_num_key_heads"], config["linear_num_value_heads"]
        dk, dv = config["linear_key_head_dim"], config["linear_value_head_dim"]
        rows = config["linear_conv_kernel_dim"] - 1
        out["conv"] = (2 * _heads(nk, tp) * dk + _heads(nv, tp) * dv) * rows * e
        out["recurrent"] = _heads(nv, tp) * dv * dk * e  # 'auto': the conv dtype
    elif config["architectures"] == ["JambaForCausalLM"]:  # Mamba1: x and [channel][state]
        inner = config["mamba_expand"] * config["hidden_size"]
        out["conv"] = inner // tp * (config["mamba_d_conv"] - 1) * e
        out["ssm"] = inner // tp * config["mamba_d_state"] * e
    elif "conv" in STATES[name]:  # Mamba2: conv x | B | C, ssm [head][head dim][state]
        heads = _get(config, "mamba_num_heads", "mamba_n_heads")
        hdim = _get(config, "mamba_head_dim", "mamba_d_head")
        groups = _get(config, "n_groups", "mamba_n_groups")
        state = _get(config, "ssm_state_size", "mamba_d_state")
        rows = _get(config, "conv_kernel", "mamba_d_conv") - 1
        out["conv"] = (_heads(heads, tp) * hdim + 2 * _heads(groups, tp) * state) * rows * e
        ssm_e = 4 if config["architectures"] == ["NemotronHForCausalLM"] else e
        out["ssm"] = _heads(heads, tp) * hdim * state * ssm_e
    return out


@pytest.mark.parametrize("name", NAMES)
def test_init_then_plan_2_to_4(name, tmp_path, capsys):
    spec = tmp_path / f"{name}.layout"
    rc, _, err = run(capsys, "init", "--from-hf", FIXTURES / f"{name}.json", "-o", spec)
    assert rc == 0, err
    plan = plan_json(capsys, spec, 2, 4)
    assert plan["format"] == "layoutc.plan/1"
    assert [s["name"] for s in plan["states"]] == STATES[name]
    config = config_of(name)
    sizes = state_bytes(plan)
    want_p, want_d = expected_bytes(config, name, 2), expected_bytes(config, name, 4)
    assert sizes == {s: (want_p[s], want_d[s]) for s in STATES[name]}
    for state, (p, d) in sizes.items():
        if state == "latent":
            assert p == d  # replicated: the same page on every rank
        elif state == "kv" and config["num_key_value_heads"] < 4:
            assert p == d  # one (replicated) head per rank at TP 2 and at TP 4
        elif state != "conv":  # (a conv page keeps replicated B/C groups)
            assert p == 2 * d  # sharded: halves from TP 2 to TP 4
    # every decode rank reads what it holds from the prefill rank(s) that hold it
    for r in plan["decode_ranks"]:
        if name == "deepseek_v3":  # replicated: one source, the other holder at most notified
            assert len(r["sources"]) == 1
            assert set(r["sources"]) | set(r["notify_only"]) <= {0, 1}
            assert not set(r["sources"]) & set(r["notify_only"])
        else:
            assert r["sources"] == [r["rank"] // 2]
        for state in STATES[name]:
            got = sum(x["nbytes"] for x in r["reads"] if x["state"] == state)
            # reads cover one logical block: every kernel block of a per-kernel-block page
            per = {st: pg["per"] for pg in plan["pages"] for st in pg["states"]}[state]
            blocks = plan["kernel_blocks"]["decode"] if per == "kernel" else 1
            assert got == sizes[state][1] * blocks, (name, r["rank"], state)
    if name == "deepseek_v3":  # the two prefill ranks share the four readers
        assert sorted(s for r in plan["decode_ranks"] for s in r["sources"]) == [0, 0, 1, 1]


def test_nemotron_3_nano_matches_vllm_numbers(capsys):
    """docs/vllm-reference.md §6 (conv/ssm per rank) and §7 (logical block 2096 tokens)."""
    plan = plan_json(capsys, MODELS / "nemotron_3_nano_30b_a3b.layout", 2, 4)
    sizes = state_bytes(plan)
    assert sizes["conv"] == (18432, 9216)
    assert sizes["ssm"] == (1048576, 524288)
    assert plan["kernel_blocks"] == {"prefill": 131, "decode": 131}  # 131 x 16 = 2096 tokens
    rank1 = next(r for r in plan["decode_ranks"] if r["rank"] == 1)
    conv = [(x["prefill_offset"], x["nbytes"]) for x in rank1["reads"] if x["state"] == "conv"]
    assert conv == [(6144, 6144), (13824, 1536), (16896, 1536)]  # the 3-read of §6
    ssm = [x["prefill_offset"] for x in rank1["reads"] if x["state"] == "ssm"]
    assert ssm == [524288]  # relative to the ssm state (18432 + 524288 in the page)


def test_hybrid_layer_counts_come_from_the_pattern():
    for name, attn, mamba in (("nemotron_3_nano_30b_a3b", 6, 23), ("nemotron_h_8b", 4, 24)):
        text = (MODELS / f"{name}.layout").read_text()
        assert f"num_attention_layers   = {attn} " in text
        assert f"num_mamba_layers       = {mamba} " in text


# --- compile from another folder ---------------------------------------------------------------


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"_models_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", NAMES)
def test_model_spec_compiles_elsewhere_for_every_default_pair(name, tmp_path, capsys, monkeypatch):
    """The spec `use`s its family from the built-in specs, wherever it lies."""
    made = tmp_path / "made"
    made.mkdir()
    rc, _, err = run(
        capsys, "init", "--from-hf", FIXTURES / f"{name}.json", "-o", made / f"{name}.layout"
    )
    assert rc == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(made / f"{name}.layout", elsewhere / "model.layout")
    monkeypatch.chdir(elsewhere)
    rc, _, err = run(capsys, "compile", "model.layout", "-o", "gen")
    assert rc == 0, err
    assert sorted(p.name for p in (elsewhere / "gen").iterdir()) == ["model.py"]
    mod = load_module(elsewhere / "gen" / "model.py")
    assert len(mod.COMPILED_PAIRS) == 16  # every (P, D) in {1, 2, 4, 8}: the shapes allow all
    plan = mod.plan(prefill_tp=2, decode_tp=4)
    assert plan.prefill_tp == 2 and plan.decode_tp == 4
    assert [s["name"] for s in plan.to_json()["states"]] == STATES[name]


def test_shipped_specs_compile_together_with_an_explicit_pair(tmp_path, capsys):
    specs = sorted(MODELS.glob("*.layout"))
    rc, _, err = run(capsys, "compile", *specs, "-o", tmp_path, "--tp-pairs", "2:4,8:2")
    assert rc == 0, err
    assert len(list(tmp_path.glob("*.py"))) == len(specs)
    rc, _, err = run(capsys, "check", *specs, "-o", tmp_path, "--tp-pairs", "2:4,8:2")
    assert rc == 0, err


# --- options -----------------------------------------------------------------------------------


def test_kv_dtype_fp8_halves_attention_but_not_mamba(tmp_path, capsys):
    cfg = FIXTURES / "nemotron_3_nano_30b_a3b.json"
    spec = tmp_path / "nano_fp8.layout"
    assert run(capsys, "init", "--from-hf", cfg, "--kv-dtype", "fp8", "-o", spec)[0] == 0
    text = spec.read_text()
    assert "--kv-dtype fp8" in text
    fp8 = state_bytes(plan_json(capsys, spec, 2, 4))
    bf16 = state_bytes(plan_json(capsys, MODELS / "nemotron_3_nano_30b_a3b.layout", 2, 4))
    assert fp8["kv"] == (bf16["kv"][0] // 2, bf16["kv"][1] // 2)
    assert fp8["conv"] == bf16["conv"] and fp8["ssm"] == bf16["ssm"]
    # docs/vllm-reference.md §7: FP8 KV doubles the logical block at TP 1 -> 261 kernel blocks
    assert plan_json(capsys, spec, 1, 4)["kernel_blocks"]["prefill"] == 261


@pytest.mark.parametrize(
    "torch_dtype,ours,nbytes",
    [("float16", "fp16", 2), ("float32", "fp32", 4), ("bfloat16", "bf16", 2)],
)
def test_torch_dtype_maps_to_kv_dtype(torch_dtype, ours, nbytes, tmp_path, capsys):
    cfg = config_of("llama_3_1_8b") | {"torch_dtype": torch_dtype}
    text = init_from_hf(cfg)
    assert f"kv_dtype            = {ours} " in text and f'torch_dtype = "{torch_dtype}"' in text
    spec = tmp_path / "m.layout"
    spec.write_text(text)
    assert state_bytes(plan_json(capsys, spec, 1, 1))["kv"] == (2 * 8 * 16 * 128 * nbytes,) * 2


def test_newer_dtype_key_and_no_dtype():
    cfg = config_of("qwen3_8b")
    del cfg["torch_dtype"]
    assert "kv_dtype            = bf16  # default" in init_from_hf(cfg)
    assert 'kv_dtype            = fp16  # config: dtype = "float16"' in init_from_hf(
        cfg | {"dtype": "float16"}
    )


def test_block_size_option(tmp_path, capsys):
    spec = tmp_path / "m.layout"
    assert (
        run(
            capsys,
            "init",
            "--from-hf",
            FIXTURES / "llama_3_1_8b.json",
            "--block-size",
            "32",
            "-o",
            spec,
        )[0]
        == 0
    )
    assert state_bytes(plan_json(capsys, spec, 1, 1))["kv"] == (2 * 8 * 32 * 128 * 2,) * 2
    # a hybrid's logical block follows the kernel block: kernel = logical at 2096 tokens
    text = init_from_hf(config_of("nemotron_3_nano_30b_a3b"), block_size=2096)
    assert "kernel_blocks          = 1 " in text and "block_size             = 2096 " in text


def test_flash_attn_backend_gives_k_and_v(tmp_path, capsys):
    spec = tmp_path / "m.layout"
    rc, _, _ = run(
        capsys,
        "init",
        "--from-hf",
        FIXTURES / "llama_3_1_70b.json",
        "--attention-backend",
        "flash_attn",
        "-o",
        spec,
    )
    assert rc == 0
    assert 'use "vllm_flash_attn.layout"' in spec.read_text()
    sizes = state_bytes(plan_json(capsys, spec, 8, 4))
    assert sizes == {"k": (4096, 8192), "v": (4096, 8192)}


def test_head_dim_given_wins_over_derived():
    # Mistral-NeMo-like: head_dim 128 while hidden_size / heads = 160
    cfg = {
        "architectures": ["MistralForCausalLM"],
        "hidden_size": 5120,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "num_hidden_layers": 40,
    }
    text = init_from_hf(cfg)
    assert "head_dim            = 128   # config: head_dim" in text
    del cfg["head_dim"]
    assert (
        "head_dim            = 160   # derived: hidden_size / num_attention_heads = 5120 / 32"
        in init_from_hf(cfg)
    )
    cfg["head_dim"] = None  # null counts as absent
    assert "= 160   # derived" in init_from_hf(cfg)


def test_mha_without_kv_heads_and_model_type_fallback():
    cfg = {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
    }
    text = init_from_hf(cfg)
    assert 'use "vllm_flashinfer.layout"' in text
    assert "num_key_value_heads = 32    # config: num_attention_heads" in text


def test_tp_sizes_listed_in_the_spec():
    text = (MODELS / "qwen2_5_7b.layout").read_text()
    assert "1, 2, 4, 8." in text and "num_attention_heads (28) divisible by TP: 1, 2, 4." in text
    cfg = config_of("llama_3_1_8b") | {"num_key_value_heads": 6}
    assert "(of 1, 2, 4, 8): 1, 2." in init_from_hf(cfg)


def test_granite_style_layer_types_and_auto_head_dim(tmp_path, capsys):
    cfg = {
        "architectures": ["GraniteMoeHybridForCausalLM"],
        "hidden_size": 1536,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "num_hidden_layers": 6,
        "layer_types": ["mamba", "mamba", "attention", "mamba", "mamba", "mamba"],
        "mamba_n_heads": 48,
        "mamba_d_head": "auto",
        "mamba_expand": 2,
        "mamba_n_groups": 1,
        "mamba_d_state": 128,
        "mamba_d_conv": 4,
        "torch_dtype": "bfloat16",
    }
    spec = write_config(tmp_path, cfg)
    out = tmp_path / "g.layout"
    assert run(capsys, "init", "--from-hf", spec, "-o", out)[0] == 0
    text = out.read_text()
    assert "num_attention_layers   = 1 " in text and "num_mamba_layers       = 5 " in text
    assert "mamba_head_dim         = 64    # derived: mamba_expand * hidden_size" in text
    assert "ssm_dtype              = bf16" in text  # 'auto': the conv dtype
    # one B/C group, replicated at TP 2 and 4: each rank's conv = x/TP + one group each for B, C
    sizes = state_bytes(plan_json(capsys, out, 2, 4))
    assert sizes["conv"] == ((1536 + 256) * 3 * 2, (768 + 256) * 3 * 2)


# --- errors ------------------------------------------------------------------------------------


def test_unknown_architecture_lists_supported(tmp_path, capsys):
    path = write_config(tmp_path, {"architectures": ["GPT2LMHeadModel"], "n_embd": 768})
    rc, out, err = run(capsys, "init", "--from-hf", path)
    assert rc == 1 and out == ""
    assert "GPT2LMHeadModel" in err
    for arch in SUPPORTED_NAMES:
        assert arch in err


def test_known_but_unsupported_architecture_says_why(tmp_path, capsys):
    path = write_config(tmp_path, {"architectures": ["MambaForCausalLM"]})
    rc, _, err = run(capsys, "init", "--from-hf", path)
    assert rc == 1 and "pure Mamba1" in err and "examples/mamba1.layout" in err
    assert "NemotronHForCausalLM" in err and "Qwen3NextForCausalLM" in err


def test_no_architecture_at_all(tmp_path, capsys):
    rc, _, err = run(capsys, "init", "--from-hf", write_config(tmp_path, {"hidden_size": 8}))
    assert rc == 1 and "architectures" in err and "LlamaForCausalLM" in err


@pytest.mark.parametrize(
    "name,drop",
    [
        ("llama_3_1_8b", ["num_hidden_layers", "num_key_value_heads", "num_attention_heads"]),
        ("deepseek_v3", ["kv_lora_rank", "qk_rope_head_dim"]),
        ("nemotron_h_8b", ["mamba_num_heads", "n_groups", "hybrid_override_pattern"]),
        ("qwen3_next_80b_a3b", ["linear_num_value_heads", "full_attention_interval"]),
        ("jamba_v0_1", ["mamba_d_state", "attn_layer_period"]),
        ("falcon_h1_7b", ["mamba_n_heads", "mamba_d_head"]),
    ],
)
def test_missing_keys_are_named(name, drop, tmp_path, capsys):
    cfg = config_of(name)
    for k in drop:
        del cfg[k]
    rc, out, err = run(capsys, "init", "--from-hf", write_config(tmp_path, cfg))
    assert rc == 1 and out == ""
    assert cfg["architectures"][0] in err and "missing" in err
    for k in drop:
        if k != "num_attention_heads":
            assert k in err
    if name == "llama_3_1_8b":  # head_dim cannot be derived without num_attention_heads
        assert "head_dim" in err


def test_bad_values_are_named(tmp_path, capsys):
    cfg = config_of("nemotron_h_8b") | {"n_groups": 0, "head_dim": "128"}
    rc, _, err = run(capsys, "init", "--from-hf", write_config(tmp_path, cfg))
    assert rc == 1 and "'n_groups' must be a positive integer, got 0" in err and "'head_dim'" in err
    cfg = config_of("nemotron_h_8b") | {"hybrid_override_pattern": "M*X"}
    rc, _, err = run(capsys, "init", "--from-hf", write_config(tmp_path, cfg))
    assert rc == 1 and "'X'" in err
    cfg = config_of("nemotron_h_8b") | {"num_hidden_layers": 50}
    rc, _, err = run(capsys, "init", "--from-hf", write_config(tmp_path, cfg))
    assert rc == 1 and "num_hidden_layers is 50" in err and "52" in err
    cfg = config_of("nemotron_h_8b") | {"hybrid_override_pattern": "M-M-", "num_hidden_layers": 4}
    rc, _, err = run(capsys, "init", "--from-hf", write_config(tmp_path, cfg))
    assert rc == 1 and "0 attention" in err
    cfg = config_of("llama_3_1_8b") | {"torch_dtype": "int8"}
    rc, _, err = run(capsys, "init", "--from-hf", write_config(tmp_path, cfg))
    assert rc == 1 and "int8" in err and "--kv-dtype" in err
    # --kv-dtype rescues a config whose dtype init cannot read
    assert (
        run(capsys, "init", "--from-hf", write_config(tmp_path, cfg), "--kv-dtype", "fp8")[0] == 0
    )


def test_head_dim_underivable(tmp_path, capsys):
    cfg = config_of("llama_3_1_8b") | {"num_attention_heads": 30}
    rc, _, err = run(capsys, "init", "--from-hf", write_config(tmp_path, cfg))
    assert rc == 1 and "4096" in err and "30" in err


def test_shapes_that_fit_no_tp(tmp_path, capsys):
    # 3 KV heads fit TP 1 only (and 3 % 2 != 0): init still writes the spec, listing TP 1
    cfg = config_of("llama_3_1_8b") | {
        "num_key_value_heads": 3,
        "num_attention_heads": 3,
        "hidden_size": 384,
    }
    text = init_from_hf(cfg)
    assert "(of 1, 2, 4, 8): 1." in text


def test_bad_json_names_line_and_column(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text('{\n  "architectures": ["LlamaForCausalLM"],\n  "hidden_size": 4096,,\n}\n')
    rc, out, err = run(capsys, "init", "--from-hf", path)
    assert rc == 1 and out == ""
    assert f"{path}:3:23: invalid JSON" in err  # the second comma
    path.write_text("[1, 2]")
    rc, _, err = run(capsys, "init", "--from-hf", path)
    assert rc == 1 and "JSON object" in err
    path.write_bytes(b"\xff\xfe{")
    rc, _, err = run(capsys, "init", "--from-hf", path)
    assert rc == 1 and "UTF-8" in err


def test_usage_errors_exit_2(tmp_path, capsys):
    cfg = FIXTURES / "qwen3_8b.json"
    assert run(capsys, "init")[0] == 2
    assert run(capsys, "init", "--from-hf", tmp_path / "absent.json")[0] == 2
    assert run(capsys, "init", "--from-hf", cfg, "--kv-dtype", "int4")[0] == 2
    assert run(capsys, "init", "--from-hf", cfg, "--block-size", "0")[0] == 2
    assert run(capsys, "init", "--from-hf", cfg, "--engine", "sglang")[0] == 2
    assert run(capsys, "init", "--from-hf", cfg, "--attention-backend", "xformers")[0] == 2
    assert run(capsys, "init", "--from-hf", cfg, "-o", tmp_path)[0] == 2  # a directory


def test_o_refuses_to_overwrite_a_hand_written_spec(tmp_path, capsys):
    target = tmp_path / "mine.layout"
    target.write_text("# my own spec\n")
    rc, _, err = run(capsys, "init", "--from-hf", FIXTURES / "qwen3_8b.json", "-o", target)
    assert rc == 2 and "not overwriting" in err
    assert target.read_text() == "# my own spec\n"
    rc, _, _ = run(capsys, "init", "--from-hf", FIXTURES / "qwen3_8b.json", "-o", target, "--force")
    # an absolute config path is written as its file name only
    assert rc == 0 and target.read_text() == init_from_hf(
        config_of("qwen3_8b"), source_name="qwen3_8b.json"
    )


QUARTER = 4  # 1 tries every combination (slower)


def _mutations():
    """Each fixture with one key's value replaced by something a broken config might hold."""
    odd = [None, "auto", -1, 0, 1, 3, 2.5, True, [], {}, "M*", ["mamba"], 10**9]
    for name in NAMES:
        cfg = config_of(name)
        for key in sorted(k for k in cfg if not k.startswith("_")):
            for i, v in enumerate(odd):
                if (
                    sum(map(ord, key)) + i
                ) % QUARTER == 0:  # a deterministic quarter of the combinations
                    yield name, key, v


def test_broken_configs_never_crash(tmp_path, capsys):
    """Whatever a config holds, init exits 0 (a spec that compiles) or 1 (a message)."""
    checked = 0
    for name, key, value in _mutations():
        cfg = config_of(name) | {key: value}
        path = write_config(tmp_path, cfg)
        rc, out, err = run(capsys, "init", "--from-hf", path)
        assert rc in (0, 1), (name, key, value, err)
        if rc == 1:
            assert err.startswith("layoutc: error: ") and out == "", (name, key, value)
        else:
            spec = tmp_path / "m.layout"
            spec.write_text(out)
            rc, _, err = run(capsys, "plan", spec, "--prefill-tp", 1, "--decode-tp", 1)
            assert rc in (0, 1), (name, key, value, err)  # 1: e.g. past a compiler limit
        checked += 1
    assert checked > 100


def test_local_paths_and_control_characters_stay_out_of_the_spec():
    cfg = config_of("qwen3_8b") | {
        "_name_or_path": "/home/me/models/qwen3",
        "_layoutc_notes": ["two\nlines"],
    }
    text = init_from_hf(cfg, source_name="odd\nname.json")
    assert "/home/me" not in text
    assert text.startswith("# odd name: the vLLM cache of Qwen3ForCausalLM")
    assert all(
        line.startswith("#") or not line or line.startswith(("use", "  ", "}"))
        for line in text.splitlines()
    )
    assert "Note (config): two lines" in text
