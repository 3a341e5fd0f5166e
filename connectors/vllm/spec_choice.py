"""Which layout spec describes an engine's KV cache, and the values it is bound to.

:func:`choose_spec` maps an :class:`~.description.EngineLayout` to a built-in family spec (or
to the spec the user named in ``kv_connector_extra_config["layout_spec"]``) and computes this
side's parameter values from the description: sizes from vLLM's own cache specs where they
show (heads, head sizes, block sizes, dtypes, Mamba state shapes), the rest (total KV heads,
B/C groups, MLA and GDN dims) from the model config.  Needs no vLLM.

Built-in specs by device and model:

========================  ================================  ===============================
model                     CPU (``CPU_ATTN``)                GPU (vLLM 0.32, layout LBHNC)
========================  ================================  ===============================
attention                 ``vllm_cpu_attn``                 ``vllm_lbhnc``
MLA                       ``vllm_mla``                      ``vllm_mla``
hybrid Mamba2, DS conv    ``vllm_cpu_hybrid_mamba2``        ``vllm_lbhnc_hybrid_mamba2``
hybrid Mamba2, SD conv    ``vllm_cpu_hybrid_mamba2_sd``     ``vllm_lbhnc_hybrid_mamba2_sd``
hybrid GDN, DS / SD conv  (give ``layout_spec``)            ``vllm_lbhnc_hybrid_gdn[_sd]``
========================  ================================  ===============================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .description import EngineLayout, GroupLayout
from .errors import ConfigError

__all__ = ["SpecChoice", "choose_spec", "layer_kind"]

#: Spec layer kind of each vLLM group kind (Mamba-like groups by their ``mamba_type``).
_GDN_TYPES = ("gdn_attn", "gdn")


def layer_kind(group: GroupLayout) -> str:
    """The spec's layer kind that holds the layers of ``group``."""
    if group.kind in ("attention", "mla"):
        return "attention"
    if group.kind == "mamba":
        return "linear_attention" if group.mamba_type in _GDN_TYPES else "mamba"
    raise ConfigError(f"KV-cache group of kind {group.kind!r} cannot be transferred")


@dataclass(frozen=True)
class SpecChoice:
    """A spec (a built-in name or a path), this side's parameter values, and the spec's layer
    kind of every transfer group (in the description's group order)."""

    spec: str
    params: dict[str, Any]
    group_kinds: tuple[str, ...]
    conv_layout: str | None = None
    builtin: bool = True


def _attention_params(layout: EngineLayout, groups: list[GroupLayout]) -> dict[str, Any]:
    first = groups[0]
    for g in groups[1:]:
        same = (g.kernel_block_size, g.num_kv_heads, g.head_size, g.dtype)
        if same != (first.kernel_block_size, first.num_kv_heads, first.head_size, first.dtype):
            raise ConfigError(
                f"attention groups differ in (kernel block, heads, head size, dtype): "
                f"{same} vs {(first.kernel_block_size, first.num_kv_heads, first.head_size, first.dtype)}"
            )
    if first.kind == "attention" and first.head_size_v not in (0, first.head_size):
        raise ConfigError(
            f"attention with a V head size ({first.head_size_v}) other than the K head size "
            f"({first.head_size}) has no built-in spec; give kv_connector_extra_config"
            f"['layout_spec']"
        )
    heads = layout.model.get("num_key_value_heads")
    if first.kind == "attention" and not isinstance(heads, int):
        raise ConfigError("the model config gives no num_key_value_heads")
    n_layers = sum(len(g.layer_names) for g in groups)
    out: dict[str, Any] = {
        "block_size": first.kernel_block_size,
        "kernel_blocks": first.kernel_blocks,
        "kv_dtype": first.dtype,
        "num_layers": n_layers,
        "num_attention_layers": n_layers,
    }
    if first.kind == "attention":
        out.update(num_key_value_heads=heads, head_dim=first.head_size)
    return out


def _mla_params(layout: EngineLayout, group: GroupLayout) -> dict[str, Any]:
    lora, rope = layout.model.get("kv_lora_rank"), layout.model.get("qk_rope_head_dim")
    if not isinstance(lora, int) or not isinstance(rope, int):
        raise ConfigError("an MLA model's config must give kv_lora_rank and qk_rope_head_dim")
    if lora + rope != group.head_size:
        raise ConfigError(
            f"MLA latent of kv_lora_rank {lora} + qk_rope_head_dim {rope} = {lora + rope} but "
            f"vLLM's cache holds {group.head_size} per token"
        )
    return {"kv_lora_rank": lora, "qk_rope_head_dim": rope}


def _shape(group: GroupLayout, i: int, ndim: int, what: str) -> tuple[int, ...]:
    if len(group.shapes) <= i or len(group.shapes[i]) != ndim:
        raise ConfigError(
            f"{group.mamba_type} state shapes {group.shapes}: expected a {ndim}-d {what} "
            f"as state {i}"
        )
    return group.shapes[i]


def _conv_rows(group: GroupLayout, conv_layout: str | None) -> int:
    conv = _shape(group, 0, 2, "conv state")
    if conv_layout == "DS":
        return conv[1]
    if conv_layout == "SD":
        return conv[0]
    raise ConfigError(f"unknown conv state layout {conv_layout!r} (expected 'DS' or 'SD')")


