"""Dead peers, stale requests, restarted peers, and the handshake socket.

Peers are real processes killed with SIGKILL while transfers run; every wait is bounded and
the survivor must fail exactly the affected requests, report the peer and request, never
report a false completion, release every handle, and go on serving a new peer.
"""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from layoutc.runtime.errors import (
    HandshakeError,
    PeerDisconnectedError,
    TransferTimeoutError,
)
from rt_plans import GQA4, compiled
from rt_workers import (  # noqa: F401 (the `ranks` fixture)
    connect_all,
    ranks_fixture,
    requests_done,
)

pytestmark = pytest.mark.timeout(120)

#: 32 KiB pages (4 heads x 16 tokens x 128 dims x bf16 x K|V) so that a request is a few MiB
#: and the kill lands while transfers are running.
BIG = dict(GQA4, head_dim=128)
NB = 768


#: Request timeout of the endpoints in the kill tests: a failure seen earlier than this after
#: the kill came from the disconnect, not from the request's deadline.
TIMEOUT_S = 10.0


def _sets(seed: int = 0):
    rng = np.random.default_rng(seed)
    d = rng.permutation(NB)
    p = rng.permutation(NB)[:256]
    return [d[:256], d[256:512]], p


def test_prefill_killed_mid_pull(ranks):
    plan = compiled("vllm_flashinfer", 1, 1, BIG)
    pre = ranks.rank(plan, "prefill", 0, num_blocks=NB, timeout_s=TIMEOUT_S)
    dec = ranks.rank(plan, "decode", 0, num_blocks=NB, timeout_s=TIMEOUT_S)
    connect_all([pre], [dec])
    sets, pb = _sets()
    pre.call("tag", 0, pb)
    dec.send("loop", "pull", "a", 10**6, sets, pb, seconds=60)
    requests_done(dec, 3)  # requests of 16 MiB each run back to back
    t_kill = time.monotonic()
    pre.kill()
    res = dec.result(60, "loop")
    err = res["error"]
    assert isinstance(err, PeerDisconnectedError), err
    assert err.peer == "prefill rank 0" and err.request_id == res["failed_rid"]
    assert str(err).startswith(f"decode rank 0: request {res['failed_rid']!r}: prefill rank 0")
    assert res["done"] > 0
    assert 0 <= res["t_error"] - t_kill < TIMEOUT_S  # the disconnect, not the deadline
    # no false completion: the last request reported complete holds every byte
    dec.call("check_blocks", 0, sets[res["last_set"]])
    st = dec.call("stats")
    assert st["xfer_handles_open"] == 0 and st["requests_failed"] == 1
    # later requests fail at once, naming the peer, without posting anything
    with pytest.raises(PeerDisconnectedError, match="prefill rank 0 is disconnected"):
        dec.call("pull", "after", sets[0], pb)
    # the survivor serves a restarted prefill (same agent name, new metadata)
    pre2 = ranks.rank(plan, "prefill", 0, num_blocks=NB)
    pre2.call("tag", 5, pb)
    connect_all([pre2], [dec])
    dec.call("reset")
    pre2.call("expect", "new")
    dec.call("pull", "new", sets[1], pb)
    dec.call("wait", "new")
    assert pre2.call("wait", "new")["peers"] == ["decode rank 0"]
    dec.call("verify", [(5, sets[1])])


def test_decode_killed_prefill_request_times_out_then_serves_new_decode(ranks):
    plan = compiled("vllm_flashinfer", 1, 1, GQA4)
    pre = ranks.rank(plan, "prefill", 0)
    dec = ranks.rank(plan, "decode", 0)
    connect_all([pre], [dec])
    pre.call("tag", 0, [1, 2, 3])
    timeout = 2.0
    pre.call("expect", "stale", timeout_s=timeout)
    dec.kill()
    t0 = time.monotonic()
    with pytest.raises(TransferTimeoutError) as ei:
        pre.call("wait", "stale", within=10 * timeout)
    took = time.monotonic() - t0
    assert timeout / 2 < took < 3 * timeout  # at its deadline
    assert ei.value.peer == "decode rank 0" and ei.value.request_id == "stale"
    assert "request 'stale' timed out after 2.0 s waiting for decode rank 0" in str(ei.value)
    dec2 = ranks.rank(plan, "decode", 0)
    connect_all([pre], [dec2])  # prefill replaces the dead decode's metadata
    pre.call("expect", "fresh")
    dec2.call("pull", "fresh", [7, 8, 9], [1, 2, 3])
    dec2.call("wait", "fresh")
    assert pre.call("wait", "fresh")["ok"]
    dec2.call("verify", [(0, [7, 8, 9])])


