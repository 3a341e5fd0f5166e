"""The staged strategy: pack, one transfer per chunk, unpack (see :mod:`.engine`)."""

from .engine import (
    DEFAULT_STAGING_BYTES,
    DEFAULT_STAGING_SLOTS,
    MOVERS,
    Staged,
    check_staged_options,
)
from .lanes import LANE_KINDS
from .memory import STAGING_MEMORY, staging_memory

__all__ = [
    "DEFAULT_STAGING_BYTES",
    "DEFAULT_STAGING_SLOTS",
    "LANE_KINDS",
    "MOVERS",
    "STAGING_MEMORY",
    "Staged",
    "check_staged_options",
    "staging_memory",
]
