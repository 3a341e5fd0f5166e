"""Import shim and agent factory for NIXL (the ``nixl`` Python API, version 1.5.x).

NIXL ships as per-CUDA-major variants (``nixl_cu13``, ``nixl_cu12``) plus an optional ``nixl``
meta package that dispatches between them.  This module finds whichever is installed, in the
order ``nixl`` → ``nixl_cu13`` → ``nixl_cu12``, and exposes:

* :func:`load` – the loaded variant (:class:`NixlModule`: its ``_api`` module, bindings,
  exception classes, name and version), or a :class:`NixlMissingError` telling the user what to
  install;
* :func:`create_agent` – a ``nixl_agent`` with the progress thread **off** (NIXL's default
  thread busy-spins a whole core per agent; see ``docs/runtime.md``) and NIXL's metadata
  listener off unless a port is given (it serves the agent's metadata to anyone: see
  ``docs/security.md``);
* :func:`nixl_errors` / :func:`is_disconnect` – the exception classes of the loaded variant (they
  share no base class, and the cu12 and cu13 modules each define their own).

``NIXL_LOG_LEVEL`` defaults to ``WARN`` here, before NIXL is imported: NIXL logs every agent and
backend creation at INFO level to *stdout* otherwise.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .errors import LayoutcError, UsageError

os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

log = logging.getLogger("layoutc.runtime")

#: Import names tried, in order.  ``nixl`` is the meta package (a dispatcher).
VARIANTS = ("nixl", "nixl_cu13", "nixl_cu12")

INSTALL_HINT = (
    "NIXL is not installed: install layoutc[cpu] (CPU-only torch plus nixl-cu13), or "
    "`pip install torch nixl-cu13==1.5.1` in one command so pip keeps your torch build "
    "(then optionally `pip install --no-deps nixl==1.5.1` for the `nixl` meta package)"
)

#: Exception class names the bindings define (all subclass plain ``Exception``).
ERROR_NAMES = (
    "nixlBackendError",
    "nixlCancelledError",
    "nixlInvalidParamError",
    "nixlMismatchError",
    "nixlNoTelemetryError",
    "nixlNotAllowedError",
    "nixlNotFoundError",
    "nixlNotPostedError",
    "nixlNotSupportedError",
    "nixlRemoteDisconnectError",
    "nixlRepostActiveError",
    "nixlUnknownError",
)


class NixlMissingError(LayoutcError, ImportError):
    """No NIXL variant could be imported."""


@dataclass(frozen=True)
class NixlModule:
    """The NIXL variant that was loaded."""

    name: str  # import name that worked: "nixl", "nixl_cu13" or "nixl_cu12"
    variant: str  # the real package behind it, e.g. "nixl_cu13"
    version: str
    api: ModuleType  # <variant>._api
    bindings: ModuleType  # <variant>._bindings
    errors: dict[str, type[BaseException]]

    @property
    def nixl_agent(self) -> Any:
        return self.api.nixl_agent

    @property
    def nixl_agent_config(self) -> Any:
        return self.api.nixl_agent_config


_loaded: NixlModule | None = None


def _version_of(dist_names: tuple[str, ...]) -> str:
    from importlib import metadata

    for dist in dist_names:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def load() -> NixlModule:
    """Import NIXL (cached).  Raises :class:`NixlMissingError` with an install hint."""
    global _loaded
    if _loaded is not None:
        return _loaded
    failures: list[str] = []
    for name in VARIANTS:
        try:
            api = importlib.import_module(f"{name}._api")
        except ImportError as e:  # not installed, or a broken variant: try the next one
            failures.append(f"{name}: {e}")
            continue
        bindings = getattr(api, "nixlBind", None)
        if bindings is None:
            try:
                bindings = importlib.import_module(f"{name}._bindings")
            except ImportError as e:
                failures.append(f"{name}._bindings: {e}")
                continue
        variant = bindings.__name__.rsplit(".", 1)[0]
        errors = {n: getattr(bindings, n) for n in ERROR_NAMES if hasattr(bindings, n)}
        version = _version_of((variant.replace("_", "-"), name.replace("_", "-")))
        _loaded = NixlModule(name, variant, version, api, bindings, errors)
        return _loaded
    raise NixlMissingError(INSTALL_HINT + "\n  tried: " + "; ".join(failures))


def nixl_errors() -> tuple[type[BaseException], ...]:
    """All NIXL exception classes of the loaded variant (for ``except`` clauses)."""
    return tuple(load().errors.values())


def is_disconnect(exc: BaseException) -> bool:
    """True when ``exc`` is NIXL's "remote agent disconnected" error."""
    cls = load().errors.get("nixlRemoteDisconnectError")
    return cls is not None and isinstance(exc, cls)


