"""The connector's worker side: vLLM's KV tensors registered with layoutc endpoints, requests
turned into pulls and expects, completions and leases reported back to vLLM.

At ``register_kv_caches`` the worker describes its cache (:mod:`.describe`), picks and checks
the layout spec (:mod:`.spec_choice`, :mod:`.plans`, :mod:`.tensors`), and starts its
:class:`~.transport.Transport` thread with one endpoint per role it plays (prefill: ``expect``,
decode: ``pull``).  Each endpoint listens for layoutc handshakes on its own port (see
:func:`listen_ports`), which the worker publishes in its side-channel payload.

Per step (``start_load_kv``): decode requests become :class:`~.transport.PullJob` s (their
params validated again, block ids aligned per group as vLLM's NIXL worker does for prefix
caching), prefill requests entering their lease become :class:`~.transport.ExpectJob` s, decode
heartbeats go to the prefill engines' side channels.  ``get_finished`` reports what the thread
finished, and prefill requests whose lease ended.
"""

from __future__ import annotations

import time
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.nixl.stats import NixlKVConnectorStats
from vllm.distributed.parallel_state import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from vllm.logger import init_logger

from ...runtime.endpoint import kind_pages
from .config import Settings
from .describe import compat_hash, engine_layout
from .errors import BadRequestError, ConfigError
from .metadata import LayoutcConnectorMetadata, LayoutcHandshakePayload
from .params import parse_remote
from .plans import LoadedSpec, SpecPlans
from .rounds import GroupRounds
from .spec_choice import choose_spec
from .tensors import wrap
from .transport import (
    PAYLOAD_FORMAT,
    EndpointConfig,
    ExpectJob,
    FailJob,
    HeartbeatJob,
    PullJob,
    Transport,
)

__all__ = ["LayoutcWorker", "advertised_host", "listen_ports"]

logger = init_logger("vllm.layoutc." + __name__.rsplit(".", 1)[-1])


def listen_ports(
    base: int | None, *, roles: tuple[str, ...], rank: int, tp: int, dp_index: int, dp_size: int
) -> dict[str, int]:
    """The port each endpoint of this worker listens on for layoutc handshakes.  With
    ``listen_port`` (``base``) set: the prefill endpoint of TP rank ``r`` of data-parallel rank
    ``i`` at ``base + i*tp + r``; the decode endpoint at the same port, or ``tp * dp_size``
    further for a ``kv_both`` engine.  Without it: 0 (the endpoint takes a free port and the
    payload advertises it)."""
    if base is None:
        return dict.fromkeys(roles, 0)
    slot = base + dp_index * tp + rank
    out = {}
    for i, role in enumerate(roles):
        port = slot + i * tp * dp_size
        if port > 65535:
            raise ConfigError(f"listen_port {base} leaves no port for rank {rank} ({port})")
        out[role] = port
    return out


def advertised_host(bind: str, side_channel_host: str) -> str:
    """The host peers reach a listener at: where it binds, or the side channel's host when it
    binds every interface."""
    return side_channel_host if bind in ("0.0.0.0", "::", "") else bind


