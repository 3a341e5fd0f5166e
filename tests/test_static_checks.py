"""Lint, format and type checks over the repository (pinned ruff and mypy, configured in
pyproject.toml), so that `.ci/run` fails on them like on any other test."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(600)


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, timeout=550
    )


def test_ruff_check():
    r = _run("ruff", "check", ".", "--output-format", "concise")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format():
    r = _run("ruff", "format", "--check", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_private_access_is_not_suppressed():
    """SLF001 (another object's private members) holds in the runtime, tools and connectors
    with no suppression: neither a ``noqa`` nor a per-file ignore covers them."""
    pattern = re.compile(r"noqa[^\n]*SLF001")
    for folder in ("runtime", "tools", "connectors"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not pattern.search(path.read_text("utf-8")), path
    config = (ROOT / "pyproject.toml").read_text()
    ignores = config.split("[tool.ruff.lint.per-file-ignores]", 1)[1].split("\n[", 1)[0]
    assert not re.search(r'"(runtime|tools|connectors)[/*"]', ignores), ignores


def test_mypy(tmp_path):
    """mypy over layoutc.compiler, layoutc.runtime, layoutc.tools and layoutc.connectors.
    The folders are linked into a ``layoutc`` tree first: mypy cannot follow the editable
    install's import hook."""
    pkg = tmp_path / "layoutc"
    pkg.mkdir()
    for f in (ROOT / "compiler" / "pkg").iterdir():
        (pkg / f.name).symlink_to(f)
    for d in ("compiler", "runtime", "tools", "connectors", "grammar", "specs"):
        (pkg / d).symlink_to(ROOT / d)
    env = dict(os.environ, MYPY_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "-p",
            "layoutc.compiler",
            "-p",
            "layoutc.runtime",
            "-p",
            "layoutc.tools",
            "-p",
            "layoutc.connectors",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=550,
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


def test_type_ignores_say_why():
    """Every ``# type: ignore[code]`` names its code and says why after it."""
    bad = []
    for folder in ("compiler", "runtime", "tools", "connectors"):
        for path in (ROOT / folder).rglob("*.py"):
            for i, line in enumerate(path.read_text("utf-8").splitlines(), 1):
                m = re.search(r"#\s*type:\s*ignore(.*)$", line)
                if m and not re.match(r"\[[\w\-, ]+\]\s+#\s*\S", m.group(1)):
                    bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert bad == []
