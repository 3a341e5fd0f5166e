"""The staged strategy and the strategy choice, between real NIXL agents in separate processes.

Every transfer is verified byte for byte on the decode ranks (tags from each rank's own logical
identity, sentinel everywhere nothing may land), as in ``test_runtime_transfer``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from layoutc.runtime.errors import (
    BlockIdError,
    PeerDisconnectedError,
    TransferError,
    TransferFailedError,
    TransferTimeoutError,
)
from rt_plans import GQA4, HYBRID, compiled
from rt_workers import (  # noqa: F401 (`ranks`)
    connect_all,
    connected_ranks,
    kill_mid_staged_loop,
    random_ids,
    ranks_fixture,
    run_requests,
    serve_a_restarted_prefill,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

#: 64 KiB of staging in 4 slots: 16 KiB chunks, so every request below takes several chunks
#: and chunk edges cut runs (hybrid conv rows are 6-48 bytes).
SMALL_STAGING = dict(staging_bytes=64 << 10, staging_slots=4)
HET = {
    "hybrid 4->2": ("vllm_hybrid_mamba2", 4, 2, dict(HYBRID, n_groups=4)),
    "hybrid 2->4": ("vllm_hybrid_mamba2", 2, 4, HYBRID),
    "flashinfer 2->4 head slices": ("vllm_flashinfer", 2, 4, GQA4),
}
NB_P, NB_D = 40, 36
REQS, BLOCKS = 2, 6


def _ids(seed, nreq=REQS, blocks=BLOCKS, nb_p=NB_P, nb_d=NB_D):
    return random_ids(seed, nreq, blocks, nb_p, nb_d)


def _setup(ranks, plan, *, layers=3, nb_p=NB_P, nb_d=NB_D, **kw):
    return connected_ranks(ranks, plan, layers=layers, nb_p=nb_p, nb_d=nb_d, **kw)


def _transfer(pre, dec, mode, pb, db, *, strategy=None, prefix="r"):
    """Run the requests (``rt_workers.run_requests``); every decode rank got bytes, all
    verified.  Returns the infos per rank label."""
    kw = {} if strategy is None else {"strategy": strategy}
    infos, verified = run_requests(pre, dec, mode, pb, db, prefix=prefix, **kw)
    assert all(v > 0 for v in verified.values()), verified
    return infos


@pytest.mark.parametrize("strategy", ["staged", "zero-copy"])
@pytest.mark.parametrize("mode", ["pull", "push"])
@pytest.mark.parametrize("case", list(HET))
def test_both_strategies_move_every_byte(ranks, case, mode, strategy):
    spec, p, d, sets = HET[case]
    plan = compiled(spec, p, d, sets)
    pre, dec = _setup(ranks, plan, **SMALL_STAGING)
    pb, db = _ids(hash((case, mode)) % 1000)
    infos = _transfer(pre, dec, mode, pb, db, strategy=strategy)
    initiators = dec if mode == "pull" else pre
    most_chunks = 0
    for r in initiators:
        for info in infos[r.label]:
            moved = set(info["strategies"].values())
            assert moved <= {strategy}, info
            if r.role == "decode":  # a decode rank always moves bytes from its sources
                assert info["strategy"] == strategy
            if strategy == "staged" and moved:
                assert info["chunks"] >= len(moved)
            most_chunks = max(most_chunks, info["chunks"])
    assert most_chunks > 1 if strategy == "staged" else most_chunks == 0
    # completion accounting is unchanged: prefill (pull) counted exactly its readers
    if mode == "pull":
        for r in pre:
            for info in infos[r.label]:
                assert info["peers"] == [f"decode rank {x}" for x in plan.readers(r.rank)]
                if strategy == "staged":
                    staged_with = {k for k, v in info["strategies"].items() if v == "staged"}
                    assert staged_with == {f"decode rank {x}" for x in plan.targets(r.rank)}
    else:
        for r in dec:
            for info in infos[r.label]:
                assert info["peers"] == [f"prefill rank {x}" for x in plan.rank(r.rank).sources]
    for r in pre + dec:
        st = r.call("stats")
        assert st["xfer_handles_open"] == 0
        assert st["staging_slots_free"] == 4 and st["staging_slots_held"] == 0
        if strategy == "zero-copy":
            assert st["chunk_transfers"] == 0
        elif r.role == "decode" or plan.targets(r.rank):
            assert st["staged_peer_requests"] > 0


def _pull_packed_ahead(pre, dec, pb, db, *, expect_ids=None, prefix="h", **pull_kw):
    """Prefill ranks ``expect`` with their block ids (``expect_ids``, default ``pb``), decode
    ranks pull ``pb`` into ``db``; every byte verified.  Returns the prefill ranks' stats."""
    expect_ids = pb if expect_ids is None else expect_ids
    infos, verified = run_requests(
        pre, dec, "pull", pb, db, prefix=prefix, expect_ids=expect_ids, **pull_kw
    )
    assert all(info["ok"] for label in infos for info in infos[label])
    assert all(v > 0 for v in verified.values()), verified
    out = []
    for r in pre + dec:
        st = r.call("stats")
        assert st["xfer_handles_open"] == 0
        assert st["staging_slots_free"] == 4 and st["staging_slots_held"] == 0
        if r.role == "prefill":
            chunks = sum(info["chunks"] for info in infos[r.label])
            out.append(dict(st, request_chunks=chunks))
    return out


