"""From vLLM's per-group block ids to endpoint requests.

vLLM keeps one block table per KV-cache group; a layoutc endpoint takes block ids per *layer
kind* (``{kind: ids}``).  When a model has several groups of one kind (a hybrid with more Mamba
layers than attention layers has several Mamba groups, each with its own block ids), a request
moves in **rounds**: round ``j`` takes the ``j``-th group of every kind, restricted to those
groups' layers, under request id ``rid`` (round 0) or ``rid#j``.  Both engines hold the same
groups (same model), so they agree on the rounds.

:func:`align` pairs a group's decode and prefill ids as vLLM's NIXL worker does for prefix
caching.  Needs no vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import BadRequestError

__all__ = ["GroupRounds", "Round", "align", "round_ids"]


def round_ids(rid: str, rounds: int) -> list[str]:
    """Request ids of a request's rounds on both sides: ``rid``, ``rid#1``, ..."""
    return [rid if j == 0 else f"{rid}#{j}" for j in range(rounds)]


@dataclass(frozen=True)
class Round:
    """One ``pull``/``push``/``expect`` of a request: its id, block ids per layer kind on this
    side and the peer's, and its layers (None: every layer)."""

    rid: str
    local: Mapping[str, Sequence[int]]
    remote: Mapping[str, Sequence[int]]
    layers: tuple[int, ...] | None


@dataclass(frozen=True)
class GroupRounds:
    """How an engine's transfer groups make rounds.

    ``group_kinds``: the spec's layer kind of each group; ``group_layers``: each group's
    indices among the registered layers; ``token_kinds``: kinds whose blocks hold tokens
    (attention), as opposed to a request's state (Mamba)."""

    group_kinds: tuple[str, ...]
    rounds: tuple[tuple[int, ...], ...]  # round -> its groups (one of each kind at most)
    layers: tuple[tuple[int, ...] | None, ...]  # round -> its layers (None: all)
    token_kinds: frozenset[str]

    @classmethod
    def of(
        cls,
        group_kinds: Sequence[str],
        group_layers: Sequence[Sequence[int]],
        token_kinds: frozenset[str],
    ) -> GroupRounds:
        by_kind: dict[str, list[int]] = {}
        for g, k in enumerate(group_kinds):
            by_kind.setdefault(k, []).append(g)
        n = max((len(v) for v in by_kind.values()), default=1)
        rounds = tuple(tuple(v[j] for v in by_kind.values() if j < len(v)) for j in range(n))
        if n == 1:
            layers: tuple[tuple[int, ...] | None, ...] = (None,)
        else:
            layers = tuple(tuple(sorted(i for g in r for i in group_layers[g])) for r in rounds)
        return cls(tuple(group_kinds), rounds, layers, token_kinds)

    @property
    def token_groups(self) -> tuple[int, ...]:
        return tuple(g for g, k in enumerate(self.group_kinds) if k in self.token_kinds)

    def make(
        self,
        rid: str,
        local: Sequence[Sequence[int]],
        remote: Sequence[Sequence[int]] | None = None,
    ) -> tuple[Round, ...]:
        """The rounds of request ``rid``: ``local`` (and ``remote``) block ids per group;
        groups without ids (a shorter list) move nothing."""
        out = []
        for rid_j, groups, layers in zip(
            round_ids(rid, len(self.rounds)), self.rounds, self.layers
        ):
            kinds = self.group_kinds
            out.append(
                Round(
                    rid_j,
                    {kinds[g]: list(local[g]) for g in groups if g < len(local)},
                    {}
                    if remote is None
                    else {kinds[g]: list(remote[g]) for g in groups if g < len(remote)},
                    layers,
                )
            )
        return tuple(out)


def align(
    local: Sequence[Sequence[int]],
    remote: Sequence[Sequence[int]],
    group_kinds: Sequence[str],
    token_kinds: frozenset[str],
) -> tuple[list[list[int]], list[list[int]]]:
    """Pair each group's decode (``local``) and prefill (``remote``) block ids as vLLM's NIXL
    worker does: decode holds only the blocks its prefix cache lacks, so the prefill list is
    end-trimmed to them; a decode list one longer holds the token decode recomputes (cut).
    A state group (Mamba) holds at most 2 blocks.  Anything else is a bad request.  An empty
    ``local`` (a full prefix hit, an aborted request) moves nothing."""
    if len(local) not in (0, len(remote)):
        raise BadRequestError(f"{len(local)} local block groups for {len(remote)} remote")
    out_l, out_r = [], []
    for g, rem in enumerate(remote):
        loc = list(local[g]) if local else []
        rem_l = list(rem)
        if group_kinds[g] not in token_kinds and len(rem_l) > 2:
            raise BadRequestError(
                f"kv_transfer_params['remote_block_ids'][{g}] holds {len(rem_l)} state blocks "
                f"for a {group_kinds[g]} group (at most 2)"
            )
        if len(loc) <= len(rem_l):
            rem_l = rem_l[len(rem_l) - len(loc) :]
        elif len(loc) - len(rem_l) == 1:
            loc = loc[: len(rem_l)]
        else:
            raise BadRequestError(
                f"group {g}: {len(loc)} blocks to fill here but the prefill holds {len(rem_l)}"
            )
        out_l.append(loc)
        out_r.append(rem_l)
    return out_l, out_r
