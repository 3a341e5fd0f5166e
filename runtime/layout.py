"""Logical identity of every element of a state on one rank.

The distribution rule (docs/design.md §3), shared by the planner and by anything that checks
bytes (the compiler's verifier, the demo's tag check):

* replicated: every rank holds the whole segment;
* ``split tp [by unit]`` with ``u = size / unit`` units: when ``u % tp == 0`` rank ``r`` holds
  units ``[r*u/tp, (r+1)*u/tp)``; when ``tp % u == 0`` it holds exactly one unit,
  ``floor(r*u/tp)`` (consecutive ranks share a unit, never ``r % u``).

A state's *global* element index is its row-major index in the TP=1 layout of one logical
block, with ``concat`` dims laid out segment after segment, a ``paged`` dim spanning all kernel
blocks of the logical block (``kernel_blocks * size`` tokens), and, for a per-kernel-block
state with no paged dim, the kernel block as an extra outermost dim.

A ``concat`` segment may be a small array of its own (a *structured* segment, e.g. vLLM's CPU
page keeps K as ``[dim][token]`` and V as ``[token][dim]`` inside each head).  Such a state is
a sum of :class:`Component` s: the dims before the structured dim, one segment's own dims, then
the dims after it; each component is row-major within itself, placed at the segment's offset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import LayoutcError


class ShardError(LayoutcError, ValueError):
    """A segment cannot be split over the requested TP size."""


def shard(size: int, unit: int | None, tp: int, rank: int) -> tuple[int, int]:
    """(first global element, element count) of a segment held by ``rank`` of ``tp``."""
    if unit is None:
        return 0, size
    units = size // unit
    if units * unit != size:
        raise ShardError(f"size {size} is not a multiple of its unit {unit}")
    if units % tp == 0:
        per = units // tp
        return rank * per * unit, per * unit
    if tp % units == 0:
        return (rank * units // tp) * unit, unit
    raise ShardError(f"{units} units cannot be split over tp {tp}")


@dataclass(frozen=True)
class SegmentDesc:
    name: str
    size: int  # global elements (of one kernel block for a paged sub-dim)
    unit: int  # 0: replicated
    dims: tuple[DimDesc, ...] = ()  # a structured segment: its own dims (then unit is 0)


@dataclass(frozen=True)
class DimDesc:
    name: str
    segments: tuple[SegmentDesc, ...]
    paged: bool = False

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)

    @property
    def structured(self) -> bool:
        return any(s.dims for s in self.segments)


def _unit(seg: SegmentDesc) -> int | None:
    return seg.unit or None


def local_dim(dim: DimDesc, tp: int, rank: int) -> list[tuple[int, int, int]]:
    """Pieces of a dim held by a rank: ``(global_start, local_start, length)``, in local order.

    ``global_start`` counts in the dim's global index space (segments laid end to end).
    For a paged dim, the local extent is one kernel block (``size`` tokens); the caller adds
    ``k * size`` to the global start for kernel block ``k``.  A structured segment is one piece
    of its elements (local and global element counts differ only through its own splits).
    """
    out = []
    gbase = 0
    lbase = 0
    for seg in dim.segments:
        if seg.dims:
            n = math.prod(local_size(d, tp) for d in seg.dims)
            out.append((gbase, lbase, n))
        else:
            g0, n = shard(seg.size, _unit(seg), tp, rank)
            out.append((gbase + g0, lbase, n))
        gbase += seg.size
        lbase += n
    return out


def local_size(dim: DimDesc, tp: int) -> int:
    """Elements of a dim held by any rank (every rank holds as many)."""
    return sum(p[2] for p in local_dim(dim, tp, 0))


def local_shape(dims: tuple[DimDesc, ...], tp: int, rank: int) -> tuple[int, ...]:
    return tuple(sum(p[2] for p in local_dim(d, tp, rank)) for d in dims)


@dataclass(frozen=True)
class Component:
    """A plain (unstructured) part of a state: its dims and where its elements sit.

    Element with local coordinates ``x`` (per dim, in the dim's local index space) sits at
    ``local_base + sum(x * local_strides)`` within the state on a rank; its global identity is
    ``global_base + sum(g(x) * global_strides)`` with ``g`` the dim's local-to-global map
    (:func:`local_dim`; a paged dim's global extent spans ``paged_factor`` kernel blocks).
    """

    dims: tuple[DimDesc, ...]
    local_base: int
    local_strides: tuple[int, ...]
    global_base: int
    global_strides: tuple[int, ...]


def _row_major(sizes: list[int], inner: int = 1) -> tuple[int, ...]:
    out = []
    acc = inner
    for n in reversed(sizes):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def _global_size(dim: DimDesc, paged_factor: int) -> int:
    return dim.size * (paged_factor if dim.paged else 1)


def components(dims: tuple[DimDesc, ...], tp: int, paged_factor: int) -> tuple[Component, ...]:
    """The components of a state at TP ``tp`` (one, unless a dim has structured segments).

    ``paged_factor`` is the number of kernel blocks a paged dim spans in the identity (the
    side's ``kernel_blocks`` for a per-kernel-block page, else 1).
    """
    j = next((i for i, d in enumerate(dims) if d.structured), None)
    if j is None:
        local = [local_size(d, tp) for d in dims]
        glob = [_global_size(d, paged_factor) for d in dims]
        return (Component(tuple(dims), 0, _row_major(local), 0, _row_major(glob)),)
    outer, struct, inner = dims[:j], dims[j], dims[j + 1 :]
    il = math.prod(local_size(d, tp) for d in inner)
    ig = math.prod(_global_size(d, paged_factor) for d in inner)
    inner_l, inner_g = (
        _row_major([local_size(d, tp) for d in inner]),
        _row_major([_global_size(d, paged_factor) for d in inner]),
    )
    subs = []
    for seg in struct.segments:
        sub = seg.dims or (DimDesc(seg.name, (SegmentDesc(seg.name, seg.size, seg.unit),)),)
        subs.append(sub)
    seg_l = [math.prod(local_size(d, tp) for d in sub) for sub in subs]
    seg_g = [math.prod(_global_size(d, paged_factor) for d in sub) for sub in subs]
    outer_l = _row_major([local_size(d, tp) for d in outer], sum(seg_l) * il)
    outer_g = _row_major([_global_size(d, paged_factor) for d in outer], sum(seg_g) * ig)
    out = []
    off_l = off_g = 0
    for sub, nl, ng in zip(subs, seg_l, seg_g):
        sub_l = _row_major([local_size(d, tp) for d in sub], il)
        sub_g = _row_major([_global_size(d, paged_factor) for d in sub], ig)
        out.append(
            Component(
                (*outer, *sub, *inner),
                off_l * il,
                (*outer_l, *sub_l, *inner_l),
                off_g * ig,
                (*outer_g, *sub_g, *inner_g),
            )
        )
        off_l += nl
        off_g += ng
    return tuple(out)


def global_elements(dims: tuple[DimDesc, ...], paged_factor: int) -> int:
    """Elements of one copy of a state in the identity (TP 1, paged dims extended)."""
    return sum(
        math.prod(_global_size(d, paged_factor) for d in c.dims)
        for c in components(dims, 1, paged_factor)
    )


def has_paged(dims: tuple[DimDesc, ...]) -> bool:
    return any(d.paged for d in dims) or any(
        sd.paged for d in dims for s in d.segments for sd in s.dims
    )


def element_ids(
    dims: tuple[DimDesc, ...], tp: int, rank: int, kernel_blocks: int, per_kernel: bool
) -> np.ndarray:
    """Global element ids of a state on one rank, shape ``(copies, local elements)``.

    ``copies`` is ``kernel_blocks`` for a per-kernel-block state (row ``k`` describes the state
    in kernel block ``k`` of the logical block) and 1 for a per-logical-block state.
    Elements are in the state's local (byte) order.
    """
    factor = kernel_blocks if per_kernel else 1
    comps = components(dims, tp, factor)
    copies = kernel_blocks if per_kernel else 1
    extra = per_kernel and not has_paged(dims)
    total_one_copy = global_elements(dims, factor)
    n_local = sum(math.prod(local_size(d, tp) for d in c.dims) for c in comps)
    rows = []
    for k in range(copies):
        ids = np.zeros(n_local, dtype=np.int64)
        for c in comps:
            loc = np.array([c.local_base], dtype=np.int64)
            gid = np.array([c.global_base], dtype=np.int64)
            for dim, ls, gs in zip(c.dims, c.local_strides, c.global_strides):
                pieces = local_dim(dim, tp, rank)
                lidx = np.concatenate(
                    [np.arange(l0, l0 + n, dtype=np.int64) for _, l0, n in pieces]
                )
                gidx = np.concatenate(
                    [np.arange(g0, g0 + n, dtype=np.int64) for g0, _, n in pieces]
                )
                if dim.paged and per_kernel:
                    gidx = gidx + k * dim.size
                loc = (loc[:, None] + lidx[None, :] * ls).reshape(-1)
                gid = (gid[:, None] + gidx[None, :] * gs).reshape(-1)
            ids[loc] = gid
        if extra:
            ids = ids + k * total_one_copy
        rows.append(ids)
    return np.stack(rows)


def with_paged_size(dims: tuple[DimDesc, ...], size: int) -> tuple[DimDesc, ...]:
    """``dims`` with the paged dim (wherever it is nested) holding ``size`` tokens."""
    out = []
    for d in dims:
        if d.paged:
            seg = d.segments[0]
            out.append(DimDesc(d.name, (SegmentDesc(seg.name, size, seg.unit),), True))
            continue
        segs = tuple(
            _resized(s, with_paged_size(s.dims, size)) if s.dims else s for s in d.segments
        )
        out.append(DimDesc(d.name, segs, d.paged))
    return tuple(out)


def _resized(seg: SegmentDesc, dims: tuple[DimDesc, ...]) -> SegmentDesc:
    return SegmentDesc(seg.name, math.prod(d.size for d in dims), seg.unit, dims)


def window_ids(
    dims: tuple[DimDesc, ...], tp: int, rank: int, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token-window identity of a per-kernel-block paged state on one rank.

    For every element of one kernel block (in the state's local byte order): its token
    ``t`` within the kernel block, and its identity within a *window* of ``chunk`` tokens --
    the global id the element would have in a layout whose paged dim held ``chunk`` tokens,
    with token ``t % chunk``.  An element of the request's global token ``T`` then is
    (window ``T // chunk``, that identity), whatever the block sizes of the side: the identity
    two engines holding different tokens per block agree on.
    """
    comps = components(dims, tp, 1)
    comps_w = components(with_paged_size(dims, chunk), tp, 1)
    n_local = sum(math.prod(local_size(d, tp) for d in c.dims) for c in comps)
    token = np.full(n_local, -1, dtype=np.int64)
    wid = np.full(n_local, -1, dtype=np.int64)
    for c, cw in zip(comps, comps_w):
        if not any(d.paged for d in c.dims):
            raise ValueError("window identity needs a paged dim in every part of the state")
        loc = np.array([c.local_base], dtype=np.int64)
        t = np.zeros(1, dtype=np.int64)
        w = np.array([cw.global_base], dtype=np.int64)
        for dim, ls, ws in zip(c.dims, c.local_strides, cw.global_strides):
            pieces = local_dim(dim, tp, rank)
            lidx = np.concatenate([np.arange(l0, l0 + n, dtype=np.int64) for _, l0, n in pieces])
            gidx = np.concatenate([np.arange(g0, g0 + n, dtype=np.int64) for g0, _, n in pieces])
            tt = gidx if dim.paged else np.zeros_like(gidx)
            wx = gidx % chunk if dim.paged else gidx
            loc = (loc[:, None] + lidx[None, :] * ls).reshape(-1)
            t = (t[:, None] + tt[None, :]).reshape(-1)
            w = (w[:, None] + wx[None, :] * ws).reshape(-1)
        token[loc], wid[loc] = t, w
    return token, wid
