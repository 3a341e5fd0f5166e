"""Real vLLM engines, one per child process, driven by RPC with a deadline on every wait.

:meth:`Engine.start` runs ``python engines.py --serve`` in a new session (so the engine and the
processes vLLM spawns under it form one process group), with stdout and stderr going to a log
file and a socket pair for the RPC. The child builds ``vllm.LLM`` and then serves requests
(generate, metrics, collective RPC, stop). Every wait in the parent has a deadline; when one
passes, or the child dies, the whole process group is killed and :class:`EngineError` carries
the tail of the engine's log.

The KV connector is a parameter (:func:`connector_config`): the same harness drives vLLM's
``NixlConnector`` and out-of-tree connectors loaded through ``kv_connector_module_path``.

Nothing in this module imports vLLM in the parent process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ENGINE_ENV: dict[str, str] = {
    # vLLM's default "auto" binds OpenMP threads per NUMA node and fails at TP 2 on a 2-core box.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    # GiB of KV cache per rank; the default sizes it from the machine's memory.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
    "TOKENIZERS_PARALLELISM": "false",
}
"""Environment of every engine process (callers add ``VLLM_NIXL_SIDE_CHANNEL_PORT``)."""

DEFAULT_SAMPLING: dict[str, Any] = {
    "temperature": 0.0,
    "ignore_eos": True,
    "detokenize": False,
    "max_tokens": 16,
    "logprobs": 0,
}
"""Greedy decoding of a fixed number of tokens, no tokenizer, with the log-probability of each
sampled token (a far more sensitive check of the KV a decode used than the tokens alone)."""

PREFILL_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
"""``kv_transfer_params`` of a prefill request (vLLM's P/D request protocol)."""

_SHM_DIR = Path("/dev/shm")
_SHM_PATTERN = "vllm_dist_*-cpushm*"


class EngineError(RuntimeError):
    """An engine failed to start, died, missed a deadline, or a call raised in the engine."""


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def connector_config(
    role: str,
    *,
    connector: str = "NixlConnector",
    module_path: str | None = None,
    extra: dict[str, Any] | None = None,
    engine_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Keyword arguments of vLLM's ``KVTransferConfig`` for a P/D engine.

    ``role`` is ``"kv_producer"`` (prefill), ``"kv_consumer"`` (decode) or ``"kv_both"``;
    ``connector``/``module_path`` name the connector class and, for an out-of-tree one, its
    module (e.g. ``"LayoutcConnector"``, ``"layoutc.connectors.vllm"``); ``extra`` becomes
    ``kv_connector_extra_config``; other ``fields`` (``kv_load_failure_policy``, ...) pass
    through."""
    config: dict[str, Any] = {
        "kv_connector": connector,
        "kv_role": role,
        "kv_buffer_device": "cpu",
        "kv_connector_extra_config": dict(extra or {}),
        **fields,
    }
    if module_path is not None:
        config["kv_connector_module_path"] = module_path
    if engine_id is not None:
        config["engine_id"] = engine_id
    return config


@dataclass(frozen=True)
class Completion:
    """One request's result, as plain data."""

    token_ids: list[int]
    logprobs: list[float] | None
    """Log-probability of each sampled token (None when the request asked for none)."""
    kv_transfer_params: dict[str, Any] | None
    finish_reason: str | None
    num_cached_tokens: int | None
    request_id: str


@dataclass
class EngineInfo:
    """What the engine reported once it was up."""

    pid: int
    vllm_version: str
    block_size: int
    num_blocks: int | None
    start_s: float


@dataclass
class Engine:
    """A running vLLM engine in a child process (use :meth:`start`)."""

    name: str
    proc: subprocess.Popen[bytes]
    conn: Connection
    log_path: Path
    info: EngineInfo
    config: dict[str, Any] = field(default_factory=dict)
    _closed: bool = False

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        model_dir: str | os.PathLike[str],
        *,
        tp: int = 1,
        kv_transfer_config: dict[str, Any] | None = None,
        block_size: int | None = None,
        enable_prefix_caching: bool = False,
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        name: str | None = None,
        timeout_s: float = 300.0,
        **llm_kwargs: Any,
    ) -> Engine:
        """Start ``vllm.LLM`` on ``model_dir`` in a child process and wait until it serves.

        fp32, eager, no tokenizer; ``llm_kwargs`` go to ``vllm.LLM`` unchanged. ``env`` is
        added to :data:`ENGINE_ENV` (give a P/D engine its own ``VLLM_NIXL_SIDE_CHANNEL_PORT``).
        Raises :class:`EngineError` with the log tail if the engine is not up in ``timeout_s``.
        """
        name = name or f"{Path(model_dir).name}-tp{tp}"
        log = Path(log_path) if log_path is not None else Path(f"/tmp/layoutc-vllm-{name}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "model": str(model_dir),
            "tensor_parallel_size": tp,
            "dtype": "float32",
            "enforce_eager": True,
            "skip_tokenizer_init": True,
            "enable_prefix_caching": enable_prefix_caching,
            "kv_transfer_config": kv_transfer_config,
            **llm_kwargs,
        }
        if block_size is not None:
            config["block_size"] = block_size
        child_env = {**os.environ, **ENGINE_ENV, **(env or {})}
        parent_sock, child_sock = socket.socketpair()
        t0 = time.monotonic()
        with open(log, "ab") as log_file:
            log_file.write(f"\n==== {name}: {json.dumps(config, default=str)}\n".encode())
            log_file.flush()
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--serve",
                    str(child_sock.fileno()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=child_env,
                pass_fds=(child_sock.fileno(),),
                start_new_session=True,
            )
        child_sock.close()
        conn = Connection(parent_sock.detach())
        engine = cls(name, proc, conn, log, EngineInfo(proc.pid, "", 0, None, 0.0), config)
        try:
            conn.send(config)
            ready = engine._receive("start", timeout_s)
        except BaseException:
            engine.kill()
            raise
        engine.info = EngineInfo(
            pid=proc.pid,
            vllm_version=ready["vllm_version"],
            block_size=ready["block_size"],
            num_blocks=ready["num_blocks"],
            start_s=time.monotonic() - t0,
        )
        return engine

    def stop(self, timeout_s: float = 60.0) -> None:
        """Shut the engine down and wait for its processes to exit on their own (vLLM's
        resource tracker unlinks the engine's shared memory on the way out), then kill whatever
        is left of its process group."""
        if self._closed:
            return
        owned = self._owned_shm()
        try:
            if self.proc.poll() is None:
                self._call("stop", None, timeout_s)
                self.proc.wait(timeout=timeout_s)
            _wait_group_gone(self.proc.pid, 30.0)
        except (EngineError, subprocess.TimeoutExpired):
            pass
        finally:
            self._kill(owned)

    def kill(self) -> None:
        """SIGKILL the engine's whole process group at once (a crash, as far as peers see),
        then unlink the shared memory its processes had mapped and nobody maps any more."""
        self._kill(self._owned_shm())

    def _kill(self, owned: set[str]) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        self.conn.close()
        # Processes of the group that outlived the leader (reparented) die with it too; give
        # them a moment so their mappings are gone before cleaning up.
        _wait_group_gone(self.proc.pid, 10.0)
        _unlink_unmapped(owned)
        clean_stale_shm()

    def _owned_shm(self) -> set[str]:
        """Names under /dev/shm that the engine's processes map now."""
        if self._closed:
            return set()
        return _mapped_shm_files(_group_pids(self.proc.pid))

    @property
    def alive(self) -> bool:
        return not self._closed and self.proc.poll() is None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- calls ------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
        kv_transfer_params: Sequence[dict[str, Any] | None] | None = None,
        timeout_s: float = 300.0,
    ) -> list[Completion]:
        """Run all ``prompts`` (token-id lists) in one ``LLM.generate`` call.

        ``sampling`` (one dict, or one per prompt) overrides :data:`DEFAULT_SAMPLING`;
        ``kv_transfer_params`` (one per prompt, or None) goes into each request's
        ``SamplingParams.extra_args``. Results come back in prompt order."""
        n = len(prompts)
        if sampling is None or isinstance(sampling, dict):
            sampling_list = [dict(sampling or {})] * n
        else:
            sampling_list = [dict(s) for s in sampling]
        params_list = list(kv_transfer_params) if kv_transfer_params is not None else [None] * n
        if not (len(sampling_list) == len(params_list) == n):
            raise ValueError("one sampling dict and one kv_transfer_params per prompt")
        requests = [
            {"prompt": [int(t) for t in p], "sampling": s, "kv_transfer_params": kv}
            for p, s, kv in zip(prompts, sampling_list, params_list)
        ]
        return [Completion(**c) for c in self._call("generate", requests, timeout_s)]

    def metrics(self, prefix: str = "", timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """vLLM's metrics (``LLM.get_metrics``) whose name starts with ``prefix``, as dicts
        (``name``, ``kind``, ``labels``, and ``value`` or histogram ``count``/``sum``/
        ``buckets``). Needs the engine started with ``disable_log_stats=False``."""
        return list(self._call("metrics", prefix, timeout_s))

    def collective_rpc(
        self, method: Any, args: tuple[Any, ...] = (), timeout_s: float = 120.0
    ) -> list[Any]:
        """``LLM.collective_rpc`` on every worker; ``method`` is a worker method name or a
        function importable in the worker processes (it receives the worker first; vLLM sends
        functions only with ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` in the engine's env)."""
        return list(self._call("collective_rpc", (method, args), timeout_s))

    def submit(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: dict[str, Any] | None = None,
        kv_transfer_params: Sequence[dict[str, Any] | None] | None = None,
        timeout_s: float = 60.0,
    ) -> list[str]:
        """Add requests without waiting for them (``LLMEngine.add_request``); returns their
        ids.  Drive them with :meth:`step`."""
        params_list = (
            list(kv_transfer_params) if kv_transfer_params is not None else [None] * len(prompts)
        )
        requests = [
            {
                "prompt": [int(t) for t in p],
                "sampling": dict(sampling or {}),
                "kv_transfer_params": kv,
            }
            for p, kv in zip(prompts, params_list)
        ]
        return list(self._call("submit", requests, timeout_s))

    def step(self, seconds: float, timeout_s: float | None = None) -> list[Completion]:
        """Run ``LLMEngine.step()`` for ``seconds``; returns the requests that finished."""
        deadline = timeout_s if timeout_s is not None else seconds + 120.0
        return [Completion(**c) for c in self._call("step", seconds, deadline)]

    def abort(self, request_ids: Sequence[str], timeout_s: float = 60.0) -> None:
        """``LLMEngine.abort_request``."""
        self._call("abort", list(request_ids), timeout_s)

    def scheduler_state(self, timeout_s: float = 60.0) -> dict[str, int]:
        """Free KV blocks and requests the scheduler holds (needs the engine core in the LLM
        process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
        return dict(self._call("scheduler_state", None, timeout_s))

    def signal(self, sig: int) -> None:
        """Send ``sig`` to every process of the engine (e.g. SIGSTOP / SIGCONT)."""
        os.killpg(self.proc.pid, sig)

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the engine's log."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 256 * 1024))
                text = f.read().decode(errors="replace")
        except OSError as exc:
            return f"<no log: {exc}>"
        return "\n".join(text.splitlines()[-lines:])

    def _call(self, op: str, payload: Any, timeout_s: float) -> Any:
        if not self.alive:
            raise EngineError(f"{self.name}: engine is not running ({op})")
        try:
            self.conn.send((op, payload))
        except OSError as exc:
            self._fail(f"{op}: could not reach the engine ({exc})")
        return self._receive(op, timeout_s)

    def _receive(self, op: str, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"{op}: no answer within {timeout_s:.0f} s")
            try:
                if self.conn.poll(min(left, 1.0)):
                    status, value = self.conn.recv()
                    break
            except (EOFError, OSError):
                self._fail(f"{op}: the engine process died (exit code {self.proc.poll()})")
            if self.proc.poll() is not None:
                self._fail(f"{op}: the engine process exited with code {self.proc.returncode}")
        if status == "ok":
            return value
        if op == "start":
            # vLLM reports the root cause of a failed start in its log, not in the exception.
            value = f"{value}\nLog {self.log_path}:\n{self.log_tail()}"
        raise EngineError(f"{self.name}: {op} raised in the engine:\n{value}")

    def _fail(self, what: str) -> None:
        tail = self.log_tail()
        stacks = self._stacks()
        self.kill()
        raise EngineError(
            f"{self.name}: {what}; engine killed. Log {self.log_path}:\n{tail}{stacks}"
        )

    def _stacks(self) -> str:
        """The Python stacks of the engine's processes, where py-spy is installed (what a
        hung engine was doing)."""
        beside = Path(sys.executable).with_name("py-spy")
        spy = str(beside) if beside.exists() else shutil.which("py-spy")
        if spy is None or self._closed:
            return ""
        out = []
        for pid in _group_pids(self.proc.pid):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                dump = subprocess.run(
                    [spy, "dump", "--pid", pid], capture_output=True, text=True, timeout=30
                )
                out.append(f"--- process {pid}:\n{dump.stdout[-8000:]}{dump.stderr[-500:]}")
        return "\nStacks:\n" + "\n".join(out) if out else ""


# -- process hygiene ----------------------------------------------------------------------------


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)


def _group_pids(pgid: int) -> list[str]:
    """Ids of the live processes in process group ``pgid``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid):
            pids.append(stat.parent.name)
    return pids


