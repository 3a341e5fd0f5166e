"""``layoutc``, the front door: the compiler's commands plus those that run the runtime.

:func:`main` is the console script (and ``python -m layoutc``).  It adds ``demo``, ``bench``
and ``doctor`` to :func:`layoutc.compiler.cli.main`, which keeps running compile, check, plan,
explain and init on its own.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from layoutc.compiler import cli as compiler_cli
from layoutc.compiler.api import compile_builtin, resolve_spec
from layoutc.compiler.pipeline import Compiler, SideSets
from layoutc.runtime.endpoint import STRATEGIES
from layoutc.runtime.errors import LayoutcError, UsageError
from layoutc.runtime.plan import Plan

from .demo import DEMO_SETS, DEMO_SPEC, INJECTIONS, MODES

__all__ = ["main"]


def _compile_for_demo(args: argparse.Namespace, compiler: Compiler) -> Plan:
    path, data = resolve_spec(args.spec or DEMO_SPEC)
    unit = compiler.load(path, data)
    defaults = DEMO_SETS if args.spec is None else None
    p, d = compiler.bind(unit, SideSets.parse(args.set, defaults=defaults))
    return compiler.plan(unit, p, d, args.prefill_tp, args.decode_tp)


def cmd_demo(args: argparse.Namespace, compiler: Compiler) -> int:
    for name in ("requests", "layers", "blocks", "prefill_tp", "decode_tp"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    for name in ("prefill_gpus", "decode_gpus"):
        raw = getattr(args, name)
        try:
            gpus = [int(x) for x in raw.split(",")]
        except ValueError:
            raise UsageError(
                f"--{name.replace('_', '-')} {raw}: expected GPU indices like 0 or 0,1"
            ) from None
        if raw != "0" and args.device != "cuda":
            raise UsageError(f"--{name.replace('_', '-')} needs --device cuda")
        setattr(args, name, gpus)
    plan = _compile_for_demo(args, compiler)
    from .demo import run_demo

    try:
        result = run_demo(
            plan,
            mode=args.mode,
            requests=args.requests,
            layers=args.layers,
            blocks=args.blocks,
            device=args.device,
            inject=args.inject,
            timeout_s=args.timeout,
            progress=not args.quiet,
            strategy=args.strategy,
            prefill_gpus=args.prefill_gpus,
            decode_gpus=args.decode_gpus,
        )
    except UsageError:
        raise
    except LayoutcError as e:
        print(f"layoutc demo: failed: {e}", file=sys.stderr)
        return 1
    print(result.summary())
    if not result.ok:
        print(f"layoutc demo: failed: {result.error}", file=sys.stderr)
        return 1
    print(f"verified: {result.verified_line()}")
    return 0


def cmd_bench(args: argparse.Namespace, compiler: Compiler) -> int:
    from .bench import BenchConfig, format_table, run_bench

    if args.device == "cuda":
        try:
            import torch
        except ImportError:
            raise UsageError("--device cuda needs torch with CUDA") from None
        if not torch.cuda.is_available():
            raise UsageError("--device cuda requested but torch sees no CUDA device")
        if args.gpus > torch.cuda.device_count():
            raise UsageError(
                f"--gpus {args.gpus}: torch sees {torch.cuda.device_count()} CUDA device(s)"
            )
    if args.gpus < 1:
        raise UsageError("--gpus must be at least 1")
    if args.gpus > 1 and args.device != "cuda":
        raise UsageError("--gpus needs --device cuda")
    if args.time_limit is not None and args.time_limit <= 0:
        raise UsageError("--time-limit must be positive")
    if args.runs is not None and args.runs < 1:
        raise UsageError("--runs must be at least 1")
    for path in (args.json, args.write_cost_model):
        if path is not None:
            d = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(d):
                raise UsageError(f"{path}: no such directory {d}")
    limit = args.time_limit
    if limit is None:
        limit = 280.0 if args.device == "cpu" else 330.0
    extra: dict[str, Any] = {}
    if args.sections is not None:
        if args.device != "cuda":
            raise UsageError("--sections needs --device cuda")
        names = tuple(x.strip() for x in args.sections.split(",") if x.strip())
        known = BenchConfig().gpu_sections
        bad = [x for x in names if x not in known]
        if bad or not names:
            raise UsageError(
                f"--sections: unknown section {', '.join(bad) or '(none)'} "
                f"(known: {', '.join(known)})"
            )
        extra["gpu_sections"] = names
    cfg = BenchConfig(
        quick=args.quick,
        device=args.device,
        strategy=args.strategy,
        json_path=args.json,
        write_cost_model=args.write_cost_model,
        time_limit_s=limit,
        command=" ".join(["layoutc", *sys.argv[1:]]) if sys.argv else "layoutc bench",
        progress=not args.quiet,
        runs=args.runs or 0,
        gpus=args.gpus,
        **extra,
    )

    def _term(signum: int, frame: Any) -> None:  # SIGTERM: stop like Ctrl-C (JSON kept)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    try:
        out = run_bench(cfg, compile_builtin)
    finally:
        signal.signal(signal.SIGTERM, old)
    sys.stderr.flush()
    print(format_table(out), flush=True)
    if args.json:
        print(f"wrote {args.json}")
    return 1 if out.get("errors") else 0


def cmd_doctor(args: argparse.Namespace, compiler: Compiler) -> int:
    from .doctor import run_doctor

    lines, warnings, code, _ = run_doctor(live=not args.no_transfer)
    for line in lines:
        print(line)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return code


def add_commands(sub: Any, add_spec_options: Any) -> None:
    p = sub.add_parser(
        "demo", help="end-to-end transfer between real processes, every byte verified"
    )
    p.add_argument(
        "spec",
        nargs="?",
        metavar="SPEC",
        help=f"spec path or built-in name (default: {DEMO_SPEC} with a small model)",
    )
    add_spec_options(p)
    p.add_argument("--prefill-tp", type=int, default=2, metavar="P")
    p.add_argument("--decode-tp", type=int, default=4, metavar="D")
    p.add_argument("--mode", choices=MODES, default="pull")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--blocks", type=int, default=32, help="logical blocks per request")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--prefill-gpus",
        default="0",
        metavar="LIST",
        help="with --device cuda: GPUs of the prefill ranks, rank r on LIST[r %% len] (default 0)",
    )
    p.add_argument(
        "--decode-gpus",
        default="0",
        metavar="LIST",
        help="with --device cuda: GPUs of the decode ranks (e.g. 1, or 0,1; default 0)",
    )
    p.add_argument(
        "--inject", choices=INJECTIONS, help="inject a fault (the run must fail cleanly)"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds any single wait may take")
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="auto",
        help="how requests move bytes: one descriptor per run (zero-copy), packed into a "
        "staging buffer (staged), or chosen per request by the cost model (auto)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "bench",
        help="measure planning, descriptor counts and transfer rates against the targets",
    )
    p.add_argument("--quick", action="store_true", help="fewer repetitions (CPU: < 5 minutes)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="auto",
        help="strategy of the measured requests (default auto)",
    )
    p.add_argument(
        "--write-cost-model", metavar="FILE", help="save the measured cost-model constants"
    )
    p.add_argument(
        "--gpus",
        type=int,
        default=1,
        metavar="N",
        help="with --device cuda: 2 adds the cross-GPU section (prefill ranks on GPU 0, "
        "decode ranks on GPU 1)",
    )
    p.add_argument("--runs", type=int, help="repetitions per measurement")
    p.add_argument(
        "--sections",
        metavar="LIST",
        help="with --device cuda: which of gpu,link,concurrency,engines to run (default all)",
    )
    p.add_argument("--time-limit", type=float, help="seconds before remaining sections are skipped")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("doctor", help="check NIXL, UCX transports and settings; a live transfer")
    p.add_argument("--no-transfer", action="store_true", help="skip the live transfer")
    p.set_defaults(func=cmd_doctor)


def main(argv: list[str] | None = None) -> int:
    """The ``layoutc`` command: ``main(argv) -> int`` (0 ok, 1 spec errors / stale output /
    failed run, 2 usage errors, 3 internal errors)."""
    return compiler_cli.main(argv, extensions=(add_commands,))
