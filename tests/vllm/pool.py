"""A session-wide pool of vLLM engines, reused across tests within a process budget.

Engine starts dominate the run time of the vLLM tests (15-60 s each on a 2-core box), so tests
ask the pool for the engines they need (:meth:`EnginePool.get`) and the pool keeps them running
for the next test that asks for the same :class:`EngineSpec`. A 2-core box holds about seven
engine processes at once (an engine of TP ``t`` is ``t + 2`` processes: the ``LLM`` front end,
the engine core, ``t`` workers), so before starting engines the pool stops the least recently
used ones that the current request does not include. Order the tests so that consecutive ones
share engines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines import Engine, connector_config, free_port
from models import ModelSpec, build

DEFAULT_EXTRA: dict[str, Any] = {"kv_lease_duration": 300}
"""Connector extra config of every P/D engine unless a spec overrides a key: a lease far longer
than a slow, shared CI box can take between prefill and decode (vLLM's default is 30 s)."""


@dataclass(frozen=True)
class EngineSpec:
    """Everything that makes one pooled engine different from another."""

    model: ModelSpec
    tp: int = 1
    role: str | None = None
    """``kv_producer`` (prefill), ``kv_consumer`` (decode), ``kv_both``, or None (no connector)."""
    connector: str = "NixlConnector"
    module_path: str | None = None
    extra: tuple[tuple[str, Any], ...] = ()
    """Connector extra config on top of :data:`DEFAULT_EXTRA`, as sorted ``(key, value)`` pairs."""
    block_size: int | None = None
    enable_prefix_caching: bool = False
    kv_fields: tuple[tuple[str, Any], ...] = ()
    """Other ``KVTransferConfig`` fields (e.g. ``kv_load_failure_policy``)."""
    llm_kwargs: tuple[tuple[str, Any], ...] = ()
    """Other ``vllm.LLM`` arguments (e.g. ``disable_log_stats=False`` for metrics)."""
    env: tuple[tuple[str, str], ...] = ()
    """Extra environment of the engine's processes (e.g. ``VLLM_SSM_CONV_STATE_LAYOUT``)."""

    @property
    def processes(self) -> int:
        """The LLM front end, the engine core (unless it runs in the front end's process:
        ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and one worker per TP rank."""
        in_process = dict(self.env).get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        return self.tp + (1 if in_process else 2)

    @property
    def label(self) -> str:
        role = {"kv_producer": "P", "kv_consumer": "D", "kv_both": "PD", None: "E"}[self.role]
        parts = [self.model.name, f"{role}{self.tp}"]
        if self.block_size is not None:
            parts.append(f"bs{self.block_size}")
        if self.enable_prefix_caching:
            parts.append("pc")
        if self.extra or self.kv_fields or self.llm_kwargs or self.env:
            blob = json.dumps([self.extra, self.kv_fields, self.llm_kwargs, self.env], default=str)
            parts.append("x" + hashlib.sha256(blob.encode()).hexdigest()[:6])
        if self.connector != "NixlConnector":
            parts.append(self.connector)
        return "-".join(parts)

    def kv_transfer_config(self) -> dict[str, Any] | None:
        if self.role is None:
            return None
        return connector_config(
            self.role,
            connector=self.connector,
            module_path=self.module_path,
            extra={**DEFAULT_EXTRA, **dict(self.extra)},
            **dict(self.kv_fields),
        )


def spec(model: ModelSpec, tp: int = 1, role: str | None = None, **kwargs: Any) -> EngineSpec:
    """:class:`EngineSpec` with ``extra``/``kv_fields``/``llm_kwargs``/``env`` given as
    dicts."""
    for key in ("extra", "kv_fields", "llm_kwargs", "env"):
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = tuple(sorted(kwargs[key].items()))
    return EngineSpec(model, tp, role, **kwargs)


@dataclass
class EnginePool:
    """Engines by spec, started on demand, evicted least-recently-used beyond the budget."""

    model_root: Path
    log_dir: Path
    max_processes: int = 7
    record: Callable[[str, float], None] = lambda name, seconds: None
    _engines: dict[EngineSpec, Engine] = field(default_factory=dict)
    _last_used: dict[EngineSpec, float] = field(default_factory=dict)

    def get(self, *specs: EngineSpec) -> list[Engine]:
        """The engines for ``specs`` (in order), all running at once."""
        wanted = list(dict.fromkeys(specs))
        for s in wanted:
            engine = self._engines.get(s)
            if engine is not None and not engine.alive:
                self.drop(s)
        missing = [s for s in wanted if s not in self._engines]
        need = sum(s.processes for s in missing)
        running = sum(s.processes for s in self._engines)
        for victim in sorted(self._engines, key=lambda s: self._last_used[s]):
            if running + need <= self.max_processes:
                break
            if victim in wanted:
                continue
            running -= victim.processes
            self.drop(victim)
        if missing:
            self._start(missing)
        now = time.monotonic()
        for s in wanted:
            self._last_used[s] = now
        return [self._engines[s] for s in wanted]

    def _start(self, specs: list[EngineSpec]) -> None:
        dirs = {s: build(s.model, self.model_root) for s in specs}

        def start(s: EngineSpec) -> Engine:
            return Engine.start(
                dirs[s],
                tp=s.tp,
                kv_transfer_config=s.kv_transfer_config(),
                block_size=s.block_size,
                enable_prefix_caching=s.enable_prefix_caching,
                env={**dict(s.env), "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())},
                log_path=self.log_dir / f"{s.label}.log",
                name=s.label,
                **dict(s.llm_kwargs),
            )

        # Engines start in parallel: much of a start is waiting (process spawn, handshakes
        # between vLLM's own processes), so two starts take less than twice one.
        with ThreadPoolExecutor(max_workers=len(specs)) as executor:
            futures = {s: executor.submit(start, s) for s in specs}
        errors = []
        for s, fut in futures.items():
            try:
                engine = fut.result()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after cleanup
                errors.append(exc)
                continue
            self._engines[s] = engine
            self._last_used[s] = time.monotonic()
            self.record(f"start {s.label}", engine.info.start_s)
        if errors:
            raise errors[0]

    def drop(self, s: EngineSpec) -> None:
        """Stop the engine of ``s`` (if running) and forget it."""
        engine = self._engines.pop(s, None)
        self._last_used.pop(s, None)
        if engine is not None:
            t0 = time.monotonic()
            engine.stop()
            self.record(f"stop {s.label}", time.monotonic() - t0)

    def kill(self, s: EngineSpec) -> None:
        """SIGKILL the engine of ``s`` (for failure tests); the next :meth:`get` restarts it."""
        engine = self._engines.pop(s, None)
        self._last_used.pop(s, None)
        if engine is not None:
            engine.kill()

    def close(self) -> None:
        for s in list(self._engines):
            with contextlib.suppress(Exception):
                self.drop(s)