def test_decode_killed_mid_push_other_engine_still_served(ranks):
    plan = compiled("vllm_flashinfer", 1, 1, BIG)
    kw = dict(num_blocks=NB, timeout_s=TIMEOUT_S)
    pre = ranks.rank(plan, "prefill", 0, **kw)
    dead = ranks.rank(plan, "decode", 0, engine="A", name="A-decode-0", **kw)
    other = ranks.rank(plan, "decode", 0, engine="B", name="B-decode-0", **kw)
    connect_all([pre], [dead, other])
    sets, db = _sets(1)
    for i in range(2):
        pre.call("tag", i, sets[i])
    pre.send("loop", "push", "w", 10**6, sets, db, seconds=60, engine="A")
    requests_done(pre, 3)
    t_kill = time.monotonic()
    dead.kill()
    res = pre.result(60, "loop")
    err = res["error"]
    assert isinstance(err, PeerDisconnectedError), err
    assert err.peer == "decode rank 0" and err.request_id == res["failed_rid"]
    assert res["done"] > 0 and 0 <= res["t_error"] - t_kill < TIMEOUT_S
    assert pre.call("stats")["xfer_handles_open"] == 0
    # the same endpoint keeps serving engine B
    other.call("expect", "b1")
    pre.call("push", "b1", sets[0], db, engine="B")
    pre.call("wait", "b1")
    assert other.call("wait", "b1")["peers"] == ["prefill rank 0"]
    other.call("verify", [(0, db)])


# ----------------------------------------------------------------------------- the socket
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_socket_handshake_transfer_refusal_and_restart(ranks):
    plan = compiled("vllm_flashinfer", 1, 1, GQA4)
    pp, dp = _free_port(), _free_port()
    pre = ranks.rank(plan, "prefill", 0, listen_port=pp, name="L-prefill-0")
    dec = ranks.rank(plan, "decode", 0, listen_port=dp, name="L-decode-0")
    pre.send("wait_for_peers", 1)
    assert dec.call("connect", "127.0.0.1", pp, "L-prefill-0") == "prefill rank 0"
    assert pre.result(30, "wait_for_peers") == ["decode rank 0"]
    pre.call("tag", 0, [4, 5, 6])
    pre.call("expect", "l1")
    dec.call("pull", "l1", [1, 2, 3], [4, 5, 6])
    dec.call("wait", "l1")
    pre.call("wait", "l1")
    dec.call("verify", [(0, [1, 2, 3])])

    # a decode rank whose plan has other parameters is refused by both sides (the waiting
    # side names the refusal when its wait ends)
    other = compiled("vllm_flashinfer", 1, 1, dict(GQA4, head_dim=64))
    bad = ranks.rank(other, "decode", 0, listen_port=_free_port(), name="L-bad-0", engine="bad")
    pre.send("wait_for_peers", 2, timeout_s=3.0)
    with pytest.raises(HandshakeError) as ei:
        bad.call("connect", "127.0.0.1", pp, "L-prefill-0")
    assert "params.head_dim 32 but this plan expects 64" in str(
        ei.value
    ) or "params.head_dim 64 but this plan expects 32" in str(ei.value)
    with pytest.raises(HandshakeError, match="params.head_dim 64 but this plan expects 32"):
        pre.result(30, "wait_for_peers")

    # the prefill restarts (same agent name, new port): the decode connects again
    pre.kill()
    pp2 = _free_port()
    pre2 = ranks.rank(plan, "prefill", 0, listen_port=pp2, name="L-prefill-0")
    pre2.send("wait_for_peers", 1)
    assert dec.call("connect", "127.0.0.1", pp2, "L-prefill-0") == "prefill rank 0"
    pre2.result(30, "wait_for_peers")
    pre2.call("tag", 3, [4, 5, 6])
    pre2.call("expect", "l2")
    dec.call("reset")
    dec.call("pull", "l2", [1, 2, 3], [4, 5, 6])
    dec.call("wait", "l2")
    pre2.call("wait", "l2")
    dec.call("verify", [(3, [1, 2, 3])])

    # the decode restarts too: the passive prefill accepts its new metadata
    dec.kill()
    dec2 = ranks.rank(plan, "decode", 0, listen_port=_free_port(), name="L-decode-0")
    assert dec2.call("connect", "127.0.0.1", pp2, "L-prefill-0") == "prefill rank 0"
    pre2.call("expect", "l3")
    dec2.call("pull", "l3", [9, 10, 11], [4, 5, 6])
    dec2.call("wait", "l3")
    assert pre2.call("wait", "l3")["peers"] == ["decode rank 0"]
    dec2.call("verify", [(3, [9, 10, 11])])
