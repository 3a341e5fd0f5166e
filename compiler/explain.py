"""`layoutc explain` and `layoutc plan`: a plan as text, or as a picture (SVG/PNG).

The picture is built in two steps: :func:`picture` lays out one decode rank's plan as plain
data (bands, runs, links, labels, in the coordinates the renderer draws), and
:func:`render_picture` draws it with matplotlib.  Every state gets a band of equal height on
each side (bytes are linear within it), so a 3 KiB conv slice is as visible as a 1 MiB SSM
state.  A per-kernel-block state's band shows one period of kernel blocks (one kernel block,
or the few after which the two sides' block sizes line up again): the runs of the other
kernel blocks repeat it, and the band says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..runtime.layout import DimDesc, local_dim, local_size
from ..runtime.plan import Plan, RankPlan, SideLayout

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# --- sizes and text ----------------------------------------------------------------------------


def size_text(n: int) -> str:
    """Bytes for people: `512 B`, `16 KiB`, `2.047 MiB`, `1.5 GiB` (4 significant digits)."""
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.4g} {unit}"
    return f"{n} B"


def _pair(a: int, b: int) -> str:
    return size_text(a) if a == b else f"{size_text(a)} -> {size_text(b)}"


def _num(a: int, b: int) -> str:
    return str(a) if a == b else f"{a} -> {b}"


def render_text(plan: Plan, decode_rank: int | None) -> str:
    P, D = plan.prefill, plan.decode
    lines = [
        f"{plan.spec}: prefill TP {plan.prefill_tp} -> decode TP {plan.decode_tp}"
        f"  (spec sha256 {plan.spec_sha256[:12]})",
        "states (bytes per page, prefill -> decode):",
    ]
    for s in P.states:
        lines.append(
            f"  {s.name:<10} {s.dtype:<5} page {s.page:<16} {size_text(s.nbytes):>10} -> "
            f"{size_text(D.state(s.name).nbytes):>10}"
        )
    lines.append("pages (prefill -> decode): the stride of a kernel block, and of a logical block")
    w = max(len(p.name) for p in P.pages)
    for p in P.pages:
        dp = D.page(p.name)
        lines.append(
            f"  {p.name:<{w}}  per {p.per} block; states {_pair(p.nbytes, dp.nbytes)}; "
            f"kernel stride {_pair(p.kernel_stride, dp.kernel_stride)} "
            f"x {_num(p.kernel_blocks, dp.kernel_blocks)} kernel blocks = logical stride "
            f"{_pair(p.logical_stride, dp.logical_stride)}"
        )
    rm = plan.remap
    unit = "logical block"
    if rm is not None:
        unit = "window (per-kernel-block pages) or logical block"
        lines.append(
            f"tokens per logical block: prefill {rm.prefill_kernel_tokens * rm.prefill_kernel_blocks}"
            f" ({rm.prefill_kernel_tokens} x {rm.prefill_kernel_blocks} kernel blocks), decode "
            f"{rm.decode_kernel_tokens * rm.decode_kernel_blocks} ({rm.decode_kernel_tokens} x "
            f"{rm.decode_kernel_blocks}): requests move in windows of {rm.chunk_tokens} tokens "
            f"(num_tokens= decides how many); the runs of per-kernel-block pages below move one "
            f"window, rows 0-{rm.chunk_tokens - 1} of a kernel block, and are shifted by "
            "the bytes per token for the others"
        )
    ranks = plan.ranks if decode_rank is None else (plan.rank(decode_rank),)
    for r in ranks:
        per_block = plan.descriptors_per_block(r.rank)
        lines.append("")
        lines.append(
            f"decode rank {r.rank}: reads {list(r.sources)}"
            + (f", notifies only {list(r.notify_only)}" if r.notify_only else "")
            + f"; descriptors per {unit}: "
            + ", ".join(f"{k} {v}" for k, v in sorted(per_block.items()))
        )
        lines.append(
            f"  {'state':<10} {'from':>4} {'decode off':>11} {'prefill off':>12} {'bytes':>10}  runs"
        )
        for g in r.reads:
            assert g.state is not None
            st = D.state(g.state)
            pst = P.state(g.state)
            lines.append(
                f"  {g.state:<10} {'P' + str(g.prefill_rank):>4} {g.decode_offset - st.offset:>11} "
                f"{g.prefill_offset - pst.offset:>12} {g.nbytes:>10}  {g.count}"
                + (f"  {g.layout_str()}" if g.shape else "")
            )
        total = sum(g.nbytes * g.count for g in r.posts)
        lines.append(
            f"  posted: {sum(g.count for g in r.posts)} runs per {unit}, {size_text(total)}"
        )
    lines.append("")
    lines.append(
        "prefill completion: "
        + ", ".join(f"P{p} waits for {len(plan.readers(p))}" for p in range(plan.prefill_tp))
    )
    return "\n".join(lines)


# --- the picture, as data ------------------------------------------------------------------------

BAND = 1.0  # least height of a state's band (a band with many named parts is taller)
GAP = 0.55  # between bands (room for a band's caption)
RANK_GAP = 0.7  # between prefill ranks
P_X, D_X = 0.0, 3.2  # left edges of the prefill and decode columns (each 1 wide)
MAX_RUNS = 200  # runs drawn one by one per (state, source); more are drawn in groups


@dataclass(frozen=True)
class Band:
    """One state's bytes on one side: y from `y0` (bottom) to `y0 + h`, x from `x` to `x + 1`."""

    side: str  # "prefill" or "decode"
    rank: int
    state: str
    x: float
    y0: float
    caption: str
    h: float = BAND

    @property
    def y1(self) -> float:
        return self.y0 + self.h


