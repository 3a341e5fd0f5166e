"""The runtime as an engine uses it: one endpoint per rank serving peers of every compiled TP,
block ids per layer kind (KV-cache group), typed results.

Real NIXL agents over UCX in separate processes, host memory; every requested decode byte is
checked against its logical identity and every other byte against the sentinel.
"""

from __future__ import annotations

import numpy as np
import pytest
from layoutc.compiler.cli import main as compile_main
from layoutc.runtime.errors import HandshakeError, UnknownRequestError, WaitTimeoutError
from rt_plans import HYBRID, SPECS
from rt_workers import ranks_fixture  # noqa: F401 (the `ranks` fixture)

pytestmark = pytest.mark.timeout(600)

LAYERS = 4  # attention, mamba, attention, mamba
NB = 48


@pytest.fixture(scope="module")
def module_path(tmp_path_factory):
    """A generated module of the hybrid spec for prefill:decode 1:2 and 4:2 (not 2:2)."""
    out = tmp_path_factory.mktemp("plans")
    sets = [x for k, v in HYBRID.items() for x in ("--set", f"{k}={v}")]
    spec = str(SPECS / "vllm_hybrid_mamba2.layout")
    rc = compile_main(["compile", spec, "-o", str(out), *sets, "--tp-pairs", "1:2,4:2"])
    assert rc == 0
    return str(out / "vllm_hybrid_mamba2.py")


