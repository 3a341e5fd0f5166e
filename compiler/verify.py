"""Verification of every emitted plan: exactly-once coverage, bounds, and tag simulation.

Each decode element must receive, exactly once, the prefill element with the same global
logical identity (:func:`layoutc.runtime.layout.element_ids`, derived from the declared dims
and the distribution rule, independently of how the planner intersected them).  Posted runs
must be exactly the per-state reads regrouped, `sources` exactly the ranks read from, and every
prefill rank must hear from at least one decode rank (or its blocks would never be freed).
A failure is a compiler bug: :class:`InternalError`, never a plan on disk.
"""

from __future__ import annotations

import numpy as np

from ..runtime.plan import Plan, RunGroup, SideLayout
from .diagnostics import InternalError


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s+l) for every (s, l), vectorized."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    base = np.repeat(starts - (np.cumsum(lens) - lens), lens)
    return base + np.arange(total, dtype=np.int64)


def _locate(side: SideLayout, state: str, off: np.ndarray, nbytes: np.ndarray, what: str):
    """Byte offsets from a logical block start -> (copy, first element, element count)."""
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
    return k, rel // isz, nbytes // isz


def _expand(groups: list[RunGroup]):
    ds, ps, ns, srcs = [], [], [], []
    for g in groups:
        d, p = g.expand()
        ds.append(d)
        ps.append(p)
        ns.append(np.full(d.shape[0], g.nbytes, dtype=np.int64))
        srcs.append(np.full(d.shape[0], g.prefill_rank, dtype=np.int64))
    if not ds:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z, z
    return np.concatenate(ds), np.concatenate(ps), np.concatenate(ns), np.concatenate(srcs)


def verify_plan(plan: Plan) -> None:
    """Raise InternalError unless `plan` moves exactly the right bytes."""
    P, D = plan.prefill, plan.decode
    pids = {}  # (state, prefill rank) -> element ids
    for r in plan.ranks:
        where = f"plan {plan.spec} {plan.prefill_tp}->{plan.decode_tp}, decode rank {r.rank}"
        read_src = {g.prefill_rank for g in r.reads}
        if set(r.sources) != read_src:
            raise InternalError(f"{where}: sources {r.sources} but reads from {sorted(read_src)}")
        if set(r.sources) & set(r.notify_only):
            raise InternalError(f"{where}: notify_only overlaps sources")
        if any(not 0 <= p < plan.prefill_tp for p in r.notified):
            raise InternalError(f"{where}: a source is not a prefill rank")
        for st in D.states:
            groups = [g for g in r.reads if g.state == st.name]
            want = D.element_ids(st.name, r.rank)
            got = np.full(want.shape, -1, dtype=np.int64)
            hits = np.zeros(want.shape, dtype=np.int64)
            d, p, n, src = _expand(groups)
            if len(n) and np.any(n <= 0):
                raise InternalError(f"{where}: empty run in state '{st.name}'")
            dk, de, cnt = _locate(D, st.name, d, n, where + " (decode side)")
            pk, pe, _ = _locate(P, st.name, p, n, where + " (prefill side)")
            for s in np.unique(src):
                m = src == s
                key = (st.name, int(s))
                if key not in pids:
                    pids[key] = P.element_ids(st.name, int(s))
                ids = pids[key]
                flat_src = _ranges(pk[m] * ids.shape[1] + pe[m], cnt[m])
                flat_dst = _ranges(dk[m] * want.shape[1] + de[m], cnt[m])
                np.add.at(hits.reshape(-1), flat_dst, 1)
                got.reshape(-1)[flat_dst] = ids.reshape(-1)[flat_src]
            if np.any(hits != 1):
                bad = int(np.count_nonzero(hits != 1))
                raise InternalError(
                    f"{where}: {bad} elements of state '{st.name}' are not written exactly once"
                )
            if not np.array_equal(got, want):
                bad = int(np.count_nonzero(got != want))
                raise InternalError(f"{where}: {bad} elements of state '{st.name}' get wrong data")
        _check_posts(r, where)
    heard = set()
    for r in plan.ranks:
        heard |= set(r.notified)
    missing = sorted(set(range(plan.prefill_tp)) - heard)
    if missing:
        raise InternalError(f"plan {plan.spec}: prefill ranks {missing} are never notified")


def _check_posts(r, where: str) -> None:
    """Posted runs must be exactly the reads, regrouped (same bytes, same pairing)."""
    rd, rp, rn, rs = _expand(list(r.reads))
    pd_, pp, pn, ps = _expand(list(r.posts))
    pages_r = np.array([hash(g.page) for g in r.reads for _ in range(g.count)], dtype=np.int64)
    pages_p = np.array([hash(g.page) for g in r.posts for _ in range(g.count)], dtype=np.int64)
    if rn.sum() != pn.sum():
        raise InternalError(f"{where}: posts move {pn.sum()} bytes, reads {rn.sum()}")
    # order posts by (page, decode offset) and find the post holding each read
    key_p = np.lexsort((pd_, pages_p))
    pd_, pp, pn, ps, pages_p = pd_[key_p], pp[key_p], pn[key_p], ps[key_p], pages_p[key_p]
    for page in np.unique(pages_r):
        mr, mp = pages_r == page, pages_p == page
        a_d, a_p, a_n, a_s = rd[mr], rp[mr], rn[mr], rs[mr]
        b_d, b_p, b_n, b_s = pd_[mp], pp[mp], pn[mp], ps[mp]
        j = np.searchsorted(b_d, a_d, side="right") - 1
        if np.any(j < 0):
            raise InternalError(f"{where}: a read is not posted")
        ok = (a_d + a_n <= b_d[j] + b_n[j]) & (a_p - a_d == b_p[j] - b_d[j]) & (a_s == b_s[j])
        if not np.all(ok):
            raise InternalError(f"{where}: posted runs differ from the reads")
        if not np.array_equal(np.bincount(j, weights=a_n, minlength=len(b_n)), b_n):
            raise InternalError(f"{where}: posted runs cover bytes no read asks for")
