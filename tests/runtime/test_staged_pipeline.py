"""The staged pipeline on host memory: pack, transfer and unpack of different chunks at once.

With ``staged_lanes="thread"`` a CPU endpoint packs and unpacks on worker threads of its own
(one per lane), the same scheduler GPUs run with a CUDA stream per lane: chunk ``k + 1`` is
packed while chunk ``k`` crosses and chunk ``k - 1`` is unpacked, within the slots both sides
have.  Real NIXL agents in separate processes; every byte verified on the decode ranks.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from layoutc.runtime.errors import (
    PeerDisconnectedError,
    TransferError,
    TransferFailedError,
    TransferTimeoutError,
    UsageError,
)
from layoutc.runtime.staged.lanes import DONE, Lane, ThreadLane, make_lane
from rt_plans import GQA4, HYBRID, compiled
from rt_workers import (  # noqa: F401 (`ranks`)
    chunk_events,
    connect_all,
    connected_ranks,
    kill_mid_staged_loop,
    random_ids,
    ranks_fixture,
    run_requests,
    serve_a_restarted_prefill,
)

pytestmark = pytest.mark.timeout(120)

THREADS = dict(staged_lanes="thread")
#: 64 KiB of staging in 4 slots: 16 KiB chunks, several per request and peer.
SMALL = dict(staging_bytes=64 << 10, staging_slots=4, **THREADS)
CASES = {
    "flashinfer 1->2": ("vllm_flashinfer", 1, 2, GQA4),
    "hybrid 4->2": ("vllm_hybrid_mamba2", 4, 2, dict(HYBRID, n_groups=4)),
    "hybrid 2->4": ("vllm_hybrid_mamba2", 2, 4, HYBRID),
}
NB_P, NB_D = 40, 36


def _ids(seed, nreq=2, blocks=8, nb_p=NB_P, nb_d=NB_D):
    return random_ids(seed, nreq, blocks, nb_p, nb_d)


def _setup(ranks, plan, *, layers=3, nb_p=NB_P, nb_d=NB_D, **kw):
    return connected_ranks(ranks, plan, layers=layers, nb_p=nb_p, nb_d=nb_d, **kw)


def _clean(workers, slots=4):
    for r in workers:
        st = r.call("stats")
        assert st["xfer_handles_open"] == 0, (r.label, st)
        assert st["staging_slots_free"] == slots and st["staging_slots_held"] == 0, st
        assert st["staging_slots_draining"] == 0, st


# ----------------------------------------------------------------------------- lanes
def test_thread_lane_runs_work_in_order_off_the_callers_thread():
    lane = make_lane("thread", "pack", "cpu")
    assert isinstance(lane, ThreadLane) and lane.asynchronous
    seen: list[tuple[int, int]] = []
    gate = threading.Event()
    first = lane.submit(gate.wait)  # holds the lane until released
    fences = [lane.submit(lambda i=i: seen.append((i, threading.get_ident()))) for i in range(50)]
    assert not first.done() and not any(f.done() for f in fences)  # queued, not run
    gate.set()
    assert all(f.wait(10.0) for f in fences)
    assert [i for i, _ in seen] == list(range(50))
    assert {t for _, t in seen} != {threading.get_ident()}
    # a failing work is reported by its fence; the lane goes on
    bad = lane.submit(lambda: 1 / 0)
    after = lane.submit(lambda: seen.append((99, 0)))
    assert after.wait(10.0) and bad.done()
    assert isinstance(bad.error, ZeroDivisionError) and after.error is None
    # work may wait for another fence first
    other = make_lane("thread", "unpack", "cpu")
    gate2 = threading.Event()
    blocker = other.submit(gate2.wait)
    waits = lane.submit(lambda: seen.append((100, 0)), after=blocker)
    time.sleep(0.05)
    assert not waits.done()
    gate2.set()
    assert waits.wait(10.0) and seen[-1] == (100, 0)
    lane.close()
    other.close()
    with pytest.raises(RuntimeError, match="closed"):
        lane.submit(lambda: None)


def test_inline_lane_and_lane_kinds_per_device():
    lane = make_lane("inline", "pack", "cpu")
    out = []
    assert type(lane) is Lane and not lane.asynchronous
    assert lane.submit(lambda: out.append(1)) is DONE and out == [1]
    with pytest.raises(ValueError, match="'stream' need GPU pages"):
        make_lane("stream", "pack", "cpu")
    with pytest.raises(ValueError, match="'thread' run host memory"):
        make_lane("thread", "pack", "cuda")
    with pytest.raises(ValueError, match="must be one of stream, thread, inline"):
        make_lane("fast", "pack", "cpu")


def test_endpoint_refuses_staging_options_that_do_not_fit():
    from layoutc.runtime import Endpoint

    plan = compiled("vllm_flashinfer", 1, 1, GQA4)
    with pytest.raises(UsageError, match="staged_lanes 'stream' does not run host pages"):
        Endpoint(plan, "decode", 0, name="opt-a", staged_lanes="stream")
    with pytest.raises(UsageError, match="staging_memory must be one of device, host"):
        Endpoint(plan, "decode", 0, name="opt-b", staging_memory="disk")
    with pytest.raises(UsageError, match="staged_lanes must be one of"):
        Endpoint(plan, "decode", 0, name="opt-c", staged_lanes="threads")


# ----------------------------------------------------------------------------- moving bytes
@pytest.mark.parametrize("mode", ["pull", "push"])
@pytest.mark.parametrize("case", list(CASES))
def test_pipelined_chunks_move_every_byte(ranks, case, mode):
    spec, p, d, sets = CASES[case]
    plan = compiled(spec, p, d, sets)
    pre, dec = _setup(ranks, plan, **SMALL)
    pb, db = _ids(hash((case, mode)) % 1000)
    infos, verified = run_requests(pre, dec, mode, pb, db, strategy="staged")
    assert all(v > 0 for v in verified.values()), verified
    initiators = dec if mode == "pull" else pre
    assert max(i["chunks"] for r in initiators for i in infos[r.label]) > 1
    for r in initiators:
        for info in infos[r.label]:
            assert info["ok"] and set(info["strategies"].values()) <= {"staged"}
    _clean(pre + dec)


def test_source_packs_the_next_chunks_while_the_first_crosses(ranks):
    """Granted four slots, the source submits four packs at once, so chunk 1 is being
    packed before chunk 0 has crossed; inline lanes (one operation per poll) pack chunk 1
    only after chunk 0 was written."""
    plan = compiled("vllm_flashinfer", 1, 1, dict(GQA4, head_dim=64))
    order = {}
    for lanes in ("thread", "inline"):
        pre, dec = _setup(
            ranks,
            plan,
            staging_bytes=64 << 10,
            staging_slots=4,
            staged_lanes=lanes,
            staged_mover="writer",
        )
        pb, db = _ids(7, nreq=1, blocks=16)
        pre[0].call("trace", True)
        dec[0].call("trace", True)
        run_requests(pre, dec, "pull", pb, db, strategy="staged", prefix=lanes)
        src = chunk_events(pre[0].call("trace", False))
        dst = chunk_events(dec[0].call("trace", False))
        assert len({c for what, _, c in src if what == "written"}) > 4  # more chunks than slots
        order[lanes] = [(w, c) for w, _, c in src if w in ("pack-start", "written")]
        # each chunk: packed, then posted and written by the source, unpacked at the peer.
        # (The source's request ends at the reader's DONE, which can come before the source
        # saw its last writes complete: a chunk may lack "written", never have it too early.)
        for c in range(max(c for _, _, c in src) + 1):
            seq = [w for w, _, x in src if x == c]
            assert seq.index("pack-start") < seq.index("packed") < seq.index("post"), (c, seq)
            if "written" in seq:
                assert seq.index("post") < seq.index("written"), (c, seq)
            dseq = [w for w, _, x in dst if x == c]
            assert dseq.index("dat") < dseq.index("unpack-start") < dseq.index("unpacked")
        ranks.release()
    assert order["thread"].index(("pack-start", 1)) < order["thread"].index(("written", 0))
    assert order["inline"].index(("pack-start", 1)) > order["inline"].index(("written", 0))


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_two_slots_bound_the_pipeline_under_many_requests(ranks, mode):
    """Two 8 KiB slots per side, three requests from two sources in flight at once: every
    chunk waits for a slot on both sides (no source has more than two chunks between pack
    and crossing), every request completes, every byte lands."""
    plan = compiled("vllm_flashinfer", 2, 4, dict(GQA4, head_dim=64))
    pre, dec = _setup(ranks, plan, staging_bytes=16 << 10, staging_slots=2, **THREADS)
    pb, db = _ids(11, nreq=3, blocks=6)
    for r in pre:
        r.call("trace", True)
    infos, verified = run_requests(pre, dec, mode, pb, db, strategy="staged", prefix="bp")
    assert all(v > 0 for v in verified.values())
    for r in pre:
        live, most = set(), 0
        for what, peer, c in chunk_events(r.call("trace", False)):
            if what == "pack-start":
                live.add((peer, c))
            elif what in ("written", "acked"):
                live.discard((peer, c))
            most = max(most, len(live))
        assert 0 < most <= 2, (r.label, most)
    initiators = dec if mode == "pull" else pre
    assert all(i["chunks"] > 2 for r in initiators for i in infos[r.label])
    _clean(pre + dec, slots=2)


# ----------------------------------------------------------------------------- faults
BIG = dict(GQA4, head_dim=128)
NB = 768
TIMEOUT_S = 10.0


def _pair(ranks, **extra):
    plan = compiled("vllm_flashinfer", 1, 1, BIG)
    kw = dict(num_blocks=NB, staging_bytes=1 << 20, staging_slots=4, timeout_s=TIMEOUT_S, **THREADS)
    kw.update(extra)
    pre = ranks.rank(plan, "prefill", 0, **kw)
    dec = ranks.rank(plan, "decode", 0, **kw)
    connect_all([pre], [dec])
    return plan, kw, pre, dec


def test_prefill_killed_mid_pipeline_pull(ranks):
    plan, kw, pre, dec = _pair(ranks)
    res, sets, pb, t_kill = kill_mid_staged_loop(dec, pre, NB, mode="pull", seed=13)
    err = res["error"]
    assert isinstance(err, (PeerDisconnectedError, TransferTimeoutError)), err
    assert err.peer == "prefill rank 0" and err.request_id == res["failed_rid"]
    assert res["done"] > 0 and res["t_error"] - t_kill < TIMEOUT_S + 5.0
    dec.call("check_blocks", 0, sets[res["last_set"]])  # no false completion
    st = dec.call("stats")
    assert st["xfer_handles_open"] == 0 and st["requests_failed"] == 1
    # the slots come back (unpacks still running finish first); a new prefill is served
    pre2 = serve_a_restarted_prefill(ranks, plan, kw, dec, sets[1], pb, tag=5)
    _clean([dec, pre2])


def test_decode_killed_mid_pipeline_push(ranks):
    _plan, _kw, pre, dec = _pair(ranks)
    res, _sets, _db, t_kill = kill_mid_staged_loop(pre, dec, NB, mode="push", seed=14)
    err = res["error"]
    assert isinstance(err, TransferError), err
    assert err.peer == "decode rank 0" and err.request_id == res["failed_rid"]
    assert res["done"] > 0 and res["t_error"] - t_kill < TIMEOUT_S + 5.0
    st = pre.call("stats")
    assert st["xfer_handles_open"] == 0 and st["requests_failed"] == 1
    assert st["staging_slots_free"] == 4 and st["staging_slots_draining"] == 0


def test_failed_pack_fails_the_request_and_returns_its_slots():
    """A pack that raises on its lane fails the request on both sides (the error names the
    chunk); its slots come back, and the next request moves every byte."""
    from layoutc.runtime import Endpoint, allocate_buffers

    plan = compiled("vllm_flashinfer", 1, 1, GQA4)
    kinds = ["attention"] * 2
    eps = []
    try:
        for role in ("prefill", "decode"):
            ep = Endpoint(
                plan, role, 0, name=f"fail-{role}", timeout_s=20.0, strategy="staged", **SMALL
            )
            bufs = allocate_buffers(plan, role, kinds, 16)
            for layer in bufs:
                for t in layer.values():
                    t.copy_(torch_randint(t.shape, role == "prefill"))
            ep.register_layers(bufs, kinds)
            eps.append((ep, bufs))
        (pre, pbufs), (dec, dbufs) = eps
        dec.add_peer(pre.handshake_bytes())
        pre.add_peer(dec.handshake_bytes())
        staged = pre._staged  # noqa: SLF001 - fault injection into the source's lane work
        move = staged._move  # noqa: SLF001

        def broken(ctx, st, a, b, fn, dev_ids):
            if a > 0:
                raise RuntimeError("injected pack fault")
            return move(ctx, st, a, b, fn, dev_ids)

        staged._move = broken  # noqa: SLF001
        ids_p, ids_d = np.arange(2, 14), np.arange(1, 13)[::-1].copy()
        pre.expect("bad")
        dec.pull("bad", ids_d, ids_p)
        with pytest.raises(TransferFailedError, match=r"packing staged chunk \d+ .*injected"):
            pre.wait("bad", timeout_s=15.0)
        with pytest.raises(TransferError):
            dec.wait("bad", timeout_s=15.0)
        staged._move = move  # noqa: SLF001
        pre.expect("good")
        dec.pull("good", ids_d, ids_p)
        dec.wait("good", timeout_s=15.0)
        pre.wait("good", timeout_s=15.0)
        for lp, ld in zip(pbufs, dbufs):
            for page in lp:
                src = lp[page].reshape(16, -1)[ids_p]
                assert bool((ld[page].reshape(16, -1)[ids_d] == src).all())
        for ep in (pre, dec):
            deadline = time.monotonic() + 10
            while ep.stats()["staging_slots_free"] != 4 and time.monotonic() < deadline:
                ep.poll()
            st = ep.stats()
            assert st["staging_slots_free"] == 4 and st["xfer_handles_open"] == 0, st
    finally:
        for ep, _ in eps:
            ep.close()


def torch_randint(shape, fill):
    import torch

    if not fill:
        return torch.zeros(shape, dtype=torch.uint8)
    return torch.randint(0, 256, shape, dtype=torch.uint8)
