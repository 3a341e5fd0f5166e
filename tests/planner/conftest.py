from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # planner_cases, for the test modules

from planner_cases import compile_pair  # noqa: E402


@pytest.fixture
def plan_of():
    return compile_pair
