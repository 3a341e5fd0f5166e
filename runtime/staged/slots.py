"""Staging memory: the registered buffer cut into slots, and block ids on their way to the
GPU."""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

__all__ = ["PinnedRing", "SlotPool", "SLOT_ALIGN"]

SLOT_ALIGN = 4096


class SlotPool:
    """The registered staging tensor, cut into equal slots handed out in turn."""

    def __init__(self, tensor: Any, slots: int, mem_type: str | None = None) -> None:
        self.tensor = tensor
        #: how NIXL sees the buffer ("DRAM" or "VRAM"; default: from the tensor's device)
        self.mem_type = mem_type or ("VRAM" if tensor.device.type == "cuda" else "DRAM")
        nbytes = int(tensor.numel() * tensor.element_size())
        self.slot_bytes = (nbytes // slots) // SLOT_ALIGN * SLOT_ALIGN
        if self.slot_bytes < SLOT_ALIGN:
            raise ValueError(
                f"staging buffer of {nbytes} bytes is too small for {slots} slots of at least "
                f"{SLOT_ALIGN} bytes"
            )
        self.slots = slots
        self.addr = int(tensor.data_ptr())
        self.devid = (tensor.device.index or 0) if tensor.device.type == "cuda" else 0
        self.free: deque[int] = deque(range(slots))
        # slot -> (until, peer name, request id): held back after a failure
        self.held: dict[int, tuple[float, str, str]] = {}
        self.b8 = tensor.reshape(-1)

    def take(self) -> int | None:
        return self.free.popleft() if self.free else None

    def give(self, s: int) -> None:
        self.free.append(s)

    def hold(self, s: int, until: float, peer: str, rid: str) -> None:
        self.held[s] = (until, peer, rid)

    def release_held(
        self, *, now: float | None = None, peer: str | None = None, rid: str | None = None
    ) -> int:
        """Free held slots that expired (``now``) or belong to ``peer`` (and ``rid``)."""
        out = 0
        for s, (until, p, r) in list(self.held.items()):
            expired = now is not None and now >= until
            match = peer is not None and p == peer and (rid is None or r == rid)
            if expired or match:
                del self.held[s]
                self.free.append(s)
                out += 1
        return out

    def view(self, s: int, nbytes: int) -> Any:
        off = s * self.slot_bytes
        return self.b8[off : off + nbytes]

    def slot_addr(self, s: int) -> int:
        return self.addr + s * self.slot_bytes

    def info(self) -> dict[str, int | str]:
        return {
            "addr": self.addr,
            "nbytes": self.slots * self.slot_bytes,
            "devid": self.devid,
            "slots": self.slots,
            "slot_bytes": self.slot_bytes,
            "mem": self.mem_type,
        }


class PinnedRing:
    """Block ids on their way to the GPU: a pinned host ring and copies queued on the stream.

    ``torch.from_numpy(ids).to(device)`` copies from pageable memory and so waits for the
    GPU -- for every kernel already queued and, with several processes on one GPU, for their
    time slices (0.1-0.4 ms of host time per request measured on an H100); allocating pinned
    memory per request may synchronize too.  The ring is allocated once and each request's
    ids are ONE queued copy (no event: with several processes on one GPU every CUDA call
    costs 0.1-0.3 ms of host time).  Before the ring wraps, the device is synchronized, so
    every copy queued from it has read its bytes (once per ``capacity`` block ids).
    """

    def __init__(self, device: Any, capacity: int = 1 << 18) -> None:
        import torch

        self.device = device
        self.host = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
        self.np = self.host.numpy()
        self.pos = 0

    def to_device(self, ids: np.ndarray) -> Any:
        import torch

        n = int(ids.shape[0])
        if n > self.host.shape[0]:  # a huge request: a plain (synchronous) copy
            return torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)
        if self.pos + n > self.host.shape[0]:
            torch.cuda.synchronize(self.device)
            self.pos = 0
        a, b = self.pos, self.pos + n
        self.np[a:b] = ids
        self.pos = b
        with torch.cuda.device(self.device):
            out = torch.empty(n, dtype=torch.int64, device=self.device)
            out.copy_(self.host[a:b], non_blocking=True)
        return out
