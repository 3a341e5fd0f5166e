"""The layoutc runtime: what an engine imports to execute transfer plans over NIXL.

Public names (``__all__``)::

    from layoutc.runtime import Endpoint, Plan, Progress, allocate_buffers, LayoutcError, ...

The facade is lazy: importing :mod:`layoutc.runtime` (or :mod:`layoutc.runtime.plan`, which
generated modules import) loads neither torch nor NIXL; :class:`Endpoint` and
:func:`allocate_buffers` load them when first used.  Everything not listed here is private to
the runtime or documented in its module as public there (``docs/runtime.md``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    BlockIdError,
    CallOrderError,
    HandshakeError,
    LayoutcError,
    PeerDisconnectedError,
    PeerNotConnectedError,
    PlanError,
    PlanFormatError,
    RemoteFailureError,
    TransferError,
    TransferFailedError,
    TransferTimeoutError,
    UsageError,
    WaitTimeoutError,
)
from .plan import Plan

if TYPE_CHECKING:  # pragma: no cover
    from .costmodel import CostModel
    from .endpoint import STRATEGIES, Endpoint, Progress, allocate_buffers

__all__ = [
    "STRATEGIES",
    "BlockIdError",
    "CallOrderError",
    "CostModel",
    "Endpoint",
    "HandshakeError",
    "LayoutcError",
    "PeerDisconnectedError",
    "PeerNotConnectedError",
    "Plan",
    "PlanError",
    "PlanFormatError",
    "Progress",
    "RemoteFailureError",
    "TransferError",
    "TransferFailedError",
    "TransferTimeoutError",
    "UsageError",
    "WaitTimeoutError",
    "allocate_buffers",
]

#: Public names loaded on first use, and the module that defines each.
_LAZY = {
    "Endpoint": ".endpoint",
    "Progress": ".endpoint",
    "STRATEGIES": ".endpoint",
    "allocate_buffers": ".endpoint",
    "CostModel": ".costmodel",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