@pytest.mark.parametrize("case", list(HET))
def test_source_packs_ahead_when_given_its_block_ids(ranks, case):
    """``expect(blocks=)``: the source packs each staging reader's bytes before the reader
    asks; the reader's request takes the packed chunks up (a chunk is packed again only when
    a granted chunk took its slot back)."""
    spec, p, d, sets = HET[case]
    plan = compiled(spec, p, d, sets)
    pre, dec = _setup(ranks, plan, strategy="staged", **SMALL_STAGING)
    pb, db = _ids(hash(case) % 1000)
    stats = _pull_packed_ahead(pre, dec, pb, db, strategy="staged")
    for r, st in zip(pre, stats):
        pairs = REQS * len(plan.targets(r.rank))
        assert st["staged_ahead_made"] == st["staged_ahead_taken"] == pairs, st
        assert st["staged_ahead_dropped"] == 0
        # each chunk packed once, plus once more for each slot a granted chunk took back
        assert st["chunks_packed"] == st["request_chunks"] + st["staged_ahead_evicted"], st
        assert st["request_chunks"] > 0


@pytest.mark.parametrize(
    "why", ["other layers", "other blocks", "reader goes zero-copy", "auto source keeps zero-copy"]
)
def test_packed_ahead_but_not_taken_up(ranks, why):
    """A reader asking for something else than what was packed ahead (a layer subset, other
    block ids) or moving the bytes zero-copy gets exactly what it asked for; the contexts
    packed ahead are dropped and every slot comes back."""
    plan = compiled("vllm_flashinfer", 2, 4, GQA4)
    strategy = "auto" if why == "auto source keeps zero-copy" else "staged"
    pre, dec = _setup(ranks, plan, layers=3, strategy=strategy, **SMALL_STAGING)
    pb, db = _ids(3)
    expect_ids, kw = None, {"strategy": "staged"}
    if why == "other layers":
        kw["layers"] = [0, 2]
    elif why == "other blocks":
        expect_ids = pb[:, ::-1].copy()  # the same ids in another order
    elif why == "reader goes zero-copy":
        kw["strategy"] = "zero-copy"
    else:
        expect_ids = pb = np.arange(24, 24 + REQS * BLOCKS).reshape(REQS, BLOCKS)  # contiguous
    stats = _pull_packed_ahead(pre, dec, pb, db, expect_ids=expect_ids, **kw)
    for r, st in zip(pre, stats):
        pairs = REQS * len(plan.targets(r.rank))
        if why == "auto source keeps zero-copy":
            assert st["staged_ahead_made"] == 0, st
        else:
            assert st["staged_ahead_made"] == st["staged_ahead_dropped"] == pairs, st
            assert st["staged_ahead_taken"] == 0
        if why in ("other layers", "other blocks"):  # packed again, as the reader asked
            assert st["chunks_packed"] >= st["request_chunks"] > 0


def test_chunks_packed_ahead_never_hold_up_a_requested_one(ranks):
    """More requests marked ready (with their ids) than staging slots, pulled newest first,
    one at a time: the chunks packed ahead for requests not yet pulled give their slots to
    the one pulled (and are packed again later), so every request completes."""
    plan = compiled("vllm_flashinfer", 1, 1, GQA4)
    pre, dec = _setup(
        ranks,
        plan,
        layers=3,
        strategy="staged",
        staging_bytes=16 << 10,
        staging_slots=2,
        timeout_s=20.0,
    )
    n = 5
    pb, db = _ids(21, nreq=n)
    for i in range(n):
        pre[0].call("tag", i, pb[i])
        pre[0].call("expect", f"w{i}", blocks=pb[i])
    # the prefill packs ahead into both of its slots
    wait_until("packed ahead", lambda: pre[0].call("stats")["staging_slots_free"] == 0)
    for i in reversed(range(n)):
        dec[0].call("pull", f"w{i}", db[i], pb[i], strategy="staged")
        assert dec[0].call("wait", f"w{i}", within=10.0)["ok"]
    for i in range(n):
        assert pre[0].call("wait", f"w{i}", within=10.0)["ok"]
    assert dec[0].call("verify", [(i, db[i]) for i in range(n)]) > 0
    st = pre[0].call("stats")
    assert st["staged_ahead_made"] == st["staged_ahead_taken"] == n
    assert st["staged_ahead_evicted"] > 0
    assert st["staging_slots_free"] == 2


