"""Peers an endpoint completed a handshake with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..auth import Channel
from ..descriptors import PairTable, Segment, segments_by_key
from ..plan import Plan, SideLayout

__all__ = ["Peer", "StagingInfo", "peer_from_header"]


@dataclass(frozen=True)
class StagingInfo:
    """A peer's staging buffer, from its handshake header."""

    addr: int
    nbytes: int
    devid: int
    slots: int
    slot_bytes: int
    #: how NIXL sees it: "DRAM" or "VRAM" (a GPU endpoint may stage in host memory)
    mem: str = "DRAM"

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> StagingInfo | None:
        """None: the peer has no staging buffer (or announced a malformed one)."""
        st = header.get("staging")
        if not isinstance(st, dict):
            return None
        vals = [st.get(k) for k in ("addr", "nbytes", "devid", "slots", "slot_bytes")]
        ints = [v for v in vals if type(v) is int and v >= 0]
        if len(ints) != len(vals):
            return None
        mem = st.get("mem", header.get("mem_type"))
        if mem not in ("DRAM", "VRAM"):
            return None
        addr, nbytes, devid, slots, slot_bytes = ints
        info = cls(addr, nbytes, devid, slots, slot_bytes, mem=mem)
        if info.slot_bytes <= 0 or info.slots <= 0 or info.slot_bytes * info.slots > info.nbytes:
            return None
        return info

    def slot_addr(self, slot: int) -> int:
        return self.addr + slot * self.slot_bytes


@dataclass(eq=False)
class Peer:
    """One rank of the other side."""

    name: str  # NIXL agent name
    role: str
    rank: int
    tp: int  # the peer engine's TP size
    engine: str
    label: str  # e.g. "prefill rank 1"
    header: dict[str, Any]
    mem_type: str
    segments: dict[tuple[int, str], Segment]
    num_blocks: int  # logical blocks every buffer of the peer holds
    plan: Plan  # the plan between the peer's TP and this endpoint's
    staging: StagingInfo | None = None
    alive: bool = True
    dead_reason: str = ""
    #: the pair's descriptor table (built once, on first use; None: the pair moves no bytes)
    table: PairTable | None = None
    table_built: bool = False
    #: message authentication in this handshake's epoch (:mod:`~layoutc.runtime.auth`)
    channel: Channel | None = None
    #: when the peer made its handshake (its clock, ns; a later handshake of the same rank
    #: proving the auth key may replace this one)
    issued: int = 0
    #: False while a socket handshake waits for the peer's final confirmation
    confirmed: bool = True
    #: the nonce of the peer's handshake bytes: names the peer's endpoint instance
    instance: bytes = b""


def peer_from_header(
    name: str, header: dict[str, Any], label: str, plan: Plan, side: SideLayout
) -> Peer:
    """A peer from its validated header (``side``: the peer's side of ``plan``)."""
    segs: list[Segment] = []
    for i, layer in enumerate(header["layers"]):
        for page, (addr, nbytes, devid, nblocks) in layer["pages"].items():
            stride = side.page(page).logical_stride
            segs.append(Segment(i, page, int(addr), int(nbytes), int(devid), stride, int(nblocks)))
    return Peer(
        name=name,
        role=header["role"],
        rank=int(header["rank"]),
        tp=side.tp,
        engine=str(header.get("engine") or header["role"]),
        label=label,
        header=header,
        mem_type=header["mem_type"],
        segments=segments_by_key(segs),
        num_blocks=min(s.num_blocks for s in segs),
        plan=plan,
        staging=StagingInfo.from_header(header),
    )
