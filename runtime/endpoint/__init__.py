"""The endpoint: one NIXL agent per engine rank (see :mod:`.endpoint`).

``Endpoint`` and ``STRATEGIES`` load on first use, so that the strategies (which build on
this package's interface modules) can be imported before the endpoint that uses them.
"""

from typing import TYPE_CHECKING, Any

from .buffers import allocate_buffers, host_staging_tensor, kind_pages, layer_kind_sequence
from .requests import Progress

if TYPE_CHECKING:
    from .endpoint import STRATEGIES, Endpoint

__all__ = [
    "Endpoint",
    "Progress",
    "STRATEGIES",
    "allocate_buffers",
    "host_staging_tensor",
    "kind_pages",
    "layer_kind_sequence",
]


def __getattr__(name: str) -> Any:
    if name in ("Endpoint", "STRATEGIES"):
        from . import endpoint

        return getattr(endpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