@dataclass(frozen=True)
class Box:
    """A filled stretch of a band (a run, or several adjacent ones drawn together)."""

    band: Band
    y0: float
    y1: float
    source: int  # the prefill rank the bytes come from
    label: str


@dataclass(frozen=True)
class Mark:
    """A division of a band (a half, a head, a concat segment, a kernel block) with a name."""

    band: Band
    y0: float
    y1: float
    label: str
    level: int  # 0: kernel block, 1: outermost dim, 2: the next one


@dataclass
class Picture:
    """Everything drawn for one decode rank."""

    title: str
    height: float  # the top of the drawing
    bottom: float = -0.5  # the lowest y used (captions, notified ranks, notes)
    bands: list[Band] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    links: list[tuple[Box, Box]] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    notified: list[tuple[int, float]] = field(default_factory=list)  # (prefill rank, y)


def _window(side: SideLayout, state: str, period: int) -> tuple[int, int]:
    """(kernel blocks shown, bytes they hold) of a state's band."""
    st = side.state(state)
    shown = period if side.page(st.page).per == "kernel" else 1
    return shown, shown * st.nbytes


def _y(band: Band, side: SideLayout, state: str, off: np.ndarray, period: int) -> np.ndarray:
    """Byte offsets (from the logical block start) -> y in `band` (top of the band = byte 0)."""
    st = side.state(state)
    pg = side.page(st.page)
    shown, total = _window(side, state, period)
    if pg.per == "kernel":
        k = off // pg.kernel_stride
        pos = k * st.nbytes + (off - k * pg.kernel_stride - st.offset)
    else:
        pos = off - st.offset
    return band.y0 + band.h * (1.0 - pos / max(1, total))


