"""Shared pytest configuration for the whole test tree."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# helpers shared by the runtime and tool tests (rt_plans, rt_workers)
sys.path.insert(0, str(Path(__file__).parent / "runtime"))

# --- compiler snapshots: error `.err` files and golden modules -------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-goldens",
        action="store_true",
        default=False,
        help="rewrite tests/errors/*.err and tests/golden/*/ from the current compiler output",
    )


@pytest.fixture
def update_goldens(request: pytest.FixtureRequest) -> bool:
    """True when snapshot tests should rewrite their expected files instead of comparing."""
    return bool(request.config.getoption("--update-goldens"))
