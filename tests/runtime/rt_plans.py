"""Compiled plans for the runtime tests (small models: a few KiB per page)."""

from __future__ import annotations

import functools
from pathlib import Path

from layoutc.compiler.api import compile_plan

SPECS = Path(__file__).resolve().parents[2] / "specs"

#: Small models (a few KiB per page) for every family spec.
GQA4 = dict(num_key_value_heads=4, head_dim=32, block_size=16)
GQA6 = dict(num_key_value_heads=6, head_dim=32, block_size=16)
MLA = dict(kv_lora_rank=64, qk_rope_head_dim=16, block_size=16)
HYBRID = dict(
    num_key_value_heads=2,
    head_dim=32,
    block_size=16,
    mamba_num_heads=8,
    mamba_head_dim=16,
    n_groups=2,
    ssm_state_size=16,
)


@functools.cache
def _compiled(spec: str, p: int, d: int, sets: tuple) -> object:
    return compile_plan(str(SPECS / f"{spec}.layout"), p, d, dict(sets))


def compiled(spec: str, p: int, d: int, sets: dict | None = None):
    """A real compiled Plan of ``specs/<spec>.layout`` (cached)."""
    return _compiled(spec, p, d, tuple(sorted((sets or {}).items())))


class PeerValuePlans:
    """A plan source that plans per peer values (``plan_for_peer``): this engine's spec values
    ``own`` on its side, and the values the peer announces at handshake (e.g. its block size)
    on the other -- as an engine integration does when it learns the peer's block size only
    from its handshake."""

    def __init__(self, spec: str, role: str, sets: dict, own: dict, take: tuple[str, ...]):
        self.spec, self.role, self.sets, self.own, self.take = spec, role, sets, own, take
        self.asked: list[dict] = []

    def _sets(self, peer: dict) -> dict:
        peer_role = "decode" if self.role == "prefill" else "prefill"
        out = dict(self.sets)
        out.update({f"{self.role}.{k}": v for k, v in self.own.items()})
        out.update({f"{peer_role}.{k}": v for k, v in peer.items()})
        return out

    def plan(self, *, prefill_tp: int, decode_tp: int):
        return compiled(self.spec, prefill_tp, decode_tp, self._sets(self.own))

    def plan_for_peer(self, *, prefill_tp: int, decode_tp: int, peer_params: dict):
        values = {k: peer_params[k] for k in self.take if k in peer_params}
        self.asked.append(values)
        return compiled(self.spec, prefill_tp, decode_tp, self._sets(values))