def _mapped_shm_files(pids: list[str] | None = None) -> set[str]:
    """Names under /dev/shm mapped by ``pids`` (every process when None)."""
    paths = [Path("/proc", pid, "maps") for pid in pids] if pids is not None else None
    mapped: set[str] = set()
    for maps in paths if paths is not None else Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            path = line.rsplit(None, 1)[-1]
            if path.startswith("/dev/shm/"):
                mapped.add(path[len("/dev/shm/") :])
    return mapped


def _unlink_unmapped(names: set[str]) -> list[str]:
    """Unlink the /dev/shm files among ``names`` that no live process maps; returns them."""
    if not names:
        return []
    mapped = _mapped_shm_files()
    removed = []
    for name in sorted(names - mapped):
        with contextlib.suppress(OSError):
            (_SHM_DIR / name).unlink()
            removed.append(name)
    return removed


def clean_stale_shm() -> list[str]:
    """Remove the shared-memory files TP>1 CPU engines leave behind (``vllm_dist_*-cpushm*``)
    that no live process maps any more; returns the names removed."""
    return _unlink_unmapped({p.name for p in _SHM_DIR.glob(_SHM_PATTERN)})


@contextlib.contextmanager
def started(model_dir: str | os.PathLike[str], **kwargs: Any) -> Iterator[Engine]:
    """``with started(model, tp=2) as engine:`` -- :meth:`Engine.start`, stopped on exit."""
    engine = Engine.start(model_dir, **kwargs)
    try:
        yield engine
    finally:
        engine.stop()


