"""A worker process serving one engine rank with vLLM-shaped KV caches and a real Endpoint.

Handler for :class:`layoutc.tools.harness.Worker` (``"vllm_ranks:VllmRank"``): ``setup``
allocates the rank's KV cache as vLLM does (:mod:`vllm_layouts`), has the connector choose
the spec, check the tensors and wrap them (``spec_choice``, ``plans``, ``tensors``: the code
``register_kv_caches`` runs), and registers them with an :class:`Endpoint`.  Prefill ranks
tag a request's blocks (every byte from its logical identity), decode ranks check every byte
of their cache: the tags where a request landed, the sentinel everywhere else.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

SENTINEL = 0x5A
PREFILL_FILL = 0xC3


class VllmRank:
    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.ep: Any = None

    def setup(
        self, case: str, role: str, rank: int, ptp: int, dtp: int, num_blocks: int, device: str
    ) -> str:
        from layoutc.connectors.vllm.plans import SpecPlans
        from layoutc.connectors.vllm.rounds import GroupRounds
        from layoutc.connectors.vllm.spec_choice import choose_spec
        from layoutc.connectors.vllm.tensors import wrap
        from layoutc.runtime.endpoint import Endpoint, kind_pages
        from layoutc.runtime.tags import PageTagger
        from vllm_layouts import CASES, vllm_cache

        tp = ptp if role == "prefill" else dtp
        kv, layout = vllm_cache(CASES[case], tp, rank, num_blocks, device)
        choice = choose_spec(layout)
        plans = SpecPlans(choice.spec, choice.params, role=role)
        plan = plans.plan(ptp, dtp)
        side = plan.prefill if role == "prefill" else plan.decode
        pages = kind_pages(plan)
        self.reg = wrap(kv, layout, choice, side, pages)
        token_kinds = frozenset(
            k for k, ps in pages.items() if all(side.page(p).per == "kernel" for p in ps)
        )
        # a request's rounds, as the connector's workers make them
        self.rounds = GroupRounds.of(choice.group_kinds, self.reg.group_layers, token_kinds)
        self.layer_group = {
            li: g for g, layers in enumerate(self.reg.group_layers) for li in layers
        }
        self.kv = kv  # keeps the allocation alive
        self.role, self.side, self.spec = role, side, choice.spec
        self.ep = Endpoint(
            plans, role=role, rank=rank, tp=tp, engine=role, device=self.reg.device, timeout_s=30
        )
        self.ep.register_layers(self.reg.buffers, self.reg.kinds)
        self.taggers = {p: PageTagger(side, rank, p) for p in side.page_names}
        fill = PREFILL_FILL if role == "prefill" else SENTINEL
        for layer in self.reg.buffers:
            for t in layer.values():
                t.fill_(fill)
        self.results: dict[str, Any] = {}
        return choice.spec

    # -- bytes ----------------------------------------------------------------------------------
    def _host(self, t: Any) -> np.ndarray:
        return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()

    def _want(self, li: int, page: str, view: np.ndarray, reqs: list[tuple[int, Any]]) -> None:
        """Tags of requests ``reqs`` (``(request, block ids per group)``) in layer ``li``."""
        from layoutc.runtime.tags import block_keys

        for req, groups in reqs:
            ids = groups[self.layer_group[li]]
            if len(ids):
                ids = np.asarray(ids, dtype=np.int64)
                self.taggers[page].fill(view, ids, block_keys(li, req, np.arange(ids.size)))

    def tag(self, req: int, blocks: Any) -> None:
        """Write request ``req``'s tags into its blocks of every layer (prefill)."""
        import torch

        for li, layer in enumerate(self.reg.buffers):
            for page, t in layer.items():
                host = self._host(t).copy() if t.device.type != "cpu" else self._host(t)
                view = host.reshape(self.reg.num_blocks, -1)
                self._want(li, page, view, [(req, blocks)])
                if t.device.type != "cpu":
                    t.copy_(torch.from_numpy(host).to(t.device))

    def verify(self, reqs: list[tuple[int, Any]]) -> int:
        """Every byte of every registered region: the requests' tags in their blocks, the
        sentinel elsewhere (layers that alias one region -- a hybrid's groups -- share it)."""
        regions: dict[int, list[tuple[int, str, Any]]] = {}
        for li, layer in enumerate(self.reg.buffers):
            for page, t in layer.items():
                regions.setdefault(t.data_ptr(), []).append((li, page, t))
        checked = 0
        for users in regions.values():
            got = self._host(users[0][2]).reshape(self.reg.num_blocks, -1)
            want = np.full_like(got, SENTINEL)
            for li, page, _ in users:
                self._want(li, page, want, reqs)
            bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
            if bad.size:
                b, off = divmod(int(bad[0]), got.shape[1])
                raise AssertionError(
                    f"{self.ep.label}: layers {[u[0] for u in users]}: {bad.size} wrong bytes, "
                    f"first in block {b} at offset {off}"
                )
            checked += got.size
        return checked

    # -- requests, in rounds --------------------------------------------------------------------
    def start(self, mode: str, rid: str, local: list[list[int]], remote: list[list[int]]) -> int:
        """``pull`` or ``push`` request ``rid`` (block ids per group on each side) round by
        round; returns the number of rounds."""
        rounds = self.rounds.make(rid, local, remote)
        for r in rounds:
            getattr(self.ep, mode)(r.rid, dict(r.local), dict(r.remote), layers=r.layers)
        return len(rounds)

    def expect_rounds(self, rid: str, blocks: list[list[int]] | None) -> None:
        """``expect`` every round of ``rid`` (a prefill rank passes its block ids per group)."""
        groups = blocks if blocks is not None else [[] for _ in self.rounds.group_kinds]
        for r in self.rounds.make(rid, groups):
            self.ep.expect(r.rid, blocks=dict(r.local) if blocks is not None else None)

    def wait_rounds(self, rid: str) -> int:
        from layoutc.connectors.vllm.rounds import round_ids

        ids = round_ids(rid, len(self.rounds.rounds))
        for r in ids:
            self.wait(r)
        return len(ids)

    # -- endpoint -------------------------------------------------------------------------------
    def tick(self) -> bool:
        if self.ep is not None:
            prog = self.ep.poll()
            for rid in prog.done:
                self.results[rid] = None
            self.results.update(prog.failed)
        return False

    def wait(self, rid: str, within: float = 60.0) -> dict[str, Any]:
        end = time.monotonic() + within
        while rid not in self.results:
            self.tick()
            if time.monotonic() > end:
                raise TimeoutError(f"{rid!r} not done within {within} s")
            time.sleep(0.0005)
        err = self.results.pop(rid)
        if err is not None:
            raise err
        return self.ep.completion_info(rid).to_dict()

    def teardown(self) -> dict[str, Any] | None:
        if self.ep is None:
            return None
        self.ep.close()
        stats = self.ep.stats().to_dict()
        self.ep = None
        return stats

    def close(self) -> None:
        self.teardown()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or self.__dict__.get("ep") is None:
            raise AttributeError(name)
        return getattr(self.__dict__["ep"], name)
