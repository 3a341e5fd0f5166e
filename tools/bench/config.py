"""Configuration, constants and statistics helpers of ``layoutc bench``."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from layoutc.runtime.errors import LayoutcError

MiB = 1 << 20


GiB = 1 << 30


KEYS = (
    "expand_us_1000_blocks_64_layers",
    "expand_speedup_vs_loop",
    "descriptors_ratio_vs_vllm_long_request",
    "cpu_scattered_fraction_of_single_descriptor",
    "gpu_scattered_fraction_of_copy",
    "gpu_scattered_speedup_vs_per_block",
    "gpu_contiguous_fraction_of_copy",
    "gpu_link_limited_scattered_fraction_of_link",
    "gpu_concurrency_32_p99_over_p50",
    "gpu_concurrency_32_fraction_of_copy",
    "gpu_llama70b_p8d4_32k",
    "gpu_nemotron_nano_p4d2",
)


NEMOTRON = dict(
    num_key_value_heads=2,
    head_dim=128,
    mamba_num_heads=64,
    mamba_head_dim=64,
    n_groups=8,
    ssm_state_size=128,
)


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
    # 2 slots: one 512 MiB chunk per decode rank.  On one GPU the three rank processes
    # time-slice it, and each chunk costs the prefill process ~0.1-0.3 ms of host time (a
    # launch, a post) while its GPU work at 128 MiB is ~0.1 ms: more, smaller chunks
    # pipeline but lose (0.17 with 8 slots of 128 MiB on an H100, docs/benchmarks.md), so
    # the variants beside it measure the pipelined cut
    gpu_staging_slots: int = 2
    gpu_scattered_slot_variants: tuple[int, ...] = (8,)
    gpus: int = 1  # >= 2: also the cross-GPU section (prefill on GPU 0, decode on GPU 1)
    xgpu_bytes_per_decode_rank: int = 512 * MiB
    xgpu_contiguous_bytes: int = 4 * GiB
    runs: int = 0  # 0: 3 with --quick, else 7
    # where the sections' workers run: the GPU section's ("cpu" runs its flow on host
    # memory, as the tests do) and the two-GPU section's (prefill, decode) devices
    gpu_worker_device: str = "cuda"
    xgpu_devices: tuple[str, str] = ("cuda:0", "cuda:1")
    # extra Endpoint arguments of the CPU section's endpoints
    cpu_endpoint: dict[str, Any] = field(default_factory=dict)
    # the link-limited section (``--device cuda``): "auto" tries UCX settings without
    # cuda_ipc first, then stages through pinned host memory; "host" / "ucx" force one
    link_mode: str = "auto"
    link_bytes_per_decode_rank: int = 256 * MiB
    link_chunk_bytes: int = 16 * MiB
    link_staging_bytes: int = 128 * MiB
    # request latency under concurrency (closed loop)
    concurrency_levels: tuple[int, ...] = (1, 8, 32)
    concurrency_request_bytes: int = 64 * MiB
    concurrency_layers: int = 32
    # 32 MiB slots: one chunk per (request, decode rank) of the 64 MiB requests
    concurrency_staging_bytes: int = 512 * MiB
    concurrency_staging_slots: int = 16
    # engine-shaped workloads (tools.bench.engines.EngineCase; None: the defaults)
    engine_cases: tuple[Any, ...] | None = None
    engines_staging_bytes: int = 512 * MiB
    engines_staging_slots: int = 4
    engines_copy_bytes: int = 2 * GiB
    # which parts of the --device cuda run to do (names of run_bench's sections)
    gpu_sections: tuple[str, ...] = ("gpu", "link", "concurrency", "engines")


class BenchError(LayoutcError):
    """A bench section failed (it is reported under ``errors``; the others go on)."""


@dataclass
class Run:
    """One bench run as its sections see it: the configuration, the JSON document being
    filled, the time limit, a log line function and ``checkpoint()`` (write what is
    measured so far)."""

    cfg: BenchConfig
    out: dict[str, Any]
    t_start: float
    deadline: float
    log: Callable[[str], None]
    checkpoint: Callable[[], None]

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise BenchError("time limit reached")


def put(out: dict[str, Any], key: str, values: list[float], digits: int = 4) -> float:
    """``out[key]`` = median, ``out[key + "_spread"]`` = [min, max]; returns the median."""
    med = float(statistics.median(values))
    out[key] = round_to(med, digits)
    out[key + "_spread"] = [round_to(min(values), digits), round_to(max(values), digits)]
    return med


def round_to(v: float, digits: int) -> float:
    if v == 0 or not math.isfinite(v):
        return v
    return float(f"{v:.{digits}g}")


def median_time(fn: Callable[[], Any], reps: int, warm: int = 1) -> list[float]:
    for _ in range(warm):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out
