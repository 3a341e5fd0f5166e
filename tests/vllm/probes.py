"""Functions run inside vLLM's worker processes through ``Engine.collective_rpc`` (the engine
needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` in its environment: vLLM then pickles the
function by reference, and the workers import this module -- it is on their path, as the
harness's own directory)."""

from __future__ import annotations

from typing import Any


def block_checksums(worker: Any) -> list[float]:
    """One number per KV-cache block of this worker: a position-weighted sum of the block's
    values over every layer, so any change of a block's bytes (or their order) changes it."""
    import torch

    total: torch.Tensor | None = None
    for t in worker.model_runner.kv_caches:
        if t is None or not t.is_floating_point():
            continue
        flat = t.reshape(t.shape[0], -1).double()
        weights = torch.arange(1, flat.shape[1] + 1, dtype=torch.float64).remainder_(997).add_(1)
        sums = flat @ weights
        total = sums if total is None else total + sums
    return [] if total is None else total.tolist()
