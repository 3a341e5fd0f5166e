"""Reference implementations the bench measures the runtime against (never used by it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from layoutc.runtime.staging import DEFAULT_CHUNK_BYTES, Expansion, StagingLayout, Stream
from layoutc.runtime.staging.expand import check_table, count_ops

__all__ = ["expand_loop"]


def expand_loop(
    layout: StagingLayout,
    local_blocks: Sequence[int] | np.ndarray,
    remote_blocks: Sequence[int] | np.ndarray,
    layers: Sequence[int] | None = None,
    *,
    table: Any = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    kernel: str = "per-row",
) -> Expansion:
    """:func:`expand` written the straightforward way: Python loops over rows and blocks.

    The baseline of ``layoutc bench``'s expand section, ``benchmarks/expand_probe.py`` and
    the tests.
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
    ls: list[int] = []
    rs: list[int] = []
    if table is not None:
        check_table(layout, table)
        ls = table.local_row_start.tolist()
        rs = table.remote_row_start.tolist()
    for r in rows:
        full = row_nbytes[r] == pstride[r] == dstride[r]
        for i in range(nblk):
            if table is not None:
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
    n_ops = count_ops(kernel, sum(g_rows[g] for g in groups), len(groups), len(bounds) - 1)

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
