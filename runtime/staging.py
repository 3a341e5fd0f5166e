"""Staged transfers: pack a request's runs into one contiguous stream, unpack them at the peer.

Pure compute (numpy + torch); no NIXL here, so every function can be tested on its own.

The *zero-copy* strategy posts one NIXL descriptor per (layer, page, run, block).  The *staged*
strategy (DESIGN.md §4) has the source gather every byte destined for one peer into a
registered staging buffer, moves it with one NIXL transfer per (peer, chunk) and has the
destination scatter it into its pages.  Both sides must agree, byte for byte, on where each
run sits in the staging **stream**; this module defines that order and the pack/unpack kernels.

Rows and stream order
---------------------
A :class:`StagingLayout` is built once per (decode rank, prefill rank) pair.  Its *rows* are
the plan's posting runs, ordered layer, page (in ``layer_pages[layer]`` order), run (in
``RankPlan.runs`` order) -- exactly the rows of :func:`descriptors.build_pair_table`, so row
``k`` here is row ``k`` of the pair's ``PairTable``.

For a request of ``B`` logical blocks the stream is **rows outer, blocks inner**: row ``k``
occupies ``[base[k], base[k] + B * nbytes[k])``, laid out as a ``[B, nbytes[k]]`` matrix whose
line ``i`` is the run of the request's ``i``-th block (``local_blocks[i]`` on one side,
``remote_blocks[i]`` on the other).  ``base`` is ``B`` times the exclusive prefix sum of the
selected rows' ``nbytes``, so a request's stream map is one ``cumsum``.

Groups and kernels
------------------
Consecutive rows of one (layer, page) with equal ``nbytes`` whose offsets advance by a constant
step on both sides form a *group*: ``k`` rows are a strided view ``(k, num_blocks, n)`` of the
page buffer (strides ``(step, logical_stride, 1)``), and their stream region is the contiguous
``[k, B, n]`` block.  Packing a group is one ``torch.index_select`` over the block ids (by
default per row on CPU, where the 2-D gather of whole runs hits torch's memcpy path; per group
on CUDA); unpacking is ``index_copy_``.  A :class:`BoundPages` (a side's buffers bound to a
layout once) caches the strided views, leaving ~4 µs of host time per call on CPU.  Every kernel works on the widest element (16, 8, 4, 2 or
1 bytes: ``complex128``, ``int64``, ...) dividing every offset, length and stride it touches;
NIXL.md measured ``uint8`` ``index_copy_`` 3.6x slower than ``int64`` on the H100, and on CPU
``uint8`` ``index_copy_`` runs at ~1.6 GB/s against ~50 GB/s for 16-byte elements, so CPU
unpacks whose unit is under 16 bytes use numpy's fancy assignment on a ``uint8`` view instead.

On CUDA, where one torch call per row or group leaves the GPU waiting on the host
(~10-15 µs per call), a triton kernel moves a whole chunk in one launch (``fused``): one
program per (run, block) reads the run's page address from a device table built once per
:class:`BoundPages` and copies it in 8-, 4-, 2- or 1-byte elements.  On one H100 it moved
1.1-1.37 TB/s each way for 4-8 KiB runs (``copy_`` of the same bytes: ~1.45 TB/s) and
0.8-0.96 TB/s for hybrid plans with 96-384-byte runs, against 0.06-0.9 TB/s for the
host-bound torch calls (``benchmarks/staging_gpu_probe.py``, 3 runs).  A launch costs
0.1-0.2 ms of host time, so on CUDA prefer chunks of 256 MiB or more.  The first call per
(element width, direction) compiles the kernel: warm it up at start.

Chunks
------
:func:`pack` and :func:`unpack` move a byte range ``[start, end)`` of the stream, so a bounded
staging buffer reused chunk after chunk carries a request of any size.  A chunk may cut a run
anywhere: the cut run is copied with a plain slice copy, the whole runs around it with the
kernels above.  :func:`expand` precomputes the chunk boundaries and which groups each chunk
touches.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .descriptors import broadcast_indices
from .plan import Plan

__all__ = [
    "BoundPages",
    "DEFAULT_CHUNK_BYTES",
    "Expansion",
    "StagingLayout",
    "Stream",
    "expand",
    "expand_loop",
    "pack",
    "unpack",
]

#: Default staging chunk: a 64 MiB registered buffer per peer, reused.
DEFAULT_CHUNK_BYTES = 64 << 20

_SIDES = ("prefill", "decode")


def _side_index(side: str) -> int:
    if side not in _SIDES:
        raise ValueError(f"side must be 'prefill' or 'decode', got {side!r}")
    return _SIDES.index(side)


# --------------------------------------------------------------------------------------------
# Static layout
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class StagingLayout:
    """The static run table of one (decode rank, prefill rank) pair, rows and groups.

    Row columns (int64, shape ``(N,)``): ``row_layer``, ``row_page`` (index into
    ``page_names``), ``row_prefill_offset``, ``row_decode_offset``, ``row_nbytes``; the offsets
    count from the start of the logical block in the page's buffer on each side.
    ``prefill_stride[p]``/``decode_stride[p]`` are the logical strides of page ``p``.

    Group columns (int64, shape ``(G,)``): ``group_row`` (first row), ``group_rows`` (``k``),
    ``group_nbytes``, ``group_prefill_offset``/``group_prefill_step`` and the decode
    equivalents (offset of the first row, step between rows), ``group_layer``,
    ``group_page``.  ``layer_groups[l]:layer_groups[l+1]`` are the groups of layer ``l``
    (likewise ``layer_rows`` for rows).
    """

    decode_rank: int
    prefill_rank: int
    num_layers: int
    page_names: tuple[str, ...]
    prefill_stride: np.ndarray
    decode_stride: np.ndarray
    row_layer: np.ndarray
    row_page: np.ndarray
    row_prefill_offset: np.ndarray
    row_decode_offset: np.ndarray
    row_nbytes: np.ndarray
    layer_rows: np.ndarray  # (num_layers + 1,)
    group_row: np.ndarray
    group_rows: np.ndarray
    group_nbytes: np.ndarray
    group_prefill_offset: np.ndarray
    group_prefill_step: np.ndarray
    group_decode_offset: np.ndarray
    group_decode_step: np.ndarray
    group_layer: np.ndarray
    group_page: np.ndarray
    layer_groups: np.ndarray  # (num_layers + 1,)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        plan: Plan,
        *,
        decode_rank: int,
        prefill_rank: int,
        layer_pages: Sequence[Sequence[str]],
    ) -> StagingLayout:
        """Rows for every run from ``prefill_rank`` into ``decode_rank`` over all layers.

        ``layer_pages[l]`` are the page names of layer ``l`` (as for ``build_pair_table``).
        A pair that moves no bytes gets a layout with zero rows.
        """
        rank_plan = plan.rank(decode_rank)
        page_names = tuple(dict.fromkeys(p for pages in layer_pages for p in pages))
        pidx = {p: i for i, p in enumerate(page_names)}
        pstride = np.array(
            [plan.prefill.page(p).logical_stride for p in page_names], dtype=np.int64
        )
        dstride = np.array([plan.decode.page(p).logical_stride for p in page_names], dtype=np.int64)

        # Per page: its runs and its groups (identical in every layer holding the page).
        tmpl: dict[str, tuple[np.ndarray, ...]] = {}
        for page in page_names:
            runs = rank_plan.runs(page, prefill_rank)
            tmpl[page] = (
                runs.prefill_offset.astype(np.int64),
                runs.decode_offset.astype(np.int64),
                runs.nbytes.astype(np.int64),
                *_groups_of(runs.prefill_offset, runs.decode_offset, runs.nbytes),
            )

        cols: dict[str, list[np.ndarray]] = {
            k: []
            for k in (
                "rl",
                "rp",
                "po",
                "do",
                "nb",
                "gr",
                "gk",
                "gn",
                "gpo",
                "gps",
                "gdo",
                "gds",
                "gl",
                "gp",
            )
        }
        layer_rows = np.zeros(len(layer_pages) + 1, dtype=np.int64)
        layer_groups = np.zeros(len(layer_pages) + 1, dtype=np.int64)
        nrows = ngroups = 0
        for layer, pages in enumerate(layer_pages):
            for page in pages:
                po, do, nb, g0, gk = tmpl[page]
                n = nb.shape[0]
                if n == 0:
                    continue
                cols["rl"].append(np.full(n, layer, dtype=np.int64))
                cols["rp"].append(np.full(n, pidx[page], dtype=np.int64))
                cols["po"].append(po)
                cols["do"].append(do)
                cols["nb"].append(nb)
                g = g0.shape[0]
                cols["gr"].append(g0 + nrows)
                cols["gk"].append(gk)
                cols["gn"].append(nb[g0])
                cols["gpo"].append(po[g0])
                cols["gdo"].append(do[g0])
                nxt = np.minimum(g0 + 1, n - 1)
                cols["gps"].append(np.where(gk > 1, po[nxt] - po[g0], 0))
                cols["gds"].append(np.where(gk > 1, do[nxt] - do[g0], 0))
                cols["gl"].append(np.full(g, layer, dtype=np.int64))
                cols["gp"].append(np.full(g, pidx[page], dtype=np.int64))
                nrows += n
                ngroups += g
            layer_rows[layer + 1] = nrows
            layer_groups[layer + 1] = ngroups

        def cat(k: str) -> np.ndarray:
            a = np.concatenate(cols[k]) if cols[k] else np.zeros(0, dtype=np.int64)
            a = a.astype(np.int64, copy=False)
            a.setflags(write=False)
            return a

        return cls(
            decode_rank=decode_rank,
            prefill_rank=prefill_rank,
            num_layers=len(layer_pages),
            page_names=page_names,
            prefill_stride=pstride,
            decode_stride=dstride,
            row_layer=cat("rl"),
            row_page=cat("rp"),
            row_prefill_offset=cat("po"),
            row_decode_offset=cat("do"),
            row_nbytes=cat("nb"),
            layer_rows=layer_rows,
            group_row=cat("gr"),
            group_rows=cat("gk"),
            group_nbytes=cat("gn"),
            group_prefill_offset=cat("gpo"),
            group_prefill_step=cat("gps"),
            group_decode_offset=cat("gdo"),
            group_decode_step=cat("gds"),
            group_layer=cat("gl"),
            group_page=cat("gp"),
            layer_groups=layer_groups,
        )

    # -- derived -------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return int(self.row_nbytes.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.group_rows.shape[0])

    @property
    def bytes_per_block(self) -> int:
        """Stream bytes per logical block, over every layer."""
        return int(self.row_nbytes.sum())

    def offsets(self, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row offsets, group offsets, group steps) on ``side``."""
        if _side_index(side) == 0:
            return self.row_prefill_offset, self.group_prefill_offset, self.group_prefill_step
        return self.row_decode_offset, self.group_decode_offset, self.group_decode_step

    def strides(self, side: str) -> np.ndarray:
        """Logical stride of each page (``page_names`` order) on ``side``."""
        return self.prefill_stride if _side_index(side) == 0 else self.decode_stride

    def row_stride(self, side: str) -> np.ndarray:
        """Logical stride of each row's page on ``side``."""
        return self.strides(side)[self.row_page]

    def _layer_ranges(self, starts: np.ndarray, layers: np.ndarray | None) -> np.ndarray | None:
        """Indices of the rows (or groups) of ``layers`` in order, or ``None`` for all."""
        if layers is None:
            return None
        layers = np.asarray(layers, dtype=np.int64).reshape(-1)
        if layers.size and (layers.min() < 0 or layers.max() >= self.num_layers):
            raise ValueError(
                f"layers out of range [0, {self.num_layers}): {layers[(layers < 0) | (layers >= self.num_layers)][:8].tolist()}"
            )
        layers = np.unique(layers)  # rows stay in stream (layer) order
        lo = starts[layers]
        cnt = starts[layers + 1] - lo
        total = int(cnt.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        # concatenated aranges [lo_j, lo_j + cnt_j) without a Python loop
        shift = np.repeat(lo - np.concatenate(([0], np.cumsum(cnt)[:-1])), cnt)
        return np.arange(total, dtype=np.int64) + shift

    def rows_for_layers(self, layers: np.ndarray | Sequence[int] | None) -> np.ndarray | None:
        return self._layer_ranges(self.layer_rows, None if layers is None else np.asarray(layers))

    def groups_for_layers(self, layers: np.ndarray | Sequence[int] | None) -> np.ndarray | None:
        return self._layer_ranges(self.layer_groups, None if layers is None else np.asarray(layers))

    def stream(self, num_blocks: int, layers: Sequence[int] | np.ndarray | None = None) -> Stream:
        """The stream map of a request of ``num_blocks`` blocks over ``layers`` (all: None)."""
        return _stream(self, num_blocks, self.groups_for_layers(layers))


def _groups_of(
    poff: np.ndarray, doff: np.ndarray, nbytes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Split rows of one page into maximal arithmetic groups: (first row, row count) arrays.

    Rows ``j..j+k`` form a group when they all have one length and their offsets advance by
    one constant step on each side (the step at least the length, so rows never overlap).
    """
    n = int(nbytes.shape[0])
    if n == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z.copy()
    starts = [0]
    counts = [1]
    step: tuple[int, int] | None = None
    p = poff.tolist()
    d = doff.tolist()
    nb = nbytes.tolist()
    for j in range(1, n):
        j0 = starts[-1]
        s = (p[j] - p[j - 1], d[j] - d[j - 1])
        ok = nb[j] == nb[j0] and s[0] >= nb[j] and s[1] >= nb[j]
        if ok and (step is None or s == step):
            step = s
            counts[-1] += 1
        else:
            starts.append(j)
            counts.append(1)
            step = None
    return np.array(starts, dtype=np.int64), np.array(counts, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Per request: stream map and expansion
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Stream:
    """Where each selected group sits in one request's stream.

    ``groups``: selected group ids in stream order; ``base``/``end``: their byte range in the
    stream (int64, shape ``(G,)``); ``total_bytes``: the stream length.
    """

    num_blocks: int
    groups: np.ndarray
    base: np.ndarray
    end: np.ndarray
    total_bytes: int

    def groups_in(self, start: int, end: int) -> tuple[int, int]:
        """``[first, last)`` positions (into ``groups``) of the groups overlapping ``[start, end)``."""
        lo = int(np.searchsorted(self.end, start, side="right"))
        hi = int(np.searchsorted(self.base, end, side="left"))
        return lo, max(lo, hi)


def _stream(layout: StagingLayout, num_blocks: int, groups: np.ndarray | None) -> Stream:
    if groups is None:
        size = layout.group_rows * layout.group_nbytes
        groups = np.arange(layout.num_groups, dtype=np.int64)
    else:
        size = layout.group_rows[groups] * layout.group_nbytes[groups]
    size = size * int(num_blocks)
    end = np.cumsum(size)
    base = end - size
    total = int(end[-1]) if end.shape[0] else 0
    return Stream(int(num_blocks), groups, base, end, total)


@dataclass(frozen=True, eq=False)
class Expansion:
    """Everything one request's transfer consumes, for both strategies.

    Zero-copy (``None`` when no ``PairTable`` was given): ``local_indices``/``remote_indices``
    (int64, rows x blocks, row outer) into the pair's prepared descriptor lists, as
    ``PairTable.indices`` returns them; ``n_descriptors`` = their length; ``n_posted`` =
    descriptors left after NIXL merges neighbours (a run spanning the whole logical stride on
    both sides, for consecutive block ids on both sides).

    Staged: ``stream`` (group byte ranges), ``chunk_bounds`` (int64 ``(C+1,)``, chunk ``c`` is
    ``[chunk_bounds[c], chunk_bounds[c+1])``), ``chunk_groups`` (int64 ``(C, 2)``: the
    ``[first, last)`` stream groups chunk ``c`` touches), ``n_ops``: kernels of a full pack.
    """

    local_blocks: np.ndarray
    remote_blocks: np.ndarray
    rows: np.ndarray | None
    nbytes: int
    local_indices: np.ndarray | None
    remote_indices: np.ndarray | None
    n_descriptors: int
    n_posted: int
    stream: Stream
    chunk_bounds: np.ndarray
    chunk_groups: np.ndarray
    n_ops: int

    @property
    def n_chunks(self) -> int:
        return int(self.chunk_bounds.shape[0]) - 1

    def chunks(self) -> list[tuple[int, int]]:
        b = self.chunk_bounds.tolist()
        return list(zip(b[:-1], b[1:]))


def _row_starts(table: Any) -> tuple[np.ndarray, np.ndarray]:
    return table.local_row_start, table.remote_row_start


def _check_table(layout: StagingLayout, table: Any) -> None:
    if table.num_rows != layout.num_rows or not np.array_equal(table.row_nbytes, layout.row_nbytes):
        raise ValueError(
            f"PairTable ({table.num_rows} rows) does not match the staging layout "
            f"({layout.num_rows} rows): build both from the same plan, ranks and layer_pages"
        )


_KERNELS = ("per-row", "grouped", "fused")


def _count_ops(kernel: str, rows: int, groups: int, chunks: int) -> int:
    """Kernel calls of one side's full pack (or unpack) of a request."""
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(_KERNELS)}, got {kernel!r}")
    if kernel == "fused":
        return chunks
    # a chunk edge cuts one group: up to 4 extra calls (cut run, partial rows)
    return (rows if kernel == "per-row" else groups) + 4 * max(0, chunks - 1)


def expand(
    layout: StagingLayout,
    local_blocks: np.ndarray | Sequence[int],
    remote_blocks: np.ndarray | Sequence[int],
    layers: np.ndarray | Sequence[int] | None = None,
    *,
    table: Any = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    kernel: str = "per-row",
) -> Expansion:
    """Turn one request into every index array and pack map its transfer needs (vectorized).

    ``local_blocks``/``remote_blocks`` are the request's logical block ids on this side and
    the peer's (already validated, e.g. by ``descriptors.check_block_ids``); ``layers``
    restricts the transfer to some layers (``None``: all).  ``table`` is the pair's
    ``PairTable`` (same rows as ``layout``); without it the zero-copy indices are ``None``.
    ``kernel`` says how pack/unpack will run (``"per-row"``: torch, CPU default;
    ``"grouped"``: torch, one call per group; ``"fused"``: one triton launch per chunk, CUDA
    default) and only sets ``n_ops``.
    """
    local = np.asarray(local_blocks, dtype=np.int64).reshape(-1)
    remote = np.asarray(remote_blocks, dtype=np.int64).reshape(-1)
    if local.shape[0] != remote.shape[0]:
        raise ValueError(f"{local.shape[0]} local block ids but {remote.shape[0]} remote ones")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    nblk = int(local.shape[0])
    rows = layout.rows_for_layers(layers)
    groups = layout.groups_for_layers(layers)

    row_nbytes = layout.row_nbytes if rows is None else layout.row_nbytes[rows]
    nbytes = int(row_nbytes.sum()) * nblk
    n_desc = int(row_nbytes.shape[0]) * nblk

    li = ri = None
    if table is not None:
        _check_table(layout, table)
        ls, rs = _row_starts(table)
        if rows is not None:
            ls, rs = ls[rows], rs[rows]
        li = broadcast_indices(ls, local)
        ri = broadcast_indices(rs, remote)

    # Descriptors NIXL merges: whole-stride rows, consecutive ids on both sides.
    n_posted = n_desc
    if nblk > 1 and n_desc:
        full = (layout.row_nbytes == layout.row_stride("prefill")) & (
            layout.row_nbytes == layout.row_stride("decode")
        )
        if rows is not None:
            full = full[rows]
        nfull = int(np.count_nonzero(full))
        if nfull:
            adj = int(np.count_nonzero((np.diff(local) == 1) & (np.diff(remote) == 1)))
            n_posted -= nfull * adj

    stream = _stream(layout, nblk, groups)
    total = stream.total_bytes
    bounds = np.arange(0, total, int(chunk_bytes), dtype=np.int64)
    bounds = np.append(bounds, np.int64(total)) if total else np.zeros(1, dtype=np.int64)
    if total:
        lo = np.searchsorted(stream.end, bounds[:-1], side="right")
        hi = np.searchsorted(stream.base, bounds[1:], side="left")
        chunk_groups = np.stack([lo, np.maximum(lo, hi)], axis=1).astype(np.int64)
    else:
        chunk_groups = np.zeros((0, 2), dtype=np.int64)
    n_ops = _count_ops(
        kernel,
        int(layout.group_rows[stream.groups].sum()) if stream.groups.size else 0,
        int(stream.groups.shape[0]),
        int(bounds.shape[0]) - 1,
    )

    return Expansion(
        local_blocks=local,
        remote_blocks=remote,
        rows=rows,
        nbytes=nbytes,
        local_indices=li,
        remote_indices=ri,
        n_descriptors=n_desc,
        n_posted=n_posted,
        stream=stream,
        chunk_bounds=bounds,
        chunk_groups=chunk_groups,
        n_ops=n_ops,
    )


def expand_loop(
    layout: StagingLayout,
    local_blocks: Sequence[int],
    remote_blocks: Sequence[int],
    layers: Sequence[int] | None = None,
    *,
    table: Any = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    kernel: str = "per-row",
) -> Expansion:
    """:func:`expand` written the straightforward way: Python loops over rows and blocks.

    The baseline of ``benchmarks/expand_probe.py`` and the reference of the tests.
    """
    local = [int(b) for b in local_blocks]
    remote = [int(b) for b in remote_blocks]
    if len(local) != len(remote):
        raise ValueError(f"{len(local)} local block ids but {len(remote)} remote ones")
    nblk = len(local)
    want = None if layers is None else {int(x) for x in layers}
    row_layer = layout.row_layer.tolist()
    row_nbytes = layout.row_nbytes.tolist()
    pstride = layout.row_stride("prefill").tolist()
    dstride = layout.row_stride("decode").tolist()
    rows = [r for r in range(layout.num_rows) if want is None or row_layer[r] in want]
    li: list[int] = []
    ri: list[int] = []
    nbytes = 0
    n_desc = 0
    n_posted = 0
    ls = rs = None
    if table is not None:
        _check_table(layout, table)
        ls = table.local_row_start.tolist()
        rs = table.remote_row_start.tolist()
    for r in rows:
        full = row_nbytes[r] == pstride[r] == dstride[r]
        for i in range(nblk):
            if ls is not None:
                li.append(ls[r] + local[i])
                ri.append(rs[r] + remote[i])
            nbytes += row_nbytes[r]
            n_desc += 1
            merged = (
                full and i > 0 and local[i] == local[i - 1] + 1 and remote[i] == remote[i - 1] + 1
            )
            if not merged:
                n_posted += 1

    g_layer = layout.group_layer.tolist()
    g_rows = layout.group_rows.tolist()
    g_nb = layout.group_nbytes.tolist()
    groups: list[int] = []
    base: list[int] = []
    end: list[int] = []
    pos = 0
    for g in range(layout.num_groups):
        if want is not None and g_layer[g] not in want:
            continue
        groups.append(g)
        base.append(pos)
        for _ in range(g_rows[g]):
            for _ in range(nblk):
                pos += g_nb[g]
        end.append(pos)
    total = pos
    bounds = list(range(0, total, chunk_bytes)) + [total] if total else [0]
    chunk_groups = []
    for c in range(len(bounds) - 1):
        s, e = bounds[c], bounds[c + 1]
        touched = [k for k in range(len(groups)) if base[k] < e and end[k] > s]
        chunk_groups.append([touched[0], touched[-1] + 1] if touched else [0, 0])
    n_ops = _count_ops(kernel, sum(g_rows[g] for g in groups), len(groups), len(bounds) - 1)

    i64 = np.int64
    return Expansion(
        local_blocks=np.array(local, dtype=i64),
        remote_blocks=np.array(remote, dtype=i64),
        rows=None if layers is None else np.array(rows, dtype=i64),
        nbytes=nbytes,
        local_indices=None if table is None else np.array(li, dtype=i64),
        remote_indices=None if table is None else np.array(ri, dtype=i64),
        n_descriptors=n_desc,
        n_posted=n_posted,
        stream=Stream(
            nblk,
            np.array(groups, dtype=i64),
            np.array(base, dtype=i64),
            np.array(end, dtype=i64),
            total,
        ),
        chunk_bounds=np.array(bounds, dtype=i64),
        chunk_groups=np.array(chunk_groups, dtype=i64).reshape(-1, 2),
        n_ops=n_ops,
    )


# --------------------------------------------------------------------------------------------
# Pack / unpack
# --------------------------------------------------------------------------------------------
_UNITS = (16, 8, 4, 2, 1)


def _torch():
    import torch

    return torch


_UNIT_DTYPES: dict[int, Any] = {}


def _unit_dtype(unit: int):
    if not _UNIT_DTYPES:
        torch = _torch()
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


def _unit_of(*values: int) -> int:
    g = 0
    for v in values:
        g = math.gcd(g, int(v))
    for u in _UNITS:
        if g % u == 0:
            return u
    return 1


class _Buf:
    """A page buffer as flat bytes, with cached views of wider elements."""

    __slots__ = ("b8", "soff", "nbytes", "_views", "_np")

    def __init__(self, t: Any):
        torch = _torch()
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
            v = self.b8[:n] if unit == 1 else self.b8[:n].view(_unit_dtype(unit))
            self._views[unit] = v
        return v

    def numpy(self) -> np.ndarray:
        if self._np is None:
            self._np = self.b8.numpy()
        return self._np


def _as_blocks(block_ids: Any, device: Any, device_block_ids: Any):
    """(host int64 array, torch int64 tensor on ``device``) of a request's block ids."""
    torch = _torch()
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
        _side_index(side)
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
        bufs: dict[int, _Buf] = {}
        self.g_buf: list[_Buf] = []
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
                b = bufs[id(t)] = _Buf(t)
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
        torch = _torch()
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
            u = _unit_of(n, boff, step if kk > 1 else 0, S, buf.soff)
            nb = buf.nbytes // S
            base = buf.soff // u + boff // u
            if kk == 1:
                pv = buf.view(u).as_strided((nb, n // u), (S // u, 1), base)
            else:
                pv = buf.view(u).as_strided((kk, nb, n // u), (step // u, S // u, 1), base)
            v = self._views[key] = (u, pv)
        return v


def _stage_view(st: Any, u: int) -> tuple[Any, int]:
    """(the staging tensor's storage in ``u``-byte elements, its start in elements).

    Positions ``p`` with ``(storage_offset + p) % u == 0`` map to element ``start + p // u``
    whatever the alignment of the tensor's first byte.
    """
    if u == 1:
        return st, int(st.storage_offset())
    soff = int(st.storage_offset())
    head = (-soff) % u  # bytes before the first aligned element
    n = (st.numel() - head) // u * u
    v = st[head : max(head, head + n)].view(_unit_dtype(u))
    # an aligned byte p (p = head mod u, head < u) is element (p - head) / u = p // u of v
    return v, int(v.storage_offset())


def _group_ops(a: int, b: int, n: int, nblk: int, grouped: bool) -> list[tuple[int, ...]]:
    """Split bytes ``[a, b)`` of a group's ``[k, B, n]`` stream region into copy operations.

    Returns ``(0, q, r0, r1)`` for bytes ``[r0, r1)`` of a cut piece ``q`` (row ``q // B``,
    block ``q % B``), and ``(1, j0, j1, i0, i1)`` for the whole runs of rows ``[j0, j1)`` x
    blocks ``[i0, i1)`` (several rows only with every block).
    """
    ops: list[tuple[int, ...]] = []
    q0, r0 = divmod(a, n)
    q1, r1 = divmod(b, n)
    if q0 == q1:
        return [(0, q0, r0, r1)]
    if r0:
        ops.append((0, q0, r0, n))
        q0 += 1
    if q0 < q1:
        ja, ia = divmod(q0, nblk)
        jb, ib = divmod(q1, nblk)
        if ja == jb:
            ops.append((1, ja, ja + 1, ia, ib))
        else:
            if ia:
                ops.append((1, ja, ja + 1, ia, nblk))
                ja += 1
            if jb > ja:
                if grouped:
                    ops.append((1, ja, jb, 0, nblk))
                else:
                    ops.extend((1, j, j + 1, 0, nblk) for j in range(ja, jb))
            if ib:
                ops.append((1, jb, jb + 1, 0, ib))
    if r1:
        ops.append((0, q1, 0, r1))
    return ops


def _move(
    buffers: Any,
    layout: StagingLayout,
    block_ids: Any,
    stage: Any,
    side: str,
    *,
    into_stage: bool,
    start: int,
    end: int | None,
    stream: Stream | None,
    layers: Any,
    device_block_ids: Any,
    grouped: bool | None,
    fused: bool | None,
    threads: int | None = 1,
) -> int:
    torch = _torch()
    _side_index(side)
    if isinstance(buffers, BoundPages):
        if buffers.layout is not layout or buffers.side != side:
            raise ValueError(
                f"staging: pages bound to another layout or side ({buffers.side!r}, "
                f"wanted {side!r})"
            )
        bound = buffers
    else:
        bound = None
    if stream is None:
        nblk = int(block_ids.shape[0]) if hasattr(block_ids, "shape") else len(block_ids)
        stream = layout.stream(nblk, layers)
    total = stream.total_bytes
    if end is None:
        end = total
    if not 0 <= start <= end <= total:
        raise ValueError(f"byte range [{start}, {end}) outside the stream [0, {total})")
    if not stage.is_contiguous():
        raise ValueError("staging: the staging tensor must be contiguous")
    st = stage.reshape(-1)
    if st.dtype != torch.uint8:
        st = st.view(torch.uint8)
    if st.numel() < end - start:
        raise ValueError(
            f"staging tensor holds {st.numel()} bytes, the range [{start}, {end}) needs "
            f"{end - start}"
        )
    if start == end:
        return 0
    if bound is None:
        bound = BoundPages(layout, buffers, side)
    if bound.device is not None and bound.device != st.device:
        raise ValueError(f"staging: pages are on {bound.device}, the staging tensor on {st.device}")
    on_cpu = st.device.type == "cpu"
    if fused is None:
        fused = not on_cpu and _triton_kernel() is not None
    if fused:
        if on_cpu or _triton_kernel() is None:
            raise ValueError("staging: the fused kernel needs CUDA and triton")
        _fused_move(bound, stream, block_ids, device_block_ids, st, start, end, into_stage)
        return end - start
    host_blk, dev_blk = _as_blocks(block_ids, st.device, device_block_ids)
    nblk = stream.num_blocks
    if host_blk.shape[0] != nblk:
        raise ValueError(f"{host_blk.shape[0]} block ids for a stream of {nblk} blocks")
    if grouped is None:
        grouped = not on_cpu
    saved_threads = None
    if on_cpu and threads is not None:
        saved_threads = torch.get_num_threads()
        if saved_threads != threads:
            torch.set_num_threads(threads)
        else:
            saved_threads = None
    try:
        _torch_move(bound, stream, host_blk, dev_blk, st, start, end, into_stage, on_cpu, grouped)
    finally:
        if saved_threads is not None:
            torch.set_num_threads(saved_threads)
    return end - start


def _torch_move(
    bound: BoundPages,
    stream: Stream,
    host_blk: np.ndarray,
    dev_blk: Any,
    st: Any,
    start: int,
    end: int,
    into_stage: bool,
    on_cpu: bool,
    grouped: bool,
) -> None:
    """The torch (and numpy) kernels: one call per row, group, or cut run."""
    torch = _torch()
    nblk = stream.num_blocks
    st_soff = int(st.storage_offset())
    st_views: dict[int, tuple[Any, int]] = {}
    index_select = torch.index_select

    g_lo, g_hi = stream.groups_in(start, end)
    groups = stream.groups[g_lo:g_hi].tolist()
    bases = stream.base[g_lo:g_hi].tolist()
    ends = stream.end[g_lo:g_hi].tolist()
    g_n, g_off, g_step, g_S, g_buf = bound.g_n, bound.g_off, bound.g_step, bound.g_S, bound.g_buf

    for g, gbase, gend in zip(groups, bases, ends):
        n = g_n[g]
        off = g_off[g]
        step = g_step[g]
        S = g_S[g]
        buf = g_buf[g]
        out0 = gbase - start  # the group's stream position relative to the stage start
        a = (start if start > gbase else gbase) - gbase
        b = (end if end < gend else gend) - gbase
        if a == 0 and b == gend - gbase:  # the whole group: skip the splitting
            k = bound.g_k[g]
            if grouped or k == 1:
                ops: Any = ((1, 0, k, 0, nblk),)
            else:
                ops = [(1, j, j + 1, 0, nblk) for j in range(k)]
        else:
            ops = _group_ops(a, b, n, nblk, grouped)
        for op in ops:
            if op[0] == 0:
                # bytes [r0, r1) of one run cut by a chunk edge: a plain slice copy
                _, q, r0, r1 = op
                j, i = divmod(q, nblk)
                src = int(host_blk[i]) * S + off + j * step + r0
                pos = out0 + q * n + r0
                ln = r1 - r0
                if into_stage:
                    st[pos : pos + ln].copy_(buf.b8[src : src + ln])
                else:
                    buf.b8[src : src + ln].copy_(st[pos : pos + ln])
                continue
            _, j0, j1, i0, i1 = op
            kk = j1 - j0
            cnt = i1 - i0
            pos = out0 + (j0 * nblk + i0) * n
            u, page_v = bound.view(g, j0, j1)
            if (st_soff + pos) % u:  # the stage position is less aligned than the pages
                u = _unit_of(u, st_soff + pos)
                boff = off + j0 * step
                nb = buf.nbytes // S
                base = buf.soff // u + boff // u
                if kk == 1:
                    page_v = buf.view(u).as_strided((nb, n // u), (S // u, 1), base)
                else:
                    page_v = buf.view(u).as_strided((kk, nb, n // u), (step // u, S // u, 1), base)
            if not into_stage and on_cpu and u < 16:
                # index_copy_ on 1- to 8-byte elements is slow on CPU (~1.6 GB/s for uint8);
                # numpy's fancy assignment copies each run with one memcpy-like inner loop
                pages = buf.numpy()
                for j in range(j0, j1):
                    pv = np.lib.stride_tricks.as_strided(
                        pages[off + j * step :], (buf.nbytes // S, n), (S, 1), writeable=True
                    )
                    p = out0 + (j * nblk + i0) * n
                    pv[host_blk[i0:i1]] = st[p : p + cnt * n].numpy().reshape(cnt, n)
                continue
            su = st_views.get(u)
            if su is None:
                su = st_views[u] = _stage_view(st, u)
            nu = n // u
            blk = dev_blk if cnt == nblk else dev_blk[i0:i1]
            spos = su[1] + pos // u
            if kk == 1:
                stage_v = su[0].as_strided((cnt, nu), (nu, 1), spos)
                if into_stage:
                    index_select(page_v, 0, blk, out=stage_v)
                else:
                    page_v.index_copy_(0, blk, stage_v)
            else:
                stage_v = su[0].as_strided((kk, cnt, nu), (cnt * nu, nu, 1), spos)
                if into_stage:
                    index_select(page_v, 1, blk, out=stage_v)
                else:
                    page_v.index_copy_(1, blk, stage_v)


_TRITON: list[Any] = []


def _triton_kernel() -> Any:
    """The fused gather/scatter kernel (triton), or None where triton is missing."""
    if _TRITON:
        return _TRITON[0]
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001 - no triton (CPU installs): the torch kernels serve
        _TRITON.append(None)
        return None

    @triton.jit
    def _stage_kernel(
        stage_ptr,  # the staging bytes from stream byte `start`, typed in `unit` elements
        tab_ptr,  # int64 (4, R): address, stride, nbytes, exclusive cumsum of nbytes
        blk_ptr,  # int64 (nblk,): this side's block ids
        R,
        nblk,
        start,
        end,
        row0,
        UNIT: tl.constexpr,
        PACK: tl.constexpr,
        TILE: tl.constexpr,
    ):
        i = tl.program_id(0)  # block
        r = row0 + tl.program_id(1)  # row
        n = tl.load(tab_ptr + 2 * R + r)
        pos = tl.load(tab_ptr + 3 * R + r) * nblk + i * n  # stream byte of this run
        lo = tl.maximum(pos, start)
        hi = tl.minimum(pos + n, end)
        if lo < hi:
            b = tl.load(blk_ptr + i)
            addr = tl.load(tab_ptr + r) + b * tl.load(tab_ptr + R + r) + (lo - pos)
            page = addr.to(tl.pointer_type(stage_ptr.dtype.element_ty))
            stage = stage_ptr + (lo - start) // UNIT
            cnt = (hi - lo) // UNIT
            for t in range(0, cnt, TILE):
                offs = t + tl.arange(0, TILE)
                m = offs < cnt
                if PACK:
                    tl.store(stage + offs, tl.load(page + offs, mask=m), mask=m)
                else:
                    tl.store(page + offs, tl.load(stage + offs, mask=m), mask=m)

    _TRITON.append(_stage_kernel)
    return _stage_kernel


class FusedLaunch:
    """Fused kernel launches for one (binding, stream, direction), with everything a launch
    needs that does not change from chunk to chunk worked out once (the binding's device
    row table, the rows' stream positions as Python ints): a call does little more than the
    launch itself.  One program per (run, block); programs outside ``[start, end)`` exit.
    """

    __slots__ = ("kernel", "table", "R", "nblk", "unit", "into_stage", "row_pos")

    def __init__(self, bound: BoundPages, stream: Stream, into_stage: bool) -> None:
        self.kernel = _triton_kernel()
        if self.kernel is None:
            raise ValueError("staging: the fused kernel needs CUDA and triton")
        table, cum, unit = bound.row_table(stream.groups)
        self.table = table
        self.R = int(table.shape[1])
        self.nblk = stream.num_blocks
        self.unit = unit
        self.into_stage = into_stage
        # row r covers stream bytes [row_pos[r], row_pos[r] + n[r] * nblk)
        self.row_pos = (cum * self.nblk).tolist()

    def __call__(self, st: Any, start: int, end: int, blk: Any) -> None:
        """Move stream bytes ``[start, end)``; ``st``: contiguous uint8 on the device, stream
        byte ``start`` at its first byte; ``blk``: this side's block ids (int64 on the
        device)."""
        lo_row = max(bisect.bisect_right(self.row_pos, start) - 1, 0)
        hi_row = bisect.bisect_left(self.row_pos, end)
        if hi_row <= lo_row or self.nblk == 0 or start >= end:
            return
        unit = min(_unit_of(self.unit, start, end, st.data_ptr()), 8)
        stage = st[: end - start]
        if unit > 1:
            stage = stage.view(_unit_dtype(unit))
        for r0 in range(lo_row, hi_row, 65535):  # grid axis 1 is limited to 65535
            self.kernel[(self.nblk, min(65535, hi_row - r0))](
                stage,
                self.table,
                blk,
                self.R,
                self.nblk,
                start,
                end,
                r0,
                UNIT=unit,
                PACK=self.into_stage,
                TILE=8192 // unit,  # 8 KiB per step
                # 8 warps: 1,358 / 1,354 GB/s pack / unpack of 8 KiB pieces on an H100
                # against 1,193 with the default 4 (benchmarks/gpu/kernel_probe.py; a
                # 16-byte alignment hint did not help)
                num_warps=8,
            )


def _fused_move(
    bound: BoundPages,
    stream: Stream,
    block_ids: Any,
    device_block_ids: Any,
    st: Any,
    start: int,
    end: int,
    into_stage: bool,
) -> None:
    """One kernel launch for the whole byte range (see :class:`FusedLaunch`)."""
    torch = _torch()
    if device_block_ids is not None:
        blk = device_block_ids
    elif isinstance(block_ids, torch.Tensor):
        blk = block_ids.to(st.device, torch.int64)
    else:
        blk = torch.from_numpy(np.asarray(block_ids, dtype=np.int64).reshape(-1)).to(st.device)
    if int(blk.shape[0]) != stream.num_blocks:
        raise ValueError(
            f"{int(blk.shape[0])} block ids for a stream of {stream.num_blocks} blocks"
        )
    FusedLaunch(bound, stream, into_stage)(st, start, end, blk)


def pack(
    buffers: Any,
    layout: StagingLayout,
    block_ids: Any,
    out: Any,
    side: str = "prefill",
    *,
    start: int = 0,
    end: int | None = None,
    stream: Stream | None = None,
    layers: Any = None,
    device_block_ids: Any = None,
    grouped: bool | None = None,
    fused: bool | None = None,
    threads: int | None = 1,
) -> int:
    """Gather stream bytes ``[start, end)`` of one request from ``side``'s pages into ``out``.

    ``buffers[layer][page]``: contiguous tensors (any dtype) on one device, or a
    :class:`BoundPages` of them (saves host time per call); ``block_ids``:
    this side's logical block ids of the request (numpy or torch int);
    ``out``: a contiguous tensor of at least ``end - start`` bytes, on the buffers' device;
    stream byte ``start`` lands at ``out``'s first byte.  ``stream`` (from
    ``layout.stream`` or ``Expansion.stream``) saves recomputing the map per chunk;
    ``device_block_ids`` (int64 on the device) saves the per-call host-to-device copy;
    ``grouped`` forces one kernel per group (default on CUDA) or per row (default on CPU);
    ``fused`` (default: on CUDA when triton imports) runs the whole range as ONE triton
    kernel, one program per (run, block), reading each run's address from a per-binding
    device table, instead of one torch gather per row or group.  ``threads`` caps torch's
    CPU threads for the call (restored after; ``None`` leaves them): with 2 threads on a
    2-core box that has one busy core, the per-row gathers collapsed from ~8 GB/s to
    ~0.4 GB/s (OpenMP waits), so the default is 1.
    Returns the bytes packed.  Kernels are queued on the current stream (CUDA); synchronize
    before handing ``out`` to NIXL.
    """
    return _move(
        buffers,
        layout,
        block_ids,
        out,
        side,
        into_stage=True,
        start=start,
        end=end,
        stream=stream,
        layers=layers,
        device_block_ids=device_block_ids,
        grouped=grouped,
        fused=fused,
        threads=threads,
    )


def unpack(
    buffers: Any,
    layout: StagingLayout,
    block_ids: Any,
    src: Any,
    side: str = "decode",
    *,
    start: int = 0,
    end: int | None = None,
    stream: Stream | None = None,
    layers: Any = None,
    device_block_ids: Any = None,
    grouped: bool | None = None,
    fused: bool | None = None,
    threads: int | None = 1,
) -> int:
    """Scatter stream bytes ``[start, end)`` from ``src`` into ``side``'s pages (mirror of pack).

    Bytes of the pages that the range does not cover are left untouched.
    """
    return _move(
        buffers,
        layout,
        block_ids,
        src,
        side,
        into_stage=False,
        start=start,
        end=end,
        stream=stream,
        layers=layers,
        device_block_ids=device_block_ids,
        grouped=grouped,
        fused=fused,
        threads=threads,
    )
