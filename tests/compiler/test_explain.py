"""`layoutc explain` pictures of every shipped spec: each drawn run inside its state's band,
each run label inside its run, a legend, no warnings; and the text forms of `plan`."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from layoutc.compiler.api import compile_plan
from layoutc.compiler.cli import main
from layoutc.compiler.explain import render_figure, render_text
from layoutc.compiler.pipeline import builtin_specs

pytestmark = pytest.mark.timeout(300)

# Values several family specs share (Nemotron-3-Nano-like, a small CPU hybrid, Qwen3-Next-like).
MAMBA2_NANO = dict(
    num_key_value_heads=2,
    head_dim=128,
    mamba_num_heads=64,
    mamba_head_dim=64,
    n_groups=8,
    ssm_state_size=128,
    kernel_blocks=131,
)
MAMBA2_CPU = dict(
    num_key_value_heads=2,
    head_dim=64,
    mamba_num_heads=8,
    mamba_head_dim=16,
    n_groups=2,
    ssm_state_size=16,
    kernel_blocks=2,
)
GDN = dict(
    num_key_value_heads=2,
    head_dim=256,
    linear_num_key_heads=16,
    linear_num_value_heads=32,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    kernel_blocks=34,
)

#: Values for the family specs (models carry their own).
FAMILY_SETS = {
    "vllm_flash_attn": dict(num_key_value_heads=8, head_dim=128),
    "vllm_flashinfer": dict(num_key_value_heads=2, head_dim=128, kernel_blocks=3),
    "vllm_mla": dict(kv_lora_rank=512, qk_rope_head_dim=64),
    "vllm_cpu_attn": dict(num_key_value_heads=4, head_dim=64),
    "vllm_hybrid_mamba2": MAMBA2_NANO,
    "vllm_cpu_hybrid_mamba2": MAMBA2_CPU,
    "vllm_cpu_hybrid_mamba2_sd": MAMBA2_CPU,
    "vllm_lbhnc": dict(num_key_value_heads=8, head_dim=128, kernel_blocks=2),
    "vllm_lbhnc_hybrid_mamba2": MAMBA2_NANO,
    "vllm_lbhnc_hybrid_mamba2_sd": MAMBA2_NANO,
    "vllm_lbhnc_hybrid_gdn": GDN,
    "vllm_lbhnc_hybrid_gdn_sd": GDN,
    "vllm_hybrid_gdn": GDN,
    "vllm_hybrid_mamba1": dict(
        num_key_value_heads=8,
        head_dim=128,
        mamba_intermediate_size=8192,
        ssm_state_size=16,
        kernel_blocks=5,
    ),
}
SPECS = [b.name for b in builtin_specs()]
PAIRS = [(2, 4), (4, 1)]


def test_every_family_has_values_here():
    assert {b.name for b in builtin_specs() if b.kind == "family"} == set(FAMILY_SETS)


def _extent(artist, renderer):  # noqa: ANN001, ANN202 - matplotlib objects
    return artist.get_window_extent(renderer)


def check_figure(fig) -> int:  # noqa: ANN001 - a matplotlib Figure
    """Every run patch inside its band, every run label inside its run; returns runs seen."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    runs = 0
    for ax in fig.axes:
        bands = {}
        patches = {}
        for p in ax.patches:
            gid = p.get_gid() or ""
            if gid.startswith("band:"):
                bands[gid[len("band:") :]] = p
            elif gid.startswith("run:"):
                patches[gid[len("run:") :]] = p
        assert bands
        for ident, p in patches.items():
            band = bands[ident.rsplit(":", 1)[0]]
            bx, by, bw, bh = band.get_x(), band.get_y(), band.get_width(), band.get_height()
            eps = 1e-9
            assert bx - eps <= p.get_x() and p.get_x() + p.get_width() <= bx + bw + eps, ident
            assert by - eps <= p.get_y() and p.get_y() + p.get_height() <= by + bh + eps, ident
            runs += 1
        for t in ax.texts:
            gid = t.get_gid() or ""
            if gid.startswith("runlabel:"):
                box = _extent(patches[gid[len("runlabel:") :]], renderer)
                text = _extent(t, renderer)
                assert box.x0 <= text.x0 and text.x1 <= box.x1, (gid, t.get_text())
                assert box.y0 <= text.y0 and text.y1 <= box.y1, (gid, t.get_text())
            # nothing is written outside the drawing
            x, y = t.get_position()
            (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
            assert x0 <= x <= x1 and y0 <= y <= y1, t.get_text()
    return runs


@pytest.mark.parametrize("spec", SPECS)
def test_explain_picture_of_every_shipped_spec(spec):
    sets = FAMILY_SETS.get(spec)
    for p, d in PAIRS:
        plan = compile_plan(spec, p, d, sets)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fig = render_figure(plan, None)
            assert check_figure(fig) > 0
        assert fig.legends and fig.legends[0].get_texts()
        labels = {t.get_text() for t in fig.legends[0].get_texts()}
        assert {f"from prefill rank {s}" for r in plan.ranks for s in r.sources} <= labels
        if any(r.notify_only for r in plan.ranks):
            assert "prefill rank notified only" in labels


def test_long_runs_of_kernel_blocks_stay_in_their_band():
    """131 kernel blocks: the band shows one kernel block (the others repeat it)."""
    plan = compile_plan("nemotron_3_nano_30b_a3b", 1, 2)
    fig = render_figure(plan, 0)
    assert check_figure(fig) > 0
    captions = [t.get_text() for t in fig.axes[0].texts]
    assert any("kernel block 0 of 131; the others repeat it" in c for c in captions)


def test_picture_names_halves_heads_segments_and_notified_ranks():
    plan = compile_plan("vllm_mla", 4, 2, FAMILY_SETS["vllm_mla"])
    texts = [t.get_text() for t in render_figure(plan, 0).axes[0].texts]
    assert "prefill rank 1: notified only" in texts
    plan = compile_plan("vllm_hybrid_mamba2", 2, 1, FAMILY_SETS["vllm_hybrid_mamba2"])
    texts = [t.get_text() for t in render_figure(plan, 0).axes[0].texts]
    assert {"K", "V", "x"} <= set(texts)
    assert "head 0-31" in texts and "head 0-63" in texts  # a prefill rank's and the decode's
    plan = compile_plan("vllm_cpu_attn", 1, 2, FAMILY_SETS["vllm_cpu_attn"])
    texts = [t.get_text() for t in render_figure(plan, 1).axes[0].texts]
    assert {"head 2", "head 3", "K", "V"} <= set(texts)


def test_explain_writes_png_and_svg_without_warnings(tmp_path, capsys):
    for name in ("x.png", "x.svg"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rc = main(
                [
                    "explain",
                    "qwen3_next_80b_a3b",
                    "--prefill-tp",
                    "2",
                    "--decode-tp",
                    "4",
                    "--decode-rank",
                    "1",
                    "-o",
                    str(tmp_path / name),
                ]
            )
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        assert "Warning" not in captured.err
        assert (tmp_path / name).stat().st_size > 1000
    assert Path(tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_text_shows_both_strides_readably():
    plan = compile_plan("nemotron_3_nano_30b_a3b", 1, 2)
    text = render_text(plan, 0)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("mamba "))
    assert "per logical block" in line
    assert "kernel stride 16 KiB -> 8 KiB x 131 kernel blocks" in line
    assert "logical stride 2.047 MiB -> 1.023 MiB" in line
    assert "16384" not in text.split("decode rank")[0]  # sizes in units, not raw bytes
