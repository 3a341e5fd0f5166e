"""The fused pack/unpack kernel (triton): one launch moves a whole chunk."""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np

from .layout import Stream
from .pages import BoundPages, torch_module, unit_dtype, unit_of

__all__ = ["FusedLaunch", "fused_move", "triton_kernel"]

_TRITON: list[Any] = []


def triton_kernel() -> Any:
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
        self.kernel = triton_kernel()
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
        unit = min(unit_of(self.unit, start, end, st.data_ptr()), 8)
        stage = st[: end - start]
        if unit > 1:
            stage = stage.view(unit_dtype(unit))
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


def fused_move(
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
    torch = torch_module()
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
