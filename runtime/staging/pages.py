"""Page buffers as the kernels see them: byte views, element widths, bound layouts."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .layout import StagingLayout, side_index

__all__ = [
    "BoundPages",
    "PageBuffer",
    "as_blocks",
    "stage_view",
    "torch_module",
    "unit_dtype",
    "unit_of",
]

_UNITS = (16, 8, 4, 2, 1)


def torch_module():
    import torch

    return torch


_UNIT_DTYPES: dict[int, Any] = {}


def unit_dtype(unit: int):
    if not _UNIT_DTYPES:
        torch = torch_module()
        _UNIT_DTYPES.update(
            {
                16: torch.complex128,  # bitwise copies only (gather/scatter do no arithmetic)
                8: torch.int64,
                4: torch.int32,
                2: torch.int16,
                1: torch.uint8,
            }
        )
    return _UNIT_DTYPES[unit]


def unit_of(*values: int) -> int:
    g = 0
    for v in values:
        g = math.gcd(g, int(v))
    for u in _UNITS:
        if g % u == 0:
            return u
    return 1


class PageBuffer:
    """A page buffer as flat bytes, with cached views of wider elements."""

    __slots__ = ("b8", "soff", "nbytes", "_views", "_np")

    def __init__(self, t: Any):
        torch = torch_module()
        if not t.is_contiguous():
            raise ValueError("staging: page buffers must be contiguous tensors")
        b8 = t.reshape(-1)
        if b8.dtype != torch.uint8:
            b8 = b8.view(torch.uint8)
        self.b8 = b8
        self.soff = int(b8.storage_offset())
        self.nbytes = int(b8.numel())
        self._views: dict[int, Any] = {}
        self._np: np.ndarray | None = None

    def view(self, unit: int):
        """The buffer in ``unit``-byte elements (its tail short of one element cut off)."""
        v = self._views.get(unit)
        if v is None:
            n = self.nbytes - self.nbytes % unit
            v = self.b8[:n] if unit == 1 else self.b8[:n].view(unit_dtype(unit))
            self._views[unit] = v
        return v

    def numpy(self) -> np.ndarray:
        if self._np is None:
            self._np = self.b8.numpy()
        return self._np


def as_blocks(block_ids: Any, device: Any, device_block_ids: Any):
    """(host int64 array, torch int64 tensor on ``device``) of a request's block ids."""
    torch = torch_module()
    if isinstance(block_ids, torch.Tensor):
        host = block_ids.detach().to("cpu", torch.int64).numpy()
        dev = block_ids if block_ids.device == device else None
    else:
        host = np.asarray(block_ids, dtype=np.int64).reshape(-1)
        dev = None
    if device_block_ids is not None:
        dev = device_block_ids
    if dev is None or dev.dtype != torch.int64:
        dev = torch.from_numpy(np.ascontiguousarray(host)).to(device)
    return host, dev


