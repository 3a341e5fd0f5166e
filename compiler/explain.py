"""`layoutc explain`: a plan as text (terminal) or as a picture (SVG/PNG via matplotlib).

The picture puts the prefill pages read by a decode rank on the left, the decode rank's page
on the right; every run is a band coloured by its source rank.  Each state gets a band of equal
height (bytes are linear within a state), so a 3 KiB conv slice is as visible as a 1 MiB SSM
state; sizes and descriptor counts are written beside them.
"""

from __future__ import annotations

from ..runtime.plan import Plan


def _size(n: int) -> str:
    for unit, k in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k and n % (k // 16 or 1) == 0:
            v = n / k
            return f"{v:.4g} {unit}"
    return f"{n} B"


def render_text(plan: Plan, decode_rank: int | None) -> str:
    P, D = plan.prefill, plan.decode
    lines = [
        f"{plan.spec}: prefill TP {plan.prefill_tp} -> decode TP {plan.decode_tp}"
        f"  (spec sha256 {plan.spec_sha256[:12]})",
        "states (bytes per page, prefill -> decode):",
    ]
    for s in P.states:
        lines.append(
            f"  {s.name:<10} {s.dtype:<5} page {s.page:<10} {_size(s.nbytes):>10} -> "
            f"{_size(D.state(s.name).nbytes):>10}"
        )
    for p in P.pages:
        dp = D.page(p.name)
        lines.append(
            f"  page {p.name}: per {p.per} block, stride {p.kernel_stride} -> {dp.kernel_stride} "
            f"bytes, kernel blocks per logical block {p.kernel_blocks} -> {dp.kernel_blocks}"
        )
    ranks = plan.ranks if decode_rank is None else (plan.rank(decode_rank),)
    for r in ranks:
        per_block = plan.descriptors_per_block(r.rank)
        lines.append("")
        lines.append(
            f"decode rank {r.rank}: reads {list(r.sources)}"
            + (f", notifies only {list(r.notify_only)}" if r.notify_only else "")
            + "; descriptors per logical block: "
            + ", ".join(f"{k} {v}" for k, v in sorted(per_block.items()))
        )
        lines.append(
            f"  {'state':<10} {'from':>4} {'decode off':>11} {'prefill off':>12} {'bytes':>10}  runs"
        )
        for g in r.reads:
            st = D.state(g.state)
            pst = P.state(g.state)
            lines.append(
                f"  {g.state:<10} {'P' + str(g.prefill_rank):>4} {g.decode_offset - st.offset:>11} "
                f"{g.prefill_offset - pst.offset:>12} {g.nbytes:>10}  {g.count}"
                + (f"  {g.layout_str()}" if g.shape else "")
            )
        total = sum(g.nbytes * g.count for g in r.posts)
        lines.append(
            f"  posted: {sum(g.count for g in r.posts)} runs per logical block, {_size(total)}"
        )
    lines.append("")
    lines.append(
        "prefill completion: "
        + ", ".join(f"P{p} waits for {len(plan.readers(p))}" for p in range(plan.prefill_tp))
    )
    return "\n".join(lines)


def render_picture(plan: Plan, path: str, decode_rank: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon, Rectangle

    if not (path.endswith(".svg") or path.endswith(".png")):
        from .bind import UsageError

        raise UsageError(f"-o {path}: write a .svg or a .png file")
    P, D = plan.prefill, plan.decode
    ranks = plan.ranks if decode_rank is None else (plan.rank(decode_rank),)
    states = [s.name for s in D.states]
    band, gap, rank_gap = 1.0, 0.3, 0.8
    colors = plt.get_cmap("tab10")
    col_h = len(states) * (band + gap)
    heights = []
    for r in ranks:
        heights.append(max(col_h, len(r.sources) * (col_h + rank_gap)) + 1.2)
    fig, axes = plt.subplots(
        len(ranks),
        1,
        figsize=(9.0, 0.55 * sum(heights) + 0.8),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    for ax, r in zip(axes[:, 0], ranks):
        srcs = list(r.sources)
        total = len(srcs) * (col_h + rank_gap) - rank_gap
        # prefill ranks stacked on the left (x 0..1), the decode rank centred on the right (x 3..4)
        p_top = {p: total - i * (col_h + rank_gap) for i, p in enumerate(srcs)}
        d_top = total / 2 + col_h / 2

        def y_state(top: float, i: int) -> float:
            return top - i * (band + gap) - band

        def y_of(side, state: str, top: float, off: int) -> float:
            st = side.state(state)
            i = states.index(state)
            frac = (off - st.offset) / max(1, st.nbytes)
            return y_state(top, i) + band * (1 - frac)

        for i, s in enumerate(states):
            ax.add_patch(Rectangle((3, y_state(d_top, i)), 1, band, fill=False, lw=1.2, ec="black"))
            ax.text(
                4.1,
                y_state(d_top, i) + band / 2,
                f"{s}  {_size(D.state(s).nbytes)}",
                va="center",
                fontsize=8,
            )
            for p in srcs:
                ax.add_patch(
                    Rectangle((0, y_state(p_top[p], i)), 1, band, fill=False, lw=0.6, ec="gray")
                )
                ax.text(
                    -0.1,
                    y_state(p_top[p], i) + band / 2,
                    f"{s}  {_size(P.state(s).nbytes)}",
                    va="center",
                    ha="right",
                    fontsize=7,
                    color="dimgray",
                )
        for p in srcs:
            ax.text(
                0.5,
                p_top[p] + 0.12,
                f"prefill rank {p}",
                ha="center",
                fontsize=8,
                color=colors(p % 10),
                weight="bold",
            )
        ax.text(3.5, d_top + 0.12, f"decode rank {r.rank}", ha="center", fontsize=9, weight="bold")
        for g in r.reads:
            c = colors(g.prefill_rank % 10)
            top = p_top[g.prefill_rank]
            d_off, p_off = g.expand()
            for do, po in list(zip(d_off.tolist(), p_off.tolist()))[:400]:
                dt, db = y_of(D, g.state, d_top, do), y_of(D, g.state, d_top, do + g.nbytes)
                pt, pb = y_of(P, g.state, top, po), y_of(P, g.state, top, po + g.nbytes)
                ax.add_patch(Rectangle((3, db), 1, dt - db, color=c, alpha=0.85, lw=0))
                ax.add_patch(Rectangle((0, pb), 1, pt - pb, color=c, alpha=0.85, lw=0))
                ax.add_patch(
                    Polygon(
                        [(1, pt), (3, dt), (3, db), (1, pb)], closed=True, color=c, alpha=0.2, lw=0
                    )
                )
                if dt - db > 0.18:
                    ax.text(
                        3.5,
                        (dt + db) / 2,
                        _size(g.nbytes),
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color="white",
                    )
        per_block = plan.descriptors_per_block(r.rank)
        note = "descriptors per logical block: " + ", ".join(
            f"{k} {v}" for k, v in sorted(per_block.items())
        )
        if r.notify_only:
            note += f";  notifies only prefill ranks {list(r.notify_only)}"
        ax.text(-1.6, -0.75, note, fontsize=8)
        ax.set_xlim(-1.7, 5.4)
        ax.set_ylim(-1.0, total + 0.5)
        ax.axis("off")
    fig.suptitle(
        f"{plan.spec}: prefill TP {plan.prefill_tp} -> decode TP {plan.decode_tp}\n"
        "each state one band (bytes linear within it); runs coloured by source rank",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Date": None} if path.endswith(".svg") else None)
    plt.close(fig)
