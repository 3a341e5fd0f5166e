"""Staged transfers: pack -> staging stream -> unpack equals applying every run directly.

Pure compute on CPU (no NIXL).  Plans are compiled from the real specs with small values.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from layoutc.compiler.api import compile_plan  # noqa: E402
from layoutc.runtime.descriptors import build_pair_table, synthetic_segments  # noqa: E402
from layoutc.runtime.plan import Plan  # noqa: E402
from layoutc.runtime.staging import StagingLayout, expand, pack, unpack  # noqa: E402
from layoutc.tools.bench.reference import expand_loop  # noqa: E402

SPECS = Path(__file__).resolve().parents[2] / "specs"
HYBRID = dict(
    num_key_value_heads=2,
    head_dim=64,
    mamba_num_heads=8,
    mamba_head_dim=16,
    n_groups=2,
    ssm_state_size=16,
)

CASES = [
    ("vllm_hybrid_mamba2", (("num_key_value_heads", 2),), 4, 2),
    ("vllm_hybrid_mamba2", (), 2, 4),
    ("vllm_hybrid_mamba2", (), 1, 2),
    ("vllm_hybrid_mamba2", (), 2, 1),
    ("vllm_flashinfer", (("num_key_value_heads", 8),), 4, 2),
    ("vllm_flashinfer", (("num_key_value_heads", 8),), 2, 4),
    ("vllm_flashinfer", (("num_key_value_heads", 8),), 1, 2),
    ("vllm_flashinfer", (("num_key_value_heads", 6),), 2, 3),
    ("vllm_flashinfer", (("num_key_value_heads", 6),), 3, 2),
]


@functools.cache
def get_plan(spec: str, sets: tuple, p: int, d: int) -> Plan:
    if spec == "vllm_hybrid_mamba2":
        params = dict(HYBRID)
    else:
        params = {"head_dim": 64}
    params.update(dict(sets))
    return compile_plan(str(SPECS / f"{spec}.layout"), p, d, params)


def layer_pages_of(plan: Plan, num_layers: int) -> list[tuple[str, ...]]:
    kinds = [pages for _, pages in plan.layer_kinds] or [plan.prefill.page_names]
    return [tuple(kinds[i % len(kinds)]) for i in range(num_layers)]


def make_buffers(plan: Plan, role: str, layer_pages, num_blocks: int, rng, *, fill: bool):
    side = plan.prefill if role == "prefill" else plan.decode
    out = []
    for pages in layer_pages:
        d = {}
        for page in pages:
            n = side.page(page).buffer_bytes(num_blocks)
            if fill:
                d[page] = torch.from_numpy(rng.integers(0, 256, n, dtype=np.uint8))
            else:
                d[page] = torch.full((n,), 0xA5, dtype=torch.uint8)
        out.append(d)
    return out


def clone(bufs):
    return [{p: t.clone() for p, t in d.items()} for d in bufs]


def reference(plan, decode_rank, layer_pages, P, D, pblocks, dblocks, layers=None):
    """Apply every run of every block directly (the per-block loop the stream must equal)."""
    rp = plan.rank(decode_rank)
    for src in rp.sources:
        for layer, pages in enumerate(layer_pages):
            if layers is not None and layer not in layers:
                continue
            for page in pages:
                runs = rp.runs(page, src)
                sp = plan.prefill.page(page).logical_stride
                sd = plan.decode.page(page).logical_stride
                s = P[src][layer][page]
                t = D[layer][page]
                for lp, ld in zip(pblocks[src].tolist(), dblocks.tolist()):
                    for do, po, n in zip(
                        runs.decode_offset.tolist(),
                        runs.prefill_offset.tolist(),
                        runs.nbytes.tolist(),
                    ):
                        t[ld * sd + do : ld * sd + do + n] = s[lp * sp + po : lp * sp + po + n]


def transfer(
    plan,
    decode_rank,
    layer_pages,
    P,
    D,
    pblocks,
    dblocks,
    *,
    chunk=None,
    layers=None,
    grouped=None,
    fused=None,
):
    """Staged: per source, pack (chunk by chunk) into a reused staging tensor on the decode
    buffers' device, unpack."""
    device = next(iter(D[0].values())).device
    for src in plan.rank(decode_rank).sources:
        lay = StagingLayout.build(
            plan, decode_rank=decode_rank, prefill_rank=src, layer_pages=layer_pages
        )
        ex = expand(lay, dblocks, pblocks[src], layers, chunk_bytes=chunk or (1 << 40))
        total = ex.stream.total_bytes
        assert total == ex.nbytes
        stage = torch.zeros(max(1, chunk or total), dtype=torch.uint8, device=device)
        for s, e in ex.chunks():
            stage.fill_(0x5A)
            n = pack(
                P[src],
                lay,
                pblocks[src],
                stage,
                "prefill",
                start=s,
                end=e,
                stream=ex.stream,
                grouped=grouped,
                fused=fused,
            )
            assert n == e - s
            unpack(
                D,
                lay,
                dblocks,
                stage,
                "decode",
                start=s,
                end=e,
                stream=ex.stream,
                grouped=grouped,
                fused=fused,
            )