# -- the engine process ---------------------------------------------------------------------


def _metric_dicts(metrics: list[Any], prefix: str) -> list[dict[str, Any]]:
    out = []
    for m in metrics:
        if not m.name.startswith(prefix):
            continue
        d: dict[str, Any] = {"name": m.name, "kind": type(m).__name__, "labels": dict(m.labels)}
        for attr in ("value", "values", "count", "sum", "buckets"):
            if hasattr(m, attr):
                v = getattr(m, attr)
                d[attr] = dict(v) if isinstance(v, dict) else v
        out.append(d)
    return out


def _sampled_logprobs(output: Any) -> list[float] | None:
    if not output.logprobs:
        return None
    return [float(step[tok].logprob) for step, tok in zip(output.logprobs, output.token_ids)]


def _sampling_params(cls: Any, request: dict[str, Any]) -> Any:
    kwargs = {**DEFAULT_SAMPLING, **request["sampling"]}
    if request["kv_transfer_params"] is not None:
        extra = dict(kwargs.pop("extra_args", None) or {})
        extra["kv_transfer_params"] = request["kv_transfer_params"]
        kwargs["extra_args"] = extra
    return cls(**kwargs)


def _completion(o: Any) -> dict[str, Any]:
    return {
        "token_ids": list(o.outputs[0].token_ids),
        "logprobs": _sampled_logprobs(o.outputs[0]),
        "kv_transfer_params": o.kv_transfer_params,
        "finish_reason": o.outputs[0].finish_reason,
        "num_cached_tokens": o.num_cached_tokens,
        "request_id": o.request_id,
    }


