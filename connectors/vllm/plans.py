"""Transfer plans of one layout spec, compiled in memory when first needed and cached.

:class:`SpecPlans` is what the connector hands its :class:`~layoutc.runtime.Endpoint` as
``plans``: anything with ``plan(prefill_tp=, decode_tp=)``.  The spec is loaded and checked
once; each (prefill TP, decode TP) pair the engine meets is planned and verified on first use
(well under a second) and kept.  Both sides are bound to the same values except the ones an
engine chooses for itself (block sizes): a peer's are those its handshake announces
(:meth:`SpecPlans.plan_for_peer`, which an endpoint calls at each handshake).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from ...compiler.api import resolve_spec
from ...compiler.diagnostics import LayoutError, render
from ...compiler.ir import Unit
from ...compiler.pipeline import Compiler, SideSets
from ...runtime.errors import PlanError, UsageError
from ...runtime.plan import Plan, SideLayout
from .errors import ConfigError

__all__ = ["LoadedSpec", "SpecPlans"]

_ROLES = ("prefill", "decode")
_MAX_PEER_PLANS = 64


def _other(role: str) -> str:
    return "decode" if role == "prefill" else "prefill"


class LoadedSpec:
    """A spec loaded and checked once (shared by the :class:`SpecPlans` made from it)."""

    def __init__(self, spec: str, include_dirs: tuple[str, ...] = ()) -> None:
        self.spec = spec
        self.lock = threading.Lock()
        self.compiler = Compiler(include_dirs)
        try:
            display, data = resolve_spec(spec)
            self.unit: Unit = self.compiler.load(display, data)
        except UsageError as e:
            raise ConfigError(f"layout spec {spec!r}: {e}") from None
        except LayoutError as e:
            raise ConfigError(
                f"layout spec {spec!r} has errors:\n{render(e, self.compiler.sources)}"
            ) from None
        except OSError as e:
            raise ConfigError(f"layout spec {spec!r} cannot be read: {e}") from None
        if self.unit.pending:
            err = LayoutError(list(self.unit.pending))
            raise ConfigError(
                f"layout spec {spec!r} has errors:\n{render(err, self.compiler.sources)}"
            )
        self.declared = frozenset(self.unit.params)

    def compile(self, sets: dict[str, str], prefill_tp: int, decode_tp: int) -> Plan:
        with self.lock:
            try:
                p, d = self.compiler.bind(self.unit, SideSets.parse(sets))
                return self.compiler.plan(self.unit, p, d, prefill_tp, decode_tp)
            except LayoutError as e:
                raise PlanError(
                    f"layout spec {self.spec!r} for prefill TP {prefill_tp} -> decode TP "
                    f"{decode_tp}:\n{render(e, self.compiler.sources)}"
                ) from None


class SpecPlans:
    """The plans of ``spec`` for an engine of ``role`` bound to ``params`` (its own values;
    values the spec does not declare are left out), with peers bound to ``peer_params``
    (default: the same values).

    ``spec`` is a built-in spec's name, a path, or a :class:`LoadedSpec`.  Raises
    :class:`ConfigError` when the spec cannot be read or has errors (the message carries the
    compiler's located diagnostics).
    """

    def __init__(
        self,
        spec: str | LoadedSpec,
        params: Mapping[str, Any],
        *,
        role: str,
        peer_params: Mapping[str, Any] | None = None,
    ) -> None:
        if role not in _ROLES:
            raise UsageError(f"role must be 'prefill' or 'decode', got {role!r}")
        self.role = role
        self.loaded = spec if isinstance(spec, LoadedSpec) else LoadedSpec(spec)
        self.spec = self.loaded.spec
        self.declared = self.loaded.declared
        self.params = self._own(params)
        self.peer_params = self._own(self.params if peer_params is None else peer_params)
        self._lock = threading.Lock()
        self._plans: dict[tuple[int, int], Plan] = {}
        self._peer_plans: dict[tuple[int, int, tuple[tuple[str, str], ...]], Plan] = {}

    def _own(self, values: Mapping[str, Any]) -> dict[str, str]:
        return {k: str(v) for k, v in sorted(values.items()) if k in self.declared}

    @property
    def sha256(self) -> str:
        return self.loaded.unit.sha256

    def with_peer(self, peer_params: Mapping[str, Any]) -> SpecPlans:
        """The same spec and own values with peers bound to ``peer_params``."""
        return SpecPlans(self.loaded, self.params, role=self.role, peer_params=peer_params)

    def sets(self) -> dict[str, str]:
        """``--set`` values of every pair: each side's own values under its role."""
        peer = _other(self.role)
        out = {f"{self.role}.{k}": v for k, v in self.params.items()}
        out.update({f"{peer}.{k}": v for k, v in self.peer_params.items()})
        return out

    def plan(self, prefill_tp: int, decode_tp: int) -> Plan:
        """The verified plan of (``prefill_tp``, ``decode_tp``).  Raises :class:`PlanError`
        (with the compiler's diagnostics) for a pair the shapes do not allow."""
        for name, tp in (("prefill_tp", prefill_tp), ("decode_tp", decode_tp)):
            if not isinstance(tp, int) or isinstance(tp, bool) or not 1 <= tp <= 4096:
                raise PlanError(f"{name} must be an int in [1, 4096], got {tp!r}")
        key = (prefill_tp, decode_tp)
        with self._lock:
            plan = self._plans.get(key)
            if plan is None:
                plan = self.loaded.compile(self.sets(), prefill_tp, decode_tp)
                self._plans[key] = plan
            return plan

    def plan_for_peer(
        self, *, prefill_tp: int, decode_tp: int, peer_params: Mapping[str, Any]
    ) -> Plan:
        """The plan of the pair with a peer bound to ``peer_params`` (the values its
        handshake announced, e.g. another block size): what an endpoint asks at each
        handshake.  The compiler refuses values that do not describe the same model (both
        values named)."""
        if not isinstance(peer_params, Mapping) or len(peer_params) > 1024:
            raise PlanError("peer parameters must be a mapping of at most 1024 values")
        own = self._own(peer_params)
        if own == self.peer_params:
            return self.plan(prefill_tp, decode_tp)
        key = (prefill_tp, decode_tp, tuple(sorted(own.items())))
        with self._lock:
            cached = self._peer_plans.get(key)
        if cached is not None:
            return cached
        plan = self.with_peer(own).plan(prefill_tp, decode_tp)
        with self._lock:
            if len(self._peer_plans) < _MAX_PEER_PLANS:
                self._peer_plans[key] = plan
        return plan

    def side(self, tp: int) -> SideLayout:
        """This engine's side at TP ``tp`` (from its homogeneous pair)."""
        plan = self.plan(tp, tp)
        return plan.prefill if self.role == "prefill" else plan.decode

    def check_bindable(self, tp: int) -> None:
        """Raise :class:`ConfigError` unless this engine's own pair compiles (every missing or
        bad value is named)."""
        try:
            self.side(tp)
        except PlanError as e:
            raise ConfigError(str(e)) from None
