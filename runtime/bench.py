"""``layoutc bench``: the numbers of DESIGN.md §9, measured on this machine.

Sections (each key of the JSON is the median of repeated runs, with ``<key>_spread`` =
``[min, max]``):

* **expand** (in-process, no NIXL): block ids -> every index array and pack map one decode
  rank's request consumes (both strategies, every source), 1,000 scattered blocks x 64
  layers of the Nemotron-3-Nano-like hybrid spec at P_TP=4 -> D_TP=2, against the per-block
  Python loop (``staging.expand_loop``).
* **descriptors** (no buffers): NIXL descriptors one decode rank would post for a
  32,768-token request with scattered blocks, strategy ``auto`` with this device's cost
  model, against vLLM's counts (VLLM_SEMANTICS.md §10).
* **cpu** (two processes, host memory): a hetero-TP request with scattered blocks and 8 KiB
  head slices through the runtime (``auto``) against NIXL moving the same bytes as ONE
  descriptor between the same two processes.
* **gpu** (``--device cuda``, three processes on one GPU): the P_TP=1 -> D_TP=2 scattered
  request (``auto``) against a torch device-to-device copy of the same bytes and against
  per-block descriptors; a contiguous request (1 -> 1, consecutive blocks) against the copy.
* **cost_model**: constants measured on the way (descriptor cost, link rate, pack/unpack
  rates, per-chunk and per-request overheads, overlap), in the format of
  :class:`~layoutc.runtime.costmodel.CostModel` (``--write-cost-model FILE``).

Worker processes (multiprocessing *spawn*) hold real :class:`~layoutc.runtime.endpoint.Endpoint`
objects; the parent only carries handshake bytes and commands.  Every command has a timeout
and the whole run a time limit; on a failure the bench reports what it measured so far.
This module never imports the compiler: the CLI hands it a ``compile_plan`` function.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import platform
import select
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .procs import end_process

__all__ = ["BenchConfig", "run_bench", "KEYS"]

MiB = 1 << 20
GiB = 1 << 30

#: Keys of the JSON (each a plain number, with ``<key>_spread``).
KEYS = (
    "expand_us_1000_blocks_64_layers",
    "expand_speedup_vs_loop",
    "descriptors_ratio_vs_vllm_long_request",
    "cpu_scattered_fraction_of_single_descriptor",
    "gpu_scattered_fraction_of_copy",
    "gpu_scattered_speedup_vs_per_block",
    "gpu_contiguous_fraction_of_copy",
)

#: Nemotron-3-Nano-like hybrid values (VLLM_SEMANTICS.md §5).
NEMOTRON = dict(
    num_key_value_heads=2,
    head_dim=128,
    mamba_num_heads=64,
    mamba_head_dim=64,
    n_groups=8,
    ssm_state_size=128,
)
#: Llama-3.1-70B-like dense GQA (80 layers, 8 KV heads, head_dim 128, block 16, bf16).
LLAMA70B = dict(num_key_value_heads=8, head_dim=128, block_size=16)
VLLM_V033_LLAMA = 327_680
VLLM_V020_LLAMA = 655_360
VLLM_V033_HYBRID_2096 = 288
VLLM_V033_HYBRID_16 = 12_768


@dataclass
class BenchConfig:
    quick: bool = False
    device: str = "cpu"
    strategy: str = "auto"
    json_path: str | None = None
    write_cost_model: str | None = None
    time_limit_s: float = 280.0
    command: str = ""
    progress: bool = True
    # sizes
    cpu_bytes_per_decode_rank: int = 256 * MiB
    gpu_bytes_per_decode_rank: int = 512 * MiB
    gpu_contiguous_bytes: int = 8 * GiB
    gpu_staging_bytes: int = 1 * GiB
    # 2 slots: one 512 MiB chunk per decode rank (one pack, WRITE and unpack per rank and
    # request); 4 slots (two chunks each, more overlap but twice the host calls) measured
    # equal or lower on the H100 (docs/benchmarks.md) and is kept as a variant
    gpu_staging_slots: int = 2
    gpus: int = 1  # >= 2: also the cross-GPU section (prefill on GPU 0, decode on GPU 1)
    xgpu_bytes_per_decode_rank: int = 512 * MiB
    xgpu_contiguous_bytes: int = 4 * GiB
    runs: int = 0  # 0: 3 with --quick, else 7
    extra: dict[str, Any] = field(default_factory=dict)


class BenchError(RuntimeError):
    pass


# ============================================================================================
# statistics helpers
# ============================================================================================
def _put(out: dict[str, Any], key: str, values: list[float], digits: int = 4) -> float:
    """``out[key]`` = median, ``out[key + "_spread"]`` = [min, max]; returns the median."""
    med = float(statistics.median(values))
    out[key] = _round(med, digits)
    out[key + "_spread"] = [_round(min(values), digits), _round(max(values), digits)]
    return med


def _round(v: float, digits: int) -> float:
    if v == 0 or not math.isfinite(v):
        return v
    return float(f"{v:.{digits}g}")


def _median_time(fn: Callable[[], Any], reps: int, warm: int = 1) -> list[float]:
    for _ in range(warm):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


# ============================================================================================
# Counting what NIXL is given (no buffers)
# ============================================================================================
def _layer_pages(plan: Any, kinds: list[str]) -> list[tuple[str, ...]]:
    from .endpoint import kind_pages

    kp = kind_pages(plan)
    return [tuple(kp[k]) for k in kinds]


def nixl_posted(table: Any, local: np.ndarray, remote: np.ndarray, rows: Any = None) -> int:
    """Descriptors ``make_prepped_xfer`` posts for one request of a PairTable, exactly by
    NIXL's merge rule (:func:`descriptors.posted_count`; checked against NIXL's telemetry in
    the tests): within one strided row, consecutive indices on both sides merge when the row
    is dense (``len == stride``) locally and both strides are equal; rows never merge."""
    from .descriptors import posted_count

    return posted_count(table, local, remote, slice(None) if rows is None else rows)


def count_request(
    plan: Any,
    decode_rank: int,
    kinds: list[str],
    local: np.ndarray,
    remote: np.ndarray,
    layers: np.ndarray | None,
    model: Any,
    chunk_bytes: int,
    kernel: str,
    strategy: str = "auto",
) -> dict[str, Any]:
    """What one decode rank's request posts, per source: strategy, descriptors, bytes.

    ``kernel``: how pack/unpack run (``staging._count_ops``); ``chunk_bytes``: the staging
    chunk.  Zero-copy posts ``nixl_posted`` descriptors (one ``make_prepped_xfer`` per
    source); staged posts one ``initialize_xfer`` row per chunk.
    """
    from .descriptors import build_pair_table, synthetic_segments
    from .staging import StagingLayout, _count_ops

    lp = _layer_pages(plan, kinds)
    nb = int(max(local.max(), remote.max())) + 1 if local.size else 1
    lseg = synthetic_segments(plan.decode, lp, nb, 1 << 44)
    rseg = synthetic_segments(plan.prefill, lp, nb, 1 << 45)
    per_source = {}
    total = 0
    for src in plan.rank(decode_rank).sources:
        table = build_pair_table(
            plan,
            decode_rank=decode_rank,
            prefill_rank=src,
            local_is_decode=True,
            layer_pages=lp,
            local_segments=lseg,
            remote_segments=rseg,
        )
        if table is None:
            continue
        rows = table.rows_for_layers(layers)
        nbytes = int(table.row_nbytes[rows].sum()) * int(local.shape[0])
        if nbytes == 0:
            continue
        zc = nixl_posted(table, local, remote, rows)
        n_chunks = -(-nbytes // chunk_bytes)
        lay = StagingLayout.build(plan, decode_rank=decode_rank, prefill_rank=src, layer_pages=lp)
        g = lay.groups_for_layers(layers)
        n_groups = lay.num_groups if g is None else int(g.shape[0])
        n_rows = int(table.row_nbytes[rows].shape[0])
        n_ops = _count_ops(kernel, n_rows, n_groups, n_chunks)
        choice = strategy if strategy != "auto" else model.choose(zc, nbytes, n_chunks, n_ops)
        posted = zc if choice == "zero-copy" else n_chunks
        per_source[src] = {
            "strategy": choice,
            "posted": posted,
            "zero_copy_descriptors": zc,
            "index_entries": n_rows * int(local.shape[0]),
            "chunks": n_chunks,
            "bytes": nbytes,
            "predicted_s": model.predict(zc, nbytes, n_chunks, n_ops),
        }
        total += posted
    return {"posted": total, "sources": per_source}


# ============================================================================================
# Section: expand
# ============================================================================================
def bench_expand(compile_plan: Callable, cfg: BenchConfig, out: dict[str, Any], log) -> None:
    from .descriptors import build_pair_table, synthetic_segments
    from .staging import StagingLayout, expand, expand_loop

    plan = compile_plan("vllm_hybrid_mamba2", 4, 2, NEMOTRON)
    kinds_all = [k for k, _ in plan.layer_kinds]
    kinds = [kinds_all[i % len(kinds_all)] for i in range(64)]  # attention, mamba alternating
    lp = _layer_pages(plan, kinds)
    rng = np.random.default_rng(0)
    pool = 1500
    local = rng.choice(pool, 1000, replace=False).astype(np.int64)
    remote = rng.choice(pool, 1000, replace=False).astype(np.int64)
    lseg = synthetic_segments(plan.decode, lp, pool, 1 << 44)
    rseg = synthetic_segments(plan.prefill, lp, pool, 1 << 45)
    pairs = []
    for src in plan.rank(0).sources:
        table = build_pair_table(
            plan,
            decode_rank=0,
            prefill_rank=src,
            local_is_decode=True,
            layer_pages=lp,
            local_segments=lseg,
            remote_segments=rseg,
        )
        lay = StagingLayout.build(plan, decode_rank=0, prefill_rank=src, layer_pages=lp)
        pairs.append((lay, table))

    def run_vec():
        return [expand(lay, local, remote, table=t) for lay, t in pairs]

    def run_loop():
        return [expand_loop(lay, local, remote, table=t) for lay, t in pairs]

    reps = 31 if cfg.quick else 101
    res = run_vec()
    ref = run_loop()
    for a, b in zip(res, ref):
        if not (
            np.array_equal(a.local_indices, b.local_indices)
            and np.array_equal(a.stream.base, b.stream.base)
            and np.array_equal(a.chunk_bounds, b.chunk_bounds)
        ):
            raise BenchError("expand and expand_loop disagree")
    t_vec = _median_time(run_vec, reps, warm=3)
    t_loop = _median_time(run_loop, 3 if cfg.quick else 5, warm=0)
    entries = 0
    for ex in res:
        entries += int(ex.local_indices.size + ex.remote_indices.size)
        entries += int(ex.stream.groups.size * 3 + ex.chunk_bounds.size + ex.chunk_groups.size)
    med = _put(out, "expand_us_1000_blocks_64_layers", [t * 1e6 for t in t_vec], 4)
    out["expand_entries"] = entries
    loop_med = statistics.median(t_loop)
    # speedup: each loop run against the median vectorized run of the same session
    _put(out, "expand_speedup_vs_loop", [t / (med / 1e6) for t in t_loop], 4)
    out["expand_loop_us"] = _round(loop_med * 1e6, 4)
    out["expand_case"] = {
        "spec": "vllm_hybrid_mamba2",
        "params": NEMOTRON,
        "prefill_tp": 4,
        "decode_tp": 2,
        "decode_rank": 0,
        "sources": list(plan.rank(0).sources),
        "layers": "64 (attention and mamba alternating)",
        "blocks": 1000,
        "rows": [int(lay.num_rows) for lay, _ in pairs],
        "descriptors": int(sum(ex.n_descriptors for ex in res)),
        "what": "zero-copy index arrays (both sides) + staged stream map and chunk table, "
        "for every source of decode rank 0",
    }
    log(f"expand: {med:.0f} us ({entries} entries), loop {loop_med * 1e6:.0f} us")


# ============================================================================================
# Section: descriptor counts
# ============================================================================================
def bench_descriptors(
    compile_plan: Callable, cfg: BenchConfig, model: Any, out: dict[str, Any], log
) -> None:
    from .staged import DEFAULT_STAGING_BYTES, DEFAULT_STAGING_SLOTS

    kernel = "per-row" if model.kind == "cpu" else "fused"
    if cfg.device == "cuda":
        chunk = cfg.gpu_staging_bytes // cfg.gpu_staging_slots
    else:
        chunk = DEFAULT_STAGING_BYTES // DEFAULT_STAGING_SLOTS
    rng = np.random.default_rng(1)

    # Llama-3.1-70B-like, 8 -> 4, 32,768 tokens = 2,048 blocks of 16, scattered
    plan = compile_plan("vllm_flashinfer", 8, 4, dict(LLAMA70B, num_layers=80))
    kinds = ["attention"] * 80
    nblk = 32768 // 16
    local = rng.choice(8 * nblk, nblk, replace=False).astype(np.int64)
    remote = rng.choice(8 * nblk, nblk, replace=False).astype(np.int64)
    auto = count_request(plan, 0, kinds, local, remote, None, model, chunk, kernel)
    zc = count_request(plan, 0, kinds, local, remote, None, model, chunk, kernel, "zero-copy")
    out["descriptors_llama70b_8to4"] = auto["posted"]
    out["descriptors_llama70b_8to4_zero_copy"] = zc["posted"]
    r = auto["posted"] / VLLM_V033_LLAMA
    out["descriptors_ratio_vs_vllm_long_request"] = _round(r, 4)
    out["descriptors_ratio_vs_vllm_long_request_spread"] = [_round(r, 4), _round(r, 4)]
    out["descriptors_ratio_vs_vllm_v020"] = _round(auto["posted"] / VLLM_V020_LLAMA, 4)
    out["descriptors_llama70b_detail"] = {
        "spec": "vllm_flashinfer",
        "params": dict(LLAMA70B, num_layers=80),
        "pair": "8->4",
        "decode_rank": 0,
        "tokens": 32768,
        "blocks": nblk,
        "chunk_bytes": chunk,
        "cost_model": model.kind,
        "sources": auto["sources"],
        "vllm_v033": VLLM_V033_LLAMA,
        "vllm_v020": VLLM_V020_LLAMA,
    }
    log(f"descriptors: Llama-70B-like 8->4: {auto['posted']} (vLLM v0.33 {VLLM_V033_LLAMA})")

    # Nemotron-3-Nano-like hybrid 4 -> 2: 6 attention + 23 Mamba2 layers; the attention layers
    # move every block of the request, the Mamba layers the request's last block (its state)
    hyb = {}
    for label, extra in (
        ("kernel16", dict(block_size=16, kernel_blocks=131)),
        ("block2096", dict(block_size=2096, kernel_blocks=1)),
    ):
        params = dict(NEMOTRON, **extra)
        plan = compile_plan("vllm_hybrid_mamba2", 4, 2, params)
        kinds = ["attention"] * 6 + ["mamba"] * 23
        nblk = math.ceil(32768 / 2096)
        loc = rng.choice(8 * nblk, nblk, replace=False).astype(np.int64)
        rem = rng.choice(8 * nblk, nblk, replace=False).astype(np.int64)
        att = count_request(plan, 0, kinds, loc, rem, np.arange(6), model, chunk, kernel)
        mam = count_request(
            plan, 0, kinds, loc[-1:], rem[-1:], np.arange(6, 29), model, chunk, kernel
        )
        hyb[label] = {
            "posted": att["posted"] + mam["posted"],
            "attention": att["sources"],
            "mamba": mam["sources"],
            "params": params,
        }
    out["descriptors_hybrid_nemotron_4to2"] = hyb["kernel16"]["posted"]
    out["descriptors_hybrid_nemotron_4to2_block2096"] = hyb["block2096"]["posted"]
    out["descriptors_hybrid_detail"] = {
        "pair": "4->2",
        "decode_rank": 0,
        "tokens": 32768,
        "logical_blocks": nblk,
        "layers": "6 attention (every block) + 23 Mamba2 (the last block)",
        "vllm_v033_kernel16": VLLM_V033_HYBRID_16,
        "vllm_v033_block2096": VLLM_V033_HYBRID_2096,
        **hyb,
    }
    log(
        f"descriptors: hybrid 4->2: {hyb['kernel16']['posted']} (vLLM 16-token kernel blocks "
        f"{VLLM_V033_HYBRID_16}), {hyb['block2096']['posted']} (--block-size 2096: "
        f"{VLLM_V033_HYBRID_2096})"
    )


# ============================================================================================
# Worker processes
# ============================================================================================
class _Sess:
    """One endpoint with its buffers inside a worker."""

    def __init__(self, plan, role, rank, kinds, nb, device, ep_kwargs, name) -> None:
        import torch

        from .endpoint import Endpoint, allocate_buffers

        self.plan, self.role, self.rank, self.nb, self.device = plan, role, rank, nb, device
        self.side = plan.prefill if role == "prefill" else plan.decode
        self.kinds = kinds
        self.ep = Endpoint(plan, role, rank, name=name, engine=role, device=device, **ep_kwargs)
        self.bufs = allocate_buffers(plan, role, kinds, nb, device)
        if role == "prefill":
            for li, layer in enumerate(self.bufs):
                for t in layer.values():
                    _fill_pattern(t, li, rank)
        if device != "cpu":
            torch.cuda.synchronize()
        self.ep.register_layers(self.bufs, kinds)
        self.results: dict[str, Any] = {}  # rid -> (time done, error or None)
        self.pending: set[str] = set()

    def collect(self) -> bool:
        prog = self.ep.poll()
        now = time.monotonic()
        for rid in prog.done:
            self.results[rid] = (now, None)
            self.pending.discard(rid)
        for rid, err in prog.failed.items():
            self.results[rid] = (now, str(err))
            self.pending.discard(rid)
        return bool(prog.done or prog.failed)


def _post_and_wait(agent: Any, handle: Any, what: str, within_s: float) -> None:
    """Post a prepared NIXL transfer and spin until it is ``DONE`` (BenchError on ``ERR`` or
    after ``within_s``)."""
    st = agent.transfer(handle)
    end = time.monotonic() + within_s
    while st != "DONE":
        if st == "ERR" or time.monotonic() > end:
            raise BenchError(f"{what} ended in {st}")
        st = agent.check_xfer_state(handle)


def _fill_pattern(t: Any, layer: int, rank: int = 0) -> None:
    """Prefill pages: int64 ``(rank << 56) + ((layer + 1) << 40) + i`` at element i (cheap,
    unique per rank, layer and element)."""
    import torch

    b = t.reshape(-1).view(torch.uint8)
    n8 = b.numel() // 8
    v = b[: n8 * 8].view(torch.int64)
    torch.arange(n8, dtype=torch.int64, device=t.device, out=v)
    v += (rank << 56) + ((layer + 1) << 40)
    if b.numel() > n8 * 8:
        b[n8 * 8 :].zero_()


def _pattern_bytes(layer: int, start: int, n: int, rank: int = 0) -> np.ndarray:
    j0 = start // 8
    j1 = (start + n + 7) // 8
    vals = np.arange(j0, j1, dtype=np.int64) + ((rank << 56) + ((layer + 1) << 40))
    b = vals.astype("<i8").view(np.uint8)
    o = start - j0 * 8
    return b[o : o + n]


class _WorkerState:
    def __init__(self, conn, device: str) -> None:
        self.conn = conn
        self.device = device
        self.sessions: dict[str, _Sess] = {}
        self.raw: dict[str, Any] = {}
        self.hot = False

    # -- endpoints -------------------------------------------------------------------------
    def setup(self, name, plan, role, rank, kinds, nb, ep_kwargs):
        s = _Sess(plan, role, rank, kinds, nb, self.device, ep_kwargs, name)
        self.sessions[name] = s
        return s.ep.handshake_bytes()

    def add_peers(self, name, blobs):
        for b in blobs:
            self.sessions[name].ep.add_peer(b)
        return True

    def teardown(self, name):
        s = self.sessions.pop(name, None)
        if s is None:
            return None
        s.ep.close()
        st = s.ep.stats()
        del s
        import gc

        gc.collect()  # the endpoint and its staging engine refer to each other
        if self.device != "cpu":
            import torch

            torch.cuda.empty_cache()
        return st

    def expect(self, name, rid, timeout_s=60.0, blocks=None):
        """The passive side's ``expect`` (``blocks``: a prefill rank's ids, so that it packs
        ahead); returns when it was called (monotonic seconds, one clock for the host)."""
        s = self.sessions[name]
        t0 = time.monotonic()
        s.ep.expect(rid, timeout_s=timeout_s, blocks=blocks)
        s.pending.add(rid)
        eng = s.ep._staged
        if eng is not None and eng.trace is not None:
            eng.trace.append(("expect", t0, time.monotonic()))
        return t0

    def result(self, name, rid, within=60.0):
        s = self.sessions[name]
        end = time.monotonic() + within
        while rid not in s.results:
            self.poll_all()
            if time.monotonic() > end:
                raise TimeoutError(f"{name}: {rid} not finished within {within} s")
        t, err = s.results.pop(rid)
        info = s.ep.completion_info(rid)
        return {"t": t, "error": err, "info": info}

    def pull(self, names, rid, local, remote, strategy=None, within=120.0, layers=None, op="pull"):
        """Start ``rid`` on every session of ``names`` at once (``op``: their ``pull`` or
        ``push``); spin until all finished."""
        sess = [self.sessions[n] for n in names]
        t0 = time.monotonic()
        for s in sess:
            getattr(s.ep, op)(rid, local, remote, strategy=strategy, layers=layers)
            s.pending.add(rid)
        t_posted = time.monotonic()  # host time of the pull() calls themselves
        for s in sess:
            if s.ep._staged is not None and s.ep._staged.trace is not None:
                s.ep._staged.trace.append(("pull", t0, t_posted))
        end = t0 + within
        while any(rid not in s.results for s in sess):
            self.poll_all()
            if time.monotonic() > end:
                raise TimeoutError(f"{rid}: not finished within {within} s")
        t1 = max(s.results[rid][0] for s in sess)
        errs = [s.results[rid][1] for s in sess if s.results[rid][1]]
        infos = [s.ep.completion_info(rid) for s in sess]
        for s in sess:
            s.results.pop(rid)
        return {"t0": t0, "t1": t1, "t_posted": t_posted, "errors": errs, "infos": infos}

    def poll_all(self) -> bool:
        """Progress every endpoint and raw agent once; True when a request finished.

        ``$LAYOUTC_BENCH_POLL_SLEEP_US`` (default 0: spin) sleeps that long after each round,
        for experiments with polling processes that share cores."""
        if _POLL_SLEEP_S:
            time.sleep(_POLL_SLEEP_S)
        done = False
        for s in self.sessions.values():
            done = s.collect() or done
        for r in self.raw.values():
            r["agent"].get_new_notifs()
        return done

    def busy(self) -> bool:
        return self.hot or any(s.pending for s in self.sessions.values())

    def verify(self, name, sources, local, remote_by_source, samples=16, seed=0):
        """Check every run of ``samples`` of the request's blocks against the prefill pattern."""
        from .staging import StagingLayout

        s = self.sessions[name]
        lp = _layer_pages(s.plan, s.kinds)
        rng = np.random.default_rng(seed)
        local = np.asarray(local, dtype=np.int64)
        pick = rng.choice(local.shape[0], min(samples, local.shape[0]), replace=False)
        checked = 0
        for src in sources:
            remote = np.asarray(remote_by_source[src], dtype=np.int64)
            lay = StagingLayout.build(s.plan, decode_rank=s.rank, prefill_rank=src, layer_pages=lp)
            for r in range(lay.num_rows):
                layer = int(lay.row_layer[r])
                page = lay.page_names[int(lay.row_page[r])]
                flat = s.bufs[layer][page].reshape(-1)
                n = int(lay.row_nbytes[r])
                dS = int(lay.decode_stride[int(lay.row_page[r])])
                pS = int(lay.prefill_stride[int(lay.row_page[r])])
                for i in pick:
                    d0 = int(local[i]) * dS + int(lay.row_decode_offset[r])
                    p0 = int(remote[i]) * pS + int(lay.row_prefill_offset[r])
                    got = flat[d0 : d0 + n].cpu().numpy()  # (only these bytes leave a GPU)
                    if not np.array_equal(got, _pattern_bytes(layer, p0, n, src)):
                        raise BenchError(
                            f"{s.ep.label}: wrong bytes in layer {layer} page {page!r} block "
                            f"{int(local[i])} (from prefill rank {src} block {int(remote[i])})"
                        )
                    checked += n
        return checked

    def stats(self, name):
        return self.sessions[name].ep.stats()

    def trace(self, name, on):
        """Start (``on``) or stop and return the staged heavy-operation trace of a session."""
        eng = self.sessions[name].ep._staged
        if on:
            eng.trace = []
            return None
        out, eng.trace = eng.trace, None
        return out

    def cprofile(self, on, top=30):
        """Start (``on``) or stop cProfile in this worker; stopping returns the ``top``
        functions by own time as text (host-cost tuning)."""
        import cProfile
        import io
        import pstats

        if on:
            self._prof = cProfile.Profile()
            self._prof.enable()
            return None
        prof, self._prof = getattr(self, "_prof", None), None
        if prof is None:
            return None
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
        return buf.getvalue()

    def set_mover(self, name, mover):
        """Who copies the chunks of requests this session initiates (experiments)."""
        self.sessions[name].ep._staged.mover_override = mover
        return True

    def huge_pages_kib(self):
        """AnonHugePages of this process (kB), or None where /proc does not say."""
        try:
            with open("/proc/self/smaps_rollup", encoding="ascii") as f:
                for line in f:
                    if line.startswith("AnonHugePages:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def zero(self, name):
        s = self.sessions[name]
        for layer in s.bufs:
            for t in layer.values():
                t.zero_()
        if self.device != "cpu":
            import torch

            torch.cuda.synchronize()
        return True

    # -- staging kernel rates (cost model) ------------------------------------------------------
    def pack_rate(self, name, peer_rank, blocks, chunk, reps):
        """GB/s of pack (prefill) or unpack (decode) of one peer's stream, chunk by chunk; and
        the host seconds per kernel call (a 2-block request)."""
        import torch

        from .staging import BoundPages, StagingLayout, _count_ops, pack, unpack

        s = self.sessions[name]
        lp = _layer_pages(s.plan, s.kinds)
        d, p = (s.rank, peer_rank) if s.role == "decode" else (peer_rank, s.rank)
        lay = StagingLayout.build(s.plan, decode_rank=d, prefill_rank=p, layer_pages=lp)
        bound = BoundPages(lay, s.bufs, s.role)
        blocks = np.asarray(blocks, dtype=np.int64)
        dev = None if self.device == "cpu" else torch.from_numpy(blocks).to(self.device)
        stream = lay.stream(int(blocks.shape[0]))
        stage = torch.zeros(
            max(chunk, lay.stream(2).total_bytes), dtype=torch.uint8, device=self.device
        )
        fn = pack if s.role == "prefill" else unpack
        sync = (lambda: None) if self.device == "cpu" else torch.cuda.synchronize
        bounds = list(range(0, stream.total_bytes, chunk)) + [stream.total_bytes]

        def run():
            for a, b in zip(bounds[:-1], bounds[1:]):
                fn(
                    bound,
                    lay,
                    blocks,
                    stage[: b - a],
                    s.role,
                    start=a,
                    end=b,
                    stream=stream,
                    device_block_ids=dev,
                )
            sync()

        ts = _median_time(run, reps, warm=1)
        small = blocks[:2]
        sdev = None if dev is None else dev[:2]
        sst = lay.stream(2)

        def run_small():
            fn(
                bound,
                lay,
                small,
                stage[: sst.total_bytes],
                s.role,
                stream=sst,
                device_block_ids=sdev,
            )
            sync()

        tsmall = _median_time(run_small, 21, warm=2)
        kernel = "per-row" if self.device == "cpu" else "fused"
        ops = _count_ops(kernel, lay.num_rows, lay.num_groups, 1)
        return {
            "bytes": stream.total_bytes,
            "seconds": ts,
            "op_s": statistics.median(tsmall) / max(1, ops),
            "rows": lay.num_rows,
        }

    # -- raw NIXL (the single-descriptor baseline, per-chunk cost) --------------------------------
    def raw_setup(self, name, nbytes, fill, huge=False):
        """A raw NIXL agent with one registered buffer; ``huge``: host memory on transparent
        huge pages, as the endpoint's staging buffer (for the comparison in the JSON)."""
        import torch

        from . import nixl_compat
        from .endpoint import _host_staging

        agent = nixl_compat.create_agent(name)
        if huge and self.device == "cpu":
            t = _host_staging(nbytes)
        else:
            t = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
        if fill:
            _fill_pattern(t, 0)
        reg = agent.register_memory(t)
        self.raw[name] = {"agent": agent, "t": t, "reg": reg, "name": name}
        return agent.get_agent_metadata(), int(t.data_ptr())

    def raw_connect(self, name, md, peer_name, peer_addr):
        r = self.raw[name]
        r["agent"].add_remote_agent(md)
        r["peer"] = peer_name
        r["peer_addr"] = peer_addr
        return True

    def raw_read(self, name, nbytes, reps, op="READ", warm=1):
        """``reps`` transfers of ONE descriptor of ``nbytes`` from the peer (after ``warm``
        untimed ones); seconds each."""
        import torch

        r = self.raw[name]
        a = r["agent"]
        mem = "DRAM" if self.device == "cpu" else "VRAM"
        dev = 0 if self.device == "cpu" else (r["t"].device.index or 0)
        loc = np.array([[r["t"].data_ptr(), nbytes, dev]], dtype=np.uint64)
        rem = np.array([[r["peer_addr"], nbytes, dev]], dtype=np.uint64)
        lh = a.prep_xfer_dlist("NIXL_INIT_AGENT", loc, mem)
        rh = a.prep_xfer_dlist(r["peer"], rem, mem)
        out = []
        try:
            for i in range(reps + warm):
                if self.device != "cpu":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                h = a.make_prepped_xfer(op, lh, [0], rh, [0])
                _post_and_wait(a, h, f"raw {op}", 60)
                dt = time.perf_counter() - t
                h.release()
                if i >= warm:
                    out.append(dt)
        finally:
            lh.release()
            rh.release()
        if op == "READ":
            got = r["t"][: min(nbytes, 1 << 20)].cpu().numpy()
            if not np.array_equal(got, _pattern_bytes(0, 0, got.shape[0])):
                raise BenchError("raw READ moved wrong bytes")
        return out

    def raw_small(self, name, reps):
        """Seconds of one tiny one-row ``initialize_xfer`` READ: per-chunk fixed cost."""
        r = self.raw[name]
        a = r["agent"]
        mem = "DRAM" if self.device == "cpu" else "VRAM"
        dev = 0 if self.device == "cpu" else (r["t"].device.index or 0)
        loc = np.array([[r["t"].data_ptr(), 4096, dev]], dtype=np.uint64)
        rem = np.array([[r["peer_addr"], 4096, dev]], dtype=np.uint64)
        out = []
        for i in range(reps + 2):
            t = time.perf_counter()
            h = a.initialize_xfer(
                "READ", a.get_xfer_descs(loc, mem), a.get_xfer_descs(rem, mem), r["peer"]
            )
            _post_and_wait(a, h, "raw small READ", 30)
            dt = time.perf_counter() - t
            h.release()
            if i >= 2:
                out.append(dt)
        return out

    def raw_close(self, name):
        r = self.raw.pop(name, None)
        if r is not None:
            try:
                r["agent"].deregister_memory(r["reg"])
            except Exception:  # noqa: BLE001
                pass
        return True

    def copy_rate(self, nbytes, reps):
        """Seconds of ``dst.copy_(src)`` of ``nbytes`` on the device (torch)."""
        import torch

        bufs = [torch.empty(nbytes, dtype=torch.uint8, device=self.device)]
        bufs.append(torch.empty_like(bufs[0]))
        bufs[0].fill_(1)
        sync = (lambda: None) if self.device == "cpu" else torch.cuda.synchronize

        def run():
            bufs[1].copy_(bufs[0])
            sync()

        out = _median_time(run, reps, warm=2)
        bufs.clear()
        if self.device != "cpu":
            torch.cuda.empty_cache()
        return out

    def peer_copy_rate(self, nbytes, src, dst, reps):
        """Seconds of ``dst.copy_(src)`` of ``nbytes`` from GPU ``src`` to GPU ``dst``."""
        import torch

        bufs = [
            torch.ones(nbytes, dtype=torch.uint8, device=src),
            torch.empty(nbytes, dtype=torch.uint8, device=dst),
        ]

        def run():
            bufs[1].copy_(bufs[0])
            if dst != "cpu":
                torch.cuda.synchronize(dst)
                torch.cuda.synchronize(src)

        out = _median_time(run, reps, warm=2)
        bufs.clear()
        if dst != "cpu":
            torch.cuda.empty_cache()
        return out

    def device_name(self):
        if self.device == "cpu":
            return None
        import torch

        return torch.cuda.get_device_name()


def _worker_main(conn, device: str) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us (or our pipe closes)
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    if device != "cpu":
        from . import nixl_compat

        nixl_compat.prepare_cuda_env()
    import torch

    torch.set_num_threads(1)
    if device.startswith("cuda:"):
        torch.cuda.set_device(int(device.split(":", 1)[1]))  # one GPU per worker, like an engine
    st = _WorkerState(conn, device)
    conn.send(("ok", os.getpid()))
    idle = 0.0005
    fd = conn.fileno()
    try:
        while True:
            # a busy worker checks its pipe with one select() (~2 us; Connection.poll(0)
            # builds a selector per call, ~20-40 us, which delayed every progress round)
            if st.busy():
                ready = bool(select.select([fd], [], [], 0)[0])
            else:
                ready = conn.poll(idle)
            if not ready:
                if st.sessions or st.raw:
                    if st.poll_all() or st.busy():
                        idle = 0.0005
                    else:
                        idle = min(idle * 2, 0.002)
                continue
            cmd, args, kwargs = conn.recv()
            if cmd == "exit":
                conn.send(("ok", None))
                return
            try:
                if cmd == "hot":
                    st.hot = bool(args[0])
                    out = True
                else:
                    out = getattr(st, cmd)(*args, **kwargs)
                conn.send(("ok", out))
            except Exception as e:  # noqa: BLE001 - shipped to the parent
                conn.send(("err", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))
    finally:
        for name in list(st.sessions):
            try:
                st.teardown(name)
            except Exception:  # noqa: BLE001
                pass
        conn.close()


_POLL_SLEEP_S = float(os.environ.get("LAYOUTC_BENCH_POLL_SLEEP_US", "0") or 0) * 1e-6

#: The bench's deadline (monotonic): no wait for a worker outlives it by more than 20 s.
_DEADLINE: list[float] = [float("inf")]


class _Worker:
    """A worker process and its pipe, as the parent sees it."""

    def __init__(self, ctx, device: str, label: str) -> None:
        self.label = label
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_worker_main, args=(child, device), daemon=True, name=f"layoutc-bench-{label}"
        )
        self.proc.start()
        child.close()
        self.started = False

    def _recv(self, timeout: float, what: str) -> Any:
        timeout = max(1.0, min(timeout, _DEADLINE[0] + 20.0 - time.monotonic()))
        if not self.conn.poll(timeout):
            raise BenchError(f"{self.label}: no answer to {what!r} within {timeout:.0f} s")
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError):
            raise BenchError(
                f"{self.label}: the worker process died ({what}; exit code {self.proc.exitcode})"
            ) from None
        if status == "err":
            raise BenchError(f"{self.label}: {what}: {value}")
        return value

    def send(self, cmd: str, *args: Any, **kwargs: Any) -> None:
        if not self.started:
            self._recv(120, "start")
            self.started = True
        self.conn.send((cmd, args, kwargs))

    def result(self, what: str, timeout: float = 120.0) -> Any:
        return self._recv(timeout, what)

    def call(self, cmd: str, *args: Any, timeout: float = 120.0, **kwargs: Any) -> Any:
        self.send(cmd, *args, **kwargs)
        return self._recv(timeout, cmd)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("exit", (), {}))
                self.conn.poll(10)
            except (OSError, EOFError, BrokenPipeError):
                pass
            self.proc.join(10)
        end_process(self.proc, 5)
        self.conn.close()


