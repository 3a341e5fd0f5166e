"""Pack and unpack: gather a request's stream bytes into a staging buffer, scatter them back."""

from __future__ import annotations

from typing import Any

from .layout import StagingLayout, Stream, side_index
from .pages import BoundPages, as_blocks, torch_module
from .torch_kernels import torch_move
from .triton_kernels import fused_move, triton_kernel

__all__ = ["pack", "unpack"]


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
    torch = torch_module()
    side_index(side)
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
        fused = not on_cpu and triton_kernel() is not None
    if fused:
        if on_cpu or triton_kernel() is None:
            raise ValueError("staging: the fused kernel needs CUDA and triton")
        fused_move(bound, stream, block_ids, device_block_ids, st, start, end, into_stage)
        return end - start
    host_blk, dev_blk = as_blocks(block_ids, st.device, device_block_ids)
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
        torch_move(bound, stream, host_blk, dev_blk, st, start, end, into_stage, on_cpu, grouped)
    finally:
        if saved_threads is not None:
            torch.set_num_threads(saved_threads)
    return end - start


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