def test_expect_block_ids_are_checked(ranks):
    plan = compiled("vllm_flashinfer", 1, 1, GQA4)
    pre, dec = _setup(ranks, plan, layers=2)
    with pytest.raises(BlockIdError, match=r"out of range \[0, 40\): 40 \(at 1\)"):
        pre[0].call("expect", "bad", blocks=[3, 40])
    with pytest.raises(ValueError, match="expect\\(blocks=\\) is for prefill ranks"):
        dec[0].call("expect", "dec", blocks=[1, 2])
    pre[0].call("expect", "bad", blocks=[3, 4])  # the id was not taken by the failed call


def test_staged_layer_subset_and_several_requests_in_flight(ranks):
    """Staged requests interleave on shared slots (several peers, several requests at once);
    a layer subset moves only those layers."""
    plan = compiled("vllm_hybrid_mamba2", 2, 4, HYBRID)
    pre, dec = _setup(ranks, plan, layers=4, staging_bytes=32 << 10, staging_slots=2)
    pb, db = _ids(9, nreq=3)
    for r in pre:
        for i in range(3):
            r.call("tag", i, pb[i])
            r.call("expect", f"s{i}")
    for r in dec:
        for i in range(3):
            r.call("pull", f"s{i}", db[i], pb[i], layers=[1, 2], strategy="staged")
    for r in dec + pre:
        for i in range(3):
            assert r.call("wait", f"s{i}")["ok"]
    for r in dec:
        r.call("verify", [(i, db[i]) for i in range(3)], layers=[1, 2])


def test_auto_picks_zero_copy_for_contiguous_runs(ranks):
    """Homogeneous TP, whole pages, consecutive blocks: NIXL merges each layer into one
    descriptor, so the cost model keeps zero-copy."""
    plan = compiled("vllm_flashinfer", 1, 1, dict(GQA4, head_dim=128))
    pre, dec = _setup(ranks, plan, layers=4, nb_p=80, nb_d=80)
    pb = np.arange(10, 74).reshape(1, 64)
    db = np.arange(3, 67).reshape(1, 64)
    infos = _transfer(pre, dec, "pull", pb, db, prefix="c")
    info = infos["decode rank 0"][0]
    assert info["strategy"] == "zero-copy"
    assert info["strategies"] == {"prefill rank 0": "zero-copy"}
    assert info["descriptors"] == 4  # 4 x 64 indices that NIXL would merge into 4: posted merged
    assert dec[0].call("stats")["chunk_transfers"] == 0
    assert infos["prefill rank 0"][0]["strategies"] == {"decode rank 0": "zero-copy"}


def test_auto_picks_staged_for_scattered_small_head_slices(ranks):
    """1 KiB head slices (4 heads x 32 dims, one head per decode rank) of scattered blocks:
    thousands of tiny descriptors per peer, so the cost model stages them."""
    plan = compiled("vllm_flashinfer", 1, 4, GQA4)
    nb = 300
    pre, dec = _setup(ranks, plan, layers=8, nb_p=nb, nb_d=nb)
    pb, db = _ids(4, nreq=1, blocks=256, nb_p=nb, nb_d=nb)
    infos = _transfer(pre, dec, "pull", pb, db, prefix="a")
    for d in range(4):
        info = infos[f"decode rank {d}"][0]
        assert info["strategy"] == "staged", info
        assert info["chunks"] >= 1 and info["descriptors"] < 20  # vs 4,096 zero-copy
    pinfo = infos["prefill rank 0"][0]
    assert pinfo["strategies"] == {f"decode rank {d}": "staged" for d in range(4)}
    assert pinfo["peers"] == [f"decode rank {d}" for d in range(4)]


