"""Every error layoutc raises on purpose, under one root, :class:`LayoutcError`.

Transfer failures are :class:`TransferError`\\ s that carry the peer they concern (a label such
as ``"prefill rank 1"``, or ``None`` when no single peer is at fault) and the request id.
Handshake refusals are :class:`HandshakeError`, raised before any byte moves.  A ``wait()``
that gave up is :class:`WaitTimeoutError`: unlike :class:`TransferTimeoutError` (the request
failed at its deadline), the request is still active.

This module imports nothing (the compiler and generated modules use it too), and every error
survives pickling (errors cross process boundaries in the demo and the tests).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BlockIdError",
    "CallOrderError",
    "HandshakeError",
    "LayoutcError",
    "LayoutcRuntimeError",
    "PeerDisconnectedError",
    "PeerNotConnectedError",
    "PlanError",
    "PlanFormatError",
    "RemoteFailureError",
    "TransferError",
    "TransferFailedError",
    "TransferTimeoutError",
    "UnknownRequestError",
    "UsageError",
    "WaitTimeoutError",
]


class LayoutcError(Exception):
    """Root of every error layoutc raises on purpose (compiler, runtime, tools, connectors)."""


#: The runtime's former root; the same class.
LayoutcRuntimeError = LayoutcError


class UsageError(LayoutcError, ValueError):
    """Bad input from the caller: a command-line usage error (exit status 2) or a bad
    argument to an API call."""


class CallOrderError(UsageError, RuntimeError):
    """An API call out of order: before ``register_layers()``, on a closed endpoint, or one
    that is not for this side (``pull()`` on a prefill rank)."""


class UnknownRequestError(UsageError, KeyError):
    """A request id this endpoint does not know (never started, or long forgotten)."""

    def __str__(self) -> str:  # (KeyError would quote the message)
        return str(self.args[0]) if self.args else ""


class PlanError(LayoutcError, ValueError):
    """A plan was asked for something it does not hold (an uncompiled pair, a bad rank)."""


class PlanFormatError(LayoutcError, RuntimeError):
    """A generated module was written for a plan format this runtime cannot read."""


class HandshakeError(LayoutcError):
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

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_handshake,
            (str(self), self.peer, self.field, self.peer_value, self.local_value),
        )


def _rebuild_handshake(
    message: str, peer: str | None, field: str | None, peer_value: object, local_value: object
) -> HandshakeError:
    return HandshakeError(
        message, peer=peer, field=field, peer_value=peer_value, local_value=local_value
    )


class TransferError(LayoutcError):
    """A request failed.  ``peer`` is the peer at fault (a label), ``request_id`` the request."""

    def __init__(
        self, message: str, *, peer: str | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.peer = peer
        self.request_id = request_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_transfer, (type(self), str(self), self.peer, self.request_id))


def _rebuild_transfer(
    cls: type[TransferError], message: str, peer: str | None, request_id: str | None
) -> TransferError:
    return cls(message, peer=peer, request_id=request_id)


class PeerDisconnectedError(TransferError):
    """The peer's process is gone (NIXL reported a remote disconnect) or was replaced."""


class PeerNotConnectedError(TransferError):
    """A request needs a peer that never completed the handshake."""


class TransferTimeoutError(TransferError, TimeoutError):
    """A request did not complete within its timeout (it failed)."""


class TransferFailedError(TransferError):
    """NIXL reported ``ERR`` or raised while posting or checking a transfer."""


class RemoteFailureError(TransferError):
    """A peer reported that it failed the request on its side."""


class BlockIdError(TransferError, ValueError):
    """Block ids outside the registered range, repeated, or of the wrong count (nothing posted)."""


class WaitTimeoutError(LayoutcError, TimeoutError):
    """A ``wait()`` gave up before the request ended; the request stays active."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_wait, (str(self), self.request_id))


def _rebuild_wait(message: str, request_id: str | None) -> WaitTimeoutError:
    return WaitTimeoutError(message, request_id=request_id)
