"""The compiler pipeline, one direction: parse -> resolve -> types -> bind -> rank -> plan -> verify.

`PASSES` lists the unit-level semantic passes in the order they run.  Each takes the unit and
a diagnostics sink; a stage ends by raising every diagnostic it collected.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

from ..runtime.plan import Plan
from . import ast
from .bind import Value, bind, parse_value
from .diagnostics import Diagnostic, LayoutSemanticError, Sink, Sources
from .ir import BoundSpec, RankedSpec, Unit
from .limits import DEFAULT, Limits
from .parse import decode_source, parse
from .passes.resolve import resolve
from .passes.shapes import rank
from .passes.types import check_types
from .planner import plan as make_plan
from .verify import verify_plan

PASSES = [check_types]  # after `resolve`, which builds the unit

BUILTIN = "<layoutc>"


def builtin_specs_dir() -> Traversable:
    return resources.files("layoutc.specs")


@dataclass(frozen=True)
class BuiltinSpec:
    """A spec installed with layoutc: a family (`vllm_mla`) or a model (`llama_3_1_8b`)."""

    name: str
    kind: str  # "family" or "model"
    relpath: str  # under the built-in specs folder, e.g. "models/llama_3_1_8b.layout"

    @property
    def display(self) -> str:
        return f"{BUILTIN}/specs/{self.relpath}"

    def read(self) -> bytes:
        return builtin_specs_dir().joinpath(self.relpath).read_bytes()


def builtin_specs() -> list[BuiltinSpec]:
    """Every built-in spec, families first, each sorted by name."""
    root = builtin_specs_dir()
    out = []
    for kind, folder in (("family", root), ("model", root.joinpath("models"))):
        if not folder.is_dir():
            continue
        prefix = "" if kind == "family" else "models/"
        for f in sorted(folder.iterdir(), key=lambda t: t.name):
            if f.is_file() and f.name.endswith(".layout"):
                out.append(BuiltinSpec(f.name[: -len(".layout")], kind, prefix + f.name))
    return out


def find_builtin(name: str) -> BuiltinSpec | None:
    """The built-in spec `name` means: `vllm_mla`, `vllm_mla.layout`, `llama_3_1_8b` or
    `models/llama_3_1_8b[.layout]` (a family wins over a model of the same name)."""
    key = name.removesuffix(".layout")
    for spec in builtin_specs():
        if key in (spec.name, spec.relpath.removesuffix(".layout")):
            return spec
    return None


@dataclass
class SideSets:
    """`--set` values: for both sides, and per side (`prefill.NAME`, `decode.NAME`)."""

    common: dict[str, str] = field(default_factory=dict)
    prefill: dict[str, str] = field(default_factory=dict)
    decode: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def parse(
        items: list[str] | dict[str, str] | None, defaults: dict[str, str] | None = None
    ) -> SideSets:
        """``--set`` items (``NAME=VALUE``, or a dict) over ``defaults`` (a dict)."""
        from .bind import UsageError

        out = SideSets()
        merged = dict(defaults or {})
        if items:
            pairs = items.items() if isinstance(items, dict) else [split_set(i) for i in items]
            merged.update(pairs)
        for k, v in merged.items():
            v = str(v)
            if k.startswith("prefill."):
                out.prefill[k[len("prefill.") :]] = v
            elif k.startswith("decode."):
                out.decode[k[len("decode.") :]] = v
            elif "." in k:
                raise UsageError(f"--set {k}={v}: a side prefix must be 'prefill.' or 'decode.'")
            else:
                out.common[k] = v
        return out

    def only(self, names) -> SideSets:
        """The values naming parameters in `names` (for a command compiling several specs)."""
        return SideSets(
            {k: v for k, v in self.common.items() if k in names},
            {k: v for k, v in self.prefill.items() if k in names},
            {k: v for k, v in self.decode.items() if k in names},
        )

    def side(self, role: str) -> dict[str, str]:
        return {**self.common, **getattr(self, role)}


def split_set(item: str) -> tuple[str, str]:
    from .bind import UsageError

    if "=" not in item:
        raise UsageError(f"--set {item}: expected NAME=VALUE")
    k, v = item.split("=", 1)
    return k.strip(), v.strip()


class Compiler:
    """Loads specs (with `use` resolution against -I dirs and the built-in family specs)."""

    def __init__(self, include_dirs: list[str] | tuple[str, ...] = (), limits: Limits = DEFAULT):
        self.include_dirs = list(include_dirs)
        self.limits = limits
        self.sources = Sources()
        self._hash_parts: list[bytes] = []

    def _read(self, display: str, data: bytes) -> ast.Module:
        text = decode_source(display, data, self.sources)
        self.sources.add(display, text)
        self._hash_parts.append(display.rsplit("/", 1)[-1].encode() + b"\0" + data + b"\0")
        return parse(display, text, self.limits)

    def _roots(self, top: str) -> list[str]:
        """Folders a `use` may resolve into: the top spec's, the -I ones, the built-in specs."""
        roots = [] if top.startswith(BUILTIN) else [os.path.dirname(top) or "."]
        roots += self.include_dirs
        builtin = builtin_specs_dir()
        if isinstance(builtin, Path):
            roots.append(str(builtin))
        return [os.path.realpath(r) for r in roots]

    def _find(self, name: str, from_display: str, top: str) -> tuple[str, bytes] | str:
        """(display path, bytes) of the spec `use "name"` means, or why there is none."""
        if not name.endswith(".layout"):
            return f"cannot use '{name}': a family spec is a .layout file"
        here = os.path.dirname(from_display) if not from_display.startswith(BUILTIN) else None
        candidates = []
        if here is not None:
            candidates.append(os.path.join(here, name) if here else name)
        candidates += [os.path.join(d, name) for d in self.include_dirs]
        roots = self._roots(top)
        outside = None
        for c in candidates:
            if not os.path.isfile(c):
                continue
            real = os.path.realpath(c)
            if any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
                return os.path.normpath(c), Path(c).read_bytes()
            outside = outside or real
        parts = Path(name).parts
        if not os.path.isabs(name) and ".." not in parts:
            builtin = builtin_specs_dir().joinpath(name)
            if builtin.is_file():
                return f"{BUILTIN}/specs/{name}", builtin.read_bytes()
        if outside is not None or os.path.isabs(name) or ".." in parts:
            return (
                f"cannot use '{name}'"
                + (f" ({outside})" if outside else "")
                + ": a family spec must lie in the spec's folder, an -I folder or the built-in "
                "specs"
            )
        where = ", ".join([os.path.dirname(from_display) or "."] + self.include_dirs)
        return f"cannot find family spec '{name}' (looked in {where} and the built-in specs)"

    def load(self, path: str, data: bytes | None = None) -> Unit:
        """Parse and check a spec file; raise LayoutError with every diagnostic."""
        self._hash_parts = []
        if data is None:
            data = Path(path).read_bytes()
        module = self._read(path, data)
        sink = Sink()

        def loader(name: str, span: ast.Span, from_display: str) -> tuple[ast.Module, str] | None:
            found = self._find(name, from_display, path)
            if isinstance(found, str):
                sink.error(found, span, "E015")
                return None
            display, fdata = found
            try:
                return self._read(display, fdata), display
            except LayoutSemanticError as e:  # pragma: no cover - parse raises syntax errors
                sink.diagnostics.extend(e.diagnostics)
                return None

        unit = resolve(module, "", loader, sink, self.limits)
        for p in PASSES:
            p(unit, sink)
        unit.sha256 = hashlib.sha256(b"".join(self._hash_parts)).hexdigest()
        # Errors so far are reported together with the value errors `bind` finds, so that a
        # file's errors of every kind come out at once.
        unit.pending = list(sink.diagnostics)
        return unit

    def bind(self, unit: Unit, sets: SideSets) -> tuple[BoundSpec, BoundSpec]:
        """Bind both sides; raise every error of the spec (name, type and value errors).

        A value missing on one side is reported once.
        """
        sink = Sink(list(unit.pending))
        bound = []
        for role in ("prefill", "decode"):
            values: dict[str, Value] = {
                k: parse_value(unit, k, v) for k, v in sets.side(role).items()
            }
            side_sink = Sink()
            try:
                bound.append(bind(unit, values, side_sink))
            except Exception:
                if not unit.pending:
                    raise
                # a unit with name errors may not be bindable; its name errors are the report
                side_sink.diagnostics.clear()
            for d in side_sink.diagnostics:
                if d not in sink.diagnostics:
                    sink.diagnostics.append(d)
        sink.raise_if_any()
        return bound[0], bound[1]

    def rank_pair(
        self, p: BoundSpec, d: BoundSpec, ptp: int, dtp: int
    ) -> tuple[RankedSpec, RankedSpec]:
        sink = Sink()
        pr = rank(p, ptp, sink, "prefill")
        dr = rank(d, dtp, sink, "decode")
        # the same error on both sides (same parameters, same TP) is reported once
        uniq: list[Diagnostic] = []
        for diag in sink.diagnostics:
            same = diag.message.replace("decode tp", "prefill tp")
            if not any(
                u.span == diag.span and u.message.replace("decode tp", "prefill tp") == same
                for u in uniq
            ):
                uniq.append(diag)
        sink.diagnostics = uniq
        sink.raise_if_any()
        assert pr is not None and dr is not None
        return pr, dr

    def plan(self, unit: Unit, p: BoundSpec, d: BoundSpec, ptp: int, dtp: int) -> Plan:
        pr, dr = self.rank_pair(p, d, ptp, dtp)
        result = make_plan(spec_name(unit.path), unit.sha256, pr, dr, self.limits)
        verify_plan(result, self.limits)
        return result


def spec_name(path: str) -> str:
    """Module name of a spec: its stem with non-identifier characters turned into `_`."""
    stem = os.path.basename(path)
    if stem.endswith(".layout"):
        stem = stem[: -len(".layout")]
    name = "".join(c if (c.isalnum() and c.isascii()) or c == "_" else "_" for c in stem)
    if not name or name[0].isdigit():
        name = "_" + name
    import keyword

    if keyword.iskeyword(name):
        name += "_"
    return name