def _serve(fd: int) -> None:
    conn = Connection(fd)
    config = conn.recv()
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.config import KVTransferConfig
        from vllm.inputs import TokensPrompt

        kv = config.pop("kv_transfer_config", None)
        if kv is not None:
            config["kv_transfer_config"] = KVTransferConfig(**kv)
        llm = LLM(**config)
        vllm_config = llm.llm_engine.vllm_config
        conn.send(
            (
                "ok",
                {
                    "vllm_version": vllm.__version__,
                    "block_size": vllm_config.cache_config.block_size,
                    "num_blocks": vllm_config.cache_config.num_gpu_blocks,
                },
            )
        )
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise

    next_id = 0
    while True:
        try:
            op, payload = conn.recv()
        except EOFError:
            break
        try:
            if op == "stop":
                with contextlib.suppress(Exception):
                    llm.llm_engine.engine_core.shutdown()
                conn.send(("ok", None))
                break
            if op == "generate":
                prompts = [TokensPrompt(prompt_token_ids=r["prompt"]) for r in payload]
                params = [_sampling_params(SamplingParams, r) for r in payload]
                outputs = llm.generate(prompts, params, use_tqdm=False)
                conn.send(("ok", [_completion(o) for o in outputs]))
            elif op == "submit":
                ids = []
                for r in payload:
                    next_id += 1
                    rid = f"submitted-{next_id}"
                    llm.llm_engine.add_request(
                        rid,
                        TokensPrompt(prompt_token_ids=r["prompt"]),
                        _sampling_params(SamplingParams, r),
                    )
                    ids.append(rid)
                conn.send(("ok", ids))
            elif op == "step":
                end = time.monotonic() + float(payload)
                done = []
                while time.monotonic() < end:
                    done += [_completion(o) for o in llm.llm_engine.step() if o.finished]
                    time.sleep(0.01)
                conn.send(("ok", done))
            elif op == "abort":
                llm.llm_engine.abort_request(list(payload))
                conn.send(("ok", None))
            elif op == "scheduler_state":
                core = llm.llm_engine.engine_core.engine_core
                sched = core.scheduler
                conn.send(
                    (
                        "ok",
                        {
                            "free_blocks": sched.kv_cache_manager.block_pool.get_num_free_blocks(),
                            "requests": len(sched.requests),
                        },
                    )
                )
            elif op == "metrics":
                conn.send(("ok", _metric_dicts(llm.get_metrics(), payload)))
            elif op == "collective_rpc":
                method, args = payload
                conn.send(("ok", llm.collective_rpc(method, args=tuple(args))))
            else:
                conn.send(("error", f"unknown op {op!r}"))
        except Exception:
            conn.send(("error", traceback.format_exc()))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        _serve(int(sys.argv[2]))
    else:
        sys.exit("usage: engines.py --serve FD  (started by Engine.start)")
