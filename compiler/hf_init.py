"""`layoutc init --from-hf`: a model spec from a Hugging Face `config.json`.

A model spec is one `use "family.layout" { name = value ... }` of a family spec in `specs/`
with the model's values bound, each commented with where it came from: a config key, a
derivation (`derived: hidden_size / num_attention_heads`), or a default.  The family is chosen
by the config's architecture:

* grouped-query / multi-head attention (Llama, Mistral, Qwen2/3, ...): `vllm_flashinfer.layout`
  (blocks-first K|V page), or `vllm_flash_attn.layout` with `attention_backend="flash_attn"`;
* MLA (DeepSeek-V2/V3): `vllm_mla.layout`;
* hybrid attention + Mamba2 (Nemotron-H, Granite-4.0-H) and the parallel hybrid Falcon-H1
  (attention and Mamba2 in every layer): `vllm_hybrid_mamba2.layout`;
* hybrid attention + gated DeltaNet (Qwen3-Next, Qwen3.5): `vllm_hybrid_gdn.layout`;
* hybrid attention + Mamba1 (Jamba): `vllm_hybrid_mamba1.layout`.

Hybrids count their layer kinds from the config's layer pattern (kept, in order, in the spec's
header) and size the logical block so that attention pages hold the other kind's state.

Every value can still be overridden at compile time with `--set NAME=VALUE`.  The text is
checked by loading it with the compiler before it is returned, so `init` never writes a spec
that does not compile.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from .bind import UsageError
from .diagnostics import LayoutError, Sink

ENGINES = ("vllm",)
ATTENTION_BACKENDS = ("flashinfer", "flash_attn")

GQA, MLA, HYBRID = "grouped-query attention", "MLA", "hybrid attention + Mamba2"
PARALLEL = "parallel hybrid attention + Mamba2"
GDN = "hybrid attention + gated DeltaNet"
MAMBA1 = "hybrid attention + Mamba1"
#: Kinds whose layers keep an attention page and a per-logical-block state page.
HYBRIDS = (HYBRID, PARALLEL, GDN, MAMBA1)

#: The family spec of each kind (attention: see `attention_backend`).
FAMILIES = {
    MLA: "vllm_mla.layout",
    HYBRID: "vllm_hybrid_mamba2.layout",
    PARALLEL: "vllm_hybrid_mamba2.layout",
    GDN: "vllm_hybrid_gdn.layout",
    MAMBA1: "vllm_hybrid_mamba1.layout",
}

#: Architectures `init` knows, and the kind of cache each one keeps.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": GQA,
    "MistralForCausalLM": GQA,
    "MixtralForCausalLM": GQA,
    "Qwen2ForCausalLM": GQA,
    "Qwen2MoeForCausalLM": GQA,
    "Qwen3ForCausalLM": GQA,
    "Qwen3MoeForCausalLM": GQA,
    "Phi3ForCausalLM": GQA,
    "GraniteForCausalLM": GQA,
    "GraniteMoeForCausalLM": GQA,
    "DeepseekV2ForCausalLM": MLA,
    "DeepseekV3ForCausalLM": MLA,
    "NemotronHForCausalLM": HYBRID,
    "GraniteMoeHybridForCausalLM": HYBRID,
    "FalconH1ForCausalLM": PARALLEL,
    "Qwen3NextForCausalLM": GDN,
    "Qwen3_5ForCausalLM": GDN,
    "Qwen3_5MoeForCausalLM": GDN,
    "JambaForCausalLM": MAMBA1,
}

#: Multimodal architectures whose language model is described by `text_config` (unwrapped).
TEXT_WRAPPERS = {
    "Qwen3_5ForConditionalGeneration": "Qwen3_5ForCausalLM",
    "Qwen3_5MoeForConditionalGeneration": "Qwen3_5MoeForCausalLM",
}

#: `model_type` -> architecture, for configs without an `architectures` list.
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "granite": "GraniteForCausalLM",
    "granitemoe": "GraniteMoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "nemotron_h": "NemotronHForCausalLM",
    "granitemoehybrid": "GraniteMoeHybridForCausalLM",
    "falcon_h1": "FalconH1ForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
    "qwen3_5_text": "Qwen3_5ForCausalLM",
    "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
    "jamba": "JambaForCausalLM",
}

#: Architectures we know but cannot describe yet, and why (named in the error).
NOT_YET = {
    "MambaForCausalLM": "a pure Mamba1 model keeps no attention page; the hybrid family needs "
    "both kinds (examples/mamba1.layout in the layoutc repository describes the state alone)",
    "FalconMambaForCausalLM": "a pure Mamba1 model keeps no attention page; the hybrid family "
    "needs both kinds (examples/mamba1.layout in the layoutc repository describes the state "
    "alone)",
    "Mamba2ForCausalLM": "a pure Mamba2 model has no attention layers; the hybrid family needs "
    "both kinds",
    "DeepseekV32ForCausalLM": "the sparse-attention indexer cache next to the MLA latent has no "
    "family spec yet",
}

#: `torch_dtype` / `dtype` / `--kv-dtype` names -> layoutc dtype names.
DTYPE_NAMES = {
    "bfloat16": "bf16",
    "bf16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "fp16": "fp16",
    "float32": "fp32",
    "float": "fp32",
    "fp32": "fp32",
    "fp8": "fp8",
    "fp8_e4m3": "fp8",
    "fp8_e5m2": "fp8",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
}

#: More layers than this is a broken config, not a model (and would take init's memory).
MAX_LAYERS = 100_000

#: TP sizes `init` checks the shapes against (the ones `layoutc compile` tries by default).
TP_SIZES = (1, 2, 4, 8)

#: Hybrid layer-pattern characters (Nemotron-H `hybrid_override_pattern`).
PATTERN_KINDS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
#: Layer-type words (`layers_block_type` / `layer_types` lists).
LAYER_WORDS = {
    "mamba": "mamba",
    "mamba2": "mamba",
    "attention": "attention",
    "full_attention": "attention",
    "attn": "attention",
    "linear_attention": "linear_attention",
    "mlp": "mlp",
    "moe": "moe",
}


class InitError(Exception):
    """The config cannot be turned into a spec (unknown architecture, missing or bad keys)."""


@dataclass
class _Binding:
    name: str
    value: int | str | None  # None only while a config error is pending
    source: str


def supported_text() -> str:
    by_kind: dict[str, list[str]] = {}
    for arch, kind in ARCHITECTURES.items():
        by_kind.setdefault(kind, []).append(arch)
    return "; ".join(f"{kind}: {', '.join(archs)}" for kind, archs in by_kind.items())


def dtype_name(text: str, what: str) -> str:
    """A layoutc dtype for a torch / vLLM / layoutc dtype name; UsageError if unknown."""
    key = str(text).strip().lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise UsageError(
            f"{what} {text!r}: unknown dtype (use one of fp32, bf16, fp16, fp8, or the torch "
            "names bfloat16, float16, float32)"
        )
    return DTYPE_NAMES[key]


class _Config:
    """Reads keys of one config, collecting every missing or bad key before failing."""

    def __init__(self, config: dict, arch: str):
        self.c = config
        self.arch = arch
        self.missing: list[str] = []
        self.bad: list[str] = []

    def has(self, key: str) -> bool:
        return self.c.get(key) is not None

    def int(self, *keys: str, required: bool = True) -> tuple[int | None, str | None]:
        """The first of `keys` present (null counts as absent), as a positive int."""
        for k in keys:
            v = self.c.get(k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                self.bad.append(f"'{k}' must be a positive integer, got {v!r}")
                return None, k
            return v, k
        if required:
            self.missing.append(" or ".join(keys))
        return None, None

    def fail_if_any(self) -> None:
        parts = []
        if self.missing:
            parts.append(f"missing key(s): {', '.join(dict.fromkeys(self.missing))}")
        if self.bad:
            parts.append("; ".join(dict.fromkeys(self.bad)))
        if parts:
            raise InitError(f"{self.arch} config: " + "; ".join(parts))


def _unwrap_text_config(config: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A multimodal config's language model (`text_config`) for the architectures that have
    one, with the outer config's dtype and name; other configs unchanged."""
    archs = config.get("architectures")
    outer = (
        next((a for a in archs or () if a in TEXT_WRAPPERS), None)
        if isinstance(archs, list)
        else None
    )
    text = config.get("text_config")
    if outer is None or not isinstance(text, dict):
        return config, None
    inner = dict(text)
    inner["architectures"] = [TEXT_WRAPPERS[outer]]
    for key in ("torch_dtype", "dtype", "_name_or_path", "_layoutc_notes"):
        if key in config and key not in inner:
            inner[key] = config[key]
    return inner, f"the language model of {outer} (its text_config) is described"


