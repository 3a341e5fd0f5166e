"""``layoutc doctor``: is this machine ready to move state with NIXL?

:func:`run_doctor` checks, in order: the NIXL import and its variant, the backends (plugins)
and the UCX backend's memory types, the NIXL/UCX environment, CUDA and
``UCX_CUDA_IPC_ENABLE_GET_ZCOPY`` on GPU machines, the progress-thread mode, and — unless
``live=False`` — a small live transfer between two processes over host memory (and device
memory when CUDA is available), verified byte for byte, with its rate and the UCX transports
UCX chose (``UCX_PROTO_INFO=y`` in the two processes).  Each problem found becomes a warning
that says how to fix it; the exit code is 0 with no warnings, 1 otherwise.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import tempfile
import time
from typing import Any, NamedTuple

from layoutc.runtime import nixl_compat

from .harness import Worker, WorkerError

_LIVE_BYTES = 64 << 20
_LIVE_PIECE = 4096
_LIVE_RUNS = 3
_LIVE_TIMEOUT_S = 60.0
#: Below this, a single-descriptor host-memory READ is not using shared memory (CMA).
_MIN_HOST_GBPS = 1.0
#: Below this, a device-memory READ fell back to UCX's software path (no cuda_ipc GET).
_MIN_VRAM_GBPS = 5.0


class DoctorReport(NamedTuple):
    """What the doctor found: the report lines, warnings (each says how to fix it), the exit
    code, and the facts behind them (``nixl``: variant and version; ``live``: per device
    kind, the measured rates, the UCX transports seen and ``verified``)."""

    lines: list[str]
    warnings: list[str]
    code: int
    facts: dict[str, Any]


def run_doctor(live: bool = True) -> DoctorReport:
    """Run every check; see :class:`DoctorReport`."""
    lines: list[str] = []
    warnings: list[str] = []
    facts: dict[str, Any] = {"live": {}}
    lines.append(
        f"python {platform.python_version()} on {platform.system()} "
        f"{platform.machine()}, {os.cpu_count()} CPUs"
    )
    try:
        import numpy
        import torch

        lines.append(f"numpy {numpy.__version__}, torch {torch.__version__}")
    except ImportError as e:
        warnings.append(
            f"cannot import numpy/torch ({e}): install layoutc[cpu] or a torch build for your CUDA"
        )
        return DoctorReport(lines, warnings, 1, facts)

    # ---- NIXL
    try:
        mod = nixl_compat.load()
    except nixl_compat.NixlMissingError as e:
        lines.append("NIXL: not installed")
        warnings.append(str(e).splitlines()[0])
        return DoctorReport(lines, warnings, 1, facts)
    facts["nixl"] = {"variant": mod.variant, "version": mod.version}
    meta = "" if mod.name == "nixl" else " (the `nixl` meta package is not installed; fine)"
    lines.append(f"NIXL {mod.version}: imported {mod.name}._api from {mod.variant}{meta}")
    level = os.environ.get("NIXL_LOG_LEVEL", "")
    lines.append(f"NIXL_LOG_LEVEL={level or '(unset)'}")
    if level.upper() in ("INFO", "DEBUG", "TRACE"):
        warnings.append(
            f"NIXL_LOG_LEVEL={level}: NIXL then logs every agent creation to "
            f"stdout; set NIXL_LOG_LEVEL=WARN"
        )

    try:
        agent = nixl_compat.create_agent(f"layoutc-doctor-{os.getpid()}")
    except Exception as e:  # noqa: BLE001 - any failure here is the finding
        lines.append(f"NIXL agent with the UCX backend: failed ({e})")
        warnings.append(
            "NIXL could not create a UCX backend: check that the nixl wheel's "
            "bundled UCX loads (ldd on its plugins) and that UCX_TLS is not empty"
        )
        return DoctorReport(lines, warnings, 1, facts)
    plugins = sorted(agent.get_plugin_list())
    lines.append(f"backend plugins: {', '.join(plugins)}")
    try:
        mems = agent.get_backend_mem_types("UCX")
        params = agent.get_backend_params("UCX") or agent.get_plugin_params("UCX")
    except Exception:  # noqa: BLE001
        mems, params = [], {}
    lines.append(
        f"UCX backend: created; memory types {', '.join(map(str, mems)) or '?'}; "
        f"parameters {', '.join(f'{k}={v!r}' for k, v in sorted(params.items())) or '-'}"
    )
    del agent

    # ---- environment
    ucx_env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("UCX_")}
    lines.append(
        "UCX environment: " + (", ".join(f"{k}={v}" for k, v in ucx_env.items()) or "(none set)")
    )
    tls = ucx_env.get("UCX_TLS")
    if tls is not None:
        if not tls.strip():
            warnings.append("UCX_TLS is empty, which breaks UCX backend creation: unset it")
        elif tls.startswith("^") and "cma" in tls:
            warnings.append(
                "UCX_TLS excludes cma: host-memory transfers fall back to TCP "
                "(~2 GB/s); drop cma from the exclusion list"
            )
    ptrace = _read("/proc/sys/kernel/yama/ptrace_scope")
    if ptrace is not None:
        lines.append(
            f"kernel.yama.ptrace_scope={ptrace} (CMA needs ptrace access between "
            f"the engine processes)"
        )

    # ---- progress thread
    lines.append(
        "progress thread: off in layoutc endpoints (NIXL's default thread busy-spins "
        "one core per agent); endpoints progress inside poll()/wait()"
    )

    # ---- CUDA
    cuda = torch.cuda.is_available()
    if cuda:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(
            f"CUDA: {len(names)} device(s): {', '.join(names)}; torch CUDA {torch.version.cuda}"
        )
        if len(names) > 1:
            _peer_access(torch, len(names), lines, warnings)
        gz = os.environ.get("UCX_CUDA_IPC_ENABLE_GET_ZCOPY")
        if gz is None:
            lines.append(
                "UCX_CUDA_IPC_ENABLE_GET_ZCOPY: unset here; layoutc endpoints with "
                "device='cuda' set it to 'y' before creating their agent"
            )
        elif gz.strip().lower() in ("n", "no", "0", "off", "false"):
            warnings.append(
                f"UCX_CUDA_IPC_ENABLE_GET_ZCOPY={gz}: without NVLink, cuda_ipc "
                f"then refuses GET and pull-mode (READ) transfers crawl at "
                f"~0.4 GB/s; set UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y (or use push)"
            )
        else:
            lines.append(f"UCX_CUDA_IPC_ENABLE_GET_ZCOPY={gz}")
    else:
        lines.append(f"CUDA: not available to torch {torch.__version__} (host memory only)")

    # ---- live transfer
    if live:
        devices = ["cpu"] + (["cuda"] if cuda else [])
        for device in devices:
            facts["live"][device] = _live(device, lines, warnings)
    else:
        lines.append("live transfer: skipped")
    return DoctorReport(lines, warnings, 1 if warnings else 0, facts)


def _peer_access(torch: Any, n: int, lines: list[str], warnings: list[str]) -> None:
    """Which GPU pairs can reach each other directly (NVLink or PCIe P2P): cuda_ipc between
    two GPUs without it goes through host memory, far below the link."""
    try:
        pairs = [
            (i, j, torch.cuda.can_device_access_peer(i, j))
            for i in range(n)
            for j in range(n)
            if i != j
        ]
    except Exception as e:  # noqa: BLE001 - a report, not a failure
        lines.append(f"GPU peer access: could not be queried ({type(e).__name__}: {e})")
        return
    no = [f"{i}->{j}" for i, j, ok in pairs if not ok]
    lines.append(
        f"GPU peer access (prefill and decode ranks on different GPUs): "
        f"{len(pairs) - len(no)} of {len(pairs)} ordered pairs direct"
    )
    if no:
        warnings.append(
            f"GPU pairs without peer access: {', '.join(no)}; transfers between them go "
            f"through host memory: put prefill and decode ranks on GPUs that reach each other "
            f"(`nvidia-smi topo -m`; `layoutc demo --prefill-gpus/--decode-gpus`)"
        )


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# Live transfer between two processes
# --------------------------------------------------------------------------------------------
def _live(device: str, lines: list[str], warnings: list[str]) -> dict[str, Any]:
    """The live transfer on ``device`` ("cpu": host memory): its facts (rates, transports,
    ``verified``), report lines and warnings."""
    mem = "host" if device == "cpu" else "device"
    with tempfile.TemporaryDirectory(prefix="layoutc-doctor-") as tmp:
        logs = [os.path.join(tmp, f"{r}.log") for r in ("target", "initiator")]
        env = {"UCX_PROTO_INFO": "y"}  # read by UCX at start-up: protocol tables in the logs
        dev = "cuda:0" if device == "cuda" else "cpu"
        workers = [
            Worker(_HANDLER, role, device, log, label=f"doctor {role}", device=dev, env=env)
            for role, log in zip(("target", "initiator"), logs)
        ]
        result: dict[str, Any] | None = None
        error = None
        try:
            target, init = workers
            md, addr = target.call("serve", timeout=_LIVE_TIMEOUT_S)
            result = init.call("measure", md, addr, timeout=_LIVE_TIMEOUT_S)
        except WorkerError as e:  # reported as the finding
            error = str(e).splitlines()[0]
        finally:
            for w in workers:
                w.stop(10)
        transports = _transports(logs)
    if error is not None or result is None:
        lines.append(f"live transfer ({mem} memory, 2 processes): FAILED: {error}")
        warnings.append(
            f"the live {mem}-memory transfer failed ({error}); run with "
            f"UCX_LOG_LEVEL=info to see why UCX could not connect"
        )
        return {"verified": False, "error": error}
    mib = _LIVE_BYTES >> 20
    n = _LIVE_BYTES // _LIVE_PIECE
    lines.append(
        f"live transfer ({mem} memory, 2 processes, verified): {mib} MiB READ in 1 "
        f"descriptor {result['read1']:.2f} GB/s, WRITE {result['write1']:.2f} GB/s; "
        f"{n} x {_LIVE_PIECE // 1024} KiB scattered READ {result['readn']:.2f} GB/s "
        f"({1e6 * result['readn_s'] / n:.2f} us per descriptor)"
    )
    if transports:
        lines.append(
            "UCX transports: "
            + "; ".join(f"{k} over {', '.join(sorted(v))}" for k, v in sorted(transports.items()))
        )
    rma = transports.get("READ", set()) | transports.get("WRITE", set())
    if device == "cpu":
        if any(t.startswith("tcp") for t in rma) or result["read1"] < _MIN_HOST_GBPS:
            warnings.append(
                f"host-memory transfers run at {result['read1']:.2f} GB/s over "
                f"{', '.join(sorted(rma)) or 'an unknown transport'}, not shared memory "
                f"(cma): allow ptrace between the engine processes (kernel.yama."
                f"ptrace_scope <= 1, or CAP_SYS_PTRACE in containers) and do not exclude cma "
                f"in UCX_TLS"
            )
    elif result["read1"] < _MIN_VRAM_GBPS:
        warnings.append(
            f"device-memory READ runs at {result['read1']:.2f} GB/s (WRITE "
            f"{result['write1']:.2f} GB/s): UCX's cuda_ipc refuses GET without NVLink; set "
            f"UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y before the engine starts, or use push mode"
        )
    return {
        "verified": True,
        **result,
        "transports": {k: sorted(v) for k, v in transports.items()},
    }


_TABLE_ROW = re.compile(r"\|\s*[\d.]+(?:\.\.(?:inf|\d+))?\s*\|[^|]*\|\s*([\w/:.\-]+)")


def _transports(logs: list[str]) -> dict[str, set[str]]:
    """Parse UCX_PROTO_INFO tables: transports used for READ (get), WRITE (put) and AM."""
    out: dict[str, set[str]] = {}
    for path in logs:
        try:
            with open(path, errors="replace") as f:
                text = f.read().splitlines()
        except OSError:
            continue
        kind = None
        for line in text:
            if "remote memory read" in line:
                kind = "READ"
            elif "remote memory write" in line:
                kind = "WRITE"
            elif "active message" in line:
                kind = "notifications (active messages)"
            elif kind is not None:
                m = _TABLE_ROW.search(line)
                if m:
                    out.setdefault(kind, set()).add(m.group(1))
    return out


_HANDLER = "layoutc.tools.doctor:LiveSide"


class LiveSide:
    """One side of the live transfer, in its worker; UCX's output goes to ``log_path``."""

    def __init__(self, channel: Any, role: str, device: str, log_path: str) -> None:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        self.role = role
        self.device = device
        self.agent = nixl_compat.create_agent(f"layoutc-doctor-{role}-{os.getpid()}")
        self.dev = "cuda:0" if device == "cuda" else "cpu"
        self.mem = "VRAM" if device == "cuda" else "DRAM"
        self.reg: Any = None
        self.serving = False

    def _pattern(self) -> Any:
        import torch

        g = torch.Generator().manual_seed(1234)
        return torch.randint(0, 256, (_LIVE_BYTES,), dtype=torch.uint8, generator=g).to(self.dev)

    def serve(self) -> tuple[bytes, int]:
        """Target: a registered buffer of known bytes; (agent metadata, its address)."""
        self.buf = self._pattern()
        self.reg = self.agent.register_memory(self.buf)
        self.serving = True
        return bytes(self.agent.get_agent_metadata()), int(self.buf.data_ptr())

    def tick(self) -> bool:
        if self.serving:
            self.agent.get_new_notifs()  # progress UCX while the initiator connects
        return False

    def measure(self, md: bytes, raddr: int) -> dict[str, float]:
        """Initiator: READ one descriptor, READ many scattered ones, WRITE one; verified."""
        import numpy as np
        import torch

        agent, dev, mem, device = self.agent, self.dev, self.mem, self.device
        devid = 0
        n = _LIVE_BYTES // _LIVE_PIECE
        expect = self._pattern()
        buf = torch.zeros(_LIVE_BYTES, dtype=torch.uint8, device=dev)
        self.reg = agent.register_memory(buf)
        peer = agent.add_remote_agent(md)
        peer = peer.decode() if isinstance(peer, bytes) else peer

        def rows(base: int, count: int, size: int) -> np.ndarray:
            a = np.empty((count, 3), dtype=np.uint64)
            a[:, 0] = np.uint64(base) + np.arange(count, dtype=np.uint64) * np.uint64(size)
            a[:, 1] = size
            a[:, 2] = devid
            return a

        handles = []
        lh1 = agent.prep_xfer_dlist("NIXL_INIT_AGENT", rows(buf.data_ptr(), 1, _LIVE_BYTES), mem)
        rh1 = agent.prep_xfer_dlist(peer, rows(raddr, 1, _LIVE_BYTES), mem)
        lhn = agent.prep_xfer_dlist("NIXL_INIT_AGENT", rows(buf.data_ptr(), n, _LIVE_PIECE), mem)
        rhn = agent.prep_xfer_dlist(peer, rows(raddr, n, _LIVE_PIECE), mem)
        handles += [lh1, rh1, lhn, rhn]
        perm = np.random.default_rng(7).permutation(n).astype(np.int64)
        ident = np.arange(n, dtype=np.int64)
        expect_perm = expect.view(n, _LIVE_PIECE)[torch.from_numpy(perm).to(dev)].reshape(-1)

        def timed(op: str, lh: Any, li: Any, rh: Any, ri: Any, check: Any) -> float:
            times = []
            for _ in range(_LIVE_RUNS + 1):
                if check is not None:
                    buf.zero_()
                if device == "cuda":
                    torch.cuda.synchronize()
                h = agent.make_prepped_xfer(op, lh, li, rh, ri)
                try:
                    t0 = time.perf_counter()
                    st = agent.transfer(h)
                    deadline = time.monotonic() + _LIVE_TIMEOUT_S
                    while st == "PROC":
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"{op} still in progress after {_LIVE_TIMEOUT_S} s")
                        st = agent.check_xfer_state(h)
                    t = time.perf_counter() - t0
                finally:
                    h.release()
                if st != "DONE":
                    raise RuntimeError(f"{op} ended in state {st}")
                if check is not None and not torch.equal(buf, check):
                    raise RuntimeError(f"{op}: transferred bytes differ from the source")
                times.append(t)
            return statistics.median(times[1:])

        r1 = timed("READ", lh1, [0], rh1, [0], expect)
        rn = timed("READ", lhn, ident, rhn, perm, expect_perm)
        w1 = timed("WRITE", lh1, [0], rh1, [0], None)
        for h in handles:
            h.release()
        agent.remove_remote_agent(peer)
        gb = _LIVE_BYTES / 1e9
        return {"read1": gb / r1, "readn": gb / rn, "readn_s": rn, "write1": gb / w1}

    def close(self) -> None:
        if self.reg is not None:
            self.agent.deregister_memory(self.reg)
            self.reg = None
        sys.stdout.flush()
