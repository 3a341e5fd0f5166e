"""A request's block ids on one endpoint: one sequence or ``{kind: ids}``, the layers of a
kind, and -- for engines holding different tokens per logical block -- the ids that hold a
request's tokens.  Pure checks, no NIXL: what :class:`~.endpoint.Endpoint` validates before
anything is posted."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import BlockIdError, UsageError
from ..plan import Plan, SideLayout

__all__ = ["RequestBlocks"]


class RequestBlocks:
    """The block-id rules of one endpoint (``label``, its ``role`` and side layout, its layer
    kinds: kind -> pages, and ``layer_kinds()``: the kind of each registered layer)."""

    def __init__(
        self,
        label: str,
        role: str,
        peer_role: str,
        side: SideLayout,
        kinds: Mapping[str, Sequence[str]],
        layer_kinds: Callable[[], Sequence[str]],
    ) -> None:
        self.label, self.role, self.peer_role = label, role, peer_role
        self.side = side
        self.kinds = dict(kinds)
        self._layer_kinds = layer_kinds

    def sets(self, local: Any, remote: Any, rid: str) -> list[tuple[str | None, Any, Any]]:
        """``[(kind, local ids, remote ids)]``: one entry of kind None (every layer) for two
        sequences, one per kind (in the plan's order) for two ``{kind: ids}`` mappings."""
        lmap, rmap = isinstance(local, Mapping), isinstance(remote, Mapping)
        if not lmap and not rmap:
            return [(None, local, remote)]
        if not (lmap and rmap):
            raise UsageError(
                f"{self.label}: request {rid!r}: give block ids per kind on both sides "
                f"({{kind: ids}}) or one sequence on both"
            )
        if set(local) != set(remote):
            raise UsageError(
                f"{self.label}: request {rid!r}: kinds {sorted(map(str, local))} locally but "
                f"{sorted(map(str, remote))} remotely"
            )
        unknown = [k for k in local if k not in self.kinds]
        if unknown:
            raise UsageError(
                f"{self.label}: request {rid!r}: no layer kind {unknown[0]!r} "
                f"(kinds: {', '.join(self.kinds)})"
            )
        return [(k, local[k], remote[k]) for k in self.kinds if k in local]

    def tokens(self, num_tokens: Any, rid: str) -> int | None:
        if num_tokens is None:
            return None
        if not isinstance(num_tokens, (int, np.integer)) or isinstance(num_tokens, bool):
            raise UsageError(
                f"{self.label}: request {rid!r}: num_tokens must be an int, got "
                f"{type(num_tokens).__name__}"
            )
        if not 0 <= int(num_tokens) < 1 << 40:
            raise UsageError(
                f"{self.label}: request {rid!r}: num_tokens must be in [0, 2**40), got "
                f"{int(num_tokens)}"
            )
        return int(num_tokens)

    def per_kernel(self, kind: str | None) -> bool:
        """Are the pages of ``kind`` (None: every layer) stored per kernel block?  (Under a
        token remap a kind's pages are all one or all the other, or it is refused.)"""
        pages = self.side.page_names if kind is None else self.kinds[kind]
        return any(self.side.page(p).per == "kernel" for p in pages)

    def window(
        self, plan: Plan, kind: str | None, local: Any, remote: Any, tokens: int, rid: str
    ) -> tuple[Any, Any]:
        """Under a token remap: the block ids of a per-kernel-block kind that hold the
        request's ``tokens`` on each side (the first ones: more may be given)."""
        pages = self.side.page_names if kind is None else self.kinds[kind]
        pers = {self.side.page(p).per for p in pages}
        what = "every layer" if kind is None else f"kind {kind!r}"
        if len(pers) > 1:
            raise UsageError(
                f"{self.label}: request {rid!r}: the engines hold different tokens per logical "
                f"block, so per-kernel-block and per-logical-block pages need block ids of "
                f"their own: give them per kind ({{kind: ids}}) instead of one sequence for "
                f"{what}"
            )
        if pers != {"kernel"}:
            return local, remote
        rm = plan.remap
        assert rm is not None
        out = []
        for role, ids in ((self.role, local), (self.peer_role, remote)):
            need = rm.blocks_for(role, tokens)
            try:
                n = len(ids)
            except TypeError:
                return local, remote  # (refused as not a sequence by the id checks)
            if n < need:
                kt, kb = rm.side(role)
                raise BlockIdError(
                    f"{self.label}: request {rid!r}: {tokens} tokens need {need} {role} block "
                    f"ids of {what} ({kt * kb} tokens per logical block), got {n}",
                    request_id=rid,
                )
            out.append(ids[:need])
        return out[0], out[1]

    def kind_layers(self, kind: str | None, sel: np.ndarray | None) -> np.ndarray | None:
        """Layers of ``kind`` (None: every layer) within the selection ``sel``."""
        if kind is None:
            return sel
        of_kind = np.array(
            [i for i, k in enumerate(self._layer_kinds()) if k == kind], dtype=np.int64
        )
        return of_kind if sel is None else np.intersect1d(of_kind, sel)
