"""Handshake validation and request validation: refused before any byte moves.

Real NIXL agents in this process (no data moves in these tests, so no second process is
needed); every refusal must name the field and both values, and leave nothing loaded.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
from layoutc.compiler.api import compile_plan
from layoutc.runtime.endpoint import Endpoint, allocate_buffers, layer_kind_sequence
from layoutc.runtime.errors import (
    BlockIdError,
    HandshakeError,
    PeerNotConnectedError,
)
from rt_local import closing_fixture, endpoint  # noqa: F401 (`closing`)
from rt_plans import GQA4, HYBRID, SPECS, compiled

pytestmark = pytest.mark.timeout(60)
_names = itertools.count()


def refused(local: Endpoint, peer: Endpoint) -> HandshakeError:
    with pytest.raises(HandshakeError) as ei:
        local.add_peer(peer.handshake_bytes())
    assert local.peers() == []
    assert not local.agent.check_remote_metadata(peer.name)  # nothing loaded
    return ei.value


def test_matching_sides_connect(closing):
    plan = compiled("vllm_flashinfer", 2, 4, GQA4)
    p, d = endpoint(plan, "prefill", 1), endpoint(plan, "decode", 3)
    closing(p), closing(d)
    assert d.add_peer(p.handshake_bytes()) == "prefill rank 1"
    assert p.add_peer(d.handshake_bytes()) == "decode rank 3"
    assert d.agent.check_remote_metadata(p.name)


def test_spec_sha_mismatch(closing):
    text = (SPECS / "vllm_flashinfer.layout").read_text()
    a = compile_plan(text, 2, 4, GQA4)
    b = compile_plan(text + "\n# another revision of the spec\n", 2, 4, GQA4)
    assert a.spec_sha256 != b.spec_sha256
    p, d = endpoint(a, "prefill", 0), endpoint(b, "decode", 1)
    closing(p), closing(d)
    e = refused(d, p)
    msg = str(e)
    assert msg.startswith("decode rank 1: prefill rank 0 has spec sha256 ")
    assert a.spec_sha256[:12] in msg and b.spec_sha256[:12] in msg
    assert "this plan was compiled from" in msg
    assert e.field == "spec sha256"
    refused(p, d)


def test_tp_mismatch(closing):
    p = endpoint(compiled("vllm_flashinfer", 2, 4, GQA4), "prefill", 0)
    d = endpoint(compiled("vllm_flashinfer", 4, 4, GQA4), "decode", 0)
    closing(p), closing(d)
    msg = str(refused(d, p))
    assert "prefill rank 0 has prefill TP 2 but this plan is for 4" in msg


def test_param_mismatch_names_both_values(closing):
    p = endpoint(compiled("vllm_flashinfer", 2, 2, GQA4), "prefill", 0)
    d = endpoint(compiled("vllm_flashinfer", 2, 2, dict(GQA4, head_dim=64)), "decode", 0)
    closing(p), closing(d)
    assert "prefill rank 0 has params.head_dim 32 but this plan expects 64" in str(refused(d, p))
    assert "decode rank 0 has params.head_dim 64 but this plan expects 32" in str(refused(p, d))


def test_page_stride_and_kernel_blocks_mismatch(closing):
    plan = compiled("vllm_flashinfer", 2, 2, GQA4)
    page = plan.prefill.pages[0]
    wider = dataclasses.replace(page, kernel_stride=page.kernel_stride + 64)
    other = dataclasses.replace(plan, prefill=dataclasses.replace(plan.prefill, pages=(wider,)))
    p, d = endpoint(plan, "prefill", 0), endpoint(other, "decode", 0)
    closing(p), closing(d)
    msg = str(refused(d, p))
    assert (
        f"page 'attention' kernel_stride {page.kernel_stride} but this plan expects "
        f"{page.kernel_stride + 64}"
    ) in msg
    kb = dataclasses.replace(plan, prefill=dataclasses.replace(plan.prefill, kernel_blocks=2))
    d2 = endpoint(kb, "decode", 1)
    closing(d2)
    assert "kernel_blocks (kernel blocks per logical block) 1 but this plan expects 2" in str(
        refused(d2, p)
    )


def test_layer_count_and_kind_mismatch(closing):
    plan = compiled("vllm_hybrid_mamba2", 1, 2, HYBRID)
    p = endpoint(plan, "prefill", 0, kinds=["attention", "mamba"])
    d3 = endpoint(plan, "decode", 0, kinds=["attention", "mamba", "mamba"])
    swapped = endpoint(plan, "decode", 1, kinds=["mamba", "attention"])
    closing(p), closing(d3), closing(swapped)
    assert "prefill rank 0 has layer count 2 but this endpoint registered 3" in str(refused(d3, p))
    assert "prefill rank 0 has layer 0 kind 'attention' but this endpoint has 'mamba'" in str(
        refused(swapped, p)
    )


def test_role_rank_and_garbage(closing):
    plan = compiled("vllm_flashinfer", 2, 2, GQA4)
    p0, p1 = endpoint(plan, "prefill", 0), endpoint(plan, "prefill", 1)
    d = endpoint(plan, "decode", 0)
    closing(p0), closing(p1), closing(d)
    assert "is a prefill rank, but a prefill endpoint only talks to decode ranks" in str(
        refused(p0, p1)
    )
    with pytest.raises(HandshakeError, match="not a layoutc handshake"):
        d.add_peer(b"garbage")
    with pytest.raises(HandshakeError, match="not a layoutc handshake"):
        d.add_peer(p0.agent.get_agent_metadata())  # raw NIXL metadata without the header
    big = endpoint(compiled("vllm_flashinfer", 4, 2, GQA4), "prefill", 3)
    closing(big)
    assert "has prefill TP 4 but this plan is for 2" in str(refused(d, big))


def test_endpoint_argument_errors():
    plan = compiled("vllm_flashinfer", 2, 4, GQA4)
    with pytest.raises(ValueError, match="role must be"):
        Endpoint(plan, "middle", 0)
    with pytest.raises(ValueError, match="decode rank 4 out of range for decode TP 4"):
        Endpoint(plan, "decode", 4)
    ep = Endpoint(plan, "decode", 0, name=f"args-{next(_names)}")
    try:
        with pytest.raises(RuntimeError, match="register_layers"):
            ep.handshake_bytes()
        buf = allocate_buffers(plan, "decode", ["attention"], 4)
        with pytest.raises(ValueError, match="not contiguous"):
            ep.register_layers([{"attention": buf[0]["attention"].view(-1, 2)[:, 0]}])
        with pytest.raises(ValueError, match="smaller than one logical block"):
            ep.register_layers([{"attention": buf[0]["attention"][:10]}])
        with pytest.raises(ValueError, match="match no layer kinds"):
            ep.register_layers([{"nope": buf[0]["attention"]}])
        with pytest.raises(RuntimeError, match="pull\\(\\) is for decode ranks"):
            Endpoint(plan, "prefill", 0, name=f"args-{next(_names)}").pull("r", [], [])
    finally:
        ep.close()


# ----------------------------------------------------------------------------- block ids
@pytest.fixture
def pair(closing):
    plan = compiled("vllm_flashinfer", 1, 2, GQA4)
    p = endpoint(plan, "prefill", 0, num_blocks=10)
    d0 = endpoint(plan, "decode", 0, num_blocks=8)
    d = endpoint(plan, "decode", 1, num_blocks=6)
    closing(p), closing(d0), closing(d)
    for x in (d0, d):
        x.add_peer(p.handshake_bytes())
        p.add_peer(x.handshake_bytes())
    return p, d


@pytest.mark.parametrize(
    "local, remote, message",
    [
        ([0, 1, 2], [0, 1, 10], "remote (prefill) block ids out of range [0, 10): 10 (at 2)"),
        ([0, -1, 2], [0, 1, 2], "local (decode) block ids out of range [0, 6): -1 (at 1)"),
        ([0, 6, 7], [0, 1, 2], "local (decode) block ids out of range [0, 6): 6 (at 1), 7 (at 2)"),
        ([0, 1], [0, 1, 2], "wrong count of block ids: 2 local (decode) block ids but 3 remote"),
        (
            [3, 1, 3],
            [0, 1, 2],
            "local (decode) block ids repeat (two blocks would land in one): 3 (at 2)",
        ),
        ([0.5, 1.0], [0, 1], "block ids must be integers, got dtype float64"),
        ([[0, 1]], [[0, 1]], "block ids must be a 1-D sequence"),
    ],
)
def test_bad_block_ids_rejected_before_posting(pair, local, remote, message):
    p, d = pair
    with pytest.raises(BlockIdError) as ei:
        d.pull("req-7", local, remote)
    assert message in str(ei.value)
    assert str(ei.value).startswith("decode rank 1: request 'req-7': ")
    assert ei.value.request_id == "req-7"
    st = d.stats()
    assert st["descriptors_posted"] == 0 and st["xfer_handles_created"] == 0
    assert d.status("req-7") == "unknown"  # the id was not consumed


def test_push_rejects_bad_decode_ids_naming_the_peer(pair):
    p, d = pair
    with pytest.raises(BlockIdError) as ei:
        p.push("w", [0, 1], [5, 6])
    # decode rank 0 holds 8 blocks, rank 1 only 6: the error names the peer that cannot
    assert "remote (decode) block ids out of range [0, 6): 6 (at 1)" in str(ei.value)
    assert ei.value.peer == "decode rank 1"
    assert p.stats()["xfer_handles_created"] == 0


def test_missing_peer_and_bad_layers(closing):
    plan = compiled("vllm_flashinfer", 2, 2, GQA4)
    p0 = endpoint(plan, "prefill", 0)
    d = endpoint(plan, "decode", 0)
    closing(p0), closing(d)
    with pytest.raises(PeerNotConnectedError, match="prefill rank 0 is not connected"):
        d.pull("a", [0], [0])
    d.add_peer(p0.handshake_bytes())
    with pytest.raises(ValueError, match=r"layers \[5\] out of range \[0, 2\)"):
        d.pull("a", [0], [0], layers=[0, 5])
    d.expect("x")  # a decode rank expects requests in push mode
    with pytest.raises(ValueError, match="request id 'x' is already in use"):
        d.expect("x")


def test_descriptor_indices_match_a_per_block_loop(closing):
    """The vectorized request path equals the obvious per-block loop over the same rows."""
    plan = compiled("vllm_hybrid_mamba2", 2, 4, HYBRID)
    p = endpoint(plan, "prefill", 1, layers=4, num_blocks=20)
    d = endpoint(plan, "decode", 2, layers=4, num_blocks=16)
    closing(p), closing(d)
    label = d.add_peer(p.handshake_bytes())
    table = d.descriptor_table(label)
    rng = np.random.default_rng(1)
    lb, rb = rng.permutation(16)[:7], rng.permutation(20)[:7]
    for layers in (None, np.array([1, 3])):
        li, ri, nbytes = table.indices(lb, rb, table.rows_for_layers(layers))
        want_l, want_r, want_b = [], [], 0
        for row in range(table.num_rows):
            if layers is not None and table.row_layer[row] not in layers:
                continue
            for a, b in zip(lb, rb):
                want_l.append(int(table.local_row_start[row]) + int(a))
                want_r.append(int(table.remote_row_start[row]) + int(b))
                want_b += int(table.row_nbytes[row])
        assert li.tolist() == want_l and ri.tolist() == want_r and nbytes == want_b
    # and each descriptor row addresses the planned run of its (layer, page)
    runs = plan.rank(2).runs("attention", 1)
    first = table.local_rows[0]
    seg = d.pages.segments[(0, "attention")]
    assert int(first[0]) == seg.addr + int(runs.decode_offset[0])
    assert int(first[1]) == int(runs.nbytes[0])
    assert int(first[3]) == plan.decode.page("attention").logical_stride


def test_runtime_imports_no_compiler_dependencies():
    import subprocess
    import sys

    code = (
        "import sys, layoutc.runtime.endpoint, layoutc.runtime.staged, layoutc.runtime.tags, "
        "layoutc.runtime.handshake, layoutc.runtime.protocol; "
        "bad = [m for m in ('lark', 'jinja2', 'layoutc.compiler') if m in sys.modules]; "
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_allocate_buffers_sizes():
    plan = compiled("vllm_hybrid_mamba2", 2, 4, HYBRID)
    bufs = allocate_buffers(plan, "decode", ["attention", "mamba"], 5)
    assert bufs[0]["attention"].numel() == plan.decode.page("attention").buffer_bytes(5)
    assert bufs[1]["mamba"].numel() == plan.decode.page("mamba").buffer_bytes(5)
    with pytest.raises(Exception, match="no layer kind 'conv'"):
        allocate_buffers(plan, "decode", ["conv"], 5)


assert Path  # (imported for SPECS users)


def test_missing_nixl_gives_an_install_hint():
    import subprocess
    import sys

    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('nixl', 'nixl_cu13', 'nixl_cu12'):
            raise ImportError('blocked for the test: ' + name)
sys.meta_path.insert(0, Block())
from layoutc.runtime import nixl_compat
try:
    nixl_compat.create_agent('x')
except nixl_compat.NixlMissingError as e:
    print(e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("NIXL is not installed: install layoutc[cpu]"), r.stdout
    assert "nixl_cu13" in r.stdout


def test_any_dtype_registers_by_bytes(closing):
    import torch

    plan = compiled("vllm_flashinfer", 1, 2, GQA4)
    p = endpoint(plan, "prefill", 0, layers=1, num_blocks=4)
    closing(p)
    d = Endpoint(plan, "decode", 0, name=f"dtype-{next(_names)}")
    closing(d)
    nbytes = plan.decode.page("attention").buffer_bytes(6)
    t = torch.zeros(nbytes // 2, dtype=torch.bfloat16)
    d.register_layers([{"attention": t}])
    assert d.num_blocks == 6 and d.stats()["registered_bytes"] == nbytes
    assert d.add_peer(p.handshake_bytes()) == "prefill rank 0"


def test_peer_with_this_endpoints_own_agent_name_is_refused(closing):
    """Both engines left at the default engine id name their rank-0 agents alike; NIXL would
    confuse the two, so the handshake refuses with the fix in the message."""
    plan = compiled("vllm_flashinfer", 1, 1, GQA4)
    kinds = layer_kind_sequence(plan, 2)
    eps = []
    for role in ("prefill", "decode"):
        ep = Endpoint(plan, role, 0, name=f"same-{next(_names)}" if not eps else eps[0].name)
        ep.register_layers(allocate_buffers(plan, role, kinds, 8), kinds)
        closing(ep)
        eps.append(ep)
    p, d = eps
    with pytest.raises(HandshakeError) as ei:
        d.add_peer(p.handshake_bytes())
    assert "own agent name" in str(ei.value) and "engine=" in str(ei.value)
    assert ei.value.field == "agent" and d.peers() == []


@pytest.mark.parametrize("device", ["tpu", "cuda:", "cuda:one", "cuda:-1", "gpu:0"])
def test_endpoint_refuses_unknown_devices(device):
    plan = compiled("vllm_flashinfer", 1, 1, GQA4)
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        Endpoint(plan, "decode", 0, name=f"dev-{next(_names)}", device=device)
