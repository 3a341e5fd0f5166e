"""vLLM's own NixlConnector in real vLLM P/D on tiny fp32 models: the reference behaviour.

Each case prefills a batch of prompts (1, 127, 128, 129 and 1500 tokens: both sides of the
CPU block size of 128, and a long one) on a prefill engine, decodes 16 greedy tokens each on a
decode engine from the transferred KV, and compares tokens and their log-probabilities with a
single engine. The same cases, with
the connector swapped, check a drop-in replacement (see ``engines.connector_config``).

What NixlConnector gives, and so what these tests assert:
- tiny Llama P1->D1, P1->D2, P2->D1, and hybrid NemotronH (n_groups=8) P1->D2: decode tokens
  equal the single engine's and log-probabilities agree to :data:`pd_driver.LOGPROB_TOLERANCE`;
- hybrid with n_groups=1 at P1->D2: recorded, not asserted (vLLM replicates the single B/C
  group per rank at TP 2, which its transfer offsets do not expect);
- prefill block size 64, decode 128: recorded, not asserted (its receive post-processing
  regroups token rows, which is not how CPU attention stores a page);
- tamper control: a prefill engine with other weights makes decode differ, so decode really
  uses the transferred KV.

Tests are ordered so consecutive ones share engines (the pool restarts only what changes).
Wall times of engine starts, baselines and P/D rounds show in pytest's summary.
"""

from __future__ import annotations

import time

import pytest
from engines import Completion
from models import LLAMA, LLAMA_OTHER, NEMOTRON_H, NEMOTRON_H_G1, ModelSpec
from pd_driver import (
    PDResult,
    assert_same_as_single,
    compare,
    connect,
    make_prompts,
    run_pd,
)
from pool import EngineSpec, spec

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

MAX_TOKENS = 16
PROMPTS = make_prompts()

P1 = spec(LLAMA, 1, "kv_producer")
P2 = spec(LLAMA, 2, "kv_producer")
D2 = spec(LLAMA, 2, "kv_consumer")
# The tamper control pairs D1 with a prefill engine of other weights (another model path):
# NixlConnector's compatibility hash covers the model path, so D1 does not enforce it.
D1 = spec(LLAMA, 1, "kv_consumer", extra={"enforce_handshake_compat": False})
P1_OTHER = spec(LLAMA_OTHER, 1, "kv_producer")
# Prefill in 64-token blocks; D1 runs the CPU default of 128.
P1_BS64 = spec(LLAMA, 1, "kv_producer", block_size=64)
# vLLM's Mamba layers crash on CPU with prefix caching (off by default in the pool).
HYBRID_P1 = spec(NEMOTRON_H, 1, "kv_producer")
HYBRID_D2 = spec(NEMOTRON_H, 2, "kv_consumer")
HYBRID_G1_P1 = spec(NEMOTRON_H_G1, 1, "kv_producer")
HYBRID_G1_D2 = spec(NEMOTRON_H_G1, 2, "kv_consumer")


def _pd(
    engine_pool, baselines, report, model: ModelSpec, p: EngineSpec, d: EngineSpec, case: str
) -> tuple[list[PDResult], list[Completion]]:
    """Two P/D rounds of :data:`PROMPTS` after a warm-up round trip (the handshake), and the
    baseline; records per prompt whether the tokens match and the log-probability gap."""
    prefill, decode = engine_pool.get(p, d)
    expected = baselines.get(model, prefill if p.model == model else decode, PROMPTS, MAX_TOKENS)
    failed, seconds = connect(prefill, decode)
    report.record(f"P/D {case} warm-up ({failed} failed attempts)", seconds)
    rounds = []
    for i in range(2):
        t0 = time.monotonic()
        result = run_pd(prefill, decode, PROMPTS, MAX_TOKENS)
        report.record(
            f"P/D {case} round {i + 1} (prefill {result.prefill_s:.2f} s, "
            f"decode {result.decode_s:.2f} s)",
            time.monotonic() - t0,
        )
        assert [c.finish_reason for c in result.decode] == ["length"] * len(PROMPTS)
        rounds.append(result)
    report.outcome(
        f"NixlConnector {case}",
        "; ".join(
            f"{len(p)} tokens: {compare(got, want)}"
            for p, got, want in zip(PROMPTS, rounds[0].decode, expected)
        ),
    )
    return rounds, expected


def _assert_equal(rounds: list[PDResult], expected: list[Completion]) -> None:
    assert_same_as_single(rounds, expected, PROMPTS)


def test_llama_p1_to_d2(engine_pool, baselines, report):
    _assert_equal(*_pd(engine_pool, baselines, report, LLAMA, P1, D2, "llama P1->D2"))


def test_llama_p1_to_d1(engine_pool, baselines, report):
    _assert_equal(*_pd(engine_pool, baselines, report, LLAMA, P1, D1, "llama P1->D1"))


def test_llama_p2_to_d1(engine_pool, baselines, report):
    _assert_equal(*_pd(engine_pool, baselines, report, LLAMA, P2, D1, "llama P2->D1"))


def test_tamper_control(engine_pool, baselines, report):
    """Prefill with other weights: decode must differ wherever it loaded KV (every prompt
    longer than one token; a one-token prompt leaves decode nothing to load)."""
    rounds, expected = _pd(
        engine_pool, baselines, report, LLAMA, P1_OTHER, D1, "tamper (llama-other P1->D1)"
    )
    for prompt, got, want in zip(PROMPTS, rounds[0].decode, expected):
        if len(prompt) > 1:
            assert got.token_ids != want.token_ids, (
                f"prompt of {len(prompt)} tokens: decode ignored the KV"
            )


def test_llama_block_size_64_to_128(engine_pool, baselines, report):
    """Recorded only: see the module docstring and the summary's outcome line."""
    _pd(engine_pool, baselines, report, LLAMA, P1_BS64, D1, "llama P1 bs64->D1 bs128")


def test_hybrid_p1_to_d2(engine_pool, baselines, report):
    _assert_equal(
        *_pd(engine_pool, baselines, report, NEMOTRON_H, HYBRID_P1, HYBRID_D2, "hybrid P1->D2")
    )


def test_hybrid_n_groups_1_p1_to_d2(engine_pool, baselines, report):
    """Recorded only: see the module docstring and the summary's outcome line."""
    _pd(
        engine_pool,
        baselines,
        report,
        NEMOTRON_H_G1,
        HYBRID_G1_P1,
        HYBRID_G1_D2,
        "hybrid n_groups=1 P1->D2",
    )
