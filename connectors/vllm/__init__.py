"""layoutc as a vLLM KV connector: ``layoutc.connectors.vllm.LayoutcConnector``.

Load it in vLLM (0.32) by name, as any out-of-tree connector::

    KVTransferConfig(kv_connector="LayoutcConnector",
                     kv_connector_module_path="layoutc.connectors.vllm", ...)

Importing this package does not import vLLM: :class:`LayoutcConnector` is loaded on first use
(and refuses a vLLM other than 0.32 then).  The parts that need no vLLM -- the description of
an engine's cache, spec choice, tensor checks, plans, request validation, the transport
thread -- live in their own modules (``description``, ``spec_choice``, ``tensors``, ``plans``,
``params``, ``transport``) and run on machines without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import SUPPORTED_VLLM

if TYPE_CHECKING:  # pragma: no cover
    from .connector import LayoutcConnector

__all__ = ["SUPPORTED_VLLM", "LayoutcConnector"]


def __getattr__(name: str) -> Any:
    if name == "LayoutcConnector":
        value = importlib.import_module(".connector", __name__).LayoutcConnector
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
