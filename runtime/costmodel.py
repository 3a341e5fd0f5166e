"""Cost model: choose zero-copy or staged per request (docs/design.md §7).

Both strategies move the same ``B`` bytes between one pair of ranks.  With ``n`` posted
descriptors (after NIXL's merging of neighbours), ``c`` staging chunks and ``k`` pack kernels
(gather/scatter calls of one side, see ``staging.Expansion.n_ops``)::

    zero-copy = zero_copy_request_s + n * descriptor_s + B / link_Bps
    staged    = staged_request_s
              + c * (chunk_s + descriptor_s)                 # one transfer per chunk
              + k * op_s                                     # kernel launches / calls
              + bytes_s

    bytes_s = B / pack_Bps + B / link_Bps + B / unpack_Bps          (overlap = 0: in sequence)
    bytes_s = (Tp + Tl + Tu) / c + (c - 1) / c * max(Tp, Tl, Tu)    (overlap = 1: chunks pipelined)

with ``Tp, Tl, Tu`` = ``B / pack_Bps``, ``B / link_Bps``, ``B / unpack_Bps`` (the first chunk
goes through every stage, then the slowest stage sets the pace).

* ``descriptor_s``: cost of one posted, non-adjacent descriptor (post + completion share);
  docs/nixl.md §6/§7: ~1.4 µs on host memory (UCX/cma, one ``process_vm_readv`` each), ~11 µs
  over cuda_ipc on the H100 (~1.5 µs on RDMA NICs, nixl#1695 in docs/design.md §9).
* ``link_Bps``: bytes/s of one large descriptor (docs/nixl.md: ~8.3-9.2 GB/s cma, ~1.42 TB/s
  cuda_ipc on one H100).
* ``pack_Bps``/``unpack_Bps``: gather into / scatter from the staging buffer (H100: ~1.1 TB/s
  with the fused kernel, docs/nixl.md §7: 1.28 / 1.23 TB/s for bare torch gathers; CPU:
  8 / 7 GB/s, see below).
* ``chunk_s``: fixed cost per staging chunk (make/post/poll one transfer, stream sync).
* ``staged_request_s``: per-request extra of the staged protocol (the notification round
  trip telling the destination to unpack, and the source that the buffer is free).
* ``op_s``: fixed cost per pack/unpack kernel call (Python + launch); ``staging.expand``
  counts the calls (``Expansion.n_ops``: rows, groups, or one per chunk when fused).
* ``overlap``: 0 while the runtime packs, moves and unpacks a request's chunks one after
  another, 1 once it pipelines them (source packs chunk ``i+1`` while ``i`` moves and the
  destination unpacks ``i-1``); values between interpolate.  The staged engine runs pack and
  unpack on lanes of their own (CUDA streams on GPUs) beside NIXL's transfers, so the
  stages of different chunks can overlap; ``layoutc bench`` solves ``overlap`` from a large
  staged request.
* ``bounce_Bps``: copies between a GPU and host memory (PCIe), for a GPU endpoint whose
  staging buffer is in host memory (``staging_memory="host"``: a link that only carries
  host memory): its pack is a kernel plus a device-to-host copy, its unpack the reverse,
  so ``Tp = B / pack_Bps + B / bounce_Bps`` (likewise ``Tu``).

The sum for zero-copy matches docs/nixl.md's host-memory table (§6) within ~5 % (65,536 x 4 KiB:
92 ms of descriptors + 31 ms of bytes = 123 ms against 122-138 ms measured; 4,096 x 64 KiB:
37 ms against 36-39 ms).  Over cuda_ipc it underestimates very large scattered descriptors
(1 MiB ones measured ~29 µs each), so it favours zero-copy there.  Host-memory defaults for
pack/unpack were measured on the 2-core dev box (``benchmarks/expand_probe.py``, one torch
thread, DRAM-resident pages: per-row ``index_select`` pack ~8 GB/s, unpack ~7 GB/s, a
one-thread ``copy_`` of the same bytes ~9 GB/s; ~10 / ~8-9 GB/s with two threads on an idle
box).

Constants come from, in order: the built-in defaults of the machine kind (``cpu``,
``cuda``), a JSON file named by ``LAYOUTC_COST_MODEL`` (or passed as ``path``), then an
``overrides`` dict.  The JSON is either one flat object of constants or ``{"cpu": {...},
"cuda": {...}}``; ``layoutc bench``/``doctor`` are to write measured constants there
(:meth:`CostModel.save`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = ["DEFAULTS", "CostModel", "ENV_VAR"]

ENV_VAR = "LAYOUTC_COST_MODEL"


@dataclass(frozen=True)
class CostModel:
    """Per-machine constants (seconds, bytes/s) and the strategy choice."""

    kind: str = "cpu"
    descriptor_s: float = 1.4e-6
    link_Bps: float = 8.5e9
    pack_Bps: float = 8e9
    unpack_Bps: float = 7e9
    chunk_s: float = 30e-6
    staged_request_s: float = 100e-6
    zero_copy_request_s: float = 0.0
    op_s: float = 5e-6
    overlap: float = 0.0
    bounce_Bps: float = 25e9
    source: str = "defaults"

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def default(cls, kind: str = "cpu") -> CostModel:
        if kind not in DEFAULTS:
            raise ValueError(f"no default cost model for {kind!r} (known: {', '.join(DEFAULTS)})")
        return DEFAULTS[kind]

    @classmethod
    def load(
        cls,
        kind: str = "cpu",
        *,
        path: str | os.PathLike[str] | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> CostModel:
        """Defaults of ``kind``, updated from ``path`` (or ``$LAYOUTC_COST_MODEL``), then ``overrides``."""
        model = cls.default(kind) if kind in DEFAULTS else replace(DEFAULTS["cpu"], kind=kind)
        if path is None:
            path = os.environ.get(ENV_VAR) or None
        if path is not None:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            if not isinstance(doc, dict):
                raise ValueError(f"{path}: a cost model must be a JSON object")
            if kind in doc and isinstance(doc[kind], dict):
                doc = doc[kind]
            elif any(isinstance(v, dict) for v in doc.values()):
                doc = {}  # per-kind file without this kind: keep the defaults
            model = model.with_values(doc, source=str(path))
        if overrides:
            model = model.with_values(overrides, source=f"{model.source}+overrides")
        return model

    @classmethod
    def from_dict(cls, values: dict[str, Any], kind: str | None = None) -> CostModel:
        kind = kind or str(values.get("kind", "cpu"))
        base = DEFAULTS.get(kind, replace(DEFAULTS["cpu"], kind=kind))
        return base.with_values(values, source="dict")

    def with_values(self, values: dict[str, Any], *, source: str | None = None) -> CostModel:
        known = {f.name for f in fields(self)}
        bad = sorted(set(values) - known)
        if bad:
            raise ValueError(
                f"unknown cost model constants: {', '.join(bad)} (known: {', '.join(sorted(known))})"
            )
        upd: dict[str, Any] = {}
        for k, v in values.items():
            if k in ("kind", "source"):
                upd[k] = str(v)
                continue
            v = float(v)
            if v < 0 or (k.endswith("_Bps") and v <= 0) or (k == "overlap" and v > 1):
                raise ValueError(
                    f"cost model constant {k} out of range (rates > 0, times >= 0, overlap in "
                    f"[0, 1]), got {v}"
                )
            upd[k] = v
        if source is not None and "source" not in values:
            upd["source"] = source
        return replace(self, **upd)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write (or update) this kind's entry of a per-kind JSON file."""
        doc: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            if not all(isinstance(v, dict) for v in doc.values()):
                doc = {}
        d = self.to_dict()
        d.pop("source", None)
        doc[self.kind] = d
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")

    # -- prediction ----------------------------------------------------------------------------
    def zero_copy_s(self, n_descriptors: int, total_bytes: int) -> float:
        """Predicted seconds of a zero-copy transfer of one (peer, request)."""
        return (
            self.zero_copy_request_s
            + n_descriptors * self.descriptor_s
            + total_bytes / self.link_Bps
        )

    def staged_s(
        self, total_bytes: int, n_chunks: int = 1, n_ops: int = 0, *, bounce: bool = False
    ) -> float:
        """Predicted seconds of a staged transfer of one (peer, request); ``bounce``: the
        staging buffers are in host memory beside GPU pages (a copy each way on top of the
        kernels)."""
        B = float(total_bytes)
        c = max(1, int(n_chunks))
        extra = B / self.bounce_Bps if bounce else 0.0
        stages = (B / self.pack_Bps + extra, B / self.link_Bps, B / self.unpack_Bps + extra)
        seq = sum(stages)
        piped = seq / c + (c - 1) / c * max(stages)
        ov = min(1.0, max(0.0, self.overlap))
        return (
            self.staged_request_s
            + c * (self.chunk_s + self.descriptor_s)
            + n_ops * self.op_s
            + (1.0 - ov) * seq
            + ov * piped
        )

    def predict(
        self, n_descriptors: int, total_bytes: int, n_chunks: int = 1, n_ops: int = 0
    ) -> dict[str, float]:
        """Predicted seconds of each strategy for one (peer, request)."""
        return {
            "zero-copy": self.zero_copy_s(n_descriptors, total_bytes),
            "staged": self.staged_s(total_bytes, n_chunks, n_ops),
        }

    def choose(
        self, n_descriptors: int, total_bytes: int, n_chunks: int = 1, n_ops: int = 0
    ) -> str:
        """``"zero-copy"`` or ``"staged"``, whichever :meth:`predict` finds faster (ties: zero-copy)."""
        t = self.predict(n_descriptors, total_bytes, n_chunks, n_ops)
        return "staged" if t["staged"] < t["zero-copy"] else "zero-copy"

    def choose_for(self, expansion: Any) -> str:
        """:meth:`choose` for a ``staging.Expansion`` (posted descriptors, bytes, chunks, ops)."""
        return self.choose(
            expansion.n_posted, expansion.nbytes, expansion.n_chunks, expansion.n_ops
        )