def setup_case(case, num_layers=4, num_blocks=23, req=9, seed=0):
    spec, sets, p, d = case
    plan = get_plan(spec, sets, p, d)
    lp = layer_pages_of(plan, num_layers)
    rng = np.random.default_rng(seed)
    P = [make_buffers(plan, "prefill", lp, num_blocks, rng, fill=True) for _ in range(p)]
    pblocks = [rng.choice(num_blocks, req, replace=False) for _ in range(p)]
    dblocks = rng.choice(num_blocks, req, replace=False)
    return plan, lp, P, pblocks, dblocks, rng


def check(plan, lp, P, pblocks, dblocks, rng, num_blocks=23, **kw):
    layers = kw.get("layers")
    for dr in range(plan.decode_tp):
        D0 = make_buffers(plan, "decode", lp, num_blocks, rng, fill=True)
        want = clone(D0)
        reference(plan, dr, lp, P, want, pblocks, dblocks, layers)
        got = clone(D0)
        transfer(plan, dr, lp, P, got, pblocks, dblocks, **kw)
        for layer, pages in enumerate(lp):
            for page in pages:
                a, b = got[layer][page], want[layer][page]
                if not torch.equal(a, b):
                    bad = torch.nonzero(a != b).reshape(-1)[:8].tolist()
                    raise AssertionError(
                        f"decode rank {dr} layer {layer} page {page}: bytes differ at {bad}"
                    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{dict(c[1])}-{c[2]}to{c[3]}")
def test_round_trip_whole_stream(case):
    plan, lp, P, pb, db, rng = setup_case(case)
    check(plan, lp, P, pb, db, rng)


# one-byte chunks are slow (a call per byte): one case is enough for them
ODD_CHUNKS = [(c, n) for c in (CASES[0], CASES[2], CASES[7]) for n in (1, 7, 333, 4097, 12345)
              if n != 1 or c is CASES[0]]  # fmt: skip


@pytest.mark.parametrize(
    "case,chunk",
    ODD_CHUNKS,
    ids=lambda v: str(v) if isinstance(v, int) else f"{v[0]}-{v[2]}to{v[3]}",
)
def test_round_trip_odd_chunks(case, chunk):
    num_layers = 2 if chunk == 1 else 4
    req = {1: 3, 7: 4}.get(chunk, 9)  # tiny chunks: many calls, keep the request small
    plan, lp, P, pb, db, rng = setup_case(case, num_layers=num_layers, req=req)
    check(plan, lp, P, pb, db, rng, chunk=chunk)


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize(
    "case", [CASES[2], CASES[3], CASES[6]], ids=lambda c: f"{c[0]}-{c[2]}to{c[3]}"
)
def test_grouped_and_per_row_kernels(case, grouped):
    plan, lp, P, pb, db, rng = setup_case(case, seed=3)
    check(plan, lp, P, pb, db, rng, chunk=1000, grouped=grouped)


def test_layer_subset_leaves_other_layers_untouched():
    plan, lp, P, pb, db, rng = setup_case(CASES[0], num_layers=6)
    check(plan, lp, P, pb, db, rng, layers=[1, 4, 5], chunk=5000)


def test_groups_span_several_rows():
    # 1 -> 2 hybrid: the conv B and C columns are two 96-byte runs one step apart
    plan = get_plan(*CASES[2])
    lay = StagingLayout.build(
        plan, decode_rank=0, prefill_rank=0, layer_pages=layer_pages_of(plan, 2)
    )
    assert lay.num_groups < lay.num_rows
    assert int(lay.group_rows.max()) >= 2


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=lambda c: f"{c[0]}-{c[2]}to{c[3]}")
def test_odd_alignment_and_dtypes(case, grouped):
    """Buffers that are bf16 tensors or uint8 slices at odd storage offsets, staging too."""
    plan, lp, P, pb, db, rng = setup_case(case)
    # prefill buffers as bf16 views; decode buffers as odd-offset slices of bigger tensors
    P16 = [[{p: t.view(torch.bfloat16) for p, t in d.items()} for d in Ps] for Ps in P]
    for dr in range(plan.decode_tp):
        D0 = make_buffers(plan, "decode", lp, 23, rng, fill=True)
        want = clone(D0)
        reference(plan, dr, lp, P, want, pb, db)
        big = [{p: torch.zeros(t.numel() + 3, dtype=torch.uint8) for p, t in d.items()} for d in D0]
        got = []
        for layer, d in enumerate(D0):
            g = {}
            for p, t in d.items():
                g[p] = big[layer][p][3:]
                g[p].copy_(t)
            got.append(g)
        for src in plan.rank(dr).sources:
            lay = StagingLayout.build(plan, decode_rank=dr, prefill_rank=src, layer_pages=lp)
            st = lay.stream(len(db))
            raw = torch.zeros(st.total_bytes + 5, dtype=torch.uint8)
            stage = raw[5:]
            pack(P16[src], lay, torch.from_numpy(pb[src]), stage, stream=st, grouped=grouped)
            unpack(got, lay, db, stage, stream=st, grouped=grouped)
        for layer, pages in enumerate(lp):
            for page in pages:
                assert torch.equal(got[layer][page], want[layer][page])
                assert int(big[layer][page][:3].sum()) == 0


