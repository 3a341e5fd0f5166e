"""What a peer sends, whatever it is, ends as a refusal or a dropped message -- never as an
exception out of ``add_peer`` other than :class:`HandshakeError`, nor out of ``poll()``; and
the API refuses bad arguments with clear errors.

Real NIXL agents; the endpoints of a test live in this process (no byte needs to move between
processes here: the multi-process attacks are in ``test_runtime_security.py``).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import socket

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layoutc.runtime import auth, protocol
from layoutc.runtime.endpoint import Endpoint
from layoutc.runtime.errors import (
    HandshakeError,
    TransferTimeoutError,
    UsageError,
)
from rt_local import closing_fixture, endpoint  # noqa: F401 (`closing`)
from rt_plans import GQA4, compiled

pytestmark = pytest.mark.timeout(120)
_names = itertools.count()
KEY = "layoutc-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def plan():
    return compiled("vllm_flashinfer", 1, 1, GQA4)


# ----------------------------------------------------------------------------- wire units
def test_replay_window_accepts_out_of_order_and_refuses_repeats():
    w = auth.ReplayWindow(size=64)
    order = [1, 3, 2, 10, 5, 70, 9, 8, 69]
    for n in order:
        assert w.check(n), n
        w.accept(n)
    for n in order:
        assert not w.check(n), n  # repeats
    assert not w.check(6)  # 70 - 64: behind the window
    assert w.check(7 + 64) and w.check(68)
    restored = auth.ReplayWindow(size=64, floor=70)
    assert not restored.check(70) and not restored.check(12) and restored.check(71)


def test_channel_tags_bind_epoch_sequence_body_and_direction():
    n1, n2 = auth.new_nonce(), auth.new_nonce()
    a = auth.pair_keys(None, local_role="prefill", local_name="p", local_nonce=n1,
                       peer_name="d", peer_nonce=n2)  # fmt: skip
    b = auth.pair_keys(None, local_role="decode", local_name="d", local_nonce=n2,
                       peer_name="p", peer_nonce=n1)  # fmt: skip
    assert a.epoch == b.epoch and a.send == b.recv and a.recv == b.send and a.send != a.recv
    sender, receiver = auth.Channel(a), auth.Channel(b)
    body = b'{"t":"DONE","r":"x"}'
    epoch, seq, tag = sender.seal(body)
    for bad in (
        (b"\0" * 8, seq, tag, body),
        (epoch, (2).to_bytes(8, "big"), tag, body),
        (epoch, seq, bytes(16), body),
        (epoch, seq, tag, body + b" "),
    ):
        assert receiver.open(*bad) in ("old_epoch", "bad_mac")
    assert receiver.open(epoch, seq, tag, body) is None
    assert receiver.open(epoch, seq, tag, body) == "replayed"
    # a message cannot be reflected back to its sender
    assert auth.Channel(a).open(epoch, seq, tag, body) == "bad_mac"
    # another auth key, other keys
    k = auth.pair_keys(b"k" * 16, local_role="decode", local_name="d", local_nonce=n2,
                       peer_name="p", peer_nonce=n1)  # fmt: skip
    assert auth.Channel(k).open(epoch, seq, tag, body) == "bad_mac"


def test_box_encrypts_only_with_a_key_and_detects_any_change():
    data = b"agent metadata " * 50
    for encrypt in (False, True):
        box = auth.Box(b"k" * 32, encrypt)
        sealed = box.seal(b"aad", data)
        assert (data in sealed) is not encrypt
        assert box.open(b"aad", sealed) == data
        assert box.open(b"other", sealed) is None
        assert auth.Box(b"j" * 32, encrypt).open(b"aad", sealed) is None
        for i in (0, 20, len(sealed) - 1):
            flipped = bytearray(sealed)
            flipped[i] ^= 1
            assert box.open(b"aad", bytes(flipped)) is None
        assert box.open(b"aad", sealed[:40]) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(
        ["t", "r", "k", "c", "s", "g", "b", "l", "n", "z", "m", "e", "rel"]), c, max_size=6),
    max_leaves=12,
).map(lambda v: json.dumps(v).encode()))  # fmt: skip
def test_message_decoder_raises_only_protocol_errors(body):
    try:
        msg = protocol.decode_body(body)
    except protocol.ProtocolError:
        return
    assert isinstance(msg, protocol.Message)


@pytest.mark.parametrize(
    "body",
    [
        b"[1]",
        b"null",
        b"9" * 5000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"t": "RDY", "r": "x", "k": null, "c": 1125899906842624, "s": -1125899906842624}',
        b'{"t": "SREQ", "r": "x", "k": null, "b": {"d": "i4", "v": "AAA"}, "c": 1, "n": 1,'
        b' "z": 1, "m": "reader", "g": [[1, 2, 3]]}',
        b'{"t": "HDR", "h": {}}',
        b"\xff\xfe",
    ],
)
def test_message_decoder_refuses_each_malformed_class(body):
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_body(body)


def test_a_peers_reason_is_plain_text():
    deep = b"[" * 900 + b"]" * 900
    msg = protocol.decode_body(b'{"t": "FAIL", "r": "x", "e": ' + deep + b"}")
    assert msg == protocol.Fail("x", "<list>", False)
    reason = "a\nb\x1b[2J" + "c" * 9000
    msg = protocol.decode_body(json.dumps({"t": "FAIL", "r": "x", "e": reason}).encode())
    assert isinstance(msg, protocol.Fail) and msg.error.startswith("a?b?[2J")
    assert len(msg.error) == protocol.MAX_TEXT_CHARS


# ----------------------------------------------------------------------------- handshakes
def _reseal(blob: bytes, mutate) -> bytes:
    """Handshake bytes with the header changed by ``mutate`` (sealed again: without an auth key
    anyone can)."""
    shake = protocol.decode_handshake(blob, who="test")
    header = copy.deepcopy(shake.header)
    mutate(header)
    return protocol.encode_handshake(header, shake.metadata, nonce=shake.hello.nonce)


def _set(path, value):
    def mutate(h):
        node = h
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


HOSTILE_HEADERS = [
    ("format", _set(["format"], "2")),
    ("agent", _set(["agent"], 7)),
    ("agent", _set(["agent"], "x" * 1000)),
    ("agent", _set(["agent"], "bad\nname")),
    ("engine", _set(["engine"], ["e"])),
    ("rank", _set(["rank"], 2**70)),
    ("rank", _set(["rank"], -1)),
    ("rank", _set(["rank"], True)),
    ("tp", _set(["tp"], 0)),
    ("layout", _set(["layout"], [])),
    ("layout.tp", _set(["layout", "tp"], 2.0)),
    ("layout.params", _set(["layout", "params"], {"a": {"deep": [[[]]]}})),
    ("layout.pages", _set(["layout", "pages"], {"attention": 5})),
    ("mem_type", _set(["mem_type"], "HBM")),
    ("layers", _set(["layers"], {"0": {}})),
    ("layers", _set(["layers"], [])),
    ("layers[0]", _set(["layers", 0], [])),
    ("layers[0].attention", _set(["layers", 0, "pages", "attention"], [2**70, 10, 0, 1])),
    ("layers[0].attention", _set(["layers", 0, "pages", "attention"], [-5, 10, 0, 1])),
    ("layers[0].attention", _set(["layers", 0, "pages", "attention"], [2**64 - 8, 16, 0, 1])),
    ("layers[0].attention", _set(["layers", 0, "pages", "attention"], [1, 2, 3])),
    ("layers[0].attention", _set(["layers", 0, "pages", "attention"], ["1", 2, 0, 1])),
    ("layers[0].attention", _set(["layers", 0, "pages", "attention"], [1, 2**40, 0, 2**50])),
    (
        "staging",
        _set(["staging"], {"addr": -1, "nbytes": 1, "devid": 0, "slots": 1, "slot_bytes": 1}),
    ),  # fmt: skip
    (
        "staging",
        _set(["staging"], {"addr": 0, "nbytes": 16, "devid": 0, "slots": 4, "slot_bytes": 8}),
    ),  # fmt: skip
    ("staging", _set(["staging"], 2**80)),
    ("listener", _set(["listener"], 2**20)),
    ("plan_format", _set(["plan_format"], 3)),
]


@pytest.mark.parametrize("field, mutate", HOSTILE_HEADERS)
def test_hostile_headers_are_refused_before_anything_is_loaded(closing, plan, field, mutate):
    p, d = endpoint(plan, "prefill"), endpoint(plan, "decode")
    closing(p), closing(d)
    with pytest.raises(HandshakeError) as ei:
        d.add_peer(_reseal(p.handshake_bytes(), mutate))
    assert ei.value.field == field, str(ei.value)
    assert d.peers() == [] and not d.agent.check_remote_metadata(p.name)
    assert d.add_peer(p.handshake_bytes()) == "prefill rank 0"  # the real one still comes in


def test_buffers_outside_the_registered_memory_are_refused(closing, plan):
    """A header that announces buffers (or a staging buffer) its agent metadata does not
    register is refused after loading, and the metadata is unloaded."""
    p, d = endpoint(plan, "prefill"), endpoint(plan, "decode")
    closing(p), closing(d)
    page = p.header()["layers"][0]["pages"]["attention"]
    staging = p.header()["staging"]
    shifted = [page[0] + page[1], page[1], page[2], page[3]]  # the bytes right after it
    other = dict(staging, addr=staging["addr"] + 4096)
    for mutate in (
        _set(["layers", 0, "pages", "attention"], shifted),
        _set(["layers", 1, "pages", "attention"], [page[0], page[1], 1, page[3]]),  # devid
        _set(["staging"], other),
    ):
        with pytest.raises(HandshakeError, match="outside the memory its agent metadata") as ei:
            d.add_peer(_reseal(p.handshake_bytes(), mutate))
        assert ei.value.field == "layers"
        assert d.peers() == [] and not d.agent.check_remote_metadata(p.name)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"garbage",
        protocol.HS_MAGIC,
        protocol.HS_MAGIC + b"\xff\xff\xff\xff",
        protocol.HS_MAGIC + b"\0\0\0\x05" + b"[[[[[",
        protocol.HS_MAGIC + b"\0\0\0\x02" + b"{}",
        protocol.HS_MAGIC_OLD + b"\0\0\0\x02{}",
        b"LAYOUTC-HS/2\n\0\0\0\x10" + b"\xff" * 16,
        "text, not bytes",
        12345,
        None,
    ],
)
def test_malformed_handshake_bytes_raise_only_handshake_errors(closing, plan, blob):
    d = endpoint(plan, "decode")
    closing(d)
    with pytest.raises(HandshakeError):
        d.add_peer(blob)
    assert d.peers() == []


def test_tampered_and_truncated_handshake_bytes_are_refused(closing, plan):
    p, d = endpoint(plan, "prefill"), endpoint(plan, "decode")
    closing(p), closing(d)
    blob = p.handshake_bytes()
    rng = np.random.default_rng(0)
    for i in rng.integers(len(protocol.HS_MAGIC) + 4, len(blob), 40):
        flipped = bytearray(blob)
        flipped[i] ^= 0x40
        with pytest.raises(HandshakeError):
            d.add_peer(bytes(flipped))
    for n in (20, len(blob) // 2, len(blob) - 1):
        with pytest.raises(HandshakeError):
            d.add_peer(blob[:n])
    assert d.peers() == []


def test_the_same_handshake_bytes_again_change_nothing(closing, plan):
    p, d = endpoint(plan, "prefill"), endpoint(plan, "decode")
    closing(p), closing(d)
    blob = p.handshake_bytes()
    assert d.add_peer(blob) == "prefill rank 0"
    before = d.peers()
    assert d.add_peer(blob) == "prefill rank 0"
    assert d.peers() == before and d.stats()["peers_replaced"] == 0


def test_keyed_handshake_bytes(closing, plan):
    p = endpoint(plan, "prefill", auth_key=KEY)
    d = endpoint(plan, "decode", auth_key=KEY.encode())
    plain = endpoint(plan, "decode", 0)
    closing(p), closing(d), closing(plain)
    assert d.add_peer(p.handshake_bytes()) == "prefill rank 0"
    with pytest.raises(HandshakeError, match="this endpoint has none") as ei:
        plain.add_peer(p.handshake_bytes())
    assert ei.value.field == "auth"
    with pytest.raises(HandshakeError, match="requires one") as ei:
        d.add_peer(plain.handshake_bytes())
    assert ei.value.field == "auth"


# ----------------------------------------------------------------------------- the socket
def test_connect_then_the_other_side_polls_and_both_have_the_peer(closing, plan):
    p = endpoint(plan, "prefill", listen_port=0)
    d = endpoint(plan, "decode")
    closing(p), closing(d)
    assert p.listen_host == "127.0.0.1" and p.listen_port
    assert p.header()["listener"] == p.listen_port
    # (one thread: connect() progresses the other endpoints of the thread meanwhile)
    assert d.connect("127.0.0.1", p.listen_port) == "prefill rank 0"
    p.poll()
    assert [x.label for x in p.peers()] == ["decode rank 0"]
    assert p.wait_for_peers(timeout_s=5) == ["decode rank 0"]
    # connecting again to the same endpoint changes nothing on either side
    before = (p.peers(), d.peers(), p.stats()["peers_replaced"])
    assert d.connect("127.0.0.1", p.listen_port) == "prefill rank 0"
    p.poll()
    assert (p.peers(), d.peers(), p.stats()["peers_replaced"]) == before
    # a named peer must be the one found there
    d2 = endpoint(plan, "decode", 0, engine="second")
    closing(d2)
    with pytest.raises(HandshakeError, match="expected agent 'someone-else'") as ei:
        d2.connect("127.0.0.1", p.listen_port, "someone-else")
    assert ei.value.field == "agent"
    assert d2.connect("127.0.0.1", p.listen_port, p.name) == "prefill rank 0"


def test_connect_with_keys(closing, plan):
    p = endpoint(plan, "prefill", listen_port=0, auth_key=KEY)
    good = endpoint(plan, "decode", 0, auth_key=KEY)
    wrong = endpoint(plan, "decode", 0, engine="w", auth_key="w" * 32)
    none = endpoint(plan, "decode", 0, engine="n")
    for ep in (p, good, wrong, none):
        closing(ep)
    for ep, match in ((wrong, "different auth keys"), (none, "requires an auth key")):
        with pytest.raises(HandshakeError, match=match):
            ep.connect("127.0.0.1", p.listen_port)
        assert ep.peers() == []
    assert p.peers() == []
    assert good.connect("127.0.0.1", p.listen_port) == "prefill rank 0"
    p.poll()
    assert [x.label for x in p.peers()] == ["decode rank 0"]


def test_connect_to_a_closed_port_fails_at_once(closing, plan):
    d = endpoint(plan, "decode")
    closing(d)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # (closed again before the connect)
    # a timeout far beyond the test's own limit: the refusal must come first
    with pytest.raises(HandshakeError, match="connection refused") as ei:
        d.connect("127.0.0.1", port, timeout_s=3600)
    assert ei.value.field == "connect"


def test_a_bogus_handshake_does_not_fail_wait_for_peers(closing, plan):
    """A stranger's refused handshake does not end the wait: the real peer still connects
    (at the timeout, the refusal is the error)."""
    p = endpoint(plan, "prefill", listen_port=0)
    other = compiled("vllm_flashinfer", 1, 1, dict(GQA4, head_dim=64))
    bad = endpoint(other, "decode", 0, engine="bad")
    good = endpoint(plan, "decode", 0)
    for ep in (p, bad, good):
        closing(ep)
    with pytest.raises(HandshakeError, match="params.head_dim"):
        bad.connect("127.0.0.1", p.listen_port)
    assert p.stats()["handshakes_refused"] == 1
    good.connect("127.0.0.1", p.listen_port)
    assert p.wait_for_peers(1, timeout_s=10) == ["decode rank 0"]
    with pytest.raises(HandshakeError, match="params.head_dim"):
        bad.connect("127.0.0.1", p.listen_port)
    with pytest.raises(HandshakeError, match=r"1 of 2 decode ranks connected .*params.head_dim"):
        p.wait_for_peers(2, timeout_s=0.5)


def test_nixl_listener_is_off_unless_asked_for(closing, plan, caplog):
    from layoutc.runtime import nixl_compat

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    port = ports[0]
    d = endpoint(plan, "decode")
    closing(d)
    # (NIXL fetches metadata between two listeners)
    stranger = nixl_compat.create_agent(f"stranger-{next(_names)}", listen_port=ports[1])
    # nothing of the endpoint listens for NIXL's metadata requests
    with caplog.at_level(logging.WARNING, logger="layoutc.runtime"):
        p = endpoint(plan, "prefill", nixl_listener=port)
    closing(p)
    assert "metadata listener is on" in caplog.text
    stranger.fetch_remote_metadata(p.name, "127.0.0.1", port)
    for _ in range(400):
        stranger.get_new_notifs()
        if stranger.check_remote_metadata(p.name):
            break
        __import__("time").sleep(0.01)
    assert stranger.check_remote_metadata(p.name)  # NIXL's listener handed it out, as warned
    assert not stranger.check_remote_metadata(d.name)


# ----------------------------------------------------------------------------- arguments
BAD_TIMEOUTS = [math.nan, math.inf, -math.inf, 0, -1.0, "soon", True, None]


@pytest.mark.parametrize("value", BAD_TIMEOUTS)
def test_timeouts_must_be_finite_and_positive(closing, plan, value):
    if value is not None:
        with pytest.raises(UsageError, match="finite number > 0"):
            Endpoint(plan, "decode", 0, name=f"t-{next(_names)}", timeout_s=value)
    if value is None:
        return
    p = endpoint(plan, "prefill", listen_port=0)
    d = endpoint(plan, "decode")
    closing(p), closing(d)
    calls = [
        lambda: d.expect("e", timeout_s=value),
        lambda: d.connect("127.0.0.1", p.listen_port, timeout_s=value),
        lambda: p.wait_for_peers(timeout_s=value),
    ]
    for call in calls:
        with pytest.raises(UsageError, match="finite number > 0"):
            call()
    d.add_peer(p.handshake_bytes())
    with pytest.raises(UsageError, match="finite number > 0"):
        d.pull("x", [0], [0], timeout_s=value)
    d.expect("w")
    with pytest.raises(UsageError, match="finite number > 0"):
        d.wait("w", timeout_s=value)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"name": b"bytes"}, "must be a str"),
        ({"name": "\udcff"}, "not valid UTF-8"),
        ({"name": "x" * 300}, "1 to 256 characters"),
        ({"name": ""}, "1 to 256 characters"),
        ({"name": "tab\there"}, "control characters"),
        ({"engine": "e\x00"}, "control characters"),
        ({"auth_key": "short"}, "at least 16 bytes"),
        ({"auth_key": 12345}, "must be str or bytes"),
        ({"listen_port": 70000}, "port number"),
        ({"listen_port": "80"}, "port number"),
        ({"nixl_listener": -1}, "port number"),
        ({"nixl_listener": "on"}, "port number"),
    ],
)
def test_bad_endpoint_arguments(plan, kw, match):
    kw.setdefault("name", f"a-{next(_names)}")
    with pytest.raises(UsageError, match=match):
        Endpoint(plan, "decode", 0, **kw)


def test_auth_key_from_the_environment(closing, plan, monkeypatch):
    monkeypatch.setenv(auth.KEY_ENV, KEY)
    p = endpoint(plan, "prefill")
    monkeypatch.delenv(auth.KEY_ENV)
    d = endpoint(plan, "decode")
    closing(p), closing(d)
    with pytest.raises(HandshakeError, match="this endpoint has none"):
        d.add_peer(p.handshake_bytes())
    keyed = endpoint(plan, "decode", 0, engine="k", auth_key=KEY)
    closing(keyed)
    assert keyed.add_peer(p.handshake_bytes()) == "prefill rank 0"


def test_meta_and_storage_less_tensors_are_refused(closing, plan):
    import torch

    nbytes = plan.decode.page("attention").buffer_bytes(4)
    for t, match in (
        (torch.empty(nbytes, dtype=torch.uint8, device="meta"), "meta device holds no memory"),
        (torch.zeros(nbytes, dtype=torch.uint8).to_sparse(), "register dense"),
    ):
        ep = Endpoint(plan, "decode", 0, name=f"m-{next(_names)}")
        closing(ep)
        with pytest.raises(UsageError, match=match):
            ep.register_layers([{"attention": t}])


def test_wait_for_peers_times_out_without_peers(closing, plan):
    p = endpoint(plan, "prefill", listen_port=0)
    closing(p)
    with pytest.raises(TransferTimeoutError, match="0 of 1 decode ranks connected"):
        p.wait_for_peers(timeout_s=0.2)
