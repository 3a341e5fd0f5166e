"""The CLI commands that execute plans: `demo`, `doctor` (and their defaults)."""

from __future__ import annotations

import os
import sys

from .bind import UsageError
from .pipeline import BUILTIN, Compiler, SideSets, builtin_specs_dir

#: The built-in demo: a small hybrid attention + Mamba2 model whose KV heads (2) and B/C groups
#: (2) are replicated at decode TP 4, so every mechanism of the planner is exercised.
DEMO_SPEC = "vllm_hybrid_mamba2"
DEMO_SETS = {
    "num_key_value_heads": "2",
    "head_dim": "64",
    "block_size": "16",
    "mamba_num_heads": "8",
    "mamba_head_dim": "16",
    "n_groups": "2",
    "ssm_state_size": "16",
}

INJECT = ("kill-prefill", "kill-decode", "bad-blocks", "spec-mismatch")


def resolve_spec(spec: str | None) -> tuple[str, bytes | None]:
    """A path, or the name of a built-in family spec (`vllm_mla`), -> (display path, data)."""
    if spec is None:
        spec = DEMO_SPEC
    if os.path.isfile(spec):
        return spec, None
    name = spec if spec.endswith(".layout") else spec + ".layout"
    f = builtin_specs_dir().joinpath(name)
    if f.is_file():
        return f"{BUILTIN}/specs/{name}", f.read_bytes()
    raise UsageError(f"{spec}: no such spec file or built-in spec")


def _compile_for_demo(args, compiler: Compiler):
    path, data = resolve_spec(args.spec)
    unit = compiler.load(path, data)
    sets = dict(DEMO_SETS) if args.spec is None else {}
    for item in args.set or []:
        if "=" not in item:
            raise UsageError(f"--set {item}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        sets[k.strip()] = v.strip()
    p, d = compiler.bind(unit, SideSets.parse(sets))
    plan = compiler.plan(unit, p, d, args.prefill_tp, args.decode_tp)
    return plan


def cmd_demo(args, compiler: Compiler) -> int:
    for name in ("requests", "layers", "blocks", "prefill_tp", "decode_tp"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    plan = _compile_for_demo(args, compiler)
    from ..runtime.demo import run_demo
    from ..runtime.errors import LayoutcRuntimeError

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
        )
    except LayoutcRuntimeError as e:
        print(f"layoutc demo: failed: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # arguments run_demo cannot honour (e.g. no CUDA device)
        raise UsageError(str(e)) from None
    print(result.summary())
    if not result.ok:
        print(f"layoutc demo: failed: {result.error}", file=sys.stderr)
        return 1
    print(f"verified: {result.verified_line()}")
    return 0


def cmd_doctor(args, compiler: Compiler) -> int:
    from ..runtime.doctor import run_doctor

    lines, warnings, code = run_doctor(live=not args.no_transfer)
    for line in lines:
        print(line)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return code


def add_commands(sub, add_spec_options) -> None:
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
    p.add_argument("--mode", choices=["pull", "push"], default="pull")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--blocks", type=int, default=32, help="logical blocks per request")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--inject", choices=INJECT, help="inject a fault (the run must fail cleanly)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds any single wait may take")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("doctor", help="check NIXL, UCX transports and settings; a live transfer")
    p.add_argument("--no-transfer", action="store_true", help="skip the live transfer")
    p.set_defaults(func=cmd_doctor)
