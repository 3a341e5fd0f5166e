"""LayoutcConnector in real vLLM P/D on tiny fp32 models (CPU): decode must reproduce a single
engine.

Each transfer case prefills a batch of prompts (1, 127, 128, 129 and 1500 tokens: both sides
of the CPU block size of 128, and a long one) on a prefill engine in one ``generate`` call,
decodes 16 greedy tokens each on a decode engine from the transferred KV (the prefill's
``kv_transfer_params`` passed unchanged), and compares tokens and sampled-token
log-probabilities with a single engine.  Decode engines run vLLM's default
``kv_load_failure_policy="fail"``, so a load that fails shows as ``finish_reason == "error"``,
never as a silent recompute; and each round's ``vllm:nixl_*`` metrics must show one transfer
per prompt and decode rank with no failure.

Tests are ordered so consecutive ones share engines (the pool restarts only what changes).
"""

from __future__ import annotations

import copy
import signal
import time
from typing import Any

import pytest
from engines import PREFILL_PARAMS, Completion, Engine, EngineError
from models import LLAMA, LLAMA_KV6, LLAMA_OTHER, NEMOTRON_H, NEMOTRON_H_G1, ModelSpec
from pd_driver import (
    LOGPROB_TOLERANCE,
    PDResult,
    assert_same_as_single,
    compare,
    connect,
    logprob_gap,
    make_prompts,
    run_pd,
)
from pool import EngineSpec, spec
from probes import block_checksums

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]

MAX_TOKENS = 16
PROMPTS = make_prompts()

CONNECTOR = {"connector": "LayoutcConnector", "module_path": "layoutc.connectors.vllm"}
STATS = {"disable_log_stats": False}
DS = {"VLLM_SSM_CONV_STATE_LAYOUT": "DS"}
SD = {"VLLM_SSM_CONV_STATE_LAYOUT": "SD"}
IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
"""The engine core runs in the LLM process: a TP t engine is t + 1 processes, so P2 and D3
(4 + 5 processes otherwise) fit the 2-core box's budget of 7."""


AUTH_KEY = "layoutc-vllm-tests-key-0123456789"
"""Every LayoutcConnector engine here holds this pre-shared key (handshakes and notifications
authenticated), except the one that tests a peer holding another."""


def lc(
    model: ModelSpec,
    tp: int,
    role: str,
    *,
    extra: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    llm: dict[str, Any] | None = None,
    **kwargs: Any,
) -> EngineSpec:
    """An engine with LayoutcConnector holding ``AUTH_KEY`` (decode engines report
    metrics)."""
    llm_kwargs = {**(STATS if role == "kv_consumer" else {}), **(llm or {})}
    return spec(
        model,
        tp,
        role,
        **CONNECTOR,
        extra={"auth_key": AUTH_KEY, **(extra or {})},
        env=env or {},
        llm_kwargs=llm_kwargs,
        **kwargs,
    )