def _module(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("hybrid_plans", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _disjoint(n_req: int, per: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Block ids per kind of ``n_req`` requests -- ``per`` scattered attention blocks and one
    Mamba block each -- no block shared between two requests."""
    rng = np.random.default_rng(seed)
    att = rng.permutation(NB)[: n_req * per].reshape(n_req, per)
    mam = rng.permutation(NB)[:n_req]
    return [{"attention": att[i], "mamba": mam[i : i + 1]} for i in range(n_req)]


def _connect(prefill, decode) -> None:
    hp = [r.call("handshake_bytes") for r in prefill]
    hd = [r.call("handshake_bytes") for r in decode]
    for r in prefill:
        for h in hd:
            r.call("add_peer", h)
    for r in decode:
        for h in hp:
            r.call("add_peer", h)


def test_one_decode_engine_serves_prefill_engines_of_two_tp_sizes(ranks, module_path):
    dec = ranks.ranks(
        [(module_path, "decode", r, {"tp": 2, "engine": "D"}) for r in range(2)],
        num_blocks=NB,
        layers=LAYERS,
    )
    pre_a = ranks.ranks(
        [(module_path, "prefill", 0, {"tp": 1, "engine": "A"})], num_blocks=NB, layers=LAYERS
    )
    pre_b = ranks.ranks(
        [(module_path, "prefill", r, {"tp": 4, "engine": "B"}) for r in range(4)],
        num_blocks=NB,
        layers=LAYERS,
    )
    _connect(pre_a, dec)
    before = [d.call("stats")["registrations"] for d in dec]
    _connect(pre_b, dec)  # the second engine: a plan of another TP, no new registration
    assert [d.call("stats")["registrations"] for d in dec] == before
    for d in dec:
        peers = d.call("peers")
        assert sorted((p.engine, p.tp) for p in peers) == [("A", 1)] + [("B", 4)] * 4

    # pull: requests of both engines in flight at once, block ids per kind
    n = 3
    dec_ids = _disjoint(2 * n, 4, seed=1)  # decode blocks: none shared between requests
    pre_ids = _disjoint(n, 4, seed=3) + _disjoint(n, 4, seed=4)  # nor within one engine
    reqs = []  # (request number, engine, prefill ranks, prefill ids, decode ids)
    for i in range(2 * n):
        engine, pre = ("A", pre_a) if i < n else ("B", pre_b)
        reqs.append((i, engine, pre, pre_ids[i], dec_ids[i]))
    for i, _e, pre, pids, _d in reqs:
        for r in pre:
            r.call("tag", i, pids)
            r.call("expect", f"pull-{i}")
    for i, engine, _p, pids, dids in reqs:
        for d in dec:
            d.call("pull", f"pull-{i}", dids, pids, engine=engine)
    mod = _module(module_path)
    for i, engine, pre, _pid, _d in reqs:
        plan = mod.plan(prefill_tp=len(pre), decode_tp=2)
        for r, d in enumerate(dec):
            info = d.call("wait", f"pull-{i}")
            assert info.ok and info.engine == engine
            assert info.peers == [f"prefill rank {p}" for p in plan.rank(r).sources]
        for r in pre:
            assert r.call("wait", f"pull-{i}").ok
    for d in dec:
        assert d.call("verify", [(i, dids) for i, _e, _p, _pid, dids in reqs]) > 0

    # push: the same engines write into fresh decode blocks, the decode ranks expect
    for d in dec:
        d.call("reset")
    dec_ids = _disjoint(2 * n, 4, seed=2)
    for i, engine, _pre, _pids, _d in reqs:
        for d in dec:
            d.call("expect", f"push-{i}", engine=engine)
    for i, _engine, pre, pids, _d in reqs:
        for r in pre:
            r.call("push", f"push-{i}", pids, dec_ids[i])
    for i, _engine, pre, _pid, _d in reqs:
        for r in pre:
            r.call("wait", f"push-{i}")
        for d in dec:
            assert d.call("wait", f"push-{i}").ok
    for d in dec:
        assert d.call("verify", [(reqs[i][0], dec_ids[i]) for i in range(2 * n)]) > 0
        st = d.call("stats")
        assert st.registrations == before[0] and st.xfer_handles_open == 0


def test_prefill_at_an_uncompiled_tp_is_refused_with_the_compile_command(ranks, module_path):
    from layoutc.runtime import protocol

    dec = ranks.rank(module_path, "decode", 0, tp=2, engine="D", num_blocks=NB, layers=LAYERS)
    pre = ranks.rank(module_path, "prefill", 0, tp=1, engine="X", num_blocks=NB, layers=LAYERS)
    # a prefill engine at TP 2 (2:2 was not compiled): the handshake of a TP-1 rank with its
    # TP changed to 2 is refused before any plan is used, naming the command that adds it
    # (without an auth key, whoever holds handshake bytes can seal altered ones: the test
    # does so with the bytes' own nonce)
    shake = protocol.decode_handshake(pre.call("handshake_bytes"), who="test")
    header = shake.header
    header["tp"] = header["layout"]["tp"] = 2
    header["agent"] = "Y-prefill-0"
    forged = protocol.encode_handshake(header, shake.metadata, nonce=shake.hello.nonce)
    with pytest.raises(HandshakeError) as ei:
        dec.call("add_peer", forged)
    msg = str(ei.value)
    assert "prefill TP 2 -> decode TP 2 was not compiled" in msg
    assert "layoutc compile" in msg and "--tp-pairs 1:2,2:2,4:2" in msg
    assert ei.value.field == "tp"
    assert dec.call("peers") == []
    # a prefill at a compiled TP is still welcome
    assert dec.call("add_peer", pre.call("handshake_bytes")) == "prefill rank 0"


def test_block_ids_per_kind_move_only_the_kinds_given(ranks, module_path):
    """A kind missing from the mapping moves nothing; the request still completes once."""
    dec = ranks.rank(module_path, "decode", 0, tp=2, engine="D", num_blocks=NB, layers=LAYERS)
    dec1 = ranks.rank(module_path, "decode", 1, tp=2, engine="D", num_blocks=NB, layers=LAYERS)
    pre = ranks.rank(module_path, "prefill", 0, tp=1, engine="A", num_blocks=NB, layers=LAYERS)
    _connect([pre], [dec, dec1])
    pids = {"attention": np.array([3, 9, 17])}
    dids = {"attention": np.array([40, 2, 11])}
    pre.call("tag", 7, pids)
    pre.call("expect", "only-attention")
    for d in (dec, dec1):
        d.call("pull", "only-attention", dids, pids)
    for d in (dec, dec1):
        info = d.call("wait", "only-attention")
        assert info.ok and info.bytes > 0
        # the Mamba layers' pages are untouched: only attention blocks hold tags
        d.call("verify", [(7, dids)])
    assert pre.call("wait", "only-attention").ok
    from layoutc.runtime.errors import UsageError

    with pytest.raises(UsageError, match="block ids per kind on both sides"):
        dec.call("pull", "mixed", {"attention": [1]}, [1])
    with pytest.raises(UsageError, match="no layer kind 'conv'"):
        dec.call("pull", "bad-kind", {"conv": [1]}, {"conv": [1]})


def test_results_are_typed_and_status_remembers(ranks, module_path):
    dec = ranks.rank(module_path, "decode", 0, tp=2, engine="D", num_blocks=NB, layers=LAYERS)
    dec1 = ranks.rank(module_path, "decode", 1, tp=2, engine="D", num_blocks=NB, layers=LAYERS)
    pre = ranks.rank(module_path, "prefill", 0, tp=1, engine="A", num_blocks=NB, layers=LAYERS)
    _connect([pre], [dec, dec1])
    ids = [np.array([1, 2]), np.array([5, 6])]
    pre.call("tag", 0, ids[0])
    pre.call("expect", "r")
    for d in (dec, dec1):
        d.call("pull", "r", ids[1], ids[0])
    info = dec.call("wait", "r")
    dec1.call("wait", "r")
    # a dataclass that reads like the dict it replaces
    assert info.kind == "pull" and info["kind"] == "pull" and info.get("chunks") == info.chunks
    assert set(info.keys()) >= {"ok", "peers", "bytes", "descriptors", "strategy"}
    # after wait() reported it, status still knows how it ended
    assert dec.call("status", "r") == "done"
    assert dec.call("status", "never") == "unknown"
    with pytest.raises(UnknownRequestError):
        dec.call("completion_info", "never")
    with pytest.raises(KeyError):  # (it is a KeyError too, for older callers)
        dec.call("completion_info", "never")
    # a wait that gives up leaves the request active
    pre.call("expect", "slow", timeout_s=30)
    with pytest.raises(WaitTimeoutError):
        pre.call("ep_wait", "slow", timeout_s=0.2)
    assert pre.call("status", "slow") == "active"
    st = dec.call("stats")
    assert st.requests_done == st["requests_done"] >= 1


def test_wait_progresses_the_other_endpoints_of_the_thread():
    """Two endpoints of one process: waiting on one moves the other along (without it the
    prefill side never answers UCX's connection set-up and the pull hangs to its deadline)."""
    from layoutc.runtime import Endpoint, allocate_buffers
    from rt_plans import GQA4, compiled

    plan = compiled("vllm_flashinfer", 1, 1, GQA4)
    eps = []
    try:
        for role in ("prefill", "decode"):
            ep = Endpoint(plan, role, 0, name=f"wait-{role}", timeout_s=20.0)
            ep.register_layers(allocate_buffers(plan, role, ["attention"] * 2, 8))
            eps.append(ep)
        pre, dec = eps
        dec.add_peer(pre.handshake_bytes())
        pre.add_peer(dec.handshake_bytes())
        pre.expect("r")
        dec.pull("r", [1, 2], [3, 4], strategy="zero-copy")
        dec.wait("r", timeout_s=15.0)  # never raises WaitTimeoutError: pre progresses too
        pre.wait("r", timeout_s=15.0)
        assert dec.status("r") == pre.status("r") == "done"
    finally:
        for ep in eps:
            ep.close()
