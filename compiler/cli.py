"""The compiler's command line: compile, check, plan, explain, specs, init.

The ``layoutc`` console script is :func:`layoutc.tools.cli.main`, which adds the commands that
run the runtime (demo, bench, doctor); this module never imports them.

`main(argv) -> int`: 0 ok, 1 spec errors / stale output / failed run, 2 usage errors,
3 internal errors (compiler bugs).  Never a traceback for bad input.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..runtime.errors import LayoutcError, UsageError
from ..runtime.plan import Plan
from .api import resolve_spec
from .diagnostics import InternalError, LayoutError, render
from .fsutil import write_all_atomically
from .limits import FLAGS, Limits
from .pipeline import BUILTIN, Compiler, SideSets, builtin_specs, spec_name, split_set

#: Codes of the compiler's limits (compiler/limits.py): never a pair the shapes refuse.
LIMIT_CODES = frozenset({"E063", "E064", "E065", "E066", "E067"})

DEFAULT_TPS = (1, 2, 4, 8)
MAX_TP = 1024


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors: exit 2, no traceback
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _pairs(text: str | None) -> list[tuple[int, int]] | None:
    if text is None:
        return None
    out = []
    for item in text.split(","):
        item = item.strip()
        try:
            p, d = item.split(":")
            pair = (int(p), int(d))
        except ValueError:
            raise UsageError(f"--tp-pairs: '{item}' is not P:D (e.g. 2:4)") from None
        if not (0 < pair[0] <= MAX_TP and 0 < pair[1] <= MAX_TP):
            raise UsageError(f"--tp-pairs: '{item}': TP sizes must be in 1..{MAX_TP}")
        out.append(pair)
    return sorted(set(out))


def _display_source(path: str, include_dirs: list[str]) -> str:
    """The spec path as written into generated headers: relative to -I, never absolute."""
    if path.startswith(BUILTIN):
        return path
    ap = os.path.abspath(path)
    for d in include_dirs:
        ad = os.path.abspath(d)
        if ap.startswith(ad + os.sep):
            return os.path.relpath(ap, ad).replace(os.sep, "/")
    if os.path.isabs(path):
        try:
            rel = os.path.relpath(ap)
        except ValueError:
            rel = os.path.basename(path)
        return (rel if not rel.startswith("..") else os.path.basename(path)).replace(os.sep, "/")
    return os.path.normpath(path).replace(os.sep, "/")


def _portable_unit(unit, spec: str, source: str, include_dirs: list[str]):
    """`unit` with the file of every span written into generated code made portable: the spec
    as in the header, family specs relative to -I (or the cwd), never an absolute path."""

    def fix(span):
        if span.file == spec:
            name = source
        elif span.file.startswith(BUILTIN):
            name = span.file
        else:
            name = _display_source(span.file, include_dirs)
        return dataclasses.replace(span, file=name)

    out = copy.copy(unit)
    out.states = {k: dataclasses.replace(v, span=fix(v.span)) for k, v in unit.states.items()}
    out.pages = {k: dataclasses.replace(v, span=fix(v.span)) for k, v in unit.pages.items()}
    return out


def _command(args: argparse.Namespace, spec: str, source: str) -> str:
    """The command that regenerates one module, as written into it (no absolute paths)."""
    if os.path.isabs(spec):
        given = source
    elif not os.path.isfile(spec):  # a built-in spec, by the name the user gave
        given = spec
    else:
        given = os.path.normpath(spec).replace(os.sep, "/")
    parts = ["layoutc", "compile", given]
    out = args.output if not os.path.isabs(args.output) else "OUTDIR"
    parts += ["-o", out]
    for d in args.include:
        parts += ["-I", d if not os.path.isabs(d) else "DIR"]
    for s in args.set or []:
        k, v = split_set(s)
        parts += ["--set", f"{k}={v}"]
    if args.tp_pairs:  # (validated by _pairs; written as given, in canonical form)
        given_pairs = [tuple(int(x) for x in i.split(":")) for i in args.tp_pairs.split(",")]
        parts += ["--tp-pairs", ",".join(f"{p}:{d}" for p, d in dict.fromkeys(given_pairs))]
    return shlex.join(parts)


def _generate(args, compiler: Compiler) -> dict[str, str]:
    """Generated text per output path, for every spec on the command line."""
    out: dict[str, str] = {}
    sets = SideSets.parse(args.set)
    explicit = _pairs(args.tp_pairs)
    from .codegen import render_module

    units = []
    for arg in args.specs:
        spec, data = resolve_spec(arg)
        units.append((spec, compiler.load(spec, data)))
    arg_of = {spec: arg for (spec, _), arg in zip(units, args.specs)}
    declared = set().union(*(u.params for _, u in units))
    for name in sorted(set(sets.common) | set(sets.prefill) | set(sets.decode)):
        if name not in declared:
            raise UsageError(
                f"--set {name}: no spec declares this parameter "
                f"(parameters: {', '.join(sorted(declared)) or 'none'})"
            )
    for spec, unit in units:
        p_bound, d_bound = compiler.bind(unit, sets.only(unit.params))
        pairs = explicit or [(p, d) for p in DEFAULT_TPS for d in DEFAULT_TPS]
        plans = []
        refused: list[tuple[tuple[int, int], LayoutError]] = []
        for p, d in pairs:
            try:
                plans.append(compiler.plan(unit, p_bound, d_bound, p, d))
            except LayoutError as e:
                if explicit or any(x.code in LIMIT_CODES for x in e.diagnostics):
                    raise  # a limit is never a pair the shapes do not allow
                refused.append(((p, d), e))
        if not plans:
            # no default pair works: a spec error, shown with the reason of the first pair
            (p, d), why = refused[0]
            note = (
                f"no TP pair of {{{', '.join(map(str, DEFAULT_TPS))}}} can be compiled with these "
                f"values; this is why prefill TP {p} -> decode TP {d} cannot"
            )
            first = dataclasses.replace(why.diagnostics[0], notes=(*why.diagnostics[0].notes, note))
            raise type(why)([first, *why.diagnostics[1:]])
        source = _display_source(spec, args.include)
        portable = _portable_unit(unit, spec, source, args.include)
        text = render_module(portable, source, plans, _command(args, arg_of[spec], source))
        target = os.path.join(args.output, spec_name(spec) + ".py")
        if target in out:
            raise UsageError(f"two specs would both write {target}; rename one")
        out[target] = text
    return out


def _changed_outputs(outputs: dict[str, str]) -> dict[str, str]:
    """The outputs whose file differs; refuse (before anything is written) to overwrite a file
    layoutc did not generate."""
    changed = {}
    for path, text in outputs.items():
        p = Path(path)
        if p.exists():
            old = p.read_text("utf-8", errors="replace")
            if old == text:
                continue
            if "# @generated" not in old.splitlines()[:3]:
                raise UsageError(
                    f"{path} exists and was not generated by layoutc; not overwriting it"
                )
        changed[path] = text
    return changed


def cmd_compile(args: argparse.Namespace, compiler: Compiler) -> int:
    """Every module or none: all are generated, checked and staged before any is replaced."""
    outputs = _generate(args, compiler)
    changed = _changed_outputs(outputs)
    write_all_atomically(changed)
    for path in outputs:
        print(f"{'wrote' if path in changed else 'unchanged'} {path}", file=sys.stderr)
    return 0


def cmd_check(args, compiler: Compiler) -> int:
    stale = 0
    for path, text in _generate(args, compiler).items():
        try:
            old = Path(path).read_text("utf-8")
        except FileNotFoundError:
            print(f"{path}: missing", file=sys.stderr)
            stale += 1
            continue
        if old != text:
            stale += 1
            diff = difflib.unified_diff(
                old.splitlines(True),
                text.splitlines(True),
                f"{path} (on disk)",
                f"{path} (expected)",
            )
            sys.stdout.writelines(diff)
            print(f"{path}: stale", file=sys.stderr)
    if stale:
        regen = ["layoutc", "compile", *args.specs, "-o", args.output]
        for d in args.include:
            regen += ["-I", d]
        for s in args.set or []:
            regen += ["--set", s]
        if args.tp_pairs:
            regen += ["--tp-pairs", args.tp_pairs]
        print(
            f"{stale} generated file(s) out of date; regenerate with:\n  {shlex.join(regen)}",
            file=sys.stderr,
        )
        return 1
    print(f"up to date: {len(args.specs)} spec(s)", file=sys.stderr)
    return 0


def _one_plan(args: argparse.Namespace, compiler: Compiler) -> Plan:
    for flag, tp in (("--prefill-tp", args.prefill_tp), ("--decode-tp", args.decode_tp)):
        if not 0 < tp <= MAX_TP:
            raise UsageError(f"{flag} {tp}: TP sizes must be in 1..{MAX_TP}")
    spec, data = resolve_spec(args.spec)
    unit = compiler.load(spec, data)
    p, d = compiler.bind(unit, SideSets.parse(args.set))
    return compiler.plan(unit, p, d, args.prefill_tp, args.decode_tp)


def cmd_plan(args, compiler: Compiler) -> int:
    plan = _one_plan(args, compiler)
    if args.format == "json":
        print(json.dumps(plan.to_json(), indent=2))
    else:
        from .explain import render_text

        print(render_text(plan, None))
    return 0


def cmd_explain(args, compiler: Compiler) -> int:
    plan = _one_plan(args, compiler)
    if args.decode_rank is not None and not 0 <= args.decode_rank < plan.decode_tp:
        raise UsageError(f"--decode-rank {args.decode_rank}: decode TP is {plan.decode_tp}")
    from .explain import render_picture, render_text

    if args.output:
        render_picture(plan, args.output, args.decode_rank)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(render_text(plan, args.decode_rank))
    return 0


def cmd_specs(args: argparse.Namespace, compiler: Compiler) -> int:
    """The built-in specs: name, kind, what it holds, and the folder they are installed in."""
    from .pipeline import builtin_specs_dir

    rows = []
    for b in builtin_specs():
        data = b.read().decode("utf-8", errors="replace")
        uses = re.search(r'^use "([^"]+)"', data, re.M)
        if b.kind == "family":
            unit = Compiler().load(b.display, b.read())
            what = "states " + ", ".join(unit.states)
        else:
            what = "uses " + (uses.group(1) if uses else "?")
        rows.append({"name": b.name, "kind": b.kind, "path": b.relpath, "holds": what})
    where = str(builtin_specs_dir())
    if args.format == "json":
        print(json.dumps({"folder": where, "specs": rows}, indent=2))
        return 0
    print(f"built-in specs, installed in {where}")
    print("(give any SPEC argument by name: layoutc plan vllm_mla --prefill-tp 2 --decode-tp 4)")
    for kind, title in (("family", "family specs"), ("model", "model specs")):
        print(f"\n{title}:")
        wn = max(len(r["name"]) for r in rows)
        wp = max(len(r["path"]) for r in rows)
        for r in rows:
            if r["kind"] == kind:
                print(f"  {r['name']:<{wn}}  {r['path']:<{wp}}  {r['holds']}")
    return 0


def _limits(args: argparse.Namespace) -> Limits:
    """The compiler limits of this command (its --max-* flags; defaults otherwise)."""
    values = {}
    for flag, attr, top, _ in FLAGS:
        v = getattr(args, attr, None)
        if v is None:
            continue
        if not 0 < v <= top:
            raise UsageError(f"{flag} {v}: must be in 1..{top}")
        values[attr] = v
    return Limits(**values)


def _add_limit_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("compiler limits (a spec beyond one is a located error)")
    for flag, attr, _, hlp in FLAGS:
        group.add_argument(flag, dest=attr, type=int, metavar="N", help=hlp)


def _add_spec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-I",
        "--include",
        action="append",
        default=[],
        metavar="DIR",
        help="directory searched for `use`d family specs",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="NAME=VALUE",
        help="bind a parameter (prefill.NAME / decode.NAME for one side)",
    )


#: A function adding subcommands: ``(subparsers, add_spec_options) -> None``.
Extension = Callable[[Any, Callable[[argparse.ArgumentParser], None]], None]


def build_parser(extensions: Sequence[Extension] = ()) -> argparse.ArgumentParser:
    """The parser of the compiler's commands, plus those ``extensions`` add (the tools' CLI
    adds ``demo``, ``bench``, ``doctor``)."""
    ap = _Parser(prog="layoutc", description=__doc__.split("\n")[0])
    ap.add_argument("--version", action="version", version=f"layoutc {__version__}")
    ap.add_argument(
        "--error-format",
        choices=["human", "gcc", "json"],
        default="human",
        help="how spec diagnostics are printed (default: human, with source and caret)",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    for name, fn, hlp in (
        ("compile", cmd_compile, "write one plan module per spec"),
        ("check", cmd_check, "fail (exit 1, with a diff) if modules are stale"),
    ):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("specs", nargs="+", metavar="SPEC", help="a .layout file or a built-in name")
        p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
        p.add_argument(
            "--tp-pairs",
            metavar="P:D,...",
            help="pairs to compile (default: every P, D in {1,2,4,8} the shapes allow)",
        )
        _add_spec_options(p)
        _add_limit_options(p)
        p.set_defaults(func=fn)

    for name, fn, hlp in (
        ("plan", cmd_plan, "print one pair's plan (text or JSON)"),
        ("explain", cmd_explain, "draw one pair's plan (SVG/PNG) or print it"),
    ):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("spec", metavar="SPEC", help="a .layout file or a built-in name")
        p.add_argument("--prefill-tp", type=int, required=True, metavar="P")
        p.add_argument("--decode-tp", type=int, required=True, metavar="D")
        _add_spec_options(p)
        _add_limit_options(p)
        if name == "plan":
            p.add_argument("--format", choices=["text", "json"], default="text")
        else:
            p.add_argument("--decode-rank", type=int, metavar="R")
            p.add_argument("-o", "--output", metavar="FILE.svg|FILE.png")
        p.set_defaults(func=fn)

    p = sub.add_parser("specs", help="list the built-in specs and where they are installed")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_specs)

    from . import cli_init

    cli_init.add_commands(sub, _add_spec_options)
    for extend in extensions:
        extend(sub, _add_spec_options)
    return ap


def main(argv: list[str] | None = None, *, extensions: Sequence[Extension] = ()) -> int:
    """Run one command in-process: 0 ok, 1 spec errors / stale output / failed run, 2 usage
    errors, 3 internal errors.  Runs compile, check, plan, explain, init; ``extensions``
    add commands (:mod:`layoutc.tools.cli` is the front door that adds the tools')."""
    compiler = Compiler()
    fmt = "human"
    try:
        parser = build_parser(extensions)
        args = parser.parse_args(argv)
        fmt = args.error_format
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        compiler.include_dirs = list(getattr(args, "include", []) or [])
        compiler.limits = _limits(args)
        return int(args.func(args, compiler))
    except LayoutError as e:
        print(render(e, compiler.sources, "gcc" if fmt == "gcc" else fmt), file=sys.stderr)
        return 1
    except UsageError as e:
        print(f"layoutc: error: {e}", file=sys.stderr)
        return 2
    except InternalError as e:
        print(f"layoutc: internal error (a compiler bug; please report it): {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("layoutc: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help / --version
        return int(e.code or 0)
    except OSError as e:
        print(f"layoutc: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    except MemoryError:
        print(
            "layoutc: error: out of memory; lower the sizes, or the compiler limits "
            "(--max-bytes, --max-runs)",
            file=sys.stderr,
        )
        return 1
    except RecursionError:
        print("layoutc: error: input nested too deeply", file=sys.stderr)
        return 1
    except LayoutcError as e:  # a failed run of a tool (its own errors are printed by it)
        print(f"layoutc: error: {e}", file=sys.stderr)
        return 1