def _divisions(
    dims: tuple[DimDesc, ...], tp: int, rank: int, base: int = 0, level: int = 1
) -> list[tuple[int, int, str, int]]:
    """(first element, elements, label, level) of the named parts of one copy of a state:
    the outermost dim's segments (x | B | C, K | V) or indices (heads, K and V halves), then,
    inside each of up to 4 indices, the next dim's."""
    if not dims:
        return []
    dim, inner = dims[0], math.prod(local_size(d, tp) for d in dims[1:])
    out: list[tuple[int, int, str, int]] = []
    if dim.structured or len(dim.segments) > 1:
        for seg, (_, l0, n) in zip(dim.segments, local_dim(dim, tp, rank)):
            out.append((base + l0 * inner, n * inner, seg.name, level))
        return out
    (g0, _, n) = local_dim(dim, tp, rank)[0]
    if dim.paged or n < 2:
        return out
    if n > 8:  # many indices: one part naming the range (inside a part: nothing new)
        return [] if level > 1 else [(base, n * inner, f"{dim.name} {g0}-{g0 + n - 1}", level)]
    for i in range(n):
        label = "KV"[i] if (dim.name == "half" and dim.size == 2) else f"{dim.name} {g0 + i}"
        out.append((base + i * inner, inner, label, level))
        if level == 1 and n <= 4:
            out += _divisions(dims[1:], tp, rank, base + i * inner, 2)
    return out


def _marks(band: Band, side: SideLayout, state: str, rank: int, period: int) -> list[Mark]:
    """Named divisions of a band: the kernel blocks shown, then the state's dims."""
    st = side.state(state)
    shown, total = _window(side, state, period)
    elems = st.nbytes // st.itemsize

    def y(pos: int) -> float:
        return band.y0 + band.h * (1.0 - pos * st.itemsize / max(1, total))

    out = []
    for k in range(shown):
        if shown > 1:
            out.append(Mark(band, y((k + 1) * elems), y(k * elems), f"kernel block {k}", 0))
        for lo, n, label, level in _divisions(st.dims, side.tp, rank, k * elems):
            out.append(Mark(band, y(lo + n), y(lo), label, level))
    return out


def _paged_size(dims: tuple[DimDesc, ...]) -> int | None:
    for d in dims:
        if d.paged:
            return d.size
        for seg in d.segments:
            sub = _paged_size(seg.dims)
            if sub is not None:
                return sub
    return None


