"""Descriptor tables: plan runs + registered buffers → NIXL descriptor rows and index arrays.

Pure numpy; no NIXL here, so every function can be tested on its own.

For one (local rank, remote rank) pair the runtime prepares **one** descriptor list per side,
once, with NIXL's strided ``Nx5`` rows ``(addr, len, devid, stride, count)``: one row per
(layer, page, run), ``stride`` = the page's logical-block stride and ``count`` = the number of
logical blocks in that buffer.  NIXL numbers the expanded descriptors row by row, so logical
block ``L`` of row ``k`` is descriptor ``row_start[k] + L`` (``row_start`` = the cumulative
block counts).  A request then needs no Python loop per block: its index arrays are one numpy
broadcast, ``row_start[rows, None] + block_ids[None, :]``, on each side.

Rows are ordered layer, page, run; the indices of one row are consecutive for consecutive
blocks, so NIXL merges a run spanning a whole page across neighbouring blocks by itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import BlockIdError
from .plan import Plan

#: Bytes of a NIXL descriptor list row, for memory estimates.
_ROW_COLUMNS = 5


@dataclass(frozen=True)
class Segment:
    """One registered buffer: the bytes of one page kind of one layer on one rank."""

    layer: int
    page: str
    addr: int
    nbytes: int
    devid: int
    logical_stride: int
    num_blocks: int


def segments_by_key(segments: list[Segment]) -> dict[tuple[int, str], Segment]:
    return {(s.layer, s.page): s for s in segments}


def synthetic_segments(
    side: Any, layer_pages: Sequence[Sequence[str]], num_blocks: int, base: int
) -> dict[tuple[int, str], Segment]:
    """Segments of ``num_blocks`` logical blocks per (layer, page) of ``side`` (a
    ``SideLayout``) at made-up, non-overlapping addresses from ``base``: descriptor tables
    for counting and planning without buffers."""
    out: list[Segment] = []
    for layer, pages in enumerate(layer_pages):
        for page in pages:
            pl = side.page(page)
            out.append(
                Segment(
                    layer,
                    page,
                    base + len(out) * (1 << 36),
                    pl.buffer_bytes(num_blocks),
                    0,
                    pl.logical_stride,
                    num_blocks,
                )
            )
    return segments_by_key(out)


@dataclass(frozen=True)
class PairTable:
    """Descriptor rows of one (local rank, remote rank) pair and how to index them.

    ``local_rows``/``remote_rows`` are the ``Nx5`` arrays given to ``prep_xfer_dlist``;
    row ``k`` of both describes the same run, with ``row_nbytes[k]`` bytes per block.
    """

    local_rows: np.ndarray
    remote_rows: np.ndarray
    row_layer: np.ndarray  # int64 (N,)
    row_nbytes: np.ndarray  # int64 (N,)
    local_row_start: np.ndarray  # int64 (N,): descriptor index of (row, block 0), local list
    remote_row_start: np.ndarray  # int64 (N,): same in the remote list
    local_limit: int  # logical blocks every local row can address
    remote_limit: int  # same on the remote side
    #: per row, for plans with a token remap (zeros otherwise): bytes per token and per kernel
    #: block on each side, and whether the row's page is stored per kernel block
    local_token_stride: np.ndarray | None = None
    remote_token_stride: np.ndarray | None = None
    local_kernel_stride: np.ndarray | None = None
    remote_kernel_stride: np.ndarray | None = None
    per_kernel: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return int(self.row_layer.shape[0])

    @property
    def bytes_per_block(self) -> int:
        """Bytes moved per logical block, over every layer."""
        return int(self.row_nbytes.sum())

    def rows_for_layers(self, layers: np.ndarray | None) -> np.ndarray | slice:
        """Row selector for a subset of layers (``None``: every row)."""
        if layers is None:
            return slice(None)
        return np.flatnonzero(np.isin(self.row_layer, layers))

    def indices(
        self,
        local_blocks: np.ndarray,
        remote_blocks: np.ndarray,
        rows: np.ndarray | slice = slice(None),
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """(local indices, remote indices, bytes) of one request; blocks already validated."""
        ls = self.local_row_start[rows]
        rs = self.remote_row_start[rows]
        li = broadcast_indices(ls, local_blocks)
        ri = broadcast_indices(rs, remote_blocks)
        nbytes = int(self.row_nbytes[rows].sum()) * int(local_blocks.shape[0])
        return li, ri, nbytes


_I32_MAX = np.iinfo(np.int32).max


def broadcast_indices(row_start: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """``row_start[:, None] + blocks[None, :]`` flattened (row outer, blocks inner), in int32
    when every index fits (NIXL takes int32 or int64 index arrays; half the bytes to write
    and read), else int64."""
    if row_start.size and blocks.size:
        hi = int(row_start.max()) + int(blocks.max())
        if hi <= _I32_MAX and int(blocks.min()) >= 0:
            rs = row_start.astype(np.int32, copy=False)
            return (rs[:, None] + blocks.astype(np.int32, copy=False)[None, :]).reshape(-1)
    return (row_start[:, None] + blocks[None, :]).reshape(-1)


def dense_rows(table: PairTable) -> np.ndarray:
    """Rows whose runs NIXL merges across consecutive blocks (bool, per row).

    ``nixlAgent::makeXferReq`` merges neighbouring indices of one strided row when the row is
    dense -- its run fills the whole stride (``len == stride``) -- and both sides have the same
    stride; indices of different rows never merge (checked against NIXL's telemetry in the
    tests).
    """
    d = getattr(table, "_dense", None)
    if d is None:
        lr, rr = table.local_rows, table.remote_rows
        d = (lr[:, 1] == lr[:, 3]) & (lr[:, 3] == rr[:, 3])
        object.__setattr__(table, "_dense", d)
    return d


class BlockRuns:
    """A request's block ids cut into runs that are consecutive on both sides.

    ``adjacent`` (neighbouring pairs consecutive on both sides, = blocks - runs) is what
    counting descriptors needs; the runs themselves (``start``, ``length``) are worked out
    when first asked for (posting merged descriptors)."""

    __slots__ = ("_joined", "nblk", "adjacent", "_start")

    def __init__(self, joined: np.ndarray, nblk: int) -> None:
        self._joined = joined  # bool (nblk - 1,): block i + 1 continues block i on both sides
        self.nblk = nblk
        self.adjacent = int(np.count_nonzero(joined))
        self._start: np.ndarray | None = None

    @property
    def start(self) -> np.ndarray:
        """int64: index (into the request's blocks) where each run starts."""
        if self._start is None:
            self._start = np.flatnonzero(np.concatenate(([True], ~self._joined))).astype(np.int64)
        return self._start if self.nblk else np.zeros(0, dtype=np.int64)

    @property
    def length(self) -> np.ndarray:
        """int64: blocks in each run."""
        return np.diff(np.append(self.start, self.nblk))


def block_runs(local_blocks: np.ndarray, remote_blocks: np.ndarray) -> BlockRuns:
    nblk = int(local_blocks.shape[0])
    if nblk < 2:
        return BlockRuns(np.zeros(0, dtype=bool), nblk)
    joined = np.diff(local_blocks) == 1
    if remote_blocks is not local_blocks:
        joined &= np.diff(remote_blocks) == 1
    return BlockRuns(joined, nblk)


def posted_count(
    table: PairTable,
    local_blocks: np.ndarray,
    remote_blocks: np.ndarray,
    rows: np.ndarray | slice = slice(None),
    runs: BlockRuns | None = None,
) -> int:
    """Descriptors NIXL posts for one request's indices (after its merges)."""
    nblk = int(local_blocks.shape[0])
    dense = dense_rows(table)[rows]
    n = int(dense.shape[0]) * nblk
    if nblk > 1:
        if runs is None:
            runs = block_runs(local_blocks, remote_blocks)
        n -= int(np.count_nonzero(dense)) * runs.adjacent
    return n


def merged_descriptors(
    table: PairTable,
    local_blocks: np.ndarray,
    remote_blocks: np.ndarray,
    rows: np.ndarray | slice = slice(None),
    runs: BlockRuns | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One request's descriptors merged as NIXL would merge its indices: ``Nx3`` rows
    ``(addr, len, devid)`` for each side, and the bytes.

    For a request that NIXL would merge heavily (whole pages, runs of consecutive blocks),
    posting these rows with ``initialize_xfer`` costs ~25 ns per descriptor instead of ~32 ns
    per *index* for ``make_prepped_xfer`` (1 ms for 32,768 indices of a 1 GiB request).
    Rows are in the same order as :meth:`PairTable.indices` (row outer, blocks inner).
    """
    lr = table.local_rows[rows]
    rr = table.remote_rows[rows]
    dense = dense_rows(table)[rows]
    nblk = int(local_blocks.shape[0])
    nbytes = int(table.row_nbytes[rows].sum()) * nblk
    if runs is None:
        runs = block_runs(local_blocks, remote_blocks)
    all_dense = bool(dense.all())
    parts = []  # dense rows: one descriptor per run of blocks; the others: one per block
    if dense.any():
        parts.append((np.flatnonzero(dense), runs.start, runs.length))
    if not all_dense:
        parts.append((np.flatnonzero(~dense), np.arange(nblk), np.ones(nblk, np.int64)))
    keys: list[np.ndarray] = []
    locs: list[np.ndarray] = []
    rems: list[np.ndarray] = []
    for idx, starts, lens in parts:
        if starts.size == 0:
            continue
        keys.append(np.repeat(idx, starts.size))
        ln = lens.astype(np.uint64)
        for side_rows, blocks, out in (
            (lr[idx], local_blocks, locs),
            (rr[idx], remote_blocks, rems),
        ):
            b0 = blocks[starts].astype(np.uint64)
            m = np.empty((idx.size, starts.size, 3), dtype=np.uint64)
            m[:, :, 0] = side_rows[:, 0:1] + b0[None, :] * side_rows[:, 3:4]
            m[:, :, 1] = side_rows[:, 1:2] * ln[None, :]
            m[:, :, 2] = side_rows[:, 2:3]
            out.append(m.reshape(-1, 3))
    if not keys:
        z = np.zeros((0, 3), dtype=np.uint64)
        return z, z.copy(), nbytes
    if all_dense:  # one part, already in row order
        return locs[0], rems[0], nbytes
    order = np.argsort(np.concatenate(keys), kind="stable")  # back into row order
    return np.concatenate(locs)[order], np.concatenate(rems)[order], nbytes


def window_descriptors(
    table: PairTable,
    rows: np.ndarray | slice,
    local_blocks: np.ndarray,
    remote_blocks: np.ndarray,
    local_windows: tuple[np.ndarray, np.ndarray, np.ndarray],
    remote_windows: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, int]:
    """One request's descriptors under a token remap: ``Nx3`` rows ``(addr, len, devid)`` for
    each side, and the bytes.

    The table's rows of per-kernel-block pages move one window of tokens (rows from 0 of
    kernel block 0); ``*_windows`` give, for every window of the request on each side, the
    index of its logical block in the request's block list, its kernel block and its first
    row (:meth:`~layoutc.runtime.plan.TokenRemap.windows`), and the rows are shifted there.
    Rows of per-logical-block pages pair ``local_blocks[i]`` with ``remote_blocks[i]``.
    Neighbours contiguous on both sides are merged into one descriptor.
    """
    assert table.per_kernel is not None
    assert table.local_token_stride is not None and table.remote_token_stride is not None
    assert table.local_kernel_stride is not None and table.remote_kernel_stride is not None
    idx = np.arange(table.num_rows, dtype=np.int64)[rows]
    pk = table.per_kernel[idx]
    parts_l: list[np.ndarray] = []
    parts_r: list[np.ndarray] = []
    nbytes = 0
    kr = idx[pk]
    if kr.size and local_windows[0].size:
        for rows_out, side_rows, blocks, (bi, kb, row), ks, ts in (
            (
                parts_l,
                table.local_rows,
                local_blocks,
                local_windows,
                table.local_kernel_stride,
                table.local_token_stride,
            ),
            (
                parts_r,
                table.remote_rows,
                remote_blocks,
                remote_windows,
                table.remote_kernel_stride,
                table.remote_token_stride,
            ),
        ):
            r = side_rows[kr].astype(np.int64)
            addr = (
                r[:, 0:1]
                + blocks[bi][None, :] * r[:, 3:4]
                + kb[None, :] * ks[kr][:, None]
                + row[None, :] * ts[kr][:, None]
            )
            m = np.empty((kr.size, bi.size, 3), dtype=np.uint64)
            m[:, :, 0] = addr
            m[:, :, 1] = r[:, 1:2]
            m[:, :, 2] = r[:, 2:3]
            rows_out.append(m.reshape(-1, 3))
        nbytes += int(table.row_nbytes[kr].sum()) * int(local_windows[0].size)
    lr_ = idx[~pk]
    n = min(local_blocks.shape[0], remote_blocks.shape[0])
    if lr_.size and n:
        for rows_out, side_rows, blocks in (
            (parts_l, table.local_rows, local_blocks[:n]),
            (parts_r, table.remote_rows, remote_blocks[:n]),
        ):
            r = side_rows[lr_].astype(np.int64)
            m = np.empty((lr_.size, n, 3), dtype=np.uint64)
            m[:, :, 0] = r[:, 0:1] + blocks[None, :] * r[:, 3:4]
            m[:, :, 1] = r[:, 1:2]
            m[:, :, 2] = r[:, 2:3]
            rows_out.append(m.reshape(-1, 3))
        nbytes += int(table.row_nbytes[lr_].sum()) * n
    if not parts_l:
        z = np.zeros((0, 3), dtype=np.uint64)
        return z, z.copy(), nbytes
    loc, rem = merge_contiguous(np.concatenate(parts_l), np.concatenate(parts_r))
    return loc, rem, nbytes


def merge_contiguous(loc: np.ndarray, rem: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge neighbouring descriptor rows ``(addr, len, devid)`` that continue each other on
    both sides (same device, the next starting where the previous ends)."""
    if loc.shape[0] < 2:
        return loc, rem
    brk = np.ones(loc.shape[0], dtype=bool)
    for m in (loc, rem):
        brk[1:] |= (m[:-1, 0] + m[:-1, 1] != m[1:, 0]) | (m[:-1, 2] != m[1:, 2])
    starts = np.flatnonzero(brk)
    if starts.size == loc.shape[0]:
        return loc, rem
    lengths = np.add.reduceat(loc[:, 1], starts)
    out = []
    for m in (loc, rem):
        x = m[starts].copy()
        x[:, 1] = lengths
        out.append(x)
    return out[0], out[1]


def build_pair_table(
    plan: Plan,
    *,
    decode_rank: int,
    prefill_rank: int,
    local_is_decode: bool,
    layer_pages: list[tuple[str, ...]],
    local_segments: dict[tuple[int, str], Segment],
    remote_segments: dict[tuple[int, str], Segment],
) -> PairTable | None:
    """Rows for every run from ``prefill_rank`` into ``decode_rank``, over all layers.

    ``layer_pages[l]`` are the pages of layer ``l``.  Returns ``None`` when the pair moves no
    bytes (the prefill rank is not a source of the decode rank).
    """
    rank_plan = plan.rank(decode_rank)
    loc_rows: list[np.ndarray] = []
    rem_rows: list[np.ndarray] = []
    row_layer: list[np.ndarray] = []
    # per row: (local, remote) token strides and kernel strides, per-kernel flag
    extra: list[np.ndarray] = []
    local_side, remote_side = (
        (plan.decode, plan.prefill) if local_is_decode else (plan.prefill, plan.decode)
    )
    for layer, pages in enumerate(layer_pages):
        for page in pages:
            runs = rank_plan.runs(page, prefill_rank)
            n = len(runs)
            if n == 0:
                continue
            if local_is_decode:
                loff, roff = runs.decode_offset, runs.prefill_offset
                lts, rts = runs.decode_token_stride, runs.prefill_token_stride
            else:
                loff, roff = runs.prefill_offset, runs.decode_offset
                lts, rts = runs.prefill_token_stride, runs.decode_token_stride
            e = np.empty((n, 5), dtype=np.int64)
            e[:, 0], e[:, 1] = lts, rts
            e[:, 2] = local_side.page(page).kernel_stride
            e[:, 3] = remote_side.page(page).kernel_stride
            e[:, 4] = local_side.page(page).per == "kernel"
            extra.append(e)
            for seg, off, out in (
                (local_segments[(layer, page)], loff, loc_rows),
                (remote_segments[(layer, page)], roff, rem_rows),
            ):
                rows = np.empty((n, _ROW_COLUMNS), dtype=np.uint64)
                rows[:, 0] = np.uint64(seg.addr) + off.astype(np.uint64)
                rows[:, 1] = runs.nbytes.astype(np.uint64)
                rows[:, 2] = seg.devid
                rows[:, 3] = seg.logical_stride
                rows[:, 4] = seg.num_blocks
                out.append(rows)
            row_layer.append(np.full(n, layer, dtype=np.int64))
    if not loc_rows:
        return None
    local_rows = np.concatenate(loc_rows)
    remote_rows = np.concatenate(rem_rows)
    ex = np.concatenate(extra)

    def starts(rows: np.ndarray) -> np.ndarray:
        counts = rows[:, 4].astype(np.int64)
        out = np.zeros_like(counts)
        np.cumsum(counts[:-1], out=out[1:])
        return out

    return PairTable(
        local_rows=local_rows,
        remote_rows=remote_rows,
        row_layer=np.concatenate(row_layer),
        row_nbytes=local_rows[:, 1].astype(np.int64),
        local_row_start=starts(local_rows),
        remote_row_start=starts(remote_rows),
        local_limit=int(local_rows[:, 4].min()),
        remote_limit=int(remote_rows[:, 4].min()),
        local_token_stride=ex[:, 0].copy(),
        remote_token_stride=ex[:, 1].copy(),
        local_kernel_stride=ex[:, 2].copy(),
        remote_kernel_stride=ex[:, 3].copy(),
        per_kernel=ex[:, 4].astype(bool),
    )


def _fmt_ids(values: np.ndarray, positions: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(f"{int(v)} (at {int(p)})" for v, p in zip(values[:limit], positions[:limit]))
    more = len(values) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def check_block_ids(
    ids: object,
    *,
    what: str,
    limit: int,
    who: str,
    request_id: str,
    peer: str | None = None,
    unique: bool = False,
) -> np.ndarray:
    """Validate a request's block ids; return them as an int64 array.

    Raises :class:`BlockIdError` naming the bad ids (value and position) when an id is not an
    integer, is negative or ``>= limit``, or (``unique=True``, destination ids) repeats.
    """
    try:
        arr = np.asarray(ids)
    except Exception as e:  # noqa: BLE001 - anything numpy cannot read is bad input
        raise BlockIdError(
            f"{who}: request {request_id!r}: {what} block ids are not an array ({e})",
            peer=peer,
            request_id=request_id,
        ) from None
    if arr.ndim != 1:
        raise BlockIdError(
            f"{who}: request {request_id!r}: {what} block ids must be a 1-D sequence, "
            f"got shape {arr.shape}",
            peer=peer,
            request_id=request_id,
        )
    if arr.size and arr.dtype.kind not in "iu":
        raise BlockIdError(
            f"{who}: request {request_id!r}: {what} block ids must be integers, got dtype "
            f"{arr.dtype}",
            peer=peer,
            request_id=request_id,
        )
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= limit):  # (two passes, no temps)
        bad = np.flatnonzero((arr < 0) | (arr >= limit))
        raise BlockIdError(
            f"{who}: request {request_id!r}: {what} block ids out of range [0, {limit}): "
            f"{_fmt_ids(arr[bad], bad)}",
            peer=peer,
            request_id=request_id,
        )
    if unique and arr.size > 1 and _repeats(arr, limit):
        order = np.argsort(arr, kind="stable")
        srt = arr[order]
        dup = np.flatnonzero(srt[1:] == srt[:-1]) + 1
        if dup.size:
            raise BlockIdError(
                f"{who}: request {request_id!r}: {what} block ids repeat (two blocks would "
                f"land in one): {_fmt_ids(srt[dup], order[dup])}",
                peer=peer,
                request_id=request_id,
            )
    return arr


def _repeats(arr: np.ndarray, limit: int) -> bool:
    """Does an id repeat?  (``arr`` within ``[0, limit)``: none when the ids increase -- one
    comparison pass, the common case of consecutive blocks; else a bitmap of the ids where
    ``limit`` is not much larger than the request, a sort otherwise.)"""
    if bool(np.all(arr[1:] > arr[:-1])):
        return False
    if limit <= 64 * arr.size + 65536:
        seen = np.zeros(limit, dtype=np.bool_)
        seen[arr] = True
        return int(np.count_nonzero(seen)) != arr.size
    return bool(np.any(np.diff(np.sort(arr)) == 0))


def check_same_count(
    local: np.ndarray,
    remote: np.ndarray,
    *,
    local_what: str,
    remote_what: str,
    who: str,
    request_id: str,
) -> None:
    if local.shape[0] != remote.shape[0]:
        raise BlockIdError(
            f"{who}: request {request_id!r}: wrong count of block ids: {local.shape[0]} "
            f"{local_what} but {remote.shape[0]} {remote_what}",
            request_id=request_id,
        )
