"""The staging buffer's memory: on the pages' device, or pinned host memory beside GPU pages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..endpoint.buffers import host_staging_tensor

__all__ = ["STAGING_MEMORY", "StagingMemory", "pin_host_tensor", "staging_memory"]

#: Where an endpoint's staging buffer may live (``Endpoint(staging_memory=...)``).
STAGING_MEMORY = ("device", "host")


@dataclass(eq=False)
class StagingMemory:
    """One endpoint's staging tensor and how NIXL sees it.

    ``mem_type``: ``"VRAM"`` or ``"DRAM"``; ``bounce``: the pages are on a GPU and the
    staging buffer in host memory, so a pack is a kernel into a device bounce buffer and a
    copy to host memory, an unpack the reverse (the emulated cross-node link, or any link
    that only moves host memory).
    """

    tensor: Any
    mem_type: str
    bounce: bool
    device: Any = None  # the pages' torch device
    pinned: bool = False
    _unpin: Any = field(default=None, repr=False)

    def release(self) -> None:
        """Unpin (the tensor itself goes with its last reference)."""
        if self._unpin is not None:
            unpin, self._unpin = self._unpin, None
            unpin()


def pin_host_tensor(t: Any) -> Any:
    """Page-lock host tensor ``t`` for asynchronous copies to and from GPUs
    (``cudaHostRegister``); returns the function that unpins it, or None when it could not
    be pinned."""
    import torch

    try:
        rt = torch.cuda.cudart()
        ptr, n = int(t.data_ptr()), int(t.numel() * t.element_size())
        rc = rt.cudaHostRegister(ptr, n, 0)
    except Exception:  # noqa: BLE001 - no CUDA runtime: not pinned
        return None
    if int(getattr(rc, "value", rc)) != 0:
        return None

    def unpin() -> None:
        try:
            rt.cudaHostUnregister(ptr)
        except Exception:  # noqa: BLE001 - at exit, CUDA may be gone
            pass

    return unpin


def staging_memory(nbytes: int, device: Any, where: str = "device") -> StagingMemory:
    """A staging buffer of ``nbytes`` for pages on ``device`` (a torch device).

    ``where="device"``: on the pages' device (host memory on transparent huge pages for CPU
    pages, see ``host_staging_tensor``; device memory for GPU pages).  ``where="host"``:
    host memory whatever the pages' device; for GPU pages it is the same huge-page buffer,
    page-locked (``cudaHostRegister``; a pinned torch tensor where that fails) so that the
    copies to and from the GPU are asynchronous DMA.
    """
    if where not in STAGING_MEMORY:
        raise ValueError(
            f"staging memory must be one of {', '.join(STAGING_MEMORY)}, got {where!r}"
        )
    import torch

    if device.type == "cpu":
        return StagingMemory(host_staging_tensor(nbytes), "DRAM", bounce=False, device=device)
    if where == "device":
        t = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        return StagingMemory(t, "VRAM", bounce=False, device=device)
    t = host_staging_tensor(nbytes)
    unpin = pin_host_tensor(t)
    if unpin is None:
        t = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)
    return StagingMemory(t, "DRAM", bounce=True, device=device, pinned=True, _unpin=unpin)
