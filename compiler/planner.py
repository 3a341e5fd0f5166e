"""The planner: two ranked layouts (prefill at P_TP, decode at D_TP) -> a transfer Plan.

For every decode rank and state it intersects, dim by dim, what the decode rank holds with
what each prefill rank holds, picks exactly one source for every element (replicated data
from one holder, preferring the prefill ranks "under" the decode rank on the TP axis, so work
spreads and vLLM's choices are kept), maps both sides to byte offsets, and coalesces each box
into strided byte runs contiguous on both sides.  Neighbouring runs of one page are merged
across dims and states for posting.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..runtime.layout import DimDesc, SegmentDesc, local_dim
from ..runtime.plan import PageLayout, Plan, RankPlan, RunGroup, SideLayout, StateLayout
from .ast import Span
from .diagnostics import Diagnostic, LayoutSemanticError
from .ir import RankedSpec, StateIR
from .layout_algebra import coalesce_joint

PER = {"kernel_block": "kernel", "logical_block": "logical"}


def dim_desc(st: StateIR) -> tuple[DimDesc, ...]:
    return tuple(
        DimDesc(
            d.name, tuple(SegmentDesc(s.name, s.size, s.unit or 0) for s in d.segments), d.paged
        )
        for d in st.dims
    )


def side_layout(r: RankedSpec, role: str) -> SideLayout:
    pages = tuple(
        PageLayout(
            p.ir.name, p.ir.states, p.nbytes, PER[p.ir.per], p.kernel_stride, r.kernel_blocks
        )
        for p in r.pages
    )
    states = tuple(
        StateLayout(
            s.ir.name, s.ir.page, s.ir.dtype, s.offset, s.nbytes, s.ir.itemsize, dim_desc(s.ir)
        )
        for s in r.states
    )
    return SideLayout(role, r.tp, r.kernel_blocks, r.bound.params, pages, states)


def _refuse(message: str, span: Span | None) -> LayoutSemanticError:
    return LayoutSemanticError([Diagnostic(message, span, "E070")])


def check_compatible(p: RankedSpec, d: RankedSpec) -> None:
    """Refuse (with the reason) prefill/decode layouts whose logical contents differ."""
    ps, ds = p.bound, d.bound
    if [s.name for s in ps.states] != [s.name for s in ds.states]:
        raise _refuse("prefill and decode specs declare different states", None)
    for a, b in zip(ps.states, ds.states):
        if a.dtype != b.dtype:
            raise _refuse(
                f"state '{a.name}' is {a.dtype} on prefill but {b.dtype} on decode "
                "(dtype conversion is not part of a transfer plan)",
                a.span,
            )
        if a.page != b.page:
            raise _refuse(f"state '{a.name}' is in different pages on the two sides", a.span)
        if len(a.dims) != len(b.dims):
            raise _refuse(f"state '{a.name}' has different dims on the two sides", a.span)
        per_kernel = ps.page(a.page).per == "kernel_block"
        for da, db in zip(a.dims, b.dims):
            if da.paged and per_kernel:
                ta, tb = da.size * ps.kernel_blocks, db.size * ds.kernel_blocks
                if ta != tb:
                    raise _refuse(
                        f"a logical block holds {ta} tokens on prefill ('{da.name}' {da.size} x "
                        f"kernel_blocks {ps.kernel_blocks}) but {tb} on decode ({db.size} x "
                        f"{ds.kernel_blocks}); bind kernel_blocks so both sides hold the same "
                        "tokens per logical block",
                        da.span,
                    )
                continue
            if [(s.name, s.size) for s in da.segments] != [(s.name, s.size) for s in db.segments]:
                sa = " | ".join(f"{s.name} {s.size}" for s in da.segments)
                sb = " | ".join(f"{s.name} {s.size}" for s in db.segments)
                raise _refuse(
                    f"dim '{da.name}' of state '{a.name}' is [{sa}] on prefill but [{sb}] on decode",
                    da.span,
                )
        if per_kernel and not any(x.paged for x in a.dims) and ps.kernel_blocks != ds.kernel_blocks:
            raise _refuse(
                f"state '{a.name}' is stored per kernel block with no paged dim, so both sides need "
                f"the same kernel_blocks (prefill {ps.kernel_blocks}, decode {ds.kernel_blocks})",
                a.span,
            )


@dataclass(frozen=True)
class _Piece:
    """A stretch of one dim held by both sides: global start, length, local starts, kernel blocks."""

    g: int
    n: int
    dl: int
    dk: int
    pl: int
    pk: int


def _pieces(dd: DimDesc, pd: DimDesc, dtp, d, ptp, p, dkb, pkb, per_kernel) -> list[_Piece]:
    if dd.paged and per_kernel:
        total = dd.size * dkb
        cuts = sorted(set(range(0, total, dd.size)) | set(range(0, total, pd.size)) | {total})
        return [
            _Piece(a, b - a, a % dd.size, a // dd.size, a % pd.size, a // pd.size)
            for a, b in zip(cuts, cuts[1:])
        ]
    out = []
    for (gd, ld, nd), (gp, lp, np_) in zip(local_dim(dd, dtp, d), local_dim(pd, ptp, p)):
        lo, hi = max(gd, gp), min(gd + nd, gp + np_)
        if lo < hi:
            out.append(_Piece(lo, hi - lo, ld + lo - gd, 0, lp + lo - gp, 0))
    return out


def _row_major(shape: tuple[int, ...]) -> list[int]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return out[::-1]


def _natural(d: int, dtp: int, ptp: int) -> range:
    """Prefill ranks whose share of the TP axis overlaps decode rank d's share."""
    return range(d * ptp // dtp, -(-(d + 1) * ptp // dtp))


def _state_reads(pr: RankedSpec, dr: RankedSpec, name: str, d: int) -> list[RunGroup]:
    pst, dst = pr.state(name), dr.state(name)
    ddims, pdims = dim_desc(dst.ir), dim_desc(pst.ir)
    per_kernel = dr.page(dst.ir.page).ir.per == "kernel_block"
    has_paged = any(x.paged for x in ddims)
    copies = dr.kernel_blocks if (per_kernel and not has_paged) else 1
    isz = dst.ir.itemsize
    dshape = [sum(x[2] for x in local_dim(x, dr.tp, d)) for x in ddims]
    dstr = _row_major(tuple(dshape))
    dks, pks = dr.page(dst.ir.page).kernel_stride, pr.page(pst.ir.page).kernel_stride
    # boxes by key -> holders
    boxes: dict[tuple, list[tuple[int, tuple[_Piece, ...]]]] = {}
    for p in range(pr.tp):
        pshape = [sum(x[2] for x in local_dim(x, pr.tp, p)) for x in pdims]
        pstr = _row_major(tuple(pshape))
        per_dim = [
            _pieces(a, b, dr.tp, d, pr.tp, p, dr.kernel_blocks, pr.kernel_blocks, per_kernel)
            for a, b in zip(ddims, pdims)
        ]
        for combo in itertools.product(*per_dim):
            key = tuple((c.g, c.n, c.dk) for c in combo)
            boxes.setdefault(key, []).append((p, combo, tuple(pstr)))
    natural = _natural(d, dr.tp, pr.tp)
    out = []
    for key in sorted(boxes):
        holders = boxes[key]
        chosen = next((h for h in holders if h[0] in natural), holders[d % len(holders)])
        p, combo, pstr = chosen
        dbase = dst.offset + sum(c.dl * s for c, s in zip(combo, dstr)) * isz
        pbase = pst.offset + sum(c.pl * s for c, s in zip(combo, pstr)) * isz
        dbase += sum(c.dk for c in combo) * dks
        pbase += sum(c.pk for c in combo) * pks
        shape = tuple(c.n for c in reversed(combo))
        ds = tuple(s * isz for s in reversed(dstr))
        ps = tuple(s * isz for s in reversed(pstr))
        shape, ds, ps = coalesce_joint(shape, ds, ps)
        nbytes = isz
        if shape and ds[0] == isz and ps[0] == isz:
            nbytes = shape[0] * isz
            shape, ds, ps = shape[1:], ds[1:], ps[1:]
        for k in range(copies):
            out.append(
                RunGroup(
                    page=dst.ir.page,
                    prefill_rank=p,
                    decode_offset=dbase + k * dks,
                    prefill_offset=pbase + k * pks,
                    nbytes=nbytes,
                    shape=tuple(reversed(shape)),
                    decode_stride=tuple(reversed(ds)),
                    prefill_stride=tuple(reversed(ps)),
                    state=name,
                )
            )
    return out


def _compress(
    page: str, p: int, d_off: np.ndarray, p_off: np.ndarray, n: np.ndarray, state: str | None = None
) -> list[RunGroup]:
    """Runs (sorted by decode offset) -> 1-D strided RunGroups of equal length and step."""
    out: list[RunGroup] = []
    i, total = 0, len(n)
    while i < total:
        j = i + 1
        if j < total and n[j] == n[i]:
            dd, dp = int(d_off[j] - d_off[i]), int(p_off[j] - p_off[i])
            while (
                j + 1 < total
                and n[j + 1] == n[i]
                and d_off[j + 1] - d_off[j] == dd
                and p_off[j + 1] - p_off[j] == dp
            ):
                j += 1
            count = j - i + 1
            out.append(
                RunGroup(
                    page, p, int(d_off[i]), int(p_off[i]), int(n[i]), (count,), (dd,), (dp,), state
                )
            )
            i = j + 1
        else:
            out.append(RunGroup(page, p, int(d_off[i]), int(p_off[i]), int(n[i]), state=state))
            i += 1
    return out


def merge_posts(
    reads: list[RunGroup], state: str | None = None, kernel_strides: tuple[int, int] | None = None
) -> list[RunGroup]:
    """Merge runs of one page and source that are contiguous on both sides.

    With `state` given, `reads` are one state's and the result keeps that state, and runs do not
    merge across kernel blocks (`kernel_strides` = decode, prefill); otherwise runs merge across
    states and kernel blocks (what the runtime posts).
    """
    out: list[RunGroup] = []
    keys = sorted({(g.page, g.prefill_rank) for g in reads})
    for page, p in keys:
        ds, ps, ns = [], [], []
        for g in reads:
            if g.page == page and g.prefill_rank == p:
                a, b = g.expand()
                ds.append(a)
                ps.append(b)
                ns.append(np.full(a.shape[0], g.nbytes, dtype=np.int64))
        d = np.concatenate(ds)
        order = np.argsort(d, kind="stable")
        d, pp, n = d[order], np.concatenate(ps)[order], np.concatenate(ns)[order]
        # start a new run wherever the previous one does not end exactly here on both sides
        brk = np.ones(len(d), dtype=bool)
        brk[1:] = (d[:-1] + n[:-1] != d[1:]) | (pp[:-1] + n[:-1] != pp[1:])
        if kernel_strides is not None:
            dks, pks = kernel_strides
            brk[1:] |= (d[:-1] // dks != d[1:] // dks) | (pp[:-1] // pks != pp[1:] // pks)
        starts = np.flatnonzero(brk)
        lengths = np.add.reduceat(n, starts)
        out.extend(_compress(page, p, d[starts], pp[starts], lengths, state))
    return out


def plan(spec_name: str, sha256: str, pr: RankedSpec, dr: RankedSpec) -> Plan:
    """Plan every decode rank of (pr.tp -> dr.tp).  The result is not yet verified."""
    check_compatible(pr, dr)
    ranks = []
    for d in range(dr.tp):
        reads: list[RunGroup] = []
        for st in dr.states:
            ks = None
            if dr.page(st.ir.page).ir.per == "kernel_block":
                ks = (dr.page(st.ir.page).kernel_stride, pr.page(st.ir.page).kernel_stride)
            reads.extend(merge_posts(_state_reads(pr, dr, st.ir.name, d), st.ir.name, ks))
        sources = tuple(sorted({g.prefill_rank for g in reads}))
        notify_only = tuple(p for p in _natural(d, dr.tp, pr.tp) if p not in sources)
        ranks.append(RankPlan(d, sources, notify_only, tuple(reads), tuple(merge_posts(reads))))
    layer_kinds = tuple((ly.name, ly.pages) for ly in dr.bound.layers)
    return Plan(
        spec=spec_name,
        spec_sha256=sha256,
        prefill=side_layout(pr, "prefill"),
        decode=side_layout(dr, "decode"),
        ranks=tuple(ranks),
        layer_kinds=layer_kinds,
    )
