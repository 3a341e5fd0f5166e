"""One request expanded into every index array and pack map its transfer needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..descriptors import broadcast_indices
from .layout import DEFAULT_CHUNK_BYTES, StagingLayout, Stream, stream_map

__all__ = ["Expansion", "KERNELS", "check_table", "count_ops", "expand"]


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


def check_table(layout: StagingLayout, table: Any) -> None:
    if table.num_rows != layout.num_rows or not np.array_equal(table.row_nbytes, layout.row_nbytes):
        raise ValueError(
            f"PairTable ({table.num_rows} rows) does not match the staging layout "
            f"({layout.num_rows} rows): build both from the same plan, ranks and layer_pages"
        )


KERNELS = ("per-row", "grouped", "fused")


def count_ops(kernel: str, rows: int, groups: int, chunks: int) -> int:
    """Kernel calls of one side's full pack (or unpack) of a request."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
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
        check_table(layout, table)
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

    stream = stream_map(layout, nblk, groups)
    total = stream.total_bytes
    bounds = np.arange(0, total, int(chunk_bytes), dtype=np.int64)
    bounds = np.append(bounds, np.int64(total)) if total else np.zeros(1, dtype=np.int64)
    if total:
        lo = np.searchsorted(stream.end, bounds[:-1], side="right")
        hi = np.searchsorted(stream.base, bounds[1:], side="left")
        chunk_groups = np.stack([lo, np.maximum(lo, hi)], axis=1).astype(np.int64)
    else:
        chunk_groups = np.zeros((0, 2), dtype=np.int64)
    n_ops = count_ops(
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
