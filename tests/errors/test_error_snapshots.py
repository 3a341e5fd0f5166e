"""Diagnostics snapshots: every tests/errors/<case>.layout is a malformed or invalid spec, and
tests/errors/<case>.err the exact stderr of `layoutc plan <case>.layout ...` run from this
directory (so paths print relative, as the user gave them).

The first line of a case may carry its arguments: `# args: --prefill-tp 2 --decode-tp 4
--set decode.block_size=32`; cases without it (the binary ones) use `--prefill-tp 1
--decode-tp 1`.  Regenerate the .err files with `pytest tests/errors --update-goldens`.
"""

from __future__ import annotations

import json
import random
import re
import shlex
from pathlib import Path

import pytest
from layoutc.compiler.cli import main

pytestmark = pytest.mark.timeout(60)

HERE = Path(__file__).resolve().parent
CASES = sorted(p.stem for p in HERE.glob("*.layout"))
DEFAULT_ARGS = ["--prefill-tp", "1", "--decode-tp", "1"]
LOCATED = re.compile(r"^(?P<file>[^\s:]+):(?P<line>\d+):(?P<col>\d+): error\[E\d{3}\]: \S", re.M)
CARET = re.compile(r"^  *\^~*$", re.M)


def case_args(case: str) -> list[str]:
    first = (HERE / f"{case}.layout").read_bytes().split(b"\n", 1)[0]
    if first.startswith(b"# args:"):
        return shlex.split(first[len(b"# args:") :].decode())
    return list(DEFAULT_ARGS)


def run_case(case: str, monkeypatch, capsys, *extra: str) -> tuple[int, str, str]:
    monkeypatch.chdir(HERE)
    rc = main([*extra, "plan", f"{case}.layout", *case_args(case)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_enough_cases_and_every_case_has_a_snapshot():
    assert len(CASES) >= 26
    err_files = {p.stem for p in HERE.glob("*.err")}
    assert err_files <= set(CASES), f"orphan .err files: {sorted(err_files - set(CASES))}"


@pytest.mark.parametrize("case", CASES)
def test_error_snapshot(case, monkeypatch, capsys, update_goldens):
    rc, out, err = run_case(case, monkeypatch, capsys)
    assert "Traceback" not in err + out
    assert rc == 1, f"expected exit 1 (spec error), got {rc}:\n{err}"
    assert out == "", "spec errors go to stderr only"
    # located diagnostics, each with the source line and a caret underline
    located = list(LOCATED.finditer(err))
    assert located, err
    assert CARET.search(err), err
    for m in located:
        f = m.group("file")
        assert not Path(f).is_absolute(), "paths print as the user gave them"
        assert f == f"{case}.layout" or f.startswith("<layoutc>/specs/"), f
        assert int(m.group("line")) >= 1 and int(m.group("col")) >= 1
    if len(located) > 1:
        assert err.rstrip("\n").endswith(f"{len(located)} errors")
    snapshot = HERE / f"{case}.err"
    if update_goldens:
        snapshot.write_text(err, encoding="utf-8", newline="\n")
        return
    assert snapshot.exists(), f"missing {snapshot.name}; create it with --update-goldens"
    assert err == snapshot.read_text(encoding="utf-8")


def test_several_errors_are_reported_together(monkeypatch, capsys):
    for case, at_least in (("many_errors", 6), ("many_value_errors", 4)):
        rc, _, err = run_case(case, monkeypatch, capsys)
        assert rc == 1
        assert len(LOCATED.findall(err)) >= at_least, err


def test_binary_fixture_is_the_seeded_one():
    """The committed garbage file is reproducible from its seed (and is not UTF-8)."""
    r = random.Random(0x1A70C)
    data = bytes(r.randrange(256) for _ in range(192))
    assert (HERE / "binary_garbage.layout").read_bytes() == data
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    assert b"\x00" in (HERE / "binary_nul_byte.layout").read_bytes()


def test_parameter_without_default_is_reported_at_its_declaration(monkeypatch, capsys):
    rc, _, err = run_case("param_without_default", monkeypatch, capsys)
    assert rc == 1
    text = (HERE / "param_without_default.layout").read_text().split("\n")
    m = LOCATED.search(err)
    assert text[int(m.group("line")) - 1].startswith("param num_key_value_heads: int")
    # with a value it compiles
    monkeypatch.chdir(HERE)
    assert (
        main(
            [
                "plan",
                "param_without_default.layout",
                *case_args("param_without_default"),
                "--set",
                "num_key_value_heads=8",
            ]
        )
        == 0
    )


def test_tp_error_names_the_dim_and_both_numbers(monkeypatch, capsys):
    _, _, err = run_case("tp_indivisible_heads", monkeypatch, capsys)
    first = err.split("\n")[0]
    assert "'head'" in first and "6" in first and "4" in first


def test_block_size_mismatch_refusal_names_what_cannot_follow_the_tokens(monkeypatch, capsys):
    """Different block sizes are mapped token by token, except for a per-kernel-block state with
    no token dim: the refusal names it, and equal block sizes plan."""
    rc, _, err = run_case("block_size_mismatch", monkeypatch, capsys)
    assert rc == 1 and "16 tokens on prefill" in err and "32 on decode" in err
    assert "state 'scale'" in err and "token by token" in err
    monkeypatch.chdir(HERE)
    args = case_args("block_size_mismatch")
    rc = main(["plan", "block_size_mismatch.layout", *args, "--set", "decode.block_size=16"])
    assert rc == 0, capsys.readouterr().err
    rc, _, err = run_case("block_size_mismatch_mixed_layer", monkeypatch, capsys)
    assert rc == 1 and "layer 'hybrid'" in err and "split them" in err


def test_json_error_format(monkeypatch, capsys):
    rc, out, err = run_case("many_errors", monkeypatch, capsys, "--error-format", "json")
    assert rc == 1 and out == ""
    diags = json.loads(err)
    assert len(diags) == 6
    for d in diags:
        assert d["file"] == "many_errors.layout"
        assert d["severity"] == "error" and re.fullmatch(r"E\d{3}", d["code"])
        assert d["line"] >= 1 and d["col"] >= 1 and d["message"]
    assert [(d["line"], d["col"]) for d in diags] == sorted((d["line"], d["col"]) for d in diags)


def test_gcc_error_format_has_no_source_lines(monkeypatch, capsys):
    rc, _, err = run_case("wrong_arg_count", monkeypatch, capsys, "--error-format", "gcc")
    assert rc == 1
    lines = err.strip("\n").split("\n")
    assert len(lines) == 2 and all(LOCATED.match(line) for line in lines)


@pytest.mark.parametrize("case", ["unknown_name", "binary_garbage", "tp_indivisible_heads"])
def test_compile_and_check_report_spec_errors_and_write_nothing(
    case, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(HERE)
    args = case_args(case)
    pairs = f"{args[1]}:{args[3]}"
    for cmd in ("compile", "check"):
        rc = main([cmd, f"{case}.layout", "-o", str(tmp_path / "out"), "--tp-pairs", pairs])
        out, err = capsys.readouterr()
        assert rc == 1, err
        assert "Traceback" not in err and LOCATED.search(err)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
