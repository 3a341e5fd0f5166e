"""Read vLLM's configuration into the connector's plain description (imports vLLM).

:func:`engine_layout` turns ``VllmConfig`` + ``KVCacheConfig`` + the tensors vLLM registers
into an :class:`~.description.EngineLayout`; :func:`compat_hash` is the engine identity two
engines must share to exchange KV (``enforce_handshake_compat``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .description import EngineLayout, GroupLayout, Placement, dtype_name

__all__ = ["compat_hash", "engine_layout", "model_values"]

#: Hugging Face config names of the values :mod:`.spec_choice` needs, per spec parameter.
_HF_NAMES = {
    "n_groups": ("n_groups", "mamba_n_groups", "ngroups"),
    "kv_lora_rank": ("kv_lora_rank",),
    "qk_rope_head_dim": ("qk_rope_head_dim",),
    "linear_num_key_heads": ("linear_num_key_heads",),
    "linear_num_value_heads": ("linear_num_value_heads",),
    "linear_key_head_dim": ("linear_key_head_dim",),
    "linear_value_head_dim": ("linear_value_head_dim",),
}


def model_values(vllm_config: Any) -> dict[str, int]:
    """The model's values the tensors do not show (total KV heads, B/C groups, MLA and GDN
    dims), by the specs' parameter names."""
    mc = vllm_config.model_config
    out: dict[str, int] = {}
    try:
        out["num_key_value_heads"] = int(mc.get_total_num_kv_heads())
    except (AttributeError, TypeError, ValueError):
        pass
    hf = mc.hf_text_config
    for name, aliases in _HF_NAMES.items():
        for alias in aliases:
            v = getattr(hf, alias, None)
            if isinstance(v, int) and not isinstance(v, bool):
                out[name] = v
                break
    return out


def _group(group: Any, kv_caches: dict[str, Any], num_blocks: int) -> GroupLayout | None:
    from vllm.v1.kv_cache_interface import (
        AttentionSpec,
        FullAttentionSpec,
        MambaSpec,
        MLAAttentionSpec,
        UniformTypeKVCacheSpecs,
    )

    spec = group.kv_cache_spec
    names = tuple(group.layer_names)
    if isinstance(spec, UniformTypeKVCacheSpecs):
        specs = {type(s) for s in spec.kv_cache_specs.values()}
        if len(specs) != 1:
            return GroupLayout(
                "unsupported:" + ",".join(sorted(s.__name__ for s in specs)), names, 0, 0
            )
        spec = next(iter(spec.kv_cache_specs.values()))
    first = kv_caches.get(names[0]) if names else None
    if isinstance(spec, MambaSpec):
        return GroupLayout(
            "mamba",
            names,
            spec.block_size,
            spec.block_size,
            shapes=tuple(tuple(int(x) for x in s) for s in spec.shapes),
            dtypes=tuple(dtype_name(d) for d in spec.dtypes),
            mamba_type=spec.mamba_type.name.lower(),
            page_size_bytes=spec.page_size_bytes,
        )
    if isinstance(spec, AttentionSpec) and type(spec) in (FullAttentionSpec, MLAAttentionSpec):
        kernel = int(first.shape[2]) if first is not None and first.dim() == 4 else spec.block_size
        return GroupLayout(
            "mla" if isinstance(spec, MLAAttentionSpec) else "attention",
            names,
            spec.block_size,
            kernel,
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            head_size_v=spec.head_size_v,
            dtype=dtype_name(spec.dtype),
            page_size_bytes=spec.page_size_bytes,
        )
    return GroupLayout(f"unsupported:{type(spec).__name__}", names, 0, 0)


def engine_layout(
    vllm_config: Any, kv_cache_config: Any, kv_caches: dict[str, Any], tp_rank: int
) -> EngineLayout:
    """The description of this worker's KV cache."""
    from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends
    from vllm.platforms import current_platform

    groups = tuple(
        g
        for g in (
            _group(grp, kv_caches, kv_cache_config.num_blocks)
            for grp in kv_cache_config.transfer_groups
        )
        if g is not None
    )
    placements = tuple(
        Placement(
            tuple(t.layers), int(t.layer_stride), int(t.block_stride), int(t.offset), int(t.size)
        )
        for t in kv_cache_config.kv_cache_tensors
    )
    backend = ""
    attention = [n for g in groups if g.kind in ("attention", "mla") for n in g.layer_names]
    if attention:
        backend = get_current_attn_backends(vllm_config, attention)[0].get_name()
    conv = None
    if any(g.kind == "mamba" for g in groups):
        from vllm.model_executor.layers.mamba.mamba_utils import get_conv_state_layout

        conv = str(get_conv_state_layout())
    spec_cfg = vllm_config.speculative_config
    layout = vllm_config.cache_config.kv_cache_layout
    return EngineLayout(
        device=str(current_platform.device_type),
        attention_backend=backend,
        cache_layout=str(getattr(layout, "name", layout) or ""),
        tp_size=int(vllm_config.parallel_config.tensor_parallel_size),
        tp_rank=tp_rank,
        num_blocks=int(kv_cache_config.num_blocks),
        groups=groups,
        placements=placements,
        model=model_values(vllm_config),
        conv_layout=conv,
        num_speculative_tokens=int(getattr(spec_cfg, "num_speculative_tokens", 0) or 0)
        if spec_cfg is not None
        else 0,
    )


def compat_hash(vllm_config: Any, spec: str, conv_layout: str | None) -> str:
    """What two engines must share to exchange KV (NixlConnector's factors: versions, model,
    dtypes, KV heads, head size, layers, hybrid manager; plus the layout spec)."""
    import vllm

    from ... import __version__ as layoutc_version

    mc, cc = vllm_config.model_config, vllm_config.cache_config
    factors = {
        "vllm": vllm.__version__,
        "layoutc": layoutc_version,
        "model": str(mc.model),
        "dtype": str(mc.dtype),
        "num_kv_heads": mc.get_total_num_kv_heads(),
        "head_size": mc.get_head_size(),
        "num_hidden_layers": mc.get_total_num_hidden_layers(),
        "cache_dtype": str(cc.cache_dtype),
        "hybrid_manager": not vllm_config.scheduler_config.disable_hybrid_kv_cache_manager,
        "spec": spec,
        "conv_layout": conv_layout,
    }
    return hashlib.sha256(json.dumps(factors, sort_keys=True, default=str).encode()).hexdigest()