def _architecture(config: dict) -> str:
    archs = config.get("architectures")
    if archs is not None and not (
        isinstance(archs, list) and all(isinstance(a, str) for a in archs)
    ):
        raise InitError(f"'architectures' must be a list of names, got {archs!r}")
    if archs:
        for a in archs:
            if a in ARCHITECTURES:
                return a
        for a in archs:
            if a in NOT_YET:
                raise InitError(
                    f"{a} is not supported yet: {NOT_YET[a]}. Supported: {supported_text()}"
                )
        raise InitError(
            f"unsupported architecture {', '.join(archs)}. Supported: {supported_text()}"
        )
    mt = config.get("model_type")
    if isinstance(mt, str) and mt in MODEL_TYPES:
        return MODEL_TYPES[mt]
    if mt is not None:
        raise InitError(
            f"config has no 'architectures' and model_type {mt!r} is not supported. "
            f"Supported: {supported_text()}"
        )
    raise InitError(
        f"config has neither 'architectures' nor 'model_type'; is it a Hugging Face config.json? "
        f"Supported: {supported_text()}"
    )


def _model_dtype(config: dict) -> tuple[str | None, str]:
    """The model's dtype (layoutc name) and where it came from; (None, why) if unreadable."""
    for key in ("torch_dtype", "dtype"):
        v = config.get(key)
        if v is None:
            continue
        try:
            return dtype_name(v, f"config '{key}'"), f'config: {key} = "{v}"'
        except UsageError as e:
            return None, str(e)
    return "bf16", "default: bf16 (the config names no torch_dtype/dtype)"


