"""The plans an endpoint may use (``PlanSet``), without NIXL: which plan a peer gets, and
what is refused."""

from __future__ import annotations

import pytest
from layoutc.compiler.cli import main as compile_main
from layoutc.runtime.endpoint.plans import MAX_PEER_PLANS, PlanSet
from layoutc.runtime.errors import HandshakeError, PlanError, UsageError
from rt_plans import GQA4, HYBRID, SPECS, PeerValuePlans


def _module(tmp_path, pairs: str):
    """A real generated module of the flashinfer spec for ``pairs``."""
    import importlib.util

    sets = [x for k, v in GQA4.items() for x in ("--set", f"{k}={v}")]
    spec = str(SPECS / "vllm_flashinfer.layout")
    assert compile_main(["compile", spec, "-o", str(tmp_path), *sets, "--tp-pairs", pairs]) == 0
    loader = importlib.util.spec_from_file_location("fi_plans", tmp_path / "vllm_flashinfer.py")
    mod = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(mod)
    return mod


def test_a_module_serves_every_compiled_peer_tp_and_names_the_missing_pair(tmp_path):
    mod = _module(tmp_path, "1:2,4:2,2:4,1:4")
    ps = PlanSet(mod, "decode", 2)
    assert ps.for_peer(1, "p").prefill_tp == 1 and ps.for_peer(4, "p").prefill_tp == 4
    with pytest.raises(HandshakeError, match="--tp-pairs 1:2,1:4,2:2,2:4,4:2"):
        ps.for_peer(2, "p")
    with pytest.raises(HandshakeError, match="not a TP size"):
        ps.for_peer(True, "p")
    with pytest.raises(PlanError, match="no plan was compiled for decode TP 8"):
        PlanSet(mod, "decode", 8)
    with pytest.raises(UsageError, match="pass tp="):
        PlanSet(mod, "decode", None)


def test_plans_per_peer_values_are_checked_and_bounded():
    src = PeerValuePlans(
        "vllm_hybrid_mamba2", "decode", HYBRID, {"block_size": 48}, ("block_size",)
    )
    ps = PlanSet(src, "decode", 2)
    plan = ps.for_peer(1, "p", {**dict(ps.local.params), "block_size": 16})
    assert plan.remap is not None and plan.prefill.params != plan.decode.params
    assert ps.for_peer(1, "p", {**dict(ps.local.params), "block_size": 16}) is plan  # kept
    with pytest.raises(HandshakeError, match="announced no spec parameters"):
        ps.for_peer(1, "p", None)
    with pytest.raises(HandshakeError, match="no plan for its values"):
        ps.for_peer(1, "p", {**dict(ps.local.params), "block_size": 0})  # no such block size
    for bs in range(1, 200):  # distinct values: at most MAX_PEER_PLANS plans are made
        try:
            ps.for_peer(1, "p", {**dict(ps.local.params), "block_size": 16 * bs})
        except HandshakeError as e:
            if "refusing more" in str(e):
                break
    else:
        raise AssertionError("no bound on plans for peer values")
    assert len(src.asked) <= MAX_PEER_PLANS + 2
