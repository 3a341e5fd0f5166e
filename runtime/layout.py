"""Logical identity of every element of a state on one rank.

The distribution rule (DESIGN.md §3), shared by the planner and by anything that checks
bytes (the compiler's tag simulation, the demo's verification):

* replicated: every rank holds the whole segment;
* ``split tp [by unit]`` with ``u = size / unit`` units: when ``u % tp == 0`` rank ``r`` holds
  units ``[r*u/tp, (r+1)*u/tp)``; when ``tp % u == 0`` it holds exactly one unit,
  ``floor(r*u/tp)`` (consecutive ranks share a unit, never ``r % u``).

A state's *global* element index is its row-major index in the TP=1 layout of one logical
block, with ``concat`` dims laid out segment after segment, a ``paged`` dim spanning all kernel
blocks of the logical block (``kernel_blocks * size`` tokens), and, for a per-kernel-block
state with no paged dim, the kernel block as an extra outermost dim.
"""

from __future__ import annotations

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
    size: int  # global elements
    unit: int  # 0: replicated


@dataclass(frozen=True)
class DimDesc:
    name: str
    segments: tuple[SegmentDesc, ...]
    paged: bool = False

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)


def _unit(seg: SegmentDesc) -> int | None:
    return seg.unit or None


def local_dim(dim: DimDesc, tp: int, rank: int) -> list[tuple[int, int, int]]:
    """Pieces of a dim held by a rank: ``(global_start, local_start, length)``, in local order.

    ``global_start`` counts in the dim's global index space (segments laid end to end).
    For a paged dim, the local extent is one kernel block (``size`` tokens); the caller adds
    ``k * size`` to the global start for kernel block ``k``.
    """
    out = []
    gbase = 0
    lbase = 0
    for seg in dim.segments:
        g0, n = shard(seg.size, _unit(seg), tp, rank)
        out.append((gbase + g0, lbase, n))
        gbase += seg.size
        lbase += n
    return out


def local_shape(dims: tuple[DimDesc, ...], tp: int, rank: int) -> tuple[int, ...]:
    return tuple(sum(p[2] for p in local_dim(d, tp, rank)) for d in dims)


def element_ids(
    dims: tuple[DimDesc, ...], tp: int, rank: int, kernel_blocks: int, per_kernel: bool
) -> np.ndarray:
    """Global element ids of a state on one rank, shape ``(copies, local elements)``.

    ``copies`` is ``kernel_blocks`` for a per-kernel-block state (row ``k`` describes the state
    in kernel block ``k`` of the logical block) and 1 for a per-logical-block state.
    Elements are in the state's local row-major (byte) order.
    """
    has_paged = any(d.paged for d in dims)
    copies = kernel_blocks if per_kernel else 1
    gsizes = [d.size * (kernel_blocks if (d.paged and per_kernel) else 1) for d in dims]
    extra = kernel_blocks if (per_kernel and not has_paged) else 1
    gstrides = [0] * len(dims)
    acc = 1
    for i in range(len(dims) - 1, -1, -1):
        gstrides[i] = acc
        acc *= gsizes[i]
    total_one_copy = acc
    rows = []
    for k in range(copies):
        ids = np.zeros(1, dtype=np.int64)
        for dim, gs in zip(dims, gstrides):
            idx = np.concatenate(
                [np.arange(g0, g0 + n, dtype=np.int64) for g0, _, n in local_dim(dim, tp, rank)]
            )
            if dim.paged and per_kernel:
                idx = idx + k * dim.size
            ids = (ids[:, None] + idx[None, :] * gs).reshape(-1)
        if extra > 1:
            ids = ids + k * total_one_copy
        rows.append(ids)
    return np.stack(rows)
