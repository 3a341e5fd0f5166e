"""The staged strategy: pack, one transfer per chunk, unpack (see :mod:`.engine`)."""

from .engine import DEFAULT_STAGING_BYTES, DEFAULT_STAGING_SLOTS, MOVERS, Staged

__all__ = ["DEFAULT_STAGING_BYTES", "DEFAULT_STAGING_SLOTS", "MOVERS", "Staged"]