# ============================================================================================
# Section: a scattered request through the runtime (CPU: 2 processes; GPU: 3 processes)
# ============================================================================================
def _blocks(nblk: int, pool: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.choice(pool, nblk, replace=False).astype(np.int64),
        rng.choice(pool, nblk, replace=False).astype(np.int64),
    )


def _setup_pair(workers, plan, kinds, nb_p, nb_d, ep_kwargs, tag, placement):
    """Endpoints: ``placement`` = [(worker index, role, rank)]; handshakes exchanged."""
    hs = {}
    for wi, role, rank in placement:
        name = f"{tag}-{role}-{rank}"
        workers[wi].send(
            "setup", name, plan, role, rank, kinds, nb_p if role == "prefill" else nb_d, ep_kwargs
        )
    for wi, role, rank in placement:
        name = f"{tag}-{role}-{rank}"
        hs[(role, rank)] = (wi, name, workers[wi].result(f"setup {name}", 300))
    for (role, _rank), (wi, name, _) in hs.items():
        peers = [b for (r2, _k), (_w, _n, b) in hs.items() if r2 != role]
        workers[wi].call("add_peers", name, peers)
    return {k: (wi, name) for k, (wi, name, _) in hs.items()}


def _run_push(workers, names, rid, pre_by_worker, local, remote, strategy, timeout):
    """Decode ranks expect, prefill ranks push ``local`` (prefill ids) into ``remote`` (decode
    ids); returns seconds from the first push to the last decode completion (the bytes are
    in their pages), infos of the prefill ranks."""
    return _run(workers, names, rid, pre_by_worker, local, remote, strategy, timeout, "push")


