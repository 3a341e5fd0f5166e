"""One NIXL agent per engine rank, executing a layoutc :class:`~layoutc.runtime.plan.Plan`.

Life of an endpoint (see ``docs/runtime.md`` for the full protocol)::

    ep = Endpoint(plan, role="decode", rank=d)
    ep.register_layers(buffers)               # [{page: tensor}] per layer, registered once
    peer_bytes = exchange(ep.handshake_bytes())   # any byte channel, or ep.connect(...)
    ep.add_peer(peer_bytes)                   # validated against the plan first
    ep.pull("req-1", local_blocks, remote_blocks) # decode READs (pull); prefill: ep.push(...)
    ep.wait("req-1")                           # or poll() from the engine's loop

Completion protocol (notifications carry the request id; messages start with ``LC1 ``):

* **pull** — decode rank *d* READs from every source, and once *every* descriptor completed
  ``DONE`` it sends ``DONE`` to each prefill rank in ``plan.rank(d).notified`` (sources and
  ``notify_only``).  Prefill rank *p* (``expect(request_id)``) completes a request after
  ``len(plan.readers(p))`` distinct decode ranks sent ``DONE``; it may then free the blocks.
* **push** — prefill rank *p* WRITEs into every decode rank in ``plan.targets(p)`` (those with
  *p* among their sources); its request completes when every WRITE completed ``DONE``, and it
  then sends ``DONE`` to each target.  Decode rank *d* (``expect(request_id)``) completes after
  all ``len(plan.rank(d).sources)`` sources sent ``DONE`` (a NIXL notification arrives after
  the data it follows).
* A failing initiator sends ``FAIL`` (with the reason) to the peers of the request, which then
  fail it too instead of waiting for their timeout.  Every request has a deadline.

The endpoint is single-threaded: call it from one thread.  With NIXL's progress thread off,
the UCX worker only progresses inside this object's calls, so an engine must call
:meth:`Endpoint.poll` regularly (both sides, also while peers connect).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from . import handshake as hs
from . import nixl_compat
from .costmodel import CostModel
from .descriptors import (
    PairTable,
    Segment,
    block_runs,
    build_pair_table,
    check_block_ids,
    check_same_count,
    merged_descriptors,
    posted_count,
    segments_by_key,
)
from .errors import (
    HandshakeError,
    PeerDisconnectedError,
    PeerNotConnectedError,
    RemoteFailureError,
    TransferError,
    TransferFailedError,
    TransferTimeoutError,
)
from .plan import PLAN_FORMAT, Plan, PlanError
from .staged import (
    DEFAULT_STAGING_BYTES,
    DEFAULT_STAGING_SLOTS,
    MOVERS,
    STRATEGIES,
    StagedEngine,
    is_staged_msg,
)
from .staging import _count_ops

__all__ = [
    "Endpoint",
    "Progress",
    "STRATEGIES",
    "allocate_buffers",
    "kind_pages",
    "layer_kind_sequence",
]

NOTIF_PREFIX = b"LC1 "
_MAX_OTHER_NOTIFS = 1000
_MAX_INFO = 4096
_SLEEP_MIN_S = 50e-6
_SLEEP_MAX_S = 2e-3


# --------------------------------------------------------------------------------------------
# Layer kinds and buffers
# --------------------------------------------------------------------------------------------
def kind_pages(plan: Plan) -> dict[str, tuple[str, ...]]:
    """Layer kind -> its pages.  A plan without kinds has one kind, ``"default"``, of all pages."""
    if plan.layer_kinds:
        return {k: tuple(p) for k, p in plan.layer_kinds}
    return {"default": plan.prefill.page_names}


def layer_kind_sequence(plan: Plan, num_layers: int) -> list[str]:
    """A simple layer pattern for demos and tests: the plan's kinds in turn."""
    kinds = list(kind_pages(plan))
    return [kinds[i % len(kinds)] for i in range(num_layers)]


