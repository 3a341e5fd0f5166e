"""Cost model: formula, defaults, loading, and the zero-copy / staged choice."""

from __future__ import annotations

import json

import numpy as np
import pytest
from layoutc.runtime.costmodel import DEFAULTS, ENV_VAR, CostModel


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_few_large_runs_choose_zero_copy(kind):
    m = CostModel.default(kind)
    # 16 runs of 16 MiB each (whole regions of consecutive blocks, merged by NIXL)
    assert m.choose(16, 16 * (16 << 20), n_chunks=4, n_ops=16) == "zero-copy"
    # one contiguous region
    assert m.choose(1, 1 << 30, n_chunks=16, n_ops=1) == "zero-copy"


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_many_small_scattered_runs_choose_staged(kind):
    m = CostModel.default(kind)
    # 1,000 scattered blocks x 64 layers x 2 runs of 4 KiB (hetero-TP head slices)
    n = 1000 * 64 * 2
    assert m.choose(n, n * 4096, n_chunks=8, n_ops=128) == "staged"
    t = m.predict(n, n * 4096, 8, 128)
    assert t["staged"] < t["zero-copy"]


def test_formula():
    m = CostModel.from_dict(
        dict(
            descriptor_s=1e-6,
            link_Bps=1e9,
            pack_Bps=2e9,
            unpack_Bps=4e9,
            chunk_s=1e-5,
            staged_request_s=1e-4,
            zero_copy_request_s=2e-5,
            op_s=1e-6,
            overlap=0,  # in sequence (the cpu defaults pipeline: overlap 0.7)
        ),
        kind="x",
    )
    t = m.predict(1000, 10**9, n_chunks=3, n_ops=7)
    assert t["zero-copy"] == pytest.approx(2e-5 + 1000e-6 + 1.0)
    assert t["staged"] == pytest.approx(1e-4 + 3 * (1e-5 + 1e-6) + 7e-6 + 0.5 + 1.0 + 0.25)
    # pipelined chunks: one chunk through every stage, then the slowest stage paces
    p = m.with_values({"overlap": 1}).predict(1000, 10**9, n_chunks=3, n_ops=7)
    assert p["staged"] == pytest.approx(1e-4 + 3 * 1.1e-5 + 7e-6 + 1.75 / 3 + 2 / 3 * 1.0)
    assert p["zero-copy"] == t["zero-copy"]


def test_nixl_md_host_numbers():
    # docs/nixl.md §6: 65,536 x 4 KiB permuted took 122-138 ms; 4,096 x 64 KiB 36-39 ms
    m = CostModel.default("cpu")
    assert 0.110 < m.predict(65536, 256 << 20)["zero-copy"] < 0.145
    assert 0.030 < m.predict(4096, 256 << 20)["zero-copy"] < 0.045


def test_load_env_file_and_overrides(tmp_path, monkeypatch):
    p = tmp_path / "cost.json"
    p.write_text(json.dumps({"cuda": {"descriptor_s": 5e-6}, "cpu": {"link_Bps": 4e9}}))
    monkeypatch.setenv(ENV_VAR, str(p))
    cuda = CostModel.load("cuda")
    assert cuda.descriptor_s == 5e-6
    assert cuda.link_Bps == DEFAULTS["cuda"].link_Bps
    assert cuda.source == str(p)
    cpu = CostModel.load("cpu", overrides={"pack_Bps": 3e9})
    assert (cpu.link_Bps, cpu.pack_Bps) == (4e9, 3e9)
    # a flat file applies to whichever kind is loaded
    q = tmp_path / "flat.json"
    q.write_text(json.dumps({"op_s": 1e-7}))
    assert CostModel.load("cuda", path=q).op_s == 1e-7
    monkeypatch.delenv(ENV_VAR)
    assert CostModel.load("cpu") == DEFAULTS["cpu"]


