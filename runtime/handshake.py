"""The layoutc handshake header and its check against a plan.

The header travels next to NIXL's agent metadata (framing: :mod:`.protocol`), or alone as a
notification after a metadata exchange over NIXL's listener.  It holds what the peer must
agree with before any byte moves:

``format``         handshake format (2)
``agent``          the NIXL agent name (must match the metadata)
``engine``         engine id (ranks of one engine share it; a restarted rank reuses it)
``role``/``rank``  ``"prefill"``/``"decode"`` and the TP rank
``spec``/``spec_sha256``/``plan_format``  what the plan was compiled from
``layout``         the side's ``SideLayout.header()``: tp, kernel_blocks, params, pages
                   (nbytes, kernel_stride, per)
``mem_type``       ``"DRAM"`` or ``"VRAM"``
``layers``         per layer: ``{"kind": k, "pages": {page: [addr, nbytes, devid, num_blocks]}}``
``staging``        the staging buffer: ``{addr, nbytes, devid, slots, slot_bytes, mem}`` or null
``listener``       the port of the endpoint's handshake socket, or null

:func:`check_shape` checks every field's type and range (whatever a peer sent: nothing else
here may raise on a hostile header); :func:`validate_header` then compares the header with
the local plan and raises a :class:`~layoutc.runtime.errors.HandshakeError` naming the field
and both values.
"""

from __future__ import annotations

import json
from typing import Any, TypeGuard

from .errors import HandshakeError
from .plan import PLAN_FORMAT, Plan, SideLayout
from .protocol import HS_FORMAT as FORMAT
from .protocol import name_problem

#: Bounds on what a peer may announce (checked before anything is loaded into NIXL).
MAX_RANK = 1 << 20
MAX_LAYERS = 1 << 16
MAX_PAGES = 64
MAX_PARAMS = 4096
MAX_BLOCKS = 1 << 40
MAX_DEVID = 1 << 16
MAX_SLOTS = 1 << 16
ADDR_LIMIT = 1 << 64


def rank_label(role: str, rank: int) -> str:
    return f"{role} rank {rank}"


def other_role(role: str) -> str:
    return "decode" if role == "prefill" else "prefill"


def peer_name(header: dict[str, Any], role: str) -> str:
    """How to name a peer in a message before its header is validated."""
    rank = header.get("rank")
    if type(rank) is int and 0 <= rank < 1 << 20:
        return rank_label(role, rank)
    return f"a {role} peer"


def _is_int(v: Any, lo: int, hi: int) -> TypeGuard[int]:
    """An int (not a bool) in [lo, hi)."""
    return type(v) is int and lo <= v < hi


def _scalar(v: Any) -> bool:
    return v is None or type(v) in (int, float, str, bool)


