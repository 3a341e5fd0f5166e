"""A decode request's ``kv_transfer_params``, validated: they come from the client (through a
proxy), so nothing in them is trusted.

:func:`parse_remote` checks types, sizes and ranges and that the prefill host is one the
engine may connect to; what it returns is safe to hand to the rest of the connector.  A bad
request raises :class:`BadRequestError` naming the field; the caller fails only that request
(following ``kv_load_failure_policy``).  Needs no vLLM.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import BadRequestError

__all__ = ["MAX_BLOCKS", "RemoteRequest", "host_allowed", "parse_remote"]

#: Most block ids one request may carry (all groups together).
MAX_BLOCKS = 1 << 20
_MAX_ID = 1 << 31
_MAX_TEXT = 256
_HOST = re.compile(r"^[A-Za-z0-9._:\-\[\]%]{1,255}$")


@dataclass(frozen=True)
class RemoteRequest:
    """The prefill side of a decode request, as its ``kv_transfer_params`` give it."""

    engine_id: str
    request_id: str
    host: str
    port: int
    tp_size: int
    block_ids: tuple[tuple[int, ...], ...]  # per transfer group, logical ids
    num_tokens: int | None
    expiry: float | None  # the prefill scheduler's lease deadline, in its clock


def _text(params: Mapping[str, Any], key: str) -> str:
    v = params.get(key)
    if not isinstance(v, str) or not v or len(v) > _MAX_TEXT or not v.isprintable():
        raise BadRequestError(
            f"kv_transfer_params[{key!r}] must be a printable string of 1 to {_MAX_TEXT} "
            f"characters, got {v!r:.80}"
        )
    return v


def _int(params: Mapping[str, Any], key: str, lo: int, hi: int, default: Any = ...) -> int:
    v = params.get(key, default)
    if v is ... or not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise BadRequestError(
            f"kv_transfer_params[{key!r}] must be an int in [{lo}, {hi}], got {v!r:.80}"
        )
    return v


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """Is ``host`` in ``allowed`` (``"*"`` allows any; addresses compare as addresses)?"""
    if "*" in allowed or host in allowed:
        return True
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    for a in allowed:
        try:
            if ipaddress.ip_address(a.strip("[]")) == addr:
                return True
        except ValueError:
            continue
    return False


def _block_ids(params: Mapping[str, Any], num_groups: int) -> tuple[tuple[int, ...], ...]:
    v = params.get("remote_block_ids")
    if not isinstance(v, list | tuple) or len(v) != num_groups:
        raise BadRequestError(
            f"kv_transfer_params['remote_block_ids'] must be a list of {num_groups} lists of "
            f"block ids (one per KV-cache group), got {v!r:.80}"
        )
    out = []
    total = 0
    for i, group in enumerate(v):
        if not isinstance(group, list | tuple):
            raise BadRequestError(
                f"kv_transfer_params['remote_block_ids'][{i}] must be a list, got {group!r:.80}"
            )
        total += len(group)
        if total > MAX_BLOCKS:
            raise BadRequestError(
                f"kv_transfer_params['remote_block_ids'] holds more than {MAX_BLOCKS} ids"
            )
        for j, b in enumerate(group):
            if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < _MAX_ID:
                raise BadRequestError(
                    f"kv_transfer_params['remote_block_ids'][{i}][{j}] must be a block id "
                    f"(int in [0, {_MAX_ID})), got {b!r:.80}"
                )
        out.append(tuple(group))
    return tuple(out)


def parse_remote(
    params: Any, *, num_groups: int, allowed_hosts: Sequence[str], max_tokens: int
) -> RemoteRequest:
    """The validated prefill side of a decode request.  ``max_tokens``: the decode request's
    prompt length (the prefill cannot hold more of it)."""
    if not isinstance(params, Mapping):
        raise BadRequestError(f"kv_transfer_params must be a dict, got {type(params).__name__}")
    if params.get("do_remote_decode"):
        raise BadRequestError(
            "kv_transfer_params asks for both do_remote_prefill and do_remote_decode"
        )
    host = _text(params, "remote_host")
    if not _HOST.match(host):
        raise BadRequestError(f"kv_transfer_params['remote_host'] {host!r} is not a host name")
    if not host_allowed(host, allowed_hosts):
        raise BadRequestError(
            f"kv_transfer_params['remote_host'] {host!r} is not an allowed peer (allowed: "
            f"{', '.join(allowed_hosts)}; kv_connector_extra_config['allowed_peers'])"
        )
    num_tokens = params.get("remote_num_tokens")
    if num_tokens is not None:
        num_tokens = _int(params, "remote_num_tokens", 0, max_tokens)
    expiry = params.get("remote_blocks_expiry_time")
    if expiry is not None and (
        not isinstance(expiry, int | float) or isinstance(expiry, bool) or not math.isfinite(expiry)
    ):
        raise BadRequestError(
            f"kv_transfer_params['remote_blocks_expiry_time'] must be a number, got {expiry!r:.80}"
        )
    for key in ("dcp_size", "pp_size"):
        if params.get(key, 1) not in (1, None):
            raise BadRequestError(
                f"kv_transfer_params[{key!r}] is {params.get(key)!r:.40}: LayoutcConnector "
                f"serves prefill engines without context or pipeline parallelism (1)"
            )
    return RemoteRequest(
        engine_id=_text(params, "remote_engine_id"),
        request_id=_text(params, "remote_request_id"),
        host=host,
        port=_int(params, "remote_port", 1, 65535),
        tp_size=_int(params, "tp_size", 1, 4096),
        block_ids=_block_ids(params, num_groups),
        num_tokens=num_tokens,
        expiry=None if expiry is None else float(expiry),
    )
