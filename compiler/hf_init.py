"""`layoutc init --from-hf`: a model spec from a Hugging Face `config.json`.

A model spec is one `use "family.layout" { name = value ... }` of a family spec in `specs/`
with the model's values bound, each commented with where it came from: a config key, a
derivation (`derived: hidden_size / num_attention_heads`), or a default.  The family is chosen
by the config's architecture:

* grouped-query / multi-head attention (Llama, Mistral, Qwen2/3, ...): `vllm_flashinfer.layout`
  (blocks-first K|V page), or `vllm_flash_attn.layout` with `attention_backend="flash_attn"`;
* MLA (DeepSeek-V2/V3): `vllm_mla.layout`;
* hybrid attention + Mamba2 (Nemotron-H, Granite-4.0-H): `vllm_hybrid_mamba2.layout`, the
  layer kinds counted from the config's layer pattern.

Every value can still be overridden at compile time with `--set NAME=VALUE`.  The text is
checked by loading it with the compiler before it is returned, so `init` never writes a spec
that does not compile.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .bind import UsageError
from .diagnostics import LayoutError, Sink

ENGINES = ("vllm",)
ATTENTION_BACKENDS = ("flashinfer", "flash_attn")

GQA, MLA, HYBRID = "grouped-query attention", "MLA", "hybrid attention + Mamba2"

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
}

#: Architectures we know but cannot describe yet, and why (named in the error).
NOT_YET = {
    "Qwen3NextForCausalLM": "gated DeltaNet layers (conv Q|K|V + recurrent state) have no family spec yet",
    "Qwen3_5ForCausalLM": "gated DeltaNet layers (conv Q|K|V + recurrent state) have no family spec yet",
    "Qwen3_5MoeForCausalLM": "gated DeltaNet layers (conv Q|K|V + recurrent state) have no family spec yet",
    "JambaForCausalLM": "Mamba1 layers have no family spec yet",
    "MambaForCausalLM": "Mamba1 layers have no family spec yet",
    "FalconMambaForCausalLM": "Mamba1 layers have no family spec yet",
    "Mamba2ForCausalLM": "a pure Mamba2 model has no attention layers; the hybrid family needs both kinds",
    "FalconH1ForCausalLM": "parallel hybrid (attention and Mamba2 in every layer) has no family spec yet",
    "DeepseekV32ForCausalLM": "the sparse-attention indexer cache next to the MLA latent has no family spec yet",
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
    "mlp": "mlp",
    "moe": "moe",
}


class InitError(Exception):
    """The config cannot be turned into a spec (unknown architecture, missing or bad keys)."""


@dataclass
class _Binding:
    name: str
    value: int | str
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
            parts.append(f"missing key(s): {', '.join(self.missing)}")
        if self.bad:
            parts.append("; ".join(self.bad))
        if parts:
            raise InitError(f"{self.arch} config: " + "; ".join(parts))


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


def _layer_kinds(cfg: _Config) -> tuple[list[str] | None, str]:
    """Per-layer kinds ('attention', 'mamba', 'mlp', 'moe') and the key they came from."""
    c = cfg.c
    if c.get("hybrid_override_pattern") is not None:
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
    for key in ("layers_block_type", "layer_types"):
        seq = c.get(key)
        if seq is None:
            continue
        if not isinstance(seq, list) or not seq or not all(isinstance(s, str) for s in seq):
            cfg.bad.append(f"'{key}' must be a non-empty list of layer-type names, got {seq!r}")
            return None, ""
        unknown = sorted({s for s in seq if s.lower() not in LAYER_WORDS})
        if unknown:
            cfg.bad.append(
                f"'{key}' has unknown layer type(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(LAYER_WORDS))})"
            )
            return None, ""
        return [LAYER_WORDS[s.lower()] for s in seq], key
    cfg.missing.append("hybrid_override_pattern (or layers_block_type / layer_types)")
    return None, ""


# --- the three kinds ---------------------------------------------------------------------------


def _attention_bindings(
    cfg: _Config, kv_dtype: tuple[str, str], layers_key: str | None, layers: tuple[int, str] | None
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


def _hybrid_bindings(
    cfg: _Config, kv_dtype: tuple[str, str], model_dtype: tuple[str, str]
) -> tuple[list[_Binding], list[str]]:
    kinds, kinds_key = _layer_kinds(cfg)
    n_attn = n_mamba = None
    notes: list[str] = []
    if kinds is not None:
        n_attn = kinds.count("attention")
        n_mamba = kinds.count("mamba")
        other = len(kinds) - n_attn - n_mamba
        n_layers, _ = cfg.int("num_hidden_layers", required=False)
        if n_layers is not None and n_layers != len(kinds):
            cfg.bad.append(
                f"num_hidden_layers is {n_layers} but '{kinds_key}' describes {len(kinds)} layers"
            )
        if n_attn == 0 or n_mamba == 0:
            cfg.bad.append(
                f"'{kinds_key}' has {n_attn} attention and {n_mamba} Mamba layers; the hybrid "
                "family needs at least one of each"
            )
        notes.append(
            f"{kinds_key}: {len(kinds)} layers = {n_attn} attention + {n_mamba} Mamba2 + "
            f"{other} MLP/MoE (no cache)"
        )
    layers = (n_attn, f"derived: count of attention layers in {kinds_key}")
    out = _attention_bindings(cfg, kv_dtype, None, layers)
    heads, hk = cfg.int("mamba_num_heads", "mamba_n_heads")
    hdim, hdk = None, None
    if cfg.c.get("mamba_d_head") == "auto" and not cfg.has("mamba_head_dim"):
        # Granite-4.0-H: d_head "auto" = expand * hidden_size / mamba_n_heads
        expand, _ = cfg.int("mamba_expand", "expand")
        hidden, _ = cfg.int("hidden_size")
        if None not in (expand, hidden, heads):
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
    groups, gk = cfg.int("n_groups", "mamba_n_groups")
    state, sk = cfg.int("ssm_state_size", "mamba_d_state")
    if cfg.has("conv_kernel") or cfg.has("mamba_d_conv"):
        conv, ck = cfg.int("conv_kernel", "mamba_d_conv")
        conv_src = f"config: {ck}"
    else:
        conv, conv_src = 4, "default: 4 (the config names no conv_kernel / mamba_d_conv)"
    out[3:3] = [
        _Binding("num_mamba_layers", n_mamba, f"derived: count of Mamba2 layers in {kinds_key}")
    ]
    out += [
        _Binding("mamba_num_heads", heads, f"config: {hk}"),
        _Binding("mamba_head_dim", hdim, hdk or ""),
        _Binding("n_groups", groups, f"config: {gk}"),
        _Binding("ssm_state_size", state, f"config: {sk}"),
        _Binding("conv_kernel", conv, conv_src),
        _Binding("num_speculative_tokens", 0, "default: no speculative decoding (adds conv rows)"),
        _Binding(
            "conv_dtype",
            model_dtype[0],
            f"{model_dtype[1]} (vLLM's mamba_cache_dtype 'auto' = the model dtype; not --kv-dtype)",
        ),
    ]
    ssm = cfg.c.get("mamba_ssm_cache_dtype")
    if ssm is not None:
        try:
            out.append(
                _Binding(
                    "ssm_dtype",
                    dtype_name(ssm, "config 'mamba_ssm_cache_dtype'"),
                    f'config: mamba_ssm_cache_dtype = "{ssm}"',
                )
            )
        except UsageError as e:
            cfg.bad.append(str(e))
    elif cfg.arch == "NemotronHForCausalLM":
        out.append(
            _Binding(
                "ssm_dtype",
                "fp32",
                "default: fp32, vLLM's NemotronH config hook when the config names no "
                "mamba_ssm_cache_dtype (uncertain; check the engine's --mamba-ssm-cache-dtype)",
            )
        )
    else:
        out.append(
            _Binding(
                "ssm_dtype",
                model_dtype[0],
                "default: vLLM's mamba_ssm_cache_dtype 'auto' = the conv state dtype "
                "(check the engine's --mamba-ssm-cache-dtype)",
            )
        )
    return out, notes


# --- text -------------------------------------------------------------------------------------


def _fmt_value(v: int | str) -> str:
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
        kvd = model_dtype
    if kind == HYBRID and model_dtype[0] is None:
        raise InitError(
            f"{arch} config: {model_dtype[1]}; the Mamba conv state is kept in the model dtype, "
            "so init needs one it knows (bfloat16, float16, float32)"
        )
    notes: list[str] = []
    if kind == GQA:
        family = (
            "vllm_flashinfer.layout"
            if attention_backend == "flashinfer"
            else "vllm_flash_attn.layout"
        )
        bindings = _attention_bindings(cfg, kvd, "num_layers", None)
    elif kind == MLA:
        family = "vllm_mla.layout"
        bindings, notes = _mla_bindings(cfg, kvd)
    else:
        family = "vllm_hybrid_mamba2.layout"
        bindings, notes = _hybrid_bindings(cfg, kvd, model_dtype)
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
    bindings[:0] = [kb, bs] if kind == HYBRID else [bs]

    # Check the text with the compiler; for hybrids, size the logical block from the ranked pages.
    from .pipeline import Compiler

    c = Compiler()
    text = _render(family, [], bindings)
    try:
        bound = _load(c, text)
        ranked = {tp: _ranked(bound, tp) for tp in TP_SIZES}
        ok_tps = [tp for tp, r in ranked.items() if r is not None]
        if kind == HYBRID and ok_tps:
            need = {}
            for tp in ok_tps:
                r = ranked[tp]
                attn, mamba = r.page("attention").nbytes, r.page("mamba").nbytes
                need[tp] = (-(-mamba // attn), mamba, attn)
            worst = max(ok_tps, key=lambda t: (need[t][0], -t))
            blocks, mamba, attn = need[worst]
            kb.value = blocks
            tokens = blocks * bs.value
            kb.source = (
                f"derived: a {tokens}-token logical block, the smallest whose attention pages "
                f"hold one Mamba page at TP {', '.join(map(str, ok_tps))} (TP {worst}: "
                f"ceil({mamba} / {attn})); run vLLM with --block-size {tokens} on both engines"
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
    else:
        text = (
            "Family vllm_hybrid_mamba2.layout: attention layers keep a blocks-first K|V page "
            "(`kv`) per kernel block; Mamba2 layers keep conv (DS layout, x|B|C) then SSM state "
            "(`conv`, `ssm`) once per logical block; both share one page stride. vLLM needs "
            "VLLM_SSM_CONV_STATE_LAYOUT=DS on both engines."
        )
    if backend != "flashinfer":
        text += f" (--attention-backend {backend} does not change this layout.)"
    return text


def read_config(path: str) -> dict:
    """Parse a config.json; InitError with line and column for bad JSON."""
    import json

    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InitError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise InitError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(config, dict):
        raise InitError(f"{path}: a config.json holds a JSON object, got {type(config).__name__}")
    return config


__all__ = ["ARCHITECTURES", "InitError", "dtype_name", "init_from_hf", "read_config"]
