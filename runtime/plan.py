"""Transfer plans: the data that generated modules hold and the runtime executes.

A :class:`Plan` describes, for one (prefill TP, decode TP) pair, how every decode rank fills
its pages from the prefill ranks.  It is pure data plus a few cheap derived views; it never
imports the compiler (lark, jinja2) so engines can load generated modules without them.

Addressing model (both sides alike):

* A *page* is a named group of states laid end to end.  Each page lives in its own buffer per
  layer (engines may alias buffers, e.g. vLLM's hybrid cache shares one tensor between the
  attention and the Mamba page; both then share one ``kernel_stride``).
* A *logical block* (what requests carry) is ``kernel_blocks`` consecutive kernel blocks.
  A page is either ``per="kernel"`` (one copy per kernel block, e.g. attention KV) or
  ``per="logical"`` (one copy per logical block, e.g. Mamba conv/SSM state).
* The bytes of logical block ``L`` of a page start at ``L * logical_stride`` in its buffer,
  ``logical_stride = kernel_blocks * kernel_stride``.  Every run offset below is relative to
  that start, on each side.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import PlanError, PlanFormatError
from .layout import DimDesc, SegmentDesc, element_ids

#: (major, minor) of the table format this runtime reads.  1.2 adds token remaps (pairs
#: holding different tokens per logical block); 1.1 added structured segments
#: (a segment table ``(name, size, unit, dims)``); modules without them are written as 1.0.
PLAN_FORMAT = (1, 2)


def require_plan_format(module_format: tuple[int, int], module_name: str) -> None:
    """Refuse generated modules of another major format or a newer minor format.

    ``LAYOUTC_SKIP_FORMAT_CHECK=1`` skips the check (for emergencies only).
    """
    if os.environ.get("LAYOUTC_SKIP_FORMAT_CHECK") == "1":
        return
    major, minor = module_format
    if major != PLAN_FORMAT[0] or minor > PLAN_FORMAT[1]:
        raise PlanFormatError(
            f"{module_name} was generated for plan format {major}.{minor}, but this runtime "
            f"reads {PLAN_FORMAT[0]}.{PLAN_FORMAT[1]}; regenerate it with `layoutc compile` "
            f"or install a matching layoutc"
        )


DTYPE_SIZES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


@dataclass(frozen=True)
class StateLayout:
    """One state on one side, on one rank: where it sits in its page and how big it is."""

    name: str
    page: str
    dtype: str
    offset: int  # bytes from the page start (of kernel page 0 for per-kernel pages)
    nbytes: int  # bytes of the state in one page
    itemsize: int = 1
    dims: tuple[DimDesc, ...] = ()  # logical dims, outermost first (global sizes, distribution)


@dataclass(frozen=True)
class PageLayout:
    """One page kind on one side, on one rank."""

    name: str
    states: tuple[str, ...]
    nbytes: int  # bytes used by the states (the rest of the stride is padding)
    per: str  # "kernel" or "logical"
    kernel_stride: int  # bytes between consecutive kernel blocks in the page's buffer
    kernel_blocks: int  # kernel blocks per logical block

    @property
    def logical_stride(self) -> int:
        return self.kernel_stride * self.kernel_blocks

    def buffer_bytes(self, num_logical_blocks: int) -> int:
        """Bytes of a buffer holding ``num_logical_blocks`` logical blocks of this page."""
        return num_logical_blocks * self.logical_stride


@dataclass(frozen=True)
class SideLayout:
    """Everything one engine (prefill or decode) must agree on, at one TP size."""

    role: str  # "prefill" or "decode"
    tp: int
    kernel_blocks: int
    params: tuple[tuple[str, Any], ...]  # bound parameter values, sorted by name
    pages: tuple[PageLayout, ...]
    states: tuple[StateLayout, ...]

    def page(self, name: str) -> PageLayout:
        for p in self.pages:
            if p.name == name:
                return p
        raise PlanError(f"no page named {name!r} (pages: {', '.join(self.page_names)})")

    def state(self, name: str) -> StateLayout:
        for s in self.states:
            if s.name == name:
                return s
        raise PlanError(f"no state named {name!r}")

    def element_ids(self, state: str, rank: int) -> np.ndarray:
        """Global element ids of ``state`` on ``rank``: shape (copies, elements).

        Row ``k`` holds the ids of the state's elements in kernel block ``k`` of a logical
        block (one row for per-logical-block pages), in byte order; element ``e`` of row
        ``k`` sits at ``k * kernel_stride + offset + e * itemsize`` from the logical block
        start of the state's page.
        """
        st = self.state(state)
        page = self.page(st.page)
        return element_ids(st.dims, self.tp, rank, self.kernel_blocks, page.per == "kernel")

    @property
    def page_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.pages)

    def header(self) -> dict[str, Any]:
        """The layout facts a peer must agree with (used by the handshake)."""
        return {
            "tp": self.tp,
            "kernel_blocks": self.kernel_blocks,
            "params": {k: v for k, v in self.params},
            "pages": {
                p.name: {"nbytes": p.nbytes, "kernel_stride": p.kernel_stride, "per": p.per}
                for p in self.pages
            },
        }


@dataclass(frozen=True)
class TokenRemap:
    """How requests map between engines holding different tokens per logical block.

    A request's tokens are cut into windows of ``chunk_tokens`` (the greatest common divisor of
    the two sides' kernel block sizes).  Window ``q`` lives, on each side, in the request's
    logical block ``q*chunk_tokens // block_tokens``, its kernel block
    ``(q*chunk_tokens % block_tokens) // kernel_tokens``, from row ``q*chunk_tokens %
    kernel_tokens``.  The plan's runs of per-kernel-block pages move window 0 (rows from 0 of
    kernel block 0 on both sides); the runtime shifts them per window.  Per-logical-block
    pages (a request's state, e.g. Mamba's) move once, logical block to logical block.
    """

    chunk_tokens: int
    prefill_kernel_tokens: int
    prefill_kernel_blocks: int
    decode_kernel_tokens: int
    decode_kernel_blocks: int

    def side(self, role: str) -> tuple[int, int]:
        """(tokens per kernel block, kernel blocks per logical block) of ``role``."""
        if role == "prefill":
            return self.prefill_kernel_tokens, self.prefill_kernel_blocks
        return self.decode_kernel_tokens, self.decode_kernel_blocks

    def blocks_for(self, role: str, num_tokens: int) -> int:
        """Logical blocks of ``role`` holding ``num_tokens`` tokens."""
        kt, kb = self.side(role)
        return -(-num_tokens // (kt * kb))

    def windows(self, role: str, num_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every window of a request of ``num_tokens`` tokens on ``role``: (index of its
        logical block in the request, kernel block within it, first row), int64 arrays."""
        kt, kb = self.side(role)
        start = np.arange(-(-num_tokens // self.chunk_tokens), dtype=np.int64) * self.chunk_tokens
        per_logical = kt * kb
        within = start % per_logical
        return start // per_logical, within // kt, within % kt


@dataclass(frozen=True)
class RunGroup:
    """A strided family of byte runs copied from one prefill rank into one decode rank.

    Run ``i`` (a multi-index over ``shape``) copies ``nbytes`` bytes from
    ``prefill_offset + sum(i*prefill_stride)`` to ``decode_offset + sum(i*decode_stride)``.
    Offsets count from the start of the logical block of ``page`` on each side.
    ``state`` is the state the bytes belong to, or ``None`` for a run merged across states.
    """

    page: str
    prefill_rank: int
    decode_offset: int
    prefill_offset: int
    nbytes: int
    shape: tuple[int, ...] = ()
    decode_stride: tuple[int, ...] = ()
    prefill_stride: tuple[int, ...] = ()
    state: str | None = None
    #: (decode, prefill) bytes between consecutive tokens of the runs' state, for a plan with a
    #: token remap (:class:`TokenRemap`): the runs of a window of tokens starting at row ``r``
    #: of a kernel block are these shifted by ``r * token_stride``; (0, 0) otherwise
    token_stride: tuple[int, int] = (0, 0)

    @property
    def count(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def expand(self) -> tuple[np.ndarray, np.ndarray]:
        """(decode_offsets, prefill_offsets) of every run, int64, outer modes slowest."""
        d = np.array([self.decode_offset], dtype=np.int64)
        p = np.array([self.prefill_offset], dtype=np.int64)
        for n, ds, ps in zip(self.shape, self.decode_stride, self.prefill_stride):
            step = np.arange(n, dtype=np.int64)
            d = (d[:, None] + step[None, :] * ds).reshape(-1)
            p = (p[:, None] + step[None, :] * ps).reshape(-1)
        return d, p

    def layout_str(self) -> str:
        """CuTe-style ``shape:(decode stride, prefill stride)`` of the run family."""
        if not self.shape:
            return f"{self.nbytes}B"
        shp = ",".join(map(str, self.shape))
        ds = ",".join(map(str, self.decode_stride))
        ps = ",".join(map(str, self.prefill_stride))
        return f"{self.nbytes}B x ({shp}):(d {ds}; p {ps})"


@dataclass(frozen=True)
class Runs:
    """Expanded runs of one (decode rank, page, prefill rank): NIXL-ready int64 columns."""

    decode_offset: np.ndarray
    prefill_offset: np.ndarray
    nbytes: np.ndarray
    #: bytes per token of each run on each side (a token remap's runs; zeros otherwise)
    decode_token_stride: np.ndarray
    prefill_token_stride: np.ndarray

    def __len__(self) -> int:
        return int(self.nbytes.shape[0])

    @property
    def total_bytes(self) -> int:
        return int(self.nbytes.sum())


def _expand(groups: tuple[RunGroup, ...]) -> Runs:
    if not groups:
        z = np.zeros(0, dtype=np.int64)
        return Runs(z, z.copy(), z.copy(), z.copy(), z.copy())
    ds, ps, ns, dts, pts = [], [], [], [], []
    for g in groups:
        d, p = g.expand()
        ds.append(d)
        ps.append(p)
        ns.append(np.full(d.shape[0], g.nbytes, dtype=np.int64))
        dts.append(np.full(d.shape[0], g.token_stride[0], dtype=np.int64))
        pts.append(np.full(d.shape[0], g.token_stride[1], dtype=np.int64))
    d = np.concatenate(ds)
    order = np.argsort(d, kind="stable")
    runs = Runs(
        d[order],
        np.concatenate(ps)[order],
        np.concatenate(ns)[order],
        np.concatenate(dts)[order],
        np.concatenate(pts)[order],
    )
    for a in (
        runs.decode_offset,
        runs.prefill_offset,
        runs.nbytes,
        runs.decode_token_stride,
        runs.prefill_token_stride,
    ):
        a.setflags(write=False)
    return runs


@dataclass(frozen=True)
class RankPlan:
    """What one decode rank reads: its sources, who it only notifies, and the runs."""

    rank: int
    sources: tuple[int, ...]
    notify_only: tuple[int, ...]
    reads: tuple[RunGroup, ...]  # per state (each group has ``state`` set)
    posts: tuple[RunGroup, ...]  # merged across states where both sides are contiguous

    @property
    def notified(self) -> tuple[int, ...]:
        """Every prefill rank this decode rank must notify when a request completes."""
        return tuple(sorted(set(self.sources) | set(self.notify_only)))

    def runs(self, page: str, prefill_rank: int) -> Runs:
        """Expanded posting runs for one page from one prefill rank (cached)."""
        return _runs_cached(self, page, prefill_rank)

    def pages(self) -> tuple[str, ...]:
        return tuple(sorted({g.page for g in self.posts}))


@functools.lru_cache(maxsize=4096)
def _runs_cached(rank_plan: RankPlan, page: str, prefill_rank: int) -> Runs:
    return _expand(
        tuple(g for g in rank_plan.posts if g.page == page and g.prefill_rank == prefill_rank)
    )


@dataclass(frozen=True)
class Plan:
    """The transfer plan of one (prefill TP, decode TP) pair of one spec."""

    spec: str
    spec_sha256: str
    prefill: SideLayout
    decode: SideLayout
    ranks: tuple[RankPlan, ...]
    layer_kinds: tuple[tuple[str, tuple[str, ...]], ...] = ()
    spans: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    #: set when the two sides hold different tokens per logical block (see TokenRemap)
    remap: TokenRemap | None = None

    @property
    def prefill_tp(self) -> int:
        return self.prefill.tp

    @property
    def decode_tp(self) -> int:
        return self.decode.tp

    def rank(self, decode_rank: int) -> RankPlan:
        if not 0 <= decode_rank < len(self.ranks):
            raise PlanError(
                f"decode rank {decode_rank} out of range for decode TP {self.decode_tp}"
            )
        return self.ranks[decode_rank]

    def readers(self, prefill_rank: int) -> tuple[int, ...]:
        """Decode ranks that notify ``prefill_rank`` for every request (its completion count)."""
        if not 0 <= prefill_rank < self.prefill_tp:
            raise PlanError(
                f"prefill rank {prefill_rank} out of range for prefill TP {self.prefill_tp}"
            )
        return tuple(r.rank for r in self.ranks if prefill_rank in r.notified)

    def targets(self, prefill_rank: int) -> tuple[int, ...]:
        """Decode ranks that read bytes from ``prefill_rank`` (its WRITE targets in push mode).

        A subset of :meth:`readers`: ranks for which ``prefill_rank`` is only ``notify_only``
        are not targets.
        """
        if not 0 <= prefill_rank < self.prefill_tp:
            raise PlanError(
                f"prefill rank {prefill_rank} out of range for prefill TP {self.prefill_tp}"
            )
        return tuple(r.rank for r in self.ranks if prefill_rank in r.sources)

    def layer_pages(self, kind: str) -> tuple[str, ...]:
        for k, pages in self.layer_kinds:
            if k == kind:
                return pages
        raise PlanError(f"no layer kind {kind!r}")

    def descriptors_per_block(self, decode_rank: int) -> dict[str, int]:
        """Posted runs per logical block and page for one decode rank (all sources)."""
        out: dict[str, int] = {}
        for g in self.rank(decode_rank).posts:
            out[g.page] = out.get(g.page, 0) + g.count
        return out

    def iter_reads(self, decode_rank: int) -> Iterator[dict[str, Any]]:
        """Per-state reads as in ``layoutc plan --format json`` (offsets from state start; with
        a token remap, a per-kernel-block state's reads move one window of tokens and carry
        their bytes per token)."""
        for g in self.rank(decode_rank).reads:
            assert g.state is not None
            dst = self.decode.state(g.state)
            src = self.prefill.state(g.state)
            d, p = g.expand()
            for do, po in zip(d.tolist(), p.tolist()):
                row: dict[str, Any] = {
                    "state": g.state,
                    "prefill_rank": g.prefill_rank,
                    "decode_offset": do - dst.offset,
                    "prefill_offset": po - src.offset,
                    "nbytes": g.nbytes,
                }
                if g.token_stride != (0, 0):
                    row["token_stride"] = {
                        "decode": g.token_stride[0],
                        "prefill": g.token_stride[1],
                    }
                yield row

    def to_json(self) -> dict[str, Any]:
        """The ``layoutc.plan/1`` JSON document of this plan (``token_remap`` only for a pair
        whose sides hold different tokens per logical block)."""
        doc = self._json()
        if self.remap is not None:
            rm = self.remap
            doc["token_remap"] = {
                "chunk_tokens": rm.chunk_tokens,
                "prefill": {
                    "kernel_tokens": rm.prefill_kernel_tokens,
                    "kernel_blocks": rm.prefill_kernel_blocks,
                },
                "decode": {
                    "kernel_tokens": rm.decode_kernel_tokens,
                    "kernel_blocks": rm.decode_kernel_blocks,
                },
            }
        return doc

    def _json(self) -> dict[str, Any]:
        return {
            "format": "layoutc.plan/1",
            "spec": self.spec,
            "spec_sha256": self.spec_sha256,
            "prefill_tp": self.prefill_tp,
            "decode_tp": self.decode_tp,
            "kernel_blocks": {
                "prefill": self.prefill.kernel_blocks,
                "decode": self.decode.kernel_blocks,
            },
            "states": [
                {
                    "name": s.name,
                    "page": s.page,
                    "dtype": s.dtype,
                    "bytes": {"prefill": s.nbytes, "decode": self.decode.state(s.name).nbytes},
                }
                for s in self.prefill.states
            ],
            "pages": [
                {
                    "name": p.name,
                    "per": p.per,
                    "states": list(p.states),
                    "kernel_stride": {
                        "prefill": p.kernel_stride,
                        "decode": self.decode.page(p.name).kernel_stride,
                    },
                }
                for p in self.prefill.pages
            ],
            "decode_ranks": [
                {
                    "rank": r.rank,
                    "sources": list(r.sources),
                    "notify_only": list(r.notify_only),
                    "descriptors_per_block": self.descriptors_per_block(r.rank),
                    "reads": list(self.iter_reads(r.rank)),
                }
                for r in self.ranks
            ],
            "prefill_ranks": [
                {"rank": p, "readers": list(self.readers(p))} for p in range(self.prefill_tp)
            ],
        }


# --- generated-module tables -------------------------------------------------------------------
#
# Generated modules hold plain tuples (no dataclass reprs) so they stay small, deterministic
# and readable; these functions turn them back into Plan objects.


def _dims_from_table(dims: tuple) -> tuple[DimDesc, ...]:
    """``(name, paged, segments)`` rows -> DimDesc; a segment row is ``(name, size, unit)`` or,
    for a structured segment, ``(name, size, unit, dims)``."""
    return tuple(
        DimDesc(
            dname,
            tuple(
                SegmentDesc(s[0], s[1], s[2], _dims_from_table(s[3]) if len(s) > 3 else ())
                for s in segs
            ),
            paged,
        )
        for dname, paged, segs in dims
    )


def _side_from_table(role: str, t: tuple, params: dict[str, Any]) -> SideLayout:
    tp, kernel_blocks, pages_t, states_t = t
    pages = tuple(
        PageLayout(name, tuple(states), nbytes, per, kstride, kernel_blocks)
        for name, states, nbytes, per, kstride in pages_t
    )
    states = tuple(
        StateLayout(
            name,
            page,
            dtype,
            offset,
            nbytes,
            itemsize,
            _dims_from_table(dims),
        )
        for name, page, dtype, offset, nbytes, itemsize, dims in states_t
    )
    return SideLayout(role, tp, kernel_blocks, tuple(sorted(params.items())), pages, states)


def _group(page_names: tuple[str, ...], state_names: tuple[str, ...], t: tuple) -> RunGroup:
    page, src, doff, poff, nbytes, shape, dstride, pstride, state = t[:9]
    token_stride = tuple(t[9]) if len(t) > 9 else (0, 0)
    return RunGroup(
        page_names[page],
        src,
        doff,
        poff,
        nbytes,
        tuple(shape),
        tuple(dstride),
        tuple(pstride),
        None if state < 0 else state_names[state],
        (int(token_stride[0]), int(token_stride[1])),
    )


class PlanTables:
    """The plans of one generated module, built lazily per compiled pair."""

    def __init__(
        self,
        *,
        spec: str,
        spec_sha256: str,
        params: dict[str, dict[str, Any]],
        sides: dict[tuple[str, int], tuple],
        pairs: dict[tuple[int, int], tuple],
        layer_kinds: tuple[tuple[str, tuple[str, ...]], ...],
        compile_command: str,
        remap: dict[tuple[int, int], tuple[int, ...]] | None = None,
    ):
        self.spec = spec
        self.spec_sha256 = spec_sha256
        self.params = params
        self.sides = sides
        self.pairs = pairs
        self.layer_kinds = layer_kinds
        self.compile_command = compile_command
        #: (prefill TP, decode TP) -> TokenRemap fields, for pairs holding different tokens
        self.remap = dict(remap or {})
        self._cache: dict[tuple[int, int], Plan] = {}

    @property
    def compiled_pairs(self) -> tuple[tuple[int, int], ...]:
        return tuple(sorted(self.pairs))

    def plan(self, prefill_tp: int, decode_tp: int) -> Plan:
        key = (prefill_tp, decode_tp)
        if key not in self.pairs:
            have = ",".join(f"{p}:{d}" for p, d in self.compiled_pairs) or "none"
            want = ",".join(f"{p}:{d}" for p, d in sorted(set(self.compiled_pairs) | {key}))
            command = re.sub(r" --tp-pairs \S+", "", self.compile_command)
            raise PlanError(
                f"{self.spec}: prefill TP {prefill_tp} -> decode TP {decode_tp} was not compiled "
                f"(compiled pairs: {have}); add it with: {command} --tp-pairs {want}"
            )
        if key not in self._cache:
            prefill = _side_from_table(
                "prefill", self.sides[("prefill", prefill_tp)], self.params["prefill"]
            )
            decode = _side_from_table(
                "decode", self.sides[("decode", decode_tp)], self.params["decode"]
            )
            pages = decode.page_names
            states = tuple(s.name for s in decode.states)
            ranks = tuple(
                RankPlan(
                    rank,
                    tuple(sources),
                    tuple(notify),
                    tuple(_group(pages, states, g) for g in reads),
                    tuple(_group(pages, states, g) for g in posts),
                )
                for rank, sources, notify, reads, posts in self.pairs[key]
            )
            rm = self.remap.get(key)
            self._cache[key] = Plan(
                self.spec,
                self.spec_sha256,
                prefill,
                decode,
                ranks,
                self.layer_kinds,
                remap=None if rm is None else TokenRemap(*rm),
            )
        return self._cache[key]
