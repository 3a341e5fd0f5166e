"""Hostile peers, strangers and floods, each in its own process with real NIXL agents.

A *stranger* (:mod:`rt_attack`) is a raw NIXL agent that got hold of a victim's agent metadata
(as NIXL's listener used to hand out) and may name itself like a real peer; it holds no key.
A *hostile peer* is a real endpoint that completed a handshake and so holds the pair's keys:
it can send authentic messages with any content.  Neither may complete a request that its
real peers did not complete, take a live peer's place, make ``poll()`` raise, or grow the
victim's memory without bound.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from layoutc.runtime import protocol
from layoutc.runtime.endpoint.requests import now
from layoutc.runtime.errors import HandshakeError
from rt_attack import attacker
from rt_plans import GQA4, compiled
from rt_workers import (  # noqa: F401 (the `ranks` fixture)
    connect_all,
    ranks_fixture,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)

KEY = "layoutc-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def stranger():
    w = attacker()
    w.ready()
    yield w
    w.stop()


def _legacy(obj: dict) -> bytes:
    """A notification in the format before authentication (``LC1 `` + JSON)."""
    return b"LC1 " + json.dumps(obj).encode()


def _forged(obj: dict, epoch: bytes = b"\0" * 8, seq: int = 1) -> bytes:
    """A frame of the current format with a made-up tag."""
    return protocol.frame(epoch, seq.to_bytes(8, "big"), b"\x5a" * 16, json.dumps(obj).encode())


def _forgeries(rid: str, epoch: bytes) -> list[bytes]:
    """Everything a stranger can send for request ``rid``: completions, failures and staged
    messages, in the old format, and in the new one with made-up tags under a made-up epoch
    and under the pair's real one."""
    msgs = [
        {"t": "DONE", "r": rid},
        {"t": "FAIL", "r": rid, "e": "forged", "rel": True},
        {"t": "GNT", "r": rid, "k": None, "g": [[0, 0]]},
        {"t": "RDY", "r": rid, "k": None, "c": 0, "s": 0},
        {"t": "DAT", "r": rid, "k": None, "c": 0},
        {"t": "ACK", "r": rid, "k": None, "c": 0},
        {"t": "HDR", "h": {"agent": "x"}, "reply": True},
        {"t": "NAK", "e": "forged", "field": "x"},
    ]
    return (
        [_legacy(m) for m in msgs]
        + [_forged(m, seq=i + 1) for i, m in enumerate(msgs)]
        + [_forged(m, epoch, seq=i + 1) for i, m in enumerate(msgs)]
    )


def _stats(w) -> dict:
    return dict(w.call("stats").items())


# ----------------------------------------------------------------------------- forged messages
@pytest.mark.parametrize("mode", ["pull", "push"])
def test_forged_completions_from_strangers_change_nothing(ranks, stranger, mode):
    """Pull mode: a prefill expect() completes only on the real decode's DONE (early, its
    blocks would be freed under the reader); push mode: a decode expect() completes only on the
    real prefill's DONE (early, it would read pages nobody wrote)."""
    plan = compiled("vllm_flashinfer", 1, 1, GQA4)
    pre = ranks.rank(plan, "prefill", 0)
    dec = ranks.rank(plan, "decode", 0)
    connect_all([pre], [dec])
    victim, real = (pre, dec) if mode == "pull" else (dec, pre)
    # two strangers: one named like the real peer, one not; both hold the victim's metadata
    names = [real.call("agent_name"), f"stranger-{mode}"]
    for n in names:
        stranger.call("agent", n)
        assert stranger.call("load", n, victim.call("metadata")) == victim.call("agent_name")
    pre.call("tag", 0, [4, 5, 6])
    victim.call("expect", "r1")
    epoch = victim.call("epoch", real.call("agent_name"))
    before = _stats(victim)
    forgeries = _forgeries("r1", epoch)
    for n in names:
        stranger.call("send", n, victim.call("agent_name"), forgeries)
    n_sent = 2 * len(forgeries)
    wait_until(
        "the forgeries arrive",
        lambda: _stats(victim)["notifs_received"] >= before["notifs_received"] + n_sent,
    )
    st = _stats(victim)
    assert victim.call("status", "r1") == "active"
    assert st["requests_done"] == before["requests_done"]
    assert st["requests_failed"] == before["requests_failed"]

    def dropped(why: str) -> int:
        return st[f"dropped_{why}"] - before[f"dropped_{why}"]

    kinds = len(forgeries) // 3
    # old format: malformed; under the real peer's name: an epoch of no handshake, or the
    # real epoch with a bad tag; under another name: an unknown sender
    assert dropped("malformed") == 2 * kinds
    assert dropped("old_epoch") == kinds
    assert dropped("bad_mac") == kinds
    assert dropped("unknown_sender") == 2 * kinds
    assert st["messages_dropped"] - before["messages_dropped"] == n_sent
    if mode == "push":
        dec.call("verify", [])  # no byte written anywhere
    # the real peer completes it
    if mode == "pull":
        dec.call("pull", "r1", [1, 2, 3], [4, 5, 6])
    else:
        pre.call("push", "r1", [4, 5, 6], [1, 2, 3])
    real.call("wait", "r1")
    assert victim.call("wait", "r1").ok
    dec.call("verify", [(0, [1, 2, 3])])


