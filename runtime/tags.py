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

from .layout import window_ids
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


class TokenPageTagger:
    """Tags of a per-kernel-block page for engines holding different tokens per logical block.

    A byte's identity is ``(layer, request, the request's token, the element's identity within
    a window of ``chunk`` tokens, byte)`` (:func:`~layoutc.runtime.layout.window_ids`), so a
    prefill block of 16 tokens and a decode block of 48 agree on every token they share.
    """

    def __init__(self, side: SideLayout, rank: int, page: str, chunk: int) -> None:
        pl = side.page(page)
        if pl.per != "kernel":
            raise ValueError(f"page {page!r} is not stored per kernel block")
        self.logical_stride = pl.logical_stride
        pieces = []
        tokens_per_kernel = None
        for sname in pl.states:
            st = side.state(sname)
            tok, wid = window_ids(st.dims, side.tp, rank, chunk)
            kt = _paged_tokens(st.dims)
            if tokens_per_kernel not in (None, kt):
                raise ValueError(f"page {page!r}: states hold different tokens per kernel block")
            tokens_per_kernel = kt
            skey = np.uint64(zlib.crc32(sname.encode())) << np.uint64(32)
            for k in range(pl.kernel_blocks):
                pieces.append(
                    (
                        k * pl.kernel_stride + st.offset,
                        k * kt + tok,
                        wid.astype(np.uint64) * _PHI + skey,
                        _itemsize(st),
                    )
                )
        assert tokens_per_kernel is not None
        self.tokens_per_block = tokens_per_kernel * pl.kernel_blocks
        self.pieces = tuple(sorted(pieces, key=lambda p: p[0]))

    def tags(
        self, layer: int, request: int, block_index: np.ndarray
    ) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """For the request's blocks at ``block_index`` (n,): per piece ``(byte offset, uint8
        (n, bytes), token (n, elements))``, the token being the request's token each element
        holds."""
        bi = np.asarray(block_index, dtype=np.int64)
        out = []
        for off, tok, gids, isz in self.pieces:
            token = bi[:, None] * self.tokens_per_block + tok[None, :]
            h = mix64(block_keys(layer, request, token) + gids[None, :])
            b = h.view(np.uint8).reshape(bi.shape[0], gids.shape[0], 8)[:, :, :isz]
            out.append((off, b.reshape(bi.shape[0], -1), token))
        return out

    def fill(self, buf2d: np.ndarray, blocks: np.ndarray, layer: int, request: int) -> None:
        """Write the tags of a request's logical ``blocks`` (its block ``i`` is ``blocks[i]``)
        into ``buf2d``, a (num_blocks, stride) uint8 view of the page's buffer."""
        blocks = np.asarray(blocks, dtype=np.int64)
        for off, t, _ in self.tags(layer, request, np.arange(blocks.shape[0])):
            buf2d[blocks, off : off + t.shape[1]] = t

    def mismatches(
        self, buf2d: np.ndarray, blocks: np.ndarray, layer: int, request: int, num_tokens: int
    ) -> int:
        """Bytes of the request's first ``num_tokens`` tokens in ``blocks`` that differ from
        their tags."""
        blocks = np.asarray(blocks, dtype=np.int64)
        bad = 0
        for off, t, token in self.tags(layer, request, np.arange(blocks.shape[0])):
            isz = t.shape[1] // token.shape[1]
            want = np.repeat(token < num_tokens, isz, axis=1)
            got = buf2d[blocks, off : off + t.shape[1]]
            bad += int(np.count_nonzero((got != t) & want))
        return bad


def _paged_tokens(dims) -> int:
    for d in dims:
        if d.paged:
            return int(d.size)
        for s in d.segments:
            if s.dims:
                try:
                    return _paged_tokens(s.dims)
                except ValueError:
                    continue
    raise ValueError("no paged dim")
