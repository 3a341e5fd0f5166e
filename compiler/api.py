"""Programmatic entry points: compile a spec into a verified Plan without the CLI."""

from __future__ import annotations

import os

from ..runtime.errors import UsageError
from ..runtime.plan import Plan
from .pipeline import Compiler, SideSets, find_builtin

__all__ = ["compile_builtin", "compile_plan", "resolve_spec"]


def resolve_spec(spec: str) -> tuple[str, bytes | None]:
    """A path, or the name of a built-in spec (``vllm_mla``, ``llama_3_1_8b``,
    ``models/llama_3_1_8b.layout``), -> (display path, the spec's bytes for a built-in or None
    for a path).  A file wins over a built-in of the same name."""
    if os.path.isfile(spec):
        return spec, None
    found = find_builtin(spec)
    if found is None:
        raise UsageError(
            f"{spec}: no such spec file or built-in spec (`layoutc specs` lists the built-ins)"
        )
    return found.display, found.read()


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
    """Compile `spec` (a path, a built-in spec's name, or the text of a spec) for one TP pair
    and return its Plan.

    `sets` binds parameters like `--set`: ``{"num_key_value_heads": 8, "decode.block_size": 32}``.
    Raises :class:`layoutc.compiler.diagnostics.LayoutError` for spec errors.
    """
    c = Compiler(include_dirs)
    builtin = None if os.path.exists(spec) or "\n" in spec else find_builtin(spec)
    if builtin is not None:
        unit = c.load(builtin.display, builtin.read())
    elif os.path.exists(spec) or spec.endswith(".layout") and "\n" not in spec:
        unit = c.load(spec)
    else:
        unit = c.load("<string>.layout", spec.encode())
    items = {k: str(v) for k, v in sets.items()} if isinstance(sets, dict) else sets
    p, d = c.bind(unit, SideSets.parse(items))
    return c.plan(unit, p, d, prefill_tp, decode_tp)
