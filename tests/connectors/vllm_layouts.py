"""KV caches allocated exactly as vLLM 0.32 allocates them, without vLLM.

vLLM's worker allocates one flat ``int8`` buffer and views it per layer
(``vllm/v1/worker/utils.py:564`` ``allocate_kv_cache``):

* every ``KVCacheTensor(size, layers, layer_stride, block_stride, offset)`` of
  ``kv_cache_config`` places its layers in that buffer: layer ``l``'s page of block ``b`` at
  ``offset + l * layer_stride + b * block_stride`` (``vllm/v1/kv_cache_interface.py:1409``);
  for the layer-outermost layouts ``layer_stride = num_blocks * page``, ``block_stride = page``,
  and the groups of a hybrid model overlay the same buffer (one tensor per group, same offsets);
* each layer is a logical ``[B, H, N, C]`` view in bytes (``compute_layer_kv_cache_shape_bytes``,
  ``vllm/v1/kv_cache_interface.py:319``): attention ``(num_blocks * blocks per page, KV heads
  of the rank, kernel block tokens, (head_size + head_size_v) * element size)``, MLA
  ``(..., 1, tokens, (kv_lora_rank + qk_rope_head_dim) * element size)``
  (``vllm/model_executor/layers/attention/mla_attention.py:1356-1358``: one head of
  ``head_size = kv_lora_rank + qk_rope_head_dim``, line 479), Mamba
  ``(num_blocks, 1, 1, sum(prod(shape) * element size))`` raw int8 (``MambaSpec``,
  ``vllm/v1/kv_cache_interface.py:1035``);
* strides follow the layout's axis order (``compute_layout_strides``,
  ``vllm/v1/kv_cache_interface.py:338``; ``LBHNC = (0, 1, 2, 3, 4)``,
  ``vllm/v1/kv_cache_layout.py:23``) with the layer and block strides fixed from the
  ``KVCacheTensor``, a manager block split into kernel blocks by dividing the block stride
  (``create_kv_cache_views``, ``vllm/v1/kv_cache_interface.py:377``), then ``as_strided`` and
  ``view(dtype)`` (attention/MLA; Mamba stays int8).

On GPUs every attention backend gets this ``LBHNC`` view (the layout LayoutcConnector asks
for): FlashAttention splits the content dim into K and V (``key_cache, value_cache =
kv_cache.transpose(1, 2).split(self.head_size, dim=-1)``,
``vllm/v1/attention/backends/flash_attn.py:1252``), FlashInfer likewise -- a page is
``[head][token][K|V]``.  The CPU backend (``CPU_ATTN``) gets the same shape but reads the page
as ``(B, H, 2N, D)`` with K transposed (``vllm/v1/attention/backends/cpu_attn.py:411-416``).
Mamba2 state shapes (DS conv layout) follow ``MambaStateShapeCalculator.mamba2_state_shape``
(``vllm/model_executor/layers/mamba/mamba_utils.py:195``): conv ``(conv_dim / tp, conv_kernel -
1)`` with ``conv_dim = d_inner + 2 * n_groups * d_state``, SSM ``(heads / tp, head_dim,
d_state)``; the Mamba page is padded to the attention page.

:func:`vllm_cache` returns the per-layer tensors (what ``register_kv_caches`` receives) and
the connector's description of them (what ``layoutc.connectors.vllm.describe`` reads from
vLLM's config).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from layoutc.connectors.vllm.description import EngineLayout, GroupLayout, Placement

ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2}
TORCH = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Case:
    """A model shape and the vLLM backend that stores it."""

    name: str
    device_kind: str  # "gpu" (LBHNC pages) or "cpu" (CPU_ATTN)
    attention_layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    block_size: int = 16  # tokens per logical block
    kernel_block_size: int = 16
    dtype: str = "bf16"
    mla: tuple[int, int] | None = None  # (kv_lora_rank, qk_rope_head_dim)
    mamba_layers: int = 0
    mamba: tuple[int, int, int, int, int] | None = None  # heads, head dim, n_groups, d_state, conv
    mamba_groups: int = 1  # KV-cache groups the Mamba layers make (vLLM: equal-sized groups)
    conv_dtype: str = "bf16"
    ssm_dtype: str = "fp32"


CASES = {
    # Llama-like, FlashAttention/FlashInfer on a GPU: 32-token manager blocks split into
    # 16-token kernel blocks (vLLM splits when the backend's kernel block is smaller)
    "flash": Case("flash", "gpu", attention_layers=3, kv_heads=4, head_dim=64, block_size=32),
    "mla": Case("mla", "gpu", attention_layers=2, mla=(128, 32), block_size=16),
    "hybrid": Case(
        "hybrid",
        "gpu",
        attention_layers=2,
        kv_heads=2,
        head_dim=64,
        block_size=64,
        kernel_block_size=64,
        mamba_layers=2,
        mamba=(8, 16, 2, 16, 4),
    ),
    # more Mamba layers than attention layers: two Mamba groups, each with its own block ids
    "hybrid_groups": Case(
        "hybrid_groups",
        "gpu",
        attention_layers=2,
        kv_heads=2,
        head_dim=64,
        block_size=64,
        kernel_block_size=64,
        mamba_layers=4,
        mamba=(8, 16, 2, 16, 4),
        mamba_groups=2,
    ),
    "cpu_attn": Case(
        "cpu_attn",
        "cpu",
        attention_layers=2,
        kv_heads=2,
        head_dim=32,
        block_size=32,
        kernel_block_size=32,
        dtype="fp32",
    ),
}


def _layer_names(case: Case) -> tuple[list[str], list[str]]:
    """(attention layers, Mamba layers) named as vLLM names them: a Mamba layer first, then
    alternating while both kinds remain, the rest of the larger kind at the end."""
    attn, mamba = [], []
    n = case.attention_layers + case.mamba_layers
    for i in range(n):
        want_mamba = len(mamba) < case.mamba_layers and (
            len(attn) >= case.attention_layers or len(mamba) <= len(attn)
        )
        if want_mamba:
            mamba.append(f"model.layers.{i}.mixer")
        else:
            attn.append(f"model.layers.{i}.self_attn.attn")
    return attn, mamba


def _mamba_shapes(case: Case, tp: int) -> tuple[tuple[int, int], tuple[int, int, int]]:
    assert case.mamba is not None
    heads, head_dim, groups, d_state, conv = case.mamba
    extra = 0 if groups % tp == 0 else tp - groups  # vLLM's extra_groups_for_head_shards
    conv_dim = heads * head_dim + 2 * (groups + extra) * d_state
    return (conv_dim // tp, conv - 1), (heads // tp, head_dim, d_state)


def _index(name: str) -> int:
    return int(name.split(".")[2])


def vllm_cache(
    case: Case, tp: int, rank: int, num_blocks: int, device: str
) -> tuple[dict[str, Any], EngineLayout]:
    """``register_kv_caches``'s tensors and the connector's description, as vLLM makes them."""
    import torch

    attn_names, mamba_names = _layer_names(case)
    groups = []
    ratio = case.block_size // case.kernel_block_size
    if case.mla is not None:
        heads, content = 1, (case.mla[0] + case.mla[1]) * ELEMENT[case.dtype]
    else:
        heads = max(1, case.kv_heads // tp)
        content = 2 * case.head_dim * ELEMENT[case.dtype]
    attn_page = heads * case.block_size * content  # a manager block's page (bytes)
    page = attn_page
    mamba_bytes = 0
    if case.mamba is not None:
        conv, ssm = _mamba_shapes(case, tp)
        mamba_bytes = (
            math.prod(conv) * ELEMENT[case.conv_dtype] + math.prod(ssm) * ELEMENT[case.ssm_dtype]
        )
        assert mamba_bytes <= attn_page, "vLLM would raise the block size"
    layer_stride = num_blocks * page
    # vLLM's hybrid groups hold equally many layers; the i-th layer of every group shares
    # one KVCacheTensor slot (offset i * layer_stride): groups overlay the same buffer
    mamba_sets = [mamba_names[i :: case.mamba_groups] for i in range(case.mamba_groups)]
    mamba_sets = [sorted(m, key=_index) for m in mamba_sets if m]
    per_group = max([len(attn_names)] + [len(m) for m in mamba_sets])
    size = per_group * layer_stride
    buf = torch.zeros(size, dtype=torch.int8, device=device)
    kv: dict[str, Any] = {}
    placements = []
    # attention group: layer-outermost, LBHNC strides (C, N, H innermost)
    shape = (num_blocks * ratio, heads, case.kernel_block_size, content)
    strides = (page // ratio, case.kernel_block_size * content, content, 1)
    for li, name in enumerate(attn_names):
        view = torch.as_strided(buf, shape, strides, li * layer_stride)
        kv[name] = view.view(getattr(torch, TORCH[case.dtype]))
    placements.append(Placement(tuple(attn_names), layer_stride, page, 0, size))
    if case.mla is not None:
        groups.append(
            GroupLayout(
                "mla",
                tuple(attn_names),
                case.block_size,
                case.kernel_block_size,
                num_kv_heads=1,
                head_size=sum(case.mla),
                head_size_v=0,
                dtype=case.dtype,
                page_size_bytes=page,
            )
        )
    else:
        groups.append(
            GroupLayout(
                "attention",
                tuple(attn_names),
                case.block_size,
                case.kernel_block_size,
                num_kv_heads=heads,
                head_size=case.head_dim,
                head_size_v=case.head_dim,
                dtype=case.dtype,
                page_size_bytes=page,
            )
        )
    if case.mamba is not None:
        conv, ssm = _mamba_shapes(case, tp)
        mamba_groups = []
        for names in mamba_sets:
            # raw int8 [blocks, 1, 1, state bytes], block stride = the padded page
            for li, name in enumerate(names):
                kv[name] = torch.as_strided(
                    buf,
                    (num_blocks, 1, 1, mamba_bytes),
                    (page, mamba_bytes, mamba_bytes, 1),
                    li * layer_stride,
                )
            placements.append(Placement(tuple(names), layer_stride, page, 0, size))
            mamba_groups.append(
                GroupLayout(
                    "mamba",
                    tuple(names),
                    4096,
                    4096,
                    shapes=(conv, ssm),
                    dtypes=(case.conv_dtype, case.ssm_dtype),
                    mamba_type="mamba2",
                    page_size_bytes=page,
                )
            )
        groups = mamba_groups + groups  # vLLM's transfer order: Mamba groups first
    model: dict[str, int] = {}
    if case.mla is not None:
        model.update(kv_lora_rank=case.mla[0], qk_rope_head_dim=case.mla[1])
    else:
        model["num_key_value_heads"] = case.kv_heads
    if case.mamba is not None:
        model["n_groups"] = case.mamba[2]
    layout = EngineLayout(
        device="cpu" if case.device_kind == "cpu" else "cuda",
        attention_backend="CPU_ATTN" if case.device_kind == "cpu" else "FLASH_ATTN",
        cache_layout="LBHNC",
        tp_size=tp,
        tp_rank=rank,
        num_blocks=num_blocks,
        groups=tuple(groups),
        placements=tuple(placements),
        model=model,
        conv_layout="DS" if case.mamba is not None else None,
    )
    return kv, layout
