"""``LayoutcConnector``: a vLLM 0.32 KV connector that moves prefill KV to decode engines of
any TP size through layoutc's verified plans.  A drop-in for ``NixlConnector``::

    KVTransferConfig(kv_connector="LayoutcConnector",
                     kv_connector_module_path="layoutc.connectors.vllm",
                     kv_role="kv_producer" | "kv_consumer" | "kv_both",
                     kv_buffer_device="cpu" | "cuda",
                     kv_connector_extra_config={...})

The scheduler side is :class:`~.scheduler.LayoutcScheduler` (vLLM's NIXL pull scheduler plus
validation, the side channel and leases), the worker side :class:`~.worker.LayoutcWorker`
(layoutc endpoints in a thread of their own).  Statistics use NixlConnector's classes, so
the same ``vllm:nixl_*`` metrics appear.  See ``docs/vllm.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.stats import (
    NixlKVConnectorStats,
    NixlPromMetrics,
)
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from .config import Settings, check_vllm_version, parse_settings
from .metadata import LayoutcConnectorMetadata
from .scheduler import LayoutcScheduler
from .worker import LayoutcWorker

if TYPE_CHECKING:
    import torch

__all__ = ["LayoutcConnector"]

logger = init_logger("vllm.layoutc." + __name__.rsplit(".", 1)[-1])

check_vllm_version(vllm.__version__)


def _settings(vllm_config: Any) -> Settings:
    kv = vllm_config.kv_transfer_config
    settings = parse_settings(
        kv_role=kv.kv_role,
        kv_buffer_device=kv.kv_buffer_device,
        extra=kv.kv_connector_extra_config,
        failure_policy=getattr(kv, "kv_load_failure_policy", "fail"),
        platform_device=str(current_platform.device_type),
    )
    for key in settings.ignored:
        logger.warning_once(f"LayoutcConnector ignores NixlConnector's setting {key!r}")
    for key in settings.unknown:
        logger.warning_once(f"LayoutcConnector: unknown kv_connector_extra_config key {key!r}")
    return settings


class LayoutcConnector(KVConnectorBase_V1, SupportsHMA):
    """vLLM KV connector executing layoutc transfer plans (see the module)."""

    _cache_hit_source = CacheHitSource.P2P

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any) -> None:
        check_vllm_version(vllm.__version__)
        super().__init__(vllm_config, role, kv_cache_config)
        self.settings = _settings(vllm_config)
        engine_id = vllm_config.kv_transfer_config.engine_id
        self.scheduler: LayoutcScheduler | None = None
        self.worker: LayoutcWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = LayoutcScheduler(
                vllm_config, engine_id, kv_cache_config, self.settings
            )
        elif role == KVConnectorRole.WORKER:
            self.worker = LayoutcWorker(vllm_config, engine_id, kv_cache_config, self.settings)

    @property
    def supports_divergent_local_hybrid_hits(self) -> bool:
        return True

    # ------------------------------------------------------------------ class methods
    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> str | None:
        """The layout the built-in specs describe: head outermost in a page (LBHNC, which
        vLLM also calls HND); MLA pages have one head, any layout fits them."""
        model = getattr(vllm_config, "model_config", None)
        if model is None or model.use_mla:
            return None
        return "LBHNC"

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVConnectorStats | None:
        return NixlKVConnectorStats(data=data) if data is not None else NixlKVConnectorStats()

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: Any,
        metric_types: dict[Any, Any],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics:
        return NixlPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # ------------------------------------------------------------------ scheduler side
    def _sched(self) -> LayoutcScheduler:
        assert self.scheduler is not None, "scheduler method called on a worker connector"
        return self.scheduler

    def get_finished_count(self) -> int | None:
        return None

    def get_loaded_kv_cache_group_ids(self, request: Any) -> tuple[int, ...]:
        return tuple(self._kv_cache_config.transfer_group_ids)

    def on_new_request(self, request: Any) -> None:
        self._sched().on_new_request(request)

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._sched().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._sched().update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return self._sched().build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        self._sched().update_connector_output(connector_output)

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self._sched().request_finished(request, (block_ids,))

    def request_finished_all_groups(
        self, request: Any, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self._sched().request_finished(request, block_ids)

    def set_xfer_handshake_metadata_pp_aware(
        self, metadata: dict[tuple[int, int], KVConnectorHandshakeMetadata]
    ) -> None:
        self._sched().set_xfer_handshake_metadata(metadata)

    def set_xfer_handshake_metadata(
        self, metadata: dict[int, KVConnectorHandshakeMetadata]
    ) -> None:
        self._sched().set_xfer_handshake_metadata({(0, tp): m for tp, m in metadata.items()})

    # ------------------------------------------------------------------ worker side
    def _work(self) -> LayoutcWorker:
        assert self.worker is not None, "worker method called on a scheduler connector"
        return self.worker

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._work().register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self._work().payload

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, LayoutcConnectorMetadata)
        self._work().start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads complete whole requests before they are scheduled (asynchronous loading)."""

    def save_kv_layer(
        self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any
    ) -> None:
        """Decode reads prefill's pages in place: nothing to save."""

    def wait_for_save(self) -> None:
        """Decode reads prefill's pages in place: nothing to save."""

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending, results.finished_recving

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        sending, recving, failed = self._work().get_finished()
        return KVConnectorTransferResults(
            finished_sending=sending, finished_recving=recving, failed_recving=failed
        )

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Failed loads are reported per request (``failed_recving``), never per block."""
        return set()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return None if self.worker is None else self.worker.get_kv_connector_stats()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
        if self.scheduler is not None:
            self.scheduler.shutdown()
