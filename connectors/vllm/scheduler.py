"""The connector's scheduler side: vLLM's NIXL pull scheduler, with untrusted requests
refused, the side channel served by layoutc, and lease renewals carried to the workers.

vLLM's ``NixlPullConnectorScheduler`` keeps the request protocol (``do_remote_decode`` /
``do_remote_prefill``, the ``kv_transfer_params`` prefill returns), prefix caching on decode,
hybrid groups (SSM slots clipped, per-group block ids), the Mamba back-off (prefill stops one
token short), leases (prefill blocks are freed by the workers when every reader is done or the
lease ends) and decode heartbeats.  This subclass adds:

* each decode request's ``kv_transfer_params`` are validated on arrival
  (:func:`~.params.parse_remote`); a refused request is still scheduled as a remote load so
  that it fails through vLLM's own path, following ``kv_load_failure_policy``;
* the side channel (:class:`~.side_channel.SideChannelServer`) serves the workers' payloads
  and lease renewals (``hb``), with every message validated;
* a prefill request's returned params carry its lease deadline
  (``remote_blocks_expiry_time``, in this process's clock), so a decode worker can refuse to
  read blocks whose lease ended.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_scheduler import (
    NixlPullConnectorScheduler,
)
from vllm.logger import init_logger

from .config import Settings
from .errors import BadRequestError, SideChannelError
from .metadata import LayoutcConnectorMetadata, LayoutcHandshakePayload
from .params import parse_remote
from .side_channel import SideChannelServer

__all__ = ["LayoutcScheduler"]

logger = init_logger("vllm.layoutc." + __name__.rsplit(".", 1)[-1])

_MAX_HEARTBEAT_IDS = 4096


class LayoutcScheduler(NixlPullConnectorScheduler):
    """Scheduler side of :class:`~.connector.LayoutcConnector` (see the module)."""

    def __init__(
        self, vllm_config: Any, engine_id: str, kv_cache_config: Any, settings: Settings
    ) -> None:
        super().__init__(vllm_config, engine_id, kv_cache_config)
        # NixlConnector-only features, reported as ignored keys
        self.is_bidirectional_kv_xfer_enabled = False
        self.settings = settings
        self._num_groups = len(kv_cache_config.transfer_groups)
        self._server: SideChannelServer | None = None
        self._payloads: dict[int, dict[str, Any]] = {}
        self._lease_lock = threading.Lock()
        self._leases: dict[str, float] = {}  # prefill request -> lease deadline
        self._lease_updates: dict[str, float] = {}
        self._send_blocks: dict[str, tuple[list[int], ...]] = {}
        self._send_tokens: dict[str, int] = {}
        self._refused: dict[str, str] = {}  # decode request -> why its params were refused
        self._failed_recv: dict[str, str] = {}

    # ------------------------------------------------------------------ requests
    def on_new_request(self, request: Any) -> None:
        params = request.kv_transfer_params
        rid = request.request_id
        if params is not None and not isinstance(params, dict):
            self._refuse(request, f"kv_transfer_params must be a dict, got {type(params).__name__}")
            request.kv_transfer_params = {"do_remote_prefill": False, "do_remote_decode": False}
            return
        if params and params.get("do_remote_decode") and not self.settings.is_producer:
            logger.warning(
                "request %s asks for do_remote_decode but this engine is a %s: served locally",
                rid,
                self.settings.role,
            )
            params["do_remote_decode"] = False
        if params and params.get("do_remote_prefill"):
            try:
                if not self.settings.is_consumer:
                    raise BadRequestError(
                        f"do_remote_prefill on an engine of kv_role {self.settings.role!r}"
                    )
                parse_remote(
                    params,
                    num_groups=self._num_groups,
                    allowed_hosts=self.settings.allowed_peers,
                    max_tokens=request.num_prompt_tokens,
                )
            except BadRequestError as e:
                self._refuse(request, str(e))
                params["do_remote_prefill"] = False
                return
        super().on_new_request(request)

    def _refuse(self, request: Any, why: str) -> None:
        logger.warning("request %s: %s", request.request_id, why)
        self._refused[request.request_id] = why

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        rid = request.request_id
        if rid in self._refused:
            # scheduled as a remote load so that it fails through vLLM's failure path
            count = self._get_remote_prefill_token_count(request.num_prompt_tokens)
            if count - num_computed_tokens > 0:
                return count - num_computed_tokens, True
            self._refused.pop(rid)  # nothing to load: it simply runs here
            return 0, False
        return super().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        why = self._refused.pop(request.request_id, None)
        if why is not None:
            if num_external_tokens > 0:
                self._failed_recv[request.request_id] = why
            return
        super().update_state_after_alloc(request, blocks, num_external_tokens)

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        self._refused.pop(request.request_id, None)
        delay, out = super().request_finished(request, block_ids)
        if delay and out is not None and out.get("do_remote_prefill"):
            rid = request.request_id
            deadline = self._reqs_need_send.get(rid)
            if deadline is not None:
                out["remote_blocks_expiry_time"] = deadline
                with self._lease_lock:
                    self._leases[rid] = deadline
                self._send_blocks[rid] = tuple(list(g) for g in out["remote_block_ids"])
                self._send_tokens[rid] = int(out.get("remote_num_tokens") or 0)
        return delay, out

    def build_connector_meta(self, scheduler_output: Any) -> LayoutcConnectorMetadata:
        prompt_tokens = {
            rid: int(entry[0].num_prompt_tokens) for rid, entry in self._reqs_need_recv.items()
        }
        nixl = super().build_connector_meta(scheduler_output)
        with self._lease_lock:
            updates, self._lease_updates = self._lease_updates, {}
        send = {
            rid: self._send_blocks.pop(rid) for rid in nixl.reqs_to_send if rid in self._send_blocks
        }
        tokens = {rid: self._send_tokens.pop(rid) for rid in send if rid in self._send_tokens}
        failed, self._failed_recv = self._failed_recv, {}
        return LayoutcConnectorMetadata(
            nixl=nixl,
            failed_recv=failed,
            prompt_tokens=prompt_tokens,
            send_blocks=send,
            send_tokens=tokens,
            lease_updates=updates,
        )

    def update_connector_output(self, connector_output: Any) -> None:
        super().update_connector_output(connector_output)
        done = connector_output.finished_sending or ()
        if done:
            with self._lease_lock:
                for rid in done:
                    self._leases.pop(rid, None)
                    self._lease_updates.pop(rid, None)

    # ------------------------------------------------------------------ side channel
    def set_xfer_handshake_metadata(self, metadata: dict[tuple[int, int], Any]) -> None:
        for (pp_rank, tp_rank), payload in metadata.items():
            if not isinstance(payload, LayoutcHandshakePayload):
                raise SideChannelError(
                    f"worker (pp {pp_rank}, tp {tp_rank}) published {type(payload).__name__}, "
                    f"not a LayoutcHandshakePayload"
                )
            if pp_rank != 0:
                raise SideChannelError("LayoutcConnector does not serve pipeline parallelism")
            self._payloads[tp_rank] = payload.decode()
        if self._server is None and self.settings.is_producer:
            self._server = SideChannelServer(
                self.side_channel_host, self.side_channel_port, self._serve
            )
            logger.info("layoutc side channel listening on %s", self._server.address)

    def _serve(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "meta":
            rank = msg.get("tp_rank")
            if not isinstance(rank, int) or isinstance(rank, bool) or rank not in self._payloads:
                raise SideChannelError(
                    f"no TP rank {rank!r:.20} here (ranks {sorted(self._payloads)})"
                )
            return {"ok": True, "payload": self._payloads[rank], "clock": time.perf_counter()}
        if op == "hb":
            ids = msg.get("req")
            if (
                not isinstance(ids, list)
                or len(ids) > _MAX_HEARTBEAT_IDS
                or not all(isinstance(i, str) and len(i) <= 256 for i in ids)
            ):
                raise SideChannelError(
                    f"a heartbeat names a list of at most {_MAX_HEARTBEAT_IDS} request ids"
                )
            now = time.perf_counter()
            renewed = now + self._kv_lease_duration * 2 / 3
            # A lease about to end is not renewed: the workers learn a renewal at their next
            # step and may end the lease before that (freeing the blocks) while decode would
            # believe the new deadline.  A decode heartbeating every kv_lease_duration // 6
            # renews long before this guard.
            guard = max(0.5, self._kv_lease_duration / 6)
            out = {}
            with self._lease_lock:
                for rid in ids:
                    deadline = self._leases.get(rid)
                    if deadline is not None and deadline - now > guard:
                        self._leases[rid] = max(deadline, renewed)
                        self._lease_updates[rid] = self._leases[rid]
                        out[rid] = self._leases[rid]
            return {"ok": True, "leases": out, "clock": now}
        raise SideChannelError(f"unknown side-channel operation {op!r:.40}")

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        super().shutdown()
