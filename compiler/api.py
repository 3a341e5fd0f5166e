"""Programmatic entry points: compile a spec into a verified Plan without the CLI."""

from __future__ import annotations

import os

from ..runtime.errors import UsageError
from ..runtime.plan import Plan
from .pipeline import BUILTIN, Compiler, SideSets, builtin_specs_dir

__all__ = ["compile_builtin", "compile_plan", "resolve_spec"]


def resolve_spec(spec: str) -> tuple[str, bytes | None]:
    """A path, or the name of a built-in family spec (``vllm_mla``), -> (display path, the
    spec's bytes for a built-in or None for a path)."""
    if os.path.isfile(spec):
        return spec, None
    name = spec if spec.endswith(".layout") else spec + ".layout"
    if "/" not in name and "\\" not in name:
        f = builtin_specs_dir().joinpath(name)
        if f.is_file():
            return f"{BUILTIN}/specs/{name}", f.read_bytes()
    raise UsageError(f"{spec}: no such spec file or built-in spec")


def compile_builtin(
    name: str, prefill_tp: int, decode_tp: int, sets: dict[str, object] | None = None
) -> Plan:
    """Compile the built-in spec ``name`` (e.g. ``"vllm_flashinfer"``) for one TP pair."""
    path, data = resolve_spec(name)
    c = Compiler()
    unit = c.load(path, data)
    p, d = c.bind(unit, SideSets.parse({k: str(v) for k, v in (sets or {}).items()}))
    return c.plan(unit, p, d, prefill_tp, decode_tp)


def compile_plan(
    spec: str,
    prefill_tp: int,
    decode_tp: int,
    sets: dict[str, object] | list[str] | None = None,
    include_dirs: tuple[str, ...] = (),
) -> Plan:
    """Compile `spec` (a path, or the text of a spec) for one TP pair and return its Plan.

    `sets` binds parameters like `--set`: ``{"num_key_value_heads": 8, "decode.block_size": 32}``.
    Raises :class:`layoutc.compiler.diagnostics.LayoutError` for spec errors.
    """
    c = Compiler(include_dirs)
    if os.path.exists(spec) or spec.endswith(".layout") and "\n" not in spec:
        unit = c.load(spec)
    else:
        unit = c.load("<string>.layout", spec.encode())
    if isinstance(sets, dict):
        sets = {k: str(v) for k, v in sets.items()}
    p, d = c.bind(unit, SideSets.parse(sets))
    return c.plan(unit, p, d, prefill_tp, decode_tp)
