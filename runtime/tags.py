"""Tagged page contents: every byte's value derives from its logical identity.

A byte of a page is identified, independently of TP, by
``(layer, request, block index within the request, state, global element id, byte within the
element)``.  The global element id comes from the plan
(``SideLayout.element_ids(state, rank)``: for each kernel-block copy, the TP=1 row-major
index of each element the rank holds).  Prefill ranks fill their pages from their own identities, decode ranks compute
what their pages must hold from *theirs* — so the check does not trust the plan's runs: a
byte that lands in the wrong place, a wrong rank's byte, a missing or duplicated run, all
show up as mismatches.

Hashing: one splitmix64 finalizer per element of ``key(layer, request, block) +
gid * φ + state key``; the element's bytes are the low ``itemsize`` bytes of that hash.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from .plan import DTYPE_SIZES, SideLayout

_PHI = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


class TagIdentityMissing(NotImplementedError):
    """The plan cannot say which logical element each byte holds."""


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64 array (wrapping arithmetic)."""
    z = z.astype(np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def block_keys(layer: int, request: np.ndarray | int, block_index: np.ndarray | int) -> np.ndarray:
    """One 64-bit key per (layer, request, block index within the request); ``request`` and
    ``block_index`` broadcast (each below 2**21, ``layer`` below 2**22)."""
    j = np.asarray(block_index, dtype=np.uint64)
    r = np.asarray(request, dtype=np.uint64)
    return mix64((np.uint64(layer) << np.uint64(42)) | (r << np.uint64(21)) | j)


def element_ids(side: SideLayout, state: str, rank: int) -> np.ndarray:
    """Global element ids of ``state`` on ``rank``, shape (copies, elements), from the plan.

    ``copies`` is the number of kernel blocks per logical block for per-kernel pages, else 1
    (``SideLayout.element_ids``).
    """
    fn = getattr(side, "element_ids", None)
    if fn is None:
        raise TagIdentityMissing(
            "this plan carries no per-state element identity (SideLayout.element_ids); "
            "regenerate it with a layoutc that provides it"
        )
    ids = np.asarray(fn(state, rank), dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None, :]
    st = side.state(state)
    pl = side.page(st.page)
    copies = pl.kernel_blocks if pl.per == "kernel" else 1
    n = st.nbytes // _itemsize(st)
    if ids.shape != (copies, n):
        raise ValueError(
            f"element_ids({state!r}, {rank}) has shape {ids.shape}, expected ({copies}, {n})"
        )
    return ids


def _itemsize(st) -> int:
    size = getattr(st, "itemsize", None)
    return int(size) if size and size > 1 else DTYPE_SIZES.get(st.dtype, int(size or 1))


@dataclass(frozen=True)
class _Piece:
    offset: int  # bytes from the logical block start
    gids: np.ndarray  # uint64 (n,): gid * φ + state key
    itemsize: int


class PageTagger:
    """Computes the tagged bytes of one page kind on one rank, for any logical blocks."""

    def __init__(self, side: SideLayout, rank: int, page: str) -> None:
        pl = side.page(page)
        self.logical_stride = pl.logical_stride
        pieces = []
        for sname in pl.states:
            st = side.state(sname)
            ids = element_ids(side, sname, rank)
            skey = np.uint64(zlib.crc32(sname.encode())) << np.uint64(32)
            for k in range(ids.shape[0]):  # one row per kernel block copy
                gids = ids[k].astype(np.uint64) * _PHI + skey
                pieces.append(_Piece(k * pl.kernel_stride + st.offset, gids, _itemsize(st)))
        self.pieces = tuple(sorted(pieces, key=lambda p: p.offset))

    def tags(self, keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """For blocks with ``keys`` (n,): [(byte offset, uint8 array (n, nbytes))] per piece."""
        keys = np.asarray(keys, dtype=np.uint64)
        out = []
        for pc in self.pieces:
            h = mix64(keys[:, None] + pc.gids[None, :])
            b = h.view(np.uint8).reshape(keys.shape[0], pc.gids.shape[0], 8)[:, :, : pc.itemsize]
            out.append((pc.offset, b.reshape(keys.shape[0], -1)))
        return out

    def fill(self, buf2d: np.ndarray, blocks: np.ndarray, keys: np.ndarray) -> None:
        """Write the tags of logical ``blocks`` into ``buf2d`` (a (num_blocks, stride) uint8
        view of the page's buffer)."""
        for off, t in self.tags(keys):
            buf2d[blocks, off : off + t.shape[1]] = t