def _run_request(workers, names, rid, dec_by_worker, local, remote, strategy, timeout, layers=None):
    """Prefill ranks expect (ready), decode ranks pull; returns seconds, infos."""
    return _run(
        workers, names, rid, dec_by_worker, local, remote, strategy, timeout, "pull", layers
    )


def _run(workers, names, rid, init_by_worker, local, remote, strategy, timeout, op, layers=None):
    """The passive side's ranks ``expect`` (a prefill rank with its block ids: the request is
    ready there) and the initiators (``init_by_worker``: worker index -> session names) start
    ``op``, back to back.  Seconds: from the first start to the last initiator's completion
    (pull) or to the last target's completion (push: the bytes are in place only when the
    decode side completes).  Each info also gets ``from_ready_s``: the same, timed from the
    first ``expect`` call (a prefill rank may pack from then on) when that came first."""
    passive = "prefill" if op == "pull" else "decode"
    others = [(wi, n) for (role, _r), (wi, n) in names.items() if role == passive]
    ready = remote if op == "pull" else None  # the prefill ranks' own ids
    for wi, n in others:
        workers[wi].send("expect", n, rid, timeout_s=timeout, blocks=ready)
    for wi in init_by_worker:
        workers[wi].send(
            "pull",
            init_by_worker[wi],
            rid,
            local,
            remote,
            strategy=strategy,
            within=timeout,
            layers=layers,
            op=op,
        )
    t_ready = [workers[wi].result(f"expect {rid}") for wi, _n in others]
    res = [workers[wi].result(f"{op} {rid}", timeout + 30) for wi in init_by_worker]
    errs = [e for r in res for e in r["errors"]]
    ends = []
    for wi, n in others:
        r = workers[wi].call("result", n, rid, within=timeout, timeout=timeout + 30)
        if r["error"]:
            errs.append(r["error"])
        ends.append(r["t"])
    if errs:
        raise BenchError(f"request {rid} failed: {errs[0]}")
    t0 = min(r["t0"] for r in res)
    t1 = max(ends) if op == "push" else max(r["t1"] for r in res)
    infos = [i for r in res for i in r["infos"]]
    for i in infos:  # host seconds in pull()/push() on the slowest worker (the rest: waiting)
        i["pull_call_s"] = max(r["t_posted"] - r["t0"] for r in res)
        i["from_ready_s"] = t1 - min([t0] + t_ready)
    return t1 - t0, infos


