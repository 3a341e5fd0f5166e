"""A plain description of one vLLM engine rank's KV cache, in types that need no vLLM.

The connector reads vLLM's config and ``kv_cache_config`` into an :class:`EngineLayout`
(:mod:`.describe`, which imports vLLM); everything downstream -- choosing the layout spec
(:mod:`.spec_choice`), checking and wrapping the tensors (:mod:`.tensors`) -- works from this
description alone, so it runs (and is tested) on a machine without vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["DTYPE_NAMES", "EngineLayout", "GroupLayout", "Placement", "dtype_name"]

#: torch dtype names (``str(torch.float32).removeprefix("torch.")``) -> layoutc dtype names.
DTYPE_NAMES = {
    "float32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
    "uint8": "fp8",
    "int8": "int8",
}


def dtype_name(dtype: object) -> str:
    """layoutc's name of a torch dtype (or of its name), or the name itself when unknown."""
    name = str(dtype).removeprefix("torch.")
    return DTYPE_NAMES.get(name, name)


@dataclass(frozen=True)
class GroupLayout:
    """One KV-cache group of vLLM's ``kv_cache_config`` that takes part in transfers.

    ``kind``: ``"attention"`` (K and V per token), ``"mla"`` (one latent vector per token) or
    ``"mamba"`` (a state per request: Mamba2, Mamba1 or gated DeltaNet, see ``mamba_type``).
    """

    kind: str
    layer_names: tuple[str, ...]
    block_size: int  # tokens per logical (scheduler) block
    kernel_block_size: int  # tokens per kernel block (== block_size unless the backend splits)
    num_kv_heads: int = 0  # attention: KV heads held by this rank
    head_size: int = 0  # attention: K head size; MLA: latent + rope dims
    head_size_v: int = 0
    dtype: str = ""  # attention/MLA cache dtype (layoutc name)
    shapes: tuple[tuple[int, ...], ...] = ()  # mamba: MambaSpec.shapes (conv, then state)
    dtypes: tuple[str, ...] = ()  # mamba: MambaSpec.dtypes (layoutc names)
    mamba_type: str = ""  # mamba: "mamba2", "mamba1", "gdn", ...
    page_size_bytes: int = 0  # vLLM's page size of the group (padded), bytes

    @property
    def kernel_blocks(self) -> int:
        return self.block_size // self.kernel_block_size if self.kernel_block_size else 1


@dataclass(frozen=True)
class Placement:
    """A ``KVCacheTensor`` of vLLM's ``kv_cache_config``: layer ``layers[l]``'s page of block
    ``b`` starts at ``offset + l * layer_stride + b * block_stride`` bytes into the one
    allocation (of ``size`` bytes) every cache tensor shares."""

    layers: tuple[str, ...]
    layer_stride: int
    block_stride: int
    offset: int
    size: int


@dataclass(frozen=True)
class EngineLayout:
    """What the connector needs to know about one engine rank's KV cache."""

    device: str  # "cpu" or "cuda"
    attention_backend: str  # vLLM's backend name, e.g. "CPU_ATTN", "FLASH_ATTN"
    cache_layout: str  # vLLM's resolved KV cache layout, e.g. "LBHNC"
    tp_size: int
    tp_rank: int
    num_blocks: int
    groups: tuple[GroupLayout, ...]  # transfer groups, in vLLM's transfer order
    placements: tuple[Placement, ...] = ()
    #: model values from the Hugging Face config that the tensors do not show, by the
    #: specs' parameter names: ``num_key_value_heads`` (total), ``n_groups``,
    #: ``kv_lora_rank``, ``qk_rope_head_dim``, ``linear_*``
    model: Mapping[str, int] = field(default_factory=dict)
    conv_layout: str | None = None  # "DS" or "SD" when the model has Mamba-like layers
    num_speculative_tokens: int = 0

    def group_of(self, layer: str) -> int | None:
        """Index of the transfer group holding ``layer`` (None: not transferred)."""
        for i, g in enumerate(self.groups):
            if layer in g.layer_names:
                return i
        return None
