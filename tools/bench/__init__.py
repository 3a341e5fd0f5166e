"""``layoutc bench``: the targets of docs/design.md §8, measured on this machine.

Sections (each key of the JSON is the median of repeated runs, with ``<key>_spread`` =
``[min, max]``):

* **expand** (in-process, no NIXL): block ids -> every index array and pack map one decode
  rank's request consumes (both strategies, every source), 1,000 scattered blocks x 64
  layers of the Nemotron-3-Nano-like hybrid spec at P_TP=4 -> D_TP=2, against the per-block
  Python loop (``staging.expand_loop``).
* **descriptors** (no buffers): NIXL descriptors one decode rank would post for a
  32,768-token request with scattered blocks, strategy ``auto`` with this device's cost
  model, against vLLM's counts (docs/vllm-reference.md §9).
* **cpu** (two processes, host memory): a hetero-TP request with scattered blocks and 8 KiB
  head slices through the runtime (``auto``) against NIXL moving the same bytes as ONE
  descriptor between the same two processes.
* **gpu** (``--device cuda``, three processes on one GPU): the P_TP=1 -> D_TP=2 scattered
  request (``auto``) against a torch device-to-device copy of the same bytes and against
  per-block descriptors, with the staging cut into other numbers of slots beside it; a
  contiguous request (1 -> 1, consecutive blocks) against the copy.
* **link** (``--device cuda``): the same scattered request over an emulated link of 5-60
  GB/s (UCX without cuda_ipc, else staging in pinned host memory), against ONE descriptor
  over that link (:mod:`.link`).
* **concurrency** (``--device cuda``): a closed loop of 64 MiB scattered P1 -> D2 requests
  at concurrency 1, 8, 32: p50/p99 ready -> complete, aggregate GB/s (:mod:`.concurrency`).
* **engines** (``--device cuda``): a Llama-3.1-70B P8 -> D4 32k-token request and a
  Nemotron-3-Nano hybrid P4 -> D2 one, every rank a process on the GPU (:mod:`.engines`).
* **cost_model**: constants measured on the way (descriptor cost, link rate, pack/unpack
  rates, per-chunk and per-request overheads, overlap), in the format of
  :class:`~layoutc.runtime.costmodel.CostModel` (``--write-cost-model FILE``).

Worker processes (:mod:`layoutc.tools.harness`) hold real
:class:`~layoutc.runtime.endpoint.Endpoint` objects; the parent only carries handshake bytes
and commands.  Every command has a timeout
and the whole run a time limit; on a failure the bench reports what it measured so far.
The CLI hands :func:`run_bench` a ``compile_plan(spec, prefill_tp, decode_tp, params)``
function (:func:`layoutc.compiler.api.compile_builtin`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from .concurrency import bench_concurrency
from .config import KEYS, BenchConfig, BenchError, Run, round_to
from .counting import bench_descriptors, bench_expand, count_request, nixl_posted
from .cpu import bench_scattered
from .engines import bench_engines
from .gpu import bench_gpu
from .link import bench_link
from .report import fit_cost_model, format_table, machine_info, targets
from .xgpu import bench_cross_gpu

__all__ = [
    "KEYS",
    "BenchConfig",
    "BenchError",
    "bench_concurrency",
    "bench_cross_gpu",
    "bench_engines",
    "bench_gpu",
    "bench_link",
    "count_request",
    "fit_cost_model",
    "format_table",
    "nixl_posted",
    "run_bench",
]


def run_bench(cfg: BenchConfig, compile_plan: Callable[..., Any]) -> dict[str, Any]:
    """Run every section the device needs; return the JSON document (also written to
    ``cfg.json_path``).  A section that fails is reported under ``errors``."""
    from layoutc.runtime.costmodel import CostModel

    t_start = time.monotonic()
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
    prog, log = _progress_log(cfg.progress)
    run = Run(cfg, out, t_start, t_start + cfg.time_limit_s, log, lambda: _write(cfg, out, t_start))
    cm: dict[str, Any] = {}
    sections: list[tuple[str, Callable[[], None]]] = [
        ("expand", lambda: bench_expand(compile_plan, run)),
        ("descriptors", lambda: bench_descriptors(compile_plan, run, model)),
    ]
    if cfg.device == "cpu":
        sections.append(("cpu", lambda: bench_scattered(compile_plan, run, cm)))
    else:
        gpu_sections: dict[str, Callable[[], None]] = {
            "gpu": lambda: bench_gpu(compile_plan, run, cm),
            "link": lambda: bench_link(compile_plan, run, cm),
            "concurrency": lambda: bench_concurrency(compile_plan, run),
            "engines": lambda: bench_engines(compile_plan, run),
        }
        sections += [(n, gpu_sections[n]) for n in cfg.gpu_sections]
        if cfg.gpus >= 2:  # prefill ranks on GPU 0, decode ranks on GPU 1
            sections += [
                ("xgpu", lambda: bench_cross_gpu(compile_plan, run)),
                ("xgpu_concurrency", lambda: bench_concurrency(compile_plan, run, cross=True)),
                ("xgpu_engines", lambda: bench_engines(compile_plan, run, cross=True)),
            ]
    out["errors"] = errors
    try:
        for name, fn in sections:
            if time.monotonic() > run.deadline:
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
            run.checkpoint()  # what is measured so far survives a kill
        if cm.get("link_Bps"):
            fitted = fit_cost_model(kind, cm, model)
            d = fitted.to_dict()
            d.pop("source", None)
            out["cost_model"] = {
                k: round_to(v, 4) if isinstance(v, float) else v for k, v in d.items()
            }
            if cfg.write_cost_model:
                fitted.save(cfg.write_cost_model)
                out["cost_model_written_to"] = cfg.write_cost_model
    finally:
        if prog is not None:
            prog.stop()
    _write(cfg, out, t_start)
    return out


def _progress_log(enabled: bool) -> tuple[Any, Callable[[str], None]]:
    """(a rich progress display or None, a log function) on stderr."""
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


def _write(cfg: BenchConfig, out: dict[str, Any], t_start: float) -> None:
    out["seconds"] = round(time.monotonic() - t_start, 1)
    out["targets"] = targets(out)
    if cfg.json_path:
        tmp = cfg.json_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, cfg.json_path)
