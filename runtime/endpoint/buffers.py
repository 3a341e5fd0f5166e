"""An engine rank's registered pages: layer kinds, buffers, and the checks on them.

Buffer layout (see ``docs/runtime.md``): one buffer per (layer, page), any dtype, contiguous;
logical block ``L`` of a page starts at byte ``L * logical_stride`` of its buffer
(``logical_stride = kernel_blocks * kernel_stride``); a ``per="kernel"`` page holds one copy
per kernel block, at ``k * kernel_stride`` inside the logical block.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..descriptors import Segment, segments_by_key
from ..errors import PlanError, UsageError
from ..plan import Plan, SideLayout

__all__ = [
    "LocalPages",
    "allocate_buffers",
    "host_staging_tensor",
    "kind_pages",
    "layer_kind_sequence",
    "side_of",
]


def side_of(plan: Plan, role: str) -> SideLayout:
    if role == "prefill":
        return plan.prefill
    if role == "decode":
        return plan.decode
    raise UsageError(f"role must be 'prefill' or 'decode', got {role!r}")


def kind_pages(plan: Plan) -> dict[str, tuple[str, ...]]:
    """Layer kind -> its pages.  A plan without kinds has one kind, ``"default"``, of all pages."""
    if plan.layer_kinds:
        return {k: tuple(p) for k, p in plan.layer_kinds}
    return {"default": plan.prefill.page_names}


def layer_kind_sequence(plan: Plan, num_layers: int) -> list[str]:
    """A simple layer pattern for demos and tests: the plan's kinds in turn."""
    kinds = list(kind_pages(plan))
    return [kinds[i % len(kinds)] for i in range(num_layers)]