def _tiny_requests(workers, names, dec, db, pb, n) -> dict[str, Any]:
    """Latency of a one-block, one-layer request per strategy (fixed per-request costs)."""
    tiny: dict[str, Any] = {}
    for strat in ("staged", "zero-copy"):
        ts = []
        for i in range(n):
            t, infos = _run_request(
                workers, names, f"tiny-{strat}-{i}", dec, db[:1], pb[:1], strat, 30.0, layers=[0]
            )
            ts.append(t)
        tiny[strat] = min(ts[2:])  # a fixed cost: noise only adds to it
        tiny[strat + "_bytes"] = sum(int(i["bytes"]) for i in infos)
        tiny[strat + "_descriptors"] = sum(int(i["descriptors"]) for i in infos)
    return tiny


def _profile_staged(workers, names, dec, db, pb, layers=None, rid="profile") -> dict[str, Any]:
    """One staged request with every heavy operation timed in each process: how busy each
    process was within the request, and on what (pack, write, read, unpack)."""
    for (_role, _r), (wi, n) in names.items():
        workers[wi].call("trace", n, True)
    t, _ = _run_request(workers, names, rid, dec, db, pb, "staged", 60.0, layers=layers)
    traces: dict[int, list] = {}
    for (_role, _r), (wi, n) in names.items():
        traces.setdefault(wi, []).extend(workers[wi].call("trace", n, False) or [])
    out: dict[str, Any] = {"request_ms": round(t * 1e3, 2)}
    t_first = min((b for ops in traces.values() for _, b, _ in ops), default=0.0)
    timeline = []
    for wi, ops in traces.items():
        for k, b, e in ops:
            timeline.append(
                (round((b - t_first) * 1e3, 3), round((e - b) * 1e3, 3), workers[wi].label, k)
            )
    # every heavy operation and message arrival of the three processes, on one clock (ms)
    out["timeline"] = [list(x) for x in sorted(timeline)]
    for wi, ops in traces.items():
        ops = [x for x in ops if not x[0].startswith(("@", "~"))]  # marks, nested spans
        if not ops:
            continue
        span = max(e for _, _, e in ops) - min(b for _, b, _ in ops)
        by: dict[str, float] = {}
        for k, b, e in ops:
            by[k] = by.get(k, 0.0) + (e - b)
        out[workers[wi].label + " process"] = {
            "busy_ms": round(sum(by.values()) * 1e3, 2),
            "span_ms": round(span * 1e3, 2),
            **{f"{k}_ms": round(v * 1e3, 2) for k, v in sorted(by.items())},
            "ops": len(ops),
        }
    return out


