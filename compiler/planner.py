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

Engines may also hold different tokens per *logical* block (vLLM sizes a hybrid model's block
by TP).  A request's token ``T`` then sits in different logical blocks on the two sides, so no
block-to-block plan exists; the planner plans a *window* instead -- ``gcd`` of the two sides'
tokens per kernel block, rows ``[0, window)`` of a kernel block on both sides -- and records
each run's bytes per token (``token_stride``) and the sides' block geometry (``TokenRemap``):
the runtime places every window of a request from its token count.  Per-logical-block state
(a request's Mamba state) still moves block to block.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from ..runtime.layout import DimDesc, SegmentDesc, components, has_paged, local_dim
from ..runtime.plan import (
    PageLayout,
    Plan,
    RankPlan,
    RunGroup,
    SideLayout,
    StateLayout,
    TokenRemap,
)
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
    remap: bool = False,
) -> None:
    if len(a_dims) != len(b_dims):
        raise _refuse(f"state '{state.name}' has different dims on the two sides", state.span)
    for da, db in zip(a_dims, b_dims):
        if da.paged and per_kernel:
            ta, tb = da.size * pkb, db.size * dkb
            if ta != tb and not remap:
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
                _compare_dims(state, sa_.dims, sb_.dims, pkb, dkb, per_kernel, remap)


def _layer_counts(p: tuple[LayerIR, ...], d: tuple[LayerIR, ...]) -> None:
    for a, b in zip(p, d):
        if a.count != b.count:
            raise _refuse(
                f"layer '{a.name}' counts {a.count} layers on prefill but {b.count} on decode; "
                "both engines run the same model, so bind the same layer counts on both sides",
                a.span,
                "E071",
            )


def check_compatible(p: RankedSpec, d: RankedSpec) -> TokenRemap | None:
    """Refuse (with the reason) prefill/decode layouts whose logical contents differ.

    Returns the :class:`TokenRemap` of a pair whose sides hold different tokens per logical
    block (None when they hold the same).
    """
    ps, ds = p.bound, d.bound
    if [s.name for s in ps.states] != [s.name for s in ds.states]:
        raise _refuse("prefill and decode specs declare different states", None)
    _layer_counts(ps.layers, ds.layers)
    remap = token_remap(p, d)
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
        _compare_dims(
            a, a.dims, b.dims, ps.kernel_blocks, ds.kernel_blocks, per_kernel, remap is not None
        )
        if per_kernel and not has_paged(dim_desc(a.dims)) and ps.kernel_blocks != ds.kernel_blocks:
            raise _refuse(
                f"state '{a.name}' is stored per kernel block with no paged dim, so both sides need "
                f"the same kernel_blocks (prefill {ps.kernel_blocks}, decode {ds.kernel_blocks})",
                a.span,
            )
    return remap


def token_remap(p: RankedSpec, d: RankedSpec) -> TokenRemap | None:
    """The token mapping of a pair whose sides hold different tokens per logical block, or
    None.  Refused (with the reason) where no mapping exists: a per-kernel-block state with no
    token dim, or states of one side holding different tokens per kernel block."""
    ps, ds = p.bound, d.bound
    tokens: dict[tuple[int, int], StateIR] = {}
    for a, b in zip(ps.states, ds.states):
        if ps.page(a.page).per != "kernel_block":
            continue
        pt, dt = _paged_size(a.dims), _paged_size(b.dims)
        if pt is not None and dt is not None:
            tokens.setdefault((pt * ps.kernel_blocks, dt * ds.kernel_blocks), a)
    if all(pt == dt for pt, dt in tokens):
        return None
    (pt, dt), first = next(((k, v) for k, v in tokens.items() if k[0] != k[1]))
    why = f"a logical block holds {pt} tokens on prefill but {dt} on decode (state '{first.name}')"
    for ly in ps.layers:
        pers = sorted({ps.page(pg).per for pg in ly.pages})
        if len(pers) > 1:
            raise _refuse(
                f"{why}, so requests are mapped token by token: per-kernel-block pages by "
                f"tokens, per-logical-block pages block to block; layer '{ly.name}' holds both "
                "kinds of page under one block table -- split them into layers of their own",
                ly.span,
            )
    kernel: dict[tuple[int | None, int | None], StateIR] = {}
    for a, b in zip(ps.states, ds.states):
        if ps.page(a.page).per != "kernel_block":
            continue
        pt_, dt_ = _paged_size(a.dims), _paged_size(b.dims)
        if pt_ is None or dt_ is None or not _paged_everywhere(a.dims):
            raise _refuse(
                f"{why}, so requests are mapped token by token; state '{a.name}' is stored "
                "per kernel block but not every part of it has a paged (token) dim, so its "
                "bytes cannot follow the tokens; bind kernel_blocks and block sizes so both "
                "sides hold the same tokens per logical block",
                a.span,
            )
        kernel.setdefault((pt_, dt_), a)
    if len(kernel) > 1:
        (k1, s1), (k2, s2) = list(kernel.items())[:2]
        raise _refuse(
            f"{why}, so requests are mapped token by token, which needs every per-kernel-block "
            f"state of a side to hold the same tokens per kernel block; state '{s1.name}' holds "
            f"{k1[0]} (prefill) / {k1[1]} (decode) but '{s2.name}' {k2[0]} / {k2[1]}",
            s2.span,
        )
    (pkt, dkt), _ = next(iter(kernel.items()))
    assert pkt is not None and dkt is not None
    return TokenRemap(math.gcd(pkt, dkt), pkt, ps.kernel_blocks, dkt, ds.kernel_blocks)


