"""The static run table of one (decode rank, prefill rank) pair and per-request stream maps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..plan import Plan

__all__ = ["DEFAULT_CHUNK_BYTES", "StagingLayout", "Stream", "side_index", "stream_map"]

#: Default staging chunk: a 64 MiB registered buffer per peer, reused.
DEFAULT_CHUNK_BYTES = 64 << 20

_SIDES = ("prefill", "decode")


def side_index(side: str) -> int:
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
        if side_index(side) == 0:
            return self.row_prefill_offset, self.group_prefill_offset, self.group_prefill_step
        return self.row_decode_offset, self.group_decode_offset, self.group_decode_step

    def strides(self, side: str) -> np.ndarray:
        """Logical stride of each page (``page_names`` order) on ``side``."""
        return self.prefill_stride if side_index(side) == 0 else self.decode_stride

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
        return stream_map(self, num_blocks, self.groups_for_layers(layers))


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


def stream_map(layout: StagingLayout, num_blocks: int, groups: np.ndarray | None) -> Stream:
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
