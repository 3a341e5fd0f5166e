"""Compiler limits: each one a located error (exit 1), never a traceback, a MemoryError or a
signal, in a child process held to a 2 GiB address space.  The 120 s timeout only guards
against a hang; none of this is a speed test."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

AS_LIMIT = 2 << 30
NANO = [
    *("--set", "num_key_value_heads=2", "--set", "head_dim=128"),
    *("--set", "mamba_num_heads=64", "--set", "mamba_head_dim=64"),
    *("--set", "n_groups=8", "--set", "ssm_state_size=128"),
]
STATE = "state s : fp32 {{ {dims} }}\npage p = [s]\n"


def _limit_memory() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def layoutc_child(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "layoutc", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_memory,
    )


def assert_located(r: subprocess.CompletedProcess[str], code: str, file: str) -> re.Match[str]:
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    for bad in ("Traceback", "MemoryError", "RecursionError"):
        assert bad not in r.stderr, r.stderr[-2000:]
    m = re.search(rf"^{re.escape(file)}:(\d+):(\d+): error\[{code}\]: (.*)$", r.stderr, re.M)
    assert m, r.stderr[-2000:]
    assert re.search(r"^ +\^~*$", r.stderr, re.M), "the source line and a caret"
    return m


def plan(cwd: Path, spec: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return layoutc_child(cwd, "plan", spec, "--prefill-tp", "1", "--decode-tp", "2", *extra)


def test_kernel_blocks_count_in_the_described_bytes(tmp_path):
    """kernel_blocks 10**6 on a hybrid: 32 GB per logical block, refused at `kernel_blocks`."""
    r = layoutc_child(
        tmp_path,
        "compile",
        "vllm_hybrid_mamba2",
        "-o",
        "gen",
        *NANO,
        "--set",
        "kernel_blocks=1000000",
    )
    m = assert_located(r, "E063", "<layoutc>/specs/vllm_hybrid_mamba2.layout")
    assert "kernel_blocks 1000000" in m[3] and "--max-bytes" in m[3]
    assert not (tmp_path / "gen").exists()
    # 4096 kernel blocks (128 MiB) is within the default and compiles
    r = layoutc_child(
        tmp_path,
        "compile",
        "vllm_hybrid_mamba2",
        "-o",
        "gen",
        *NANO,
        "--set",
        "kernel_blocks=4096",
        "--tp-pairs",
        "2:4",
    )
    assert r.returncode == 0, r.stderr
    # ... and is refused under a lower limit
    r = layoutc_child(
        tmp_path,
        "compile",
        "vllm_hybrid_mamba2",
        "-o",
        "gen",
        *NANO,
        "--set",
        "kernel_blocks=4096",
        "--max-bytes",
        str(64 << 20),
    )
    assert_located(r, "E063", "<layoutc>/specs/vllm_hybrid_mamba2.layout")


def test_a_huge_state(tmp_path):
    (tmp_path / "big.layout").write_text(STATE.format(dims="a 1_000_000 b 100_000 split tp"))
    assert_located(plan(tmp_path, "big.layout"), "E063", "big.layout")


def test_page_stride(tmp_path):
    (tmp_path / "s.layout").write_text(STATE.format(dims="a 64") + "stride 4_294_967_296\n")
    m = assert_located(plan(tmp_path, "s.layout"), "E063", "s.layout")
    assert m[1] == "3" and "--max-page-stride" in m[3]


def test_integer_size(tmp_path):
    lets = ["let a0 = 3"] + [f"let a{i} = a{i - 1} * a{i - 1}" for i in range(1, 41)]
    (tmp_path / "sq.layout").write_text("\n".join(lets) + "\n" + STATE.format(dims="x a40"))
    m = assert_located(plan(tmp_path, "sq.layout"), "E065", "sq.layout")
    assert m[1] == "6" and "--max-int-bits" in m[3]  # 3**32 is the first past 48 bits
    (tmp_path / "lit.layout").write_text(
        STATE.format(dims="a 64") + "stride 100000000000000000000\n"
    )
    assert_located(plan(tmp_path, "lit.layout"), "E065", "lit.layout")
    (tmp_path / "digits.layout").write_text(STATE.format(dims="a " + "9" * 5000))
    assert_located(plan(tmp_path, "digits.layout"), "E065", "digits.layout")


def test_expression_depth(tmp_path):
    (tmp_path / "paren.layout").write_text(
        "let a = " + "(" * 490 + "1" + ")" * 490 + "\n" + STATE.format(dims="x a")
    )
    m = assert_located(plan(tmp_path, "paren.layout"), "E066", "paren.layout")
    assert "--max-expr-depth" in m[3]
    (tmp_path / "chain.layout").write_text(
        "let a = " + " + ".join(["1"] * 5000) + "\n" + STATE.format(dims="x a")
    )
    assert_located(plan(tmp_path, "chain.layout"), "E066", "chain.layout")


def test_use_depth(tmp_path):
    n = 1000
    for i in range(n):
        (tmp_path / f"f{i}.layout").write_text(f'use "f{i + 1}.layout"\n')
    (tmp_path / f"f{n}.layout").write_text(STATE.format(dims="a 8"))
    m = assert_located(plan(tmp_path, "f0.layout"), "E067", "f8.layout")
    assert "--max-use-depth" in m[3]


def test_runs(tmp_path):
    (tmp_path / "r.layout").write_text(
        "state s : fp8 { a 2_000_000  b 2 split tp }\npage p = [s]\n"
    )
    m = assert_located(plan(tmp_path, "r.layout"), "E064", "r.layout")
    assert "--max-runs" in m[3]


def test_use_resolves_only_to_specs_in_allowed_folders(tmp_path):
    spec = tmp_path / "top" / "m.layout"
    spec.parent.mkdir()
    (tmp_path / "outside.layout").write_text(STATE.format(dims="a 8"))
    for target in ("/etc/passwd", "../outside.layout", "/etc/hostname.layout", "notes.txt"):
        spec.write_text(f'use "{target}"\n')
        r = plan(spec.parent, "m.layout")
        m = assert_located(r, "E015", "m.layout")
        assert "root:" not in r.stderr and "outside.layout:1:" not in r.stderr
        assert "cannot" in m[3]
    # a symlink out of the spec's folder is refused as well
    (spec.parent / "link.layout").symlink_to(tmp_path / "outside.layout")
    spec.write_text('use "link.layout"\n')
    assert_located(plan(spec.parent, "m.layout"), "E015", "m.layout")
    # through -I it is allowed
    spec.write_text('use "outside.layout"\n')
    r = plan(spec.parent, "m.layout", "-I", str(tmp_path))
    assert r.returncode == 0, r.stderr


def test_deeply_nested_json_in_init(tmp_path):
    (tmp_path / "c.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    r = layoutc_child(tmp_path, "init", "--from-hf", "c.json")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "c.json:1:" in r.stderr and "nested" in r.stderr


def test_the_defaults_admit_the_128_layer_hybrid_at_131_kernel_blocks(tmp_path, capsys):
    """Every pair of {1, 2, 4, 8, 16}^2 of the benchmark's hybrid compiles under the defaults
    (the shipped specs are compiled under them by the model and explain tests)."""
    from layoutc.compiler.cli import main

    spec = tmp_path / "hybrid_128.layout"
    spec.write_text(
        'use "vllm_hybrid_mamba2.layout" {\n  kernel_blocks = 131\n'
        "  num_key_value_heads = 2  head_dim = 128  num_attention_layers = 16\n"
        "  num_mamba_layers = 112  mamba_num_heads = 64  mamba_head_dim = 64  n_groups = 8\n"
        "  ssm_state_size = 128\n}\n"
    )
    pairs = ",".join(f"{p}:{d}" for p in (1, 2, 4, 8, 16) for d in (1, 2, 4, 8, 16))
    rc = main(["compile", str(spec), "-o", str(tmp_path / "gen"), "--tp-pairs", pairs])
    assert rc == 0, capsys.readouterr().err
    text = (tmp_path / "gen" / "hybrid_128.py").read_text()
    assert text.count("(16, 16):") == 1 and "PLAN_FORMAT = (1, 0)" in text