def allocate_buffers(
    plan: Plan,
    role: str,
    layer_kinds_sequence: Sequence[str],
    num_logical_blocks: int,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Zeroed uint8 buffers, one per (layer, page), sized ``PageLayout.buffer_bytes``."""
    import torch

    side = _side(plan, role)
    kinds = kind_pages(plan)
    if num_logical_blocks < 1:
        raise ValueError(f"num_logical_blocks must be >= 1, got {num_logical_blocks}")
    out: list[dict[str, Any]] = []
    for i, kind in enumerate(layer_kinds_sequence):
        if kind not in kinds:
            raise PlanError(f"layer {i}: no layer kind {kind!r} (kinds: {', '.join(kinds)})")
        out.append(
            {
                page: torch.zeros(
                    side.page(page).buffer_bytes(num_logical_blocks),
                    dtype=torch.uint8,
                    device=device,
                )
                for page in kinds[kind]
            }
        )
    return out


def _host_staging(nbytes: int) -> Any:
    """A host staging buffer backed by transparent huge pages where the OS offers them.

    UCX moves host memory between processes with ``process_vm_readv``/``writev`` (CMA), which
    pins the pages of both sides per call: on 2 MiB pages a 64 MiB copy ran at 11-13 GB/s
    against 5-6 GB/s on 4 KiB pages (this 2-core box, ``THP enabled=madvise``).  The buffer
    is ours, so it asks for huge pages (``madvise(MADV_HUGEPAGE)``); the pages are touched
    here so that they are resident before the first transfer.  Falls back to a plain tensor.
    """
    import mmap

    import torch

    adv = getattr(mmap, "MADV_HUGEPAGE", None)
    if adv is not None and nbytes >= (2 << 20):
        try:
            m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            m.madvise(adv)
            t = torch.frombuffer(m, dtype=torch.uint8)
            t.zero_()
            t._layoutc_mmap = m  # keep the mapping alive as long as the tensor
            return t
        except (OSError, ValueError, AttributeError, TypeError):
            pass
    return torch.zeros(nbytes, dtype=torch.uint8)


def _summary(strategies: dict[str, str]) -> str | None:
    kinds = set(strategies.values())
    if not kinds:
        return None
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _staging_of(header: dict[str, Any]) -> dict[str, int] | None:
    """A peer's staging buffer from its handshake header (None: it has none, or malformed)."""
    st = header.get("staging")
    if not isinstance(st, dict):
        return None
    try:
        out = {k: int(st[k]) for k in ("addr", "nbytes", "devid", "slots", "slot_bytes")}
    except (KeyError, TypeError, ValueError):
        return None
    if out["slot_bytes"] <= 0 or out["slots"] <= 0:
        return None
    return out


def _side(plan: Plan, role: str):
    if role == "prefill":
        return plan.prefill
    if role == "decode":
        return plan.decode
    raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")


# --------------------------------------------------------------------------------------------
# State kept per peer and per request
# --------------------------------------------------------------------------------------------
@dataclass
class _Peer:
    name: str
    role: str
    rank: int
    engine: str
    label: str
    header: dict[str, Any]
    mem_type: str
    segments: dict[tuple[int, str], Segment]
    num_blocks: int
    alive: bool = True
    dead_reason: str = ""
    table: PairTable | None = None
    table_built: bool = False
    prepped: tuple[Any, Any] | None = None
    staging: dict[str, int] | None = None  # the peer's staging buffer (from its header)


@dataclass
class _Xfer:
    peer: _Peer
    handle: Any
    state: str = "PROC"
    descriptors: int = 0
    nbytes: int = 0


@dataclass
class _Request:
    rid: str
    kind: str  # "pull" | "push" | "expect"
    engine: str | None
    started: float
    deadline: float
    timeout_s: float
    xfers: list[_Xfer] = field(default_factory=list)
    notify: list[_Peer] = field(default_factory=list)
    expected: frozenset[int] = frozenset()
    got: set[int] = field(default_factory=set)
    nbytes: int = 0
    descriptors: int = 0
    staged: dict[str, Any] = field(default_factory=dict)  # peer name -> staged.StagedCtx
    staged_ended: bool = False
    strategies: dict[str, str] = field(default_factory=dict)  # peer label -> strategy
    chunks: int = 0

    def staged_complete(self) -> bool:
        """Every staged chunk has crossed (and, on a destination, been unpacked).  A passive
        source (prefill ``expect``) needs only its readers' ``DONE``: they unpack first."""
        return all(
            c.complete for c in self.staged.values() if self.kind != "expect" or c.role == "dst"
        )


class Progress(NamedTuple):
    """What :meth:`Endpoint.poll` learned: requests that completed and requests that failed."""

    done: list[str]
    failed: dict[str, TransferError]


def _now() -> float:
    return time.monotonic()


class Endpoint:
    """A NIXL agent for one engine rank, executing one plan.

    Parameters
    ----------
    plan:       the (prefill TP, decode TP) plan, from a generated module's ``plan(...)``.
    role:       ``"prefill"`` or ``"decode"``.
    rank:       this rank's TP rank on its side.
    name:       NIXL agent name (unique among the agents that meet); default
                ``f"{engine}-{rank}"``.
    engine:     id shared by the ranks of one engine instance; default the role.
    device:     ``"cpu"`` (buffers in DRAM), ``"cuda"`` (VRAM, any GPU) or ``"cuda:N"`` (VRAM
                on GPU ``N``: pages elsewhere are refused; staging and kernels go there).
    listen_port: start NIXL's metadata listener on this port (for :meth:`connect`).
    timeout_s:  default deadline of every request and wait.
    strategy:   how requests this endpoint initiates move bytes, per peer: ``"zero-copy"``
                (one descriptor per run, page to page), ``"staged"`` (pack into the staging
                buffer, one transfer per chunk, unpack), or ``"auto"`` (the cost model picks
                per request and peer; the default).  ``pull``/``push`` can override it.
                A prefill rank given its block ids in :meth:`expect` also uses it to guess
                which readers will stage (and packs their bytes before they ask).
    staging_bytes: size of the staging buffer allocated and registered with the layers
                (default 64 MiB, on the endpoint's device); 0 turns staging off (every
                request then goes zero-copy, and peers cannot stage with this endpoint).
    staging_slots: slots the staging buffer is cut into (default 4); a chunk is one slot.
    cost_model: a :class:`~layoutc.runtime.costmodel.CostModel`, a dict of constants, or
                None for the device kind's defaults (updated from ``$LAYOUTC_COST_MODEL``).
    staged_mover: who copies staged chunks, ``"reader"``, ``"writer"``, ``"alternate"`` or
                ``"adaptive"`` (default: adaptive on host memory, writer on GPUs).
    """

    def __init__(
        self,
        plan: Plan,
        role: str = "decode",
        rank: int = 0,
        *,
        name: str | None = None,
        engine: str | None = None,
        device: str = "cpu",
        listen_port: int | None = None,
        timeout_s: float = 30.0,
        strategy: str = "auto",
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        staging_slots: int = DEFAULT_STAGING_SLOTS,
        cost_model: CostModel | dict[str, Any] | None = None,
        staged_mover: str | None = None,
    ) -> None:
        self.plan = plan
        self.side = _side(plan, role)
        self.role = role
        self.peer_role = hs.other_role(role)
        self.peer_side = _side(plan, self.peer_role)
        tp = self.side.tp
        if not isinstance(rank, int) or not 0 <= rank < tp:
            raise PlanError(f"{role} rank {rank!r} out of range for {role} TP {tp}")
        dev = str(device)
        if dev not in ("cpu", "cuda") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if not isinstance(staging_bytes, int) or staging_bytes < 0:
            raise ValueError(f"staging_bytes must be an int >= 0, got {staging_bytes!r}")
        if not isinstance(staging_slots, int) or staging_slots < 1:
            raise ValueError(f"staging_slots must be an int >= 1, got {staging_slots!r}")
        if staged_mover is not None and staged_mover not in MOVERS:
            raise ValueError(
                f"staged_mover must be one of {', '.join(MOVERS)}, got {staged_mover!r}"
            )
        kind = "cpu" if str(device) == "cpu" else "cuda"
        if cost_model is None:
            cost_model = CostModel.load(kind)
        elif isinstance(cost_model, dict):
            cost_model = CostModel.load(kind, overrides=cost_model)
        elif not isinstance(cost_model, CostModel):
            raise TypeError(f"cost_model must be a CostModel or a dict, got {type(cost_model)}")
        if strategy == "staged" and staging_bytes == 0:
            raise ValueError("strategy 'staged' needs a staging buffer (staging_bytes > 0)")
        self.strategy = strategy
        self.cost_model = cost_model
        self.staging_bytes = staging_bytes
        self.staging_slots = staging_slots
        self._mover = staged_mover
        self._staged: StagedEngine | None = None
        self.rank = rank
        self.engine = engine or role
        self.name = name or f"{self.engine}-{rank}"
        self.label = hs.rank_label(role, rank)
        self.device = str(device)
        self.mem_type = "DRAM" if self.device == "cpu" else "VRAM"
        self.timeout_s = float(timeout_s)
        self.listen_port = listen_port
        self.kinds = kind_pages(plan)
        if self.mem_type == "VRAM":
            nixl_compat.prepare_cuda_env()
        self.agent = nixl_compat.create_agent(self.name, listen_port=listen_port)
        self._closed = False
        self._saw_dead = False
        self._reg: Any = None
        self._buffers: list[dict[str, Any]] = []  # keeps the tensors alive
        self._layer_kinds: list[str] = []
        self._segments: dict[tuple[int, str], Segment] = {}
        self._num_blocks = 0
        self._peers: dict[str, _Peer] = {}  # by agent name
        self._requests: dict[str, _Request] = {}
        self._finished: dict[str, TransferError | None] = {}
        self._early: dict[str, list[tuple[float, str, dict[str, Any]]]] = {}
        self._pending_hdr: list[tuple[float, str, dict[str, Any]]] = []
        self._hs_replies: dict[str, dict[str, Any]] = {}
        self._hs_errors: dict[str, HandshakeError] = {}
        self.other_notifs: list[tuple[str, bytes]] = []
        self._info: dict[str, dict[str, Any]] = {}
        self._stats = {
            "registrations": 0,
            "registered_bytes": 0,
            "xfer_handles_created": 0,
            "xfer_handles_released": 0,
            "release_errors": 0,
            "dlist_handles_open": 0,
            "descriptors_prepped": 0,
            "descriptors_posted": 0,
            "bytes_posted": 0,
            "transfers_posted": 0,
            "requests_done": 0,
            "requests_failed": 0,
            "notifs_sent": 0,
            "notifs_received": 0,
            "notify_errors": 0,
            "staging_bytes": 0,
            "bytes_completed": 0,
            "staged_peer_requests": 0,
            "zero_copy_peer_requests": 0,
            "chunk_transfers": 0,
            "chunks_packed": 0,
            "chunks_unpacked": 0,
            "bytes_packed": 0,
            "bytes_unpacked": 0,
        }

    # ---------------------------------------------------------------- context management
    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Endpoint({self.name!r}, {self.label}, {len(self._peers)} peers)"

    def close(self) -> None:
        """Fail active requests, release every handle, forget peers, deregister memory."""
        if self._closed:
            return
        for req in list(self._requests.values()):
            self._fail(
                req,
                TransferError(
                    f"{self.label}: request {req.rid!r} cancelled: endpoint closed",
                    request_id=req.rid,
                ),
                notify_peers=False,
            )
        for peer in list(self._peers.values()):
            self._drop_peer(peer)
        if self._saw_dead:
            # UCX closes endpoints asynchronously; destroying the worker while the endpoint of
            # a dead peer still has a failed operation queued trips a UCX assertion
            # (arbiter.c "ucs_arbiter_group_is_empty") and aborts the process.  Progress a
            # moment so those closes complete.
            end = _now() + 0.05
            while _now() < end:
                try:
                    self.agent.get_new_notifs()
                except nixl_compat.nixl_errors():
                    pass
                time.sleep(0.001)
        if self._reg is not None:
            try:
                self.agent.deregister_memory(self._reg)
            except nixl_compat.nixl_errors():
                pass
            self._reg = None
            self._stats["registrations"] = 0
            self._stats["registered_bytes"] = 0
        if self._staged is not None:
            self._staged.deregister()
            self._stats["staging_bytes"] = 0
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.label}: endpoint is closed")

    # ---------------------------------------------------------------- registration
    def register_layers(
        self, buffers: Sequence[dict[str, Any]], kinds: Sequence[str] | None = None
    ) -> None:
        """Register one buffer per (layer, page): ``buffers[l] = {page_name: tensor}``.

        Tensors must be contiguous, on this endpoint's device, any dtype; each must hold at
        least one logical block (``PageLayout.logical_stride`` bytes).  A layer's kind is taken
        from ``kinds[l]``, or inferred from its set of pages when unambiguous.
        """
        self._check_open()
        if self._reg is not None:
            raise RuntimeError(f"{self.label}: layers are already registered")
        if not buffers:
            raise ValueError(f"{self.label}: no layers to register")
        if kinds is not None and len(kinds) != len(buffers):
            raise ValueError(f"{self.label}: {len(kinds)} kinds for {len(buffers)} layers")
        layer_kinds: list[str] = []
        segments: list[Segment] = []
        regions: dict[tuple[int, int, int], None] = {}
        for i, pages in enumerate(buffers):
            if not isinstance(pages, dict) or not pages:
                raise ValueError(f"{self.label}: layer {i}: expected a dict {{page: tensor}}")
            kind = self._kind_of(i, pages, None if kinds is None else kinds[i])
            layer_kinds.append(kind)
            for page in self.kinds[kind]:
                t = pages[page]
                addr, nbytes, devid = self._tensor_region(i, page, t)
                stride = self.side.page(page).logical_stride
                if nbytes < stride:
                    raise ValueError(
                        f"{self.label}: layer {i} page {page!r}: buffer of {nbytes} bytes is "
                        f"smaller than one logical block ({stride} bytes)"
                    )
                segments.append(Segment(i, page, addr, nbytes, devid, stride, nbytes // stride))
                regions[(addr, nbytes, devid)] = None
        arr = np.array(list(regions), dtype=np.uint64).reshape(-1, 3)
        staged = None
        if self.staging_bytes:
            staged = self._make_staging(buffers)
        self._reg = self.agent.register_memory(arr, self.mem_type)
        if staged is not None:
            try:
                staged.register()
            except BaseException:
                self.agent.deregister_memory(self._reg)
                self._reg = None
                raise
            self._staged = staged
            self._stats["staging_bytes"] = staged.pool.slots * staged.pool.slot_bytes
        self._buffers = [dict(b) for b in buffers]
        self._layer_kinds = layer_kinds
        self._segments = segments_by_key(segments)
        self._num_blocks = min(s.num_blocks for s in segments)
        self._stats["registrations"] = int(arr.shape[0])
        self._stats["registered_bytes"] = int(arr[:, 1].sum())

    def _make_staging(self, buffers: Sequence[dict[str, Any]]) -> StagedEngine:
        """Allocate the staging buffer (once per endpoint) on the device of the pages."""
        import torch

        first = next(iter(buffers[0].values()))
        dev = first.device
        if dev.type == "cpu":
            t = _host_staging(self.staging_bytes)
        else:
            t = torch.zeros(self.staging_bytes, dtype=torch.uint8, device=dev)
        return StagedEngine(self, t, self.staging_slots, self._mover)

    def _kind_of(self, i: int, pages: dict[str, Any], kind: str | None) -> str:
        names = set(pages)
        if kind is not None:
            if kind not in self.kinds:
                raise PlanError(
                    f"{self.label}: layer {i}: no layer kind {kind!r} "
                    f"(kinds: {', '.join(self.kinds)})"
                )
            if names != set(self.kinds[kind]):
                raise ValueError(
                    f"{self.label}: layer {i} of kind {kind!r} needs pages "
                    f"{sorted(self.kinds[kind])}, got {sorted(names)}"
                )
            return kind
        matches = [k for k, p in self.kinds.items() if set(p) == names]
        if len(matches) != 1:
            raise ValueError(
                f"{self.label}: layer {i}: pages {sorted(names)} match "
                f"{'no' if not matches else 'several'} layer kinds "
                f"({', '.join(f'{k}={list(p)}' for k, p in self.kinds.items())}); pass kinds="
            )
        return matches[0]

    def _tensor_region(self, i: int, page: str, t: Any) -> tuple[int, int, int]:
        import torch

        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{self.label}: layer {i} page {page!r}: expected a torch tensor")
        if not t.is_contiguous():
            raise ValueError(f"{self.label}: layer {i} page {page!r}: tensor is not contiguous")
        on_gpu = t.device.type == "cuda"
        wrong_gpu = (
            on_gpu and self.device.startswith("cuda:") and t.device.index != int(self.device[5:])
        )
        if on_gpu != (self.mem_type == "VRAM") or wrong_gpu:
            raise ValueError(
                f"{self.label}: layer {i} page {page!r}: tensor on {t.device} but the endpoint "
                f"was created with device={self.device!r}"
            )
        devid = (t.device.index or 0) if on_gpu else 0
        return int(t.data_ptr()), int(t.numel() * t.element_size()), int(devid)

    @property
    def num_blocks(self) -> int:
        """Logical blocks every registered buffer can hold (the valid local block id range)."""
        return self._num_blocks

    @property
    def layer_kinds(self) -> list[str]:
        return list(self._layer_kinds)

    # ---------------------------------------------------------------- handshake
    def header(self) -> dict[str, Any]:
        """The layout header this endpoint publishes (see :mod:`.handshake`)."""
        self._check_open()
        if self._reg is None:
            raise RuntimeError(f"{self.label}: call register_layers() before the handshake")
        layers = []
        for i, kind in enumerate(self._layer_kinds):
            pages = {}
            for page in self.kinds[kind]:
                s = self._segments[(i, page)]
                pages[page] = [s.addr, s.nbytes, s.devid, s.num_blocks]
            layers.append({"kind": kind, "pages": pages})
        return {
            "format": hs.FORMAT,
            "agent": self.name,
            "engine": self.engine,
            "role": self.role,
            "rank": self.rank,
            "tp": self.side.tp,
            "spec": self.plan.spec,
            "spec_sha256": self.plan.spec_sha256,
            "plan_format": list(PLAN_FORMAT),
            "layout": self.side.header(),
            "mem_type": self.mem_type,
            "layers": layers,
            "listener": self.listen_port,
            "staging": None if self._staged is None else self._staged.pool.info(),
        }

    def handshake_bytes(self) -> bytes:
        """Agent metadata plus layout header, for :meth:`add_peer` on the other side."""
        return hs.encode(self.header(), self.agent.get_agent_metadata())

    def _local_layers(self) -> list[dict[str, Any]]:
        return [{"kind": k, "pages": list(self.kinds[k])} for k in self._layer_kinds]

    def _validate(self, header: dict[str, Any]) -> str:
        if self._reg is None:
            raise RuntimeError(f"{self.label}: call register_layers() before adding peers")
        return hs.validate_header(
            header,
            plan=self.plan,
            local_role=self.role,
            local_rank=self.rank,
            local_layers=self._local_layers(),
            kinds=self.kinds,
        )

    def add_peer(self, data: bytes) -> str:
        """Validate a peer's :meth:`handshake_bytes` against the plan, then load its metadata.

        Raises :class:`HandshakeError` (nothing loaded) on any mismatch.  A peer already known
        under the same agent name, or the same (engine, rank), is replaced: its requests fail,
        its prepped lists are released, and its metadata is loaded afresh (a restarted peer).
        Returns the peer's label, e.g. ``"prefill rank 1"``.
        """
        self._check_open()
        header, md = hs.decode(data, who=self.label)
        label = self._validate(header)
        name = header.get("agent")
        if not isinstance(name, str) or not name:
            raise HandshakeError(f"{self.label}: {label} sent no agent name", field="agent")
        if name == self.name:
            raise HandshakeError(
                f"{self.label}: {label} uses this endpoint's own agent name {name!r}; NIXL "
                f"tells agents apart by name: give the two engines different engine= ids "
                f"(the default name is '<engine>-<rank>') or pass name=",
                peer=label,
                field="agent",
                peer_value=name,
                local_value=self.name,
            )
        self._forget_same(name, header, reason=f"{label} re-handshaked (restarted)")
        try:
            loaded = self.agent.add_remote_agent(md)
        except nixl_compat.nixl_errors() as e:
            raise HandshakeError(
                f"{self.label}: NIXL refused {label}'s agent metadata "
                f"({nixl_compat.error_name(e)})",
                peer=label,
                field="agent metadata",
            ) from None
        loaded = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        if loaded != name:
            self.agent.remove_remote_agent(loaded)
            raise HandshakeError(
                f"{self.label}: {label}'s header names agent {name!r} but its metadata is "
                f"for agent {loaded!r}",
                peer=label,
                field="agent",
                peer_value=loaded,
                local_value=name,
            )
        self._install_peer(name, header, label)
        return label

    def _forget_same(self, name: str, header: dict[str, Any], reason: str) -> None:
        for peer in list(self._peers.values()):
            same_slot = peer.engine == header.get("engine") and peer.rank == header.get("rank")
            if peer.name == name or same_slot:
                self._drop_peer(peer, reason=reason)

    def _install_peer(self, name: str, header: dict[str, Any], label: str) -> _Peer:
        segs: list[Segment] = []
        for i, layer in enumerate(header["layers"]):
            for page, (addr, nbytes, devid, nblocks) in layer["pages"].items():
                stride = self.peer_side.page(page).logical_stride
                segs.append(
                    Segment(i, page, int(addr), int(nbytes), int(devid), stride, int(nblocks))
                )
        peer = _Peer(
            name=name,
            role=header["role"],
            rank=int(header["rank"]),
            engine=str(header.get("engine") or header["role"]),
            label=label,
            header=header,
            mem_type=header["mem_type"],
            segments=segments_by_key(segs),
            num_blocks=min(s.num_blocks for s in segs),
            staging=_staging_of(header),
        )
        self._peers[name] = peer
        return peer

    def _drop_peer(self, peer: _Peer, reason: str = "", *, unload: bool = True) -> None:
        """Fail the peer's requests, release its prepped lists and staging state, unload its
        metadata (``unload``; not when NIXL's listener is replacing it)."""
        if reason:
            self._peer_dead(peer, reason, error_cls=PeerDisconnectedError)
        self._release_prepped(peer)
        if self._staged is not None:
            self._staged.forget_peer(peer.name)
        if unload:
            try:
                self.agent.remove_remote_agent(peer.name)
            except nixl_compat.nixl_errors():
                pass
        self._peers.pop(peer.name, None)

    def _release_prepped(self, peer: _Peer) -> None:
        if peer.prepped is not None:
            for h in peer.prepped:
                h.release()
                self._stats["dlist_handles_open"] -= 1
            peer.prepped = None

    def peers(self) -> list[dict[str, Any]]:
        """Connected peers: name, label, engine, rank, alive."""
        return [
            {
                "name": p.name,
                "label": p.label,
                "engine": p.engine,
                "rank": p.rank,
                "alive": p.alive,
                "reason": p.dead_reason,
            }
            for p in self._peers.values()
        ]

    # ---------------------------------------------------------------- listener handshake
    def connect(
        self, host: str, port: int, peer_name: str, *, timeout_s: float | None = None
    ) -> str:
        """Handshake with a peer over NIXL's socket listener.

        Agent metadata travels through the listeners (both endpoints need ``listen_port``);
        the layout header then travels as a notification (``LC1 {"t": "HDR"}``), and the peer
        answers with its own header (or ``NAK`` and the reason).  Both sides validate.
        The peer must be polling (:meth:`poll` or :meth:`wait_for_peers`).
        Returns the peer's label.
        """
        self._check_open()
        if self.listen_port is None:
            raise RuntimeError(
                f"{self.label}: create the Endpoint with listen_port=... to use NIXL's "
                f"listener (both sides need one)"
            )
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = _now() + timeout
        header = self.header()
        old = self._peers.get(peer_name)
        if old is not None:
            self._drop_peer(old, reason=f"{old.label} re-handshaked (restarted)")
        self._hs_replies.pop(peer_name, None)
        self._hs_errors.pop(peer_name, None)
        # If this process restarted under a name the peer still holds, the peer's listener
        # refuses to overwrite that agent's metadata: have it drop the old one first.
        self.agent.invalidate_local_metadata(host, int(port))
        self.agent.send_local_metadata(host, int(port))
        self.agent.fetch_remote_metadata(peer_name, host, int(port))
        waiter = _Backoff()
        while not self.agent.check_remote_metadata(peer_name):
            self._progress()
            if _now() > deadline:
                raise TransferTimeoutError(
                    f"{self.label}: no agent metadata from {peer_name!r} at {host}:{port} "
                    f"within {timeout:.1f} s (is its listener up?)",
                    peer=peer_name,
                )
            waiter.sleep()
        msg = {"t": "HDR", "h": header, "reply": False}
        while True:  # the peer may not have loaded our metadata yet
            try:
                self._send(peer_name, msg)
                break
            except nixl_compat.nixl_errors():
                if _now() > deadline:
                    raise
                self._progress()
                waiter.sleep()
        while peer_name not in self._hs_replies:
            self._progress()
            if peer_name in self._hs_errors:
                raise self._hs_errors.pop(peer_name)
            if _now() > deadline:
                raise TransferTimeoutError(
                    f"{self.label}: {peer_name!r} did not answer the handshake within "
                    f"{timeout:.1f} s (is it polling?)",
                    peer=peer_name,
                )
            waiter.sleep()
        reply = self._hs_replies.pop(peer_name)
        if reply["t"] == "NAK":
            raise HandshakeError(
                f"{self.label}: {peer_name!r} refused the handshake: {reply.get('e')}",
                peer=peer_name,
                field=reply.get("field"),
            )
        try:
            label = self._validate(reply["h"])
        except HandshakeError as e:
            self._send_quiet(peer_name, {"t": "NAK", "e": str(e), "field": e.field})
            raise
        self._install_peer(peer_name, reply["h"], label)
        return label

    def wait_for_peers(
        self,
        count: int | None = None,
        *,
        engine: str | None = None,
        timeout_s: float | None = None,
    ) -> list[str]:
        """Poll until ``count`` peers (default: every rank of the other side) are connected.

        Raises the :class:`HandshakeError` of a refused peer, or
        :class:`TransferTimeoutError`.  Returns the connected peers' labels.
        """
        want = self.peer_side.tp if count is None else count
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = _now() + timeout
        waiter = _Backoff()
        while True:
            self._progress()
            if self._hs_errors:
                _, err = self._hs_errors.popitem()
                raise err
            have = [p for p in self._peers.values() if engine is None or p.engine == engine]
            if len(have) >= want:
                return sorted(p.label for p in have)
            if _now() > deadline:
                raise TransferTimeoutError(
                    f"{self.label}: {len(have)} of {want} {self.peer_role} ranks connected "
                    f"after {timeout:.1f} s"
                )
            waiter.sleep()

    def _on_hdr(self, sender: str, msg: dict[str, Any], first_seen: float | None = None) -> None:
        """A peer's header arrived over a notification (listener handshake)."""
        if msg.get("reply"):
            self._hs_replies[sender] = msg
            return
        first_seen = _now() if first_seen is None else first_seen
        if not self.agent.check_remote_metadata(sender):
            # the listener thread has not loaded the sender's metadata yet: retry later
            self._pending_hdr.append((first_seen, sender, msg))
            return
        header = msg.get("h") or {}
        try:
            if header.get("agent") != sender:
                raise HandshakeError(
                    f"{self.label}: handshake from agent {sender!r} carries a header for "
                    f"{header.get('agent')!r}",
                    field="agent",
                )
            label = self._validate(header)
        except HandshakeError as e:
            self._hs_errors[sender] = e
            self._send_quiet(sender, {"t": "NAK", "e": str(e), "field": e.field})
            return
        for peer in list(self._peers.values()):
            same_slot = peer.engine == header.get("engine") and peer.rank == header.get("rank")
            if peer.name == sender or same_slot:
                # a restarted peer: its requests fail; the listener replaces its metadata
                # (after the peer invalidated the old one), so only our state goes.
                self._drop_peer(
                    peer, f"{peer.label} re-handshaked (restarted)", unload=peer.name != sender
                )
        try:
            self._send(sender, {"t": "HDR", "h": self.header(), "reply": True})
        except nixl_compat.nixl_errors():
            # still the old metadata of a restarted peer (being replaced): retry later
            self._pending_hdr.append((first_seen, sender, msg))
            return
        self._install_peer(sender, header, label)

    # ---------------------------------------------------------------- transfers
    def pull(
        self,
        request_id: str,
        local_blocks: Any,
        remote_blocks: Any,
        *,
        layers: Sequence[int] | None = None,
        engine: str | None = None,
        timeout_s: float | None = None,
        strategy: str | None = None,
    ) -> None:
        """Decode side: READ a request's pages from every source prefill rank (pull mode).

        ``local_blocks[i]`` (this engine's logical block ids) receives ``remote_blocks[i]``
        (the prefill engine's).  ``layers`` selects layers (default all).  Block ids are
        validated before anything is posted (:class:`BlockIdError`).  Completion is reported
        by :meth:`poll`/:meth:`wait`; once complete, every prefill rank in
        ``plan.rank(d).notified`` has been sent ``DONE``.  ``strategy`` overrides the
        endpoint's for this request (``"zero-copy"``, ``"staged"``, ``"auto"``); a staged
        source packs once its :meth:`expect` marked the request ready.
        """
        if self.role != "decode":
            raise RuntimeError(f"{self.label}: pull() is for decode ranks; prefill uses push()")
        rp = self.plan.rank(self.rank)
        self._start(
            "pull",
            "READ",
            request_id,
            local_blocks,
            remote_blocks,
            layers,
            engine,
            timeout_s,
            targets=rp.sources,
            notify=rp.notified,
            strategy=strategy,
        )

    def push(
        self,
        request_id: str,
        local_blocks: Any,
        remote_blocks: Any,
        *,
        layers: Sequence[int] | None = None,
        engine: str | None = None,
        timeout_s: float | None = None,
        strategy: str | None = None,
    ) -> None:
        """Prefill side: WRITE a request's pages into every decode rank that reads from this
        rank (``plan.targets(p)``; push mode).  ``remote_blocks`` are the decode engine's
        logical block ids.  When every WRITE completed ``DONE`` the request completes and each
        target is sent ``DONE``.  ``strategy`` as for :meth:`pull` (a staged target
        grants staging slots once its :meth:`expect` marked the request ready).
        """
        if self.role != "prefill":
            raise RuntimeError(f"{self.label}: push() is for prefill ranks; decode uses pull()")
        targets = self.plan.targets(self.rank)
        self._start(
            "push",
            "WRITE",
            request_id,
            local_blocks,
            remote_blocks,
            layers,
            engine,
            timeout_s,
            targets=targets,
            notify=targets,
            strategy=strategy,
        )

    def expect(
        self,
        request_id: str,
        *,
        blocks: Any = None,
        engine: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Passive side of a request: wait for the peers' ``DONE`` notifications.

        Prefill (pull mode): completes after ``len(plan.readers(p))`` decode ranks notified;
        decode (push mode): after all of ``plan.rank(d).sources`` notified.  Notifications
        that arrived before this call count.

        ``blocks`` (prefill only): this rank's block ids of the request, the ``remote_blocks``
        its readers will pull.  With them a staged source packs each reader's bytes at once
        (for readers that would choose the staged strategy, by this side's cost model), so
        that the chunks cross as soon as a reader's request arrives; a reader that asks for
        other layers or moves the bytes zero-copy is served as without them.
        """
        self._check_open()
        rid = self._new_rid(request_id)
        local = None
        if blocks is not None:
            if self.role != "prefill":
                raise ValueError(
                    f"{self.label}: request {rid!r}: expect(blocks=) is for prefill ranks"
                )
            local = self.local_block_ids(blocks, rid)
        if self.role == "prefill":
            expected = frozenset(self.plan.readers(self.rank))
        else:
            expected = frozenset(self.plan.rank(self.rank).sources)
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        now = _now()
        req = _Request(rid, "expect", engine, now, now + timeout, timeout, expected=expected)
        self._requests[rid] = req
        for _, sender, msg in self._early.pop(rid, []):
            if req.rid in self._requests:
                self._on_request_notif(req, sender, msg)
        if req.rid in self._requests:
            # peers already known dead fail the request at once
            for peer in self._peers.values():
                if not peer.alive and peer.rank in expected and self._engine_ok(req, peer):
                    self._fail(
                        req,
                        PeerDisconnectedError(
                            f"{self.label}: request {rid!r}: {peer.label} is disconnected "
                            f"({peer.dead_reason})",
                            peer=peer.label,
                            request_id=rid,
                        ),
                    )
                    break
            else:
                if local is not None and local.shape[0] and self._staged is not None:
                    self._pack_ahead(req, local)
                self._maybe_complete_expect(req)

    def _pack_ahead(self, req: _Request, local: np.ndarray) -> None:
        """Staged contexts packed before the readers ask (see :meth:`expect`)."""
        assert self._staged is not None
        peers = [
            p
            for p in self._peers.values()
            if p.alive
            and p.rank in req.expected
            and p.staging
            and self._engine_ok(req, p)
            and p.name not in req.staged
        ]
        if len({p.engine for p in peers}) != 1:
            return  # no reader, or readers of several engines: which one pulls is unknown
        runs = block_runs(local, local)  # (the readers' ids are unknown: assume they match)
        for peer in peers:
            table = self._pair_table(peer)
            if table is None:
                continue
            choice, _, _ = self._choose(peer, table, local, local, None, self.strategy, runs)
            if choice == "staged":
                self._staged.pack_ahead(req, peer, local)
                self._staged.pack_now(1)  # its first chunk now (on its GPU); the rest as polls go

    def local_block_ids(
        self, blocks: Any, rid: str, *, peer: str | None = None, unique: bool = False
    ) -> np.ndarray:
        """This rank's block ids of request ``rid``, validated (:func:`check_block_ids`;
        ``unique`` where they receive bytes)."""
        return check_block_ids(
            blocks,
            what=f"local ({self.role})",
            limit=self._num_blocks,
            who=self.label,
            request_id=rid,
            peer=peer,
            unique=unique,
        )

    def _new_rid(self, request_id: str) -> str:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(
                f"{self.label}: request id must be a non-empty str, got {request_id!r}"
            )
        if request_id in self._requests or request_id in self._finished:
            raise ValueError(f"{self.label}: request id {request_id!r} is already in use")
        return request_id

    def _peers_for(self, engine: str | None, ranks: Iterable[int], rid: str) -> dict[int, _Peer]:
        """The connected peers of ``ranks`` in one engine (``None``: the only engine)."""
        engines = {p.engine for p in self._peers.values()}
        if engine is None:
            if len(engines) > 1:
                raise ValueError(
                    f"{self.label}: request {rid!r}: peers of several engines are connected "
                    f"({', '.join(sorted(engines))}); pass engine="
                )
            engine = next(iter(engines), None)
        by_rank = {p.rank: p for p in self._peers.values() if p.engine == engine}
        out = {}
        for r in ranks:
            label = hs.rank_label(self.peer_role, r)
            peer = by_rank.get(r)
            if peer is None:
                raise PeerNotConnectedError(
                    f"{self.label}: request {rid!r}: {label} is not connected (no handshake)",
                    peer=label,
                    request_id=rid,
                )
            if not peer.alive:
                raise PeerDisconnectedError(
                    f"{self.label}: request {rid!r}: {peer.label} is disconnected "
                    f"({peer.dead_reason}); re-handshake with a restarted peer first",
                    peer=peer.label,
                    request_id=rid,
                )
            out[r] = peer
        return out

    def _layers_arg(self, layers: Sequence[int] | None, rid: str) -> np.ndarray | None:
        if layers is None:
            return None
        arr = np.asarray(layers)
        n = len(self._layer_kinds)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(f"{self.label}: request {rid!r}: layers must be a list of ints")
        bad = arr[(arr < 0) | (arr >= n)]
        if bad.size:
            raise ValueError(
                f"{self.label}: request {rid!r}: layers {bad.tolist()} out of range [0, {n})"
            )
        return np.unique(arr.astype(np.int64))

    def _start(
        self,
        kind: str,
        op: str,
        request_id: str,
        local_blocks: Any,
        remote_blocks: Any,
        layers: Sequence[int] | None,
        engine: str | None,
        timeout_s: float | None,
        *,
        targets: Sequence[int],
        notify: Sequence[int],
        strategy: str | None = None,
    ) -> None:
        self._check_open()
        if self._reg is None:
            raise RuntimeError(f"{self.label}: call register_layers() first")
        eng = self._staged
        t_start = eng._t() if eng is not None else 0.0
        rid = self._new_rid(request_id)
        strategy = self.strategy if strategy is None else strategy
        if strategy not in STRATEGIES:
            raise ValueError(
                f"{self.label}: request {rid!r}: strategy must be one of "
                f"{', '.join(STRATEGIES)}, got {strategy!r}"
            )
        peer_kind = f"{self.peer_role}"
        local = self.local_block_ids(local_blocks, rid, unique=(op == "READ"))
        peers = self._peers_for(engine, sorted(set(targets) | set(notify)), rid)
        remote = None
        for r in sorted(set(targets)):
            peer = peers[r]
            remote = check_block_ids(
                remote_blocks,
                what=f"remote ({peer_kind})",
                limit=peer.num_blocks,
                who=self.label,
                request_id=rid,
                peer=peer.label,
                unique=(op == "WRITE"),
            )
        if remote is None:  # no targets: still validate the shape
            remote = check_block_ids(
                remote_blocks,
                what=f"remote ({peer_kind})",
                limit=np.iinfo(np.int64).max,
                who=self.label,
                request_id=rid,
            )
        check_same_count(
            local,
            remote,
            local_what=f"local ({self.role}) block ids",
            remote_what=f"remote ({peer_kind}) block ids",
            who=self.label,
            request_id=rid,
        )
        sel = self._layers_arg(layers, rid)
        if strategy == "staged":
            for r in sorted(set(targets)):
                if self._staged is None or peers[r].staging is None:
                    who = self.label if self._staged is None else peers[r].label
                    raise TransferFailedError(
                        f"{self.label}: request {rid!r}: strategy 'staged' but {who} has no "
                        f"staging buffer (staging_bytes=0)",
                        peer=None if self._staged is None else peers[r].label,
                        request_id=rid,
                    )
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        now = _now()
        req = _Request(
            rid,
            kind,
            engine,
            now,
            now + timeout,
            timeout,
            notify=[peers[r] for r in sorted(set(notify))],
        )
        self._requests[rid] = req
        for _, sender, msg in self._early.pop(rid, []):  # e.g. a peer's FAIL that came first
            if rid in self._requests:
                self._on_request_notif(req, sender, msg)
        if rid not in self._requests:
            return
        if local.shape[0] == 0:
            return  # nothing to move; completes (and notifies) on the next poll
        if eng is not None:
            eng._span("~start-checks", t_start)
            t_start = eng._t()
        staged: list[tuple[Any, np.ndarray]] = []
        runs = block_runs(local, remote)  # consecutive on both sides: what NIXL merges
        for r in sorted(set(targets)):
            peer = peers[r]
            table = self._pair_table(peer)
            if table is None:
                continue
            choice, rows, n_posted = self._choose(peer, table, local, remote, sel, strategy, runs)
            if choice is None:
                continue  # no bytes from this peer in these layers
            req.strategies[peer.label] = choice
            if choice == "staged":
                self._stats["staged_peer_requests"] += 1
                assert self._staged is not None
                ctx = self._staged.new_ctx(
                    req,
                    peer,
                    blocks=local,
                    layers=sel,
                    chunk=self._staged.chunk_bytes(peer) or 1,
                    mover=self._staged.default_mover(op),
                )
                req.nbytes += ctx.total
                req.chunks += ctx.n
                staged.append((ctx, remote))
                continue
            self._stats["zero_copy_peer_requests"] += 1
            try:
                n_idx = int(table.row_nbytes[rows].shape[0]) * int(local.shape[0])
                if n_posted * 4 <= n_idx:
                    # NIXL would merge >= 3 of 4 indices (whole pages, consecutive blocks):
                    # post the merged descriptors themselves (~25 ns each) instead of every
                    # index (~32 ns each; 1 ms for a 1 GiB request of 32k blocks)
                    loc, rem, nbytes = merged_descriptors(table, local, remote, rows, runs)
                    handle = self.agent.initialize_xfer(
                        op,
                        self.agent.get_xfer_descs(loc, self.mem_type),
                        self.agent.get_xfer_descs(rem, peer.mem_type),
                        peer.name,
                    )
                    n_desc = int(loc.shape[0])
                else:
                    self._prep(peer, table)
                    li, ri, nbytes = table.indices(local, remote, rows)
                    lh, rh = peer.prepped
                    handle = self.agent.make_prepped_xfer(op, lh, li, rh, ri)
                    n_desc = int(li.size)
            except nixl_compat.nixl_errors() as e:
                self._xfer_exception(req, peer, e, "preparing")
                return
            self._stats["xfer_handles_created"] += 1
            x = _Xfer(peer, handle, "PROC", n_desc, nbytes)
            req.xfers.append(x)
            try:
                x.state = self.agent.transfer(handle)
            except nixl_compat.nixl_errors() as e:
                self._xfer_exception(req, peer, e, "posting")
                return
            self._stats["transfers_posted"] += 1
            self._stats["descriptors_posted"] += x.descriptors
            self._stats["bytes_posted"] += nbytes
            req.descriptors += x.descriptors
            req.nbytes += nbytes
            if x.state == "ERR":
                self._fail(
                    req,
                    TransferFailedError(
                        f"{self.label}: request {rid!r}: NIXL reported ERR posting the "
                        f"{op} with {peer.label}",
                        peer=peer.label,
                        request_id=rid,
                    ),
                )
                return
        if eng is not None:
            eng._span("~start-choose", t_start)
            t_start = eng._t()
        if staged and rid in self._requests:
            assert self._staged is not None
            ctxs = [c for c, _ in staged]
            grants = self._staged.grant_initial(ctxs) if self.role == "decode" else {}
            for ctx, peer_blocks in staged:
                msg = self._staged.sreq(ctx, peer_blocks, sel, grants.get(ctx.peer.name, []))
                try:
                    self._send(ctx.peer.name, msg)
                except nixl_compat.nixl_errors() as e:
                    self._xfer_exception(req, ctx.peer, e, "requesting")
                    return
            self._staged._span("~start-sreq", t_start)

    def _choose(
        self,
        peer: _Peer,
        table: PairTable,
        local: np.ndarray,
        remote: np.ndarray,
        sel: np.ndarray | None,
        strategy: str,
        runs: Any,
    ) -> tuple[str | None, np.ndarray | slice, int]:
        """The strategy of one (request, peer) -- ``None`` when no byte moves -- with the
        table rows of the selected layers and the descriptors zero-copy would post (after
        NIXL's merges; ``runs``: the request's :func:`block_runs`)."""
        rows = table.rows_for_layers(sel)
        n_posted = posted_count(table, local, remote, rows, runs)
        row_nbytes = table.row_nbytes[rows]
        nblk = int(local.shape[0])
        nbytes = int(row_nbytes.sum()) * nblk
        if nbytes == 0:
            return None, rows, n_posted
        chunk = None if self._staged is None else self._staged.chunk_bytes(peer)
        if strategy == "zero-copy" or chunk is None:
            return "zero-copy", rows, n_posted
        if strategy == "staged":
            return "staged", rows, n_posted
        n_rows = int(row_nbytes.shape[0])
        n_chunks = -(-nbytes // chunk)
        lay, _ = self._staged.layout_for(peer)
        g = lay.groups_for_layers(sel)
        n_groups = lay.num_groups if g is None else int(g.shape[0])
        n_ops = _count_ops(self._kernel(), n_rows, n_groups, n_chunks)
        return self.cost_model.choose(n_posted, nbytes, n_chunks, n_ops), rows, n_posted

    def _kernel(self) -> str:
        """How pack/unpack run here (for the cost model's count of kernel calls)."""
        if self.mem_type == "DRAM":
            return "per-row"
        from .staging import _triton_kernel

        return "fused" if _triton_kernel() is not None else "grouped"

    def _pair_table(self, peer: _Peer) -> PairTable | None:
        """The pair's descriptor table (built once per peer; no NIXL calls)."""
        if not peer.table_built:
            d, p = (self.rank, peer.rank) if self.role == "decode" else (peer.rank, self.rank)
            peer.table = build_pair_table(
                self.plan,
                decode_rank=d,
                prefill_rank=p,
                local_is_decode=self.role == "decode",
                layer_pages=[self.kinds[k] for k in self._layer_kinds],
                local_segments=self._segments,
                remote_segments=peer.segments,
            )
            peer.table_built = True
        return peer.table

    def _prep(self, peer: _Peer, t: PairTable) -> None:
        """Prepare the pair's descriptor lists once (zero-copy only)."""
        if peer.prepped is not None:
            return
        lh = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", t.local_rows, self.mem_type)
        self._stats["dlist_handles_open"] += 1
        try:
            rh = self.agent.prep_xfer_dlist(peer.name, t.remote_rows, peer.mem_type)
        except BaseException:
            lh.release()
            self._stats["dlist_handles_open"] -= 1
            raise
        self._stats["dlist_handles_open"] += 1
        self._stats["descriptors_prepped"] += int(t.local_rows[:, 4].sum()) * 2
        peer.prepped = (lh, rh)

    def _table(self, peer: _Peer) -> PairTable | None:
        """The pair's descriptor table and prepped lists (built once per peer)."""
        t = self._pair_table(peer)
        if t is not None:
            self._prep(peer, t)
        return t

    # ---------------------------------------------------------------- progress
    def poll(self) -> Progress:
        """Progress NIXL once; return (and forget) requests that completed or failed since the
        last call.  Call it regularly from the engine loop."""
        self._check_open()
        self._progress()
        done = [rid for rid, err in self._finished.items() if err is None]
        failed = {rid: err for rid, err in self._finished.items() if err is not None}
        self._finished.clear()
        return Progress(done, failed)

    def wait(self, request_id: str, *, timeout_s: float | None = None) -> None:
        """Block until ``request_id`` completes (returns) or fails (raises its TransferError).

        The wait is bounded by the request's own deadline (and ``timeout_s`` if given).
        """
        self._check_open()
        if request_id not in self._requests and request_id not in self._finished:
            raise KeyError(f"{self.label}: unknown request {request_id!r} (or already reported)")
        deadline = None if timeout_s is None else _now() + timeout_s
        waiter = _Backoff()
        while request_id not in self._finished:
            self._progress()
            if request_id in self._finished:
                break
            if deadline is not None and _now() > deadline:
                raise TransferTimeoutError(
                    f"{self.label}: request {request_id!r} still in flight after {timeout_s:.1f} s",
                    request_id=request_id,
                )
            waiter.sleep()
        err = self._finished.pop(request_id)
        if err is not None:
            raise err

    def wait_all(self, request_ids: Iterable[str], *, timeout_s: float | None = None) -> None:
        """:meth:`wait` for several requests; raises the first failure."""
        errors = []
        for rid in list(request_ids):
            try:
                self.wait(rid, timeout_s=timeout_s)
            except TransferError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def status(self, request_id: str) -> str:
        """``"active"``, ``"done"``, ``"failed"`` (not yet reported by poll/wait) or
        ``"unknown"``."""
        if request_id in self._requests:
            return "active"
        if request_id in self._finished:
            return "failed" if self._finished[request_id] is not None else "done"
        return "unknown"

    def _progress(self) -> None:
        """One round: notifications, transfer states, deadlines."""
        try:
            notifs = self.agent.get_new_notifs()
        except nixl_compat.nixl_errors():
            notifs = {}
        for sender, msgs in notifs.items():
            sender = sender.decode() if isinstance(sender, bytes) else sender
            for m in msgs:
                self._stats["notifs_received"] += 1
                self._on_notif(sender, bytes(m))
        if self._pending_hdr:
            pending, self._pending_hdr = self._pending_hdr, []
            for t, sender, msg in pending:
                if _now() - t < self.timeout_s:
                    self._on_hdr(sender, msg, first_seen=t)
        now = _now()
        if self._staged is not None and (self._staged.active or self._staged.pool.held):
            self._staged.pump(now)
        for req in list(self._requests.values()):
            if req.rid not in self._requests:
                continue  # failed meanwhile (e.g. its peer died while checking another)
            if req.kind != "expect":
                self._check_xfers(req)
            elif req.staged:
                self._maybe_complete_expect(req)
            if req.rid in self._requests and now > req.deadline:
                self._timeout(req)
        if self._early:
            for rid in [r for r, v in self._early.items() if now - v[0][0] > self.timeout_s]:
                del self._early[rid]

    def _check_xfers(self, req: _Request) -> None:
        for x in req.xfers:
            if x.state == "PROC" and x.handle is not None:
                try:
                    x.state = self.agent.check_xfer_state(x.handle)
                except nixl_compat.nixl_errors() as e:
                    self._xfer_exception(req, x.peer, e, "checking")
                    return
                if x.state == "ERR":
                    self._fail(
                        req,
                        TransferFailedError(
                            f"{self.label}: request {req.rid!r}: NIXL reported ERR for the "
                            f"transfer with {x.peer.label}",
                            peer=x.peer.label,
                            request_id=req.rid,
                        ),
                    )
                    return
        if all(x.state == "DONE" for x in req.xfers) and req.staged_complete():
            self._complete_initiator(req)

    def _complete_initiator(self, req: _Request) -> None:
        self._release_xfers(req)
        msg = {"t": "DONE", "r": req.rid}
        for peer in req.notify:
            try:
                self._send(peer.name, msg)
            except nixl_compat.nixl_errors() as e:
                self._stats["notify_errors"] += 1
                if nixl_compat.is_disconnect(e):
                    self._mark_dead(peer, "NIXL reported a remote disconnect")
                if req.kind == "push":  # the target cannot learn that its data arrived
                    self._fail(
                        req,
                        PeerDisconnectedError(
                            f"{self.label}: request {req.rid!r}: data written but {peer.label} "
                            f"could not be notified ({nixl_compat.error_name(e)})",
                            peer=peer.label,
                            request_id=req.rid,
                        ),
                        notify_peers=False,
                    )
                    return
        self._finish(req, None)

    def _xfer_exception(self, req: _Request, peer: _Peer, e: BaseException, doing: str) -> None:
        dead = nixl_compat.is_disconnect(e)
        if dead:
            err: TransferError = PeerDisconnectedError(
                f"{self.label}: request {req.rid!r}: {peer.label} disconnected "
                f"({nixl_compat.error_name(e)} while {doing} the transfer)",
                peer=peer.label,
                request_id=req.rid,
            )
        else:
            err = TransferFailedError(
                f"{self.label}: request {req.rid!r}: NIXL failed while {doing} the transfer "
                f"with {peer.label}: {nixl_compat.error_name(e)}",
                peer=peer.label,
                request_id=req.rid,
            )
        if req.rid in self._requests:
            self._fail(req, err)
        if dead:  # then every other request that needs the peer
            self._mark_dead(peer, "NIXL reported a remote disconnect")

    def _mark_dead(self, peer: _Peer, reason: str) -> None:
        """Note a dead peer and fail every other request that needs it."""
        self._saw_dead = True
        if peer.alive:
            peer.alive = False
            peer.dead_reason = reason
            self._peer_dead(peer, reason, error_cls=PeerDisconnectedError)
            if self._staged is not None:
                self._staged.peer_gone(peer.name)

    def _peer_dead(self, peer: _Peer, reason: str, *, error_cls: type[TransferError]) -> None:
        for req in list(self._requests.values()):
            involved = any(x.peer is peer and x.state != "DONE" for x in req.xfers)
            involved = involved or any(
                c.peer is peer and not c.complete for c in req.staged.values()
            )
            if req.kind == "expect":
                involved = (
                    peer.rank in req.expected
                    and (
                        peer.rank not in req.got
                        or (peer.name in req.staged and not req.staged_complete())
                    )
                    and self._engine_ok(req, peer)
                )
            elif req.kind == "push" and any(p is peer for p in req.notify):
                involved = True
            if involved:
                self._fail(
                    req,
                    error_cls(
                        f"{self.label}: request {req.rid!r}: {peer.label} disconnected ({reason})",
                        peer=peer.label,
                        request_id=req.rid,
                    ),
                )

    def _timeout(self, req: _Request) -> None:
        if req.kind == "expect":
            missing = sorted(req.expected - req.got)
            names = ", ".join(hs.rank_label(self.peer_role, r) for r in missing)
            err = TransferTimeoutError(
                f"{self.label}: request {req.rid!r} timed out after {req.timeout_s:.1f} s "
                f"waiting for {names} ({len(req.got)} of {len(req.expected)} "
                f"{self.peer_role} ranks notified)",
                peer=hs.rank_label(self.peer_role, missing[0]) if missing else None,
                request_id=req.rid,
            )
        else:
            slow = [x.peer.label for x in req.xfers if x.state != "DONE"]
            what = list(slow)
            for c in req.staged.values():
                if not c.complete:
                    slow.append(c.peer.label)
                    done = c.unpacked if c.role == "dst" else c.moved
                    what.append(f"{c.peer.label} (staged, {done} of {c.n} chunks done)")
            err = TransferTimeoutError(
                f"{self.label}: request {req.rid!r} timed out after {req.timeout_s:.1f} s; "
                f"transfers with {', '.join(what) or 'no peer'} still in progress",
                peer=slow[0] if slow else None,
                request_id=req.rid,
            )
        self._fail(req, err)

    def _release_xfers(self, req: _Request) -> None:
        for x in req.xfers:
            if x.handle is None:
                continue
            try:
                x.handle.release()
                self._stats["xfer_handles_released"] += 1
            except nixl_compat.nixl_errors():
                self._stats["release_errors"] += 1
            x.handle = None

    def _fail(self, req: _Request, err: TransferError, *, notify_peers: bool = True) -> None:
        rel = True
        try:
            self._release_xfers(req)
            rel = self._end_staged(req, failed=True)
        finally:
            if notify_peers:
                peers = {x.peer.name: x.peer for x in req.xfers}
                peers.update({p.name: p for p in req.notify})
                peers.update({c.peer.name: c.peer for c in req.staged.values()})
                if req.kind == "expect":
                    peers.update(
                        {
                            p.name: p
                            for p in self._peers.values()
                            if p.rank in req.expected and self._engine_ok(req, p)
                        }
                    )
                for peer in peers.values():
                    if peer.alive and peer.label != err.peer:
                        self._send_quiet(
                            peer.name, {"t": "FAIL", "r": req.rid, "e": str(err), "rel": rel}
                        )
            self._finish(req, err)

    def _end_staged(self, req: _Request, *, failed: bool) -> bool:
        """Release the request's staging slots (once); see ``StagedEngine.finish``."""
        if not req.staged or self._staged is None or req.staged_ended:
            return True
        req.staged_ended = True
        return self._staged.finish(req, failed, _now())

    def _finish(self, req: _Request, err: TransferError | None) -> None:
        if self._requests.pop(req.rid, None) is None:
            return
        self._end_staged(req, failed=err is not None)
        self._finished[req.rid] = err
        self._stats["requests_failed" if err else "requests_done"] += 1
        if err is None and req.kind != "expect":
            self._stats["bytes_completed"] += req.nbytes
        if req.kind == "expect":
            peers = [hs.rank_label(self.peer_role, r) for r in sorted(req.got)]
        else:
            peers = [x.peer.label for x in req.xfers]
        self._info[req.rid] = {
            "kind": req.kind,
            "ok": err is None,
            "error": None if err is None else str(err),
            "peers": peers,
            "expected": [hs.rank_label(self.peer_role, r) for r in sorted(req.expected)],
            "notified": [p.label for p in req.notify] if err is None else [],
            "bytes": req.nbytes,
            "descriptors": req.descriptors,
            "seconds": _now() - req.started,
            "strategy": _summary(req.strategies),
            "strategies": dict(req.strategies),
            "chunks": req.chunks,
        }
        while len(self._info) > _MAX_INFO:
            self._info.pop(next(iter(self._info)))

    def completion_info(self, request_id: str) -> dict[str, Any]:
        """How a recently finished request ended (kept for the last 4096 requests).

        ``kind`` (pull/push/expect), ``ok``, ``error``, ``peers`` (for ``expect``: the ranks
        whose ``DONE`` was counted; otherwise the ranks transferred with), ``expected``,
        ``notified`` (ranks sent ``DONE``), ``bytes``, ``descriptors`` (NIXL descriptor
        indices and chunk transfers this side posted), ``seconds``, ``strategy``
        (``"zero-copy"``, ``"staged"``, ``"mixed"`` or ``None`` when no byte moved with any
        peer), ``strategies`` (peer label -> strategy of the peers that moved bytes) and
        ``chunks`` (staged chunks of the request on this side).
        """
        return dict(self._info[request_id])

    # ---------------------------------------------------------------- notifications
    def _send(self, peer_name: str, msg: dict[str, Any]) -> None:
        self.agent.send_notif(peer_name, NOTIF_PREFIX + json.dumps(msg).encode())
        self._stats["notifs_sent"] += 1

    def _send_quiet(self, peer_name: str, msg: dict[str, Any]) -> None:
        try:
            self._send(peer_name, msg)
        except nixl_compat.nixl_errors():
            self._stats["notify_errors"] += 1

    def _on_notif(self, sender: str, raw: bytes) -> None:
        if not raw.startswith(NOTIF_PREFIX):
            if len(self.other_notifs) < _MAX_OTHER_NOTIFS:
                self.other_notifs.append((sender, raw))
            return
        try:
            msg = json.loads(raw[len(NOTIF_PREFIX) :])
        except (UnicodeDecodeError, json.JSONDecodeError):
            return
        t = msg.get("t")
        if t in ("HDR", "NAK"):
            if t == "NAK":
                self._on_nak(sender, msg)
            else:
                self._on_hdr(sender, msg)
            return
        rid = msg.get("r")
        if not isinstance(rid, str):
            return
        req = self._requests.get(rid)
        if req is None:
            if self._staged is not None and (t == "FAIL" or (is_staged_msg(t) and t != "SREQ")):
                self._staged.on_stale(sender, msg)  # a late message of an ended request
                if t != "FAIL":
                    return
            if rid not in self._finished:
                self._early.setdefault(rid, []).append((_now(), sender, msg))
            return
        self._on_request_notif(req, sender, msg)

    def _on_nak(self, sender: str, msg: dict[str, Any]) -> None:
        err = HandshakeError(
            f"{self.label}: {sender!r} refused the handshake: {msg.get('e')}",
            peer=sender,
            field=msg.get("field"),
        )
        if sender in self._peers:  # it refused our header after we accepted its own
            self._drop_peer(self._peers[sender])
            self._hs_errors[sender] = err
        else:
            self._hs_replies[sender] = msg

    def _engine_ok(self, req: _Request, peer: _Peer) -> bool:
        return req.engine is None or req.engine == peer.engine

    def _on_request_notif(self, req: _Request, sender: str, msg: dict[str, Any]) -> None:
        peer = self._peers.get(sender)
        t = msg.get("t")
        label = peer.label if peer else repr(sender)
        if t == "FAIL":
            if peer is not None and (
                req.kind != "expect"
                or peer.rank in req.expected
                or any(p is peer for p in req.notify)
            ):
                self._fail(
                    req,
                    RemoteFailureError(
                        f"{self.label}: request {req.rid!r}: {label} failed it: {msg.get('e')}",
                        peer=label,
                        request_id=req.rid,
                    ),
                    notify_peers=False,
                )
                if msg.get("rel") and self._staged is not None:
                    self._staged.pool.release_held(peer=sender, rid=req.rid)
            return
        if is_staged_msg(t):
            if peer is None or self._staged is None:
                return
            if t == "SREQ":
                if req.kind != "expect" or peer.rank not in req.expected:
                    return
                if not self._engine_ok(req, peer):
                    return
                if req.engine is None:
                    req.engine = peer.engine
                before = req.staged.get(peer.name)
                if before is not None and not before.ahead:
                    return  # a duplicate
                req.strategies[peer.label] = "staged"
                self._stats["staged_peer_requests"] += 1
            self._staged.on_msg(req, peer, msg)
            if t == "SREQ" and peer.name in req.staged:
                req.chunks += req.staged[peer.name].n
            if req.rid in self._requests and req.kind == "expect":
                self._maybe_complete_expect(req)
            return
        if t != "DONE" or req.kind != "expect" or peer is None:
            return
        if not self._engine_ok(req, peer) or peer.rank not in req.expected:
            return
        if req.engine is None:
            req.engine = peer.engine  # the first notifier fixes the engine of the request
        ahead = req.staged.get(peer.name)
        if ahead is not None and ahead.ahead and self._staged is not None:
            self._staged.drop_ahead(req, ahead)  # the reader moved the bytes zero-copy
        if peer.label not in req.strategies and self._moves_bytes_with(peer):
            req.strategies[peer.label] = "zero-copy"
            self._stats["zero_copy_peer_requests"] += 1
        req.got.add(peer.rank)
        self._maybe_complete_expect(req)

    def _moves_bytes_with(self, peer: _Peer) -> bool:
        if self.role == "prefill":
            return self.rank in self.plan.rank(peer.rank).sources
        return peer.rank in self.plan.rank(self.rank).sources

    def _maybe_complete_expect(self, req: _Request) -> None:
        if req.got >= req.expected and req.staged_complete():
            self._finish(req, None)

    # ---------------------------------------------------------------- statistics
    def stats(self) -> dict[str, int]:
        """Counters: open handles, registrations, bytes and descriptors posted, requests."""
        s = dict(self._stats)
        s["xfer_handles_open"] = s["xfer_handles_created"] - s["xfer_handles_released"]
        s["requests_active"] = len(self._requests)
        s["peers"] = len(self._peers)
        if self._staged is not None:
            s.update(self._staged.stats())
        return s


class _Backoff:
    """Sleep between polls: 50 µs doubling to 2 ms (no hot spin, low latency)."""

    def __init__(self) -> None:
        self.delay = _SLEEP_MIN_S

    def sleep(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, _SLEEP_MAX_S)
