"""vLLM's KV-cache tensors as layoutc buffers, checked against the layout spec.

vLLM 0.32 allocates one flat buffer per worker and hands ``register_kv_caches`` a view per
layer (``v1/worker/utils.py`` ``allocate_kv_cache`` / ``v1/kv_cache_interface.py``
``create_kv_cache_views``): attention and MLA layers ``[blocks, heads, tokens, content]`` in
the cache dtype, Mamba-like layers raw ``int8 [blocks, 1, 1, state bytes]`` whose block stride
is the (padded) page.  With a layer-outermost layout (LBHNC) each layer's pages are one
contiguous region, and the groups of a hybrid model alias the same regions (a block id belongs
to one group at a time).  :func:`wrap` checks every tensor against the spec's pages -- dtype,
shape, strides, page bytes and stride, Mamba state shapes and dtypes from ``MambaSpec`` -- and
returns one flat ``uint8`` view per (layer, page) for :meth:`Endpoint.register_layers`
(aliasing views register once).

Needs torch, not vLLM: the description comes from :mod:`.description`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...runtime.layout import local_shape
from ...runtime.plan import DTYPE_SIZES, PageLayout, SideLayout
from .description import EngineLayout, GroupLayout, dtype_name
from .errors import ConfigError, LayoutMismatchError
from .spec_choice import SpecChoice

__all__ = ["Registration", "endpoint_device", "layer_order", "wrap"]


@dataclass
class Registration:
    """What the endpoint registers: per transferred layer (in :func:`layer_order`) its name,
    its spec layer kind and ``{page: flat uint8 tensor}``."""

    layer_names: list[str]
    kinds: list[str]
    buffers: list[dict[str, Any]]
    num_blocks: int
    device: str
    #: layer kind -> indices (into ``layer_names``) of its layers, per transfer group
    group_layers: list[list[int]]


def layer_order(names: Mapping[str, Any] | list[str]) -> list[str]:
    """Layer names in model order: by the first integer in the name (vLLM's layer index),
    then by name.  Both engines of a pair hold the same names, so they agree on the order."""

    def key(name: str) -> tuple[int, str]:
        m = re.search(r"\d+", name)
        return (int(m.group()) if m else -1, name)

    return sorted(names, key=key)


def endpoint_device(tensor: Any) -> str:
    """The endpoint device string of a tensor: ``"cpu"`` or ``"cuda:N"``."""
    dev = tensor.device
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda":
        return f"cuda:{dev.index or 0}"
    raise ConfigError(f"KV cache on device {dev}: the connector registers CPU or CUDA memory")


def _flat(t: Any, nbytes: int, layer: str) -> Any:
    """A contiguous uint8 view of ``nbytes`` from the first byte of ``t``."""
    import torch

    storage = t.untyped_storage()
    start = t.storage_offset() * t.element_size()
    if start + nbytes > storage.nbytes():
        raise LayoutMismatchError(
            f"layer {layer!r}: {nbytes} bytes of pages from byte {start} run past its "
            f"allocation of {storage.nbytes()} bytes"
        )
    flat = torch.empty(0, dtype=torch.uint8, device=t.device)
    flat.set_(storage, start, (nbytes,), (1,))
    return flat


def _mismatch(layer: str, what: str, vllm: Any, spec: Any) -> LayoutMismatchError:
    return LayoutMismatchError(f"layer {layer!r}: {what}: vLLM has {vllm}, the spec {spec}")


def _check_attention(
    name: str, t: Any, g: GroupLayout, page: PageLayout, side: SideLayout, rank: int, nb: int
) -> None:
    state = side.state(page.states[0])
    if dtype_name(t.dtype) != state.dtype:
        raise _mismatch(name, f"dtype of state {state.name!r}", dtype_name(t.dtype), state.dtype)
    content = g.head_size + (g.head_size_v if g.kind == "attention" else 0)
    heads = g.num_kv_heads if g.kind == "attention" else 1
    want = (nb * g.kernel_blocks, heads, g.kernel_block_size, content)
    if tuple(t.shape) != want:
        raise _mismatch(name, "tensor shape [blocks, heads, tokens, content]", tuple(t.shape), want)
    dims = state.dims
    if dims and dims[0].name == "head":
        spec_heads = local_shape(dims, side.tp, rank)[0]
        if spec_heads != heads:
            raise _mismatch(name, "KV heads on this rank", heads, spec_heads)
    inner = (g.kernel_block_size * content, content, 1)
    if tuple(t.stride())[1:] != inner:
        raise _mismatch(name, "strides inside a page (elements)", tuple(t.stride())[1:], inner)
    esize = t.element_size()
    if heads * g.kernel_block_size * content * esize != page.nbytes:
        raise _mismatch(
            name,
            f"bytes of page {page.name!r}",
            heads * g.kernel_block_size * content * esize,
            page.nbytes,
        )
    if t.stride(0) * esize != page.kernel_stride:
        raise _mismatch(
            name, "bytes between kernel blocks", t.stride(0) * esize, page.kernel_stride
        )


def _check_mamba(
    name: str, t: Any, g: GroupLayout, page: PageLayout, side: SideLayout, rank: int, nb: int
) -> None:
    if len(page.states) != len(g.shapes):
        raise _mismatch(name, "states of the Mamba page", len(g.shapes), list(page.states))
    used = 0
    for i, st_name in enumerate(page.states):
        st = side.state(st_name)
        shape = tuple(local_shape(st.dims, side.tp, rank))
        if tuple(g.shapes[i]) != shape:
            raise _mismatch(name, f"shape of state {st_name!r} (MambaSpec)", g.shapes[i], shape)
        if g.dtypes[i] != st.dtype:
            raise _mismatch(name, f"dtype of state {st_name!r} (MambaSpec)", g.dtypes[i], st.dtype)
        used += math.prod(shape) * DTYPE_SIZES.get(st.dtype, 1)
    if used != page.nbytes:
        raise _mismatch(name, f"bytes of page {page.name!r}", used, page.nbytes)
    if t.dim() != 4 or t.shape[0] != nb or t.shape[-1] * t.element_size() != used:
        raise _mismatch(
            name, "tensor shape [blocks, 1, 1, state bytes]", tuple(t.shape), (nb, 1, 1, used)
        )
    if t.stride(0) * t.element_size() != page.logical_stride:
        raise _mismatch(
            name, "bytes between blocks", t.stride(0) * t.element_size(), page.logical_stride
        )


def wrap(
    kv_caches: Mapping[str, Any],
    layout: EngineLayout,
    choice: SpecChoice,
    side: SideLayout,
    kind_pages: Mapping[str, tuple[str, ...]],
) -> Registration:
    """Check vLLM's tensors against ``side`` (this engine's side of the spec's plans) and wrap
    them for registration.  Raises :class:`LayoutMismatchError` naming the layer, the field and
    both values."""
    names: list[str] = []
    kinds: list[str] = []
    buffers: list[dict[str, Any]] = []
    group_layers: list[list[int]] = [[] for _ in layout.groups]
    device: str | None = None
    placements = {n: p for p in layout.placements for n in p.layers}
    nb = layout.num_blocks
    for name in layer_order(list(kv_caches)):
        gi = layout.group_of(name)
        if gi is None:
            continue  # a group vLLM does not transfer
        g, kind = layout.groups[gi], choice.group_kinds[gi]
        pages = kind_pages.get(kind)
        if pages is None:
            raise ConfigError(
                f"layer {name!r}: the layout spec {choice.spec!r} has no layer kind {kind!r} "
                f"(kinds: {', '.join(kind_pages)})"
            )
        if len(pages) != 1:
            raise ConfigError(
                f"layer {name!r}: layer kind {kind!r} of {choice.spec!r} has pages "
                f"{list(pages)}, but vLLM keeps one tensor per layer"
            )
        page = side.page(pages[0])
        t = kv_caches[name]
        dev = endpoint_device(t)
        if device is not None and dev != device:
            raise ConfigError(f"layer {name!r} is on {dev}, earlier layers on {device}")
        device = dev
        if g.kind == "mamba":
            _check_mamba(name, t, g, page, side, layout.tp_rank, nb)
        else:
            _check_attention(name, t, g, page, side, layout.tp_rank, nb)
        placement = placements.get(name)
        if placement is not None and placement.block_stride != page.logical_stride:
            raise _mismatch(
                name, "block stride (kv_cache_config)", placement.block_stride, page.logical_stride
            )
        group_layers[gi].append(len(names))
        names.append(name)
        kinds.append(kind)
        buffers.append({page.name: _flat(t, nb * page.logical_stride, name)})
    if not names:
        raise ConfigError("no layer of a transferable KV-cache group was registered")
    assert device is not None
    return Registration(names, kinds, buffers, nb, device, group_layers)
