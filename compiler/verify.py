"""Verification of every emitted plan: exactly-once coverage, bounds, and identities.

Each decode element must receive, exactly once, the prefill element with the same global
logical identity (:mod:`layoutc.runtime.layout`: derived from the declared dims and the
distribution rule, independently of how the planner intersected them).  Posted runs must be
exactly the per-state reads regrouped, `sources` exactly the ranks read from, and every
prefill rank must hear from at least one decode rank (or its blocks would never be freed).
A failure is a compiler bug: :class:`InternalError`, never a plan on disk.

The check works on intervals, never on one element at a time: a rank's elements fall into
*identity segments*, stretches of consecutive local elements with consecutive identities (a
head's row of tokens, a whole contiguous state), and a run moves the right data exactly when
both sides agree at the start of every piece the segment boundaries of either side cut it
into.  Its cost follows the number of runs and segments, not the bytes or the kernel blocks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from ..runtime.layout import components, global_elements, has_paged, local_dim, window_ids
from ..runtime.plan import Plan, RankPlan, RunGroup, SideLayout
from .diagnostics import Diagnostic, InternalError, LayoutSemanticError
from .layout_algebra import coalesce_joint
from .limits import DEFAULT, Limits, flag_of


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s+l) for every (s, l), vectorized."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    base = np.repeat(starts - (np.cumsum(lens) - lens), lens)
    return base + np.arange(total, dtype=np.int64)


def _grid(base: int, modes: list[tuple[int, int]]) -> np.ndarray:
    """base + sum(i_m * stride_m) over every index of `modes` ((size, stride), any order)."""
    out = np.array([base], dtype=np.int64)
    for n, s in modes:
        out = (out[:, None] + np.arange(n, dtype=np.int64)[None, :] * s).reshape(-1)
    return out


@dataclass(frozen=True)
class Identity:
    """The identity segments of one state on one rank, over all its kernel-block copies.

    Local element ``start[i] + j`` (flat: ``copy * elements + element``) holds identity
    ``gid[i] + j`` for ``0 <= j < length[i]``; segments are sorted and tile the state.
    """

    start: np.ndarray
    gid: np.ndarray
    length: np.ndarray
    elements: int  # per copy
    copies: int

    def at(self, pos: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.start, pos, side="right") - 1
        return self.gid[i] + (pos - self.start[i])


def identity(side: SideLayout, state: str, rank: int, max_segments: int) -> Identity:
    """Identity segments of `state` on `rank` of `side` (see :class:`Identity`)."""
    st = side.state(state)
    page = side.page(st.page)
    per_kernel = page.per == "kernel"
    factor = side.kernel_blocks if per_kernel else 1
    copies = side.kernel_blocks if per_kernel else 1
    elements = st.nbytes // st.itemsize
    paged = has_paged(st.dims)
    starts: list[np.ndarray] = []
    gids: list[np.ndarray] = []
    lens: list[np.ndarray] = []
    budget = max_segments
    for c in components(st.dims, side.tp, factor):
        copy_step = 0
        if per_kernel and paged:
            i = next(i for i, d in enumerate(c.dims) if d.paged)
            copy_step = c.dims[i].size * c.global_strides[i]
        elif per_kernel:
            copy_step = global_elements(st.dims, factor)
        per_dim = [local_dim(d, side.tp, rank) for d in c.dims]
        for combo in itertools.product(*per_dim):
            lbase = c.local_base + sum(l0 * s for (_, l0, _), s in zip(combo, c.local_strides))
            gbase = c.global_base + sum(g0 * s for (g0, _, _), s in zip(combo, c.global_strides))
            shape = (*(n for _, _, n in reversed(combo)), copies)
            lstr = (*reversed(c.local_strides), elements)
            gstr = (*reversed(c.global_strides), copy_step)
            shape, lstr, gstr = coalesce_joint(shape, lstr, gstr)
            run = 1
            if shape and lstr[0] == 1 and gstr[0] == 1:
                run, shape, lstr, gstr = shape[0], shape[1:], lstr[1:], gstr[1:]
            n = math.prod(shape)
            budget -= n
            if budget < 0:
                raise LayoutSemanticError(
                    [
                        Diagnostic(
                            f"state '{state}' on {side.role} rank {rank} of tp {side.tp} falls "
                            f"into more than {max_segments} pieces to check; the limit follows "
                            f"{flag_of('max_runs')}",
                            None,
                            "E064",
                        )
                    ]
                )
            starts.append(_grid(lbase, list(zip(shape, lstr))))
            gids.append(_grid(gbase, list(zip(shape, gstr))))
            lens.append(np.full(n, run, dtype=np.int64))
    start, gid, length = np.concatenate(starts), np.concatenate(gids), np.concatenate(lens)
    order = np.argsort(start, kind="stable")
    start, gid, length = start[order], gid[order], length[order]
    end = start + length
    if start[0] != 0 or np.any(start[1:] != end[:-1]) or end[-1] != copies * elements:
        raise InternalError(f"the identity of state '{state}' does not tile its elements")
    keep = np.ones(len(start), dtype=bool)  # merge segments that continue each other
    keep[1:] = gid[:-1] + length[:-1] != gid[1:]
    first = np.flatnonzero(keep)
    return Identity(start[first], gid[first], np.add.reduceat(length, first), elements, copies)


def _expand(groups: list[RunGroup]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(decode offsets, prefill offsets, lengths, sources) of every run of `groups`."""
    if not groups:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z, z
    ds, ps = zip(*(g.expand() for g in groups))
    counts = np.array([len(a) for a in ds], dtype=np.int64)
    n = np.repeat(np.array([g.nbytes for g in groups], dtype=np.int64), counts)
    src = np.repeat(np.array([g.prefill_rank for g in groups], dtype=np.int64), counts)
    return np.concatenate(ds), np.concatenate(ps), n, src


