"""Drive prefill/decode disaggregation between two :class:`engines.Engine` s.

The protocol is vLLM's (the one ``NixlConnector`` and drop-in replacements speak): each
prompt goes to the prefill engine with ``max_tokens=1`` and
``kv_transfer_params={"do_remote_decode": True, ...}``; the ``kv_transfer_params`` each
prefill request returns go unchanged into the decode request for the same prompt. All prompts
go in one ``generate`` call per engine, so the engines batch them as a proxy's traffic would.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engines import PREFILL_PARAMS, Completion, Engine
from models import VOCAB_SIZE

PROMPT_LENGTHS = (1, 127, 128, 129, 1500)
"""Block-boundary cases around the CPU default block size (128) plus one long prompt."""


def make_prompts(lengths: Sequence[int] = PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    """Seeded random token-id prompts of the given lengths (distinct prefixes)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in lengths]


@dataclass
class PDResult:
    """Outputs of one P/D round trip, with wall times."""

    prefill: list[Completion]
    decode: list[Completion]
    prefill_s: float
    decode_s: float


def run_single(
    engine: Engine, prompts: Sequence[Sequence[int]], max_tokens: int, timeout_s: float = 300.0
) -> list[Completion]:
    """A plain (non-P/D) greedy run of ``prompts`` on one engine."""
    return engine.generate(prompts, {"max_tokens": max_tokens}, timeout_s=timeout_s)


def compare(got: Completion, want: Completion) -> str:
    """``same, logprob gap G`` or ``differs from decode token K`` (for reports)."""
    for k, (a, b) in enumerate(zip(got.token_ids, want.token_ids)):
        if a != b:
            return f"differs from decode token {k}"
    return f"same, logprob gap {logprob_gap(got, want):.1e}"


LOGPROB_TOLERANCE = 1e-4
"""Largest sampled-token log-probability difference from the single engine that still counts
as the same computation (fp32). Measured on the 2-core box: about 3e-6 between TP 1 and TP 2
(different reduction order); about 1e-2 for the corrupted conv state of the n_groups=1 case
under NixlConnector, whose greedy tokens nevertheless all matched."""


def assert_same_as_single(
    rounds: Sequence[PDResult], expected: Sequence[Completion], prompts: Sequence[list[int]]
) -> None:
    """Every P/D round's decode reproduces the single engine: same tokens, log-probabilities
    within ``LOGPROB_TOLERANCE``."""
    for result in rounds:
        for prompt, got, want in zip(prompts, result.decode, expected):
            assert got.token_ids == want.token_ids, (
                f"prompt of {len(prompt)} tokens: decode {got.token_ids} != {want.token_ids}"
            )
            gap = logprob_gap(got, want)
            assert gap <= LOGPROB_TOLERANCE, f"prompt of {len(prompt)} tokens: logprob gap {gap}"


def logprob_gap(got: Completion, want: Completion) -> float:
    """Largest difference between the sampled tokens' log-probabilities of two runs, over the
    positions where both runs sampled the same tokens so far (inf without logprobs)."""
    if got.logprobs is None or want.logprobs is None:
        return float("inf")
    gap = 0.0
    for a, b, la, lb in zip(got.token_ids, want.token_ids, got.logprobs, want.logprobs):
        if a != b:
            break
        gap = max(gap, abs(la - lb))
    return gap


def run_pd(
    prefill: Engine,
    decode: Engine,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    *,
    decode_sampling: dict[str, Any] | None = None,
    timeout_s: float = 300.0,
) -> PDResult:
    """Prefill ``prompts`` on ``prefill``, then decode ``max_tokens`` greedy tokens each on
    ``decode`` from the transferred KV. Raises if prefill returns no ``kv_transfer_params``."""
    t0 = time.monotonic()
    pre = prefill.generate(
        prompts,
        {"max_tokens": 1},
        [dict(PREFILL_PARAMS) for _ in prompts],
        timeout_s=timeout_s,
    )
    t1 = time.monotonic()
    missing = [i for i, c in enumerate(pre) if not c.kv_transfer_params]
    if missing:
        raise AssertionError(f"prefill returned no kv_transfer_params for prompts {missing}")
    dec = decode.generate(
        prompts,
        {"max_tokens": max_tokens, **(decode_sampling or {})},
        [c.kv_transfer_params for c in pre],
        timeout_s=timeout_s,
    )
    t2 = time.monotonic()
    return PDResult(pre, dec, t1 - t0, t2 - t1)


def connect(
    prefill: Engine, decode: Engine, attempts: int = 3, timeout_s: float = 300.0
) -> tuple[int, float]:
    """Warm a P/D pair up with one-prompt round trips until one succeeds; returns the number
    of failed attempts and the wall time.

    The first request between two engines pays the connector's handshake. vLLM's
    NixlConnector gives its side-channel query a fixed 5 s timeout, which a loaded 2-core box
    can miss; the request then fails (``finish_reason == "error"``) and the next request
    handshakes again. Tests call this first so that a slow handshake does not fail a case
    about transfer correctness."""
    prompt = make_prompts([300], seed=12345)
    t0 = time.monotonic()
    for failed in range(attempts):
        result = run_pd(prefill, decode, prompt, 2, timeout_s=timeout_s)
        if result.decode[0].finish_reason == "length":
            return failed, time.monotonic() - t0
    raise AssertionError(
        f"{prefill.name} -> {decode.name}: no successful P/D round trip in {attempts} attempts"
    )