def test_replayed_messages_of_a_restarted_peer_change_nothing(ranks, stranger):
    plan = compiled("vllm_flashinfer", 1, 1, GQA4)
    pre = ranks.rank(plan, "prefill", 0)
    dec = ranks.rank(plan, "decode", 0)
    connect_all([pre], [dec])
    pname = pre.call("agent_name")
    # messages the prefill really sent in its first life: a DONE for "a" (counted), and
    # frames it made for "b", "c" (a stranger captured them on the way)
    dec.call("expect", "a")
    done_a = pre.call("seal", "decode rank 0", [protocol.encode_body(protocol.Done("a"))])
    assert dec.call("wait", "a").ok
    later = pre.call(
        "seal",
        "decode rank 0",
        [protocol.encode_body(protocol.Done(r)) for r in ("b", "c")]
        + [protocol.encode_body(protocol.Fail("c", "replayed", True))],
        send=False,
    )
    # replayed within the same life: the DONE for "a" again, while "a" is expected anew
    dec.call("reset")
    stranger.call("agent", pname)
    stranger.call("load", pname, dec.call("metadata"))
    dec.call("expect", "a2")
    before = _stats(dec)
    stranger.call("send", pname, dec.call("agent_name"), done_a * 3)
    wait_until(
        "replays arrive", lambda: _stats(dec)["dropped_replayed"] >= before["dropped_replayed"] + 3
    )
    assert dec.call("status", "a2") == "active"
    assert _stats(dec)["requests_done"] == before["requests_done"]
    # the prefill restarts (same agent name); the decode re-handshakes with it
    pre.kill()
    pre2 = ranks.rank(plan, "prefill", 0, name=pname)
    connect_all([pre2], [dec])
    assert _stats(dec)["peers_replaced"] >= 1
    dec.call("expect", "b")
    dec.call("expect", "c")
    before = _stats(dec)
    stranger.call("send", pname, dec.call("agent_name"), later)
    wait_until(
        "old frames arrive",
        lambda: _stats(dec)["dropped_old_epoch"] >= before["dropped_old_epoch"] + len(later),
    )
    for rid in ("b", "c"):
        assert dec.call("status", rid) == "active"
    st = _stats(dec)
    assert st["requests_done"] == before["requests_done"]
    assert st["requests_failed"] == before["requests_failed"]
    # the restarted prefill's own messages count
    pre2.call("tag", 1, [4, 5, 6])
    pre2.call("push", "b", [4, 5, 6], [1, 2, 3])
    pre2.call("wait", "b")
    assert dec.call("wait", "b").ok
    dec.call("verify", [(1, [1, 2, 3])])


