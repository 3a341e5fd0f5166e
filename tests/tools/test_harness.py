"""The process harness every tool (and the runtime tests) starts its workers with."""

from __future__ import annotations

from layoutc.runtime.nixl_compat import NO_MULTICAST_ENV
from rt_workers import Worker


def test_every_worker_runs_with_nvlink_multicast_off():
    w = Worker()
    try:
        assert NO_MULTICAST_ENV == {
            "NCCL_NVLS_ENABLE": "0",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1",
        }
        for name, value in NO_MULTICAST_ENV.items():
            assert w.call("environ", name, timeout=60) == value
    finally:
        w.stop()
