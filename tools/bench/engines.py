"""Engine-shaped workloads: real model shapes, every rank a process, the runtime's request path.

* ``gpu_llama70b_p8d4_32k``: Llama-3.1-70B (``llama_3_1_70b``, vLLM's FlashInfer page: 80
  layers, 8 KV heads x 128, 16-token blocks, bf16), prefill TP 8 -> decode TP 4, one
  32,768-token request (2,048 scattered blocks): 10 GiB, each decode rank reading two
  prefill ranks' heads.
* ``gpu_nemotron_nano_p4d2``: Nemotron-3-Nano-30B-A3B (``nemotron_3_nano_30b_a3b``, vLLM's
  hybrid Mamba2 cache: 6 attention + 23 Mamba2 layers in the model's order, 2,096-token
  logical blocks of 131 kernel blocks), prefill TP 4 -> decode TP 2, a 32,768-token request:
  the attention layers move its 16 logical blocks, the Mamba2 layers its last one (the
  state), with block ids per layer kind as vLLM's hybrid cache manager hands them out.

All ranks are processes on one GPU (12 and 6).  Each prefill rank marks the request ready
(``expect`` with its block ids), each decode rank pulls (``auto``); the request's time runs
from the first pull to the last decode rank's completion, against a torch copy of the same
bytes on the device.  The first request is verified (every run of 16 sampled blocks of each
kind per decode rank, against the pattern of its source prefill rank).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from layoutc.runtime.plan import Plan

from .config import BenchError, GiB, MiB, Run, round_to
from .flows import run_request, setup_pair, start_workers

#: Layers of Nemotron-3-Nano-30B-A3B that keep a cache, in order (its hybrid_override_pattern
#: without the MoE layers: ``*`` attention, ``M`` Mamba2).
NEMOTRON_NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


@dataclass(frozen=True)
class EngineCase:
    """One engine-shaped request (``key``: its key in the JSON)."""

    key: str
    spec: str  # a built-in spec (model specs included)
    prefill_tp: int
    decode_tp: int
    tokens: int
    sets: dict[str, Any] = field(default_factory=dict)
    #: per-layer kinds (None: every layer of the spec's one kind)
    pattern: str | None = None
    #: tokens the full-size case moves (``tokens`` below it: scaled down, and said so)
    full_tokens: int = 32768
    label: str = ""


def default_engine_cases() -> tuple[EngineCase, ...]:
    return (
        EngineCase(
            "gpu_llama70b_p8d4_32k",
            "llama_3_1_70b",
            8,
            4,
            32768,
            label="Llama-3.1-70B, vLLM FlashInfer pages, P8->D4, 32k tokens",
        ),
        EngineCase(
            "gpu_nemotron_nano_p4d2",
            "nemotron_3_nano_30b_a3b",
            4,
            2,
            32768,
            pattern=NEMOTRON_NANO_PATTERN,
            label="Nemotron-3-Nano-30B-A3B hybrid, vLLM Mamba2 cache, P4->D2, 32k tokens",
        ),
    )


def layer_kinds(plan: Plan, pattern: str | None) -> list[str]:
    """The per-layer kinds of ``plan``'s model: from ``pattern`` (``*`` attention, ``M``
    Mamba, others no cache), or ``num_layers`` layers of the plan's one kind."""
    if pattern is not None:
        return ["attention" if ch == "*" else "mamba" for ch in pattern if ch in "*M"]
    from layoutc.runtime.endpoint import layer_kind_sequence

    n = int(dict(plan.decode.params).get("num_layers", 1))
    return layer_kind_sequence(plan, n)


def request_ids(plan: Plan, kinds: list[str], tokens: int, seed: int) -> tuple[Any, Any, int, int]:
    """(decode ids, prefill ids, decode pool, prefill pool) of one request of ``tokens``:
    scattered logical blocks; with several layer kinds a mapping per kind -- the attention
    layers every block of the request, the others (Mamba state) its last block."""
    side = plan.decode
    block_size = int(dict(side.params).get("block_size", 16))
    nblk = math.ceil(tokens / (block_size * side.kernel_blocks))
    pool = nblk * 5 // 4 + 2
    rng = np.random.default_rng(seed)
    d = rng.choice(pool, nblk, replace=False).astype(np.int64)
    p = rng.choice(pool, nblk, replace=False).astype(np.int64)
    if len(set(kinds)) == 1:
        return d, p, pool, pool
    return {"attention": d, "mamba": d[-1:]}, {"attention": p, "mamba": p[-1:]}, pool, pool


def bench_engines(compile_plan: Callable[..., Plan], run: Run, cross: bool = False) -> None:
    """Each engine-shaped case, every rank a process: on the one device, or (``cross``) the
    prefill ranks on the first device of ``cfg.xgpu_devices`` and the decode ranks on the
    second, against a torch peer copy (key ``xgpu_...`` for the case's ``gpu_...``)."""
    errs = []
    for case in run.cfg.engine_cases or default_engine_cases():
        if time.monotonic() > run.deadline - 20:
            errs.append(f"{case.key}: skipped, time limit reached")
            continue
        try:
            _engine_case(compile_plan, run, case, cross)
        except Exception as e:  # noqa: BLE001 - the other case still runs
            errs.append(f"{case.key}: {type(e).__name__}: {e}")
            run.log(f"engines {case.key}: FAILED: {e}")
        run.checkpoint()
    if errs:
        raise BenchError("; ".join(errs))


