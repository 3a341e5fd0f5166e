"""The import rules between the parts of layoutc, checked on every import statement.

Imports point one way: the compiler uses only the runtime's data model (``plan``, ``layout``,
``errors``) and numpy; the runtime imports none of the compiler, tools, connectors, lark,
jinja2 or vllm; tools and connectors build on both; generated modules import only the
runtime's plan module.  Imports inside functions count as much as top-level ones.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "compiler/pkg": "layoutc",
    "compiler": "layoutc.compiler",
    "runtime": "layoutc.runtime",
    "tools": "layoutc.tools",
    "connectors": "layoutc.connectors",
}

#: (part, pattern of forbidden imports, why)
RULES = [
    (
        "layoutc.runtime",
        r"layoutc\.(compiler|tools|connectors)|lark|jinja2|vllm",
        "the runtime imports none of compiler, tools, connectors, lark, jinja2, vllm",
    ),
    (
        "layoutc.compiler",
        r"layoutc\.(tools|connectors)|torch|nixl\w*|vllm|"
        r"layoutc\.runtime(?!\.(plan|layout|errors)$)(\.\w+)*",
        "the compiler imports only the runtime's data model (plan, layout, errors) and numpy",
    ),
    ("layoutc.tools", r"layoutc\.connectors|vllm", "tools build on the runtime and compiler"),
    ("layoutc.connectors", r"layoutc\.tools", "connectors build on the runtime and compiler"),
]


def module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts
    for folder, pkg in FOLDERS.items():
        fp = tuple(folder.split("/"))
        if parts[: len(fp)] == fp:
            rest = [p for p in parts[len(fp) :] if p != "__init__"]
            return ".".join([pkg, *rest])
    raise ValueError(path)


def is_module(name: str) -> bool:
    """Is the layoutc name ``name`` a module or package of this repository?"""
    for folder, pkg in sorted(FOLDERS.items(), key=lambda kv: -len(kv[1])):
        if name == pkg or name.startswith(pkg + "."):
            rel = name[len(pkg) :].lstrip(".").replace(".", "/")
            base = ROOT / folder / rel if rel else ROOT / folder
            return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
    return False


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """Every module ``path`` imports, absolute, with its line (nested imports included)."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import mod` may import a module: count both
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names if a.name != "*"]
    return out


def violations(files: list[Path]) -> list[str]:
    bad = []
    for path in files:
        module = module_of(path)
        for part, pattern, why in RULES:
            if module != part and not module.startswith(part + "."):
                continue
            for line, target in imports(path, module):
                # `from layoutc.runtime.plan import Plan` adds "layoutc.runtime.plan.Plan":
                # a name imported from a module is judged by its module
                if target.startswith("layoutc.") and not is_module(target):
                    target = target.rpartition(".")[0]
                if re.fullmatch(rf"({pattern})(\..*)?", target):
                    bad.append(f"{path.relative_to(ROOT)}:{line}: imports {target} ({why})")
    return bad


def source_files() -> list[Path]:
    out = []
    for folder in ("compiler", "runtime", "tools", "connectors"):
        out += [p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(out)


def test_every_import_follows_the_layering():
    assert violations(source_files()) == []


def test_the_check_sees_nested_and_relative_imports(tmp_path, monkeypatch):
    """The checker is not vacuous: imports of the wrong kind are found wherever they are."""
    bad = ROOT / "runtime" / "_layering_probe.py"
    bad.write_text(
        textwrap.dedent(
            """
            from ..compiler import api

            def f():
                import lark
                from ..tools import harness
            """
        )
    )
    try:
        found = violations([bad])
    finally:
        bad.unlink()
    assert len(found) >= 3, found
    assert any("layoutc.compiler" in f for f in found)
    assert any("lark" in f for f in found)
    assert any("layoutc.tools" in f for f in found)


def test_generated_modules_import_only_the_runtime_plan():
    for mod in sorted((ROOT / "tests" / "golden").glob("*/*.py")):
        tree = ast.parse(mod.read_text("utf-8"))
        targets = {
            (n.module if isinstance(n, ast.ImportFrom) else a.name)
            for n in ast.walk(tree)
            if isinstance(n, ast.Import | ast.ImportFrom)
            for a in n.names
        }
        assert targets <= {"layoutc.runtime.plan", "numpy"}, (mod, targets)


def test_only_the_harness_starts_processes_in_tools():
    """Tools start worker processes through ``layoutc.tools.harness`` only."""
    pattern = re.compile(
        r"\b(multiprocessing|subprocess|os\.fork|os\.spawn\w*|os\.exec\w*|os\.system|"
        r"os\.posix_spawn|Popen|get_context)\b"
    )
    found = []
    for path in sorted((ROOT / "tools").rglob("*.py")):
        if path.name == "harness.py" and path.parent == ROOT / "tools":
            continue
        for i, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code):
                found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert found == []


def _definitions(regex: str) -> list[str]:
    found = []
    for path in source_files():
        for i, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if re.search(regex, line.split("#", 1)[0]):
                found.append(f"{path.relative_to(ROOT)}:{i}")
    return found


@pytest.mark.parametrize(
    "what, regex",
    [
        ("the strategy names", r"\(\s*\"zero-copy\",\s*\"staged\""),
        ("the fault list", r"\"kill-prefill\",\s*\"kill-decode\""),
        ("--set parsing", r"\.split\(\"=\",\s*1\)|\.partition\(\"=\"\)"),
        ("dtype sizes", r"\"fp32\":\s*4"),
        ("the movers", r"\"reader\",\s*\"writer\""),
    ],
)
def test_shared_names_are_defined_once(what, regex):
    found = _definitions(regex)
    assert len(found) == 1, f"{what} defined at {found}"


def test_compiling_needs_neither_torch_nor_nixl(tmp_path):
    """``pip install layoutc`` (no extras) compiles specs and imports generated modules: with
    torch and every NIXL module made unimportable, compile a built-in spec, import the
    module, take a plan; ``layoutc.runtime`` imports too."""
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "nixl", "nixl_cu12", "nixl_cu13", "triton"):
                    raise ImportError(f"{{name}} is not installed (blocked by the test)")
                return None

        sys.meta_path.insert(0, Block())
        from importlib import resources
        from layoutc.compiler.cli import main
        spec = str(resources.files("layoutc.specs").joinpath("vllm_mla.layout"))
        rc = main(["compile", spec, "-o", {str(tmp_path)!r},
                   "--set", "kv_lora_rank=512", "--set", "qk_rope_head_dim=64",
                   "--tp-pairs", "1:2"])
        assert rc == 0, rc
        sys.path.insert(0, {str(tmp_path)!r})
        import vllm_mla
        plan = vllm_mla.plan(prefill_tp=1, decode_tp=2)
        assert plan.decode_tp == 2
        import layoutc.runtime as rt
        assert rt.Plan is type(plan)
        assert rt.LayoutcError and "Endpoint" in rt.__all__
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "nixl_cu13", "triton"))
        assert bad == [], bad
        print("ok")
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")