# ----------------------------------------------------------------------------- impostors
def test_impostor_cannot_displace_a_live_peer(ranks):
    """A second decode claiming a live decode's engine and rank (or its agent name) is refused
    by the byte handshake and by the socket; pushes keep landing in the real one."""
    plan = compiled("vllm_flashinfer", 1, 1, GQA4)
    pre = ranks.rank(plan, "prefill", 0, listen_port=0)
    dec = ranks.rank(plan, "decode", 0)
    connect_all([pre], [dec])
    port = pre.call("port")
    same_slot = ranks.rank(plan, "decode", 0, name="impostor-0")  # engine "decode", rank 0
    same_name = ranks.rank(plan, "decode", 1 % 1, name=dec.call("agent_name"), engine="other")
    for imp in (same_slot, same_name):
        with pytest.raises(HandshakeError, match="connected and answering") as ei:
            pre.call("add_peer", imp.call("handshake_bytes"))
        assert ei.value.field == "agent"
        with pytest.raises(HandshakeError, match="connected and answering"):
            imp.call("connect", "127.0.0.1", port)
    st = _stats(pre)
    assert st["handshakes_refused"] == 2 and st["peers_replaced"] == 0
    assert [(p.name, p.alive) for p in pre.call("peers")] == [(dec.call("agent_name"), True)]
    pre.call("tag", 2, [4, 5, 6])
    dec.call("expect", "w")
    pre.call("push", "w", [4, 5, 6], [7, 8, 9])
    pre.call("wait", "w")
    assert dec.call("wait", "w").ok
    dec.call("verify", [(2, [7, 8, 9])])
    for imp in (same_slot, same_name):
        imp.call("verify", [])  # nothing landed in the impostors


def test_without_the_key_a_stranger_reads_no_metadata(ranks, stranger):
    """With an auth key, a handshake without it gets neither side's agent metadata: the socket
    refuses before the payload, and handshake bytes are encrypted."""
    plan = compiled("vllm_flashinfer", 1, 1, GQA4)
    pre = ranks.rank(plan, "prefill", 0, listen_port=0, auth_key=KEY)
    port = pre.call("port")
    md = pre.call("metadata")
    blob = pre.call("handshake_bytes")
    assert md not in blob and b"spec_sha256" not in blob and b"layers" not in blob
    for psk in (None, b"another-key-of-32-bytes-0123456"):
        with pytest.raises(HandshakeError) as ei:
            protocol.decode_handshake(blob, who="stranger", psk=psk)
        assert ei.value.field == "auth"
    # an endpoint with another key, and one without: refused, nothing installed
    for kw in ({"auth_key": "another-key-0123456789abcdef"}, {}):
        other = ranks.rank(plan, "decode", 0, **kw)
        with pytest.raises(HandshakeError) as ei:
            other.call("connect", "127.0.0.1", port)
        assert ei.value.field == "auth" or "auth key" in str(ei.value)
        with pytest.raises(HandshakeError):
            pre.call("add_peer", other.call("handshake_bytes"))
        assert other.call("peers") == []
    assert pre.call("peers") == []
    # raw: a hello that claims a key, then a made-up proof and payload: the server answers
    # with its challenge and a refusal, never with its payload
    hello = protocol.Hello("stranger-0", b"\1" * 32, True, role="decode").encode()
    frames = stranger.call(
        "exchange",
        "127.0.0.1",
        port,
        [
            protocol.encode_frame(protocol.F_HELLO, hello),
            protocol.encode_frame(protocol.F_PROOF, b"\0" * 32),
            protocol.encode_frame(protocol.F_PAYLOAD, b"\0" * 4096),
        ],
    )
    assert [k for k, _ in frames] == [protocol.F_CHALLENGE, protocol.F_REFUSE]
    assert b"proof fails" in frames[1][1]
    # with the key: connected
    good = ranks.rank(plan, "decode", 0, auth_key=KEY)
    assert good.call("connect", "127.0.0.1", port) == "prefill rank 0"
    wait_until("the prefill installs it", lambda: len(pre.call("peers")) == 1)


def test_a_restarted_peer_proving_the_key_replaces_a_live_one(ranks):
    """With a key, a new handshake of the same rank replaces the old one at once (socket and
    bytes); the old one's requests fail naming it."""
    plan = compiled("vllm_flashinfer", 1, 1, GQA4)
    pre = ranks.rank(plan, "prefill", 0, listen_port=0, auth_key=KEY)
    port = pre.call("port")
    old = ranks.rank(plan, "decode", 0, auth_key=KEY)
    old.call("connect", "127.0.0.1", port)
    wait_until("installed", lambda: len(pre.call("peers")) == 1)
    pre.call("expect", "x")
    new = ranks.rank(plan, "decode", 0, auth_key=KEY)
    new.call("connect", "127.0.0.1", port)
    wait_until("replaced", lambda: _stats(pre)["peers_replaced"] == 1)
    with pytest.raises(Exception, match="replaced by a new handshake"):
        pre.call("wait", "x")
    newest = ranks.rank(plan, "decode", 0, auth_key=KEY)
    pre.call("add_peer", newest.call("handshake_bytes"))
    assert _stats(pre)["peers_replaced"] == 2
    newest.call("add_peer", pre.call("handshake_bytes"))
    pre.call("tag", 3, [1])
    pre.call("expect", "y")
    newest.call("pull", "y", [2], [1])
    newest.call("wait", "y")
    assert pre.call("wait", "y").peers == ["decode rank 0"]
    newest.call("verify", [(3, [2])])