def periods(plan: Plan) -> tuple[int, int]:
    """(decode, prefill) kernel blocks after which the runs of every kernel page repeat."""
    P, D = plan.prefill, plan.decode
    if plan.remap is not None:  # the runs move one window of kernel block 0
        return 1, 1
    period = 1
    for st in D.states:
        if D.page(st.page).per != "kernel":
            continue
        dt, pt = _paged_size(st.dims), _paged_size(P.state(st.name).dims)
        if dt is not None and pt is not None:
            period = math.lcm(period, math.lcm(dt, pt) // dt)
    if D.kernel_blocks % period or (period * P.kernel_blocks) % D.kernel_blocks:
        return D.kernel_blocks, P.kernel_blocks
    return period, period * P.kernel_blocks // D.kernel_blocks


def _caption(side: SideLayout, state: str, period: int) -> str:
    st = side.state(state)
    pg = side.page(st.page)
    text = f"{state}  {size_text(st.nbytes)}"
    if pg.per == "kernel" and side.kernel_blocks > 1:
        shown = "kernel block 0" if period == 1 else f"kernel blocks 0-{period - 1}"
        rest = "; the others repeat it" if period < side.kernel_blocks else ""
        text += f"  ({shown} of {side.kernel_blocks}{rest})"
    elif pg.per == "logical" and side.kernel_blocks > 1:
        text += "  (once per logical block)"
    return text


def _runs(
    plan: Plan, r: RankPlan, state: str, dperiod: int
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per source: (decode offsets, prefill offsets, lengths) of the runs shown."""
    D = plan.decode
    pg = D.page(D.state(state).page)
    out: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for g in r.reads:
        if g.state != state:
            continue
        d, p = g.expand()
        keep = (d // pg.kernel_stride < dperiod) if pg.per == "kernel" else np.ones(len(d), bool)
        n = np.full(int(keep.sum()), g.nbytes, dtype=np.int64)
        out.setdefault(g.prefill_rank, []).append((d[keep], p[keep], n))
    merged = {}
    for src, parts in out.items():
        d = np.concatenate([x[0] for x in parts])
        order = np.argsort(d, kind="stable")
        merged[src] = (
            d[order],
            np.concatenate([x[1] for x in parts])[order],
            np.concatenate([x[2] for x in parts])[order],
        )
    return merged


def _band_height(plan: Plan, state: str, sides: list[tuple[str, int]]) -> float:
    """A band tall enough for its named parts (up to 4 units), at least BAND."""
    dperiod, pperiod = periods(plan)
    most = 0
    for role, rank in sides:
        side = plan.decode if role == "decode" else plan.prefill
        st = side.state(state)
        shown, _ = _window(side, state, dperiod if role == "decode" else pperiod)
        parts = [d for d in _divisions(st.dims, side.tp, rank) if d[3] == 1]
        most = max(most, shown * max(1, len(parts)))
    return min(4.0, max(BAND, 0.34 * most))


def picture(plan: Plan, decode_rank: int) -> Picture:
    """One decode rank's plan laid out for drawing (see the module docstring)."""
    P, D = plan.prefill, plan.decode
    r = plan.rank(decode_rank)
    dperiod, pperiod = periods(plan)
    states = [s.name for s in D.states]
    srcs = list(r.sources)
    h = {
        s: _band_height(plan, s, [("decode", r.rank), *(("prefill", p) for p in srcs)])
        for s in states
    }
    tops = {}
    y = 0.0
    for s in states:  # offsets of each band's top from the column's top
        tops[s] = y
        y += h[s] + GAP
    col_h = y - GAP
    total = max(col_h, len(srcs) * (col_h + RANK_GAP) - RANK_GAP)
    p_top = {p: total - i * (col_h + RANK_GAP) for i, p in enumerate(srcs)}
    d_top = total / 2 + col_h / 2
    per_block = plan.descriptors_per_block(r.rank)
    pic = Picture(
        title=f"decode rank {r.rank}: reads prefill rank{'s' if len(srcs) > 1 else ''} "
        + ", ".join(map(str, srcs))
        + "; descriptors per logical block: "
        + ", ".join(f"{k} {v}" for k, v in sorted(per_block.items())),
        height=total,
    )
    dbands = {}
    for s in states:
        y0 = d_top - tops[s] - h[s]
        dbands[s] = Band("decode", r.rank, s, D_X, y0, _caption(D, s, dperiod), h[s])
        pic.bands.append(dbands[s])
        pic.marks += _marks(dbands[s], D, s, r.rank, dperiod)
    for p in srcs:
        for s in states:
            runs = _runs(plan, r, s, dperiod).get(p)
            caption = _caption(P, s, pperiod)
            if runs is not None and len(runs[2]) > MAX_RUNS:
                caption += f"; {len(runs[2])} runs, drawn in groups"
            if runs is None:
                caption += "; not read (the same data comes from another rank)"
            band = Band("prefill", p, s, P_X, p_top[p] - tops[s] - h[s], caption, h[s])
            pic.bands.append(band)
            pic.marks += _marks(band, P, s, p, pperiod)
            if runs is None:
                continue
            d, po, n = runs
            grouped = len(n) > MAX_RUNS
            for idx in np.array_split(np.arange(len(n)), min(len(n), MAX_RUNS)):
                if not len(idx):
                    continue
                dy = _y(dbands[s], D, s, np.concatenate([d[idx], d[idx] + n[idx]]), dperiod)
                py = _y(band, P, s, np.concatenate([po[idx], po[idx] + n[idx]]), pperiod)
                label = "" if grouped else size_text(int(n[idx[0]]))
                db = Box(dbands[s], float(dy.min()), float(dy.max()), p, label)
                pb = Box(band, float(py.min()), float(py.max()), p, label)
                pic.boxes += [pb, db]
                pic.links.append((pb, db))
    for i, p in enumerate(r.notify_only):
        pic.notified.append((p, -0.85 - i * 0.5))
    if r.notify_only:
        pic.bottom = -0.85 - 0.5 * len(r.notify_only) - 0.35
        pic.notes.append(
            "notified only: prefill rank"
            + ("s " if len(r.notify_only) > 1 else " ")
            + ", ".join(map(str, r.notify_only))
            + " (they hold the same replicated data, read from the ranks above; the decode "
            "rank tells them when it is done so they free the request's blocks)"
        )
    return pic


# --- drawing -------------------------------------------------------------------------------------

INCH_PER_UNIT = 0.5  # vertical scale of a picture
FONT = 6.8


def render_figure(plan: Plan, decode_rank: int | None) -> Figure:
    """The matplotlib Figure of `plan` (every decode rank, or one); nothing global is touched."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ranks = range(plan.decode_tp) if decode_rank is None else [decode_rank]
    pics = [picture(plan, d) for d in ranks]
    top_in, per_pic_in = 0.9, 0.75  # figure title and legend; each picture's title and notes
    heights = [pic.height - pic.bottom + 0.1 for pic in pics]
    fig_h = top_in + sum(h * INCH_PER_UNIT + per_pic_in for h in heights)
    fig_w = 11.0
    fig = Figure(figsize=(fig_w, fig_h))
    cmap = _colors(plan.prefill_tp)
    used = sorted({b.source for pic in pics for b in pic.boxes})
    fig.suptitle(
        f"{plan.spec}: prefill TP {plan.prefill_tp} -> decode TP {plan.decode_tp}; "
        "every state one band per side (bytes linear within it), runs coloured by source",
        x=0.02,
        y=1 - 0.25 / fig_h,
        ha="left",
        fontsize=9.5,
    )
    handles = [Patch(color=cmap(p), label=f"from prefill rank {p}") for p in used]
    if any(pic.notified for pic in pics):
        handles.append(Patch(fill=False, ls="--", ec="gray", label="prefill rank notified only"))
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.02, 1 - 0.45 / fig_h),
        ncol=min(6, len(handles)),
        fontsize=FONT,
        frameon=False,
    )
    y = 1 - top_in / fig_h
    for pic, h in zip(pics, heights):
        ax_h = h * INCH_PER_UNIT / fig_h
        y -= 0.45 / fig_h
        ax = fig.add_axes((0.01, y - ax_h, 0.98, ax_h))
        y -= ax_h + (per_pic_in - 0.45) / fig_h
        _draw(ax, pic, cmap, INCH_PER_UNIT * 72)
    return fig


Color = tuple[float, float, float, float]


def _colors(ranks: int) -> Callable[[int], Color]:
    """A colour per prefill rank (tab10, or tab20 for more than 10 ranks)."""
    from matplotlib import colormaps

    n = 10 if ranks <= 10 else 20
    tab = colormaps[f"tab{n}"]

    def color(p: int) -> Color:
        r, g, b, a = tab(p % n)
        return (float(r), float(g), float(b), float(a))

    return color


X_LIM = (-2.6, 6.6)


def _draw(ax: Axes, pic: Picture, cmap: Callable[[int], Color], pt_per_unit: float) -> None:
    """Draw one picture on `ax` (data units: see the module constants)."""
    from matplotlib.patches import Polygon, Rectangle

    ax.set_xlim(*X_LIM)
    ax.set_ylim(pic.bottom, pic.height + 0.1)
    ax.axis("off")
    ax.set_title(pic.title, fontsize=8, loc="left")
    fits = FONT * 1.15 / pt_per_unit  # the least height (data units) a line of text needs
    for b in pic.bands:
        ax.add_patch(
            Rectangle(
                (b.x, b.y0),
                1,
                b.h,
                fill=False,
                lw=1.1,
                ec="black",
                gid=f"band:{b.side}:{b.rank}:{b.state}",
            )
        )
        ax.text(
            b.x + 0.5,
            b.y0 - 0.05,
            b.caption,
            ha="center",
            va="top",
            fontsize=FONT - 0.5,
            color="dimgray",
            clip_on=True,
        )
    for src, dst in pic.links:
        ax.add_patch(
            Polygon(
                [
                    (src.band.x + 1, src.y1),
                    (dst.band.x, dst.y1),
                    (dst.band.x, dst.y0),
                    (src.band.x + 1, src.y0),
                ],
                closed=True,
                color=cmap(src.source),
                alpha=0.18,
                lw=0,
            )
        )
    for i, bx in enumerate(pic.boxes):
        band = bx.band
        hgt = max(bx.y1 - bx.y0, 0.004)  # a hairline for a tiny run, kept inside its band
        y0 = min(bx.y0, band.y1 - hgt)
        ident = f"{band.side}:{band.rank}:{band.state}:{i}"
        ax.add_patch(
            Rectangle(
                (band.x, y0), 1, hgt, color=cmap(bx.source), alpha=0.92, lw=0, gid=f"run:{ident}"
            )
        )
        if bx.label and bx.y1 - bx.y0 >= fits:
            ax.text(
                band.x + 0.5,
                (bx.y0 + bx.y1) / 2,
                bx.label,
                ha="center",
                va="center",
                fontsize=FONT - 0.5,
                color="white",
                clip_on=True,
                gid=f"runlabel:{ident}",
            )
    for m in pic.marks:
        band = m.band
        for yy in (m.y0, m.y1):
            ax.plot(
                [band.x, band.x + 1],
                [yy, yy],
                lw=0.5 if m.level else 0.8,
                ls="-" if m.level else "--",
                color="black",
                alpha=0.55 if m.level else 0.8,
            )
        if m.y1 - m.y0 < fits:
            continue
        right = band.side == "decode"
        nested = any(o.band is band and o.level == 2 for o in pic.marks)
        # the innermost names sit next to the band; kernel blocks furthest out
        offset = {2: 0.05, 1: 0.55 if nested else 0.05, 0: 1.05}[m.level]
        x = band.x + 1 + offset if right else band.x - offset
        ax.text(
            x,
            (m.y0 + m.y1) / 2,
            m.label,
            ha="left" if right else "right",
            va="center",
            fontsize=FONT - 0.5,
            color="black" if m.level == 1 else "dimgray",
            clip_on=True,
        )
    for p, yy in pic.notified:
        ax.add_patch(
            Rectangle(
                (P_X - 0.3, yy - 0.18),
                1.6,
                0.36,
                fill=False,
                ls="--",
                ec="gray",
                lw=0.9,
                gid=f"notified:{p}",
            )
        )
        ax.text(
            P_X + 0.5,
            yy,
            f"prefill rank {p}: notified only",
            ha="center",
            va="center",
            fontsize=FONT - 0.5,
            color="dimgray",
            clip_on=True,
        )
    for i, note in enumerate(pic.notes):
        ax.text(
            X_LIM[0] + 0.05,
            pic.bottom + 0.05 + 0.3 * i,
            note,
            fontsize=FONT - 0.5,
            va="bottom",
            color="dimgray",
            wrap=True,
        )


def render_picture(plan: Plan, path: str, decode_rank: int | None) -> None:
    if not (path.endswith(".svg") or path.endswith(".png")):
        from .bind import UsageError

        raise UsageError(f"-o {path}: write a .svg or a .png file")
    fig = render_figure(plan, decode_rank)
    if path.endswith(".svg"):
        fig.savefig(path, format="svg", metadata={"Date": None})
    else:
        fig.savefig(path, format="png", dpi=110)
