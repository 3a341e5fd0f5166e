"""LayoutcConnector's vLLM-free part on KV caches shaped and strided exactly as vLLM 0.32
allocates them (see ``vllm_layouts``): FlashAttention/FlashInfer pages in LBHNC on GPUs, MLA,
a hybrid Mamba2 model (DS conv layout, Mamba and attention groups aliasing one buffer), and
the CPU backend's page.

The transfer tests run one process per engine rank with a real Endpoint over NIXL: prefill
and decode at different TP sizes, pull and push, every byte of every decode region checked
against its logical identity.  ``cpu`` always runs; ``cuda`` (marked ``gpu``) runs where a
GPU is: the same code on VRAM, no vLLM and no network needed.
"""

from __future__ import annotations

import dataclasses

import pytest
from layoutc.connectors.vllm.errors import ConfigError, LayoutMismatchError
from layoutc.connectors.vllm.plans import SpecPlans
from layoutc.connectors.vllm.spec_choice import choose_spec
from layoutc.connectors.vllm.tensors import wrap
from layoutc.runtime.endpoint import kind_pages
from layoutc.tools.harness import Worker
from vllm_layouts import CASES, vllm_cache

pytestmark = pytest.mark.timeout(600)


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


GPU = [pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")]

# (case, prefill TP, decode TP, devices)
PAIRS = [
    ("flash", 2, 1),
    ("flash", 1, 2),
    ("mla", 2, 1),
    ("hybrid", 1, 2),
    ("hybrid_groups", 2, 1),
    ("cpu_attn", 2, 1),
]
PARAMS = [
    pytest.param(case, p, d, dev, id=f"{case}-P{p}D{d}-{dev}", marks=GPU if dev == "cuda" else [])
    for case, p, d in PAIRS
    for dev in (("cpu",) if case == "cpu_attn" else ("cpu", "cuda"))
]

NUM_BLOCKS = 12
# per request and side: block ids per Mamba group (their first blocks) and for the attention
# group; scattered, and disjoint within a side (one block pool serves every group)
PREFILL_IDS = [([11, 6], [5, 2, 9]), ([4, 3], [0, 7])]
DECODE_IDS = [([10, 8], [7, 3, 1]), ([0, 2], [4, 11])]


def _groups(case: str, ids: tuple[list[int], list[int]]) -> list[list[int]]:
    """Block ids per transfer group of ``case`` (Mamba groups first, as vLLM orders them)."""
    c = CASES[case]
    mamba = [[b] for b in ids[0][: c.mamba_groups]] if c.mamba else []
    return [*mamba, ids[1]]


@pytest.fixture(scope="module")
def workers():
    """Worker processes for the module, reused across tests (an endpoint each per test)."""
    pool: dict[str, list[Worker]] = {}

    def take(device: str, n: int) -> list[Worker]:
        have = pool.setdefault(device, [])
        while len(have) < n:
            dev = "cpu" if device == "cpu" else "cuda:0"
            have.append(Worker("vllm_ranks:VllmRank", label=f"rank on {device}", device=dev))
        return have[:n]

    yield take
    for ws in pool.values():
        for w in ws:
            w.stop()


@pytest.mark.parametrize("mode", ["pull", "push"])
@pytest.mark.parametrize("case,ptp,dtp,device", PARAMS)
def test_transfer_between_vllm_shaped_caches(workers, case, ptp, dtp, device, mode):
    ws = workers(device, ptp + dtp)
    pre, dec = ws[:ptp], ws[ptp:]
    for r, w in enumerate(pre):
        w.send("setup", case, "prefill", r, ptp, dtp, NUM_BLOCKS, device)
    for r, w in enumerate(dec):
        w.send("setup", case, "decode", r, ptp, dtp, NUM_BLOCKS, device)
    specs = {w.result(180, "setup") for w in ws}
    assert len(specs) == 1
    try:
        hp = [w.call("handshake_bytes") for w in pre]
        hd = [w.call("handshake_bytes") for w in dec]
        for w in pre:
            for h in hd:
                w.call("add_peer", h)
        for w in dec:
            for h in hp:
                w.call("add_peer", h)
        pb = [_groups(case, x) for x in PREFILL_IDS]
        db = [_groups(case, x) for x in DECODE_IDS]
        for w in pre:
            for i, blocks in enumerate(pb):
                w.call("tag", i, blocks)
        initiators, passive = (dec, pre) if mode == "pull" else (pre, dec)
        for w in passive:
            for i in range(len(pb)):
                w.call("expect_rounds", f"r{i}", pb[i] if w in pre else None)
        for w in initiators:
            for i in range(len(pb)):
                local, remote = (db[i], pb[i]) if mode == "pull" else (pb[i], db[i])
                rounds = w.call("start", mode, f"r{i}", local, remote)
                assert rounds == (CASES[case].mamba_groups if CASES[case].mamba else 1)
        for w in ws:
            for i in range(len(pb)):
                w.call("wait_rounds", f"r{i}")
        checked = sum(w.call("verify", list(enumerate(db))) for w in dec)
        assert checked > 0
    finally:
        for w in ws:
            stats = w.call("teardown")
            assert stats is None or stats["xfer_handles_open"] == 0


# -- the start-up check: spec against tensors, both values named --------------------------------


def _wrap(case: str, layout_change=None, tp: int = 1, tensors_change=None):
    kv, layout = vllm_cache(CASES[case], tp, 0, NUM_BLOCKS, "cpu")
    if layout_change is not None:
        layout = layout_change(layout)
    if tensors_change is not None:
        kv = tensors_change(kv)
    choice = choose_spec(layout)
    plans = SpecPlans(choice.spec, choice.params, role="decode")
    plan = plans.plan(tp, tp)
    return wrap(kv, layout, choice, plan.decode, kind_pages(plan))


def test_every_case_wraps_with_its_builtin_spec():
    expected = {
        "flash": "vllm_lbhnc",
        "mla": "vllm_mla",
        "hybrid": "vllm_lbhnc_hybrid_mamba2",
        "hybrid_groups": "vllm_lbhnc_hybrid_mamba2",
        "cpu_attn": "vllm_cpu_attn",
    }
    for case, spec in expected.items():
        kv, layout = vllm_cache(CASES[case], 2, 1, NUM_BLOCKS, "cpu")
        assert choose_spec(layout).spec == spec
        reg = _wrap(case, tp=2)
        assert len(reg.layer_names) == len(kv)
        # hybrid groups alias one buffer: the i-th layers of every group share a region
        ptrs = {b[next(iter(b))].data_ptr() for b in reg.buffers}
        assert len(ptrs) == (2 if case.startswith("hybrid") else len(kv))


def _model(**values):
    return lambda layout: dataclasses.replace(layout, model={**layout.model, **values})


def test_wrong_head_count_is_named():
    with pytest.raises(LayoutMismatchError, match=r"KV heads on this rank: vLLM has 4, the spec 2"):
        _wrap("flash", _model(num_key_value_heads=2))


def test_wrong_mamba_groups_are_named():
    with pytest.raises(
        LayoutMismatchError,
        match=r"state 'conv' \(MambaSpec\): vLLM has \(192, 3\), the spec \(256, 3\)",
    ):
        _wrap("hybrid", _model(n_groups=4))


def test_wrong_dtype_is_named():
    import torch

    def to_fp16(kv):
        return {k: (v.view(torch.float16) if v.is_floating_point() else v) for k, v in kv.items()}

    with pytest.raises(
        LayoutMismatchError, match=r"dtype of state 'kv': vLLM has fp16, the spec bf16"
    ):
        _wrap("flash", tensors_change=to_fp16)


def test_block_stride_of_kv_cache_config_is_checked():
    def placements(layout):
        p = layout.placements[0]
        return dataclasses.replace(
            layout, placements=(dataclasses.replace(p, block_stride=p.block_stride * 2),)
        )

    with pytest.raises(
        LayoutMismatchError,
        match=r"block stride \(kv_cache_config\): vLLM has 65536, the spec 32768",
    ):
        _wrap("flash", placements)


def test_a_gdn_hybrid_on_cpu_has_no_builtin_spec():
    kv, layout = vllm_cache(CASES["hybrid"], 1, 0, NUM_BLOCKS, "cpu")
    groups = (dataclasses.replace(layout.groups[0], mamba_type="gdn_attn"), *layout.groups[1:])
    layout = dataclasses.replace(layout, device="cpu", attention_backend="CPU_ATTN", groups=groups)
    with pytest.raises(ConfigError, match="give kv_connector_extra_config\\['layout_spec'\\]"):
        choose_spec(layout)
