"""Planner rules: Mamba2 x split by whole heads, per-side layer counts, kernel-block periods,
and structured segments (vLLM's CPU page: K transposed inside each head)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from layoutc.compiler.diagnostics import InternalError, LayoutError
from layoutc.compiler.verify import verify_plan
from layoutc.runtime.layout import local_dim
from planner_cases import compile_pair

SMALL_HYBRID = dict(
    num_key_value_heads=2,
    head_dim=16,
    block_size=4,
    mamba_num_heads=4,
    mamba_head_dim=8,
    n_groups=2,
    ssm_state_size=4,
)


def brute_check(plan) -> None:  # noqa: ANN001 - a Plan
    """Element by element, with the runtime's identities (independent of the verifier)."""
    P, D = plan.prefill, plan.decode
    for r in plan.ranks:
        for st in D.states:
            want = D.element_ids(st.name, r.rank)
            got = np.full(want.shape, -1, dtype=np.int64)
            dst, pst = D.state(st.name), P.state(st.name)
            dpg, ppg = D.page(dst.page), P.page(pst.page)
            isz = dst.itemsize
            for g in r.reads:
                if g.state != st.name:
                    continue
                ids = P.element_ids(st.name, g.prefill_rank)
                for do, po in zip(*g.expand()):
                    for j in range(0, g.nbytes, isz):
                        dk, de = divmod(do - dst.offset + j, dpg.kernel_stride)
                        pk, pe = divmod(po - pst.offset + j, ppg.kernel_stride)
                        if dpg.per == "logical":
                            dk, de, pk, pe = 0, do - dst.offset + j, 0, po - pst.offset + j
                        got[dk, de // isz] = ids[pk, pe // isz]
            assert np.array_equal(got, want), (st.name, r.rank)


# --- Mamba2 x by whole heads ------------------------------------------------------------------


@pytest.mark.parametrize("tp", [8, 16])
def test_conv_x_is_split_by_whole_heads_like_the_ssm_state(tp):
    """TP > Mamba heads: a rank holds one whole head's x columns, the head its SSM state holds
    (split per element, it would hold half a head's x and a whole, replicated SSM head)."""
    plan = compile_pair("vllm_hybrid_mamba2", 1, tp, SMALL_HYBRID)
    conv = next(s for s in plan.decode.states if s.name == "conv")
    ssm = next(s for s in plan.decode.states if s.name == "ssm")
    for r in range(tp):
        x_start, _, x_len = local_dim(conv.dims[0], tp, r)[0]  # the x segment
        head_start, _, heads = local_dim(ssm.dims[0], tp, r)[0]
        assert (x_len, heads) == (8, 1)  # one head: head_dim columns, one SSM head
        assert x_start == head_start * 8 == (r * 4 // tp) * 8
    brute_check(plan)


def test_x_heads_that_do_not_divide_tp_are_refused_at_the_x_segment():
    sets = dict(SMALL_HYBRID, mamba_num_heads=6)
    with pytest.raises(LayoutError) as e:
        compile_pair("vllm_hybrid_mamba2", 1, 4, sets)
    messages = [d.message for d in e.value.diagnostics]
    assert any("segment 'x' of 'col'" in m and "6 units of 8" in m for m in messages), messages


# --- layer counts ------------------------------------------------------------------------------


def test_per_side_layer_counts_are_refused_at_plan_time():
    sets = dict(SMALL_HYBRID, **{"prefill.num_mamba_layers": 23, "decode.num_mamba_layers": 22})
    with pytest.raises(LayoutError) as e:
        compile_pair("vllm_hybrid_mamba2", 2, 4, sets)
    (d,) = e.value.diagnostics
    assert d.code == "E071" and "'mamba'" in d.message and "23" in d.message and "22" in d.message
    assert d.span is not None and d.span.file.endswith("vllm_hybrid_mamba2.layout")
    assert d.span.line == next(
        i
        for i, line in enumerate(open(d.span.file.replace("<layoutc>", _specs_root())), 1)
        if line.startswith("layer mamba")
    )
    same = dict(SMALL_HYBRID, num_mamba_layers=23)
    assert compile_pair("vllm_hybrid_mamba2", 2, 4, same).layer_kinds


def _specs_root() -> str:
    from layoutc.compiler.pipeline import builtin_specs_dir

    return str(builtin_specs_dir().parent)


# --- kernel blocks -----------------------------------------------------------------------------


@pytest.mark.parametrize("p,d", [(1, 2), (4, 1), (2, 2)])
def test_a_kernel_page_is_planned_once_and_repeated(p, d):
    """131 kernel blocks: the same runs as 1 kernel block, repeated every kernel stride."""
    one = compile_pair("vllm_hybrid_mamba2", p, d, SMALL_HYBRID)
    many = compile_pair("vllm_hybrid_mamba2", p, d, dict(SMALL_HYBRID, kernel_blocks=131))
    dks = many.decode.page("attention").kernel_stride
    pks = many.prefill.page("attention").kernel_stride
    for r1, r131 in zip(one.ranks, many.ranks):
        kv1 = sorted(x for g in r1.reads if g.state == "kv" for x in zip(*g.expand()))
        kv131 = sorted(x for g in r131.reads if g.state == "kv" for x in zip(*g.expand()))
        assert len(kv131) == 131 * len(kv1)
        assert set(kv131) == {(a + k * dks, b + k * pks) for k in range(131) for a, b in kv1}
        assert len(r131.reads) == len(r1.reads)  # one group per run family, not per block


def test_different_block_sizes_repeat_with_the_least_common_multiple():
    """prefill 6-token kernel blocks x 4, decode 4-token x 6: the runs repeat every 12 tokens."""
    sets = dict(SMALL_HYBRID, **{"prefill.block_size": 6, "prefill.kernel_blocks": 4})
    sets.update({"decode.block_size": 4, "decode.kernel_blocks": 6})
    for p, d in ((1, 2), (2, 1)):
        plan = compile_pair("vllm_hybrid_mamba2", p, d, sets)
        verify_plan(plan)
        brute_check(plan)


def test_verifier_catches_one_bad_kernel_block():
    plan = compile_pair("vllm_hybrid_mamba2", 1, 2, dict(SMALL_HYBRID, kernel_blocks=131))
    r = plan.ranks[1]
    i, g = next((i, g) for i, g in enumerate(r.reads) if g.state == "kv" and g.shape)
    # the lifted group covers all 131 kernel blocks; one fewer leaves the last unwritten
    bad = dataclasses.replace(g, shape=(g.shape[0] - 1, *g.shape[1:]))
    reads = (*r.reads[:i], bad, *r.reads[i + 1 :])
    ranks = (plan.ranks[0], dataclasses.replace(r, reads=reads))
    with pytest.raises(InternalError, match="exactly once"):
        verify_plan(dataclasses.replace(plan, ranks=ranks))


# --- structured segments: vLLM's CPU page ---------------------------------------------------------

CPU = dict(num_key_value_heads=4, head_dim=8, block_size=4)


@pytest.mark.parametrize(
    "sets",
    [
        CPU,
        dict(CPU, **{"decode.block_size": 2, "decode.kernel_blocks": 2}),
        dict(
            CPU,
            **{"prefill.block_size": 6, "prefill.kernel_blocks": 2},
            **{"decode.block_size": 4, "decode.kernel_blocks": 3},
        ),
    ],
    ids=["same-blocks", "half-blocks", "6-vs-4"],
)
def test_cpu_page_moves_k_transposed_and_v_by_token(sets):
    for p, d in itertools.product((1, 2, 4, 8), repeat=2):
        brute_check(compile_pair("vllm_cpu_attn", p, d, sets))


def test_cpu_page_k_runs_are_token_rows_when_blocks_differ():
    """Decode blocks of 2 tokens from prefill blocks of 4: K moves as rows of 2 tokens (one
    per dim), V as whole token rows of all dims."""
    sets = dict(CPU, **{"decode.block_size": 2, "decode.kernel_blocks": 2})
    plan = compile_pair("vllm_cpu_attn", 1, 1, sets)
    isz = 2  # bf16
    runs = sorted(
        (x["decode_offset"], x["prefill_offset"], x["nbytes"]) for x in plan.iter_reads(0)
    )
    k_head0 = [r for r in runs if r[0] < 8 * 2 * isz]  # decode K of head 0: [dim 8][token 2]
    assert k_head0 == [(i * 2 * isz, i * 4 * isz, 2 * isz) for i in range(8)]
    v_head0 = next(r for r in runs if r[0] == 8 * 2 * isz)  # then V: [token 2][dim 8]
    assert v_head0 == (16 * isz, 32 * isz, 2 * 8 * isz)


def test_structured_modules_declare_plan_format_1_1(tmp_path, capsys):
    from layoutc.compiler.cli import main

    rc = main(
        [
            "compile",
            "vllm_cpu_attn",
            "-o",
            str(tmp_path),
            "--set",
            "num_key_value_heads=4",
            "--set",
            "head_dim=64",
            "--tp-pairs",
            "1:2",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    text = (tmp_path / "vllm_cpu_attn.py").read_text()
    assert "PLAN_FORMAT = (1, 1)" in text
    import importlib.util

    spec = importlib.util.spec_from_file_location("_cpu_mod", tmp_path / "vllm_cpu_attn.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    plan = mod.plan(prefill_tp=1, decode_tp=2)
    verify_plan(plan)  # the tables round-trip, structured dims included
    assert plan.decode.state("kv").dims[1].structured