def _mamba2_params(layout: EngineLayout, group: GroupLayout) -> dict[str, Any]:
    heads_local, head_dim, d_state = _shape(group, 1, 3, "SSM state (heads, head dim, state)")
    n_groups = layout.model.get("n_groups")
    if not isinstance(n_groups, int):
        raise ConfigError("a Mamba2 model's config must give n_groups (B/C groups)")
    rows = _conv_rows(group, layout.conv_layout)
    return {
        "mamba_num_heads": heads_local * layout.tp_size,
        "mamba_head_dim": head_dim,
        "ssm_state_size": d_state,
        "n_groups": n_groups,
        "conv_kernel": rows + 1 - layout.num_speculative_tokens,
        "num_speculative_tokens": layout.num_speculative_tokens,
        "conv_dtype": group.dtypes[0] if group.dtypes else "",
        "ssm_dtype": group.dtypes[1] if len(group.dtypes) > 1 else "",
    }


def _gdn_params(layout: EngineLayout, group: GroupLayout) -> dict[str, Any]:
    names = (
        "linear_num_key_heads",
        "linear_num_value_heads",
        "linear_key_head_dim",
        "linear_value_head_dim",
    )
    missing = [n for n in names if not isinstance(layout.model.get(n), int)]
    if missing:
        raise ConfigError(f"a gated DeltaNet model's config must give {', '.join(missing)}")
    rows = _conv_rows(group, layout.conv_layout)
    out: dict[str, Any] = {n: layout.model[n] for n in names}
    out.update(
        linear_conv_kernel_dim=rows + 1 - layout.num_speculative_tokens,
        num_speculative_tokens=layout.num_speculative_tokens,
        conv_dtype=group.dtypes[0] if group.dtypes else "",
        recurrent_dtype=group.dtypes[1] if len(group.dtypes) > 1 else "",
    )
    return out


def _family(layout: EngineLayout, kinds: set[str], mamba: GroupLayout | None) -> str:
    cpu = layout.device == "cpu"
    if cpu and layout.attention_backend not in ("CPU_ATTN", "") and "attention" in kinds:
        raise ConfigError(
            f"attention backend {layout.attention_backend!r} on CPU has no built-in spec "
            f"(CPU_ATTN has); give kv_connector_extra_config['layout_spec']"
        )
    if not cpu and layout.cache_layout not in ("LBHNC", "HND"):
        raise ConfigError(
            f"KV cache layout {layout.cache_layout!r}: the built-in GPU specs describe LBHNC "
            f"(HND), which the connector asks vLLM for; unset VLLM_KV_CACHE_LAYOUT or give "
            f"kv_connector_extra_config['layout_spec']"
        )
    if kinds == {"attention"}:
        return "vllm_cpu_attn" if cpu else "vllm_lbhnc"
    if kinds == {"mla"}:
        return "vllm_mla"
    if kinds == {"attention", "mamba"} and mamba is not None:
        sd = "_sd" if layout.conv_layout == "SD" else ""
        if mamba.mamba_type == "mamba2":
            return ("vllm_cpu_hybrid_mamba2" if cpu else "vllm_lbhnc_hybrid_mamba2") + sd
        if mamba.mamba_type in _GDN_TYPES and not cpu:
            return "vllm_lbhnc_hybrid_gdn" + sd
        raise ConfigError(
            f"no built-in spec for a hybrid with {mamba.mamba_type!r} layers on "
            f"{layout.device}; give kv_connector_extra_config['layout_spec']"
        )
    raise ConfigError(
        f"no built-in spec for KV-cache groups of kinds {sorted(kinds)}; give "
        f"kv_connector_extra_config['layout_spec']"
    )


def _all_params(layout: EngineLayout) -> dict[str, Any]:
    """Every value the connector can derive for the specs' parameters."""
    out: dict[str, Any] = {}
    attn = [g for g in layout.groups if g.kind in ("attention", "mla")]
    mamba = [g for g in layout.groups if g.kind == "mamba"]
    if attn:
        out.update(_attention_params(layout, attn))
        if attn[0].kind == "mla":
            out.update(_mla_params(layout, attn[0]))
    if mamba:
        first = mamba[0]
        if any(g.shapes != first.shapes or g.dtypes != first.dtypes for g in mamba[1:]):
            raise ConfigError("Mamba groups with different state shapes or dtypes")
        if layout.conv_layout not in ("DS", "SD"):
            raise ConfigError(
                f"conv state layout {layout.conv_layout!r}: expected 'DS' or 'SD' "
                f"(VLLM_SSM_CONV_STATE_LAYOUT)"
            )
        n_mamba = sum(len(g.layer_names) for g in mamba)
        if first.mamba_type == "mamba2":
            out.update(_mamba2_params(layout, first), num_mamba_layers=n_mamba)
        elif first.mamba_type in _GDN_TYPES:
            out.update(_gdn_params(layout, first), num_linear_attention_layers=n_mamba)
    return out


def choose_spec(layout: EngineLayout, layout_spec: str | None = None) -> SpecChoice:
    """The spec for ``layout``: a built-in family, or ``layout_spec`` (a path or a built-in
    name), with every parameter value the connector derives (the plans bind those the spec
    declares).  Raises :class:`ConfigError` naming what has no spec."""
    if not layout.groups:
        raise ConfigError("the engine has no KV-cache group to transfer")
    kinds = {g.kind for g in layout.groups}
    mamba = next((g for g in layout.groups if g.kind == "mamba"), None)
    group_kinds = tuple(layer_kind(g) for g in layout.groups)
    family = _family(layout, kinds, mamba) if layout_spec is None else layout_spec
    params = _all_params(layout)
    conv = layout.conv_layout if mamba is not None else None
    return SpecChoice(family, params, group_kinds, conv, builtin=layout_spec is None)