def bench_scattered(
    compile_plan: Callable,
    cfg: BenchConfig,
    out: dict[str, Any],
    log,
    deadline: float,
    cm: dict[str, Any],
) -> None:
    """CPU: flashinfer 8 heads x 128 dims, block 16, P_TP=2 -> D_TP=4, 8 KiB head slices;
    prefill rank 0 in one process, its two readers (decode ranks 0 and 1) in the other.

    Measured in rounds: each round runs the request once per strategy (``cfg.strategy``,
    zero-copy, staged) and NIXL's single-descriptor READ of the same bytes between the same
    two processes (on ordinary and on huge pages), so that drift of the machine hits every
    variant alike; the fractions are per-round ratios.
    """
    runs = cfg.runs or (3 if cfg.quick else 7)
    params = dict(num_key_value_heads=8, head_dim=128, block_size=16)
    layers = 32
    plan = compile_plan("vllm_flashinfer", 2, 4, dict(params, num_layers=layers))
    kinds = ["attention"] * layers
    # bytes per (layer, logical block) for decode rank 0
    per_block = sum(int(g.nbytes) * g.count for g in plan.rank(0).posts)
    piece = int(plan.rank(0).posts[0].nbytes)
    nblk = max(1, cfg.cpu_bytes_per_decode_rank // (per_block * layers))
    pool = nblk * 3 // 2 + 1
    pb, db = _blocks(nblk, pool, 7)
    total = 2 * nblk * layers * per_block
    ctx = mp.get_context("spawn")
    workers = [_Worker(ctx, "cpu", "prefill"), _Worker(ctx, "cpu", "decode")]
    strategies = [cfg.strategy] + [s for s in ("zero-copy", "staged") if s != cfg.strategy]
    results: dict[str, list[float]] = {s: [] for s in strategies}
    from_ready: list[float] = []  # cfg.strategy's requests timed from the prefill's expect
    base: dict[str, list[float]] = {"4k": [], "thp": []}
    chosen: dict[str, Any] = {}
    try:
        ep_kw = dict(timeout_s=60.0, **cfg.extra.get("cpu_endpoint", {}))
        names = _setup_pair(
            workers,
            plan,
            kinds,
            pool,
            pool,
            ep_kw,
            "s",
            [(0, "prefill", 0), (1, "decode", 0), (1, "decode", 1)],
        )
        dec = {1: [names[("decode", 0)][1], names[("decode", 1)][1]]}
        # NIXL alone: one descriptor of the same bytes, ordinary pages and huge pages
        for kind, huge in (("4k", False), ("thp", True)):
            md0, a0 = workers[0].call("raw_setup", f"{kind}-src", total, True, huge)
            md1, a1 = workers[1].call("raw_setup", f"{kind}-dst", total, False, huge)
            workers[0].call("raw_connect", f"{kind}-src", md1, f"{kind}-dst", a1)
            workers[1].call("raw_connect", f"{kind}-dst", md0, f"{kind}-src", a0)
        log(
            f"cpu: {total / MiB:.0f} MiB request (2 decode ranks x {nblk} blocks x {layers} "
            f"layers, {piece // 1024} KiB pieces), {runs} rounds"
        )
        workers[0].call("hot", True)  # the raw source agents progress while idle
        warm = 2
        for i in range(warm + runs):
            if time.monotonic() > deadline:
                raise BenchError("time limit reached")
            for strat in strategies:
                rid = f"{strat}-{i}"
                t, infos = _run_request(workers, names, rid, dec, db, pb, strat, 60.0)
                if i == 0:
                    chosen[strat] = sorted({s for inf in infos for s in inf["strategies"].values()})
                    # verify every run of 16 sampled blocks per decode rank, per strategy
                    for n in dec[1]:
                        workers[1].call("verify", n, [0], db, {0: pb}, timeout=120)
                        workers[1].call("zero", n)
                if i >= warm:
                    results[strat].append(t)
                    if strat == cfg.strategy:
                        from_ready.append(infos[0]["from_ready_s"])
            for kind in ("4k", "thp"):
                ts = workers[1].call(
                    "raw_read", f"{kind}-dst", total, 1, warm=int(i == 0), timeout=120
                )
                if i >= warm:
                    base[kind].extend(ts)
        small = workers[1].call("raw_small", "4k-dst", 50, timeout=120)
        workers[0].call("hot", False)
        for kind in ("4k", "thp"):
            workers[1].call("raw_close", f"{kind}-dst")
            workers[0].call("raw_close", f"{kind}-src")
        # staging kernel rates on the real buffers (for the cost model)
        pk = workers[0].call("pack_rate", names[("prefill", 0)][1], 0, pb, 16 * MiB, 3, timeout=300)
        up = workers[1].call("pack_rate", names[("decode", 0)][1], 0, db, 16 * MiB, 3, timeout=300)
        tiny = _tiny_requests(workers, names, dec, db, pb, 12)
        out["cpu_huge_pages_kib"] = [w.call("huge_pages_kib") for w in workers]
        profile = _profile_staged(workers, names, dec, db, pb)
        busy = {}
        for (role, rank), (wi, n) in sorted(names.items()):
            st = workers[wi].call("stats", n)
            busy[f"{role} rank {rank}"] = {
                k: round(st[k], 4) for k in ("staged_pack_s", "staged_unpack_s", "staged_post_s")
            }
    finally:
        for w in workers:
            w.stop()

    t_auto = results[cfg.strategy]
    _put(
        out,
        "cpu_scattered_fraction_of_single_descriptor",
        [b / t for b, t in zip(base["4k"], t_auto)],
        4,
    )
    _put(
        out,
        "cpu_scattered_fraction_of_single_descriptor_from_ready",
        [b / t for b, t in zip(base["4k"], from_ready)],
        4,
    )
    _put(out, "cpu_scattered_GBps", [total / t / 1e9 for t in t_auto], 4)
    _put(out, "cpu_single_descriptor_GBps", [total / t / 1e9 for t in base["4k"]], 4)
    _put(out, "cpu_single_descriptor_thp_GBps", [total / t / 1e9 for t in base["thp"]], 4)
    _put(
        out,
        "cpu_scattered_fraction_of_single_descriptor_thp",
        [b / t for b, t in zip(base["thp"], t_auto)],
        4,
    )
    for strat in ("zero-copy", "staged"):
        _put(
            out,
            f"cpu_scattered_{strat.replace('-', '_')}_GBps",
            [total / t / 1e9 for t in results[strat]],
            4,
        )
    n_staged_runs = warm + runs
    out["cpu_scattered_case"] = {
        "spec": "vllm_flashinfer",
        "params": dict(params, num_layers=layers),
        "pair": "2->4",
        "processes": "prefill rank 0 | decode ranks 0 and 1 (its two readers, one process)",
        "bytes": total,
        "blocks": nblk,
        "piece_bytes": piece,
        "strategy": cfg.strategy,
        "chosen": chosen,
        "rounds": runs,
        "warm_up_rounds": warm,
        "method": "per round: the request once per strategy, then NIXL's single-descriptor "
        "READ of the same bytes (ordinary pages, then huge pages); fractions are per-round "
        "ratios",
        "staging": "endpoint defaults: 64 MiB in 4 slots of 16 MiB, on huge pages",
        "verified": "every run of 16 sampled blocks per decode rank, once per strategy",
        "host_seconds_in_staged_kernels_all_runs": busy,
        "profile_one_staged_request": profile,
        "staged_requests_measured_in_busy": n_staged_runs * (2 if cfg.strategy != "staged" else 1),
    }
    # cost model constants (host memory)
    link = total / statistics.median(base["4k"])
    zc_desc = total // piece
    t_zc = statistics.median(results["zero-copy"])
    cm["link_Bps"] = link
    cm["descriptor_s"] = max(0.0, (t_zc - total / link) / zc_desc)
    cm["pack_Bps"] = pk["bytes"] / statistics.median(pk["seconds"])
    cm["unpack_Bps"] = up["bytes"] / statistics.median(up["seconds"])
    cm["op_s"] = (pk["op_s"] + up["op_s"]) / 2
    cm["chunk_s"] = max(0.0, statistics.median(small) - cm["descriptor_s"])
    cm["_tiny"] = tiny
    cm["_staged_big"] = (statistics.median(results["staged"]), total, 16 * MiB)
    log(
        f"cpu: {cfg.strategy} {out['cpu_scattered_GBps']:.2f} GB/s (chose "
        f"{', '.join(chosen[cfg.strategy])}), single descriptor {link / 1e9:.2f} GB/s; "
        f"fraction {out['cpu_scattered_fraction_of_single_descriptor']:.3f}"
    )


# ============================================================================================
# Section: GPU
# ============================================================================================
def bench_gpu(
    compile_plan: Callable,
    cfg: BenchConfig,
    out: dict[str, Any],
    log,
    deadline: float,
    cm: dict[str, Any],
) -> None:
    """One GPU, three processes: the scattered P_TP=1 -> D_TP=2 request (auto, zero-copy per
    block, staged) against a torch copy; then a contiguous 1 -> 1 request."""
    runs = cfg.runs or (3 if cfg.quick else 5)
    params = dict(num_key_value_heads=4, head_dim=128, block_size=16)
    ctx = mp.get_context("spawn")
    # (cfg.extra["worker_device"] = "cpu" runs the same flow on host memory: tests)
    dev = cfg.extra.get("worker_device", "cuda")
    workers = [
        _Worker(ctx, dev, "prefill"),
        _Worker(ctx, dev, "decode-0"),
        _Worker(ctx, dev, "decode-1"),
    ]
    ep_kw = dict(
        timeout_s=60.0, staging_bytes=cfg.gpu_staging_bytes, staging_slots=cfg.gpu_staging_slots
    )
    args = (compile_plan, cfg, out, log, deadline, cm, workers, runs, params, ep_kw)
    try:
        out["card"] = workers[0].call("device_name", timeout=180)
        parts = [
            ("scattered", lambda: _gpu_scattered(*args)),
            ("contiguous", lambda: _gpu_contiguous(*args)),
        ]
        errs = _run_parts(parts, deadline, log, "gpu", out)
    finally:
        for w in workers:
            w.stop()
    if errs:
        raise BenchError("; ".join(errs))


def _run_parts(parts, deadline: float, log, what: str, out: dict[str, Any]) -> list[str]:
    """Run each ``(name, fn)`` of a section in turn; a failed part is noted (and logged) and
    the others still run; none starts after ``deadline``.  Returns the failures."""
    errs = []
    for name, fn in parts:
        if time.monotonic() > deadline:
            errs.append(f"{name}: skipped, time limit reached")
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the other parts still run
            errs.append(f"{name}: {type(e).__name__}: {e}")
            log(f"{what} {name}: FAILED: {e}")
        _write_partial(out)
    return errs


class _ScatteredCase(NamedTuple):
    layers: int
    pb: np.ndarray  # prefill block ids
    db: np.ndarray  # decode block ids (each decode rank)
    total: int  # bytes of one request, both decode ranks
    piece: int  # bytes of one head slice of one block
    names: dict[tuple[str, int], tuple[int, str]]
    dec: dict[int, list[str]]  # worker index -> decode session names


def gpu_scattered_setup(compile_plan, cfg, workers, params, ep_kw, tag="g") -> _ScatteredCase:
    """The one-GPU scattered request's endpoints: prefill rank 0 in worker 0, decode ranks 0
    and 1 in workers 1 and 2 (P_TP=1 -> D_TP=2, 32 layers, 8 KiB pieces)."""
    layers = 32
    plan = compile_plan("vllm_flashinfer", 1, 2, dict(params, num_layers=layers))
    kinds = ["attention"] * layers
    per_block = sum(int(g.nbytes) * g.count for g in plan.rank(0).posts)
    nblk = max(1, cfg.gpu_bytes_per_decode_rank // (per_block * layers))
    pool = nblk * 3 // 2 + 1
    pb, db = _blocks(nblk, pool, 11)
    placement = [(0, "prefill", 0), (1, "decode", 0), (2, "decode", 1)]
    names = _setup_pair(workers, plan, kinds, pool, pool, ep_kw, tag, placement)
    dec = {1: [names[("decode", 0)][1]], 2: [names[("decode", 1)][1]]}
    total = 2 * nblk * layers * per_block
    piece = int(plan.rank(0).posts[0].nbytes)
    return _ScatteredCase(layers, pb, db, total, piece, names, dec)


def _gpu_scattered(compile_plan, cfg, out, log, deadline, cm, workers, runs, params, ep_kw) -> None:
    case = gpu_scattered_setup(compile_plan, cfg, workers, params, ep_kw)
    pb, db, total, piece, names, dec = (
        case.pb,
        case.db,
        case.total,
        case.piece,
        case.names,
        case.dec,
    )
    layers = case.layers
    log(
        f"gpu: {out['card']}: {total / MiB:.0f} MiB request (P1->D2, 3 processes, "
        f"{piece // 1024} KiB pieces)"
    )
    copy = workers[0].call("copy_rate", total, max(5, runs * 2), timeout=120)
    _put(out, "gpu_copy_GBps", [total / t / 1e9 for t in copy], 4)
    t_copy = statistics.median(copy)
    res: dict[str, list[float]] = {}
    chosen: dict[str, Any] = {}
    pull_call: dict[str, list[float]] = {}
    ready: dict[str, list[float]] = {}  # the same requests timed from the prefill's expect
    plan_runs = [(cfg.strategy, runs), ("zero-copy", 2 if cfg.quick else 3)]
    if cfg.strategy != "staged":
        plan_runs.append(("staged", runs))
    for strat, n in plan_runs:
        ts = []
        for i in range(n + 1):
            if time.monotonic() > deadline:
                raise BenchError("time limit reached")
            t, infos = _run_request(workers, names, f"{strat}-{i}", dec, db, pb, strat, 60.0)
            if i == 0:  # warm-up (triton compiles, cuda_ipc maps): verified, not timed
                chosen[strat] = sorted({s for inf in infos for s in inf["strategies"].values()})
                for wi, ns in dec.items():
                    for nm in ns:
                        workers[wi].call("verify", nm, [0], db, {0: pb}, timeout=180)
                        workers[wi].call("zero", nm)
                continue
            ts.append(t)
            pull_call.setdefault(strat, []).append(infos[0]["pull_call_s"])
            ready.setdefault(strat, []).append(infos[0]["from_ready_s"])
        res[strat] = ts
        log(
            f"gpu: {strat}: {total / statistics.median(ts) / 1e9:.1f} GB/s "
            f"(chose {', '.join(chosen[strat])})"
        )
        if strat == cfg.strategy:
            _put(out, "gpu_scattered_fraction_of_copy", [t_copy / t for t in ts], 4)
            _put(
                out,
                "gpu_scattered_fraction_of_copy_from_ready",
                [t_copy / t for t in ready[strat]],
                4,
            )
            _put(out, "gpu_scattered_GBps", [total / t / 1e9 for t in ts], 4)
        _write_partial(out)
    t_zc = statistics.median(res["zero-copy"])
    _put(out, "gpu_scattered_speedup_vs_per_block", [t_zc / t for t in res[cfg.strategy]], 4)
    _put(out, "gpu_per_block_GBps", [total / t / 1e9 for t in res["zero-copy"]], 4)
    if "staged" in res:
        _put(out, "gpu_scattered_staged_GBps", [total / t / 1e9 for t in res["staged"]], 4)
    out["gpu_scattered_case"] = {
        "spec": "vllm_flashinfer",
        "params": dict(params, num_layers=layers),
        "pair": "1->2",
        "processes": "prefill rank 0 | decode rank 0 | decode rank 1",
        "bytes": total,
        "blocks": int(db.shape[0]),
        "piece_bytes": piece,
        "strategy": cfg.strategy,
        "chosen": chosen,
        "runs": runs,
        "staging": {"bytes": cfg.gpu_staging_bytes, "slots": cfg.gpu_staging_slots},
        "verified": "every run of 16 sampled blocks per decode rank, once per strategy",
        "request_ms": {k: round(statistics.median(v) * 1e3, 3) for k, v in res.items()},
        "pull_call_ms": {k: round(statistics.median(v) * 1e3, 3) for k, v in pull_call.items()},
        "copy_ms": round(t_copy * 1e3, 3),
    }
    zc_desc = total // piece
    cm["_zero_copy_big"] = (t_zc, total, zc_desc)
    cm["_staged_big"] = (
        statistics.median(res.get("staged", res[cfg.strategy])),
        total,
        cfg.gpu_staging_bytes // cfg.gpu_staging_slots,
    )
    # cost-model constants on the device
    chunk = cfg.gpu_staging_bytes // cfg.gpu_staging_slots
    pk = workers[0].call("pack_rate", names[("prefill", 0)][1], 0, pb, chunk, 3, timeout=180)
    up = workers[1].call("pack_rate", names[("decode", 0)][1], 0, db, chunk, 3, timeout=180)
    cm["pack_Bps"] = pk["bytes"] / statistics.median(pk["seconds"])
    cm["unpack_Bps"] = up["bytes"] / statistics.median(up["seconds"])
    cm["op_s"] = (pk["op_s"] + up["op_s"]) / 2
    cm["_tiny"] = _tiny_requests(workers, names, dec, db, pb, 8)
    out["gpu_tiny_request_ms"] = {
        k: round(v * 1e3, 3) for k, v in cm["_tiny"].items() if not k.endswith(("bytes", "ors"))
    }
    out["gpu_tiny_request_ms"]["profile_staged"] = _profile_staged(
        workers, names, dec, db[:1], pb[:1], layers=[0], rid="tiny-profile"
    )
    out["gpu_scattered_case"]["profile_one_staged_request"] = _profile_staged(
        workers, names, dec, db, pb
    )
    for wi, ns in dec.items():
        for nm in ns:
            workers[wi].call("teardown", nm)
    workers[0].call("teardown", names[("prefill", 0)][1])
    # the same request with the staging cut into the other number of slots (2 or 4), for the
    # record (the key above keeps the configuration)
    alt = 4 if cfg.gpu_staging_slots == 2 else 2
    if time.monotonic() < deadline - 60:
        kw2 = dict(ep_kw, staging_slots=alt)
        case2 = gpu_scattered_setup(compile_plan, cfg, workers, params, kw2, tag="g2")
        names2, dec2 = case2.names, case2.dec  # (the same plan and block ids)
        ts = []
        for i in range(runs + 1):
            t, _ = _run_request(workers, names2, f"two-{i}", dec2, db, pb, cfg.strategy, 60.0)
            if i == 0:
                for wi, ns in dec2.items():
                    for nm in ns:
                        workers[wi].call("verify", nm, [0], db, {0: pb}, timeout=180)
            else:
                ts.append(t)
        _put(out, f"gpu_scattered_fraction_of_copy_{alt}_slots", [t_copy / t for t in ts], 4)
        for wi, ns in dec2.items():
            for nm in ns:
                workers[wi].call("teardown", nm)
        workers[0].call("teardown", names2[("prefill", 0)][1])


def _contiguous_setup(compile_plan, workers, params, ep_kw, nbytes, tag, decode_worker):
    """A 1 -> 1 request of about ``nbytes``: whole pages (16 layers), consecutive block ids on
    both sides; prefill rank 0 in worker 0, decode rank 0 in ``decode_worker``.  Returns
    (names, decode sessions by worker, decode ids, prefill ids, bytes)."""
    layers = 16
    plan = compile_plan("vllm_flashinfer", 1, 1, dict(params, num_layers=layers))
    stride = plan.prefill.page("attention").logical_stride
    n = max(1, nbytes // (stride * layers))
    placement = [(0, "prefill", 0), (decode_worker, "decode", 0)]
    names = _setup_pair(workers, plan, ["attention"] * layers, n + 8, n + 8, ep_kw, tag, placement)
    dec = {decode_worker: [names[("decode", 0)][1]]}
    loc = np.arange(n, dtype=np.int64)
    rem = np.arange(5, 5 + n, dtype=np.int64)
    return names, dec, loc, rem, n * stride * layers


def _gpu_contiguous(
    compile_plan, cfg, out, log, deadline, cm, workers, runs, params, ep_kw
) -> None:
    """1 -> 1, whole pages, consecutive blocks on both sides: 16 layers of 512 MiB (8 GiB;
    the host time around a request, ~0.3-0.6 ms, is what separates it from the copy)."""
    names1, dec1, loc1, rem1, total1 = _contiguous_setup(
        compile_plan, workers, params, ep_kw, cfg.gpu_contiguous_bytes, "c", 1
    )
    n1 = int(loc1.shape[0])
    ts = []
    pull_calls: list[float] = []
    chosen1 = None
    for i in range(runs + 2):
        if time.monotonic() > deadline:
            raise BenchError("time limit reached")
        t, infos = _run_request(workers, names1, f"c-{i}", dec1, loc1, rem1, cfg.strategy, 60)
        if i == 0:
            chosen1 = sorted({s for inf in infos for s in inf["strategies"].values()})
            workers[1].call("verify", dec1[1][0], [0], loc1, {0: rem1}, timeout=180)
        if i >= 2:
            ts.append(t)
            pull_calls.append(infos[0]["pull_call_s"])
    copy1 = workers[2].call("copy_rate", total1, max(5, runs * 2), timeout=120)
    _put(out, "gpu_contiguous_fraction_of_copy", [statistics.median(copy1) / t for t in ts], 4)
    _put(out, "gpu_contiguous_GBps", [total1 / t / 1e9 for t in ts], 4)
    _put(out, "gpu_contiguous_copy_GBps", [total1 / t / 1e9 for t in copy1], 4)
    out["gpu_contiguous_case"] = {
        "spec": "vllm_flashinfer",
        "params": dict(params, num_layers=16),
        "pair": "1->1",
        "bytes": total1,
        "blocks": n1,
        "consecutive": True,
        "chosen": chosen1,
        "descriptors": infos[0]["descriptors"],
        "request_ms": round(statistics.median(ts) * 1e3, 3),
        "copy_ms": round(statistics.median(copy1) * 1e3, 3),
        "pull_call_ms": round(statistics.median(pull_calls) * 1e3, 3),
    }
    cm["link_Bps"] = total1 / statistics.median(ts)
    if "_zero_copy_big" in cm:
        t_zc, nbytes, zc_desc = cm["_zero_copy_big"]
        cm["descriptor_s"] = max(0.0, (t_zc - nbytes / cm["link_Bps"]) / zc_desc)
    log(
        f"gpu: contiguous {total1 / statistics.median(ts) / 1e9:.0f} GB/s, fraction "
        f"{out['gpu_contiguous_fraction_of_copy']:.3f}"
    )


def bench_cross_gpu(compile_plan, cfg: BenchConfig, out: dict[str, Any], log, deadline) -> None:
    """Two GPUs of one host: prefill ranks on GPU 0, decode ranks on GPU 1, one process per
    rank; requests pulled and pushed against a torch peer copy GPU 0 -> GPU 1 of the same
    bytes.  Cases: the scattered request of the one-GPU section (8 KiB pieces) at
    P_TP=1 -> D_TP=2 and P_TP=2 -> D_TP=1, and a contiguous 1 -> 1 request."""
    runs = cfg.runs or (3 if cfg.quick else 5)
    params = dict(num_key_value_heads=4, head_dim=128, block_size=16)
    layers = 32
    ctx = mp.get_context("spawn")
    # (cfg.extra["xgpu_devices"] = ("cpu", "cpu") runs the same flow on host memory: tests)
    src, dst = cfg.extra.get("xgpu_devices", ("cuda:0", "cuda:1"))
    workers = [
        _Worker(ctx, src, "prefill-0"),
        _Worker(ctx, src, "prefill-1"),
        _Worker(ctx, dst, "decode-0"),
        _Worker(ctx, dst, "decode-1"),
    ]
    ep_kw = dict(
        timeout_s=60.0, staging_bytes=cfg.gpu_staging_bytes, staging_slots=cfg.gpu_staging_slots
    )
    base = (compile_plan, cfg, out, log, deadline, workers, runs, params, ep_kw, (src, dst))
    parts = [
        (key, lambda p=p, d=d, key=key: _xgpu_scattered(*base, layers, key, p, d))
        for key, p, d in (("1to2", 1, 2), ("2to1", 2, 1))
    ]
    parts.append(("contiguous", lambda: _xgpu_contiguous(*base)))
    try:
        out["xgpu_case"] = {
            "placement": "prefill ranks on GPU 0, decode ranks on GPU 1, one process per rank",
            "gpus": [w.call("device_name", timeout=180) for w in (workers[0], workers[2])],
            "runs": runs,
            "staging": {"bytes": cfg.gpu_staging_bytes, "slots": cfg.gpu_staging_slots},
            "cases": {},
        }
        errs = _run_parts(parts, deadline, log, "xgpu", out)
    finally:
        for w in workers:
            w.stop()
    if errs:
        raise BenchError("; ".join(errs))


def _xgpu_scattered(
    compile_plan,
    cfg,
    out,
    log,
    deadline,
    workers,
    runs,
    params,
    ep_kw,
    devs,
    layers,
    key,
    p_tp,
    d_tp,
) -> None:
    """One scattered case; ``devs`` = (prefill device, decode device) of the peer copy."""
    plan = compile_plan("vllm_flashinfer", p_tp, d_tp, dict(params, num_layers=layers))
    kinds = ["attention"] * layers
    per_block = sum(int(g.nbytes) * g.count for g in plan.rank(0).posts)  # decode rank 0
    nblk = max(1, cfg.xgpu_bytes_per_decode_rank // (per_block * layers))
    pool = nblk * 3 // 2 + 1
    pb, db = _blocks(nblk, pool, 13)
    total = d_tp * nblk * layers * per_block
    placement = [(r, "prefill", r) for r in range(p_tp)]
    placement += [(2 + r, "decode", r) for r in range(d_tp)]
    names = _setup_pair(workers, plan, kinds, pool, pool, ep_kw, f"x{key}", placement)
    dec = {names[("decode", r)][0]: [names[("decode", r)][1]] for r in range(d_tp)}
    pre = {names[("prefill", r)][0]: [names[("prefill", r)][1]] for r in range(p_tp)}
    piece = int(plan.rank(0).posts[0].nbytes)
    copy = workers[0].call("peer_copy_rate", total, *devs, max(5, runs * 2), timeout=120)
    t_copy = statistics.median(copy)
    _put(out, f"xgpu_{key}_peer_copy_GBps", [total / t / 1e9 for t in copy], 4)
    log(
        f"xgpu {key}: {total / MiB:.0f} MiB, {piece // 1024} KiB pieces; torch peer copy "
        f"{total / t_copy / 1e9:.0f} GB/s"
    )

    def verify():
        for r in range(d_tp):
            wi, nm = names[("decode", r)]
            srcs = list(plan.rank(r).sources)
            workers[wi].call("verify", nm, srcs, db, {s: pb for s in srcs}, timeout=180)
            workers[wi].call("zero", nm)

    case: dict[str, Any] = {
        "spec": "vllm_flashinfer",
        "params": dict(params, num_layers=layers),
        "pair": f"{p_tp}->{d_tp}",
        "bytes": total,
        "blocks": nblk,
        "piece_bytes": piece,
        "copy_ms": round(t_copy * 1e3, 3),
        "verified": "the first request of each variant: every run of 16 sampled blocks "
        "per decode rank, against the pattern of its source prefill rank",
    }
    variants = [("pull", cfg.strategy, runs), ("push", cfg.strategy, runs)]
    variants.append(("pull", "zero-copy", 1 if cfg.quick else 2))
    for mode, strat, n in variants:
        ts = []
        infos: list[dict[str, Any]] = []
        for i in range(n + 1):
            if time.monotonic() > deadline:
                raise BenchError("time limit reached")
            rid = f"x{key}-{mode}-{strat}-{i}"
            if mode == "pull":
                t, infos = _run_request(workers, names, rid, dec, db, pb, strat, 120.0)
            else:
                t, infos = _run_push(workers, names, rid, pre, pb, db, strat, 120.0)
            if i == 0:
                verify()
                continue
            ts.append(t)
        name = mode if strat == cfg.strategy else f"{mode}_{strat.replace('-', '_')}"
        med = _put(out, f"xgpu_{key}_{name}_GBps", [total / t / 1e9 for t in ts], 4)
        _put(out, f"xgpu_{key}_{name}_fraction_of_peer_copy", [t_copy / t for t in ts], 4)
        case[name] = {
            "request_ms": round(statistics.median(ts) * 1e3, 3),
            "strategies": sorted({s for inf in infos for s in inf["strategies"].values()}),
            # per initiating rank: NIXL descriptors it posted, and staged chunks (one NIXL
            # transfer each, posted by the source: the decode posts none for a staged pull)
            "descriptors_per_rank": [int(inf["descriptors"]) for inf in infos],
            "staged_chunks_per_rank": [int(inf.get("chunks") or 0) for inf in infos],
        }
        log(
            f"xgpu {key}: {mode} {strat}: {med / 1e9 * 1e9:.0f} GB/s, "
            f"{t_copy / statistics.median(ts):.2f} of the peer copy, "
            f"{case[name]['descriptors_per_rank']} descriptors, "
            f"{case[name]['staged_chunks_per_rank']} staged chunks"
        )
    out["xgpu_case"]["cases"][key] = case
    for (_role, _r), (wi, nm) in names.items():
        workers[wi].call("teardown", nm)


def _xgpu_contiguous(
    compile_plan, cfg, out, log, deadline, workers, runs, params, ep_kw, devs
) -> None:
    names, dec, loc, rem, total = _contiguous_setup(
        compile_plan, workers, params, ep_kw, cfg.xgpu_contiguous_bytes, "xc", 2
    )
    n1 = int(loc.shape[0])
    ts = []
    infos: list[dict[str, Any]] = []
    for i in range(runs + 2):
        if time.monotonic() > deadline:
            raise BenchError("time limit reached")
        t, infos = _run_request(workers, names, f"xc-{i}", dec, loc, rem, cfg.strategy, 120.0)
        if i == 0:
            workers[2].call("verify", dec[2][0], [0], loc, {0: rem}, timeout=180)
        if i >= 2:
            ts.append(t)
    copy = workers[0].call("peer_copy_rate", total, *devs, max(5, runs * 2), timeout=120)
    t_copy = statistics.median(copy)
    _put(out, "xgpu_contiguous_peer_copy_GBps", [total / t / 1e9 for t in copy], 4)
    _put(out, "xgpu_contiguous_GBps", [total / t / 1e9 for t in ts], 4)
    frac = _put(out, "xgpu_contiguous_fraction_of_peer_copy", [t_copy / t for t in ts], 4)
    out["xgpu_case"]["cases"]["contiguous"] = {
        "pair": "1->1",
        "bytes": total,
        "blocks": n1,
        "consecutive": True,
        "strategies": sorted({s for inf in infos for s in inf["strategies"].values()}),
        "descriptors": int(infos[0]["descriptors"]),
        "request_ms": round(statistics.median(ts) * 1e3, 3),
        "copy_ms": round(t_copy * 1e3, 3),
    }
    log(
        f"xgpu contiguous: {total / statistics.median(ts) / 1e9:.0f} GB/s, {frac:.2f} of the "
        f"peer copy"
    )
    for (_role, _r), (wi, nm) in names.items():
        workers[wi].call("teardown", nm)


# ============================================================================================
# Cost model from the measurements
# ============================================================================================
def fit_cost_model(kind: str, cm: dict[str, Any], base: Any) -> Any:
    """A :class:`CostModel` from measured constants (missing ones keep ``base``'s).

    ``descriptor_s``, ``link_Bps``, ``pack_Bps``, ``unpack_Bps``, ``op_s``, ``chunk_s`` are
    measured directly; ``staged_request_s``/``zero_copy_request_s`` are what a one-block
    request takes beyond the model's other terms; ``overlap`` is solved from the large
    staged request (how much of pack, transfer and unpack ran at the same time).
    """
    vals = {k: float(v) for k, v in cm.items() if not k.startswith("_")}
    model = base.with_values(vals, source="layoutc bench")
    tiny = cm.get("_tiny")
    if tiny:
        z = model.with_values({"zero_copy_request_s": 0.0, "staged_request_s": 0.0})
        pz = z.predict(tiny["zero-copy_descriptors"], tiny["zero-copy_bytes"], 1, 0)
        ps = z.predict(1, tiny["staged_bytes"], 2, 4)
        model = model.with_values(
            {
                "zero_copy_request_s": max(0.0, tiny["zero-copy"] - pz["zero-copy"]),
                "staged_request_s": max(0.0, tiny["staged"] - ps["staged"]),
            }
        )
    big = cm.get("_staged_big")
    if big:
        t, nbytes, chunk = big
        B = float(nbytes)
        c = max(1, math.ceil(nbytes / chunk))
        stages = (B / model.pack_Bps, B / model.link_Bps, B / model.unpack_Bps)
        seq = sum(stages)
        piped = seq / c + (c - 1) / c * max(stages)
        fixed = model.staged_request_s + c * (model.chunk_s + model.descriptor_s)
        bytes_s = max(0.0, t - fixed)
        if seq > piped:
            ov = (seq - bytes_s) / (seq - piped)
            model = model.with_values({"overlap": min(1.0, max(0.0, ov))})
    return model


# ============================================================================================
# Driver
# ============================================================================================
def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        from . import nixl_compat

        mod = nixl_compat.load()
        info["nixl"] = f"{mod.variant} {mod.version}"
    except Exception:  # noqa: BLE001
        info["nixl"] = None
    return info


def _progress(enabled: bool):
    if not enabled:
        return None, lambda msg: None
    try:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    except ImportError:
        return None, lambda msg: print(msg, file=sys.stderr, flush=True)
    console = Console(stderr=True)
    prog = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    prog.start()
    task = prog.add_task("layoutc bench", total=None)

    def log(msg: str) -> None:
        prog.update(task, description=msg)
        console.log(msg)

    return prog, log


def run_bench(cfg: BenchConfig, compile_plan: Callable) -> dict[str, Any]:
    """Run every section the device needs; return the JSON document (also written to
    ``cfg.json_path``).  A section that fails is reported under ``errors``."""
    from .costmodel import CostModel

    t_start = time.monotonic()
    deadline = t_start + cfg.time_limit_s
    _DEADLINE[0] = deadline
    _PARTIAL[0] = (cfg, t_start)
    out: dict[str, Any] = {
        "format": "layoutc.bench/1",
        "command": cfg.command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "card": None,
        "device": cfg.device,
        "quick": cfg.quick,
        "strategy": cfg.strategy,
    }
    errors: dict[str, str] = {}
    kind = "cpu" if cfg.device == "cpu" else "cuda"
    model = CostModel.load(kind)
    out["cost_model_used"] = model.to_dict()
    prog, log = _progress(cfg.progress)
    cm: dict[str, Any] = {}
    sections: list[tuple[str, Callable[[], None]]] = [
        ("expand", lambda: bench_expand(compile_plan, cfg, out, log)),
        ("descriptors", lambda: bench_descriptors(compile_plan, cfg, model, out, log)),
    ]
    if cfg.device == "cpu":
        sections.append(("cpu", lambda: bench_scattered(compile_plan, cfg, out, log, deadline, cm)))
    else:
        sections.append(("gpu", lambda: bench_gpu(compile_plan, cfg, out, log, deadline, cm)))
        if cfg.gpus >= 2:
            sections.append(
                ("xgpu", lambda: bench_cross_gpu(compile_plan, cfg, out, log, deadline))
            )
    out["errors"] = errors
    try:
        for name, fn in sections:
            if time.monotonic() > deadline:
                errors[name] = "skipped: time limit reached"
                continue
            log(f"{name} ...")
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - reported, the other sections go on
                errors[name] = f"{type(e).__name__}: {e}"
                log(f"{name}: FAILED: {e}")
            except KeyboardInterrupt:
                errors[name] = "interrupted"
                log(f"{name}: interrupted")
                break
            _write(cfg, out, t_start)  # what is measured so far survives a kill
        if cm.get("link_Bps"):
            fitted = fit_cost_model(kind, cm, model)
            d = fitted.to_dict()
            d.pop("source", None)
            out["cost_model"] = {
                k: _round(v, 4) if isinstance(v, float) else v for k, v in d.items()
            }
            if cfg.write_cost_model:
                fitted.save(cfg.write_cost_model)
                out["cost_model_written_to"] = cfg.write_cost_model
    finally:
        if prog is not None:
            prog.stop()
    _write(cfg, out, t_start)
    return out


_PARTIAL: list[Any] = [None]  # (cfg, t_start) of the running bench, for _write_partial


def _write_partial(out: dict[str, Any]) -> None:
    if _PARTIAL[0] is not None:
        _write(_PARTIAL[0][0], out, _PARTIAL[0][1])


def _write(cfg: BenchConfig, out: dict[str, Any], t_start: float) -> None:
    out["seconds"] = round(time.monotonic() - t_start, 1)
    out["targets"] = targets(out)
    if cfg.json_path:
        tmp = cfg.json_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, cfg.json_path)


#: (key, target, comparison) of DESIGN.md §9.
TARGETS = (
    ("expand_us_1000_blocks_64_layers", 1000.0, "<="),
    ("expand_speedup_vs_loop", 20.0, ">="),
    ("descriptors_ratio_vs_vllm_long_request", 0.01, "<="),
    ("cpu_scattered_fraction_of_single_descriptor", 0.5, ">="),
    ("gpu_scattered_fraction_of_copy", 0.25, ">="),
    ("gpu_scattered_speedup_vs_per_block", 50.0, ">="),
    ("gpu_contiguous_fraction_of_copy", 0.9, ">="),
)


def targets(out: dict[str, Any]) -> dict[str, Any]:
    res = {}
    for key, target, op in TARGETS:
        v = out.get(key)
        if v is None:
            continue
        ok = v <= target if op == "<=" else v >= target
        res[key] = {"value": v, "target": f"{op} {target:g}", "met": bool(ok)}
    return res


def format_table(out: dict[str, Any]) -> str:
    """The readable table printed on stdout."""
    rows = [
        ("expand_us_1000_blocks_64_layers", "expand: 1,000 scattered blocks x 64 layers (us)"),
        ("expand_speedup_vs_loop", "expand: speed-up over the per-block loop (x)"),
        (
            "descriptors_ratio_vs_vllm_long_request",
            "descriptors per decode rank / vLLM v0.33 (Llama-70B 8->4, 32k)",
        ),
        ("descriptors_llama70b_8to4", "  descriptors we post (vLLM v0.33: 327,680)"),
        (
            "descriptors_hybrid_nemotron_4to2",
            "descriptors, hybrid 4->2, 16-token kernel blocks (vLLM: 12,768)",
        ),
        (
            "descriptors_hybrid_nemotron_4to2_block2096",
            "descriptors, hybrid 4->2, --block-size 2096 (vLLM: 288)",
        ),
        (
            "cpu_scattered_fraction_of_single_descriptor",
            "CPU scattered request / one NIXL descriptor",
        ),
        ("cpu_scattered_GBps", "  CPU scattered request (GB/s)"),
        ("cpu_single_descriptor_GBps", "  CPU one descriptor (GB/s)"),
        ("cpu_single_descriptor_thp_GBps", "  CPU one descriptor, huge pages both sides (GB/s)"),
        (
            "cpu_scattered_fraction_of_single_descriptor_thp",
            "  CPU scattered request / one descriptor on huge pages",
        ),
        ("cpu_scattered_zero_copy_GBps", "  CPU scattered, zero-copy forced (GB/s)"),
        ("cpu_scattered_staged_GBps", "  CPU scattered, staged forced (GB/s)"),
        ("gpu_scattered_fraction_of_copy", "GPU scattered request / torch copy"),
        ("gpu_scattered_GBps", "  GPU scattered request (GB/s)"),
        ("gpu_copy_GBps", "  GPU torch copy (GB/s)"),
        ("gpu_scattered_speedup_vs_per_block", "GPU scattered: speed-up over per-block"),
        ("gpu_per_block_GBps", "  GPU per-block descriptors (GB/s)"),
        ("gpu_contiguous_fraction_of_copy", "GPU contiguous request / torch copy"),
        ("gpu_contiguous_GBps", "  GPU contiguous request (GB/s)"),
    ]
    for key, pair in (("1to2", "1->2"), ("2to1", "2->1")):
        rows += [
            (f"xgpu_{key}_pull_fraction_of_peer_copy", f"2 GPUs {pair} scattered pull / peer copy"),
            (f"xgpu_{key}_pull_GBps", "  pull (GB/s)"),
            (f"xgpu_{key}_push_fraction_of_peer_copy", f"2 GPUs {pair} scattered push / peer copy"),
            (f"xgpu_{key}_push_GBps", "  push (GB/s)"),
            (f"xgpu_{key}_pull_zero_copy_GBps", "  pull, zero-copy forced (GB/s)"),
            (f"xgpu_{key}_peer_copy_GBps", "  torch peer copy GPU 0 -> GPU 1 (GB/s)"),
        ]
    rows += [
        ("xgpu_contiguous_fraction_of_peer_copy", "2 GPUs 1->1 contiguous pull / peer copy"),
        ("xgpu_contiguous_GBps", "  contiguous pull (GB/s)"),
    ]
    tg = out.get("targets", {})
    lines = []
    head = f"{'measure':66s} {'median':>12s} {'[min, max]':>24s}  target"
    lines.append(head)
    lines.append("-" * len(head))
    for key, label in rows:
        if key not in out:
            continue
        v = out[key]
        sp = out.get(key + "_spread")
        sps = f"[{_fmt(sp[0])}, {_fmt(sp[1])}]" if sp else ""
        t = tg.get(key)
        ts = f"{t['target']} {'met' if t['met'] else 'MISSED'}" if t else ""
        lines.append(f"{label:66s} {_fmt(v):>12s} {sps:>24s}  {ts}")
    m = out.get("machine", {})
    lines.append("")
    lines.append(
        f"machine: {m.get('hostname')} ({m.get('cpu_count')} CPUs, {m.get('platform')}); "
        f"card: {out.get('card') or 'none'}; {out.get('seconds')} s"
    )
    if out.get("cost_model"):
        c = out["cost_model"]
        lines.append(
            "cost model (measured): "
            + ", ".join(
                f"{k}={_fmt(c[k])}"
                for k in (
                    "descriptor_s",
                    "link_Bps",
                    "pack_Bps",
                    "unpack_Bps",
                    "chunk_s",
                    "staged_request_s",
                    "op_s",
                    "overlap",
                )
                if k in c
            )
        )
    for k, v in (out.get("errors") or {}).items():
        lines.append(f"error in {k}: {v.splitlines()[0]}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return f"{v:.3g}"
    return str(v)