def check_shape(header: dict[str, Any], *, me: str) -> None:
    """Every field a peer's header must have, of the right type and in range; a
    :class:`HandshakeError` naming the first that is not.  After this,
    :func:`validate_header` and :func:`~.endpoint.peers.peer_from_header` cannot fail on
    a type, and every announced buffer fits the 64-bit address space."""

    def bad(field: str, want: str) -> HandshakeError:
        return HandshakeError(
            f"{me}: peer handshake field {field!r} is malformed (expected {want})", field=field
        )

    if type(header.get("format")) is not int:
        raise bad("format", "an integer")
    for key, what in (("agent", "agent name"), ("engine", "engine id")):
        problem = name_problem(header.get(key), what)
        if problem:
            raise HandshakeError(f"{me}: peer's {problem}", field=key)
    if header.get("role") not in ("prefill", "decode"):
        raise bad("role", "'prefill' or 'decode'")
    if not _is_int(header.get("rank"), 0, MAX_RANK):
        raise bad("rank", f"an integer in [0, {MAX_RANK})")
    if not _is_int(header.get("tp"), 1, MAX_RANK):
        raise bad("tp", f"an integer in [1, {MAX_RANK})")
    spec = header.get("spec")
    if spec is not None and (not isinstance(spec, str) or len(spec) > 4096):
        raise bad("spec", "a string of at most 4096 characters")
    sha = header.get("spec_sha256")
    if not isinstance(sha, str) or len(sha) > 128:
        raise bad("spec_sha256", "a hex string")
    fmt = header.get("plan_format")
    if fmt is not None and (
        not isinstance(fmt, list) or not 0 < len(fmt) <= 4 or not all(type(x) is int for x in fmt)
    ):
        raise bad("plan_format", "a list of integers")
    layout = header.get("layout")
    if not isinstance(layout, dict):
        raise bad("layout", "an object")
    if not _is_int(layout.get("tp"), 1, MAX_RANK):
        raise bad("layout.tp", f"an integer in [1, {MAX_RANK})")
    if not _is_int(layout.get("kernel_blocks"), 1, MAX_RANK):
        raise bad("layout.kernel_blocks", f"an integer in [1, {MAX_RANK})")
    params = layout.get("params")
    if (
        not isinstance(params, dict)
        or len(params) > MAX_PARAMS
        or not all(
            _scalar(v) or (isinstance(v, list) and len(v) <= 64 and all(_scalar(x) for x in v))
            for v in params.values()
        )
    ):
        raise bad("layout.params", "an object of plain values")
    pages = layout.get("pages")
    if (
        not isinstance(pages, dict)
        or not 0 < len(pages) <= MAX_PAGES
        or not all(
            isinstance(p, dict)
            and _is_int(p.get("nbytes"), 0, ADDR_LIMIT)
            and _is_int(p.get("kernel_stride"), 0, ADDR_LIMIT)
            and isinstance(p.get("per"), str)
            for p in pages.values()
        )
    ):
        raise bad("layout.pages", "an object of {nbytes, kernel_stride, per} per page")
    if header.get("mem_type") not in ("DRAM", "VRAM"):
        raise bad("mem_type", "'DRAM' or 'VRAM'")
    layers = header.get("layers")
    if not isinstance(layers, list) or not 0 < len(layers) <= MAX_LAYERS:
        raise bad("layers", f"a list of 1 to {MAX_LAYERS} layers")
    for i, layer in enumerate(layers):
        if (
            not isinstance(layer, dict)
            or not isinstance(layer.get("kind"), str)
            or not isinstance(layer.get("pages"), dict)
            or not 0 < len(layer["pages"]) <= MAX_PAGES
        ):
            raise bad(f"layers[{i}]", "{kind, pages}")
        for pname, entry in layer["pages"].items():
            if not (
                isinstance(entry, list)
                and len(entry) == 4
                and _is_int(entry[0], 0, ADDR_LIMIT)
                and _is_int(entry[1], 1, ADDR_LIMIT)
                and entry[0] + entry[1] <= ADDR_LIMIT
                and _is_int(entry[2], 0, MAX_DEVID)
                and _is_int(entry[3], 1, MAX_BLOCKS)
            ):
                raise bad(
                    f"layers[{i}].{pname}",
                    "[addr, nbytes, devid, blocks]: a buffer inside the 64-bit address space",
                )
    listener = header.get("listener")
    if listener is not None and not _is_int(listener, 0, 1 << 16):
        raise bad("listener", "a port number or null")
    st = header.get("staging")
    if st is not None and not _staging_ok(st):
        raise bad("staging", "{addr, nbytes, devid, slots, slot_bytes} inside the buffer")


def _staging_ok(st: Any) -> bool:
    if not isinstance(st, dict):
        return False
    addr, nbytes, devid, slots, slot_bytes = (
        st.get(k) for k in ("addr", "nbytes", "devid", "slots", "slot_bytes")
    )
    if st.get("mem", "DRAM") not in ("DRAM", "VRAM"):
        return False
    if not (
        _is_int(addr, 0, ADDR_LIMIT)
        and _is_int(nbytes, 1, ADDR_LIMIT)
        and _is_int(devid, 0, MAX_DEVID)
        and _is_int(slots, 1, MAX_SLOTS)
        and _is_int(slot_bytes, 1, ADDR_LIMIT)
    ):
        return False
    return bool(addr + nbytes <= ADDR_LIMIT and slots * slot_bytes <= nbytes)


def _short(v: Any) -> str:
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12] + "…"
    return repr(v)


def _param_map(side: SideLayout) -> dict[str, Any]:
    return {k: v for k, v in side.params}


def _jsonable(v: Any) -> Any:
    """Values as they look after a JSON round trip (tuples become lists)."""
    return json.loads(json.dumps(v))


