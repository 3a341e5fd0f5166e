"""Endpoints on GPU memory (VRAM): pull and push, zero-copy and staged (the fused kernel), one
decode engine serving prefill engines of two TP sizes.  Every rank is a process on GPU 0
(cuda_ipc between processes); every byte of the decode pages is checked.

Marked ``gpu``: they run where CUDA is (the GPU box); their summary is committed in
``benchmarks/results/h100-gpu-tests.txt``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from layoutc.compiler.cli import main as compile_main  # noqa: E402
from rt_plans import GQA4, HYBRID, SPECS, compiled  # noqa: E402
from rt_workers import (  # noqa: E402
    connect_all,
    ranks_fixture,  # noqa: F401 (the `ranks` fixture)
    run_requests,
    run_token_requests,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = {"device": "cuda:0"}


def _ids(seed: int, nreq: int, nblk: int, pool: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.permutation(pool)[: nreq * nblk].reshape(nreq, nblk)
    d = rng.permutation(pool)[: nreq * nblk].reshape(nreq, nblk)
    return p, d


@pytest.mark.parametrize("mode", ["pull", "push"])
@pytest.mark.parametrize("strategy", ["zero-copy", "staged", "auto"])
def test_vram_requests_every_byte_verified(ranks, mode, strategy):
    plan = compiled("vllm_flashinfer", 1, 2, dict(GQA4, head_dim=64))
    kw = dict(num_blocks=96, layers=4, staging_bytes=4 << 20, staging_slots=4, **CUDA)
    pre = ranks.ranks([(plan, "prefill", 0)], **kw)
    dec = ranks.ranks([(plan, "decode", r) for r in range(2)], **kw)
    connect_all(pre, dec)
    pb, db = _ids(1, nreq=3, nblk=24, pool=96)
    infos, verified = run_requests(pre, dec, mode, pb, db, strategy=strategy)
    assert all(v > 0 for v in verified.values())
    initiators = dec if mode == "pull" else pre
    for r in initiators:
        for info in infos[r.label]:
            assert info["ok"]
            if strategy != "auto":
                assert set(info["strategies"].values()) <= {strategy}
    if strategy == "staged":
        assert any(r.call("stats")["chunks_packed"] for r in pre)


def test_vram_one_decode_engine_two_prefill_tps(ranks, tmp_path):
    sets = [x for k, v in HYBRID.items() for x in ("--set", f"{k}={v}")]
    spec = str(SPECS / "vllm_hybrid_mamba2.layout")
    assert compile_main(["compile", spec, "-o", str(tmp_path), *sets, "--tp-pairs", "1:2,4:2"]) == 0
    path = str(tmp_path / "vllm_hybrid_mamba2.py")
    kw = dict(num_blocks=48, layers=4, **CUDA)
    dec = ranks.ranks([(path, "decode", r, {"tp": 2, "engine": "D"}) for r in range(2)], **kw)
    pre_a = ranks.ranks([(path, "prefill", 0, {"tp": 1, "engine": "A"})], **kw)
    pre_b = ranks.ranks([(path, "prefill", r, {"tp": 4, "engine": "B"}) for r in range(4)], **kw)
    connect_all(pre_a + pre_b, dec)
    rng = np.random.default_rng(5)
    att_p, att_d = rng.permutation(48)[:8].reshape(2, 4), rng.permutation(48)[:8].reshape(2, 4)
    mam_p, mam_d = rng.permutation(48)[:2], rng.permutation(48)[:2]
    reqs = []
    for i, (engine, pre) in enumerate((("A", pre_a), ("B", pre_b))):
        pids = {"attention": att_p[i], "mamba": mam_p[i : i + 1]}
        dids = {"attention": att_d[i], "mamba": mam_d[i : i + 1]}
        for r in pre:
            r.call("tag", i, pids)
            r.call("expect", f"g{i}")
        reqs.append((i, engine, pre, pids, dids))
    for i, engine, _pre, pids, dids in reqs:
        for d in dec:
            d.call("pull", f"g{i}", dids, pids, engine=engine)
    for i, _engine, pre, _pids, _dids in reqs:
        for d in dec:
            assert d.call("wait", f"g{i}").ok
        for r in pre:
            assert r.call("wait", f"g{i}").ok
    for d in dec:
        assert d.call("verify", [(i, dids) for i, _e, _p, _pid, dids in reqs]) > 0


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_vram_different_tokens_per_block(ranks, mode):
    """Prefill blocks of 16 tokens, decode blocks of 48 (hybrid: attention by token windows,
    Mamba state block to block), requests at and around the block boundaries."""
    plan = compiled(
        "vllm_hybrid_mamba2", 1, 2, {**HYBRID, "prefill.block_size": 16, "decode.block_size": 48}
    )
    lengths = [1, 15, 16, 17, 47, 48, 49, 150]
    run_token_requests(ranks, plan, mode, lengths, ["attention", "mamba"], seed=3, **CUDA)
