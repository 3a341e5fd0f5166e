"""What a bench run reports: fitted cost model, machine, targets, the table."""

from __future__ import annotations

import math
import os
import platform
import socket
from typing import Any

from layoutc.runtime.costmodel import CostModel


def fit_cost_model(kind: str, cm: dict[str, Any], base: CostModel) -> CostModel:
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
        from layoutc.runtime import nixl_compat

        mod = nixl_compat.load()
        info["nixl"] = f"{mod.variant} {mod.version}"
    except Exception:  # noqa: BLE001
        info["nixl"] = None
    return info


TARGETS = (
    ("expand_us_1000_blocks_64_layers", 1000.0, "<="),
    ("expand_speedup_vs_loop", 20.0, ">="),
    ("descriptors_ratio_vs_vllm_long_request", 0.01, "<="),
    ("cpu_scattered_fraction_of_single_descriptor", 0.5, ">="),
    ("gpu_scattered_fraction_of_copy", 0.30, ">="),
    ("gpu_scattered_speedup_vs_per_block", 50.0, ">="),
    ("gpu_contiguous_fraction_of_copy", 0.9, ">="),
    ("gpu_link_limited_scattered_fraction_of_link", 0.9, ">="),
    ("gpu_concurrency_32_p99_over_p50", 2.0, "<="),
    ("gpu_concurrency_32_fraction_of_copy", 0.30, ">="),
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


def _loop_and_engine_rows(
    prefix: str, where: str, copy_key: str, copy_label: str
) -> list[tuple[str, str]]:
    """Table rows of the closed loop and the engine-shaped cases, one placement (``gpu``: all
    ranks on one GPU; ``xgpu``: prefill on GPU 0, decode on GPU 1)."""
    rows: list[tuple[str, str]] = []
    for c in (1, 8, 32):
        key = f"{prefix}_concurrency_{c}"
        rows += [
            (f"{key}_p50_ms", f"{where} closed loop, {c} in flight: p50 ready->done (ms)"),
            (f"{key}_p99_ms", "  p99 (ms)"),
            (f"{key}_p99_over_p50", "  p99 / p50"),
            (f"{key}_GBps", "  aggregate (GB/s)"),
            (f"{key}_fraction_of_{copy_key}", f"  aggregate / {copy_label}"),
        ]
    for key, label in (
        ("llama70b_p8d4_32k", "Llama-70B P8->D4 32k"),
        ("nemotron_nano_p4d2", "Nemotron-3-Nano P4->D2 32k"),
    ):
        key = f"{prefix}_{key}"
        rows += [
            (f"{key}.fraction_of_{copy_key}", f"{where} engine-shaped: {label} / {copy_label}"),
            (f"{key}.descriptors", "  NIXL transfers posted (all ranks)"),
            (f"{key}.verified", "  verified"),
            (f"{key}.scaled_down", "  scaled down"),
        ]
    return rows


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
        ("gpu_scattered_fraction_of_copy_2_slots", "  GPU scattered, 2 slots / torch copy"),
        ("gpu_scattered_fraction_of_copy_4_slots", "  GPU scattered, 4 slots / torch copy"),
        ("gpu_scattered_fraction_of_copy_8_slots", "  GPU scattered, 8 slots / torch copy"),
        ("gpu_scattered_fraction_of_copy_16_slots", "  GPU scattered, 16 slots / torch copy"),
        ("gpu_contiguous_fraction_of_copy", "GPU contiguous request / torch copy"),
        ("gpu_contiguous_GBps", "  GPU contiguous request (GB/s)"),
        (
            "gpu_link_limited_scattered_fraction_of_link",
            "GPU over an emulated link: scattered / one descriptor",
        ),
        ("gpu_link_limited_scattered_GBps", "  scattered over the link (GB/s)"),
        ("gpu_link_GBps", "  one descriptor over the link (GB/s)"),
        ("gpu_link_limited_zero_copy_GBps", "  scattered, zero-copy forced (GB/s)"),
    ]
    rows += _loop_and_engine_rows("gpu", "GPU", "copy", "torch copy")
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
    rows += _loop_and_engine_rows("xgpu", "2 GPUs", "peer_copy", "peer copy")
    tg = out.get("targets", {})
    lines = []
    head = f"{'measure':66s} {'median':>12s} {'[min, max]':>24s}  target"
    lines.append(head)
    lines.append("-" * len(head))
    for key, label in rows:
        top, _, sub = key.partition(".")
        if top not in out or (sub and not isinstance(out[top], dict)):
            continue
        v = out[top][sub] if sub else out[key]
        if sub:
            sp = out.get(top + "_case", {}).get(sub + "_spread")
        else:
            sp = out.get(key + "_spread")
        sps = f"[{fmt(sp[0])}, {fmt(sp[1])}]" if sp else ""
        t = tg.get(key)
        ts = f"{t['target']} {'met' if t['met'] else 'MISSED'}" if t else ""
        lines.append(f"{label:66s} {fmt(v):>12s} {sps:>24s}  {ts}")
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
                f"{k}={fmt(c[k])}"
                for k in (
                    "descriptor_s",
                    "link_Bps",
                    "pack_Bps",
                    "unpack_Bps",
                    "chunk_s",
                    "staged_request_s",
                    "op_s",
                    "overlap",
                    "bounce_Bps",
                )
                if k in c
            )
        )
    for k, v in (out.get("errors") or {}).items():
        lines.append(f"error in {k}: {v.splitlines()[0]}")
    return "\n".join(lines)


def fmt(v: Any) -> str:
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
