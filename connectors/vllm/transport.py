"""One thread per vLLM worker that owns the worker's layoutc endpoints.

An :class:`~layoutc.runtime.Endpoint` is single-threaded and progresses only inside its calls,
so a worker gives it a thread of its own (:class:`Transport`): the thread creates the endpoint,
registers vLLM's pages, and then polls it -- every 50 µs to 2 ms while transfers run, every
few milliseconds when idle -- so that transfers complete and peers are answered (handshakes,
notifications) whether or not vLLM is stepping.  vLLM's worker methods only post jobs
(:meth:`Transport.submit`) and collect what finished (:meth:`Transport.drain`).

Decode side (pull): a job names its prefill engine; the first job of an engine triggers the
handshake -- every prefill rank's payload from the engine's side channel (in a helper thread),
checked (:func:`check_payload`), then :meth:`Endpoint.connect` to each prefill rank this rank
reads from or notifies -- and waits for it.  Before reading, the job's lease is checked
against the prefill engine's clock; then one ``pull`` per round of KV-cache groups (one group
of each layer kind per round: ``rid``, ``rid#1``, ...).  A job ends when every round ended.
Requests waiting in vLLM's queue have their leases renewed over their prefill engine's side
channel (in helper threads of their own, whether or not this worker has met that engine over
NIXL yet), and the answers are kept for that check (:class:`~.leases.Leases`).

Prefill side (expect): one ``expect`` per round with the request's block ids (so a staged
transfer packs ahead); the job ends when every round ended.

Needs no vLLM (the tests drive it with plain endpoints).
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ...runtime.errors import (
    LayoutcError,
    PeerDisconnectedError,
    PeerNotConnectedError,
    TransferError,
)
from .errors import BadRequestError, SideChannelError
from .leases import MAX_ENGINES, Leases
from .params import RemoteRequest, host_allowed
from .plans import SpecPlans
from .rounds import GroupRounds, Round, align
from .side_channel import query

__all__ = [
    "EndpointConfig",
    "ExpectJob",
    "HeartbeatJob",
    "PullJob",
    "Transfer",
    "Transport",
    "check_payload",
]

HEARTBEAT_MIN_INTERVAL_S = 0.25
"""Least time between two lease renewals sent to one prefill engine."""
HEARTBEAT_TIMEOUT_S = 5.0
"""A renewal that gets no answer in this time is dropped (the next one is sent)."""

#: under vLLM's logger namespace, so an engine's log configuration applies
logger = logging.getLogger("vllm.layoutc.transport")

PAYLOAD_FORMAT = "layoutc-vllm/1"
_IDLE_S = 0.005
_BUSY_MIN_S = 50e-6
_BUSY_MAX_S = 2e-3
_MAX_TEXT = 256


@dataclass(frozen=True)
class EndpointConfig:
    """How the thread builds one endpoint (keyword arguments of ``Endpoint`` plus the pages
    to register)."""

    role: str  # "prefill" or "decode"
    plans: SpecPlans
    rank: int
    tp: int
    name: str
    engine: str
    device: str
    listen_port: int
    buffers: list[dict[str, Any]]
    kinds: list[str]
    timeout_s: float
    strategy: str = "auto"
    staging_bytes: int | None = None
    auth_key: str | None = None
    listen_host: str | None = None


@dataclass(frozen=True)
class PullJob:
    """Decode: load one request's blocks from its prefill engine.  ``local``: this engine's
    block ids per transfer group (only those its prefix cache lacks); ``computed``: its
    prefix-cache hit per group, in blocks."""

    req_id: str  # vLLM's id of the decode request (what finishes)
    remote: RemoteRequest
    local: tuple[tuple[int, ...], ...]
    computed: tuple[int, ...]
    report: bool  # report in finished_recving (vLLM waits for it)


@dataclass(frozen=True)
class ExpectJob:
    """Prefill: wait until every decode rank that reads the request's blocks is done."""

    req_id: str
    rounds: tuple[Round, ...]
    num_tokens: int | None = None  # the tokens its blocks hold


@dataclass(frozen=True)
class HeartbeatJob:
    """Decode: renew the leases of requests waiting in this engine's queue."""

    engine_id: str
    host: str
    port: int
    request_ids: tuple[str, ...]


@dataclass(frozen=True)
class FailJob:
    """Decode: report a request as failed without moving anything (a bad request)."""

    req_id: str
    error: str