P1 = lc(LLAMA, 1, "kv_producer")
P2 = lc(LLAMA, 2, "kv_producer")
# kv_both: every worker holds a prefill and a decode endpoint (num_threads: a NixlConnector
# setting the connector reports, once, as ignored)
D2 = lc(LLAMA, 2, "kv_both", extra={"num_threads": 4}, llm=STATS)
# D1 also decodes from the tamper engine (another model path): compatibility check off.
D1 = lc(LLAMA, 1, "kv_consumer", extra={"enforce_handshake_compat": False})
P1_OTHER = lc(LLAMA_OTHER, 1, "kv_producer")
P1_WRONG_KEY = lc(LLAMA, 1, "kv_producer", extra={"auth_key": "another-key-0123456789abcdef"})
P1_BS64 = lc(LLAMA, 1, "kv_producer", block_size=64)
KV6_P2 = lc(LLAMA_KV6, 2, "kv_producer", env=IN_PROCESS)
# A worker of an in-process TP engine answers handshakes from its transfer thread, which vLLM's
# busy-polling worker loop can starve on 2 cores for tens of seconds: a longer handshake timeout
# (default 30 s) keeps this case about the transfer, not about that latency.
KV6_D3 = lc(LLAMA_KV6, 3, "kv_consumer", env=IN_PROCESS, extra={"handshake_timeout_s": 120})
HYBRID_P1 = lc(NEMOTRON_H, 1, "kv_producer", env=DS)
HYBRID_D2 = lc(NEMOTRON_H, 2, "kv_consumer", env=DS)
G1_P1 = lc(NEMOTRON_H_G1, 1, "kv_producer", env=SD)
G1_D2 = lc(NEMOTRON_H_G1, 2, "kv_consumer", env=SD)
D1_PC = lc(
    LLAMA,
    1,
    "kv_consumer",
    extra={"enforce_handshake_compat": False},
    enable_prefix_caching=True,
    env={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"},
)


def _metric(engine: Engine, name: str, field: str) -> float:
    """A metric summed over its label sets (0 when absent)."""
    return float(sum(m.get(field, 0) or 0 for m in engine.metrics(name) if m["name"] == name))


def transfer_counts(engine: Engine) -> tuple[int, int, int]:
    """(transfers, bytes, failed transfers) a decode engine reported so far."""
    return (
        int(_metric(engine, "vllm:nixl_bytes_transferred", "count")),
        int(_metric(engine, "vllm:nixl_bytes_transferred", "sum")),
        int(_metric(engine, "vllm:nixl_num_failed_transfers", "value")),
    )


def _pd(
    engine_pool,
    baselines,
    report,
    model: ModelSpec,
    p: EngineSpec,
    d: EngineSpec,
    case: str,
    prompts: list[list[int]] = PROMPTS,
) -> tuple[list[PDResult], list[Completion]]:
    """A warm-up round trip (the handshake), two P/D rounds and the baseline; every round must
    finish every request normally with one transfer per prompt and decode rank."""
    prefill, decode = engine_pool.get(p, d)
    expected = baselines.get(model, prefill if p.model == model else decode, prompts, MAX_TOKENS)
    failed, seconds = connect(prefill, decode)
    report.record(f"LayoutcConnector {case} warm-up ({failed} failed attempts)", seconds)
    rounds = []
    for i in range(2):
        before = transfer_counts(decode)
        t0 = time.monotonic()
        result = run_pd(prefill, decode, prompts, MAX_TOKENS)
        report.record(
            f"LayoutcConnector {case} round {i + 1} (prefill {result.prefill_s:.2f} s, "
            f"decode {result.decode_s:.2f} s)",
            time.monotonic() - t0,
        )
        after = transfer_counts(decode)
        assert [c.finish_reason for c in result.decode] == ["length"] * len(prompts)
        assert after[0] - before[0] == len(prompts) * d.tp, (before, after)
        assert after[2] == before[2], "failed transfers"
        rounds.append(result)
    report.outcome(
        f"LayoutcConnector {case}",
        "; ".join(
            f"{len(p)} tokens: {compare(got, want)}"
            for p, got, want in zip(prompts, rounds[0].decode, expected)
        ),
    )
    return rounds, expected


def _assert_equal(
    rounds: list[PDResult], expected: list[Completion], prompts: list[list[int]] = PROMPTS
) -> None:
    assert_same_as_single(rounds, expected, prompts)


# -- attention: TP pairs -------------------------------------------------------------------


def test_llama_p1_to_d2(engine_pool, baselines, report):
    _assert_equal(*_pd(engine_pool, baselines, report, LLAMA, P1, D2, "llama P1->D2"))
    _, decode = engine_pool.get(P1, D2)
    log = decode.log_path.read_text(errors="replace")
    assert "LayoutcConnector ignores NixlConnector's setting 'num_threads'" in log


def test_metrics_use_nixl_connector_names(engine_pool):
    """The decode engine reports its transfers in NixlConnector's four histograms."""
    prefill, decode = engine_pool.get(P1, D2)
    run_pd(prefill, decode, PROMPTS[1:2], 2)
    found = {m["name"]: m for m in decode.metrics("vllm:nixl_")}
    for name in (
        "vllm:nixl_xfer_time_seconds",
        "vllm:nixl_post_time_seconds",
        "vllm:nixl_bytes_transferred",
        "vllm:nixl_num_descriptors",
    ):
        assert name in found, sorted(found)
        assert _metric(decode, name, "count") > 0 and _metric(decode, name, "sum") > 0, name


def test_llama_p1_to_d1(engine_pool, baselines, report):
    _assert_equal(*_pd(engine_pool, baselines, report, LLAMA, P1, D1, "llama P1->D1"))


# -- untrusted kv_transfer_params --------------------------------------------------------------


def test_forged_params_fail_only_their_request(engine_pool, baselines, report):
    """Forged ``kv_transfer_params`` (a host not allowed, block ids beyond the prefill's
    registration, wrong types) end their own request with an error (policy ``fail``); a valid
    request in the same batch decodes as a single engine does."""
    prefill, decode = engine_pool.get(P1, D1)
    prompts = make_prompts([300, 300, 300, 300, 300], seed=7)
    expected = baselines.get(LLAMA, prefill, prompts[:1], MAX_TOKENS)
    connect(prefill, decode)
    pre = prefill.generate(
        prompts, {"max_tokens": 1}, [{"do_remote_decode": True} for _ in prompts]
    )
    params = [copy.deepcopy(c.kv_transfer_params) for c in pre]
    params[1]["remote_host"] = "10.255.255.1"
    params[2]["remote_block_ids"] = [[10**7 + i for i in range(3)]]
    params[3]["remote_port"] = "side-channel"
    params[4]["remote_block_ids"] = "all of them"
    dec = decode.generate(prompts, {"max_tokens": MAX_TOKENS}, params)
    assert dec[0].finish_reason == "length"
    assert dec[0].token_ids == expected[0].token_ids
    assert [c.finish_reason for c in dec[1:]] == ["error"] * 4
    report.outcome(
        "LayoutcConnector forged kv_transfer_params",
        "valid request as a single engine; " + ", ".join(c.finish_reason or "" for c in dec[1:]),
    )


def test_a_prefill_with_another_key_is_refused(engine_pool, report):
    """A prefill engine holding another ``auth_key``: neither side proves the key the other
    holds, so the handshake is refused, decode's requests end with an error (policy
    ``fail``) and no byte is loaded."""
    prefill, decode = engine_pool.get(P1_WRONG_KEY, D1)
    prompts = make_prompts([300, 129], seed=8)
    before = transfer_counts(decode)
    t0 = time.monotonic()
    result = run_pd(prefill, decode, prompts, MAX_TOKENS)
    seconds = time.monotonic() - t0
    after = transfer_counts(decode)
    assert [c.finish_reason for c in result.decode] == ["error", "error"]
    assert after[1] == before[1], "bytes were loaded from a peer without the key"
    report.outcome(
        "LayoutcConnector prefill with another auth_key",
        f"both requests: error after {seconds:.1f} s; nothing loaded",
    )


def test_tamper_control(engine_pool, baselines, report):
    """Prefill with other weights: decode must differ wherever it loaded KV (every prompt
    longer than one token; decode recomputes a one-token prompt's only token)."""
    rounds, expected = _pd(
        engine_pool, baselines, report, LLAMA, P1_OTHER, D1, "tamper (llama-other P1->D1)"
    )
    for prompt, got, want in zip(PROMPTS, rounds[0].decode, expected):
        if len(prompt) > 1:
            assert got.token_ids != want.token_ids, (
                f"prompt of {len(prompt)} tokens: decode ignored the transferred KV"
            )


def test_llama_p2_to_d1(engine_pool, baselines, report):
    _assert_equal(*_pd(engine_pool, baselines, report, LLAMA, P2, D1, "llama P2->D1"))


# -- different block sizes -------------------------------------------------------------------


def test_different_block_sizes(engine_pool, baselines, report):
    """Prefill in 64-token blocks, decode in 128 (vLLM's NixlConnector scrambles K and V of
    CPU pages here: see test_nixl_reference)."""
    _assert_equal(
        *_pd(engine_pool, baselines, report, LLAMA, P1_BS64, D1, "llama P1 bs64->D1 bs128")
    )


# -- neither TP divides the other --------------------------------------------------------------


def test_neither_tp_divides_the_other(engine_pool, baselines, report):
    """6 KV heads, prefill TP 2 (3 heads a rank) -> decode TP 3 (2 heads a rank): each decode
    rank reads from one or both prefill ranks (vLLM's NixlConnector refuses this pair)."""
    _assert_equal(
        *_pd(engine_pool, baselines, report, LLAMA_KV6, KV6_P2, KV6_D3, "llama-kv6 P2->D3")
    )


# -- prefix caching on decode ----------------------------------------------------------------


def test_decode_prefix_cache_loads_only_missing_blocks(engine_pool, baselines, report):
    """Decode with prefix caching: a request sharing 1024 tokens (8 blocks) with an earlier one
    loads only its 4 other blocks, and the shared blocks stay as they are -- even when that
    request is prefilled by an engine of other weights, whose pages would differ."""
    prefill, other, decode = engine_pool.get(P1, P1_OTHER, D1_PC)
    a = make_prompts([1500], seed=101)[0]
    b = a[:1024] + make_prompts([476], seed=102)[0]
    c = a[:1024] + make_prompts([476], seed=103)[0]
    expected = baselines.get(LLAMA, prefill, [a, b], MAX_TOKENS)
    connect(prefill, decode)
    connect(other, decode)
    per_block = 4 * 128 * 2 * 2 * 32 * 4  # layers x tokens x heads x (K, V) x head size x fp32
    for prompt, want in zip([a, b], expected):
        before = transfer_counts(decode)
        got = run_pd(prefill, decode, [prompt], MAX_TOKENS).decode[0]
        after = transfer_counts(decode)
        assert got.token_ids == want.token_ids, f"{len(prompt)} tokens: {compare(got, want)}"
        assert logprob_gap(got, want) <= LOGPROB_TOLERANCE
        moved = (after[1] - before[1]) // per_block
        assert moved == (12 if prompt is a else 4), f"moved {moved} blocks"
    # c shares a's first 8 blocks; its other 4 come from the other weights' prefill
    sums_before = decode.collective_rpc(block_checksums)[0]
    before = transfer_counts(decode)
    run_pd(other, decode, [c], MAX_TOKENS)
    after = transfer_counts(decode)
    sums_after = decode.collective_rpc(block_checksums)[0]
    changed = [i for i, (x, y) in enumerate(zip(sums_before, sums_after)) if x != y]
    assert (after[1] - before[1]) // per_block == 4
    assert len(changed) == 4, f"blocks changed: {changed}"
    report.outcome(
        "LayoutcConnector decode prefix cache",
        f"shared 8 blocks kept, 4 moved; blocks written by the tampered request: {changed}",
    )


# -- hybrid Mamba2 -------------------------------------------------------------------------------


def test_hybrid_p1_to_d2(engine_pool, baselines, report):
    """NemotronH hybrid (n_groups=8), conv state in the DS layout."""
    _assert_equal(
        *_pd(engine_pool, baselines, report, NEMOTRON_H, HYBRID_P1, HYBRID_D2, "hybrid P1->D2")
    )


def test_hybrid_n_groups_1_p1_to_d2(engine_pool, baselines, report):
    """n_groups=1: at TP 2 vLLM holds the one B/C group on both ranks (vLLM's NixlConnector
    reads the wrong B/C bytes here: see test_nixl_reference); conv state in the SD layout."""
    _assert_equal(
        *_pd(
            engine_pool,
            baselines,
            report,
            NEMOTRON_H_G1,
            G1_P1,
            G1_D2,
            "hybrid n_groups=1 P1->D2 (SD conv)",
        )
    )


# -- configuration ---------------------------------------------------------------------------


def test_a_spec_that_does_not_fit_is_refused_at_start(engine_pool, vllm_dir):
    """A layout spec that cannot describe the engine's cache stops the engine at start-up with
    a message naming what is missing."""
    bad = lc(LLAMA, 1, "kv_consumer", extra={"layout_spec": "vllm_hybrid_mamba2"})
    with pytest.raises(EngineError) as info:
        engine_pool.get(bad)
    text = str(info.value)
    assert "layout spec 'vllm_hybrid_mamba2'" in text and "mamba_num_heads" in text, text[-3000:]


# -- failures ----------------------------------------------------------------------------------

# Prefill engines of their own, so that killing or freezing them leaves P1 alone.
P1_KILL = lc(LLAMA, 1, "kv_producer", extra={"kv_lease_duration": 301})
P1_FREEZE = lc(LLAMA, 1, "kv_producer", extra={"kv_lease_duration": 302})
# A 4 s lease and 16 blocks (15 usable): a later prefill reuses the blocks of an expired one.
LEASE_S = 4
P1_LEASE = lc(
    LLAMA,
    1,
    "kv_producer",
    extra={"kv_lease_duration": LEASE_S},
    llm={"num_gpu_blocks_override": 16, "max_model_len": 1536},
)
D1_RECOMPUTE = lc(LLAMA, 1, "kv_consumer", kv_fields={"kv_load_failure_policy": "recompute"})
D1_INPROC = lc(LLAMA, 1, "kv_consumer", env=IN_PROCESS, extra={"handshake_timeout_s": 60})


def _prefill(prefill: Engine, prompts: list[list[int]]) -> list[dict[str, Any]]:
    pre = prefill.generate(prompts, {"max_tokens": 1}, [dict(PREFILL_PARAMS) for _ in prompts])
    assert all(c.kv_transfer_params for c in pre)
    return [c.kv_transfer_params for c in pre]


def _prefill_killed(engine_pool, baselines, report, d: EngineSpec) -> list[Completion]:
    prefill, decode = engine_pool.get(P1_KILL, d)
    expected = baselines.get(LLAMA, decode, PROMPTS, MAX_TOKENS)
    connect(prefill, decode)
    params = _prefill(prefill, PROMPTS)
    engine_pool.kill(P1_KILL)
    before = transfer_counts(decode)
    t0 = time.monotonic()
    dec = decode.generate(PROMPTS, {"max_tokens": MAX_TOKENS}, params)
    report.record(f"decode from a killed prefill ({d.label})", time.monotonic() - t0)
    assert transfer_counts(decode)[2] > before[2], "no failed transfer reported"
    return dec if d is D1 else [*dec, *expected]


def test_prefill_killed_under_recompute(engine_pool, baselines, report):
    """The prefill engine dies after returning its kv_transfer_params: decode recomputes and
    gives a single engine's tokens."""
    out = _prefill_killed(engine_pool, baselines, report, D1_RECOMPUTE)
    dec, expected = out[: len(PROMPTS)], out[len(PROMPTS) :]
    assert [c.finish_reason for c in dec] == ["length"] * len(PROMPTS)
    _assert_equal([PDResult([], dec, 0, 0)], expected)


def _lease_case(engine_pool, baselines, d: EngineSpec) -> tuple[list[Completion], list[Completion]]:
    """Prefill ``a``, let its lease end, prefill ``b`` (which takes ``a``'s freed blocks),
    then decode both with their params: (decode results, single-engine results)."""
    prefill, decode = engine_pool.get(P1_LEASE, d)
    a, b = make_prompts([1400, 1400], seed=31)
    expected = baselines.get(LLAMA, decode, [a, b], MAX_TOKENS)
    connect(prefill, decode)
    params_a = _prefill(prefill, [a])[0]
    time.sleep(LEASE_S + 3)  # the prefill keeps stepping while it holds blocks: the lease ends
    params_b = _prefill(prefill, [b])[0]
    reused = set(params_a["remote_block_ids"][0]) & set(params_b["remote_block_ids"][0])
    assert reused, "the second prefill did not take the first one's blocks"
    return decode.generate([a, b], {"max_tokens": MAX_TOKENS}, [params_a, params_b]), expected


def test_lease_ended_under_recompute(engine_pool, baselines, report):
    """Decode comes after the prefill's lease ended and its blocks were reused: it never reads
    them (the request recomputes) and gives a single engine's tokens."""
    dec, expected = _lease_case(engine_pool, baselines, D1_RECOMPUTE)
    assert [c.finish_reason for c in dec] == ["length", "length"]
    for got, want in zip(dec, expected):
        assert got.token_ids == want.token_ids
        assert logprob_gap(got, want) <= LOGPROB_TOLERANCE
    report.outcome("LayoutcConnector lease ended (recompute)", "decode as a single engine")


# Decode heartbeats every kv_lease_duration // 6 of its own setting (vLLM's scheduler) and a
# heartbeat extends the prefill's lease by 2/3 of the prefill's: both sides use the same
# duration, as the connector's docs require.  A prefill of its own with a 10 s lease: on the
# loaded 2-core box one renewal can wait seconds for its answer (a prefill holding blocks keeps
# stepping), which a 4 s lease does not survive.  A margin of 0.5 s (default 2) leaves room for
# a step between two heartbeats.
HB_LEASE_S = 10
P1_HB = lc(LLAMA, 1, "kv_producer", extra={"kv_lease_duration": HB_LEASE_S})
D1_HOLD = lc(
    LLAMA,
    1,
    "kv_consumer",
    extra={"kv_lease_duration": HB_LEASE_S, "lease_margin_s": 0.5},
    llm={"max_num_seqs": 1},
)


def test_heartbeats_keep_a_queued_request_leased(engine_pool, baselines, report):
    """A decode engine that runs one request at a time holds a P/D request in its queue
    longer than the prefill's lease: its heartbeats renew the lease (over the side channel),
    so the request still loads its KV -- one transfer, no failure -- and decodes as a single
    engine does."""
    prefill, decode = engine_pool.get(P1_HB, D1_HOLD)
    a = make_prompts([1400], seed=41)[0]
    filler = make_prompts([16], seed=42)[0]
    expected = baselines.get(LLAMA, decode, [a], MAX_TOKENS)
    connect(prefill, decode)
    params = _prefill(prefill, [a])[0]
    before = transfer_counts(decode)
    t0 = time.monotonic()
    dec = decode.generate(
        [filler, a], [{"max_tokens": 4000}, {"max_tokens": MAX_TOKENS}], [None, params]
    )
    held = time.monotonic() - t0
    after = transfer_counts(decode)
    report.record("request held in the decode queue (heartbeats)", held)
    assert held > HB_LEASE_S + 3, f"the queue held the request only {held:.1f} s: no test"
    assert dec[1].finish_reason == "length"
    assert dec[1].token_ids == expected[0].token_ids
    assert (after[0] - before[0], after[2] - before[2]) == (1, 0)


def test_lease_ended_under_fail(engine_pool, baselines, report):
    """The same under ``kv_load_failure_policy="fail"``: the late request ends with an error,
    the other one decodes from its transfer."""
    dec, expected = _lease_case(engine_pool, baselines, D1)
    assert [c.finish_reason for c in dec] == ["error", "length"]
    assert dec[1].token_ids == expected[1].token_ids
    report.outcome("LayoutcConnector lease ended (fail)", "late request: error; other: as single")


def test_prefill_killed_under_fail(engine_pool, baselines, report):
    """The prefill engine dies after returning its kv_transfer_params: under the policy
    ``fail`` every request that had to load ends with an error."""
    dec = _prefill_killed(engine_pool, baselines, report, D1)
    assert [c.finish_reason for c in dec] == ["error"] * len(PROMPTS)


def test_abort_during_a_load_frees_blocks_after_it_ends(engine_pool, report):
    """A decode request aborted while its load is in flight (here: waiting for a frozen
    prefill engine's side channel) keeps its blocks until the load ends, then frees them."""
    prefill, decode = engine_pool.get(P1_FREEZE, D1_INPROC)
    prompt = make_prompts([1500], seed=55)
    params = _prefill(prefill, prompt)  # decode has not met this prefill engine yet
    free0 = decode.scheduler_state()["free_blocks"]
    prefill.signal(signal.SIGSTOP)
    try:
        [rid] = decode.submit(prompt, {"max_tokens": MAX_TOKENS}, params)
        decode.step(2.0)
        held = decode.scheduler_state()
        assert held["free_blocks"] < free0, (held, free0)
        decode.abort([rid])
        decode.step(2.0)
        assert decode.scheduler_state() == held, "blocks freed while the load was in flight"
    finally:
        prefill.signal(signal.SIGCONT)
    t0 = time.monotonic()
    while decode.scheduler_state()["free_blocks"] != free0:
        assert time.monotonic() - t0 < 120, "blocks never freed"
        decode.step(0.5)
    assert decode.scheduler_state()["requests"] == 0
    report.record("aborted load: blocks freed after the prefill thawed", time.monotonic() - t0)
