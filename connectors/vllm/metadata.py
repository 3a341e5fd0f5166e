"""What the connector's scheduler side sends its workers each step, and what each worker
publishes for the handshake (both cross process boundaries pickled; plain data only)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import NixlConnectorMetadata

from .errors import SideChannelError

__all__ = ["LayoutcConnectorMetadata", "LayoutcHandshakePayload"]


@dataclass
class LayoutcConnectorMetadata(KVConnectorMetadata):
    """One step's work for the workers.

    ``nixl``: what vLLM's NIXL scheduler logic built (requests to receive with their block
    ids and ``kv_transfer_params``, prefill leases, heartbeats, ...); ``failed_recv``: decode
    requests whose ``kv_transfer_params`` were refused (each worker reports them failed);
    ``prompt_tokens``: prompt length of each request to receive (bounds its remote tokens);
    ``send_blocks`` / ``send_tokens``: block ids (per group) and tokens of each prefill request
    entering its lease;
    ``lease_updates``: renewed lease deadlines (the scheduler's clock, like ``reqs_to_send``).
    """

    nixl: NixlConnectorMetadata
    failed_recv: dict[str, str] = field(default_factory=dict)
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    send_blocks: dict[str, tuple[list[int], ...]] = field(default_factory=dict)
    send_tokens: dict[str, int] = field(default_factory=dict)
    lease_updates: dict[str, float] = field(default_factory=dict)


@dataclass
class LayoutcHandshakePayload(KVConnectorHandshakeMetadata):
    """A worker's side-channel payload (JSON text): how a decode worker reaches it and what
    it must agree with (see :func:`~.transport.check_payload`)."""

    data: bytes

    @classmethod
    def of(cls, payload: dict[str, Any]) -> LayoutcHandshakePayload:
        return cls(json.dumps(payload, sort_keys=True).encode())

    def decode(self) -> dict[str, Any]:
        try:
            out = json.loads(self.data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SideChannelError(f"bad handshake payload: {e}") from None
        if not isinstance(out, dict):
            raise SideChannelError("bad handshake payload: not an object")
        return out