def _paged_everywhere(dims: tuple[DimIR, ...]) -> bool:
    """Does every component of these dims (every structured segment's part) hold the paged
    dim?"""
    if any(d.paged for d in dims):
        return True
    structured = [d for d in dims if any(s.dims for s in d.segments)]
    return bool(structured) and all(
        all(_paged_everywhere(s.dims) for s in d.segments) for d in structured
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
    dd: DimDesc,
    pd: DimDesc,
    dtp: int,
    d: int,
    ptp: int,
    p: int,
    dkb: int,
    per_kernel: bool,
    window: int | None = None,
) -> list[_Piece]:
    if dd.paged and per_kernel and window is not None:
        return [_Piece(0, window, 0, 0, 0, 0)]  # rows [0, window) of kernel block 0, both sides
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
    pr: RankedSpec, dr: RankedSpec, name: str, d: int, dkb: int, window: int | None = None
) -> tuple[list[RunGroup], int]:
    """One state's runs into decode rank `d` over `dkb` decode kernel blocks (a period), and
    how many runs they are.  With `window` (a token remap), a per-kernel-block state's runs
    move that many tokens, rows [0, window) of kernel block 0 on both sides."""
    pst, dst = pr.state(name), dr.state(name)
    ddims, pdims = dim_desc(dst.ir.dims), dim_desc(pst.ir.dims)
    per_kernel = dr.page(dst.ir.page).ir.per == "kernel_block"
    if not per_kernel:
        window = None
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
                _pieces(a, b, dr.tp, d, pr.tp, p, dkb, per_kernel, window)
                for a, b in zip(dc.dims, pc.dims)
            ]
            for combo in itertools.product(*per_dim):
                key = tuple((c.g, c.n, c.dk) for c in combo)
                boxes.setdefault(key, []).append((p, combo))
        dstr = tuple(s * isz for s in reversed(dc.local_strides))
        pstr = tuple(s * isz for s in reversed(pc.local_strides))
        token_stride = (0, 0)
        if window is not None:  # bytes per token of this part of the state, on each side
            i = next(i for i, x in enumerate(dc.dims) if x.paged)
            token_stride = (dc.local_strides[i] * isz, pc.local_strides[i] * isz)
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
                        token_stride=token_stride,
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
    token_stride: tuple[int, int] = (0, 0),
) -> list[RunGroup]:
    """Runs (sorted by decode offset) -> 1-D strided RunGroups of equal length and step."""
    ts = token_stride
    if len(n_arr) > 2 and (n_arr == n_arr[0]).all():
        dd, dp = np.diff(d_arr), np.diff(p_arr)
        if (dd == dd[0]).all() and (dp == dp[0]).all():  # one family: the common case
            count = (len(n_arr),)
            first = (int(d_arr[0]), int(p_arr[0]), int(n_arr[0]))
            return [RunGroup(page, p, *first, count, (int(dd[0]),), (int(dp[0]),), state, ts)]
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
                RunGroup(page, p, d_off[i], p_off[i], n[i], (j - i + 1,), (dd,), (dp,), state, ts)
            )
            i = j + 1
        else:
            out.append(RunGroup(page, p, d_off[i], p_off[i], n[i], state=state, token_stride=ts))
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
    states and kernel blocks (what the runtime posts).  Runs of different token strides (a
    token remap's parts of states) never merge.
    """
    out: list[RunGroup] = []
    keys = sorted({(g.page, g.prefill_rank, g.token_stride) for g in reads})
    for page, p, ts in keys:
        d, pp, n = _expand_runs(
            [g for g in reads if (g.page, g.prefill_rank, g.token_stride) == (page, p, ts)]
        )
        # start a new run wherever the previous one does not end exactly here on both sides
        brk = np.ones(len(d), dtype=bool)
        brk[1:] = (d[:-1] + n[:-1] != d[1:]) | (pp[:-1] + n[:-1] != pp[1:])
        if kernel_strides is not None:
            dks, pks = kernel_strides
            brk[1:] |= (d[:-1] // dks != d[1:] // dks) | (pp[:-1] // pks != pp[1:] // pks)
        starts = np.flatnonzero(brk)
        lengths = np.add.reduceat(n, starts)
        out.extend(_compress(page, p, d[starts], pp[starts], lengths, state, ts))
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
    remap = check_compatible(pr, dr)
    window = None if remap is None else remap.chunk_tokens
    dkb, pkb = (1, 1) if remap is not None else kernel_period(pr, dr)
    count = 1 if remap is not None else dr.kernel_blocks // dkb
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
            got, n = _state_reads(pr, dr, st.ir.name, d, dkb, window)
            times = count if page in kernel_pages else 1
            if remap is not None and page in kernel_pages:  # windows per decode logical block
                times = (
                    remap.decode_kernel_tokens * remap.decode_kernel_blocks // remap.chunk_tokens
                )
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
        remap=remap,
    )
