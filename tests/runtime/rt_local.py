"""Endpoints living in the test process (real NIXL agents, buffers of their own): for tests
where no byte has to move between processes (handshakes, validation, hostile input).

``from rt_local import closing_fixture, endpoint`` makes the ``closing`` fixture available: a
test hands it each endpoint it builds, and they are closed after the test.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from layoutc.runtime.endpoint import Endpoint, allocate_buffers, layer_kind_sequence

_names = itertools.count()


def endpoint(
    plan: Any,
    role: str,
    rank: int = 0,
    layers: int = 2,
    kinds: Sequence[str] | None = None,
    num_blocks: int = 8,
    **kw: Any,
) -> Endpoint:
    """An endpoint of ``plan``'s ``role`` rank ``rank`` with ``layers`` layers (of ``kinds``,
    default: the plan's kinds in turn) of ``num_blocks`` blocks registered; ``kw`` go to
    :class:`Endpoint` (a unique ``name`` unless given)."""
    kw.setdefault("name", f"local-{role}-{rank}-{next(_names)}")
    ep = Endpoint(plan, role, rank, **kw)
    kinds = list(kinds) if kinds else layer_kind_sequence(plan, layers)
    ep.register_layers(allocate_buffers(plan, role, kinds, num_blocks), kinds)
    return ep


@pytest.fixture(name="closing")
def closing_fixture() -> Iterator[Callable[[Endpoint], None]]:
    eps: list[Endpoint] = []
    yield eps.append
    for ep in eps:
        ep.close()
