"""The planner: two ranked layouts (prefill at P_TP, decode at D_TP) -> a transfer Plan.

For every decode rank and state it intersects, dim by dim, what the decode rank holds with
what each prefill rank holds, picks exactly one source for every element (replicated data
from one holder, preferring the prefill ranks "under" the decode rank on the TP axis, so work
spreads and vLLM's choices are kept), maps both sides to byte offsets, and coalesces each box
into strided byte runs contiguous on both sides.  Neighbouring runs of one page are merged
across dims and states for posting.

Kernel blocks cost nothing: the runs of a per-kernel-block page repeat with a period of a few
kernel blocks (one, unless the two sides use different block sizes: then the least common
multiple of the two in tokens), so the planner plans one period and adds the repetition as the
outermost mode of each run group.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from ..runtime.layout import DimDesc, SegmentDesc, components, has_paged, local_dim
from ..runtime.plan import PageLayout, Plan, RankPlan, RunGroup, SideLayout, StateLayout
from .ast import Span
from .diagnostics import Diagnostic, LayoutSemanticError
from .ir import DimIR, LayerIR, RankedSpec, SegmentIR, StateIR
from .layout_algebra import coalesce_joint
from .limits import DEFAULT, Limits, flag_of

PER = {"kernel_block": "kernel", "logical_block": "logical"}


def dim_desc(dims: tuple[DimIR, ...]) -> tuple[DimDesc, ...]:
    return tuple(
        DimDesc(
            d.name,
            tuple(SegmentDesc(s.name, s.size, s.unit or 0, dim_desc(s.dims)) for s in d.segments),
            d.paged,
        )
        for d in dims
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
            s.ir.name,
            s.ir.page,
            s.ir.dtype,
            s.offset,
            s.nbytes,
            s.ir.itemsize,
            dim_desc(s.ir.dims),
        )
        for s in r.states
    )
    return SideLayout(role, r.tp, r.kernel_blocks, r.bound.params, pages, states)


def _refuse(message: str, span: Span | None, code: str = "E070") -> LayoutSemanticError:
    return LayoutSemanticError([Diagnostic(message, span, code)])


def _seg_key(s: SegmentIR) -> tuple[str, int | None]:
    """What must agree between the sides (a structured segment's dims are compared apart)."""
    return (s.name, None if s.dims else s.size)


def _seg_text(s: SegmentIR) -> str:
    return f"{s.name} {{...}}" if s.dims else f"{s.name} {s.size}"


def _compare_dims(
    state: StateIR,
    a_dims: tuple[DimIR, ...],
    b_dims: tuple[DimIR, ...],
    pkb: int,
    dkb: int,
    per_kernel: bool,
) -> None:
    if len(a_dims) != len(b_dims):
        raise _refuse(f"state '{state.name}' has different dims on the two sides", state.span)
    for da, db in zip(a_dims, b_dims):
        if da.paged and per_kernel:
            ta, tb = da.size * pkb, db.size * dkb
            if ta != tb:
                raise _refuse(
                    f"a logical block holds {ta} tokens on prefill ('{da.name}' {da.size} x "
                    f"kernel_blocks {pkb}) but {tb} on decode ({db.size} x "
                    f"{dkb}); bind kernel_blocks so both sides hold the same "
                    "tokens per logical block",
                    da.span,
                )
            continue
        if [_seg_key(s) for s in da.segments] != [_seg_key(s) for s in db.segments]:
            sa = " | ".join(_seg_text(s) for s in da.segments)
            sb = " | ".join(_seg_text(s) for s in db.segments)
            raise _refuse(
                f"dim '{da.name}' of state '{state.name}' is [{sa}] on prefill but [{sb}] on "
                "decode",
                da.span,
            )
        for sa_, sb_ in zip(da.segments, db.segments):
            if sa_.dims or sb_.dims:
                _compare_dims(state, sa_.dims, sb_.dims, pkb, dkb, per_kernel)


def _layer_counts(p: tuple[LayerIR, ...], d: tuple[LayerIR, ...]) -> None:
    for a, b in zip(p, d):
        if a.count != b.count:
            raise _refuse(
                f"layer '{a.name}' counts {a.count} layers on prefill but {b.count} on decode; "
                "both engines run the same model, so bind the same layer counts on both sides",
                a.span,
                "E071",
            )


def check_compatible(p: RankedSpec, d: RankedSpec) -> None:
    """Refuse (with the reason) prefill/decode layouts whose logical contents differ."""
    ps, ds = p.bound, d.bound
    if [s.name for s in ps.states] != [s.name for s in ds.states]:
        raise _refuse("prefill and decode specs declare different states", None)
    _layer_counts(ps.layers, ds.layers)
    for a, b in zip(ps.states, ds.states):
        if a.dtype != b.dtype:
            raise _refuse(
                f"state '{a.name}' is {a.dtype} on prefill but {b.dtype} on decode "
                "(dtype conversion is not part of a transfer plan)",
                a.span,
            )
        if a.page != b.page:
            raise _refuse(f"state '{a.name}' is in different pages on the two sides", a.span)
        per_kernel = ps.page(a.page).per == "kernel_block"
        _compare_dims(a, a.dims, b.dims, ps.kernel_blocks, ds.kernel_blocks, per_kernel)
        if per_kernel and not has_paged(dim_desc(a.dims)) and ps.kernel_blocks != ds.kernel_blocks:
            raise _refuse(
                f"state '{a.name}' is stored per kernel block with no paged dim, so both sides need "
                f"the same kernel_blocks (prefill {ps.kernel_blocks}, decode {ds.kernel_blocks})",
                a.span,
            )


def _paged_size(dims: tuple[DimIR, ...]) -> int | None:
    for d in dims:
        if d.paged:
            return d.size
        for s in d.segments:
            sub = _paged_size(s.dims)
            if sub is not None:
                return sub
    return None


def kernel_period(p: RankedSpec, d: RankedSpec) -> tuple[int, int]:
    """(decode, prefill) kernel blocks after which every per-kernel-block page's runs repeat.

    A paged state's tokens line up again after lcm(decode tokens, prefill tokens) per kernel
    block; a per-kernel state without a paged dim repeats every kernel block.
    """
    period = 1
    for a, b in zip(p.bound.states, d.bound.states):
        if p.bound.page(a.page).per != "kernel_block":
            continue
        pt, dt = _paged_size(a.dims), _paged_size(b.dims)
        if pt is not None and dt is not None:
            period = math.lcm(period, math.lcm(pt, dt) // dt)
    if d.kernel_blocks % period or (period * p.kernel_blocks) % d.kernel_blocks:
        return d.kernel_blocks, p.kernel_blocks  # (not reached for compatible layouts)
    return period, period * p.kernel_blocks // d.kernel_blocks


@dataclass(frozen=True)
class _Piece:
    """A stretch of one dim held by both sides: global start, length, local starts, kernel blocks."""

    g: int
    n: int
    dl: int
    dk: int
    pl: int
    pk: int


def _pieces(
    dd: DimDesc, pd: DimDesc, dtp: int, d: int, ptp: int, p: int, dkb: int, per_kernel: bool
) -> list[_Piece]:
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


def _natural(d: int, dtp: int, ptp: int) -> range:
    """Prefill ranks whose share of the TP axis overlaps decode rank d's share."""
    return range(d * ptp // dtp, -(-(d + 1) * ptp // dtp))


def _state_reads(
    pr: RankedSpec, dr: RankedSpec, name: str, d: int, dkb: int
) -> tuple[list[RunGroup], int]:
    """One state's runs into decode rank `d` over `dkb` decode kernel blocks (a period), and
    how many runs they are."""
    pst, dst = pr.state(name), dr.state(name)
    ddims, pdims = dim_desc(dst.ir.dims), dim_desc(pst.ir.dims)
    per_kernel = dr.page(dst.ir.page).ir.per == "kernel_block"
    copies = dkb if (per_kernel and not has_paged(ddims)) else 1
    isz = dst.ir.itemsize
    dks, pks = dr.page(dst.ir.page).kernel_stride, pr.page(pst.ir.page).kernel_stride
    natural = _natural(d, dr.tp, pr.tp)
    out: list[RunGroup] = []
    count = 0
    for dc, pc in zip(components(ddims, dr.tp, 1), components(pdims, pr.tp, 1)):
        boxes: dict[tuple[tuple[int, int, int], ...], list[tuple[int, tuple[_Piece, ...]]]] = {}
        for p in range(pr.tp):
            per_dim = [
                _pieces(a, b, dr.tp, d, pr.tp, p, dkb, per_kernel) for a, b in zip(dc.dims, pc.dims)
            ]
            for combo in itertools.product(*per_dim):
                key = tuple((c.g, c.n, c.dk) for c in combo)
                boxes.setdefault(key, []).append((p, combo))
        dstr = tuple(s * isz for s in reversed(dc.local_strides))
        pstr = tuple(s * isz for s in reversed(pc.local_strides))
        for key in sorted(boxes):
            holders = boxes[key]
            p, combo = next((h for h in holders if h[0] in natural), holders[d % len(holders)])
            dbase = (
                dst.offset
                + (dc.local_base + sum(c.dl * s for c, s in zip(combo, dc.local_strides))) * isz
            )
            pbase = (
                pst.offset
                + (pc.local_base + sum(c.pl * s for c, s in zip(combo, pc.local_strides))) * isz
            )
            dbase += sum(c.dk for c in combo) * dks
            pbase += sum(c.pk for c in combo) * pks
            shape = tuple(c.n for c in reversed(combo))
            shape, ds, ps = coalesce_joint(shape, dstr, pstr)
            nbytes = isz
            if shape and ds[0] == isz and ps[0] == isz:
                nbytes = shape[0] * isz
                shape, ds, ps = shape[1:], ds[1:], ps[1:]
            count += math.prod(shape) * copies
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
    return out, count


def _compress(
    page: str,
    p: int,
    d_arr: np.ndarray,
    p_arr: np.ndarray,
    n_arr: np.ndarray,
    state: str | None = None,
) -> list[RunGroup]:
    """Runs (sorted by decode offset) -> 1-D strided RunGroups of equal length and step."""
    if len(n_arr) > 2 and (n_arr == n_arr[0]).all():
        dd, dp = np.diff(d_arr), np.diff(p_arr)
        if (dd == dd[0]).all() and (dp == dp[0]).all():  # one family: the common case
            count = (len(n_arr),)
            first = (int(d_arr[0]), int(p_arr[0]), int(n_arr[0]))
            return [RunGroup(page, p, *first, count, (int(dd[0]),), (int(dp[0]),), state)]
    d_off, p_off, n = d_arr.tolist(), p_arr.tolist(), n_arr.tolist()  # plain ints: fast loop
    out: list[RunGroup] = []
    i, total = 0, len(n)
    while i < total:
        j = i + 1
        if j < total and n[j] == n[i]:
            dd, dp = d_off[j] - d_off[i], p_off[j] - p_off[i]
            while (
                j + 1 < total
                and n[j + 1] == n[i]
                and d_off[j + 1] - d_off[j] == dd
                and p_off[j + 1] - p_off[j] == dp
            ):
                j += 1
            out.append(
                RunGroup(page, p, d_off[i], p_off[i], n[i], (j - i + 1,), (dd,), (dp,), state)
            )
            i = j + 1
        else:
            out.append(RunGroup(page, p, d_off[i], p_off[i], n[i], state=state))
            i += 1
    return out


def _expand_runs(groups: list[RunGroup]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(decode offsets, prefill offsets, lengths) of every run of `groups`, by decode offset."""
    ds, ps, ns = [], [], []
    for g in groups:
        a, b = g.expand()
        ds.append(a)
        ps.append(b)
        ns.append(np.full(a.shape[0], g.nbytes, dtype=np.int64))
    d = np.concatenate(ds)
    order = np.argsort(d, kind="stable")
    return d[order], np.concatenate(ps)[order], np.concatenate(ns)[order]


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
        d, pp, n = _expand_runs([g for g in reads if g.page == page and g.prefill_rank == p])
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


def _lift(g: RunGroup, count: int, dstep: int, pstep: int) -> RunGroup:
    """`g` repeated `count` times, `dstep`/`pstep` bytes apart (a new outermost mode)."""
    if count == 1:
        return g
    return RunGroup(
        g.page,
        g.prefill_rank,
        g.decode_offset,
        g.prefill_offset,
        g.nbytes,
        (count, *g.shape),
        (dstep, *g.decode_stride),
        (pstep, *g.prefill_stride),
        g.state,
    )


def _lift_posts(
    posts: list[RunGroup], kernel_pages: set[str], count: int, steps: dict[str, tuple[int, int]]
) -> list[RunGroup] | None:
    """Posts of one period -> posts of `count` periods; None when runs of consecutive periods
    would merge in a way other than a whole period merging into one run."""
    out: list[RunGroup] = []
    for page, p in sorted({(g.page, g.prefill_rank) for g in posts}):
        groups = [g for g in posts if g.page == page and g.prefill_rank == p]
        if page not in kernel_pages or count == 1:
            out.extend(groups)
            continue
        dstep, pstep = steps[page]
        d, pp, n = _expand_runs(groups)
        if len(n) == 1 and int(n[0]) == dstep == pstep:  # the period is one run: all of them are
            out.append(RunGroup(page, p, int(d[0]), int(pp[0]), int(n[0]) * count))
            continue
        ends = set(zip((d + n).tolist(), (pp + n).tolist()))
        if ends & set(zip((d + dstep).tolist(), (pp + pstep).tolist())):
            return None
        out.extend(_lift(g, count, dstep, pstep) for g in groups)
    return out


def _too_many_runs(
    pr: RankedSpec, dr: RankedSpec, d: int, state: StateIR, runs: int, limits: Limits
) -> LayoutSemanticError:
    return _refuse(
        f"prefill TP {pr.tp} -> decode TP {dr.tp}: decode rank {d} would read {runs} byte runs "
        f"per logical block (up to state '{state.name}'); the limit is {limits.max_runs} "
        f"({flag_of('max_runs')})",
        state.span,
        "E064",
    )


def plan(
    spec_name: str, sha256: str, pr: RankedSpec, dr: RankedSpec, limits: Limits = DEFAULT
) -> Plan:
    """Plan every decode rank of (pr.tp -> dr.tp).  The result is not yet verified."""
    check_compatible(pr, dr)
    dkb, pkb = kernel_period(pr, dr)
    count = dr.kernel_blocks // dkb
    kernel_pages = {p.ir.name for p in dr.pages if p.ir.per == "kernel_block"}
    steps = {
        name: (dkb * dr.page(name).kernel_stride, pkb * pr.page(name).kernel_stride)
        for name in kernel_pages
    }
    ranks = []
    for d in range(dr.tp):
        period_reads: list[RunGroup] = []
        reads: list[RunGroup] = []
        runs = 0
        for st in dr.states:
            page = st.ir.page
            ks = None
            if page in kernel_pages:
                ks = (dr.page(page).kernel_stride, pr.page(page).kernel_stride)
            got, n = _state_reads(pr, dr, st.ir.name, d, dkb)
            times = count if page in kernel_pages else 1
            runs += n * times
            if runs > limits.max_runs:
                raise _too_many_runs(pr, dr, d, st.ir, runs, limits)
            merged = merge_posts(got, st.ir.name, ks)
            period_reads.extend(merged)
            if page in kernel_pages:
                reads.extend(_lift(g, count, *steps[page]) for g in merged)
            else:
                reads.extend(merged)
        posts = _lift_posts(merge_posts(period_reads), kernel_pages, count, steps)
        if posts is None:  # runs merge across periods: merge the expanded runs (rare)
            posts = merge_posts(reads)
        sources = tuple(sorted({g.prefill_rank for g in reads}))
        notify_only = tuple(p for p in _natural(d, dr.tp, pr.tp) if p not in sources)
        ranks.append(RankPlan(d, sources, notify_only, tuple(reads), tuple(posts)))
    layer_kinds = tuple((ly.name, ly.pages) for ly in dr.bound.layers)
    return Plan(
        spec=spec_name,
        spec_sha256=sha256,
        prefill=side_layout(pr, "prefill"),
        decode=side_layout(dr, "decode"),
        ranks=tuple(ranks),
        layer_kinds=layer_kinds,
    )