def test_save_round_trip(tmp_path):
    p = tmp_path / "m.json"
    a = CostModel.default("cuda").with_values({"descriptor_s": 9e-6})
    a.save(p)
    CostModel.default("cpu").save(p)
    doc = json.loads(p.read_text())
    assert set(doc) == {"cpu", "cuda"}
    b = CostModel.load("cuda", path=p)
    assert b.descriptor_s == 9e-6 and b.link_Bps == a.link_Bps


def test_bad_values():
    with pytest.raises(ValueError, match="unknown cost model constants"):
        CostModel.default("cpu").with_values({"bogus": 1})
    with pytest.raises(ValueError, match="out of range"):
        CostModel.default("cpu").with_values({"link_Bps": 0})
    with pytest.raises(ValueError, match="out of range"):
        CostModel.default("cpu").with_values({"overlap": 2})
    with pytest.raises(ValueError, match="no default"):
        CostModel.default("tpu")


def test_choose_for_expansion():
    from pathlib import Path

    from layoutc.compiler.api import compile_plan
    from layoutc.runtime.staging import StagingLayout, expand

    spec = Path(__file__).resolve().parents[2] / "specs" / "vllm_flashinfer.layout"
    # 4 -> 2 with 8 heads of 64 dims: two 4 KiB runs (K, V of two heads) per block and layer
    plan = compile_plan(str(spec), 4, 2, {"num_key_value_heads": 8, "head_dim": 64})
    lp = [("attention",)] * 64
    lay = StagingLayout.build(plan, decode_rank=0, prefill_rank=1, layer_pages=lp)
    rng = np.random.default_rng(0)
    scattered = rng.choice(100_000, 1000, replace=False)
    ex = expand(lay, scattered, rng.choice(100_000, 1000, replace=False))
    assert CostModel.default("cuda").choose_for(ex) == "staged"
    assert CostModel.default("cpu").choose_for(ex) == "staged"
    assert ex.n_posted == ex.n_descriptors == 64 * 2 * 1000
    # 1 -> 1 style: whole pages, consecutive blocks: NIXL merges, zero-copy wins
    plan1 = compile_plan(str(spec), 2, 2, {"num_key_value_heads": 8, "head_dim": 128})
    lay1 = StagingLayout.build(plan1, decode_rank=0, prefill_rank=0, layer_pages=lp)
    ex1 = expand(lay1, np.arange(1000), np.arange(5000, 6000))
    assert ex1.n_posted == 64
    assert CostModel.default("cuda").choose_for(ex1) == "zero-copy"
    assert CostModel.default("cpu").choose_for(ex1) == "zero-copy"


def test_pipelined_and_host_staged_costs():
    """Pipelined chunks cost the slowest stage plus one chunk of the others; staging in host
    memory beside GPU pages adds a device-host copy to the pack and to the unpack stage."""
    m = CostModel.default("cuda").with_values(
        {"pack_Bps": 1e12, "unpack_Bps": 1e12, "link_Bps": 10e9, "bounce_Bps": 20e9}
    )
    zero = m.with_values(
        {"staged_request_s": 0, "chunk_s": 0, "descriptor_s": 0, "op_s": 0, "overlap": 1}
    )
    B = 1 << 30
    link = B / 10e9
    t1, t32 = zero.staged_s(B, 1), zero.staged_s(B, 32)
    assert t1 == pytest.approx(B / 1e12 * 2 + link)  # one chunk: every stage in turn
    assert t32 == pytest.approx(link + (B / 1e12 * 2) / 32)  # the link sets the pace
    host = zero.staged_s(B, 32, bounce=True)
    stage = B / 1e12 + B / 20e9  # kernel + device-host copy
    assert host == pytest.approx(link + 2 * stage / 32)
    seq = zero.with_values({"overlap": 0}).staged_s(B, 32, bounce=True)
    assert seq == pytest.approx(link + 2 * stage)
    # a link-limited scattered request (8 KiB pieces): staged over pinned host memory wins
    n = B // 8192
    assert m.with_values({"overlap": 1}).choose(n, B, 64, 64) == "staged"
