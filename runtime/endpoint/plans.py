"""The plans an endpoint may use: one per TP size its peers may have.

An endpoint is one engine rank at one TP size.  Its peers may run at any TP size a plan was
compiled for: :class:`PlanSet` takes a generated module (anything with
``plan(prefill_tp=, decode_tp=)``, optionally ``COMPILED_PAIRS``) or a single
:class:`~layoutc.runtime.plan.Plan`, and hands out the plan of each peer's TP at handshake.
Every plan it hands out must describe the endpoint's own pages exactly as the others do
(the memory is registered once): checked at construction for every compiled pair, and again
for each plan taken later.

A source may also plan per peer *values*: with a method ``plan_for_peer(*, prefill_tp,
decode_tp, peer_params)`` it is asked, at each handshake, for the plan of the pair with the
peer's spec parameters (e.g. the peer engine's block size, known only then); the endpoint
still checks the plan describes its own pages as before.  At most :data:`MAX_PEER_PLANS`
such plans are kept (a peer announcing other values beyond that is refused).
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import HandshakeError, PlanError, UsageError
from ..plan import Plan, SideLayout
from .buffers import kind_pages, side_of

__all__ = ["MAX_PEER_PLANS", "PlanSet"]

#: Plans for distinct peer values kept by a set whose source plans per peer values.
MAX_PEER_PLANS = 16


def _role_other(role: str) -> str:
    return "decode" if role == "prefill" else "prefill"


def _pair(role: str, tp: int, peer_tp: int) -> tuple[int, int]:
    """(prefill TP, decode TP) of an endpoint of ``role`` at ``tp`` and a peer at ``peer_tp``."""
    return (tp, peer_tp) if role == "prefill" else (peer_tp, tp)


class PlanSet:
    """The plans of one endpoint (``role`` at ``tp``), by the peer's TP size."""

    def __init__(self, plans: Any, role: str, tp: int | None) -> None:
        if role not in ("prefill", "decode"):
            raise UsageError(f"role must be 'prefill' or 'decode', got {role!r}")
        self.role = role
        self.peer_role = _role_other(role)
        self._by_peer_tp: dict[int, Plan] = {}
        self.first: Plan | None
        self._per_values = False
        self._by_values: dict[tuple[int, str], Plan] = {}
        if isinstance(plans, Plan):
            self._source: Any = None
            own = side_of(plans, role).tp
            if tp is not None and tp != own:
                raise UsageError(
                    f"tp={tp} but the plan given is for {role} TP {own} "
                    f"(prefill TP {plans.prefill_tp} -> decode TP {plans.decode_tp})"
                )
            self.tp = own
            self.first = plans
            self._by_peer_tp[side_of(plans, self.peer_role).tp] = plans
            return
        if not callable(getattr(plans, "plan", None)):
            raise UsageError(
                "plans must be a Plan or a generated module (anything with "
                f"plan(prefill_tp=, decode_tp=)), got {type(plans).__name__}"
            )
        self._source = plans
        self._per_values = callable(getattr(plans, "plan_for_peer", None))
        pairs = [tuple(p) for p in getattr(plans, "COMPILED_PAIRS", ())]
        mine = [p for p in pairs if p[0 if role == "prefill" else 1] == tp] if tp else []
        if tp is None:
            tps = sorted({p[0 if role == "prefill" else 1] for p in pairs})
            if len(tps) != 1:
                raise UsageError(
                    f"pass tp= (this engine's TP size): the plans were compiled for {role} TP "
                    f"{', '.join(map(str, tps)) or '(unknown)'}"
                )
            tp = tps[0]
            mine = [p for p in pairs if p[0 if role == "prefill" else 1] == tp]
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise UsageError(f"tp must be a positive int, got {tp!r}")
        self.tp = tp
        if pairs and not mine:
            have = ",".join(f"{p}:{d}" for p, d in pairs)
            raise PlanError(
                f"no plan was compiled for {role} TP {tp} (compiled prefill:decode pairs: "
                f"{have}); compile the pairs this engine serves"
            )
        if not pairs:  # a source that compiles on demand: this engine's own homogeneous pair
            mine = [(tp, tp)]
        first = None
        for pair in sorted(mine):
            peer_tp = pair[1] if role == "prefill" else pair[0]
            plan = self._load(pair)
            if first is None:
                first = plan
            else:
                self._same_pages(first, plan)
            self._by_peer_tp[peer_tp] = plan
        self.first = first

    def _load(self, pair: tuple[int, int]) -> Plan:
        plan = self._source.plan(prefill_tp=pair[0], decode_tp=pair[1])
        if not isinstance(plan, Plan):
            raise UsageError(f"plans.plan{pair} returned {type(plan).__name__}, not a Plan")
        return plan

    def _same_pages(self, a: Plan, b: Plan) -> None:
        """Refuse a plan describing this endpoint's pages differently from another one."""
        sa, sb = side_of(a, self.role), side_of(b, self.role)
        if sa.header() != sb.header() or kind_pages(a) != kind_pages(b):
            raise PlanError(
                f"the plans for {self.role} TP {self.tp} describe this engine's pages "
                f"differently (with prefill TP {a.prefill_tp} -> decode TP {a.decode_tp}: "
                f"{_pages(sa)}; with {b.prefill_tp} -> {b.decode_tp}: {_pages(sb)}); "
                f"compile them from one spec with the same values"
            )

    @property
    def local(self) -> SideLayout:
        """This endpoint's side layout (the same in every plan of the set)."""
        return side_of(self.any(), self.role)

    def any(self) -> Plan:
        """A plan of the set (they all describe this endpoint's pages alike)."""
        if self.first is None:
            raise PlanError(
                f"no plan for {self.role} TP {self.tp} yet: the generated module lists no "
                f"compiled pairs"
            )
        return self.first

    def single_peer_tp(self) -> int | None:
        """The peers' TP size when only one is possible (a single plan), else None."""
        return next(iter(self._by_peer_tp)) if self._source is None else None

    def spec(self) -> tuple[str, str]:
        plan = self.any()
        return plan.spec, plan.spec_sha256

    def for_peer(self, peer_tp: Any, peer: str, peer_params: Any = None) -> Plan:
        """The plan for a peer at ``peer_tp`` (from its handshake), or a
        :class:`HandshakeError` saying how to compile the missing pair.  ``peer_params``:
        the peer's spec parameters, for a source that plans per peer values."""
        if not isinstance(peer_tp, int) or isinstance(peer_tp, bool) or not 1 <= peer_tp <= 4096:
            raise HandshakeError(
                f"{peer} announced TP {peer_tp!r}, not a TP size", peer=peer, field="tp"
            )
        if self._per_values:
            return self._for_values(peer_tp, peer, peer_params)
        plan = self._by_peer_tp.get(peer_tp)
        if plan is not None:
            return plan
        pair = _pair(self.role, self.tp, peer_tp)
        if self._source is None:
            have = self.any()
            ours = side_of(have, self.peer_role).tp
            raise HandshakeError(
                f"{peer} has {self.peer_role} TP {peer_tp} but this plan is for {ours}; "
                f"to serve peers of other TP sizes pass the generated module (with "
                f"prefill:decode {pair[0]}:{pair[1]} compiled) instead of one plan",
                peer=peer,
                field=f"{self.peer_role} TP",
                peer_value=peer_tp,
                local_value=ours,
            )
        try:
            plan = self._load(pair)
        except PlanError as e:
            raise HandshakeError(
                f"{peer} runs at {self.peer_role} TP {peer_tp}: {e}",
                peer=peer,
                field="tp",
                peer_value=peer_tp,
            ) from None
        if self.first is None:
            self.first = plan
        else:
            try:
                self._same_pages(self.first, plan)
            except PlanError as e:
                raise HandshakeError(str(e), peer=peer, field="tp", peer_value=peer_tp) from None
        self._by_peer_tp[peer_tp] = plan
        return plan

    def _for_values(self, peer_tp: int, peer: str, peer_params: Any) -> Plan:
        """The plan for a peer's TP and values, from the source's ``plan_for_peer``."""
        if not isinstance(peer_params, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, str)) for k, v in peer_params.items()
        ):
            raise HandshakeError(f"{peer} announced no spec parameters", peer=peer, field="params")
        key = (peer_tp, json.dumps(peer_params, sort_keys=True))
        plan = self._by_values.get(key)
        if plan is not None:
            return plan
        if len(self._by_values) >= MAX_PEER_PLANS:
            raise HandshakeError(
                f"{peer}: this endpoint already holds plans for {MAX_PEER_PLANS} sets of peer "
                "values; refusing more",
                peer=peer,
                field="params",
            )
        prefill_tp, decode_tp = _pair(self.role, self.tp, peer_tp)
        try:
            plan = self._source.plan_for_peer(
                prefill_tp=prefill_tp, decode_tp=decode_tp, peer_params=dict(peer_params)
            )
        except Exception as e:  # noqa: BLE001 - the source's refusal, whatever it raised
            raise HandshakeError(
                f"{peer} at {self.peer_role} TP {peer_tp}: no plan for its values ({e})",
                peer=peer,
                field="params",
            ) from None
        if not isinstance(plan, Plan) or side_of(plan, self.peer_role).tp != peer_tp:
            raise HandshakeError(
                f"{peer}: plan_for_peer gave no plan for {self.peer_role} TP {peer_tp}",
                peer=peer,
                field="tp",
            )
        if self.first is None:
            self.first = plan
        else:
            try:
                self._same_pages(self.first, plan)
            except PlanError as e:
                raise HandshakeError(str(e), peer=peer, field="params") from None
        self._by_values[key] = plan
        return plan


def _pages(side: SideLayout) -> str:
    return ", ".join(f"{p.name} {p.nbytes} B / stride {p.kernel_stride}" for p in side.pages)