def test_reverse_direction():
    """Pack on the decode side, unpack on the prefill side: the stream is symmetric."""
    plan, lp, P, pb, db, rng = setup_case(CASES[4])
    dr = 1
    D = make_buffers(plan, "decode", lp, 23, rng, fill=True)
    for src in plan.rank(dr).sources:
        lay = StagingLayout.build(plan, decode_rank=dr, prefill_rank=src, layer_pages=lp)
        st = lay.stream(len(db))
        stage = torch.empty(st.total_bytes, dtype=torch.uint8)
        pack(D, lay, db, stage, side="decode", stream=st)
        back = clone(P[src])
        unpack(back, lay, pb[src], stage, side="prefill", stream=st)
        # then forward again reproduces D on the covered bytes
        again = clone(D)
        stage2 = torch.empty_like(stage)
        pack(back, lay, pb[src], stage2, side="prefill", stream=st)
        assert torch.equal(stage, stage2)
        unpack(again, lay, db, stage2, stream=st)
        for layer, pages in enumerate(lp):
            for page in pages:
                assert torch.equal(again[layer][page], D[layer][page])


def _pair_table(plan, lay, lp, dr, src, nb_local, nb_remote):
    return build_pair_table(
        plan,
        decode_rank=dr,
        prefill_rank=src,
        local_is_decode=True,
        layer_pages=lp,
        local_segments=synthetic_segments(plan.decode, lp, nb_local, 1 << 40),
        remote_segments=synthetic_segments(plan.prefill, lp, nb_remote, 1 << 41),
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{dict(c[1])}-{c[2]}to{c[3]}")
def test_expand_equals_loop(case):
    plan = get_plan(*case[:4])
    lp = layer_pages_of(plan, 6)
    rng = np.random.default_rng(1)
    for dr in range(plan.decode_tp):
        for src in plan.rank(dr).sources:
            lay = StagingLayout.build(plan, decode_rank=dr, prefill_rank=src, layer_pages=lp)
            table = _pair_table(plan, lay, lp, dr, src, 40, 50)
            assert table is not None and table.num_rows == lay.num_rows
            assert np.array_equal(table.row_layer, lay.row_layer)
            # scattered, plus a consecutive stretch (NIXL merges whole-page runs there)
            local = np.concatenate([rng.choice(20, 7, replace=False), np.arange(25, 31)])
            remote = np.concatenate([rng.choice(20, 7, replace=False) + 20, np.arange(40, 46)])
            for layers in (None, [0, 3, 5], []):
                for chunk in (1 << 30, 999, 4096):
                    a = expand(lay, local, remote, layers, table=table, chunk_bytes=chunk)
                    b = expand_loop(lay, local, remote, layers, table=table, chunk_bytes=chunk)
                    for f in (
                        "local_indices",
                        "remote_indices",
                        "chunk_bounds",
                        "chunk_groups",
                        "local_blocks",
                        "remote_blocks",
                    ):
                        assert np.array_equal(getattr(a, f), getattr(b, f)), f
                    if layers is None:
                        assert a.rows is None and b.rows is None
                    else:
                        assert np.array_equal(a.rows, b.rows)
                    for f in ("groups", "base", "end"):
                        assert np.array_equal(getattr(a.stream, f), getattr(b.stream, f)), f
                    assert a.stream.total_bytes == b.stream.total_bytes == a.nbytes == b.nbytes
                    assert (a.n_descriptors, a.n_posted, a.n_ops) == (
                        b.n_descriptors,
                        b.n_posted,
                        b.n_ops,
                    )
                    for kernel in ("grouped", "fused"):
                        ka = expand(lay, local, remote, layers, chunk_bytes=chunk, kernel=kernel)
                        kb = expand_loop(
                            lay, local, remote, layers, chunk_bytes=chunk, kernel=kernel
                        )
                        assert ka.n_ops == kb.n_ops
                        if kernel == "fused":
                            assert ka.n_ops == ka.n_chunks
                    # zero-copy indices are PairTable.indices
                    li, ri, nbytes = table.indices(
                        local,
                        remote,
                        table.rows_for_layers(None if layers is None else np.asarray(layers)),
                    )
                    assert np.array_equal(li, a.local_indices)
                    assert np.array_equal(ri, a.remote_indices)
                    assert nbytes == a.nbytes


def test_n_posted_counts_nixl_merges():
    # flashinfer 4 -> 4 (well, same TP): whole-page runs, consecutive blocks merge
    plan = get_plan("vllm_flashinfer", (("num_key_value_heads", 8),), 2, 2)
    lp = layer_pages_of(plan, 3)
    lay = StagingLayout.build(plan, decode_rank=0, prefill_rank=0, layer_pages=lp)
    assert lay.num_rows == 3
    ex = expand(lay, np.arange(10, 20), np.arange(5, 15))
    assert ex.n_descriptors == 30 and ex.n_posted == 3
    ex = expand(lay, np.arange(10, 20), np.array([5, 7, 8, 9, 10, 11, 12, 13, 14, 20]))
    assert ex.n_posted == 3 * 3


def test_bad_arguments():
    plan, lp, P, pb, db, rng = setup_case(CASES[0])
    lay = StagingLayout.build(plan, decode_rank=0, prefill_rank=0, layer_pages=lp)
    st = lay.stream(len(db))
    with pytest.raises(ValueError, match="outside the stream"):
        pack(P[0], lay, pb[0], torch.empty(10, dtype=torch.uint8), start=5, end=st.total_bytes + 1)
    with pytest.raises(ValueError, match="staging tensor holds"):
        pack(P[0], lay, pb[0], torch.empty(10, dtype=torch.uint8), stream=st)
    with pytest.raises(ValueError, match="side must be"):
        pack(P[0], lay, pb[0], torch.empty(st.total_bytes, dtype=torch.uint8), side="x")
    with pytest.raises(ValueError, match="layers out of range"):
        lay.stream(3, [0, 99])
    with pytest.raises(ValueError, match="remote"):
        expand(lay, [1, 2], [3])
    with pytest.raises(ValueError, match="must be contiguous"):
        pack(P[0], lay, pb[0], torch.empty(2 * st.total_bytes, dtype=torch.uint8)[::2])
    with pytest.raises(ValueError, match="kernel must be one of"):
        expand(lay, [1], [2], kernel="magic")


def test_pair_that_moves_nothing():
    # hybrid 4 -> 2: decode rank 0 reads nothing from prefill rank 2
    plan = get_plan(*CASES[0])
    lp = layer_pages_of(plan, 2)
    lay = StagingLayout.build(plan, decode_rank=0, prefill_rank=2, layer_pages=lp)
    assert lay.num_rows == lay.num_groups == 0
    ex = expand(lay, [1, 2], [3, 4])
    assert ex.nbytes == 0 and ex.chunks() == [] and ex.n_ops == 0
    assert pack([{}, {}], lay, [1, 2], torch.empty(0, dtype=torch.uint8)) == 0


def test_bound_pages_reused_across_chunks_and_requests():
    from layoutc.runtime.staging import BoundPages

    plan, lp, P, pb, db, rng = setup_case(CASES[2])
    dr, src = 1, 0
    lay = StagingLayout.build(plan, decode_rank=dr, prefill_rank=src, layer_pages=lp)
    bound_p = BoundPages(lay, P[src], "prefill")
    for req in (db, db[:4]):
        ids = pb[src][: len(req)]
        st = lay.stream(len(req))
        want = torch.empty(st.total_bytes, dtype=torch.uint8)
        pack(P[src], lay, ids, want, stream=st)
        got = torch.full_like(want, 7)
        stage = torch.empty(1001, dtype=torch.uint8)
        for s in range(0, st.total_bytes, 1001):
            e = min(st.total_bytes, s + 1001)
            pack(bound_p, lay, ids, stage, start=s, end=e, stream=st)
            got[s:e] = stage[: e - s]
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="another layout or side"):
        unpack(bound_p, lay, db, want, side="decode")
    with pytest.raises(ValueError, match="fused kernel needs CUDA"):
        pack(bound_p, lay, ids, want, fused=True)


def _cuda_triton() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_triton(), reason="needs CUDA and triton")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{dict(c[1])}-{c[2]}to{c[3]}")
def test_cuda_kernels_match_cpu(case):
    """On a GPU: fused (triton) and torch kernels, odd chunks, equal the CPU path."""
    plan, lp, P, pb, db, rng = setup_case(case)
    for dr in range(plan.decode_tp):
        D0 = make_buffers(plan, "decode", lp, 23, rng, fill=True)
        want = clone(D0)
        transfer(plan, dr, lp, P, want, pb, db, chunk=777)
        Pg = [[{k: t.cuda() for k, t in d.items()} for d in x] for x in P]
        for fused, grouped, chunk in ((True, None, 777), (True, None, 4096), (False, True, 999)):
            got = [{k: t.cuda() for k, t in d.items()} for d in D0]
            transfer(plan, dr, lp, Pg, got, pb, db, chunk=chunk, grouped=grouped, fused=fused)
            torch.cuda.synchronize()
            for layer, pages in enumerate(lp):
                for page in pages:
                    assert torch.equal(got[layer][page].cpu(), want[layer][page]), (
                        fused,
                        grouped,
                        chunk,
                        dr,
                        layer,
                        page,
                    )