def error_name(exc: BaseException) -> str:
    """A short description of a NIXL exception: its status name (the message) or class name."""
    msg = str(exc).strip()
    return msg or type(exc).__name__


def listener_port(value: bool | int | None) -> int | None:
    """The port of NIXL's metadata listener for ``Endpoint(nixl_listener=value)``: None (off)
    for False/None, NIXL's default port for True, else ``value`` (a port number)."""
    if value is None or value is False:
        return None
    if value is True:
        return int(load().api.DEFAULT_COMM_PORT)
    if type(value) is not int or not 0 < value < 1 << 16:
        raise UsageError(f"nixl_listener must be True, False or a port number, got {value!r}")
    return value


def create_agent(
    name: str,
    *,
    listen_port: int | None = None,
    backends: tuple[str, ...] = ("UCX",),
    capture_telemetry: bool = False,
) -> Any:
    """Create a ``nixl_agent`` with the progress thread off.

    With the progress thread off the UCX worker progresses only inside calls on this agent
    (``check_xfer_state``, ``get_new_notifs``), so the owner must poll — on *both* sides while a
    connection is being set up.  ``listen_port`` turns on NIXL's metadata listener (needed on
    both agents for ``send_local_metadata``/``fetch_remote_metadata``); it binds every
    interface and serves this agent's metadata to anyone, so it is off by default and logged
    as a warning when on.
    """
    mod = load()
    kwargs: dict[str, Any] = {
        "enable_prog_thread": False,
        "backends": list(backends),
        "capture_telemetry": capture_telemetry,
    }
    if listen_port is not None:
        if type(listen_port) is not int or not 0 < listen_port < 1 << 16:
            raise UsageError(f"NIXL listener port must be a port number, got {listen_port!r}")
        log.warning(
            "NIXL agent %r: NIXL's metadata listener is on (port %d, every interface): it "
            "hands this agent's metadata -- read and write access to all its registered "
            "memory -- to anyone who connects, and loads anyone's",
            name,
            listen_port,
        )
        kwargs["enable_listen_thread"] = True
        kwargs["listen_port"] = listen_port
    agent = mod.nixl_agent(name, mod.nixl_agent_config(**kwargs))
    missing = [b for b in backends if b not in agent.backends]
    if missing:
        raise RuntimeError(
            f"NIXL agent {name!r}: backend(s) {', '.join(missing)} could not be created "
            f"(available plugins: {', '.join(agent.get_plugin_list())}); run `layoutc doctor`"
        )
    return agent


#: NVLink multicast (NVLS) off for NCCL, torch's symmetric memory and NVSHMEM: the runtime
#: never needs it, and on shared multi-GPU hosts creating multicast objects is not allowed.
NO_MULTICAST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def prepare_cuda_env() -> None:
    """Environment UCX needs for fast GPU READs; must run before the first agent is created
    (and before torch initialises CUDA).

    Without NVLink, UCX's cuda_ipc transport refuses GET (READ) unless
    ``UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y``; READs then fall back to a ~0.4 GB/s software path.
    NVLink multicast is turned off (:data:`NO_MULTICAST_ENV`).  An explicit setting by the
    user is kept.
    """
    os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")
    for k, v in NO_MULTICAST_ENV.items():
        os.environ.setdefault(k, v)