class BoundPages:
    """One side's page buffers bound to a :class:`StagingLayout` (build once, reuse).

    Holds, per group, the buffer and its numbers as Python values, and caches the strided
    page views the kernels run on, so that a pack or unpack call spends its host time on the
    kernels alone.  :func:`pack` and :func:`unpack` accept one in place of ``buffers``
    (``side`` must then match); given raw buffers they bind them for that one call.
    The buffers must stay the same tensors while the binding is in use.
    """

    def __init__(self, layout: StagingLayout, buffers: Any, side: str):
        side_index(side)
        self.layout = layout
        self.side = side
        _, g_off, g_step = layout.offsets(side)
        strides = layout.strides(side).tolist()
        self.g_n = layout.group_nbytes.tolist()
        self.g_k = layout.group_rows.tolist()
        self.g_off = g_off.tolist()
        self.g_step = g_step.tolist()
        g_page = layout.group_page.tolist()
        self.g_S = [strides[p] for p in g_page]
        bufs: dict[int, PageBuffer] = {}
        self.g_buf: list[PageBuffer] = []
        device = None
        for layer, pidx in zip(layout.group_layer.tolist(), g_page):
            page = layout.page_names[pidx]
            try:
                t = buffers[layer][page]
            except (KeyError, IndexError) as e:
                raise ValueError(
                    f"staging: no {side} buffer for layer {layer} page {page!r} ({e!r})"
                ) from None
            b = bufs.get(id(t))
            if b is None:
                b = bufs[id(t)] = PageBuffer(t)
                if device is None:
                    device = b.b8.device
                elif b.b8.device != device:
                    raise ValueError(
                        f"staging: layer {layer} page {page!r} is on {b.b8.device}, other "
                        f"pages on {device}"
                    )
            self.g_buf.append(b)
        self.device = device
        self._views: dict[tuple[int, int, int], tuple[int, Any]] = {}
        self._tables: dict[bytes | None, tuple[Any, np.ndarray, int]] = {}

    def row_table(self, groups: np.ndarray | None) -> tuple[Any, np.ndarray, int]:
        """(device table, host cumulative bytes, unit) of the rows of ``groups`` (None: all).

        The table is int64 ``(4, R)``: each row's absolute byte address (block 0), logical
        stride, run bytes and exclusive prefix sum of run bytes (its stream position for a
        one-block request); the unit is the widest element (8, 4, 2 or 1 bytes) dividing every
        address, stride and length.  Built once per layer selection and kept on the device.
        """
        lay = self.layout
        if groups is not None and groups.shape[0] == lay.num_groups:
            groups = None
        key = None if groups is None else groups.tobytes()
        hit = self._tables.get(key)
        if hit is not None:
            return hit
        torch = torch_module()
        if groups is None:
            rows = np.arange(lay.num_rows, dtype=np.int64)
        else:
            k = lay.group_rows[groups]
            first = lay.group_row[groups]
            shift = np.repeat(first - np.concatenate(([0], np.cumsum(k)[:-1])), k)
            rows = np.arange(int(k.sum()), dtype=np.int64) + shift
        row_off, _, _ = lay.offsets(self.side)
        row_group = np.repeat(np.arange(lay.num_groups, dtype=np.int64), lay.group_rows)
        ptr = (
            np.array([b.b8.data_ptr() for b in self.g_buf] or [0], dtype=np.int64)[row_group[rows]]
            if rows.size
            else np.zeros(0, dtype=np.int64)
        )
        addr = ptr + row_off[rows]
        stride = lay.row_stride(self.side)[rows]
        nbytes = lay.row_nbytes[rows]
        cum = np.zeros(rows.shape[0], dtype=np.int64)
        if rows.size > 1:
            np.cumsum(nbytes[:-1], out=cum[1:])
        g = 0
        for v in (addr, stride, nbytes):
            if v.size:
                g = math.gcd(g, int(np.gcd.reduce(v)))
        unit = next(u for u in (8, 4, 2, 1) if g % u == 0)
        table = torch.from_numpy(np.stack([addr, stride, nbytes, cum])).to(self.device)
        hit = self._tables[key] = (table, cum, unit)
        return hit

    def view(self, g: int, j0: int, j1: int) -> tuple[int, Any]:
        """(unit, page view) of rows ``[j0, j1)`` of group ``g``: 2-D for one row, else 3-D."""
        key = (g, j0, j1)
        v = self._views.get(key)
        if v is None:
            buf = self.g_buf[g]
            n, S, step = self.g_n[g], self.g_S[g], self.g_step[g]
            boff = self.g_off[g] + j0 * step
            kk = j1 - j0
            u = unit_of(n, boff, step if kk > 1 else 0, S, buf.soff)
            nb = buf.nbytes // S
            base = buf.soff // u + boff // u
            if kk == 1:
                pv = buf.view(u).as_strided((nb, n // u), (S // u, 1), base)
            else:
                pv = buf.view(u).as_strided((kk, nb, n // u), (step // u, S // u, 1), base)
            v = self._views[key] = (u, pv)
        return v


def stage_view(st: Any, u: int) -> tuple[Any, int]:
    """(the staging tensor's storage in ``u``-byte elements, its start in elements).

    Positions ``p`` with ``(storage_offset + p) % u == 0`` map to element ``start + p // u``
    whatever the alignment of the tensor's first byte.
    """
    if u == 1:
        return st, int(st.storage_offset())
    soff = int(st.storage_offset())
    head = (-soff) % u  # bytes before the first aligned element
    n = (st.numel() - head) // u * u
    v = st[head : max(head, head + n)].view(unit_dtype(u))
    # an aligned byte p (p = head mod u, head < u) is element (p - head) / u = p // u of v
    return v, int(v.storage_offset())