def _head_dim(cfg: _Config, keys=("head_dim",)) -> tuple[int | None, str]:
    for k in keys:
        if cfg.has(k):
            v, _ = cfg.int(k)
            return v, f"config: {k}"
    hidden, _ = cfg.int("hidden_size", required=False)
    heads, _ = cfg.int("num_attention_heads", required=False)
    if hidden is None or heads is None:
        cfg.missing.append(f"{' or '.join(keys)} (or hidden_size and num_attention_heads)")
        return None, ""
    if hidden % heads:
        cfg.bad.append(
            f"no {keys[0]} and hidden_size {hidden} is not divisible by num_attention_heads {heads}"
        )
        return None, ""
    return hidden // heads, f"derived: hidden_size / num_attention_heads = {hidden} / {heads}"


def _kv_heads(cfg: _Config) -> tuple[int | None, str]:
    if cfg.has("num_key_value_heads"):
        v, _ = cfg.int("num_key_value_heads")
        return v, "config: num_key_value_heads"
    v, k = cfg.int("num_attention_heads", required=False)
    if k is None:
        cfg.missing.append("num_key_value_heads (or num_attention_heads)")
        return None, ""
    return v, "config: num_attention_heads (no num_key_value_heads: multi-head attention)"


def _attention_bindings(
    cfg: _Config,
    kv_dtype: tuple[str, str],
    layers_key: str | None,
    layers: tuple[int | None, str] | None,
) -> list[_Binding]:
    kv, kv_src = _kv_heads(cfg)
    hd, hd_src = _head_dim(cfg, ("head_dim", "attention_head_dim"))
    out = [_Binding("num_key_value_heads", kv, kv_src), _Binding("head_dim", hd, hd_src)]
    if layers_key is not None:
        n, k = cfg.int("num_hidden_layers")
        out.append(_Binding(layers_key, n, "config: num_hidden_layers"))
    elif layers is not None:
        out.append(_Binding("num_attention_layers", layers[0], layers[1]))
    out.append(_Binding("kv_dtype", kv_dtype[0], kv_dtype[1]))
    return out


def _mla_bindings(cfg: _Config, kv_dtype: tuple[str, str]) -> tuple[list[_Binding], list[str]]:
    rank, _ = cfg.int("kv_lora_rank")
    rope, _ = cfg.int("qk_rope_head_dim")
    n, _ = cfg.int("num_hidden_layers")
    notes = []
    mtp = cfg.c.get("num_nextn_predict_layers")
    if isinstance(mtp, int) and mtp > 0:
        notes.append(
            f"num_nextn_predict_layers = {mtp}: the MTP layer(s) are not counted in num_layers; "
            "vLLM gives them a cache only when they run as a speculative draft"
        )
    return [
        _Binding("kv_lora_rank", rank, "config: kv_lora_rank"),
        _Binding("qk_rope_head_dim", rope, "config: qk_rope_head_dim"),
        _Binding("num_layers", n, "config: num_hidden_layers"),
        _Binding("kv_dtype", kv_dtype[0], kv_dtype[1]),
    ], notes


def _listed_kinds(cfg: _Config, keys: tuple[str, ...]) -> tuple[list[str] | None, str | None]:
    """Per-layer kinds from the first of `keys` the config has (a list of layer-type words)."""
    for key in keys:
        seq = cfg.c.get(key)
        if seq is None:
            continue
        if not isinstance(seq, list) or not seq or not all(isinstance(x, str) for x in seq):
            cfg.bad.append(f"'{key}' must be a non-empty list of layer-type names, got {seq!r}")
            return None, key
        unknown = sorted({x for x in seq if x.lower() not in LAYER_WORDS})
        if unknown:
            cfg.bad.append(
                f"'{key}' has unknown layer type(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(LAYER_WORDS))})"
            )
            return None, key
        return [LAYER_WORDS[x.lower()] for x in seq], key
    return None, None