class LayoutcWorker:
    """Worker side of :class:`~.connector.LayoutcConnector` (see the module)."""

    def __init__(self, vllm_config: Any, engine_id: str, kv_cache_config: Any, settings: Settings):
        self.vllm_config = vllm_config
        self.engine_id = engine_id
        self.kv_cache_config = kv_cache_config
        self.settings = settings
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        pc = vllm_config.parallel_config
        if pc.pipeline_parallel_size != 1 or pc.decode_context_parallel_size != 1:
            raise ConfigError(
                "LayoutcConnector serves engines without pipeline or decode context "
                f"parallelism (pipeline_parallel_size {pc.pipeline_parallel_size}, "
                f"decode_context_parallel_size {pc.decode_context_parallel_size})"
            )
        self.dp_index = int(getattr(pc, "data_parallel_index", 0) or 0)
        self.dp_size = int(getattr(pc, "data_parallel_size", 1) or 1)
        self.transport: Transport | None = None
        self.payload: LayoutcHandshakePayload | None = None
        self.kinds: GroupRounds | None = None
        self.block_size = 0
        self.stats = NixlKVConnectorStats()
        self._leases: dict[str, float] = {}  # prefill request -> lease deadline (our clock)
        self._failed: set[str] = set()

    # ------------------------------------------------------------------ start-up
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        import vllm.envs as envs

        s = self.settings
        layout = engine_layout(self.vllm_config, self.kv_cache_config, kv_caches, self.tp_rank)
        choice = choose_spec(layout, s.layout_spec)
        roles = tuple(r for r, on in (("prefill", s.is_producer), ("decode", s.is_consumer)) if on)
        loaded = LoadedSpec(choice.spec)
        plans = {role: SpecPlans(loaded, choice.params, role=role) for role in roles}
        first = plans[roles[0]]
        first.check_bindable(self.tp_size)
        plan = first.plan(self.tp_size, self.tp_size)
        side = first.side(self.tp_size)
        reg = wrap(kv_caches, layout, choice, side, kind_pages(plan))
        token_kinds = frozenset(
            k
            for k, pages in kind_pages(plan).items()
            if all(side.page(p).per == "kernel" for p in pages)
        )
        self.kinds = GroupRounds.of(choice.group_kinds, reg.group_layers, token_kinds)
        self.block_size = (
            max(g.block_size for g in layout.groups if g.kind != "mamba")
            if any(g.kind != "mamba" for g in layout.groups)
            else layout.groups[0].block_size
        )
        side_host = str(envs.VLLM_NIXL_SIDE_CHANNEL_HOST)
        bind = s.listen_host or side_host
        ports = listen_ports(
            s.listen_port,
            roles=roles,
            rank=self.tp_rank,
            tp=self.tp_size,
            dp_index=self.dp_index,
            dp_size=self.dp_size,
        )
        timeout = s.transfer_timeout_s
        configs = [
            EndpointConfig(
                role=role,
                plans=plans[role],
                rank=self.tp_rank,
                tp=self.tp_size,
                name=f"{self.engine_id}-{role[0]}{self.tp_rank}",
                engine=self.engine_id,
                device=reg.device,
                listen_port=ports[role],
                buffers=reg.buffers,
                kinds=reg.kinds,
                timeout_s=timeout,
                strategy=s.strategy,
                staging_bytes=s.staging_bytes,
                auth_key=s.auth_key,
                listen_host=bind,
            )
            for role in roles
        ]
        local = {
            "spec": choice.spec,
            "spec_sha256": first.sha256,
            "conv_layout": choice.conv_layout,
            "compat_hash": compat_hash(self.vllm_config, choice.spec, choice.conv_layout),
        }
        self.transport = Transport(
            configs,
            local=local,
            plans=plans.get("decode"),
            rounds=self.kinds,
            block_size=self.block_size,
            tp_rank=self.tp_rank,
            tp_size=self.tp_size,
            allowed_hosts=s.allowed_peers,
            enforce_compat=s.enforce_compat,
            handshake_timeout_s=s.handshake_timeout_s,
            transfer_timeout_s=s.transfer_timeout_s,
            lease_margin_s=s.lease_margin_s,
            expect_timeout_s=max(3600.0, 10.0 * s.lease_s),
        )
        if s.is_producer:
            self.payload = LayoutcHandshakePayload.of(
                {
                    "format": PAYLOAD_FORMAT,
                    **local,
                    "engine_id": self.engine_id,
                    "tp_size": self.tp_size,
                    "tp_rank": self.tp_rank,
                    "agent": f"{self.engine_id}-p{self.tp_rank}",
                    "host": advertised_host(bind, side_host),
                    "port": self.transport.ports["prefill"],
                    "params": dict(plans["prefill"].params),
                    "lease_s": s.lease_s,
                    "num_blocks": reg.num_blocks,
                    "block_size": self.block_size,
                }
            )
        logger.info(
            "LayoutcConnector rank %d: spec %s (%s), %d layers, %d blocks on %s; endpoints %s",
            self.tp_rank,
            choice.spec,
            ", ".join(f"{k}={v}" for k, v in sorted(first.params.items())),
            len(reg.layer_names),
            reg.num_blocks,
            reg.device,
            ", ".join(f"{r} on {bind}:{p}" for r, p in self.transport.ports.items()),
        )

    # ------------------------------------------------------------------ per step
    def start_load_kv(self, meta: LayoutcConnectorMetadata) -> None:
        t = self.transport
        if t is None:
            return
        nixl = meta.nixl
        for req_id, why in meta.failed_recv.items():
            t.submit(FailJob(req_id, why))
        for req_id, m in nixl.reqs_to_recv.items():
            job = self._pull_job(req_id, m, meta.prompt_tokens.get(req_id))
            if job is not None:
                t.submit(job)
        if self.tp_rank == 0:
            for engine_id, hb in nixl.heartbeat_by_engine.items():
                t.submit(HeartbeatJob(engine_id, hb.host, hb.port, tuple(sorted(hb.req_ids))))
        now = time.perf_counter()
        clock = nixl.scheduler_clock or now
        for req_id, deadline in nixl.reqs_to_send.items():
            self._leases[req_id] = now + (deadline - clock)
            blocks = meta.send_blocks.get(req_id, ())
            t.submit(self._expect_job(req_id, blocks, meta.send_tokens.get(req_id)))
        for req_id, deadline in meta.lease_updates.items():
            if req_id in self._leases:
                self._leases[req_id] = max(self._leases[req_id], now + (deadline - clock))

    def _expect_job(
        self, req_id: str, blocks: tuple[list[int], ...], num_tokens: int | None
    ) -> ExpectJob:
        assert self.kinds is not None
        rounds = self.kinds.make(f"{self.engine_id}:{req_id}", blocks)
        return ExpectJob(req_id, rounds, num_tokens)

    def _pull_job(self, req_id: str, m: Any, prompt_tokens: int | None) -> PullJob | FailJob | None:
        assert self.kinds is not None
        report = bool(m.awaiting_kvs or any(m.local_block_ids))
        r = m.remote
        try:
            if r is None:
                raise BadRequestError("no remote side in the request's metadata")
            remote = parse_remote(
                {
                    "remote_engine_id": r.engine_id,
                    "remote_request_id": r.request_id,
                    "remote_host": r.host,
                    "remote_port": r.port,
                    "tp_size": m.tp_size,
                    "remote_block_ids": r.block_ids,
                    "remote_num_tokens": r.num_tokens,
                    "remote_blocks_expiry_time": r.blocks_expiry_time,
                },
                num_groups=len(self.kinds.group_kinds),
                allowed_hosts=self.settings.allowed_peers,
                max_tokens=prompt_tokens if prompt_tokens is not None else 1 << 31,
            )
            local = tuple(tuple(int(b) for b in g) for g in m.local_block_ids)
            if local and len(local) != len(remote.block_ids):
                raise BadRequestError(
                    f"{len(local)} local block groups for {len(remote.block_ids)} remote"
                )
        except BadRequestError as e:
            if not report:
                logger.warning("request %s: %s (nothing to load; prefill not notified)", req_id, e)
                return None
            return FailJob(req_id, str(e))
        computed = tuple(int(c) for c in (m.local_num_computed_blocks or ()))
        return PullJob(req_id, remote, local, computed, report)

    # ------------------------------------------------------------------ completion
    def get_finished(self) -> tuple[set[str], set[str], set[str]]:
        """(finished sending, finished receiving, failed receiving) since the last call."""
        t = self.transport
        if t is None:
            return set(), set(), set()
        res = t.drain()
        sending = {rid for rid in res.send_done if self._leases.pop(rid, None) is not None}
        now = time.perf_counter()
        for rid in [rid for rid, d in self._leases.items() if now >= d]:
            del self._leases[rid]
            sending.add(rid)
            self.stats.record_kv_expired_req()
            logger.warning("lease of request %s ended before every reader was done", rid)
        for rid, why in res.recv_failed.items():
            logger.warning("loading request %s failed: %s", rid, why)
        for tr in res.transfers:
            self.stats.data["transfer_duration"].append(tr.seconds)
            self.stats.data["post_duration"].append(tr.post_seconds)
            self.stats.data["bytes_transferred"].append(tr.nbytes)
            self.stats.data["num_descriptors"].append(tr.descriptors)
        for _ in range(res.failed_transfers):
            self.stats.record_failed_transfer()
        for _ in range(res.failed_handshakes):
            self.stats.record_failed_handshake()
        return sending, set(res.recv_done), set(res.recv_failed)

    def get_kv_connector_stats(self) -> NixlKVConnectorStats | None:
        if self.stats.is_empty():
            return None
        return self.stats.clone_and_reset()

    def shutdown(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