def test_chunked_request_larger_than_the_staging_buffer(ranks):
    """A request of ~1.5 MiB per peer through 8 KiB slots: hundreds of chunks, two slots
    pipelined per side, every byte in place."""
    plan = compiled("vllm_flashinfer", 2, 4, dict(GQA4, head_dim=64))
    pre, dec = _setup(
        ranks, plan, layers=4, nb_p=64, nb_d=64, staging_bytes=16 << 10, staging_slots=2
    )
    pb, db = _ids(5, nreq=1, blocks=48, nb_p=64, nb_d=64)
    infos = _transfer(pre, dec, "push", pb, db, strategy="staged", prefix="k")
    for p in range(2):
        info = infos[f"prefill rank {p}"][0]
        per_peer = info["bytes"] // len(plan.targets(p))
        assert info["chunks"] == len(plan.targets(p)) * -(-per_peer // (8 << 10))
        assert info["chunks"] >= 2 * 24


def test_staged_needs_staging_on_both_sides(ranks):
    plan = compiled("vllm_flashinfer", 1, 1, GQA4)
    pre = ranks.rank(plan, "prefill", 0, staging_bytes=0)
    dec = ranks.rank(plan, "decode", 0)
    connect_all([pre], [dec])
    with pytest.raises(TransferFailedError, match="prefill rank 0 has no staging buffer"):
        dec.call("pull", "x", [1], [2], strategy="staged")
    with pytest.raises(ValueError, match="strategy must be one of"):
        dec.call("pull", "y", [1], [2], strategy="fastest")
    # auto falls back to zero-copy with a peer that cannot stage
    pre.call("tag", 0, [2])
    pre.call("expect", "z")
    dec.call("pull", "z", [1], [2])
    assert dec.call("wait", "z")["strategy"] == "zero-copy"
    pre.call("wait", "z")
    dec.call("verify", [(0, [1])])


# ----------------------------------------------------------------------------- faults
#: 32 KiB pages (4 heads x 16 tokens x 128 dims x bf16 x K|V): a request is several MiB.
BIG = dict(GQA4, head_dim=128)
NB = 768
#: Request timeout of the endpoints in the kill tests.
TIMEOUT_S = 10.0


def test_prefill_killed_mid_staged_pull(ranks):
    plan = compiled("vllm_flashinfer", 1, 1, BIG)
    kw = dict(num_blocks=NB, staging_bytes=1 << 20, staging_slots=4, timeout_s=TIMEOUT_S)
    pre = ranks.rank(plan, "prefill", 0, **kw)
    dec = ranks.rank(plan, "decode", 0, **kw)
    connect_all([pre], [dec])
    res, sets, pb, t_kill = kill_mid_staged_loop(dec, pre, NB, mode="pull", seed=3)
    err = res["error"]
    assert isinstance(err, (PeerDisconnectedError, TransferTimeoutError)), err
    assert err.peer == "prefill rank 0" and err.request_id == res["failed_rid"]
    assert res["done"] > 0
    assert res["t_error"] - t_kill < TIMEOUT_S + 5.0  # disconnect, or the request deadline
    # no false completion: the last request reported complete holds every byte
    dec.call("check_blocks", 0, sets[res["last_set"]])
    st = dec.call("stats")
    assert st["xfer_handles_open"] == 0 and st["requests_failed"] == 1
    assert st["staged_peer_requests"] == res["done"] + 1
    # a restarted prefill is served, staged, through the same (released) slots
    serve_a_restarted_prefill(ranks, plan, kw, dec, sets[1], pb, tag=5)
    st = dec.call("stats")
    assert st["staging_slots_free"] == 4 and st["staging_slots_held"] == 0


def test_decode_killed_mid_staged_push(ranks):
    plan = compiled("vllm_flashinfer", 1, 1, BIG)
    kw = dict(num_blocks=NB, staging_bytes=1 << 20, staging_slots=4, timeout_s=TIMEOUT_S)
    pre = ranks.rank(plan, "prefill", 0, **kw)
    dec = ranks.rank(plan, "decode", 0, **kw)
    connect_all([pre], [dec])
    res, _sets, _db, t_kill = kill_mid_staged_loop(pre, dec, NB, mode="push", seed=4)
    err = res["error"]
    assert isinstance(err, TransferError), err
    assert err.peer == "decode rank 0" and err.request_id == res["failed_rid"]
    assert res["done"] > 0 and res["t_error"] - t_kill < TIMEOUT_S + 5.0
    st = pre.call("stats")
    assert st["xfer_handles_open"] == 0 and st["requests_failed"] == 1


# ----------------------------------------------------------------------------- NIXL's merge rule
def test_posted_count_matches_nixl_telemetry():
    """``bench.nixl_posted`` (and the endpoint's cost input) count what NIXL really posts."""
    import torch
    from layoutc.runtime import nixl_compat
    from layoutc.runtime.descriptors import Segment, build_pair_table, segments_by_key
    from layoutc.tools.bench import nixl_posted

    mod = nixl_compat.load()
    cfg = mod.nixl_agent_config(enable_prog_thread=False, backends=["UCX"], capture_telemetry=True)
    a = mod.nixl_agent("merge-a", cfg)
    b = mod.nixl_agent("merge-b", cfg)
    for spec, p, d, dr, pr, sets in (
        ("vllm_flashinfer", 1, 1, 0, 0, GQA4),  # whole pages: merge
        ("vllm_flashinfer", 2, 4, 1, 0, GQA4),  # head slices: never merge
        ("vllm_hybrid_mamba2", 2, 4, 2, 1, HYBRID),
    ):
        plan = compiled(spec, p, d, sets)
        kinds = [k for k, _ in plan.layer_kinds] or ["default"]
        from layoutc.runtime.endpoint import kind_pages

        kp = kind_pages(plan)
        lp = [tuple(kp[kinds[i % len(kinds)]]) for i in range(3)]
        nb = 24
        tensors = []

        def segs(side, nb=nb, lp=lp, tensors=tensors):
            out = []
            for layer, pages in enumerate(lp):
                for page in pages:
                    pl = side.page(page)
                    t = torch.zeros(pl.buffer_bytes(nb), dtype=torch.uint8)
                    tensors.append(t)
                    out.append(
                        Segment(layer, page, t.data_ptr(), t.numel(), 0, pl.logical_stride, nb)
                    )
            return segments_by_key(out), out

        dseg, dl = segs(plan.decode)
        pseg, pl_ = segs(plan.prefill)
        regs = [
            a.register_memory([t for t in tensors[: len(dl)]]),
            b.register_memory([t for t in tensors[len(dl) :]]),
        ]
        a.add_remote_agent(b.get_agent_metadata())
        table = build_pair_table(
            plan,
            decode_rank=dr,
            prefill_rank=pr,
            local_is_decode=True,
            layer_pages=lp,
            local_segments=dseg,
            remote_segments=pseg,
        )
        lh = a.prep_xfer_dlist("NIXL_INIT_AGENT", table.local_rows, "DRAM")
        rh = a.prep_xfer_dlist("merge-b", table.remote_rows, "DRAM")
        for local, remote in (
            (np.arange(2, 10), np.arange(11, 19)),  # consecutive on both sides
            (np.array([3, 4, 5, 9, 10, 1]), np.array([7, 8, 9, 2, 3, 4])),  # partly
            (np.array([5, 1, 9, 3]), np.array([2, 8, 4, 6])),  # scattered
        ):
            li, ri, _ = table.indices(local, remote)
            h = a.make_prepped_xfer("READ", lh, li, rh, ri)
            state = a.transfer(h)
            end = time.monotonic() + 10
            while state != "DONE" and time.monotonic() < end:
                b.get_new_notifs()
                state = a.check_xfer_state(h)
            assert state == "DONE"
            assert a.get_xfer_telemetry(h).descCount == nixl_posted(table, local, remote), spec
            h.release()
        lh.release()
        rh.release()
        a.remove_remote_agent("merge-b")
        a.deregister_memory(regs[0])
        b.deregister_memory(regs[1])


@pytest.mark.parametrize("mover", ["reader", "writer", "alternate", "adaptive"])
def test_every_mover_moves_every_byte(ranks, mover):
    """Whoever copies the chunks (the destination READs them after RDY, the source WRITEs
    them with DAT, or both in turn), the bytes and the accounting are the same."""
    plan = compiled("vllm_flashinfer", 2, 4, GQA4)
    pre, dec = _setup(ranks, plan, staged_mover=mover, **SMALL_STAGING)
    pb, db = _ids(21)
    infos = _transfer(pre, dec, "pull", pb, db, strategy="staged", prefix=mover[:2])
    for d in range(4):
        assert all(i["strategy"] == "staged" and i["chunks"] > 1 for i in infos[f"decode rank {d}"])
    for r in pre + dec:
        st = r.call("stats")
        assert st["xfer_handles_open"] == 0 and st["staging_slots_free"] == 4
        if mover == "reader":  # only the destination posts transfers
            assert (st["chunk_transfers"] > 0) == (r.role == "decode")
        if mover == "writer":
            assert (st["chunk_transfers"] > 0) == (r.role == "prefill")
        if mover == "alternate":
            assert st["chunk_transfers"] > 0
