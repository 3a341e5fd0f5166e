"""`layoutc bench`: descriptor counting, the JSON contract, and a reduced end-to-end run."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from layoutc.runtime.costmodel import CostModel
from layoutc.tools import bench
from layoutc.tools.bench import config as bench_config
from layoutc.tools.bench import worker as bench_worker
from rt_plans import SPECS

pytestmark = pytest.mark.timeout(180)


def _compile(spec, p, d, params):
    from layoutc.compiler.api import compile_plan

    return compile_plan(str(SPECS / f"{spec}.layout"), p, d, dict(params))


def test_llama70b_long_request_posts_far_fewer_descriptors_than_vllm():
    plan = _compile("vllm_flashinfer", 8, 4, dict(bench_config.LLAMA70B, num_layers=80))
    rng = np.random.default_rng(0)
    local = rng.choice(16384, 2048, replace=False)
    remote = rng.choice(16384, 2048, replace=False)
    kinds = ["attention"] * 80
    for kind in ("cpu", "cuda"):
        model = CostModel.default(kind)
        auto = bench.count_request(plan, 0, kinds, local, remote, None, model, 16 << 20, "fused")
        zc = bench.count_request(
            plan, 0, kinds, local, remote, None, model, 16 << 20, "fused", "zero-copy"
        )
        # zero-copy: 2 sources x 80 layers x 2048 blocks x (K, V) 4 KiB slices, no merges
        assert zc["posted"] == 2 * 80 * 2048 * 2 == 655_360
        assert {s["strategy"] for s in auto["sources"].values()} == {"staged"}
        # staged: one transfer per 16 MiB chunk of 1.25 GiB per source
        assert auto["posted"] == 2 * 80
        assert auto["posted"] / bench_config.VLLM_V033_LLAMA < 0.01


def test_reduced_bench_run_writes_the_json_contract(tmp_path):
    path = tmp_path / "cpu.json"
    cfg = bench.BenchConfig(
        quick=True,
        json_path=str(path),
        command="layoutc bench (test)",
        progress=False,
        cpu_bytes_per_decode_rank=4 << 20,
        runs=1,
    )
    out = bench.run_bench(cfg, _compile)
    doc = json.loads(path.read_text())
    assert doc == json.loads(json.dumps(out))
    assert doc["errors"] == {}, doc["errors"]
    for key in (
        "expand_us_1000_blocks_64_layers",
        "expand_speedup_vs_loop",
        "descriptors_ratio_vs_vllm_long_request",
        "cpu_scattered_fraction_of_single_descriptor",
    ):
        assert isinstance(doc[key], float) and doc[key] > 0, key
        lo, hi = doc[key + "_spread"]
        assert lo <= doc[key] <= hi
    assert doc["expand_entries"] > 0 and doc["descriptors_ratio_vs_vllm_v020"] > 0
    assert doc["descriptors_llama70b_8to4"] < doc["descriptors_llama70b_8to4_zero_copy"]
    assert set(doc["machine"]) >= {"hostname", "cpu_count", "platform"}
    assert doc["card"] is None and doc["command"] == "layoutc bench (test)"
    cm = doc["cost_model"]
    CostModel.from_dict(cm)  # a valid cost model
    assert cm["link_Bps"] > 0 and cm["descriptor_s"] >= 0
    assert "cpu_scattered_fraction_of_single_descriptor" in doc["targets"]
    table = bench.format_table(doc)
    assert "CPU scattered request / one NIXL descriptor" in table


def test_cli_bench_usage_errors():
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    for args, msg in (
        (["--time-limit", "0"], "--time-limit must be positive"),
        (["--json", "/no/such/dir/x.json"], "no such directory"),
        (["--device", "tpu"], "invalid choice"),
        (["--gpus", "2"], "--gpus needs --device cuda"),
        (["--gpus", "0"], "--gpus must be at least 1"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "layoutc", "bench", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=root,
        )
        assert r.returncode == 2, (args, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr


def _run_section(section, cfg, out, *extra) -> None:
    """Run one bench section as ``run_bench`` would, every wait for a worker bounded (150 s)."""
    import time

    t = time.monotonic()
    run = bench_config.Run(cfg, out, t, t + 150, lambda msg: None, lambda: None)
    section(_compile, run, *extra)


def test_gpu_bench_flow_on_host_memory(tmp_path):
    """The `--device cuda` section's code path (three processes, scattered auto / per-block /
    staged runs verified, contiguous 1 -> 1, cost-model fit), run on host memory with tiny
    sizes: the numbers mean nothing here, the flow must complete."""

    cfg = bench.BenchConfig(
        quick=True,
        device="cuda",
        progress=False,
        gpu_bytes_per_decode_rank=4 << 20,
        gpu_contiguous_bytes=16 << 20,
        gpu_staging_bytes=2 << 20,
        gpu_staging_slots=4,
        runs=1,
        gpu_worker_device="cpu",
    )
    out: dict = {"card": None}
    cm: dict = {}
    _run_section(bench.bench_gpu, cfg, out, cm)
    for key in (
        "gpu_scattered_fraction_of_copy",
        "gpu_scattered_speedup_vs_per_block",
        "gpu_contiguous_fraction_of_copy",
        "gpu_scattered_GBps",
        "gpu_per_block_GBps",
        "gpu_contiguous_GBps",
        "gpu_copy_GBps",
    ):
        assert out[key] > 0 and len(out[key + "_spread"]) == 2, key
    assert out["gpu_contiguous_case"]["chosen"] == ["zero-copy"]
    assert out["gpu_scattered_case"]["chosen"]["zero-copy"] == ["zero-copy"]
    assert out["gpu_scattered_case"]["chosen"]["staged"] == ["staged"]
    model = bench.fit_cost_model("cuda", cm, CostModel.default("cuda"))
    assert model.link_Bps > 0 and 0 <= model.overlap <= 1


def test_cross_gpu_bench_flow_on_host_memory():
    """The `--gpus 2` section's code path (prefill ranks in two processes, decode ranks in
    two others; 1 -> 2 and 2 -> 1 pulled and pushed, zero-copy forced, a contiguous 1 -> 1;
    each variant verified against the pattern of its source rank), run on host memory with
    tiny sizes: the numbers mean nothing here, the flow must complete."""

    cfg = bench.BenchConfig(
        quick=True,
        device="cuda",
        progress=False,
        xgpu_bytes_per_decode_rank=2 << 20,
        xgpu_contiguous_bytes=8 << 20,
        gpu_staging_bytes=2 << 20,
        gpu_staging_slots=4,
        runs=1,
        gpus=2,
        xgpu_devices=("cpu", "cpu"),
    )
    out: dict = {}
    _run_section(bench.bench_cross_gpu, cfg, out)
    for pair in ("1to2", "2to1"):
        for key in ("pull", "push", "pull_zero_copy"):
            assert out[f"xgpu_{pair}_{key}_GBps"] > 0, (pair, key)
            assert out[f"xgpu_{pair}_{key}_fraction_of_peer_copy"] > 0, (pair, key)
        case = out["xgpu_case"]["cases"][pair]
        assert case["pull_zero_copy"]["strategies"] == ["zero-copy"]
        assert all(
            d + c > 0
            for d, c in zip(
                case["pull"]["descriptors_per_rank"], case["pull"]["staged_chunks_per_rank"]
            )
        )
    assert out["xgpu_contiguous_fraction_of_peer_copy"] > 0
    assert out["xgpu_case"]["cases"]["contiguous"]["strategies"] == ["zero-copy"]
    assert "2 GPUs 1->2 scattered pull / peer copy" in bench.format_table(out)


def test_bench_pattern_names_the_source_rank():
    """Prefill pages hold a pattern that includes the rank, so a byte read from the wrong
    prefill rank fails verification (the two-GPU 2 -> 1 case reads from two ranks)."""
    import torch

    t = torch.zeros(64, dtype=torch.uint8)
    bench_worker.fill_pattern(t, 3, 1)
    assert bytes(t[16:40].numpy()) == bytes(bench_worker.pattern_bytes(3, 16, 24, 1))
    assert bytes(t[16:40].numpy()) != bytes(bench_worker.pattern_bytes(3, 16, 24, 0))


def test_link_limited_bench_flow_on_host_memory():
    """The link-limited section's code path (endpoints staging in host memory, each round
    against one descriptor over the same link, zero-copy once, a traced request's per-chunk
    timeline), run on host memory with tiny sizes: the numbers mean nothing here."""
    cfg = bench.BenchConfig(
        quick=True,
        device="cuda",
        progress=False,
        runs=1,
        strategy="staged",  # (auto with the CPU cost model keeps 2 MiB requests zero-copy)
        gpu_worker_device="cpu",
        link_mode="host",
        link_bytes_per_decode_rank=2 << 20,
        link_chunk_bytes=256 << 10,
        link_staging_bytes=1 << 20,
    )
    out: dict = {}
    cm: dict = {}
    _run_section(bench.bench_link, cfg, out, cm)
    for key in (
        "gpu_link_limited_scattered_fraction_of_link",
        "gpu_link_limited_scattered_GBps",
        "gpu_link_GBps",
        "gpu_link_limited_zero_copy_GBps",
    ):
        assert out[key] > 0, key
    case = out["gpu_link_limited_case"]
    assert case["chosen"] == ["staged"] and case["staging"]["memory"] == "host"
    assert case["ucx_trials"] == [] and "pinned host memory" in case["mode"]
    chunks = case["profile_one_staged_request"]["chunks"]
    assert len(chunks) == 2 * case["bytes"] // 2 // (256 << 10)  # every chunk of both ranks
    for row in chunks:
        assert row["source"] == "prefill rank 0" and row["destination"].startswith("decode")
        assert row["pack-start"] <= row["post"] <= row["unpacked"]
    assert "GPU over an emulated link" in bench.format_table(out)


@pytest.mark.parametrize("cross", [False, True], ids=["one-device", "two-devices"])
def test_concurrency_bench_flow_on_host_memory(cross):
    """The closed loop (c requests in flight, each completion replaced at once, c warm-up
    and 20 c measured, destination sets verified), run on host memory with tiny requests;
    ``cross``: the two-GPU placement (prefill on one device, decode on the other, against a
    peer copy), both devices host memory here."""
    cfg = bench.BenchConfig(
        xgpu_devices=("cpu", "cpu"),
        quick=True,
        device="cuda",
        progress=False,
        runs=1,
        gpu_worker_device="cpu",
        gpu_bytes_per_decode_rank=1 << 20,
        concurrency_levels=(1, 3),
        concurrency_request_bytes=1 << 20,
        concurrency_layers=4,
        concurrency_staging_bytes=1 << 20,
        concurrency_staging_slots=4,
    )
    out: dict = {}
    _run_section(functools.partial(bench.bench_concurrency, cross=cross), cfg, out)
    base, of_copy = ("xgpu_concurrency", "peer_copy") if cross else ("gpu_concurrency", "copy")
    assert out[f"{base}_case"]["devices"] == {"prefill": "cpu", "decode": "cpu"}
    for c in (1, 3):
        lv = out[f"{base}_case"]["levels"][str(c)]
        assert lv["requests_measured"] == 20 * c and lv["warm_up"] == c
        assert 0 < out[f"{base}_{c}_p50_ms"] <= out[f"{base}_{c}_p99_ms"]
        assert out[f"{base}_{c}_GBps"] > 0 and out[f"{base}_{c}_fraction_of_{of_copy}"] > 0
        assert sum(lv["strategies"].values()) == 2 * 21 * c  # both decode ranks, every request
    label = "2 GPUs closed loop" if cross else "GPU closed loop"
    assert f"{label}, 1 in flight" in bench.format_table(out)


@pytest.mark.parametrize("cross", [False, True], ids=["one-device", "two-devices"])
def test_engine_shaped_bench_flow_on_host_memory(cross):
    """The engine-shaped cases (every rank a process, block ids per layer kind for the
    hybrid, the first request verified against each source rank's pattern), with small
    models on host memory: the flow must complete and report each case's record;
    ``cross``: the two-GPU placement (keys ``xgpu_...``, against a peer copy)."""
    from layoutc.tools.bench.engines import EngineCase
    from rt_plans import HYBRID

    cases = (
        EngineCase(
            "gpu_llama70b_p8d4_32k",
            "vllm_flashinfer",
            2,
            1,
            512,
            sets=dict(num_key_value_heads=4, head_dim=32, block_size=16, num_layers=3),
        ),
        EngineCase(
            "gpu_nemotron_nano_p4d2",
            "vllm_hybrid_mamba2",
            2,
            1,
            160,
            sets=HYBRID,
            pattern="MEM*EM*",
        ),
    )
    cfg = bench.BenchConfig(
        quick=True,
        device="cuda",
        progress=False,
        runs=1,
        gpu_worker_device="cpu",
        xgpu_devices=("cpu", "cpu"),
        engine_cases=cases,
        engines_staging_bytes=1 << 20,
        engines_copy_bytes=4 << 20,
    )
    out: dict = {}
    _run_section(functools.partial(bench.bench_engines, cross=cross), cfg, out)
    prefix, frac = ("xgpu_", "fraction_of_peer_copy") if cross else ("gpu_", "fraction_of_copy")
    for case in cases:
        rec = out[prefix + case.key.removeprefix("gpu_")]
        assert set(rec) == {frac, "descriptors", "verified", "scaled_down"}
        assert rec[frac] > 0 and rec["descriptors"] > 0
        assert rec["verified"] is True and "of 32768 tokens" in rec["scaled_down"]
    hyb = out[prefix + "nemotron_nano_p4d2_case"]
    assert hyb["kinds"] == {"mamba": 3, "attention": 2}
    assert hyb["blocks"] == {"attention": 10, "mamba": 1}
    assert hyb["devices"] == {"prefill": "cpu", "decode": "cpu"}
    table = bench.format_table(out)
    label = "2 GPUs engine-shaped" if cross else "GPU engine-shaped"
    assert f"{label}: Llama-70B P8->D4 32k / {'peer' if cross else 'torch'} copy" in table