def _token_strides(groups: list[RunGroup] | tuple[RunGroup, ...]) -> np.ndarray:
    """(decode, prefill) bytes per token of every run of `groups` (an (N, 2) array)."""
    if not groups:
        return np.zeros((0, 2), dtype=np.int64)
    counts = np.array([g.count for g in groups], dtype=np.int64)
    return np.repeat(np.array([g.token_stride for g in groups], dtype=np.int64), counts, axis=0)


def _locate(
    side: SideLayout, state: str, off: np.ndarray, nbytes: np.ndarray, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets from a logical block start -> (flat first element, element count)."""
    st = side.state(state)
    page = side.page(st.page)
    isz = st.itemsize
    copies = side.kernel_blocks if page.per == "kernel" else 1
    k = off // page.kernel_stride if page.per == "kernel" else np.zeros_like(off)
    rel = off - k * page.kernel_stride - st.offset
    if np.any(rel % isz) or np.any(nbytes % isz):
        raise InternalError(f"{what}: a run of state '{state}' is not element-aligned")
    if np.any(k < 0) or np.any(k >= copies) or np.any(rel < 0) or np.any(rel + nbytes > st.nbytes):
        raise InternalError(f"{what}: a run of state '{state}' leaves the state's bytes")
    return k * (st.nbytes // isz) + rel // isz, nbytes // isz


def _cuts(seg_start: np.ndarray, first: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, ...]:
    """(run index, offset within the run) of every segment start strictly inside each run."""
    lo = np.searchsorted(seg_start, first, side="right")
    hi = np.searchsorted(seg_start, first + count, side="left")
    n = np.maximum(hi - lo, 0)
    run = np.repeat(np.arange(len(first), dtype=np.int64), n)
    return run, seg_start[_ranges(lo, n)] - first[run]


def _not_once(first: np.ndarray, count: np.ndarray, total: int) -> int:
    """Elements of [0, total) not covered exactly once by the intervals (0 when they tile it)."""
    if len(first) == 0:
        return total
    order = np.argsort(first, kind="stable")
    f, c = first[order], count[order]
    end = f + c
    if f[0] == 0 and np.all(f[1:] == end[:-1]) and end[-1] == total:
        return 0
    reach = np.maximum.accumulate(end)
    union = int(np.sum(np.maximum(0, end - np.maximum(f, np.concatenate([[0], reach[:-1]])))))
    return (total - union) + (int(c.sum()) - union)


def _check_state(
    plan: Plan,
    r: RankPlan,
    state: str,
    ident: dict[tuple[str, str, int], Identity],
    limits: Limits,
    where: str,
) -> None:
    P, D = plan.prefill, plan.decode
    d_off, p_off, n, src = _expand([g for g in r.reads if g.state == state])
    if len(n) and np.any(n <= 0):
        raise InternalError(f"{where}: empty run in state '{state}'")
    fd, cnt = _locate(D, state, d_off, n, where + " (decode side)")
    fp, _ = _locate(P, state, p_off, n, where + " (prefill side)")
    want = _identity(ident, D, state, r.rank, limits)
    bad = _not_once(fd, cnt, want.copies * want.elements)
    if bad:
        raise InternalError(
            f"{where}: {bad} elements of state '{state}' are not written exactly once"
        )
    # cut every run where a segment of either side starts; compare identities at each piece
    runs: list[tuple[np.ndarray, ...]] = [
        (np.arange(len(fd), dtype=np.int64), np.zeros(len(fd), dtype=np.int64))
    ]
    runs.append(_cuts(want.start, fd, cnt))
    for s in np.unique(src).tolist():
        m = np.flatnonzero(src == s)
        have = _identity(ident, P, state, int(s), limits)
        run, rel = _cuts(have.start, fp[m], cnt[m])
        runs.append((m[run], rel))
    run = np.concatenate([x[0] for x in runs])
    rel = np.concatenate([x[1] for x in runs])
    order = np.lexsort((rel, run))
    run, rel = run[order], rel[order]
    keep = np.ones(len(run), dtype=bool)
    keep[1:] = (run[1:] != run[:-1]) | (rel[1:] != rel[:-1])
    run, rel = run[keep], rel[keep]
    got = np.empty(len(run), dtype=np.int64)
    for s in np.unique(src).tolist():
        m = src[run] == s
        got[m] = _identity(ident, P, state, int(s), limits).at(fp[run[m]] + rel[m])
    wrong = got != want.at(fd[run] + rel)
    if np.any(wrong):
        nxt = np.concatenate([rel[1:], [0]])
        last = np.concatenate([run[1:] != run[:-1], [True]])
        length = np.where(last, cnt[run] - rel, nxt - rel)
        raise InternalError(
            f"{where}: {int(length[wrong].sum())} elements of state '{state}' get wrong data"
        )


#: Elements of one kernel block of one state on one rank the window check expands one by one
MAX_WINDOW_ELEMENTS = 1 << 24

_Window = tuple[np.ndarray, np.ndarray]


def _window(
    cache: dict[tuple[str, str, int], _Window], side: SideLayout, state: str, rank: int, c: int
) -> _Window:
    key = (side.role, state, rank)
    if key not in cache:
        st = side.state(state)
        if st.nbytes // st.itemsize > MAX_WINDOW_ELEMENTS:
            raise LayoutSemanticError(
                [
                    Diagnostic(
                        f"state '{state}' holds {st.nbytes // st.itemsize} elements per kernel "
                        f"block on {side.role} rank {rank}; plans mapping tokens between "
                        f"different block sizes check at most {MAX_WINDOW_ELEMENTS}",
                        None,
                        "E064",
                    )
                ]
            )
        try:
            cache[key] = window_ids(st.dims, side.tp, rank, c)
        except ValueError as e:
            raise InternalError(f"state '{state}': {e}") from None
    return cache[key]


def _check_window_state(
    plan: Plan, r: RankPlan, state: str, cache: dict[tuple[str, str, int], _Window], where: str
) -> None:
    """A token remap's per-kernel-block state: its runs move one window (rows [0, c) of kernel
    block 0 on both sides), element by element the same tokens and the same identity; shifted
    by whole windows (``r * token_stride`` on each side) they move rows [r, r + c), for every
    window a kernel block of either side holds."""
    rm = plan.remap
    assert rm is not None
    c = rm.chunk_tokens
    D, P = plan.decode, plan.prefill
    groups = [g for g in r.reads if g.state == state]
    d_off, p_off, n, src = _expand(groups)
    ts = _token_strides(groups)
    isz = D.state(state).itemsize
    fd, cnt = _locate(D, state, d_off, n, where + " (decode side)")
    fp, _ = _locate(P, state, p_off, n, where + " (prefill side)")
    tok_d, wid_d = _window(cache, D, state, r.rank, c)
    ed = tok_d.shape[0]
    if np.any(fd + cnt > ed):
        raise InternalError(f"{where}: a window run of state '{state}' leaves kernel block 0")
    if np.any(ts % isz) or np.any(ts <= 0):
        raise InternalError(f"{where}: state '{state}' has runs without a whole token stride")
    xd = _ranges(fd, cnt)
    run = np.repeat(np.arange(len(cnt), dtype=np.int64), cnt)
    xp = _ranges(fp, cnt)
    hits = np.bincount(xd, minlength=ed)
    if np.any(hits[tok_d < c] != 1) or np.any(hits[tok_d >= c] != 0):
        bad = int(np.count_nonzero(hits[tok_d < c] != 1) + np.count_nonzero(hits[tok_d >= c]))
        raise InternalError(
            f"{where}: {bad} elements of state '{state}' are not written exactly once in a window"
        )
    # window 0: every decode element gets the prefill element of the same token and identity
    for sr in np.unique(src).tolist():
        m = src[run] == sr
        tok_p, wid_p = _window(cache, P, state, int(sr), c)
        if np.any(xp[m] >= tok_p.shape[0]):
            raise InternalError(f"{where}: a window run of state '{state}' leaves its state")
        wrong = (tok_p[xp[m]] != tok_d[xd[m]]) | (wid_p[xp[m]] != wid_d[xd[m]])
        if np.any(wrong):
            raise InternalError(
                f"{where}: {int(np.count_nonzero(wrong))} elements of state '{state}' get wrong "
                "data in a window"
            )
    # the other windows of a kernel block: the first, shifted by whole windows of tokens
    sides = [(D, r.rank, np.ones(len(xd), dtype=bool), xd, 0, rm.decode_kernel_tokens)]
    sides += [
        (P, int(sr), src[run] == sr, xp, 1, rm.prefill_kernel_tokens)
        for sr in np.unique(src).tolist()
    ]
    for side, rank, m, x, col, kt in sides:
        tok, wid = _window(cache, side, state, rank, c)
        xs, step = x[m], ts[run[m], col] // isz
        for shift in range(c, kt, c):
            y = xs + shift * step
            if (
                np.any(y >= tok.shape[0])
                or np.any(tok[y] != tok[xs] + shift)
                or np.any(wid[y] != wid[xs])
            ):
                raise InternalError(
                    f"{where}: state '{state}' on {side.role} rank {rank}: the window at row "
                    f"{shift} is not the first window shifted by its token stride"
                )


def _identity(
    cache: dict[tuple[str, str, int], Identity],
    side: SideLayout,
    state: str,
    rank: int,
    limits: Limits,
) -> Identity:
    key = (side.role, state, rank)
    if key not in cache:
        cache[key] = identity(side, state, rank, 4 * limits.max_runs)
    return cache[key]


def verify_plan(plan: Plan, limits: Limits = DEFAULT) -> None:
    """Raise InternalError unless `plan` moves exactly the right bytes."""
    ident: dict[tuple[str, str, int], Identity] = {}
    windows: dict[tuple[str, str, int], _Window] = {}
    for r in plan.ranks:
        where = f"plan {plan.spec} {plan.prefill_tp}->{plan.decode_tp}, decode rank {r.rank}"
        read_src = {g.prefill_rank for g in r.reads}
        if set(r.sources) != read_src:
            raise InternalError(f"{where}: sources {r.sources} but reads from {sorted(read_src)}")
        if set(r.sources) & set(r.notify_only):
            raise InternalError(f"{where}: notify_only overlaps sources")
        if any(not 0 <= p < plan.prefill_tp for p in r.notified):
            raise InternalError(f"{where}: a source is not a prefill rank")
        for st in plan.decode.states:
            if plan.remap is not None and plan.decode.page(st.page).per == "kernel":
                _check_window_state(plan, r, st.name, windows, where)
            else:
                if any(g.token_stride != (0, 0) for g in r.reads if g.state == st.name):
                    raise InternalError(f"{where}: state '{st.name}' has token strides")
                _check_state(plan, r, st.name, ident, limits, where)
        _check_posts(plan, r, where)
    heard: set[int] = set()
    for r in plan.ranks:
        heard |= set(r.notified)
    missing = sorted(set(range(plan.prefill_tp)) - heard)
    if missing:
        raise InternalError(f"plan {plan.spec}: prefill ranks {missing} are never notified")


def _page_index(plan: Plan, groups: tuple[RunGroup, ...]) -> np.ndarray:
    names = plan.decode.page_names
    counts = np.array([g.count for g in groups], dtype=np.int64)
    return np.repeat(np.array([names.index(g.page) for g in groups], dtype=np.int64), counts)


def _check_posts(plan: Plan, r: RankPlan, where: str) -> None:
    """Posted runs must be exactly the reads, regrouped (same bytes, same pairing)."""
    rd, rp, rn, rs = _expand(list(r.reads))
    pd_, pp, pn, ps = _expand(list(r.posts))
    rt, pt = _token_strides(r.reads), _token_strides(r.posts)
    pages_r, pages_p = _page_index(plan, r.reads), _page_index(plan, r.posts)
    if rn.sum() != pn.sum():
        raise InternalError(f"{where}: posts move {pn.sum()} bytes, reads {rn.sum()}")
    # order posts by (page, decode offset) and find the post holding each read
    key_p = np.lexsort((pd_, pages_p))
    pd_, pp, pn, ps, pages_p = pd_[key_p], pp[key_p], pn[key_p], ps[key_p], pages_p[key_p]
    pt = pt[key_p]
    for page in np.unique(pages_r):
        mr, mp = pages_r == page, pages_p == page
        a_d, a_p, a_n, a_s, a_t = rd[mr], rp[mr], rn[mr], rs[mr], rt[mr]
        b_d, b_p, b_n, b_s, b_t = pd_[mp], pp[mp], pn[mp], ps[mp], pt[mp]
        j = np.searchsorted(b_d, a_d, side="right") - 1
        if np.any(j < 0):
            raise InternalError(f"{where}: a read is not posted")
        ok = (a_d + a_n <= b_d[j] + b_n[j]) & (a_p - a_d == b_p[j] - b_d[j]) & (a_s == b_s[j])
        ok &= np.all(a_t == b_t[j], axis=1)
        if not np.all(ok):
            raise InternalError(f"{where}: posted runs differ from the reads")
        if not np.array_equal(np.bincount(j, weights=a_n, minlength=len(b_n)), b_n):
            raise InternalError(f"{where}: posted runs cover bytes no read asks for")