# ----------------------------------------------------------------------------- hostile peers
def _hostile_bodies(rid: str, live: str) -> list[bytes]:
    """Authentic bodies (a peer with the keys sends them) of every malformed class."""
    deep = b"[" * 5000 + b"]" * 5000
    big = b"9" * 5000
    return [
        b"[1]",
        b"null",
        b"",
        b"\xff\xfe not utf-8",
        big,
        deep,
        b'{"t": "DONE", "r": ' + big + b"}",
        b'{"t": "FAIL", "r": "' + live.encode() + b'", "e": ' + deep + b"}",
        json.dumps({"t": "DONE", "r": 5}).encode(),
        json.dumps({"t": "DONE", "r": ["x"]}).encode(),
        json.dumps({"t": "DONE"}).encode(),
        json.dumps({"t": "FAIL", "r": rid, "rel": "yes"}).encode(),
        json.dumps({"t": "WHAT", "r": rid}).encode(),
        json.dumps({"t": ["DONE"], "r": rid}).encode(),
        json.dumps({"t": "RDY", "r": live, "k": None, "c": 2**50, "s": -(2**50)}).encode(),
        json.dumps({"t": "RDY", "r": live, "k": None, "c": 0, "s": 2**31 - 1}).encode(),
        json.dumps({"t": "GNT", "r": live, "k": None, "g": [[2**50, -1]]}).encode(),
        json.dumps(
            {"t": "GNT", "r": live, "k": None, "g": [[0, 2**31 - 1], [2**31 - 1, 0]]}
        ).encode(),
        json.dumps({"t": "DAT", "r": live, "k": 7, "c": 1.5}).encode(),
        json.dumps({"t": "ACK", "r": live, "k": "nope", "c": 0}).encode(),
        json.dumps(
            {
                "t": "SREQ",
                "r": "other",
                "k": None,
                "b": {"d": "i8", "v": "!!"},
                "l": None,
                "c": 1,
                "n": 1,
                "z": 1,
                "m": "reader",
                "g": [],
            }
        ).encode(),  # fmt: skip
        json.dumps({"t": "HDR", "h": {}, "reply": True}).encode(),
        json.dumps({"t": "NAK", "e": [], "field": 3}).encode(),
    ]


def test_malformed_messages_of_a_peer_never_raise_and_a_done_behind_them_completes(ranks):
    """An authenticated peer sends one message of every malformed class, then completes a
    request the normal way: the one poll that receives them all raises nothing, drops and
    counts each bad one, and completes the request."""
    plan = compiled("vllm_flashinfer", 1, 1, GQA4)
    pre = ranks.rank(plan, "prefill", 0)
    dec = ranks.rank(plan, "decode", 0)
    connect_all([pre], [dec])
    pre.call("tag", 0, [4, 5, 6])
    # a first request wires the connection
    pre.call("expect", "warm")
    dec.call("pull", "warm", [1, 2, 3], [4, 5, 6])
    dec.call("wait", "warm")
    pre.call("wait", "warm")
    pre.call("expect", "live")  # the staged and FAIL messages name it: it must survive them
    pre.call("expect", "r")
    bodies = _hostile_bodies("r", "live")
    before = _stats(pre)
    pre.send("hold_then_poll", 2.0)
    pre.wait_event(lambda ev: ev[0] == "holding", 30)
    # the bodies, then the DONE the decode sends when its pull of "r" completes
    done = protocol.encode_body(protocol.Done("r"))
    dec.call("seal", "prefill rank 0", bodies + [done])
    res = pre.result(60, "hold_then_poll")
    assert res["done"] == ["r"] and res["failed"] == []
    st = res["stats"]
    assert st["notifs_received"] - before["notifs_received"] == len(bodies) + 1
    # (three are well-formed: a slot, grants and a kind the staged engine finds no use for)
    assert st["dropped_malformed"] - before["dropped_malformed"] == len(bodies) - 3
    assert st["messages_dropped"] - before["messages_dropped"] == len(bodies) - 3
    assert st["dropped_failed"] == 0
    assert pre.call("status", "live") == "active"
    # the endpoint goes on as before
    pre.call("expect", "after")
    dec.call("pull", "after", [10], [4])
    dec.call("wait", "after")
    assert pre.call("wait", "after").ok


