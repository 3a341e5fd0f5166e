"""The load test of the benchmark suite, small: many concurrent requests, all verified, no leaks.

The full run (1,000 requests) is `benchmarks/load_test.py`; its figures are committed in
benchmarks/results/load-cpu.json.
"""

from __future__ import annotations

import pytest


@pytest.mark.timeout(180)
def test_concurrent_requests_all_verified_no_leaks():
    from layoutc.compiler.api import compile_builtin
    from layoutc.tools.demo import DEMO_SETS, DEMO_SPEC
    from layoutc.tools.loadtest import run

    out = run(
        compile_builtin(DEMO_SPEC, 2, 4, dict(DEMO_SETS)),
        dict(
            requests=60,
            window=8,
            max_len=16,
            layers=4,
            num_blocks=256,
            prefill_tp=2,
            decode_tp=4,
            timeout_s=30.0,
            seed=3,
        ),
    )
    assert out["failures"] == 0, out["failure_examples"]
    assert out["handle_leaks"] == []
    assert out["verified_bytes"] == out["bytes_posted"] > 0
    assert out["latency_ms_p50"] is not None
