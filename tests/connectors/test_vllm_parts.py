"""The vLLM connector's parts that need no vLLM: settings, request validation, the side
channel, payload checks, plans compiled in memory, the version gate."""

from __future__ import annotations

import math
import threading
import time

import pytest
from layoutc.connectors.vllm import SUPPORTED_VLLM
from layoutc.connectors.vllm.config import check_vllm_version, parse_settings
from layoutc.connectors.vllm.errors import (
    BadRequestError,
    ConfigError,
    SideChannelError,
    UnsupportedVllmError,
)
from layoutc.connectors.vllm.params import host_allowed, parse_remote
from layoutc.connectors.vllm.plans import SpecPlans
from layoutc.connectors.vllm.rounds import GroupRounds, Round, align
from layoutc.connectors.vllm.transport import (
    PAYLOAD_FORMAT,
    EndpointConfig,
    ExpectJob,
    FailJob,
    HeartbeatJob,
    PullJob,
    Results,
    Transport,
    check_payload,
)
from layoutc.runtime.errors import PlanError
from rt_workers import ranks_fixture  # noqa: F401 - the ranks fixture

pytestmark = pytest.mark.timeout(120)


def settings(**extra):
    return parse_settings(
        kv_role="kv_consumer",
        kv_buffer_device="cpu",
        extra=extra,
        failure_policy="fail",
        platform_device="cpu",
    )


# -- settings ------------------------------------------------------------------------------------


def test_settings_defaults_and_reports():
    s = settings(kv_lease_duration=12, backends=["UCX"], num_threads=8, layuot_spec="typo")
    assert (s.lease_s, s.enforce_compat, s.failure_policy) == (12, True, "fail")
    assert s.allowed_peers == ("127.0.0.1", "localhost", "::1")
    assert s.ignored == ("backends", "num_threads")
    assert s.unknown == ("layuot_spec",)
    assert s.is_consumer and not s.is_producer


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"kv_lease_duration": 0}, r"kv_lease_duration.*\[1, .*got 0"),
        ({"kv_lease_duration": "30"}, r"kv_lease_duration.*got '30'"),
        ({"enforce_handshake_compat": "no"}, r"enforce_handshake_compat.*got 'no'"),
        ({"allowed_peers": "127.0.0.1"}, r"allowed_peers.*got '127.0.0.1'"),
        ({"allowed_peers": [""]}, r"allowed_peers.*bad host ''"),
        ({"transfer_timeout_s": math.nan}, r"transfer_timeout_s.*got nan"),
        ({"strategy": "fast"}, r"strategy.*got 'fast'"),
        ({"layout_spec": ""}, r"layout_spec.*got ''"),
        ({"listen_port": 70000}, r"listen_port.*got 70000"),
        ({"auth_key": "short"}, r"auth_key'\] must be at least 16 bytes"),
    ],
)
def test_bad_settings_name_the_key_and_value(extra, match):
    with pytest.raises(ConfigError, match=match):
        settings(**extra)


def test_a_host_bounce_buffer_on_cuda_is_refused():
    with pytest.raises(ConfigError, match="host bounce buffer"):
        parse_settings(
            kv_role="kv_producer", kv_buffer_device="cpu", extra={}, failure_policy="fail",
            platform_device="cuda",
        )  # fmt: skip
    with pytest.raises(ConfigError, match="kv_role must be one of"):
        parse_settings(
            kv_role="producer", kv_buffer_device="cpu", extra={}, failure_policy="fail",
            platform_device="cpu",
        )  # fmt: skip


def test_only_the_supported_vllm_is_accepted():
    check_vllm_version("0.32.0")
    check_vllm_version("0.32.1+cpu")
    for other in ("0.33.0", "0.31.2", "1.0"):
        with pytest.raises(UnsupportedVllmError, match=rf"supports vLLM {SUPPORTED_VLLM}.*{other}"):
            check_vllm_version(other)


# -- kv_transfer_params ---------------------------------------------------------------------------