def validate_header(
    header: dict[str, Any],
    *,
    plan: Plan,
    local_role: str,
    local_rank: int,
    local_layers: list[dict[str, Any]],
    kinds: dict[str, tuple[str, ...]],
) -> str:
    """Check a peer's header against the local plan; return the peer's label.

    Checks, in order: format, role, spec sha256, TP, rank, plan format, kernel blocks, params,
    pages (names, bytes, strides, per), layer count and kinds, buffer sizes.
    """
    me = rank_label(local_role, local_rank)
    want_role = other_role(local_role)

    def need(key: str) -> Any:
        if key not in header:
            raise HandshakeError(
                f"{me}: peer handshake lacks {key!r} (is the peer an older layoutc?)",
                field=key,
            )
        return header[key]

    if need("format") != FORMAT:
        raise HandshakeError(
            f"{me}: peer speaks handshake format {header['format']!r} but this runtime "
            f"speaks {FORMAT}; install the same layoutc on both sides",
            field="format",
            peer_value=header["format"],
            local_value=FORMAT,
        )
    role, rank = need("role"), need("rank")
    if role != want_role:
        raise HandshakeError(
            f"{me}: peer {header.get('agent')!r} is a {role} rank, but a {local_role} "
            f"endpoint only talks to {want_role} ranks",
            field="role",
            peer_value=role,
            local_value=want_role,
        )
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise HandshakeError(f"{me}: peer rank {rank!r} is not an integer", field="rank")
    peer = rank_label(role, rank)
    side = plan.prefill if want_role == "prefill" else plan.decode

    def mismatch(field: str, theirs: Any, ours: Any, what: str = "this plan expects") -> None:
        raise HandshakeError(
            f"{me}: {peer} has {field} {_short(theirs)} but {what} {_short(ours)}",
            peer=peer,
            field=field,
            peer_value=theirs,
            local_value=ours,
        )

    sha = need("spec_sha256")
    if sha != plan.spec_sha256:
        mismatch("spec sha256", sha, plan.spec_sha256, "this plan was compiled from")
    layout = need("layout")
    if not isinstance(layout, dict):
        raise HandshakeError(f"{me}: {peer} sent a malformed layout header", field="layout")
    if layout.get("tp") != side.tp:
        mismatch(f"{want_role} TP", layout.get("tp"), side.tp, "this plan is for")
    if not 0 <= rank < side.tp:
        mismatch("rank", rank, f"a rank in [0, {side.tp})")
    fmt = header.get("plan_format")
    if fmt is not None and list(fmt)[:1] != [PLAN_FORMAT[0]]:
        mismatch("plan format", list(fmt), list(PLAN_FORMAT))
    if layout.get("kernel_blocks") != side.kernel_blocks:
        mismatch(
            "kernel_blocks (kernel blocks per logical block)",
            layout.get("kernel_blocks"),
            side.kernel_blocks,
        )
    theirs_p = layout.get("params") or {}
    ours_p = _jsonable(_param_map(side))
    for name in sorted(set(theirs_p) | set(ours_p)):
        if name not in theirs_p:
            mismatch(f"no parameter {name!r} (params.{name})", None, ours_p[name])
        if name not in ours_p:
            mismatch(f"params.{name}", theirs_p[name], "no such parameter")
        if theirs_p[name] != ours_p[name]:
            mismatch(f"params.{name}", theirs_p[name], ours_p[name])
    ours_pages = _jsonable(side.header()["pages"])
    theirs_pages = layout.get("pages") or {}
    if sorted(theirs_pages) != sorted(ours_pages):
        mismatch("pages", sorted(theirs_pages), sorted(ours_pages))
    for pname in sorted(ours_pages):
        for key in sorted(set(ours_pages[pname]) | set(theirs_pages[pname])):
            t, o = theirs_pages[pname].get(key), ours_pages[pname].get(key)
            if t != o:
                mismatch(f"page {pname!r} {key}", t, o)
    layers = need("layers")
    if not isinstance(layers, list) or len(layers) != len(local_layers):
        n = len(layers) if isinstance(layers, list) else layers
        mismatch("layer count", n, len(local_layers), "this endpoint registered")
    for i, (tl, ol) in enumerate(zip(layers, local_layers)):
        if tl.get("kind") != ol["kind"]:
            mismatch(f"layer {i} kind", tl.get("kind"), ol["kind"], "this endpoint has")
        want_pages = sorted(kinds[ol["kind"]])
        got = tl.get("pages") or {}
        if sorted(got) != want_pages:
            mismatch(f"layer {i} pages", sorted(got), want_pages)
        for pname, entry in got.items():
            try:
                addr, nbytes, devid, nblocks = (int(x) for x in entry)
            except (TypeError, ValueError):
                raise HandshakeError(
                    f"{me}: {peer} sent a malformed buffer entry for layer {i} page {pname!r}",
                    peer=peer,
                    field=f"layers[{i}].{pname}",
                ) from None
            stride = side.page(pname).logical_stride
            if nblocks < 1 or nbytes < nblocks * stride:
                mismatch(
                    f"layer {i} page {pname!r} buffer of {nbytes} bytes for {nblocks} blocks",
                    nbytes,
                    f"at least {nblocks} x {stride} bytes",
                )
    if header.get("mem_type") not in ("DRAM", "VRAM"):
        mismatch("mem_type", header.get("mem_type"), "DRAM or VRAM")
    return peer
