"""Staged transfers: pack a request's runs into one contiguous stream, unpack them at the peer.

Pure compute (numpy + torch); no NIXL here, so every function can be tested on its own.

The *zero-copy* strategy posts one NIXL descriptor per (layer, page, run, block).  The *staged*
strategy (docs/design.md §6) has the source gather every byte destined for one peer into a
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
docs/nixl.md §7: ``uint8`` ``index_copy_`` runs 3.6x slower than ``int64`` on the H100, and on CPU
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

from .expand import KERNELS, Expansion, count_ops, expand
from .layout import DEFAULT_CHUNK_BYTES, StagingLayout, Stream
from .move import pack, unpack
from .pages import BoundPages
from .triton_kernels import FusedLaunch, triton_kernel

__all__ = [
    "BoundPages",
    "DEFAULT_CHUNK_BYTES",
    "Expansion",
    "FusedLaunch",
    "KERNELS",
    "StagingLayout",
    "Stream",
    "count_ops",
    "expand",
    "pack",
    "triton_kernel",
    "unpack",
]
