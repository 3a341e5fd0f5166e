"""Pack and unpack with torch (and numpy on CPU): one call per row, group or cut run."""

from __future__ import annotations

from typing import Any

import numpy as np

from .layout import Stream
from .pages import BoundPages, stage_view, torch_module, unit_of

__all__ = ["group_ops", "torch_move"]


def group_ops(a: int, b: int, n: int, nblk: int, grouped: bool) -> list[tuple[int, ...]]:
    """Split bytes ``[a, b)`` of a group's ``[k, B, n]`` stream region into copy operations.

    Returns ``(0, q, r0, r1)`` for bytes ``[r0, r1)`` of a cut piece ``q`` (row ``q // B``,
    block ``q % B``), and ``(1, j0, j1, i0, i1)`` for the whole runs of rows ``[j0, j1)`` x
    blocks ``[i0, i1)`` (several rows only with every block).
    """
    ops: list[tuple[int, ...]] = []
    q0, r0 = divmod(a, n)
    q1, r1 = divmod(b, n)
    if q0 == q1:
        return [(0, q0, r0, r1)]
    if r0:
        ops.append((0, q0, r0, n))
        q0 += 1
    if q0 < q1:
        ja, ia = divmod(q0, nblk)
        jb, ib = divmod(q1, nblk)
        if ja == jb:
            ops.append((1, ja, ja + 1, ia, ib))
        else:
            if ia:
                ops.append((1, ja, ja + 1, ia, nblk))
                ja += 1
            if jb > ja:
                if grouped:
                    ops.append((1, ja, jb, 0, nblk))
                else:
                    ops.extend((1, j, j + 1, 0, nblk) for j in range(ja, jb))
            if ib:
                ops.append((1, jb, jb + 1, 0, ib))
    if r1:
        ops.append((0, q1, 0, r1))
    return ops


def torch_move(
    bound: BoundPages,
    stream: Stream,
    host_blk: np.ndarray,
    dev_blk: Any,
    st: Any,
    start: int,
    end: int,
    into_stage: bool,
    on_cpu: bool,
    grouped: bool,
) -> None:
    """The torch (and numpy) kernels: one call per row, group, or cut run."""
    torch = torch_module()
    nblk = stream.num_blocks
    st_soff = int(st.storage_offset())
    st_views: dict[int, tuple[Any, int]] = {}
    index_select = torch.index_select

    g_lo, g_hi = stream.groups_in(start, end)
    groups = stream.groups[g_lo:g_hi].tolist()
    bases = stream.base[g_lo:g_hi].tolist()
    ends = stream.end[g_lo:g_hi].tolist()
    g_n, g_off, g_step, g_S, g_buf = bound.g_n, bound.g_off, bound.g_step, bound.g_S, bound.g_buf

    for g, gbase, gend in zip(groups, bases, ends):
        n = g_n[g]
        off = g_off[g]
        step = g_step[g]
        S = g_S[g]
        buf = g_buf[g]
        out0 = gbase - start  # the group's stream position relative to the stage start
        a = (start if start > gbase else gbase) - gbase
        b = (end if end < gend else gend) - gbase
        if a == 0 and b == gend - gbase:  # the whole group: skip the splitting
            k = bound.g_k[g]
            if grouped or k == 1:
                ops: Any = ((1, 0, k, 0, nblk),)
            else:
                ops = [(1, j, j + 1, 0, nblk) for j in range(k)]
        else:
            ops = group_ops(a, b, n, nblk, grouped)
        for op in ops:
            if op[0] == 0:
                # bytes [r0, r1) of one run cut by a chunk edge: a plain slice copy
                _, q, r0, r1 = op
                j, i = divmod(q, nblk)
                src = int(host_blk[i]) * S + off + j * step + r0
                pos = out0 + q * n + r0
                ln = r1 - r0
                if into_stage:
                    st[pos : pos + ln].copy_(buf.b8[src : src + ln])
                else:
                    buf.b8[src : src + ln].copy_(st[pos : pos + ln])
                continue
            _, j0, j1, i0, i1 = op
            kk = j1 - j0
            cnt = i1 - i0
            pos = out0 + (j0 * nblk + i0) * n
            u, page_v = bound.view(g, j0, j1)
            if (st_soff + pos) % u:  # the stage position is less aligned than the pages
                u = unit_of(u, st_soff + pos)
                boff = off + j0 * step
                nb = buf.nbytes // S
                base = buf.soff // u + boff // u
                if kk == 1:
                    page_v = buf.view(u).as_strided((nb, n // u), (S // u, 1), base)
                else:
                    page_v = buf.view(u).as_strided((kk, nb, n // u), (step // u, S // u, 1), base)
            if not into_stage and on_cpu and u < 16:
                # index_copy_ on 1- to 8-byte elements is slow on CPU (~1.6 GB/s for uint8);
                # numpy's fancy assignment copies each run with one memcpy-like inner loop
                pages = buf.numpy()
                for j in range(j0, j1):
                    pv = np.lib.stride_tricks.as_strided(
                        pages[off + j * step :], (buf.nbytes // S, n), (S, 1), writeable=True
                    )
                    p = out0 + (j * nblk + i0) * n
                    pv[host_blk[i0:i1]] = st[p : p + cnt * n].numpy().reshape(cnt, n)
                continue
            su = st_views.get(u)
            if su is None:
                su = st_views[u] = stage_view(st, u)
            nu = n // u
            blk = dev_blk if cnt == nblk else dev_blk[i0:i1]
            spos = su[1] + pos // u
            if kk == 1:
                stage_v = su[0].as_strided((cnt, nu), (nu, 1), spos)
                if into_stage:
                    index_select(page_v, 0, blk, out=stage_v)
                else:
                    page_v.index_copy_(0, blk, stage_v)
            else:
                stage_v = su[0].as_strided((kk, cnt, nu), (cnt * nu, nu, 1), spos)
                if into_stage:
                    index_select(page_v, 1, blk, out=stage_v)
                else:
                    page_v.index_copy_(1, blk, stage_v)
