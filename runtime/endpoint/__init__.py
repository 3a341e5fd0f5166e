"""The endpoint: one NIXL agent per engine rank (see :mod:`.endpoint`)."""

from .buffers import allocate_buffers, host_staging_tensor, kind_pages, layer_kind_sequence
from .endpoint import STRATEGIES, Endpoint
from .requests import Progress

__all__ = [
    "Endpoint",
    "Progress",
    "STRATEGIES",
    "allocate_buffers",
    "host_staging_tensor",
    "kind_pages",
    "layer_kind_sequence",
]