def _bytes_of(plan: Plan, kinds: list[str], local: Any) -> int:
    """Bytes one request moves into every decode rank together."""
    from layoutc.runtime.endpoint import kind_pages

    kp = kind_pages(plan)
    total = 0
    for d in range(plan.decode_tp):
        rp = plan.rank(d)
        for kind in kinds:
            ids = local[kind] if isinstance(local, dict) else local
            for page in kp[kind]:
                for src in rp.sources:
                    runs = rp.runs(page, src)
                    total += int(runs.nbytes.sum()) * int(len(ids))
    return total


def _engine_case(
    compile_plan: Callable[..., Plan], run: Run, case: EngineCase, cross: bool = False
) -> None:
    cfg, out, log = run.cfg, run.out, run.log
    runs = cfg.runs or (3 if cfg.quick else 5)
    plan = compile_plan(case.spec, case.prefill_tp, case.decode_tp, case.sets)
    kinds = layer_kinds(plan, case.pattern)
    local, remote, pool_d, pool_p = request_ids(plan, kinds, case.tokens, 29)
    total = _bytes_of(plan, kinds, local)
    p, d = case.prefill_tp, case.decode_tp
    src, dst = cfg.xgpu_devices if cross else (cfg.gpu_worker_device,) * 2
    key = "xgpu_" + case.key.removeprefix("gpu_") if cross else case.key
    labels = [f"prefill-{r}" for r in range(p)] + [f"decode-{r}" for r in range(d)]
    where = f"prefill on {src}, decode on {dst}" if cross else "on one device"
    log(f"engines: {case.label or case.key}: {total / MiB:.0f} MiB, {p + d} processes {where}")
    workers = start_workers([src] * p + [dst] * d, labels, run.deadline)
    try:
        ep_kw = dict(
            timeout_s=120.0,
            staging_bytes=cfg.engines_staging_bytes,
            staging_slots=cfg.engines_staging_slots,
        )
        placement = [(r, "prefill", r) for r in range(p)]
        placement += [(p + r, "decode", r) for r in range(d)]
        names = setup_pair(workers, plan, kinds, pool_p, pool_d, ep_kw, "e", placement)
        dec = {p + r: [names[("decode", r)][1]] for r in range(d)}
        copy_bytes = min(total, cfg.engines_copy_bytes)
        if cross:
            copy = workers[0].call("peer_copy_rate", copy_bytes, src, dst, 7, timeout=120)
        else:
            copy = workers[0].call("copy_rate", copy_bytes, 7, timeout=120)
        copy_Bps = copy_bytes / statistics.median(copy)
        ts: list[float] = []
        descriptors = 0
        chosen: set[str] = set()
        verified = 0
        for i in range(runs + 1):
            run.check_time()
            t, infos = run_request(workers, names, f"e-{i}", dec, local, remote, cfg.strategy, 120)
            if i == 0:  # warm-up: verified, not timed
                descriptors = int(infos[0]["descriptors_all_ranks"])
                chosen = {s for info in infos for s in info["strategies"].values()}
                for r in range(d):
                    srcs = list(plan.rank(r).sources)
                    verified += workers[p + r].call(
                        "verify",
                        names[("decode", r)][1],
                        srcs,
                        local,
                        {s: remote for s in srcs},
                        timeout=300,
                    )
                continue
            ts.append(t)
        t_med = statistics.median(ts)
        frac = (total / t_med) / copy_Bps
        scaled = case.tokens < case.full_tokens
        out[key] = {
            "fraction_of_peer_copy" if cross else "fraction_of_copy": round_to(frac, 4),
            "descriptors": descriptors,
            "verified": verified > 0,
            "scaled_down": (
                f"{case.tokens} of {case.full_tokens} tokens (GPU memory)" if scaled else False
            ),
        }
        out[key + "_case"] = {
            "spec": case.spec,
            "devices": {"prefill": src, "decode": dst},
            "sets": case.sets,
            "pair": f"{p}->{d}",
            "processes": p + d,
            "layers": len(kinds),
            "kinds": {k: kinds.count(k) for k in dict.fromkeys(kinds)},
            "tokens": case.tokens,
            "blocks": {k: int(len(v)) for k, v in local.items()}
            if isinstance(local, dict)
            else int(len(local)),
            "bytes": total,
            "strategy": cfg.strategy,
            "chosen": sorted(chosen),
            "request_ms": round(t_med * 1e3, 3),
            "request_ms_spread": [round(min(ts) * 1e3, 3), round(max(ts) * 1e3, 3)],
            "GBps": round_to(total / t_med / 1e9, 4),
            "copy_GBps": round_to(copy_Bps / 1e9, 4),
            "copy_bytes": copy_bytes,
            f"{'fraction_of_peer_copy' if cross else 'fraction_of_copy'}_spread": [
                round_to(total / max(ts) / copy_Bps, 4),
                round_to(total / min(ts) / copy_Bps, 4),
            ],
            "descriptors_posted": descriptors,
            "staging": {"bytes": cfg.engines_staging_bytes, "slots": cfg.engines_staging_slots},
            "verified_bytes": verified,
            "runs": runs,
        }
        log(
            f"engines: {key}: {total / t_med / 1e9:.1f} GB/s = {frac:.3f} of a "
            f"{'peer ' if cross else ''}copy, "
            f"{descriptors} descriptors, chose {', '.join(sorted(chosen))}"
        )
    finally:
        for w in workers:
            w.stop()


__all__ = ["EngineCase", "GiB", "bench_engines", "default_engine_cases", "layer_kinds"]