GOOD = {
    "do_remote_prefill": True,
    "remote_engine_id": "e-1",
    "remote_request_id": "r-1",
    "remote_host": "127.0.0.1",
    "remote_port": 5600,
    "tp_size": 2,
    "remote_block_ids": [[3, 4]],
    "remote_num_tokens": 200,
    "remote_blocks_expiry_time": 123.5,
}


def parse(**changes):
    return parse_remote(
        {**GOOD, **changes}, num_groups=1, allowed_hosts=("127.0.0.1", "localhost"), max_tokens=300
    )


def test_valid_params_parse():
    r = parse()
    assert (r.engine_id, r.port, r.tp_size, r.block_ids, r.expiry) == (
        "e-1", 5600, 2, ((3, 4),), 123.5,
    )  # fmt: skip


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"remote_host": "10.0.0.1"}, r"'10.0.0.1' is not an allowed peer"),
        ({"remote_host": "a b"}, r"not a host name"),
        ({"remote_port": "5600"}, r"remote_port.*got '5600'"),
        ({"remote_port": 0}, r"remote_port"),
        ({"tp_size": True}, r"tp_size.*got True"),
        ({"remote_block_ids": [[3, -1]]}, r"\[0\]\[1\] must be a block id.*got -1"),
        ({"remote_block_ids": [[3], [4]]}, r"list of 1 lists"),
        ({"remote_block_ids": "all"}, r"remote_block_ids"),
        ({"remote_block_ids": [[2**40]]}, r"must be a block id"),
        ({"remote_num_tokens": 301}, r"remote_num_tokens.*\[0, 300\]"),
        ({"remote_engine_id": ""}, r"remote_engine_id"),
        ({"remote_request_id": "x" * 300}, r"remote_request_id"),
        ({"remote_blocks_expiry_time": "soon"}, r"remote_blocks_expiry_time"),
        ({"dcp_size": 2}, r"dcp_size"),
        ({"do_remote_decode": True}, r"both do_remote_prefill and do_remote_decode"),
    ],
)
def test_bad_params_are_refused_naming_the_field(changes, match):
    with pytest.raises(BadRequestError, match=match):
        parse(**changes)


def test_params_must_be_a_dict_and_hosts_compare_as_addresses():
    with pytest.raises(BadRequestError, match="must be a dict"):
        parse_remote([1], num_groups=1, allowed_hosts=("*",), max_tokens=1)
    assert host_allowed("::1", ("0:0:0:0:0:0:0:1",))
    assert host_allowed("anything", ("*",))
    assert not host_allowed("localhost2", ("localhost",))


# -- side-channel payloads -----------------------------------------------------------------------

LOCAL = {"spec": "vllm_cpu_attn", "spec_sha256": "ab" * 32, "conv_layout": None, "compat_hash": "h"}
PAYLOAD = {
    "format": PAYLOAD_FORMAT,
    "engine_id": "e-1",
    "tp_size": 2,
    "tp_rank": 1,
    "agent": "e-1-p1",
    "host": "127.0.0.1",
    "port": 41000,
    "params": {"block_size": "128"},
    "lease_s": 30,
    "num_blocks": 4096,
    "block_size": 128,
    **LOCAL,
}


def check(payload, **kw):
    args = dict(
        engine_id="e-1", tp_size=2, tp_rank=1, local=LOCAL, allowed_hosts=("127.0.0.1",),
        enforce_compat=True,
    )  # fmt: skip
    args.update(kw)
    return check_payload(payload, **args)


def test_a_good_payload_passes():
    assert check(dict(PAYLOAD)) == PAYLOAD


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"conv_layout": "DS"}, r"conv state layout 'DS', expected None"),
        ({"compat_hash": "other"}, r"compatibility hash 'other', expected 'h'"),
        ({"engine_id": "e-2"}, r"engine id 'e-2', expected 'e-1'"),
        ({"tp_rank": 0}, r"TP rank 0, expected 1"),
        ({"host": "192.0.2.1"}, r"not an allowed peer"),
        ({"port": 0}, r"port 0"),
        ({"spec": "vllm_lbhnc"}, r"layout spec 'vllm_lbhnc'"),
        ({"params": {"block_size": 128}}, r"malformed spec parameters"),
        ({"lease_s": -1}, r"lease of -1"),
        ({"block_size": 0}, r"block size of 0"),
        ({"agent": ""}, r"'agent'"),
        ({"format": "nixl"}, r"payload format 'nixl'"),
    ],
)
def test_bad_payloads_are_refused(changes, match):
    with pytest.raises(SideChannelError, match=match):
        check({**PAYLOAD, **changes})
    with pytest.raises(SideChannelError, match="not an object"):
        check([PAYLOAD])