def allocate_buffers(
    plan: Plan,
    role: str,
    layer_kinds_sequence: Sequence[str],
    num_logical_blocks: int,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Zeroed uint8 buffers, one per (layer, page), sized ``PageLayout.buffer_bytes``."""
    import torch

    side = side_of(plan, role)
    kinds = kind_pages(plan)
    if num_logical_blocks < 1:
        raise UsageError(f"num_logical_blocks must be >= 1, got {num_logical_blocks}")
    out: list[dict[str, Any]] = []
    for i, kind in enumerate(layer_kinds_sequence):
        if kind not in kinds:
            raise PlanError(f"layer {i}: no layer kind {kind!r} (kinds: {', '.join(kinds)})")
        out.append(
            {
                page: torch.zeros(
                    side.page(page).buffer_bytes(num_logical_blocks),
                    dtype=torch.uint8,
                    device=device,
                )
                for page in kinds[kind]
            }
        )
    return out


def host_staging_tensor(nbytes: int) -> Any:
    """A host staging buffer backed by transparent huge pages where the OS offers them.

    UCX moves host memory between processes with ``process_vm_readv``/``writev`` (CMA), which
    pins the pages of both sides per call: on 2 MiB pages a copy runs about twice as fast as on
    4 KiB pages (docs/benchmarks.md).  The buffer is ours, so it asks for huge pages
    (``madvise(MADV_HUGEPAGE)``); the pages are touched here so that they are resident before
    the first transfer.  Falls back to a plain tensor.
    """
    import torch

    adv = getattr(mmap, "MADV_HUGEPAGE", None)
    if adv is not None and nbytes >= (2 << 20):
        try:
            m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            m.madvise(adv)
            t = torch.frombuffer(m, dtype=torch.uint8)
            t.zero_()
            t.layoutc_mapping = m  # the mapping lives as long as the tensor
            return t
        except (OSError, ValueError, AttributeError, TypeError):
            pass
    return torch.zeros(nbytes, dtype=torch.uint8)


class LocalPages:
    """The pages an endpoint registered: one buffer per (layer, page), checked once."""

    def __init__(
        self,
        *,
        label: str,
        side: SideLayout,
        kinds: dict[str, tuple[str, ...]],
        device: str,
        mem_type: str,
    ) -> None:
        self.label = label
        self.side = side
        self.kinds = kinds
        self.device = device
        self.mem_type = mem_type
        self.buffers: list[dict[str, Any]] = []  # keeps the tensors alive
        self.layer_kinds: list[str] = []
        self.segments: dict[tuple[int, str], Segment] = {}
        self.num_blocks = 0

    @property
    def registered(self) -> bool:
        return bool(self.buffers)

    def layer_pages(self) -> list[tuple[str, ...]]:
        return [self.kinds[k] for k in self.layer_kinds]

    def check(self, buffers: Sequence[dict[str, Any]], kinds: Sequence[str] | None) -> np.ndarray:
        """Check ``buffers`` against the plan and take them; return the distinct memory
        regions ``(addr, nbytes, devid)`` to register (``Nx3`` uint64)."""
        if not buffers:
            raise UsageError(f"{self.label}: no layers to register")
        if kinds is not None and len(kinds) != len(buffers):
            raise UsageError(f"{self.label}: {len(kinds)} kinds for {len(buffers)} layers")
        layer_kinds: list[str] = []
        segments: list[Segment] = []
        regions: dict[tuple[int, int, int], None] = {}
        for i, pages in enumerate(buffers):
            if not isinstance(pages, dict) or not pages:
                raise UsageError(f"{self.label}: layer {i}: expected a dict {{page: tensor}}")
            kind = self._kind_of(i, pages, None if kinds is None else kinds[i])
            layer_kinds.append(kind)
            for page in self.kinds[kind]:
                addr, nbytes, devid = self._tensor_region(i, page, pages[page])
                stride = self.side.page(page).logical_stride
                if nbytes < stride:
                    raise UsageError(
                        f"{self.label}: layer {i} page {page!r}: buffer of {nbytes} bytes is "
                        f"smaller than one logical block ({stride} bytes)"
                    )
                segments.append(Segment(i, page, addr, nbytes, devid, stride, nbytes // stride))
                regions[(addr, nbytes, devid)] = None
        self.buffers = [dict(b) for b in buffers]
        self.layer_kinds = layer_kinds
        self.segments = segments_by_key(segments)
        self.num_blocks = min(s.num_blocks for s in segments)
        return np.array(list(regions), dtype=np.uint64).reshape(-1, 3)

    def _kind_of(self, i: int, pages: dict[str, Any], kind: str | None) -> str:
        names = set(pages)
        if kind is not None:
            if kind not in self.kinds:
                raise PlanError(
                    f"{self.label}: layer {i}: no layer kind {kind!r} "
                    f"(kinds: {', '.join(self.kinds)})"
                )
            if names != set(self.kinds[kind]):
                raise UsageError(
                    f"{self.label}: layer {i} of kind {kind!r} needs pages "
                    f"{sorted(self.kinds[kind])}, got {sorted(names)}"
                )
            return kind
        matches = [k for k, p in self.kinds.items() if set(p) == names]
        if len(matches) != 1:
            raise UsageError(
                f"{self.label}: layer {i}: pages {sorted(names)} match "
                f"{'no' if not matches else 'several'} layer kinds "
                f"({', '.join(f'{k}={list(p)}' for k, p in self.kinds.items())}); pass kinds="
            )
        return matches[0]

    def _tensor_region(self, i: int, page: str, t: Any) -> tuple[int, int, int]:
        import torch

        where = f"{self.label}: layer {i} page {page!r}"
        if not isinstance(t, torch.Tensor):
            raise UsageError(f"{where}: expected a torch tensor, got {type(t).__name__}")
        if t.device.type == "meta":
            raise UsageError(
                f"{where}: a tensor on the meta device holds no memory; register tensors "
                f"allocated on {self.device!r}"
            )
        if t.layout != torch.strided:
            raise UsageError(f"{where}: a {t.layout} tensor; register dense (strided) tensors")
        if t.numel() and not t.data_ptr():
            raise UsageError(f"{where}: the tensor has no storage (data_ptr() is 0)")
        if not t.is_contiguous():
            raise UsageError(f"{self.label}: layer {i} page {page!r}: tensor is not contiguous")
        on_gpu = t.device.type == "cuda"
        wrong_gpu = (
            on_gpu and self.device.startswith("cuda:") and t.device.index != int(self.device[5:])
        )
        if t.device.type not in ("cpu", "cuda") or on_gpu != (self.mem_type == "VRAM") or wrong_gpu:
            raise UsageError(
                f"{self.label}: layer {i} page {page!r}: tensor on {t.device} but the endpoint "
                f"was created with device={self.device!r}"
            )
        devid = (t.device.index or 0) if on_gpu else 0
        return int(t.data_ptr()), int(t.numel() * t.element_size()), int(devid)

    def header_layers(self) -> list[dict[str, Any]]:
        """The ``layers`` field of this endpoint's handshake header."""
        layers = []
        for i, kind in enumerate(self.layer_kinds):
            pages = {}
            for page in self.kinds[kind]:
                s = self.segments[(i, page)]
                pages[page] = [s.addr, s.nbytes, s.devid, s.num_blocks]
            layers.append({"kind": kind, "pages": pages})
        return layers

    def local_layers(self) -> list[dict[str, Any]]:
        """Layer kinds and their pages (what a peer's layers are checked against)."""
        return [{"kind": k, "pages": list(self.kinds[k])} for k in self.layer_kinds]
