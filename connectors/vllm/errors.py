"""Errors of the vLLM connector, under layoutc's root :class:`LayoutcError`.

This module imports nothing from vLLM: the GPU tests and the engine-independent parts use it.
"""

from __future__ import annotations

from ...runtime.errors import LayoutcError, UsageError

__all__ = [
    "BadRequestError",
    "ConfigError",
    "ConnectorError",
    "LayoutMismatchError",
    "SideChannelError",
    "UnsupportedVllmError",
]


class ConnectorError(LayoutcError):
    """Root of the connector's own errors."""


class ConfigError(ConnectorError, UsageError):
    """A setting of the connector (``kv_transfer_config``, its extra config, the vLLM config
    it is bound to) that it cannot serve; the message names the setting and its value."""


class LayoutMismatchError(ConfigError):
    """The layout spec does not describe the tensors vLLM registered (or its
    ``kv_cache_config``): the message names the field and both values."""


class UnsupportedVllmError(ConnectorError, ImportError):
    """The installed vLLM is not the version this connector was written and tested for."""


class BadRequestError(ConnectorError, ValueError):
    """A request's ``kv_transfer_params`` (untrusted input) cannot be served; only that
    request fails."""


class SideChannelError(ConnectorError):
    """A peer's side channel did not answer, or answered something invalid."""