@dataclass(frozen=True)
class Transfer:
    """A finished pull round, for the transfer statistics."""

    seconds: float  # first post to completion seen by this worker
    post_seconds: float
    nbytes: int
    descriptors: int


@dataclass
class Results:
    """What finished since the last :meth:`Transport.drain`."""

    recv_done: set[str] = field(default_factory=set)
    recv_failed: dict[str, str] = field(default_factory=dict)
    send_done: set[str] = field(default_factory=set)
    transfers: list[Transfer] = field(default_factory=list)
    failed_transfers: int = 0
    failed_handshakes: int = 0
    failed_notifications: int = 0


@dataclass
class _Job:
    job: PullJob | ExpectJob
    pending: set[str]
    error: str | None = None
    posted: dict[str, float] = field(default_factory=dict)
    engine: _Engine | None = None  # a pull's prefill engine (the connection it was posted on)


@dataclass
class _Engine:
    """A prefill engine this decode worker reads from."""

    engine_id: str
    host: str
    port: int
    tp: int
    state: str = "new"  # new, querying, connected, failed
    waiting: list[PullJob] = field(default_factory=list)
    future: Future[Any] | None = None
    offset: float = 0.0  # its scheduler clock minus ours, from the handshake
    started: float = 0.0  # when the handshake began (perf_counter)
    error: str = ""
    block_size: int = 0  # tokens per logical block


def check_payload(
    payload: Any,
    *,
    engine_id: str,
    tp_size: int,
    tp_rank: int,
    local: Mapping[str, Any],
    allowed_hosts: Sequence[str],
    enforce_compat: bool,
) -> dict[str, Any]:
    """Validate a prefill rank's side-channel payload against what this decode worker needs;
    raise :class:`SideChannelError` naming the field and both values."""
    if not isinstance(payload, dict):
        raise SideChannelError(f"payload is a {type(payload).__name__}, not an object")

    def field_(key: str, kind: type | tuple[type, ...]) -> Any:
        v = payload.get(key)
        if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
            raise SideChannelError(f"payload field {key!r} is {v!r:.80}")
        if isinstance(v, str) and (not v or len(v) > _MAX_TEXT):
            raise SideChannelError(f"payload field {key!r} is {v!r:.80}")
        return v

    def same(key: str, theirs: Any, ours: Any) -> None:
        if theirs != ours:
            raise SideChannelError(
                f"prefill rank {tp_rank} has {key} {theirs!r:.80}, expected {ours!r:.80}"
            )

    same("payload format", field_("format", str), PAYLOAD_FORMAT)
    same("engine id", field_("engine_id", str), engine_id)
    same("TP size", field_("tp_size", int), tp_size)
    same("TP rank", field_("tp_rank", int), tp_rank)
    field_("agent", str)
    host = field_("host", str)
    if not host_allowed(host, allowed_hosts):
        raise SideChannelError(f"prefill rank {tp_rank} listens on {host!r}, not an allowed peer")
    port = field_("port", int)
    if not 1 <= port <= 65535:
        raise SideChannelError(f"prefill rank {tp_rank} listens on port {port}")
    same("layout spec", field_("spec", str), local["spec"])
    same("spec sha256", field_("spec_sha256", str), local["spec_sha256"])
    same("conv state layout", payload.get("conv_layout"), local["conv_layout"])
    if enforce_compat:
        same("compatibility hash", field_("compat_hash", str), local["compat_hash"])
    params = field_("params", dict)
    if len(params) > 256 or not all(
        isinstance(k, str) and isinstance(v, str) and len(k) < 128 and len(v) < 128
        for k, v in params.items()
    ):
        raise SideChannelError(f"prefill rank {tp_rank} sent malformed spec parameters")
    lease = field_("lease_s", int)
    if not 1 <= lease <= 7 * 24 * 3600:
        raise SideChannelError(f"prefill rank {tp_rank} has a lease of {lease} s")
    blocks = field_("num_blocks", int)
    if not 1 <= blocks < 1 << 40:
        raise SideChannelError(f"prefill rank {tp_rank} has {blocks} blocks")
    block_size = field_("block_size", int)
    if not 1 <= block_size <= 1 << 20:
        raise SideChannelError(f"prefill rank {tp_rank} has a block size of {block_size}")
    return payload


