"""Ending the worker processes of the demo and the bench."""

from __future__ import annotations

from typing import Any


def end_process(proc: Any, grace_s: float) -> None:
    """Terminate ``proc`` (a ``multiprocessing`` process) if it is still alive, then kill it
    if it ignored that; each step waits up to ``grace_s`` for it to exit."""
    if proc.is_alive():
        proc.terminate()
        proc.join(grace_s)
    if proc.is_alive():
        proc.kill()
        proc.join(grace_s)
