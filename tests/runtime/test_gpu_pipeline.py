"""The staged pipeline on a GPU: pack and unpack on CUDA streams of their own, chunks in flight
while others pack and unpack; staging in pinned host memory beside GPU pages.  Every rank is
a process on GPU 0; every byte of the decode pages is checked.

Marked ``gpu``: they run where CUDA is (the GPU box); their summary is committed in
``benchmarks/results/h100-gpu-tests.txt``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from layoutc.runtime.errors import PeerDisconnectedError, TransferTimeoutError  # noqa: E402
from rt_plans import GQA4, HYBRID, compiled  # noqa: E402
from rt_workers import (  # noqa: E402, F401 (`ranks`)
    chunk_events,
    connect_all,
    kill_mid_staged_loop,
    random_ids,
    ranks_fixture,
    run_requests,
    serve_a_restarted_prefill,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = {"device": "cuda:0"}
#: 4 MiB of staging in 8 slots: 512 KiB chunks, many per request and peer
PIPE = dict(staging_bytes=4 << 20, staging_slots=8, **CUDA)


def _ids(seed: int, nreq: int, nblk: int, pool: int) -> tuple[np.ndarray, np.ndarray]:
    return random_ids(seed, nreq, nblk, pool)


def _clean(workers, slots):
    for r in workers:
        st = r.call("stats")
        assert st["xfer_handles_open"] == 0, (r.label, st)
        assert st["staging_slots_free"] == slots and st["staging_slots_held"] == 0, st
        assert st["staging_slots_draining"] == 0, st


@pytest.mark.parametrize("memory", ["device", "host"])
@pytest.mark.parametrize("lanes", ["stream", "inline"])
@pytest.mark.parametrize("mode", ["pull", "push"])
def test_vram_pipelined_chunks_every_byte_verified(ranks, mode, lanes, memory):
    """1 -> 2 with 8 KiB head slices, three requests in flight, 512 KiB chunks: pack (a
    stream of its own, or the current stream), chunk transfers, unpack; with host staging
    each chunk also goes device -> host -> device."""
    plan = compiled("vllm_flashinfer", 1, 2, dict(GQA4, head_dim=128))
    kw = dict(num_blocks=160, layers=4, staged_lanes=lanes, staging_memory=memory, **PIPE)
    pre = ranks.ranks([(plan, "prefill", 0)], **kw)
    dec = ranks.ranks([(plan, "decode", r) for r in range(2)], **kw)
    connect_all(pre, dec)
    pb, db = _ids(3, nreq=3, nblk=48, pool=160)
    infos, verified = run_requests(pre, dec, mode, pb, db, strategy="staged", prefix="v")
    assert all(v > 0 for v in verified.values())
    initiators = dec if mode == "pull" else pre
    for r in initiators:
        for info in infos[r.label]:
            assert info["ok"] and set(info["strategies"].values()) == {"staged"}
            assert info["chunks"] >= 2 * len(info["strategies"])
    _clean(pre + dec, 8)


@pytest.mark.parametrize("memory", ["device", "host"])
def test_vram_hybrid_pipeline_per_kind(ranks, memory):
    """Hybrid 2 -> 4 (conv rows of a few bytes cut by chunk edges), block ids per layer
    kind, pulled staged through streams."""
    plan = compiled("vllm_hybrid_mamba2", 2, 4, HYBRID)
    kw = dict(
        num_blocks=48,
        layers=4,
        staging_bytes=256 << 10,
        staging_slots=4,
        staging_memory=memory,
        **CUDA,
    )
    pre = ranks.ranks([(plan, "prefill", r) for r in range(2)], **kw)
    dec = ranks.ranks([(plan, "decode", r) for r in range(4)], **kw)
    connect_all(pre, dec)
    pb, db = _ids(8, nreq=2, nblk=12, pool=48)
    infos, verified = run_requests(pre, dec, "pull", pb, db, strategy="staged", prefix="h")
    assert all(v > 0 for v in verified.values())
    _clean(pre + dec, 4)


def test_vram_source_packs_ahead_of_crossing(ranks):
    """On streams the source submits every granted pack at once: chunk 1 is queued before
    chunk 0 has crossed, and each chunk goes pack -> post -> written -> unpack in order."""
    plan = compiled("vllm_flashinfer", 1, 1, dict(GQA4, head_dim=128))
    kw = dict(num_blocks=160, layers=4, **PIPE)
    pre = ranks.ranks([(plan, "prefill", 0)], **kw)
    dec = ranks.ranks([(plan, "decode", 0)], **kw)
    connect_all(pre, dec)
    pb, db = _ids(5, nreq=1, nblk=96, pool=160)
    pre[0].call("trace", True)
    dec[0].call("trace", True)
    run_requests(pre, dec, "pull", pb, db, strategy="staged", prefix="o")
    src = chunk_events(pre[0].call("trace", False))
    dst = chunk_events(dec[0].call("trace", False))
    seq = [(w, c) for w, _, c in src if w in ("pack-start", "written")]
    assert seq.index(("pack-start", 1)) < seq.index(("written", 0))
    n = max(c for _, _, c in src) + 1
    assert n > 8  # more chunks than slots
    for c in range(n):
        s = [w for w, _, x in src if x == c]
        assert s.index("pack-start") < s.index("packed") < s.index("post") < s.index("written")
        d = [w for w, _, x in dst if x == c]
        assert d.index("dat") < d.index("unpack-start") < d.index("unpacked")
    _clean(pre + dec, 8)


def test_vram_prefill_killed_mid_pipeline(ranks):
    """A prefill killed while the decode pulls staged requests back to back: the request in
    flight fails naming the peer, no handle stays open, the slots come back, and a new
    prefill is served through the same slots."""
    plan = compiled("vllm_flashinfer", 1, 1, dict(GQA4, head_dim=128))
    nb = 512
    kw = dict(num_blocks=nb, layers=4, timeout_s=10.0, **PIPE)
    pre = ranks.rank(plan, "prefill", 0, **kw)
    dec = ranks.rank(plan, "decode", 0, **kw)
    connect_all([pre], [dec])
    res, sets, pb, t_kill = kill_mid_staged_loop(
        dec, pre, nb, mode="pull", seed=9, requests=300, per_set=192
    )
    err = res["error"]
    assert isinstance(err, (PeerDisconnectedError, TransferTimeoutError)), err
    assert err.peer == "prefill rank 0" and res["t_error"] - t_kill < 15.0
    dec.call("check_blocks", 0, sets[res["last_set"]])
    pre2 = serve_a_restarted_prefill(ranks, plan, kw, dec, sets[0], pb, tag=4)
    _clean([dec, pre2], 8)