def _layer_kinds(cfg: _Config, kind: str) -> tuple[list[str] | None, str]:
    """Per-layer kinds ('attention', 'mamba', 'linear_attention', 'parallel', 'mlp', 'moe'),
    in the config's order, and where they came from."""
    c = cfg.c
    n, _ = cfg.int("num_hidden_layers", required=kind == PARALLEL)
    if n is not None and n > MAX_LAYERS:
        cfg.bad.append(f"num_hidden_layers {n} is more than {MAX_LAYERS}")
        return None, ""
    if kind == PARALLEL:  # Falcon-H1: attention and Mamba2 side by side in every layer
        return (None if n is None else ["parallel"] * n), "num_hidden_layers"
    if kind == HYBRID and c.get("hybrid_override_pattern") is not None:
        pat = c["hybrid_override_pattern"]
        if not isinstance(pat, str) or not pat:
            cfg.bad.append(f"'hybrid_override_pattern' must be a non-empty string, got {pat!r}")
            return None, ""
        unknown = sorted(set(pat) - set(PATTERN_KINDS))
        if unknown:
            cfg.bad.append(
                f"'hybrid_override_pattern' has unknown layer character(s) "
                f"{', '.join(repr(u) for u in unknown)} (known: 'M' mamba, '*' attention, "
                "'-' MLP, 'E' MoE)"
            )
            return None, ""
        return [PATTERN_KINDS[ch] for ch in pat], "hybrid_override_pattern"
    kinds, key = _listed_kinds(cfg, ("layers_block_type", "layer_types"))
    if key is not None:
        return kinds, key
    if kind == GDN and n is not None:
        # transformers' Qwen3-Next / Qwen3.5 default: every `full_attention_interval`-th layer
        interval, _ = cfg.int("full_attention_interval")
        if interval is None:
            return None, ""
        out = ["attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
        return out, f"full_attention_interval = {interval}"
    if kind == MAMBA1 and n is not None:
        # transformers' Jamba: layer i is attention when i % attn_layer_period == offset
        period, _ = cfg.int("attn_layer_period")
        offset = cfg.c.get("attn_layer_offset")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            cfg.bad.append(f"'attn_layer_offset' must be an integer >= 0, got {offset!r}")
            return None, ""
        if period is None:
            return None, ""
        out = ["attention" if i % period == offset else "mamba" for i in range(n)]
        return out, f"attn_layer_period = {period}, attn_layer_offset = {offset}"
    keys = {
        HYBRID: "hybrid_override_pattern (or layers_block_type / layer_types)",
        GDN: "layer_types (or num_hidden_layers and full_attention_interval)",
        MAMBA1: "layers_block_type (or num_hidden_layers, attn_layer_period, attn_layer_offset)",
    }
    cfg.missing.append(keys[kind])
    return None, ""


#: One character per layer kind in the layer order written into a spec's header.
ORDER_CHARS = {
    "attention": "*",
    "mamba": "M",
    "linear_attention": "L",
    "parallel": "P",
    "mlp": "-",
    "moe": "E",
}
ORDER_WORDS = {
    "attention": "attention",
    "mamba": "Mamba",
    "linear_attention": "gated DeltaNet",
    "parallel": "attention and Mamba2",
    "mlp": "MLP",
    "moe": "MoE",
}


def _order_text(kinds: list[str], key: str) -> str:
    """The layer order, one character per layer (a repeated unit is written once)."""
    chars = "".join(ORDER_CHARS[k] for k in kinds)
    unit = next(
        chars[:n]
        for n in range(1, len(chars) + 1)
        if len(chars) % n == 0 and chars[:n] * (len(chars) // n) == chars
    )
    shown = chars if unit == chars else f"({unit}) x {len(chars) // len(unit)}"
    legend = ", ".join(f"{ORDER_CHARS[k]} {ORDER_WORDS[k]}" for k in ORDER_CHARS if k in set(kinds))
    return f"layer order ({key}, {len(kinds)} layers): {shown} ({legend})"


def _hybrid_layers(
    cfg: _Config, kind: str, other: str, other_text: str
) -> tuple[int | None, int | None, str, list[str]]:
    """Attention layers, `other`-kind layers, where they came from, and header notes."""
    kinds, key = _layer_kinds(cfg, kind)
    if kinds is None:
        return None, None, key, []
    n_attn = sum(k in ("attention", "parallel") for k in kinds)
    n_other = sum(k in (other, "parallel") for k in kinds)
    n_layers, _ = cfg.int("num_hidden_layers", required=False)
    if n_layers is not None and n_layers != len(kinds):
        cfg.bad.append(f"num_hidden_layers is {n_layers} but '{key}' describes {len(kinds)} layers")
    if n_attn == 0 or n_other == 0:
        cfg.bad.append(
            f"'{key}' has {n_attn} attention and {n_other} {other_text} layers; the hybrid "
            "family needs at least one of each"
        )
    rest = len(kinds) - sum(k in ("attention", other, "parallel") for k in kinds)
    if kind == PARALLEL:
        count = f"{len(kinds)} layers, each with attention and Mamba2"
    else:
        count = f"{len(kinds)} layers = {n_attn} attention + {n_other} {other_text}"
        count += f" + {rest} MLP/MoE (no cache)" if rest else ""
    notes = [f"{key}: {count}", _order_text(kinds, key)]
    return n_attn, n_other, key, notes


def _state_dtype(
    cfg: _Config, name: str, conv_dtype: tuple[str, str], keys: tuple[str, ...]
) -> _Binding:
    """The recurrent/SSM state dtype: the config's (vLLM's mamba_ssm_cache_dtype), NemotronH's
    fp32 default, else vLLM's 'auto' (the conv state dtype)."""
    for key in keys:
        v = cfg.c.get(key)
        if v is None:
            continue
        try:
            return _Binding(name, dtype_name(v, f"config '{key}'"), f'config: {key} = "{v}"')
        except UsageError as e:
            cfg.bad.append(str(e))
            return _Binding(name, conv_dtype[0], "")
    if cfg.arch == "NemotronHForCausalLM":
        return _Binding(
            name,
            "fp32",
            "default: fp32, vLLM's NemotronH config hook when the config names no "
            "mamba_ssm_cache_dtype (uncertain; check the engine's --mamba-ssm-cache-dtype)",
        )
    return _Binding(
        name,
        conv_dtype[0],
        "default: vLLM's mamba_ssm_cache_dtype 'auto' = the conv state dtype "
        "(check the engine's --mamba-ssm-cache-dtype)",
    )


def _conv_dtype(model_dtype: tuple[str, str]) -> _Binding:
    return _Binding(
        "conv_dtype",
        model_dtype[0],
        f"{model_dtype[1]} (vLLM's mamba_cache_dtype 'auto' = the model dtype; not --kv-dtype)",
    )


def _hybrid_bindings(
    cfg: _Config, kind: str, kv_dtype: tuple[str, str], model_dtype: tuple[str, str]
) -> tuple[list[_Binding], list[str]]:
    """Hybrid attention + Mamba2 (Nemotron-H, Granite-4.0-H) and Falcon-H1."""
    n_attn, n_mamba, key, notes = _hybrid_layers(cfg, kind, "mamba", "Mamba2")
    where = "every layer: " if kind == PARALLEL else "count of attention layers in "
    layers = (n_attn, f"derived: {where}{key}")
    out = _attention_bindings(cfg, kv_dtype, None, layers)
    heads, hk = cfg.int("mamba_num_heads", "mamba_n_heads")
    hdim, hdk = None, None
    if cfg.c.get("mamba_d_head") == "auto" and not cfg.has("mamba_head_dim"):
        # Granite-4.0-H: d_head "auto" = expand * hidden_size / mamba_n_heads
        expand, _ = cfg.int("mamba_expand", "expand")
        hidden, _ = cfg.int("hidden_size")
        if expand is not None and hidden is not None and heads is not None:
            if (expand * hidden) % heads:
                cfg.bad.append(
                    f"mamba_expand * hidden_size = {expand * hidden} is not divisible by {hk} {heads}"
                )
            else:
                hdim = expand * hidden // heads
                hdk = f"derived: mamba_expand * hidden_size / {hk} = {expand} * {hidden} / {heads}"
    else:
        hdim, k = cfg.int("mamba_head_dim", "mamba_d_head")
        hdk = f"config: {k}"
    if heads is not None and hdim is not None:
        _check_inner(cfg, heads * hdim, f"heads x head dim ({heads} x {hdim})")
    groups, gk = cfg.int("n_groups", "mamba_n_groups")
    state, sk = cfg.int("ssm_state_size", "mamba_d_state")
    if cfg.has("conv_kernel") or cfg.has("mamba_d_conv"):
        conv, ck = cfg.int("conv_kernel", "mamba_d_conv")
        conv_src = f"config: {ck}"
    else:
        conv, conv_src = 4, "default: 4 (the config names no conv_kernel / mamba_d_conv)"
    where = "every layer: " if kind == PARALLEL else "count of Mamba2 layers in "
    out[3:3] = [_Binding("num_mamba_layers", n_mamba, f"derived: {where}{key}")]
    conv_dtype = _conv_dtype(model_dtype)
    out += [
        _Binding("mamba_num_heads", heads, f"config: {hk}"),
        _Binding("mamba_head_dim", hdim, hdk or ""),
        _Binding("n_groups", groups, f"config: {gk}"),
        _Binding("ssm_state_size", state, f"config: {sk}"),
        _Binding("conv_kernel", conv, conv_src),
        _Binding("num_speculative_tokens", 0, "default: no speculative decoding (adds conv rows)"),
        conv_dtype,
        _state_dtype(
            cfg, "ssm_dtype", (model_dtype[0], ""), ("mamba_ssm_cache_dtype", "mamba_ssm_dtype")
        ),
    ]
    return out, notes


def _check_inner(cfg: _Config, inner: int, what: str) -> None:
    """vLLM sizes the Mamba2 x columns from the intermediate size (`mamba_d_ssm`, else
    `mamba_expand * hidden_size`) and the SSM state from heads x head dim: they must agree."""
    if cfg.has("mamba_d_ssm"):
        d_ssm, _ = cfg.int("mamba_d_ssm")
        if d_ssm is not None and d_ssm != inner:
            cfg.bad.append(f"mamba_d_ssm is {d_ssm} but {what} is {inner}")
        return
    expand, hidden = cfg.c.get("mamba_expand"), cfg.c.get("hidden_size")
    if isinstance(expand, int) and isinstance(hidden, int) and expand * hidden != inner:
        if cfg.arch in ("FalconH1ForCausalLM", "GraniteMoeHybridForCausalLM"):
            cfg.bad.append(f"mamba_expand * hidden_size is {expand * hidden} but {what} is {inner}")


def _gdn_bindings(
    cfg: _Config, kv_dtype: tuple[str, str], model_dtype: tuple[str, str]
) -> tuple[list[_Binding], list[str]]:
    """Hybrid attention + gated DeltaNet (Qwen3-Next, Qwen3.5)."""
    n_attn, n_lin, key, notes = _hybrid_layers(cfg, GDN, "linear_attention", "gated DeltaNet")
    out = _attention_bindings(
        cfg, kv_dtype, None, (n_attn, f"derived: count of attention layers in {key}")
    )
    out[3:3] = [
        _Binding(
            "num_linear_attention_layers",
            n_lin,
            f"derived: count of linear_attention layers in {key}",
        )
    ]
    for name in (
        "linear_num_key_heads",
        "linear_num_value_heads",
        "linear_key_head_dim",
        "linear_value_head_dim",
    ):
        v, _ = cfg.int(name)
        out.append(_Binding(name, v, f"config: {name}"))
    if cfg.has("linear_conv_kernel_dim"):
        conv, _ = cfg.int("linear_conv_kernel_dim")
        out.append(_Binding("linear_conv_kernel_dim", conv, "config: linear_conv_kernel_dim"))
    else:
        out.append(
            _Binding(
                "linear_conv_kernel_dim",
                4,
                "default: 4 (the config names no linear_conv_kernel_dim)",
            )
        )
    conv_dtype = _conv_dtype(model_dtype)
    out += [
        _Binding("num_speculative_tokens", 0, "default: no speculative decoding (adds conv rows)"),
        conv_dtype,
        _state_dtype(
            cfg,
            "recurrent_dtype",
            (model_dtype[0], ""),
            ("mamba_ssm_cache_dtype", "mamba_ssm_dtype"),
        ),
    ]
    return out, notes


def _mamba1_bindings(
    cfg: _Config, kv_dtype: tuple[str, str], model_dtype: tuple[str, str]
) -> tuple[list[_Binding], list[str]]:
    """Hybrid attention + Mamba1 (Jamba)."""
    n_attn, n_mamba, key, notes = _hybrid_layers(cfg, MAMBA1, "mamba", "Mamba1")
    out = _attention_bindings(
        cfg, kv_dtype, None, (n_attn, f"derived: count of attention layers in {key}")
    )
    out[3:3] = [_Binding("num_mamba_layers", n_mamba, f"derived: count of Mamba1 layers in {key}")]
    expand, _ = cfg.int("mamba_expand")
    hidden, _ = cfg.int("hidden_size")
    inner = None if expand is None or hidden is None else expand * hidden
    state, sk = cfg.int("mamba_d_state", "ssm_state_size")
    if cfg.has("mamba_d_conv"):
        conv, _ = cfg.int("mamba_d_conv")
        conv_src = "config: mamba_d_conv"
    else:
        conv, conv_src = 4, "default: 4 (the config names no mamba_d_conv)"
    conv_dtype = _conv_dtype(model_dtype)
    out += [
        _Binding(
            "mamba_intermediate_size",
            inner,
            f"derived: mamba_expand * hidden_size = {expand} * {hidden}",
        ),
        _Binding("ssm_state_size", state, f"config: {sk}"),
        _Binding("conv_kernel", conv, conv_src),
        conv_dtype,
        _state_dtype(cfg, "ssm_dtype", (model_dtype[0], ""), ("mamba_ssm_cache_dtype",)),
    ]
    return out, notes


# --- text -------------------------------------------------------------------------------------


def _fmt_value(v: int | str | None) -> str:
    return f"{v:_}" if isinstance(v, int) and v >= 100_000 else str(v)


def _render(family: str, header: list[str], bindings: list[_Binding]) -> str:
    lines = [("# " + h).rstrip() if h else "#" for h in header]
    lines.append("")
    lines.append(f'use "{family}" {{')
    wn = max(len(b.name) for b in bindings)
    wv = max(len(_fmt_value(b.value)) for b in bindings)
    lead = 2 + wn + 3 + wv + 2
    for b in bindings:
        comment = _wrap(b.source, max(40, 100 - lead - 2), indent="  ")
        lines.append(f"  {b.name:<{wn}} = {_fmt_value(b.value):<{wv}}  # {comment[0]}".rstrip())
        lines += [" " * lead + "# " + c for c in comment[1:]]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int = 94, indent: str = "") -> list[str]:
    """Wrap at spaces, never inside `a / b`-style arithmetic."""
    import textwrap

    nbsp = "\u00a0"
    glued = re.sub(r" ([*/+]) ", lambda m: f"{nbsp}{m.group(1)}{nbsp}", text)
    lines = textwrap.wrap(glued, width, subsequent_indent=indent, break_on_hyphens=False)
    return [ln.replace(nbsp, " ") for ln in lines] or [""]


def _load(c, text: str):
    """Load and bind spec text with compiler `c` (family specs from the built-in path only)."""
    from .pipeline import BUILTIN, SideSets

    unit = c.load(f"{BUILTIN}/init/model.layout", text.encode())
    p, _ = c.bind(unit, SideSets())
    return p


def _ranked(bound, tp: int):
    from .passes.shapes import rank

    sink = Sink()
    return rank(bound, tp, sink)


def init_from_hf(
    config: dict,
    *,
    engine: str = "vllm",
    block_size: int | None = None,
    kv_dtype: str | None = None,
    source_name: str = "config.json",
    attention_backend: str = "flashinfer",
) -> str:
    """The text of a model spec for a Hugging Face `config` (the parsed config.json).

    Raises InitError for configs it cannot describe (exit 1 in the CLI) and UsageError for bad
    options (exit 2).
    """
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine}: unknown engine (engines: {', '.join(ENGINES)})")
    if attention_backend not in ATTENTION_BACKENDS:
        raise UsageError(
            f"--attention-backend {attention_backend}: unknown backend "
            f"(backends: {', '.join(ATTENTION_BACKENDS)})"
        )
    if block_size is not None and (isinstance(block_size, bool) or block_size <= 0):
        raise UsageError(f"--block-size {block_size}: must be a positive integer")
    if not isinstance(config, dict):
        raise InitError(f"the config must be a JSON object, got {type(config).__name__}")

    config, unwrapped = _unwrap_text_config(config)
    arch = _architecture(config)
    kind = ARCHITECTURES[arch]
    cfg = _Config(config, arch)
    model_dtype = _model_dtype(config)
    if kv_dtype is not None:
        kvd = (dtype_name(kv_dtype, "--kv-dtype"), f"command line: --kv-dtype {kv_dtype}")
    elif model_dtype[0] is None:
        raise InitError(
            f"{arch} config: {model_dtype[1]}; pass --kv-dtype to choose the cache dtype"
        )
    else:
        kvd = (model_dtype[0], model_dtype[1])
    if kind in HYBRIDS and model_dtype[0] is None:
        raise InitError(
            f"{arch} config: {model_dtype[1]}; the Mamba conv state is kept in the model dtype, "
            "so init needs one it knows (bfloat16, float16, float32)"
        )
    notes: list[str] = [unwrapped] if unwrapped else []
    family = FAMILIES.get(kind, "")
    mdt = (model_dtype[0] or "bf16", model_dtype[1])  # known for every kind that reads it
    if kind == GQA:
        family = (
            "vllm_flashinfer.layout"
            if attention_backend == "flashinfer"
            else "vllm_flash_attn.layout"
        )
        bindings = _attention_bindings(cfg, kvd, "num_layers", None)
    elif kind == MLA:
        bindings, more = _mla_bindings(cfg, kvd)
    elif kind == GDN:
        bindings, more = _gdn_bindings(cfg, kvd, mdt)
    elif kind == MAMBA1:
        bindings, more = _mamba1_bindings(cfg, kvd, mdt)
    else:
        bindings, more = _hybrid_bindings(cfg, kind, kvd, mdt)
    if kind != GQA:
        notes += more
    cfg.fail_if_any()

    if block_size is not None:
        bs = _Binding("block_size", block_size, f"command line: --block-size {block_size}")
    elif kind == MLA:
        bs = _Binding(
            "block_size",
            64,
            "default: 64, what vLLM forces for FlashMLA (Hopper); "
            "CUTLASS MLA (Blackwell) uses 128 (init --block-size to match)",
        )
    else:
        bs = _Binding(
            "block_size",
            16,
            "default: vLLM's 16-token kernel block (init --block-size to match the engine)",
        )
    # Block geometry first: the grammar lexes `kernel_blocks` as its keyword after an
    # expression, so a `kernel_blocks = N` binding must open the `use` block.
    kb = _Binding("kernel_blocks", 1, "default: one kernel block per scheduler block")
    bindings[:0] = [kb, bs] if kind in HYBRIDS else [bs]

    # Check the text with the compiler; for hybrids, size the logical block from the ranked pages.
    from .pipeline import Compiler

    c = Compiler()
    text = _render(family, [], bindings)
    try:
        bound = _load(c, text)
        ranked = {tp: _ranked(bound, tp) for tp in TP_SIZES}
        ok_tps = [tp for tp, r in ranked.items() if r is not None]
        if kind in HYBRIDS and ok_tps:
            other = "linear_attention" if kind == GDN else "mamba"
            need = {}
            for tp in ok_tps:
                r = ranked[tp]
                assert r is not None
                attn, state = r.page("attention").nbytes, r.page(other).nbytes
                need[tp] = (-(-state // attn), state, attn)
            worst = max(ok_tps, key=lambda t: (need[t][0], -t))
            blocks, state, attn = need[worst]
            kb.value = blocks
            tokens = blocks * int(bs.value or 1)
            what = "gated DeltaNet" if kind == GDN else "Mamba"
            kb.source = (
                f"derived: a {tokens}-token logical block, the smallest whose attention pages "
                f"hold one {what} page at TP {', '.join(map(str, ok_tps))} (TP {worst}: "
                f"ceil({state} / {attn})); run vLLM with --block-size {tokens} on both engines"
            )
            _load(c, _render(family, [], bindings))
    except LayoutError as e:  # the values bound do not fit the family spec
        from .diagnostics import render

        raise InitError(
            f"{arch} config: the values do not make a valid {family} spec:\n"
            + render(e, c.sources, "gcc")
        ) from None

    source_name = _printable(source_name)
    name = config.get("_name_or_path")
    if not (isinstance(name, str) and _HUB_ID.fullmatch(name)):
        name = None  # a local path (never written into the spec) or nothing
    title = name.rsplit("/", 1)[-1] if name else _stem(source_name)
    command = f"layoutc init --from-hf {source_name}"
    if block_size is not None:
        command += f" --block-size {block_size}"
    if kv_dtype is not None:
        command += f" --kv-dtype {kv_dtype}"
    if attention_backend != "flashinfer":
        command += f" --attention-backend {attention_backend}"
    header = _wrap(f"{title}: the vLLM cache of {arch} ({kind}).")
    header += [""]
    header += _wrap(
        f"Generated by `{command}`"
        + (f" from the Hugging Face config of {name}" if name else "")
        + ". Regenerate it rather than edit it; any value can still be overridden at compile "
        "time (`layoutc compile SPEC -o OUT --set block_size=32`)."
    )
    header += [""]
    header += _wrap(_family_text(family, kind, attention_backend))
    header += [""]
    heads = config.get("num_attention_heads")
    if ok_tps:
        tp_text = (
            f"TP sizes the cache shapes allow (of {', '.join(map(str, TP_SIZES))}): "
            f"{', '.join(map(str, ok_tps))}."
        )
    else:
        tp_text = f"No TP size of {', '.join(map(str, TP_SIZES))} fits the cache shapes."
    if isinstance(heads, int) and heads > 0 and kind != MLA:
        vllm_tps = [tp for tp in ok_tps if heads % tp == 0]
        if vllm_tps != ok_tps:
            tp_text += (
                f" vLLM itself also needs num_attention_heads ({heads}) divisible by TP: "
                f"{', '.join(map(str, vllm_tps)) or 'none of them'}."
            )
    header += _wrap(tp_text)
    for n in notes:
        header += _wrap(f"Note: {n}.", indent="  ")
    extra = config.get("_layoutc_notes")
    if isinstance(extra, list):
        for n in extra:
            header += _wrap(f"Note (config): {_printable(str(n))}", indent="  ")
    return _render(family, header, bindings)


#: A Hub repository id (`org/name`), the only `_name_or_path` written into a spec.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _printable(text: str) -> str:
    """One comment line's worth of text: control characters (newlines) become spaces."""
    return "".join(ch if ch.isprintable() else " " for ch in text)


def _stem(path: str) -> str:
    base = os.path.basename(path)
    return base[:-5] if base.endswith(".json") else base


def _family_text(family: str, kind: str, backend: str) -> str:
    if family == "vllm_flashinfer.layout":
        return (
            "Family vllm_flashinfer.layout: blocks-first pages, K then V, each [head][token][dim] "
            "(HND), one state `kv`. It is the layout of vLLM's FlashInfer backend and of every "
            "backend under the hybrid KV cache manager; for FlashAttention's separate K and V "
            "buffers regenerate with --attention-backend flash_attn (states `k`, `v`)."
        )
    if family == "vllm_flash_attn.layout":
        return (
            "Family vllm_flash_attn.layout: separate K and V buffers per layer, each page "
            "[head][token][dim] (HND), states `k` and `v` (vLLM's FlashAttention backend)."
        )
    if family == "vllm_mla.layout":
        text = (
            "Family vllm_mla.layout: one latent vector (kv_lora_rank + qk_rope_head_dim) per "
            "token, replicated on every rank, state `latent`."
        )
    elif family == "vllm_hybrid_gdn.layout":
        text = (
            "Family vllm_hybrid_gdn.layout: attention layers keep a blocks-first K|V page (`kv`) "
            "per kernel block; gated DeltaNet layers keep conv (DS layout, q|k|v) then recurrent "
            "state (`conv`, `recurrent`) once per logical block; both share one page stride. "
            "vLLM needs VLLM_SSM_CONV_STATE_LAYOUT=DS on both engines."
        )
    elif family == "vllm_hybrid_mamba1.layout":
        text = (
            "Family vllm_hybrid_mamba1.layout: attention layers keep a blocks-first K|V page "
            "(`kv`) per kernel block; Mamba1 layers keep conv (DS layout, x only) then SSM state "
            "(`conv`, `ssm`) once per logical block; both share one page stride. vLLM needs "
            "VLLM_SSM_CONV_STATE_LAYOUT=DS on both engines."
        )
    else:
        text = (
            "Family vllm_hybrid_mamba2.layout: attention layers keep a blocks-first K|V page "
            "(`kv`) per kernel block; Mamba2 layers keep conv (DS layout, x|B|C) then SSM state "
            "(`conv`, `ssm`) once per logical block; both share one page stride. vLLM needs "
            "VLLM_SSM_CONV_STATE_LAYOUT=DS on both engines."
        )
        if kind == PARALLEL:
            text += (
                " Every layer has both an attention and a Mamba2 mixer; vLLM keeps their caches "
                "as two layers, so both counts are num_hidden_layers."
            )
    if backend != "flashinfer":
        text += f" (--attention-backend {backend} does not change this layout.)"
    return text


#: Deeper JSON than this is not a model config (and would exhaust the parser's stack).
MAX_JSON_DEPTH = 64


def _too_deep(text: str, limit: int) -> tuple[int, int] | None:
    """(line, column) where `text`'s arrays/objects first nest deeper than `limit`, or None."""
    depth, i, n, in_str = 0, 0, len(text), False
    while i < n:
        c = text[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "[{":
            depth += 1
            if depth > limit:
                line = text.count("\n", 0, i) + 1
                return line, i - (text.rfind("\n", 0, i) + 1) + 1
        elif c in "]}":
            depth -= 1
        i += 1
    return None


def read_config(path: str) -> dict:
    """Parse a config.json; InitError with line and column for bad JSON."""
    import json

    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InitError(f"{path}: not UTF-8 text (byte {e.start})") from None
    deep = _too_deep(text, MAX_JSON_DEPTH)
    if deep is not None:
        raise InitError(
            f"{path}:{deep[0]}:{deep[1]}: JSON nested more than {MAX_JSON_DEPTH} deep; "
            "a config.json is a few levels deep"
        )
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise InitError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except RecursionError:  # pragma: no cover - _too_deep stops such input first
        raise InitError(f"{path}: JSON nested too deeply") from None
    if not isinstance(config, dict):
        raise InitError(f"{path}: a config.json holds a JSON object, got {type(config).__name__}")
    return config


__all__ = ["ARCHITECTURES", "InitError", "dtype_name", "init_from_hf", "read_config"]
