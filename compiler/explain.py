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
        lines.append(f"  {'state':<10} {'from':>4} {'decode off':>11} {'prefill off':>12} {'bytes':>10}  runs")
        for g in r.reads:
            st = D.state(g.state)
            pst = P.state(g.state)
            lines.append(
                f"  {g.state:<10} {'P' + str(g.prefill_rank):>4} {g.decode_offset - st.offset:>11} "
                f"{g.prefill_offset - pst.offset:>12} {g.nbytes:>10}  {g.count}"
                + (f"  {g.layout_str()}" if g.shape else "")
            )
        total = sum(g.nbytes * g.count for g in r.posts)
        lines.append(f"  posted: {sum(g.count for g in r.posts)} runs per logical block, {_size(total)}")
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
    band = 1.0
    gap = 0.25
    colors = plt.get_cmap("tab10")
    n_r = len(ranks)
    max_src = max(1, max(len(r.sources) for r in ranks))
    fig_h = max(3.0, 1.3 * len(states) * n_r + 1.2)
    fig, axes = plt.subplots(n_r, 1, figsize=(4.2 + 1.9 * max_src, fig_h), squeeze=False)
    for ax, r in zip(axes[:, 0], ranks):
        # decode column at x=0..1 on the right; source columns on the left
        srcs = list(r.sources)
        xs = {p: -2.2 - 1.6 * (len(srcs) - 1 - i) for i, p in enumerate(srcs)}
        y0 = {s: (len(states) - 1 - i) * (band + gap) for i, s in enumerate(states)}

        def y_of(side, rank_state, off, y0=y0):
            st = side.state(rank_state)
            frac = (off - st.offset) / max(1, st.nbytes)
            return y0[rank_state] + band * (1 - frac)

        for s in states:
            ax.add_patch(Rectangle((0, y0[s]), 1, band, fill=False, lw=1.0, ec="black"))
            ax.text(1.08, y0[s] + band / 2, f"{s}\n{_size(D.state(s).nbytes)}", va="center", fontsize=8)
            for p in srcs:
                ax.add_patch(Rectangle((xs[p], y0[s]), 1, band, fill=False, lw=0.6, ec="gray"))
        for p in srcs:
            ax.text(xs[p] + 0.5, y0[states[0]] + band + 0.08, f"prefill rank {p}", ha="center", fontsize=8)
        ax.text(0.5, y0[states[0]] + band + 0.08, f"decode rank {r.rank}", ha="center", fontsize=8, weight="bold")
        counts = {}
        for g in r.reads:
            c = colors(g.prefill_rank % 10)
            d_off, p_off = g.expand()
            counts[g.prefill_rank] = counts.get(g.prefill_rank, 0) + len(d_off)
            for do, po in list(zip(d_off.tolist(), p_off.tolist()))[:400]:
                dt, db = y_of(D, g.state, do), y_of(D, g.state, do + g.nbytes)
                pt, pb = y_of(P, g.state, po), y_of(P, g.state, po + g.nbytes)
                xp = xs[g.prefill_rank]
                ax.add_patch(Rectangle((0, db), 1, dt - db, color=c, alpha=0.85, lw=0))
                ax.add_patch(Rectangle((xp, pb), 1, pt - pb, color=c, alpha=0.85, lw=0))
                ax.add_patch(Polygon([(xp + 1, pt), (0, dt), (0, db), (xp + 1, pb)], closed=True,
                                     color=c, alpha=0.18, lw=0))
        per_block = plan.descriptors_per_block(r.rank)
        note = "descriptors per logical block: " + ", ".join(f"{k} {v}" for k, v in sorted(per_block.items()))
        if r.notify_only:
            note += f"   notify only: {list(r.notify_only)}"
        ax.text(min(xs.values(), default=0), -0.35, note, fontsize=8)
        ax.set_xlim(min(xs.values(), default=-2.2) - 0.3, 2.3)
        ax.set_ylim(-0.6, len(states) * (band + gap) + 0.2)
        ax.axis("off")
    fig.suptitle(
        f"{plan.spec}: prefill TP {plan.prefill_tp} -> decode TP {plan.decode_tp} "
        "(each state one band; runs coloured by source rank)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Date": None} if path.endswith(".svg") else None)
    plt.close(fig)
