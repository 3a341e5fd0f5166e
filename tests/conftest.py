"""Shared pytest configuration for the whole test tree."""

from __future__ import annotations

import pytest

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
