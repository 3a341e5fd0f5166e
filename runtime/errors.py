"""Exceptions of the layoutc runtime.

Every failure of a transfer is a :class:`TransferError` that carries the peer it concerns (a
human label such as ``"prefill rank 1"``, or ``None`` when no single peer is at fault) and the
request id.  Handshake refusals are :class:`HandshakeError`, raised before any byte moves.
"""

from __future__ import annotations


class LayoutcRuntimeError(Exception):
    """Base class of every error the runtime raises on purpose."""


class HandshakeError(LayoutcRuntimeError):
    """A peer's handshake does not match the local plan (raised before any byte moves).

    ``field`` names what differs; ``peer_value`` and ``local_value`` are both sides' values.
    """

    def __init__(
        self,
        message: str,
        *,
        peer: str | None = None,
        field: str | None = None,
        peer_value: object = None,
        local_value: object = None,
    ) -> None:
        super().__init__(message)
        self.peer = peer
        self.field = field
        self.peer_value = peer_value
        self.local_value = local_value

    def __reduce__(self):  # keep it picklable (it crosses process boundaries in the demo)
        return (
            _rebuild_handshake,
            (str(self), self.peer, self.field, self.peer_value, self.local_value),
        )


def _rebuild_handshake(message, peer, field, peer_value, local_value):
    return HandshakeError(
        message, peer=peer, field=field, peer_value=peer_value, local_value=local_value
    )


class TransferError(LayoutcRuntimeError):
    """A request failed.  ``peer`` is the peer at fault (a label), ``request_id`` the request."""

    def __init__(
        self, message: str, *, peer: str | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.peer = peer
        self.request_id = request_id

    def __reduce__(self):
        return (_rebuild_transfer, (type(self), str(self), self.peer, self.request_id))


def _rebuild_transfer(cls, message, peer, request_id):
    return cls(message, peer=peer, request_id=request_id)


class PeerDisconnectedError(TransferError):
    """The peer's process is gone (NIXL reported a remote disconnect) or was replaced."""


class PeerNotConnectedError(TransferError):
    """A request needs a peer that never completed the handshake."""


class TransferTimeoutError(TransferError, TimeoutError):
    """A request did not complete within its timeout."""


class TransferFailedError(TransferError):
    """NIXL reported ``ERR`` or raised while posting or checking a transfer."""


class RemoteFailureError(TransferError):
    """A peer reported that it failed the request on its side."""


class BlockIdError(TransferError, ValueError):
    """Block ids outside the registered range, repeated, or of the wrong count (nothing posted)."""