def test_compat_hash_is_not_enforced_when_turned_off():
    assert check({**PAYLOAD, "compat_hash": "other"}, enforce_compat=False)


# -- the side channel -------------------------------------------------------------------------------


def test_side_channel_serves_and_survives_bad_requests():
    pytest.importorskip("zmq")
    import socket

    import zmq
    from layoutc.connectors.vllm.side_channel import SideChannelServer, query

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seen = []

    def handler(msg):
        seen.append(msg)
        if msg.get("op") == "boom":
            raise RuntimeError("handler bug")
        if msg.get("op") == "nan-clock":
            return {"ok": True, "clock": float("nan")}
        if msg.get("op") != "meta":
            raise SideChannelError(f"unknown op {msg.get('op')!r}")
        return {"ok": True, "payload": {"x": 1}, "clock": 5.0}

    server = SideChannelServer("127.0.0.1", port, handler)
    try:
        reply, offset = query("127.0.0.1", port, {"op": "meta"}, 5.0)
        assert reply["payload"] == {"x": 1} and math.isfinite(offset)
        with pytest.raises(SideChannelError, match="unknown op 'hb'"):
            query("127.0.0.1", port, {"op": "hb"}, 5.0)
        with pytest.raises(SideChannelError, match="internal error: RuntimeError"):
            query("127.0.0.1", port, {"op": "boom"}, 5.0)
        with pytest.raises(SideChannelError, match="sent no clock"):
            query("127.0.0.1", port, {"op": "nan-clock"}, 5.0)
        # raw garbage from a REQ socket, then a frame that is no REQ at all
        ctx = zmq.Context.instance()
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.RCVTIMEO, 5000)
        req.connect(f"tcp://127.0.0.1:{port}")
        req.send(b"\xff\x00 not json")
        assert b"not a JSON message" in req.recv()
        req.close(0)
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(b"no empty delimiter")
        dealer.close(0)
        # still serving
        reply, _ = query("127.0.0.1", port, {"op": "meta"}, 5.0)
        assert reply["ok"] is True
        assert server.rejected >= 3
    finally:
        server.close()
    with pytest.raises(SideChannelError, match="no answer"):
        query("127.0.0.1", port, {"op": "meta"}, 0.3)


# -- plans compiled in memory --------------------------------------------------------------------


