"""Generated modules carry every piece of outside text as a literal, never as code.

Spec paths, ``-I`` and ``-o`` directories, ``--set`` items and ``--tp-pairs`` come from the
user (or a build script fed by others).  Whatever they contain -- quotes, newlines,
backslashes, unicode -- ``layoutc compile`` either writes a module that imports and does only
what a generated module does (an allow-list of its statements), or refuses with a usage
error; ``layoutc check`` then agrees the module is up to date.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import os
import shlex
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layoutc.compiler.cli import main

pytestmark = pytest.mark.timeout(300)

SPEC = """\
param num_key_value_heads: int
param head_dim: int = 64
param block_size: int = 16
param kv_dtype: dtype = bf16

state kv : kv_dtype {
  half  2
  head  num_key_value_heads  split tp
  token block_size           paged
  dim   head_dim
}

page attention = [kv]
layer attention = [attention]
"""

#: Characters that break naive pasting into Python source.
NASTY = ['"', "'", "\\", "\n", "\r", '"""', "{", "}", "#", "\t", "\x0b", "é", "\u2028", "😀"]

_name_char = st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",))
_segment = st.lists(
    st.one_of(st.sampled_from(NASTY), st.text(_name_char, min_size=1, max_size=4)),
    min_size=1,
    max_size=4,
).map("".join)
names = _segment.filter(lambda s: s not in (".", "..") and len(s.encode()) < 200)


def _allowed(tree: ast.Module) -> list[str]:
    """The statements of a generated module that are not of the allowed kinds."""
    bad = []
    consts = {
        "PLAN_FORMAT",
        "LAYOUTC_VERSION",
        "SPEC",
        "SPEC_SHA256",
        "SPANS",
        "PARAMS",
        "LAYER_KINDS",
        "SIDES",
        "PAIRS",
        "COMPILED_PAIRS",
    }
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.ImportFrom) and node.module == "layoutc.runtime.plan":
            if {a.name for a in node.names} <= {"PlanTables", "require_plan_format"}:
                continue
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            t = node.targets[0]
            if isinstance(t, ast.Name) and t.id in consts:
                try:
                    ast.literal_eval(node.value)
                    continue
                except ValueError:
                    pass
            if isinstance(t, ast.Name) and t.id == "_TABLES":
                call = node.value
                if (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Name)
                    and call.func.id == "PlanTables"
                    and not call.args
                    and all(isinstance(k.value, ast.Name | ast.Constant) for k in call.keywords)
                ):
                    continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            call = node.value
            if isinstance(call.func, ast.Name) and call.func.id == "require_plan_format":
                if [ast.unparse(a) for a in call.args] == ["PLAN_FORMAT", "__name__"]:
                    continue
        if isinstance(node, ast.FunctionDef) and node.name == "plan":
            body = node.body[-1]
            if (
                isinstance(body, ast.Return)
                and ast.unparse(body.value) == "_TABLES.plan(prefill_tp, decode_tp)"
            ):
                continue
        bad.append(ast.unparse(node)[:200])
    return bad


def _compile(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    spec_dir=names,
    stem=names,
    inc_dir=names,
    out_dir=names,
    relative=st.booleans(),
    set_junk=st.sampled_from(["", " ", "\t", "\n", "x", '"', "\\", "0"]),
    pairs=st.one_of(
        st.sampled_from(["1:1,2:1", " 1:2 ", "1:1\n", "2:1,1:1"]),
        st.text(min_size=1, max_size=12),
    ),
)
def test_hostile_paths_and_values_give_a_clean_module_or_a_usage_error(
    spec_dir, stem, inc_dir, out_dir, relative, set_junk, pairs
):
    old_cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            (root / spec_dir).mkdir()
            (root / inc_dir).mkdir(exist_ok=True)
            (root / out_dir).mkdir(exist_ok=True)
            spec = root / spec_dir / f"{stem}.layout"
            spec.write_text(SPEC)
        except OSError:
            return  # a name this filesystem refuses: nothing to compile
        os.chdir(root)
        try:
            base = (lambda p: os.path.relpath(p, root)) if relative else str
            argv = [
                "compile",
                base(spec),
                "-o",
                base(root / out_dir),
                "-I",
                base(root / inc_dir),
                "--set",
                f"num_key_value_heads=4{set_junk}",
                "--tp-pairs",
                pairs,
            ]
            rc, err = _compile(argv)
            assert "Traceback" not in err
            written = list((root / out_dir).glob("*.py"))
            if rc != 0:
                assert rc == 2, err  # a usage error; nothing written
                assert written == []
                return
            assert len(written) == 1
            text = written[0].read_text("utf-8")
            tree = ast.parse(text)
            assert _allowed(tree) == []
            name = f"gen_{abs(hash(text))}"
            mod_spec = importlib.util.spec_from_file_location(name, written[0])
            mod = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(mod)
            sys.modules.pop(name, None)
            p, d = mod.COMPILED_PAIRS[0]
            plan = mod.plan(prefill_tp=p, decode_tp=d)
            assert plan.prefill_tp == p and plan.decode_tp == d
            # the regeneration command names the inputs as given (absolute ones replaced)
            cmd = shlex.split(mod._TABLES.compile_command)
            assert cmd[:2] == ["layoutc", "compile"]
            out_arg = cmd[cmd.index("-o") + 1]
            assert out_arg == (base(root / out_dir) if relative else "OUTDIR")
            # and check agrees it is up to date
            rc, err = _compile(["check", *argv[1:]])
            assert rc == 0, err
        finally:
            os.chdir(old_cwd)