DEFAULTS: dict[str, CostModel] = {
    # Host memory, UCX/cma (docs/nixl.md §6): ~1.4 µs per scattered descriptor, ~8.5 GB/s for
    # one big one.
    # pack/unpack/op_s: benchmarks/expand_probe.py on the 2-core dev box (one torch thread,
    # DRAM-resident pages; ~4.2 µs of host time per gather call).  overlap: the endpoint
    # pipelines chunks through its staging slots and, on host memory, splits the copies
    # between the two processes (``staged`` module); ``layoutc bench`` fitted 0.56-0.77 on the
    # 2-core box.  staged_request_s: the protocol's steps (SREQ, pack, the first chunk's data,
    # unpack, DONE), each a turn of both engines' poll loops in Python; a one-block staged
    # request took 0.9-1.4 ms there with both processes polling (zero-copy: 0.35 ms).
    "cpu": CostModel(
        kind="cpu",
        descriptor_s=1.4e-6,
        link_Bps=8.5e9,
        pack_Bps=8e9,
        unpack_Bps=7e9,
        chunk_s=30e-6,
        staged_request_s=1e-3,
        zero_copy_request_s=0.0,
        op_s=5e-6,
        overlap=0.7,
    ),
    # One H100, cuda_ipc between processes (docs/nixl.md §7): ~11 µs per scattered descriptor,
    # ~1.42 TB/s one big one.  pack/unpack: staging's fused triton kernel on the H100
    # (benchmarks/staging_gpu_probe.py: 1.13-1.27 TB/s for 4-8 KiB runs, ~0.79 TB/s for a
    # hybrid plan with 192-byte runs); op_s: host cost of one torch gather call there.
    "cuda": CostModel(
        kind="cuda",
        descriptor_s=11e-6,
        link_Bps=1.42e12,
        pack_Bps=1.1e12,
        unpack_Bps=1.1e12,
        chunk_s=30e-6,
        staged_request_s=50e-6,
        zero_copy_request_s=0.0,
        op_s=15e-6,
    ),
}