def test_plans_compile_on_demand_and_name_bad_pairs():
    plans = SpecPlans(
        "vllm_cpu_attn",
        {"num_key_value_heads": 6, "head_dim": 32, "kv_dtype": "fp32", "not_a_param": 1},
        role="decode",
    )
    assert "not_a_param" not in plans.params
    plan = plans.plan(2, 3)
    assert (plan.prefill_tp, plan.decode_tp) == (2, 3)
    assert plans.plan(2, 3) is plan  # cached
    with pytest.raises(PlanError, match="cannot be split over"):
        plans.plan(4, 3)
    errors = []

    def compile_pair(p):
        try:
            plans.plan(p, 1)
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=compile_pair, args=(p,)) for p in (1, 2, 3, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_spec_that_does_not_exist_or_has_errors_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such spec file or built-in spec"):
        SpecPlans("no_such_spec", {}, role="decode")
    bad = tmp_path / "bad.layout"
    bad.write_text("param x: int\nstate s : fp32 { d x split tp }\npage p = [s]\nlayer l = [q]\n")
    with pytest.raises(ConfigError, match=r"bad\.layout:4:\d+: error"):
        SpecPlans(str(bad), {"x": 4}, role="decode")
    plans = SpecPlans("vllm_cpu_attn", {}, role="decode")
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        plans.check_bindable(1)


# -- per-group block ids: rounds and prefix-cache alignment -----------------------------------


def test_groups_of_one_kind_make_rounds():
    r = GroupRounds.of(
        ("mamba", "mamba", "attention"), [[0, 3], [2, 5], [1, 4]], frozenset({"attention"})
    )
    assert r.rounds == ((0, 2), (1,))
    assert r.layers == ((0, 1, 3, 4), (2, 5))
    rounds = r.make("e:q", [[7], [8], [1, 2]], [[3], [4], [5, 6]])
    assert [x.rid for x in rounds] == ["e:q", "e:q#1"]
    assert rounds[0].local == {"mamba": [7], "attention": [1, 2]}
    assert rounds[1].remote == {"mamba": [4]}
    single = GroupRounds.of(("attention",), [[0, 1]], frozenset({"attention"}))
    assert single.layers == (None,) and [x.rid for x in single.make("x", [[1]])] == ["x"]


def test_align_pairs_block_ids_as_vllm_does():
    kinds, tok = ("mamba", "attention"), frozenset({"attention"})
    # decode's prefix cache holds the first 2 blocks: the prefill list is end-trimmed
    assert align([[9], [5, 6]], [[1], [2, 3, 4, 7]], kinds, tok) == ([[9], [5, 6]], [[1], [4, 7]])
    # decode holds one block more (the token it recomputes): cut
    assert align([[9], [5, 6, 8]], [[1], [2, 3]], kinds, tok) == ([[9], [5, 6]], [[1], [2, 3]])
    # a full prefix hit / an aborted request: nothing moves
    assert align([], [[1], [2]], kinds, tok) == ([[], []], [[], []])
    with pytest.raises(BadRequestError, match="4 blocks to fill here but the prefill holds 2"):
        align([[9], [5, 6, 8, 10]], [[1], [2, 3]], kinds, tok)
    with pytest.raises(BadRequestError, match="3 state blocks for a mamba group"):
        align([[9], [5]], [[1, 2, 3], [4]], kinds, tok)
    with pytest.raises(BadRequestError, match="1 local block groups for 2 remote"):
        align([[9]], [[1], [4]], kinds, tok)


# -- the transfer thread: failures end requests, never leave them waiting ----------------------


def _transport(query_fn):
    return Transport(
        [], local=LOCAL, plans=None, tp_rank=0, tp_size=1, allowed_hosts=("127.0.0.1",),
        rounds=GroupRounds.of(("attention",), [[0]], frozenset({"attention"})), block_size=128,
        enforce_compat=True, handshake_timeout_s=1.0, transfer_timeout_s=1.0,
        lease_margin_s=0.0, expect_timeout_s=10.0, query_fn=query_fn,
    )  # fmt: skip


def _pull_job(req_id, report=True):
    remote = parse(remote_request_id=f"p-{req_id}")
    return PullJob(req_id, remote, ((1, 2),), (0,), report)


def _drain_until(t, check, timeout=10.0):
    end = time.monotonic() + timeout
    got = Results()
    while time.monotonic() < end:
        r = t.drain()
        got.recv_done |= r.recv_done
        got.recv_failed.update(r.recv_failed)
        got.send_done |= r.send_done
        got.failed_handshakes += r.failed_handshakes
        if check(got):
            return got
        time.sleep(0.01)
    raise AssertionError(f"not reported within {timeout} s: {got}")


def test_a_failed_handshake_fails_its_requests_only_if_awaited():
    def refuse(host, port, msg, timeout):
        raise SideChannelError("nobody home")

    t = _transport(refuse)
    try:
        t.submit(_pull_job("a"))
        t.submit(_pull_job("b", report=False))  # notify-only: nothing waits for it
        t.submit(FailJob("c", "bad params"))
        got = _drain_until(t, lambda g: {"a", "c"} <= g.recv_done)
        assert "nobody home" in got.recv_failed["a"] and got.recv_failed["c"] == "bad params"
        assert "b" not in got.recv_done and got.failed_handshakes == 1
    finally:
        t.close()


def test_a_bug_ends_its_requests_and_the_thread_goes_on():
    def bug(host, port, msg, timeout):
        raise RuntimeError("a bug")

    t = _transport(bug)
    try:
        t.submit(_pull_job("a"))
        t.submit(ExpectJob("s", (Round("x:s", {}, {}, None),)))  # no prefill endpoint here
        got = _drain_until(t, lambda g: "a" in g.recv_done and "s" in g.send_done)
        assert got.recv_failed["a"].endswith("failed: a bug")
        assert t.alive
    finally:
        t.close()


def test_a_dead_thread_ends_every_pending_request():
    def fatal(host, port, msg, timeout):
        raise SystemExit("the thread must not survive this")

    t = _transport(fatal)
    try:
        t.submit(_pull_job("a"))
        got = _drain_until(t, lambda g: "a" in g.recv_done)
        assert "transfer thread failed" in got.recv_failed["a"]
        assert not t.alive
    finally:
        t.close()


CPU_ATTN = {"num_key_value_heads": 2, "head_dim": 32, "kv_dtype": "fp32", "block_size": 16,
            "kernel_blocks": 1, "num_layers": 2}  # fmt: skip


def test_no_job_is_left_waiting_when_its_prefill_dies_mid_batch(ranks):
    """A real prefill rank (a worker process) serves one load, then is killed.  The next
    loads come in one batch: the first is posted before anyone knows, a later one fails to
    post (the engine's connection is given up and a new handshake starts), and the first
    one's failure is seen only after that.  Every load ends, failed -- none waits for ever
    on the handshake its predecessor's failure must not touch."""
    from layoutc.runtime.endpoint import allocate_buffers, layer_kind_sequence

    plans = SpecPlans("vllm_cpu_attn", CPU_ATTN, role="decode")
    plan = plans.plan(1, 1)
    kinds = layer_kind_sequence(plan, 2)
    pre = ranks.rank(plan, "prefill", 0, num_blocks=16, listen_port=0, engine="e-1", name="e-1-p0")
    payload = dict(PAYLOAD, tp_size=1, tp_rank=0, agent=pre.call("agent_name"),
                   port=pre.call("port"), params=dict(plans.params), block_size=16)  # fmt: skip
    failed_seen = threading.Event()
    queries = []

    def query(host, port, msg, timeout):
        queries.append(msg)
        if len(queries) == 1:
            return {"payload": payload}, 0.0
        failed_seen.wait(timeout)  # a new handshake still runs when the failures are seen
        raise SideChannelError("nobody home")

    config = EndpointConfig(
        role="decode", plans=plans, rank=0, tp=1, name="d-0", engine="d", device="cpu",
        listen_port=0, buffers=allocate_buffers(plan, "decode", kinds, 16, "cpu"), kinds=kinds,
        timeout_s=10.0, strategy="zero-copy",
    )  # fmt: skip
    t = Transport(
        [config], local=LOCAL, plans=plans, tp_rank=0, tp_size=1, allowed_hosts=("127.0.0.1",),
        rounds=GroupRounds.of(("attention",), [[0, 1]], frozenset({"attention"})), block_size=16,
        enforce_compat=True, handshake_timeout_s=20.0, transfer_timeout_s=10.0,
        lease_margin_s=0.0, expect_timeout_s=10.0, query_fn=query,
    )  # fmt: skip

    def job(rid, blocks):
        remote = parse(remote_request_id=f"p-{rid}", tp_size=1, remote_block_ids=[blocks],
                       remote_num_tokens=16 * len(blocks), remote_blocks_expiry_time=None)  # fmt: skip
        return PullJob(rid, remote, (tuple(blocks),), (0,), True)

    try:
        t.submit(job("a", [1, 2]))
        got = _drain_until(t, lambda g: "a" in g.recv_done, timeout=30)
        assert "a" not in got.recv_failed, got.recv_failed
        pre.kill()
        late = [f"late-{i}" for i in range(6)]
        for i, rid in enumerate(late):
            t.submit(job(rid, [3 + i]))

        def seen(g):
            if len(g.recv_failed) >= 2:
                failed_seen.set()
            return set(late) <= g.recv_done

        got = _drain_until(t, seen, timeout=60)
        assert set(got.recv_failed) == set(late), got
        assert len(queries) >= 2  # the engine was handshaken again
    finally:
        failed_seen.set()
        t.close()


def test_queued_requests_of_an_engine_not_met_yet_are_renewed():
    """A request can wait in decode's queue before the first load from its prefill engine:
    its lease is renewed over that engine's side channel all the same, and the answer kept
    (deadlines of the requests asked about, later ones only, numbers only)."""
    asked = []

    def side_channel(host, port, msg, timeout):
        asked.append((host, port, msg))
        return {"ok": True, "leases": {"r-1": 50.0, "r-2": True, "other": 99.0}}, 7.0

    t = _transport(side_channel)
    try:
        t.submit(HeartbeatJob("e-new", "127.0.0.1", 5600, ("r-1", "r-2")))
        _drain_until(t, lambda g: t.leases.deadline("e-new", "r-1") is not None)
        assert asked == [("127.0.0.1", 5600, {"op": "hb", "req": ["r-1", "r-2"]})]
        assert t.leases.offset("e-new") == 7.0
        assert t.leases.deadline("e-new", "r-2") is None  # not a number
        assert t.leases.deadline("e-new", "other") is None  # not asked about
    finally:
        t.close()


def test_leases_keep_the_latest_deadline_and_stay_bounded(monkeypatch):
    from layoutc.connectors.vllm import leases as leases_mod

    monkeypatch.setattr(leases_mod, "MAX_PER_ENGINE", 3)
    monkeypatch.setattr(leases_mod, "MAX_ENGINES", 2)
    ls = leases_mod.Leases()
    assert ls.renewed("e", 0.0, {"a": 10.0}, {"a"}) == 1
    ls.renewed("e", 0.5, {"a": 5.0, "b": 1.0, "c": 2.0, "d": 3.0}, {"a", "b", "c", "d"})
    assert ls.deadline("e", "a") == 10.0 and ls.offset("e") == 0.5
    assert ls.deadline("e", "b") is None  # the earliest deadline went first
    assert ls.renewed("e", 0.5, {"c": math.nan, "d": math.inf}, {"c", "d"}) == 0
    assert (ls.deadline("e", "c"), ls.deadline("e", "d")) == (2.0, 3.0)
    assert ls.take("e", "a") == 10.0
    assert ls.deadline("e", "a") is None and ls.take("e", "a") is None
    ls.renewed("f", 1.0, {}, set())
    ls.renewed("g", 2.0, {}, set())
    assert ls.offset("e") is None and ls.deadline("e", "c") is None  # the oldest engine went


def test_heartbeat_bookkeeping_stays_bounded_under_many_engine_ids(monkeypatch):
    """Engine ids come from requests' kv_transfer_params: renewals to ever new ones (none
    answering) keep at most MAX_ENGINES failing engines, and of the send times only those
    that still hold a renewal back."""
    from layoutc.connectors.vllm import transport as transport_mod

    monkeypatch.setattr(transport_mod, "MAX_ENGINES", 4)

    def refuse(host, port, msg, timeout):
        raise SideChannelError("nobody home")

    t = _transport(refuse)

    def settled():
        t.call(lambda eps: None)  # every job submitted so far handled
        end = time.monotonic() + 10
        while t._hb_busy and time.monotonic() < end:  # the renewals answered (refused)
            time.sleep(0.01)

    try:
        for i in range(12):
            t.submit(HeartbeatJob(f"e-{i}", "127.0.0.1", 5600, ("r",)))
        settled()
        assert len(t._hb_trouble) == 4
        time.sleep(transport_mod.HEARTBEAT_MIN_INTERVAL_S + 0.05)
        t.submit(HeartbeatJob("e-last", "127.0.0.1", 5600, ("r",)))
        settled()
        assert list(t._hb_sent) == ["e-last"]
        assert len(t._hb_trouble) == 4 and "e-last" in t._hb_trouble
    finally:
        t.close()