def _endpoint(cfg: EndpointConfig) -> Any:
    from ...runtime import Endpoint

    kwargs: dict[str, Any] = dict(
        tp=cfg.tp,
        name=cfg.name,
        engine=cfg.engine,
        device=cfg.device,
        listen_port=cfg.listen_port,
        timeout_s=cfg.timeout_s,
        strategy=cfg.strategy,
    )
    if cfg.staging_bytes is not None:
        kwargs["staging_bytes"] = cfg.staging_bytes
    accepted = inspect.signature(Endpoint).parameters
    if cfg.auth_key is not None and "auth_key" in accepted:
        kwargs["auth_key"] = cfg.auth_key
    if cfg.listen_host is not None and "listen_host" in accepted:
        kwargs["listen_host"] = cfg.listen_host
    ep = Endpoint(cfg.plans, role=cfg.role, rank=cfg.rank, **kwargs)
    try:
        ep.register_layers(cfg.buffers, cfg.kinds)
    except BaseException:
        ep.close()
        raise
    return ep


class Transport:
    """The thread owning a worker's endpoints (one per role the worker plays).

    ``local`` describes this worker for payload checks (``spec``, ``spec_sha256``,
    ``conv_layout``, ``compat_hash``); ``plans`` are the decode endpoint's (None without one),
    ``rounds`` how the engine's groups make requests, ``block_size`` its tokens per logical
    block, ``tp_rank``/``tp_size`` this worker's; ``allowed_hosts``, ``enforce_compat``,
    ``handshake_timeout_s``, ``transfer_timeout_s``, ``lease_margin_s`` are the settings of the
    same names.  Raises what building an endpoint raised (after ``start_timeout_s`` at most).
    """

    def __init__(
        self,
        configs: Sequence[EndpointConfig],
        *,
        local: Mapping[str, Any],
        plans: SpecPlans | None,
        rounds: GroupRounds,
        block_size: int,
        tp_rank: int,
        tp_size: int,
        allowed_hosts: Sequence[str],
        enforce_compat: bool,
        handshake_timeout_s: float,
        transfer_timeout_s: float,
        lease_margin_s: float,
        expect_timeout_s: float,
        start_timeout_s: float = 120.0,
        query_fn: Callable[..., tuple[dict[str, Any], float]] = query,
    ) -> None:
        self.local = dict(local)
        self.plans = plans
        self.rounds = rounds
        self.block_size = block_size
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.allowed_hosts = tuple(allowed_hosts)
        self.enforce_compat = enforce_compat
        self.handshake_timeout_s = handshake_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.lease_margin_s = lease_margin_s
        self.expect_timeout_s = expect_timeout_s
        self._query = query_fn
        self._configs = list(configs)
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._results = Results()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._crashed: str | None = None  # why the thread ended early
        self._pending: dict[str, PullJob | ExpectJob] = {}  # by vLLM request id
        self._endpoints: dict[str, Any] = {}
        #: the port each endpoint (by role) listens on for handshakes, once started
        self.ports: dict[str, int] = {}
        self._active: dict[str, _Job] = {}  # by round id
        self._engines: dict[str, _Engine] = {}
        self._helper = ThreadPoolExecutor(max_workers=2, thread_name_prefix="layoutc-side")
        # renewals apart, so that a prefill engine that stopped answering them cannot hold
        # up handshakes with the others
        self._hb_helper = ThreadPoolExecutor(max_workers=2, thread_name_prefix="layoutc-hb")
        # heartbeats: one renewal in flight per prefill engine, at most one per interval (vLLM
        # sends one each step when its lease is short; queued queries would lag behind it)
        self._hb_busy: set[str] = set()
        self._hb_sent: dict[str, float] = {}
        self._hb_trouble: dict[str, str] = {}  # engine -> why its renewals fail (logged once)
        self.leases = Leases()
        self._thread = threading.Thread(target=self._run, name="layoutc-transport", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout_s):
            self.close()
            raise LayoutcError(f"the transfer endpoints did not start within {start_timeout_s} s")
        if self._error is not None:
            err = self._error
            self.close()
            raise err

    # ------------------------------------------------------------------ the caller's side
    def submit(self, job: PullJob | ExpectJob | HeartbeatJob | FailJob) -> None:
        if isinstance(job, PullJob | ExpectJob):
            with self._lock:
                self._pending[job.req_id] = job
        self._jobs.put(job)

    def drain(self) -> Results:
        """What finished since the last call (and forget it).  Should the thread have died,
        every job still pending is reported ended -- a pull failed, an expect done -- so
        that vLLM frees their blocks instead of waiting for ever."""
        with self._lock:
            if self._crashed is not None and self._pending:
                for job in self._pending.values():
                    if isinstance(job, ExpectJob):
                        self._results.send_done.add(job.req_id)
                    elif job.report:
                        self._results.recv_failed[job.req_id] = self._crashed
                        self._results.recv_done.add(job.req_id)
                self._pending.clear()
            out, self._results = self._results, Results()
        return out

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        self._helper.shutdown(wait=False, cancel_futures=True)
        self._hb_helper.shutdown(wait=False, cancel_futures=True)

    def call(self, fn: Callable[[dict[str, Any]], Any], timeout_s: float = 30.0) -> Any:
        """Run ``fn(endpoints by role)`` in the thread and return its result (for tests and
        diagnostics: statistics, peers)."""
        fut: Future[Any] = Future()
        self._jobs.put((fn, fut))
        return fut.result(timeout=timeout_s)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            for cfg in self._configs:
                ep = _endpoint(cfg)
                self._endpoints[cfg.role] = ep
                self.ports[cfg.role] = int(ep.listen_port or cfg.listen_port)
        except BaseException as e:  # reported to the constructor
            self._error = e
            for ep in self._endpoints.values():
                ep.close()
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        except BaseException as e:  # a bug: reported, and pending jobs end (see drain)
            logger.exception("layoutc transfer thread failed")
            with self._lock:
                self._crashed = f"the layoutc transfer thread failed: {type(e).__name__}: {e}"
        finally:
            for ep in self._endpoints.values():
                try:
                    ep.close()
                except LayoutcError:
                    pass

    def _loop(self) -> None:
        delay = _BUSY_MIN_S
        while not self._stop.is_set():
            worked = self._take_jobs()
            worked = self._progress() or worked
            worked = self._handshakes() or worked
            if worked:
                delay = _BUSY_MIN_S
            busy = bool(self._active) or any(e.state == "querying" for e in self._engines.values())
            wait = min(delay, _BUSY_MAX_S) if busy else _IDLE_S
            try:
                job = self._jobs.get(timeout=wait)
            except queue.Empty:
                delay = min(delay * 2, _BUSY_MAX_S)
                continue
            self._handle(job)
            delay = _BUSY_MIN_S

    def _take_jobs(self) -> bool:
        worked = False
        for _ in range(256):
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            self._handle(job)
            worked = True
        return worked

    def _handle(self, job: Any) -> None:
        try:
            self._dispatch(job)
        except Exception as e:  # a bug: this job ends, the thread goes on
            logger.exception("layoutc transfer thread: %s failed", type(job).__name__)
            why = f"internal error in the layoutc transfer thread: {type(e).__name__}: {e}"
            if isinstance(job, PullJob):
                self._fail_job(job, why)
            elif isinstance(job, ExpectJob):
                with self._lock:
                    self._pending.pop(job.req_id, None)
                    self._results.send_done.add(job.req_id)

    def _dispatch(self, job: Any) -> None:
        if isinstance(job, tuple):
            fn, fut = job
            try:
                fut.set_result(fn(dict(self._endpoints)))
            except BaseException as e:  # handed to the caller
                fut.set_exception(e)
        elif isinstance(job, PullJob):
            self._pull(job)
        elif isinstance(job, ExpectJob):
            self._expect(job)
        elif isinstance(job, HeartbeatJob):
            self._heartbeat(job)
        elif isinstance(job, FailJob):
            with self._lock:
                self._results.recv_failed[job.req_id] = job.error
                self._results.recv_done.add(job.req_id)

    # ------------------------------------------------------------------ prefill
    def _expect(self, job: ExpectJob) -> None:
        ep = self._endpoints["prefill"]
        state = _Job(job, set())
        for r in job.rounds:
            try:
                ep.expect(
                    r.rid,
                    blocks=dict(r.local) or None,
                    timeout_s=self.expect_timeout_s,
                    num_tokens=job.num_tokens,
                )
            except LayoutcError as e:
                state.error = str(e)
                continue
            state.pending.add(r.rid)
            self._active[r.rid] = state
        if not state.pending:
            self._finish(state)

    # ------------------------------------------------------------------ decode
    def _pull(self, job: PullJob) -> None:
        r = job.remote
        eng = self._engines.get(r.engine_id)
        if eng is not None and (eng.host, eng.port, eng.tp) != (r.host, r.port, r.tp_size):
            if eng.state in ("connected", "failed"):
                eng = None  # the engine id moved (a restarted engine): handshake again
            else:
                self._fail_job(
                    job,
                    f"prefill engine {r.engine_id!r} is being reached at "
                    f"{eng.host}:{eng.port}, not {r.host}:{r.port}",
                )
                return
        if eng is None or eng.state == "failed":
            eng = _Engine(r.engine_id, r.host, r.port, r.tp_size)
            self._engines[r.engine_id] = eng
        if eng.state == "connected":
            self._start_pull(eng, job)
            return
        eng.waiting.append(job)
        if eng.state == "new":
            eng.state = "querying"
            eng.started = time.perf_counter()
            eng.future = self._helper.submit(self._fetch_payloads, eng)

    def _fetch_payloads(self, eng: _Engine) -> tuple[list[dict[str, Any]], float]:
        """(every prefill rank's checked payload, the engine's clock offset); runs in the
        helper thread."""
        payloads = []
        offsets = []
        for rank in range(eng.tp):
            reply, offset = self._query(
                eng.host, eng.port, {"op": "meta", "tp_rank": rank}, self.handshake_timeout_s
            )
            payloads.append(
                check_payload(
                    reply.get("payload"),
                    engine_id=eng.engine_id,
                    tp_size=eng.tp,
                    tp_rank=rank,
                    local=self.local,
                    allowed_hosts=self.allowed_hosts,
                    enforce_compat=self.enforce_compat,
                )
            )
            offsets.append(offset)
        return payloads, sorted(offsets)[len(offsets) // 2]

    def _handshakes(self) -> bool:
        worked = False
        for eng in list(self._engines.values()):
            if eng.state != "querying" or eng.future is None or not eng.future.done():
                continue
            worked = True
            try:
                payloads, eng.offset = eng.future.result()
                t_query = time.perf_counter() - eng.started
                self._connect(eng, payloads)
            except Exception as e:  # refused, unreachable -- or a bug: the engine's jobs fail
                eng.state, eng.error = (
                    "failed",
                    f"handshake with prefill engine {eng.engine_id!r} at {eng.host}:{eng.port} failed: {e}",
                )
                with self._lock:
                    self._results.failed_handshakes += 1
                for job in eng.waiting:
                    self._fail_job(job, eng.error)
                eng.waiting.clear()
                continue
            eng.state = "connected"
            logger.info(
                "connected to prefill engine %s at %s:%d (TP %d) in %.3f s (side channel %.3f s)",
                eng.engine_id,
                eng.host,
                eng.port,
                eng.tp,
                time.perf_counter() - eng.started,
                t_query,
            )
            waiting, eng.waiting = eng.waiting, []
            for job in waiting:
                self._start_pull(eng, job)
        return worked

    def _connect(self, eng: _Engine, payloads: list[dict[str, Any]]) -> None:
        ep = self._endpoints["decode"]
        params = payloads[0]["params"]
        if any(p["params"] != params for p in payloads):
            raise SideChannelError("the prefill ranks disagree on their spec parameters")
        plans = self.plans
        if plans is None:
            raise SideChannelError("this worker has no decode endpoint")
        eng.block_size = int(payloads[0]["block_size"])
        plan = plans.plan_for_peer(prefill_tp=eng.tp, decode_tp=self.tp_size, peer_params=params)
        for rank in plan.rank(self.tp_rank).notified:
            p = payloads[rank]
            ep.connect(p["host"], p["port"], p["agent"], timeout_s=self.handshake_timeout_s)

    def _lease_error(self, eng: _Engine, job: PullJob) -> str | None:
        r = job.remote
        renewed = self.leases.take(r.engine_id, r.request_id)
        if r.expiry is None and renewed is None:
            return None
        deadline = max(renewed or float("-inf"), r.expiry or float("-inf"))
        offset = self.leases.offset(r.engine_id)  # the latest renewal's, else the handshake's
        left = deadline - (time.perf_counter() + (eng.offset if offset is None else offset))
        if left < self.lease_margin_s:
            return (
                f"the lease on prefill request {r.request_id!r} of engine {r.engine_id!r} "
                f"{'ended' if left < 0 else 'ends'} {abs(left):.1f} s "
                f"{'ago' if left < 0 else 'from now'} (kv_lease_duration; margin "
                f"{self.lease_margin_s:g} s): its blocks may hold other data"
            )
        return None

    def _length_error(self, eng: _Engine, job: PullJob) -> str | None:
        n = job.remote.num_tokens
        if n is None or not eng.block_size:
            return None
        most = -(-n // eng.block_size)
        for g in self.rounds.token_groups:
            if g < len(job.remote.block_ids) and len(job.remote.block_ids[g]) > most:
                return (
                    f"kv_transfer_params['remote_block_ids'][{g}] holds "
                    f"{len(job.remote.block_ids[g])} blocks, more than its {n} tokens fill "
                    f"({most} of {eng.block_size})"
                )
        return None

    def _pairs(self, eng: _Engine, job: PullJob) -> tuple[tuple[Round, ...], int | None]:
        """The request's rounds and ``num_tokens`` (for engines holding different tokens per
        block, else None).  Same block size: each group's ids paired as vLLM's NIXL worker
        pairs them (:func:`~.rounds.align`).  Different block sizes: both lists start at the
        first token decode lacks, which must be where a prefill block starts too."""
        r = job.remote
        rid = f"{r.engine_id}:{r.request_id}"
        if eng.block_size == self.block_size or not self.rounds.token_groups:
            local, remote = align(
                job.local, r.block_ids, self.rounds.group_kinds, self.rounds.token_kinds
            )
            return self.rounds.make(rid, local, remote), None
        if r.num_tokens is None:
            raise BadRequestError("kv_transfer_params give no remote_num_tokens")
        token_groups = set(self.rounds.token_groups)
        skip = max((job.computed[g] for g in token_groups if g < len(job.computed)), default=0)
        skip_tokens = skip * self.block_size
        if skip_tokens % eng.block_size:
            raise BadRequestError(
                f"decode's prefix cache holds {skip_tokens} tokens of the request, not a whole "
                f"number of the prefill's {eng.block_size}-token blocks"
            )
        local_l: list[list[int]] = []
        remote_l: list[list[int]] = []
        states = [g for g in range(len(r.block_ids)) if g not in token_groups]
        loc_s, rem_s = align(
            [job.local[g] for g in states] if job.local else [],
            [r.block_ids[g] for g in states],
            [self.rounds.group_kinds[g] for g in states],
            self.rounds.token_kinds,
        )
        paired = dict(zip(states, zip(loc_s, rem_s)))
        for g, rem in enumerate(r.block_ids):
            if g in paired:
                local_l.append(paired[g][0])
                remote_l.append(paired[g][1])
            else:
                local_l.append(list(job.local[g]) if job.local else [])
                remote_l.append(list(rem[skip_tokens // eng.block_size :]) if job.local else [])
        return self.rounds.make(rid, local_l, remote_l), max(0, r.num_tokens - skip_tokens)

    def _start_pull(self, eng: _Engine, job: PullJob) -> None:
        err = self._length_error(eng, job) or self._lease_error(eng, job)
        if err is None:
            try:
                rounds, num_tokens = self._pairs(eng, job)
            except BadRequestError as e:
                err = str(e)
        if err is not None:
            self._fail_job(job, err)
            return
        ep = self._endpoints["decode"]
        state = _Job(job, set(), engine=eng)
        for r in rounds:
            t0 = time.perf_counter()
            try:
                ep.pull(
                    r.rid,
                    dict(r.local),
                    dict(r.remote),
                    layers=r.layers,
                    engine=eng.engine_id,
                    timeout_s=self.transfer_timeout_s,
                    num_tokens=num_tokens,
                )
            except LayoutcError as e:
                state.error = str(e)
                with self._lock:
                    self._results.failed_transfers += 1
                self._peer_trouble(eng, e)
                break
            state.posted[r.rid] = time.perf_counter() - t0
            state.pending.add(r.rid)
            self._active[r.rid] = state
        if not state.pending:
            self._finish(state)

    def _peer_trouble(self, eng: _Engine | None, err: BaseException) -> None:
        """A prefill rank of ``eng`` (the connection a pull was posted on) died or was never
        connected: the next request of its engine handshakes again (a restarted engine may
        come back under the same id).  Only that connection is given up: a round posted
        before it failed may end while a new handshake with the engine is running, whose
        waiting jobs stay with it."""
        if (
            eng is not None
            and eng.state == "connected"
            and isinstance(err, PeerDisconnectedError | PeerNotConnectedError)
        ):
            eng.state, eng.error = "failed", str(err)

    def _heartbeat(self, job: HeartbeatJob) -> None:
        """Renew the leases of ``job``'s queued requests over their prefill engine's side
        channel (met over NIXL or not yet)."""
        if not job.request_ids:
            return
        now = time.perf_counter()
        with self._lock:
            if job.engine_id in self._hb_busy or (
                now - self._hb_sent.get(job.engine_id, float("-inf")) < HEARTBEAT_MIN_INTERVAL_S
            ):
                return  # the next step's heartbeat names every waiting request again
            self._hb_busy.add(job.engine_id)
            self._hb_sent[job.engine_id] = now
            if len(self._hb_sent) > MAX_ENGINES:  # (engine ids come from requests' params)
                self._hb_sent = {
                    e: t for e, t in self._hb_sent.items() if now - t < HEARTBEAT_MIN_INTERVAL_S
                }

        def renew() -> None:
            try:
                reply, offset = self._query(
                    job.host,
                    job.port,
                    {"op": "hb", "req": list(job.request_ids)},
                    min(self.handshake_timeout_s, HEARTBEAT_TIMEOUT_S),
                )
            except SideChannelError as e:
                self._hb_problem(job.engine_id, str(e))
                return
            finally:
                with self._lock:
                    self._hb_busy.discard(job.engine_id)
            leases = reply.get("leases")
            if not isinstance(leases, dict):
                self._hb_problem(job.engine_id, "its answer holds no leases")
                return
            with self._lock:
                if self._hb_trouble.pop(job.engine_id, None) is not None:
                    logger.info("lease renewals to prefill engine %s work again", job.engine_id)
            self.leases.renewed(job.engine_id, offset, leases, set(job.request_ids))

        self._hb_helper.submit(renew)

    def _hb_problem(self, engine_id: str, why: str) -> None:
        """A lease renewal to ``engine_id`` was not sent or not answered: logged once until
        one works again (the leases of its queued requests are not extended meanwhile)."""
        with self._lock:
            if engine_id in self._hb_trouble:
                return
            self._hb_trouble[engine_id] = why
            if len(self._hb_trouble) > MAX_ENGINES:  # the oldest may be logged again
                del self._hb_trouble[next(iter(self._hb_trouble))]
        logger.warning("lease renewals to prefill engine %s fail: %s", engine_id, why)

    def _fail_job(self, job: PullJob, error: str) -> None:
        with self._lock:
            self._pending.pop(job.req_id, None)
            if not job.report:
                return  # nothing waits for it (a notify-only job)
            self._results.recv_failed[job.req_id] = error
            self._results.recv_done.add(job.req_id)

    # ------------------------------------------------------------------ progress
    def _progress(self) -> bool:
        worked = False
        for ep in self._endpoints.values():
            progress = ep.poll()
            for rid in progress.done:
                worked = True
                self._round_ended(ep, rid, None)
            for rid, err in progress.failed.items():
                worked = True
                self._round_ended(ep, rid, err)
        return worked

    def _round_ended(self, ep: Any, rid: str, err: TransferError | None) -> None:
        state = self._active.pop(rid, None)
        if state is None:
            return
        state.pending.discard(rid)
        if err is not None:
            if state.error is None:
                state.error = str(err)
            if isinstance(state.job, PullJob):
                self._peer_trouble(state.engine, err)
                with self._lock:
                    self._results.failed_transfers += 1
        elif isinstance(state.job, PullJob):
            info = ep.completion_info(rid)
            if info.bytes:
                with self._lock:
                    self._results.transfers.append(
                        Transfer(
                            info.seconds, state.posted.get(rid, 0.0), info.bytes, info.descriptors
                        )
                    )
        if not state.pending:
            self._finish(state)

    def _finish(self, state: _Job) -> None:
        job = state.job
        with self._lock:
            self._pending.pop(job.req_id, None)
            if isinstance(job, ExpectJob):
                self._results.send_done.add(job.req_id)
                return
            if not job.report:
                return  # nothing waits for it (a notify-only job)
            if state.error is not None:
                self._results.recv_failed[job.req_id] = state.error
            self._results.recv_done.add(job.req_id)
