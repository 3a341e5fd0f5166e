"""`layoutc demo` engine (run_demo) and `layoutc doctor`: real processes, real NIXL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from layoutc.tools.demo import DemoError, run_demo
from layoutc.tools.doctor import run_doctor
from rt_plans import HYBRID, compiled

pytestmark = pytest.mark.timeout(180)
SMALL = dict(requests=4, layers=3, blocks=6, progress=False)


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_demo_verifies_every_byte(mode):
    plan = compiled("vllm_hybrid_mamba2", 1, 2, HYBRID)
    res = run_demo(plan, mode=mode, **SMALL)
    assert res.ok and res.bytes > 0 and res.descriptors > 0
    # every byte of both decode ranks' buffers was compared
    per_rank = sum(plan.decode.page(p).buffer_bytes(1) for p in ("attention", "mamba"))
    assert res.verified_bytes > 2 * per_rank
    assert res.prefill_completions == {0: 4}
    if mode == "pull":  # each request: one DONE from each of the prefill rank's readers
        assert res.notifications[0] == 4 * len(plan.readers(0))
    assert "0 wrong" in res.verified_line()


@pytest.mark.parametrize(
    "inject, mode, expected",
    [
        (
            "kill-prefill",
            "pull",
            ["injected: killed prefill rank 0", "decode rank 0: request 'req-2': prefill rank 0"],
        ),
        (
            "kill-decode",
            "push",
            ["injected: killed decode rank 1", "prefill rank 0: request 'req-2': decode rank 1"],
        ),
        (
            "kill-decode",
            "pull",
            ["prefill rank 0: request 'req-2' timed out after 3.0 s waiting for decode rank 1"],
        ),
        (
            "bad-blocks",
            "pull",
            ["request 'req-2': remote (prefill) block ids out of range", "(at 3), -1 (at 5)"],
        ),
        (
            "spec-mismatch",
            "pull",
            [
                "decode rank 0: prefill rank 0 has params.block_size 16 but this plan expects 32",
                "prefill rank 0: decode rank 0 has params.block_size 32 but this plan expects 16",
            ],
        ),
    ],
)
def test_demo_injected_faults_fail_clearly(inject, mode, expected):
    plan = compiled("vllm_hybrid_mamba2", 1, 2, HYBRID)
    with pytest.raises(DemoError) as ei:
        run_demo(plan, mode=mode, inject=inject, timeout_s=3.0, **SMALL)
    msg = str(ei.value)
    for part in expected:
        assert part in msg, msg
    assert "verified" not in msg
    # the ranks reported the failure themselves: the demo's watchdog did not have to stop it
    assert "without completing" not in msg and "timed out after 120 s" not in msg


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "layoutc", "demo", *args],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
        cwd=str(Path(__file__).resolve().parents[2]),
    )


def test_cli_demo_prints_verified_only_on_success():
    small = [
        "--prefill-tp",
        "1",
        "--decode-tp",
        "2",
        "--requests",
        "3",
        "--layers",
        "2",
        "--blocks",
        "4",
        "--quiet",
    ]
    ok = _cli(*small)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert any(line.startswith("verified: ") for line in lines), ok.stdout
    bad = _cli(*small, "--inject", "bad-blocks", "--timeout", "5")
    assert bad.returncode not in (0, 2), bad.stderr
    assert "verified" not in bad.stdout
    assert "block ids out of range" in bad.stderr


def test_doctor_live_transfer():
    from layoutc.runtime import nixl_compat

    report = run_doctor(live=True)
    assert report.facts["nixl"]["version"] == nixl_compat.load().version
    live = report.facts["live"]["cpu"]
    assert live["verified"], live
    assert live["read1"] > 0 and live["write1"] > 0 and live["readn"] > 0
    assert live["transports"].get("READ"), live  # UCX named the transport it used
    text = "\n".join(report.lines)
    assert "live transfer (host memory, 2 processes, verified)" in text
    assert report.code == (1 if report.warnings else 0)
    assert report.code == 0, report.warnings


@pytest.mark.timeout(200)
@pytest.mark.parametrize(
    "inject,says",
    [
        ("kill-prefill", "prefill rank 0"),
        ("kill-decode", "decode rank 1"),
        ("spec-mismatch", "params.block_size"),
    ],
)
def test_cli_demo_injected_faults_exit_nonzero_within_bounds(inject, says):
    run = _cli(
        "--prefill-tp", "1", "--decode-tp", "2", "--requests", "4", "--layers", "2",
        "--blocks", "4", "--quiet", "--timeout", "5", "--inject", inject,
    )  # fmt: skip
    assert run.returncode not in (0, 2), run.stderr
    assert not any(line.startswith("verified:") for line in run.stdout.splitlines())
    assert says in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert "without completing" not in run.stderr  # not stopped by the demo's watchdog


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_demo_staged_strategy_verifies_every_byte(mode):
    plan = compiled("vllm_hybrid_mamba2", 1, 2, HYBRID)
    res = run_demo(plan, mode=mode, strategy="staged", **SMALL)
    assert res.ok and res.strategy == "staged"
    # every (request, initiator rank) pair went staged; one chunk per peer at least
    initiators = plan.decode_tp if mode == "pull" else plan.prefill_tp
    assert res.strategies == {"staged": 4 * initiators}
    assert res.chunks >= 4 * plan.decode_tp
    assert "strategy staged" in res.summary()
    assert f"by strategy: staged {4 * initiators}" in res.summary()
    assert res.prefill_completions == {0: 4}


def test_cli_demo_strategy_choice_is_validated():
    bad = _cli("--strategy", "fastest", "--quiet")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


@pytest.mark.parametrize(
    "args, says",
    [
        (["--decode-gpus", "1"], "--decode-gpus needs --device cuda"),
        (["--prefill-gpus", "0,1"], "--prefill-gpus needs --device cuda"),
        (["--device", "cuda", "--decode-gpus", "one"], "expected GPU indices like 0 or 0,1"),
    ],
)
def test_cli_demo_gpu_placement_is_validated(args, says):
    bad = _cli(*args, "--quiet")
    assert bad.returncode == 2, bad.stderr
    assert says in bad.stderr and "Traceback" not in bad.stderr


def test_demo_summary_says_where_ranks_ran():
    plan = compiled("vllm_hybrid_mamba2", 1, 2, HYBRID)
    res = run_demo(plan, requests=2, layers=2, blocks=4, progress=False)
    assert res.placement == "cpu" and "placement: cpu" in res.summary()


def test_doctor_reports_gpu_pairs_without_peer_access():
    """The peer-access report of a multi-GPU host, from what CUDA answers (here a stand-in
    for a 3-GPU host where GPU 2 reaches no other GPU directly)."""
    from types import SimpleNamespace

    from layoutc.tools.doctor import _peer_access

    cuda = SimpleNamespace(can_device_access_peer=lambda i, j: 2 not in (i, j))
    lines, warnings = [], []
    _peer_access(SimpleNamespace(cuda=cuda), 3, lines, warnings)
    assert lines == [
        "GPU peer access (prefill and decode ranks on different GPUs): 2 of 6 ordered pairs direct"
    ]
    assert len(warnings) == 1 and "0->2, 1->2, 2->0, 2->1" in warnings[0]
    lines, warnings = [], []
    _peer_access(
        SimpleNamespace(cuda=SimpleNamespace(can_device_access_peer=lambda i, j: True)),
        2,
        lines,
        warnings,
    )
    assert warnings == [] and "2 of 2 ordered pairs direct" in lines[0]


def test_ranks_are_placed_round_robin_on_the_listed_gpus():
    from layoutc.tools.demo import rank_devices

    assert rank_devices("cuda", 4, [0, 1]) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert rank_devices("cuda", 2, [1]) == ["cuda:1", "cuda:1"]
    assert rank_devices("cpu", 3, [1]) == ["cpu", "cpu", "cpu"]
