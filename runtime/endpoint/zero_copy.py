"""The zero-copy strategy: one NIXL descriptor per coalesced run, page to page.

Per peer, the pair's descriptor lists are prepared once (``prep_xfer_dlist`` of the
:class:`~layoutc.runtime.descriptors.PairTable` rows); a request is then one
``make_prepped_xfer`` with index arrays built by numpy broadcasting.  A request that NIXL would
merge heavily (whole pages, consecutive blocks) posts the merged descriptors themselves
instead (``initialize_xfer``: cheaper per descriptor than an index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import nixl_compat
from ..costmodel import CostModel
from ..descriptors import merged_descriptors
from ..errors import TransferFailedError
from ..protocol import Message
from .host import Host, PeerJob
from .peers import Peer
from .requests import Request

__all__ = ["ZeroCopy"]


@dataclass(eq=False)
class _Xfer:
    peer: Peer
    handle: Any
    state: str = "PROC"
    descriptors: int = 0
    nbytes: int = 0


class ZeroCopy:
    """Page-to-page transfers (implements :class:`~.host.Strategy`)."""

    name = "zero-copy"

    def __init__(self, host: Host, cost_model: CostModel) -> None:
        self.host = host
        self.cost_model = cost_model
        self.xfers: dict[str, list[_Xfer]] = {}  # by request id
        self.requests: dict[str, Request] = {}  # requests with transfers, by id
        self.prepped: dict[str, tuple[Any, Any]] = {}  # by peer name: (local, remote) dlists

    # -- choosing ------------------------------------------------------------------------------
    def advertise(self) -> dict[str, Any]:
        return {}

    def estimate(self, job: PeerJob) -> float | None:
        return self.cost_model.zero_copy_s(job.posted, job.nbytes)

    # -- moving ----------------------------------------------------------------------------------
    def start(self, req: Request, jobs: list[PeerJob]) -> None:
        host = self.host
        tel = host.telemetry
        xs = self.xfers.setdefault(req.rid, [])
        self.requests[req.rid] = req
        for job in jobs:
            peer = job.peer
            table = job.table
            try:
                n_idx = sum(
                    int(table.row_nbytes[p.rows].shape[0]) * int(p.local.shape[0])
                    for p in job.parts
                )
                explicit = any(p.explicit is not None for p in job.parts)
                if explicit or job.posted * 4 <= n_idx:
                    # NIXL would merge >= 3 of 4 indices (whole pages, consecutive blocks):
                    # post the merged descriptors themselves (~25 ns each) instead of every
                    # index (~32 ns each; 1 ms for a 1 GiB request of 32k blocks); a token
                    # remap's descriptors are explicit anyway
                    merged = [
                        (*p.explicit, p.nbytes)
                        if p.explicit is not None
                        else merged_descriptors(table, p.local, p.remote, p.rows, p.runs)
                        for p in job.parts
                    ]
                    loc = np.concatenate([m[0] for m in merged])
                    rem = np.concatenate([m[1] for m in merged])
                    nbytes = sum(m[2] for m in merged)
                    handle = host.agent.initialize_xfer(
                        job.op,
                        host.agent.get_xfer_descs(loc, host.mem_type),
                        host.agent.get_xfer_descs(rem, peer.mem_type),
                        peer.name,
                    )
                    n_desc = int(loc.shape[0])
                else:
                    lh, rh = self._prep(peer, job)
                    idx = [table.indices(p.local, p.remote, p.rows) for p in job.parts]
                    li = np.concatenate([i[0] for i in idx]) if len(idx) > 1 else idx[0][0]
                    ri = np.concatenate([i[1] for i in idx]) if len(idx) > 1 else idx[0][1]
                    nbytes = sum(i[2] for i in idx)
                    handle = host.agent.make_prepped_xfer(job.op, lh, li, rh, ri)
                    n_desc = int(li.size)
            except nixl_compat.nixl_errors() as e:
                host.peer_error(req, peer, e, "preparing")
                return
            tel.add("xfer_handles_created")
            x = _Xfer(peer, handle, "PROC", n_desc, nbytes)
            xs.append(x)
            try:
                x.state = host.agent.transfer(handle)
            except nixl_compat.nixl_errors() as e:
                host.peer_error(req, peer, e, "posting")
                return
            tel.add("transfers_posted")
            tel.add("descriptors_posted", x.descriptors)
            tel.add("bytes_posted", nbytes)
            req.descriptors += x.descriptors
            req.nbytes += nbytes
            if x.state == "ERR":
                host.fail(
                    req,
                    TransferFailedError(
                        f"{host.label}: request {req.rid!r}: NIXL reported ERR posting the "
                        f"{job.op} with {peer.label}",
                        peer=peer.label,
                        request_id=req.rid,
                    ),
                )
                return

    def _prep(self, peer: Peer, job: PeerJob) -> tuple[Any, Any]:
        """The pair's descriptor lists, prepared once per peer."""
        hit = self.prepped.get(peer.name)
        if hit is not None:
            return hit
        host, t = self.host, job.table
        lh = host.agent.prep_xfer_dlist("NIXL_INIT_AGENT", t.local_rows, host.mem_type)
        host.telemetry.add("dlist_handles_open")
        try:
            rh = host.agent.prep_xfer_dlist(peer.name, t.remote_rows, peer.mem_type)
        except BaseException:
            lh.release()
            host.telemetry.add("dlist_handles_open", -1)
            raise
        host.telemetry.add("dlist_handles_open")
        host.telemetry.add("descriptors_prepped", int(t.local_rows[:, 4].sum()) * 2)
        self.prepped[peer.name] = (lh, rh)
        return lh, rh

    def prepare(self, job: PeerJob) -> None:
        return None

    def on_message(self, req: Request, peer: Peer, msg: Message) -> None:
        return None

    def on_stale(self, peer_name: str, msg: Message) -> None:
        return None

    # -- progress --------------------------------------------------------------------------------
    def progress(self, now: float) -> None:
        host = self.host
        for rid, xs in list(self.xfers.items()):
            req = self.requests[rid]
            for x in xs:
                if not host.active(req):
                    break  # failed meanwhile (e.g. its peer died while checking another)
                if x.state != "PROC" or x.handle is None:
                    continue
                try:
                    x.state = host.agent.check_xfer_state(x.handle)
                except nixl_compat.nixl_errors() as e:
                    host.peer_error(req, x.peer, e, "checking")
                    break
                if x.state == "ERR":
                    host.fail(
                        req,
                        TransferFailedError(
                            f"{host.label}: request {rid!r}: NIXL reported ERR for the "
                            f"transfer with {x.peer.label}",
                            peer=x.peer.label,
                            request_id=rid,
                        ),
                    )
                    break

    def busy(self) -> bool:
        return bool(self.xfers)

    def complete(self, req: Request) -> bool:
        return all(x.state == "DONE" for x in self.xfers.get(req.rid, ()))

    def involves(self, req: Request, peer: Peer) -> bool:
        return any(x.peer is peer and x.state != "DONE" for x in self.xfers.get(req.rid, ()))

    def peers(self, req: Request) -> list[Peer]:
        return [x.peer for x in self.xfers.get(req.rid, ())]

    def pending(self, req: Request) -> list[tuple[str, str]]:
        xs = self.xfers.get(req.rid, ())
        return [(x.peer.label, x.peer.label) for x in xs if x.state != "DONE"]

    def release(self, req: Request, failed: bool) -> bool:
        self.requests.pop(req.rid, None)
        for x in self.xfers.pop(req.rid, ()):
            self._release(x)
        return True

    def _release(self, x: _Xfer) -> None:
        if x.handle is None:
            return
        try:
            x.handle.release()
            self.host.telemetry.add("xfer_handles_released")
        except nixl_compat.nixl_errors():
            self.host.telemetry.add("release_errors")
        x.handle = None

    def forget_peer(self, peer: Peer) -> None:
        hit = self.prepped.pop(peer.name, None)
        if hit is not None:
            for h in hit:
                h.release()
                self.host.telemetry.add("dlist_handles_open", -1)

    def peer_dead(self, peer: Peer) -> None:
        return None

    def stats(self) -> dict[str, int | float]:
        return {}

    def close(self) -> None:
        for rid in list(self.xfers):
            for x in self.xfers.pop(rid):
                self._release(x)
        self.requests.clear()