# ----------------------------------------------------------------------------- floods
def test_floods_leave_tables_at_their_caps(ranks, stranger):
    """200k DONEs of unknown ids from an authenticated peer, 200k from a stranger, 50k
    stranger handshake headers: the early-message table stops at its cap, everything else is
    dropped before any state is kept, and memory grows by less than 32 MiB."""
    from layoutc.runtime.endpoint.endpoint import MAX_EARLY_PER_PEER

    plan = compiled("vllm_flashinfer", 1, 1, GQA4)
    pre = ranks.rank(plan, "prefill", 0, timeout_s=600)  # (nothing expires during the flood)
    dec = ranks.rank(plan, "decode", 0)
    connect_all([pre], [dec])
    name = pre.call("agent_name")
    stranger.call("agent", "flooder")
    stranger.call("load", "flooder", pre.call("metadata"))
    rss0 = pre.call("rss")
    n_done, n_hdr = 200_000, 50_000
    dec.send("flood_done", "prefill rank 0", n_done, "unknown-")
    stranger.call("flood", "flooder", name, b'LC1 {"t": "HDR", "h": {"agent": "s%d"}}', n_hdr)
    forged = protocol.frame(b"\0" * 8, b"\0" * 7 + b"\1", b"Z" * 16, b'{"t":"DONE","r":"u%d"}')
    stranger.call("flood", "flooder", name, forged, n_done)
    assert dec.result(300, "flood_done") == n_done
    total = 2 * n_done + n_hdr
    wait_until(
        "the flood is received",
        lambda: _stats(pre)["notifs_received"] >= total,
        timeout=240,
    )
    st = _stats(pre)
    assert st["early_messages"] == MAX_EARLY_PER_PEER
    assert st["dropped_early_overflow"] == n_done - MAX_EARLY_PER_PEER
    assert st["dropped_unknown_sender"] == n_done
    assert st["dropped_malformed"] == n_hdr
    assert st["messages_dropped"] == total - MAX_EARLY_PER_PEER
    assert pre.call("rss") - rss0 < 32 << 20
    # the endpoint still serves its peer
    pre.call("tag", 0, [1])
    pre.call("expect", "ok")
    dec.call("pull", "ok", [2], [1])
    dec.call("wait", "ok")
    assert pre.call("wait", "ok").ok


def test_handshake_socket_floods_stay_bounded(ranks, stranger):
    """Connections that never finish a handshake hold at most MAX_PENDING slots, oversized or
    garbled frames are cut off, and a real peer still connects."""
    from layoutc.runtime.endpoint.handshake_socket import MAX_PENDING

    plan = compiled("vllm_flashinfer", 1, 1, GQA4)
    pre = ranks.rank(plan, "prefill", 0, listen_port=0)
    port = pre.call("port")
    stranger.call("hold", "127.0.0.1", port, 3 * MAX_PENDING, b"H\0\0")  # a hello never ending
    wait_until(
        "the server takes them in",
        lambda: stranger.call("hold_closed") >= 2 * MAX_PENDING,
    )
    assert _stats(pre)["handshakes_pending"] <= MAX_PENDING
    bad = [
        protocol.encode_frame(protocol.F_HELLO, b"x" * 10) + b"",
        b"Z\0\0\0\1x",  # no such frame
        b"H\xff\xff\xff\xff",  # a hello of 4 GiB
        protocol.encode_frame(protocol.F_PAYLOAD, b"{}"),  # a payload before any proof
        protocol.encode_frame(protocol.F_HELLO, b"[" * 3000),
    ]
    for chunk in bad:
        frames = stranger.call("exchange", "127.0.0.1", port, [chunk], 0.5)
        assert all(k == protocol.F_REFUSE for k, _ in frames), frames
    dec = ranks.rank(plan, "decode", 0)
    t0 = now()
    assert dec.call("connect", "127.0.0.1", port, timeout_s=20) == "prefill rank 0"
    assert now() - t0 < 20
    stranger.call("release")
    wait_until("installed", lambda: len(pre.call("peers")) == 1)
    st = _stats(pre)
    assert st["handshakes_dropped"] >= 2 * MAX_PENDING
    assert st["peers"] == 1


assert np  # (numpy: block id arrays in helpers)
