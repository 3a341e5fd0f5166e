"""Properties of the CuTe-style layout core (`layoutc.compiler.layout_algebra`).

pycute-style postconditions, checked over the whole (small) domain of every generated layout:
meaning, not strings.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from layoutc.compiler.layout_algebra import (
    Layout,
    coalesce,
    coalesce_joint,
    complement,
    composition,
    flatten,
    image,
    logical_divide,
    right_inverse,
    size,
)

pytestmark = pytest.mark.timeout(60)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.integers(1, 4)
strides = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 8, 12, 16, 24])


@st.composite
def layouts(draw, max_modes: int = 4, nested: bool = True) -> Layout:
    """Any small layout: 0-4 modes, optionally nested one level, arbitrary strides."""
    n = draw(st.integers(1, max_modes))
    modes = [(draw(shapes), draw(strides)) for _ in range(n)]
    if nested and n >= 3 and draw(st.booleans()):
        # group the first two modes: ((s0, s1), s2, ...)
        shape = ((modes[0][0], modes[1][0]), *(m[0] for m in modes[2:]))
        stride = ((modes[0][1], modes[1][1]), *(m[1] for m in modes[2:]))
        return Layout(shape, stride)
    if n == 1:
        return Layout(modes[0][0], modes[0][1])
    return Layout(tuple(m[0] for m in modes), tuple(m[1] for m in modes))


@st.composite
def complementable(draw) -> Layout:
    """Injective layouts whose sorted strides each divide the next one's start (CuTe's condition)."""
    n = draw(st.integers(1, 3))
    modes = []
    stride = draw(st.integers(1, 3))
    for _ in range(n):
        s = draw(st.integers(2, 4))
        modes.append((s, stride))
        stride = stride * s * draw(st.integers(1, 3))
    modes = draw(st.permutations(modes))
    return Layout(tuple(m[0] for m in modes), tuple(m[1] for m in modes))


def _factor(n: int, draw) -> list[int]:
    """Split `n` into a random list of factors > 1 (in order)."""
    out = []
    while n > 1:
        divisors = [d for d in range(2, n + 1) if n % d == 0]
        d = draw(st.sampled_from(divisors))
        out.append(d)
        n //= d
    return out


@st.composite
def composable(draw) -> tuple[Layout, Layout]:
    """(a, b) with b an injective (plus stride-0 modes) rearrangement of a's domain.

    b's modes refine a's coalesced modes, so each lies inside one mode of a and composition is
    defined; b's image stays inside a's domain.
    """
    a = draw(layouts())
    factors = []
    for s, _ in coalesce(a).modes():
        factors.extend(_factor(s, draw))
    # colexicographic strides of the refined domain, then a random order and subset of modes
    dom = []
    acc = 1
    for f in factors:
        dom.append((f, acc))
        acc *= f
    modes = draw(st.permutations(dom)) if dom else []
    keep = draw(st.lists(st.booleans(), min_size=len(modes), max_size=len(modes)))
    modes = [m for m, k in zip(modes, keep) if k]
    if draw(st.booleans()):  # a broadcast (stride-0) mode somewhere
        modes.insert(draw(st.integers(0, len(modes))), (draw(st.integers(2, 3)), 0))
    if not modes:
        modes = [(1, 0)]
    b = Layout(tuple(m[0] for m in modes), tuple(m[1] for m in modes))
    return a, b


def values(layout: Layout) -> list[int]:
    return [layout(i) for i in range(layout.size())]


def injective(layout: Layout) -> bool:
    v = values(layout)
    return len(set(v)) == len(v)


# --- basics ------------------------------------------------------------------------------------


@SETTINGS
@given(layouts())
def test_call_matches_image_and_coordinates(a):
    """Flat indices are colexicographic; image() lists the same offsets; cosize bounds them."""
    assert image(a) == values(a)
    modes = a.modes()
    for coord in itertools.product(*[range(s) for s, _ in modes]):
        flat = sum(c * math.prod(s for s, _ in modes[:k]) for k, c in enumerate(coord))
        assert a(coord) == a(flat) == sum(c * d for c, (_, d) in zip(coord, modes))
    assert max(values(a)) == a.cosize() - 1
    assert a.size() == size(a.shape) == math.prod(flatten(a.shape))


def test_layout_rejects_rank_mismatch_and_prints_shape_stride():
    with pytest.raises(ValueError):
        Layout((2, 3), (1,))
    assert str(Layout((2, (3, 4)), (1, (2, 6)))) == "(2,(3,4)):(1,(2,6))"
    assert str(Layout(8, 1)) == "8:1"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_row_major_matches_numpy_strides(shape):
    lay = Layout.row_major(tuple(shape))
    arr = np.empty(shape, dtype=np.int64)
    assert lay.shape == tuple(shape)
    assert lay.stride == tuple(s // arr.itemsize for s in arr.strides)
    for coord in itertools.product(*[range(s) for s in shape]):
        assert lay(coord) == np.ravel_multi_index(coord, shape)
    assert sorted(values(lay)) == list(range(math.prod(shape)))


def test_from_tensor_uses_the_tensor_strides():
    class Tensor:  # what Layout.from_tensor reads of a torch tensor: .shape and .stride()
        def __init__(self, arr):
            self.arr = arr
            self.shape = arr.shape

        def stride(self):
            return tuple(s // self.arr.itemsize for s in self.arr.strides)

    flat = np.arange(60).reshape(3, 4, 5).transpose(2, 0, 1)  # like torch's permute(2, 0, 1)
    lay = Layout.from_tensor(Tensor(flat))
    assert lay.shape == (5, 3, 4) and lay.stride == (1, 20, 5)
    for coord in itertools.product(range(5), range(3), range(4)):
        assert lay(coord) == int(flat[coord])


# --- coalesce ----------------------------------------------------------------------------------


@SETTINGS
@given(layouts())
def test_coalesce_preserves_the_function(a):
    c = coalesce(a)
    assert c.size() == a.size()
    assert values(c) == values(a)
    # and it is maximal: no neighbouring modes could merge, no size-1 modes remain
    modes = c.modes()
    if len(modes) > 1:
        assert all(s != 1 for s, _ in modes)
        assert all(modes[i][0] * modes[i][1] != modes[i + 1][1] for i in range(len(modes) - 1))


def test_coalesce_examples():
    assert str(coalesce(Layout((2, 4), (1, 2)))) == "8:1"
    assert str(coalesce(Layout((2, 1, 4), (1, 7, 2)))) == "8:1"
    assert str(coalesce(Layout((2, 4), (4, 1)))) == "(2,4):(4,1)"
    assert str(coalesce(Layout((1, 1), (3, 5)))) == "1:0"
    assert str(coalesce(Layout((2, 3), (0, 0)))) == "6:0"


@SETTINGS
@given(st.data())
def test_coalesce_joint_preserves_every_codomain(data):
    n = data.draw(st.integers(1, 5))
    shape = tuple(data.draw(shapes) for _ in range(n))
    k = data.draw(st.integers(1, 3))
    codomains = [tuple(data.draw(strides) for _ in range(n)) for _ in range(k)]
    out_shape, *out_strides = coalesce_joint(shape, *codomains)
    assert math.prod(out_shape) == math.prod(shape)
    assert 1 not in out_shape
    for orig, new in zip(codomains, out_strides):
        assert len(new) == len(out_shape)
        before = Layout(shape, orig) if n > 1 else Layout(shape[0], orig[0])
        after = Layout(out_shape, new) if out_shape else Layout(1, 0)
        assert values(after) == values(before)
    # merging is joint: never fewer modes than coalescing the most fragmented codomain alone
    alone = max(len(coalesce(Layout(shape, c)).modes()) if n > 1 else 1 for c in codomains)
    assert len(out_shape) >= (alone if math.prod(shape) > 1 else 0)


def test_coalesce_joint_merges_only_when_every_side_is_contiguous():
    # contiguous in both: one mode
    assert coalesce_joint((2, 4), (1, 2), (1, 2)) == ((8,), (1,), (1,))
    # contiguous on one side only: kept apart
    assert coalesce_joint((2, 4), (1, 2), (1, 4)) == ((2, 4), (1, 2), (1, 4))


# --- complement --------------------------------------------------------------------------------


@SETTINGS
@given(complementable(), st.integers(1, 4))
def test_complement_is_disjoint_and_covers(a, extra):
    cosize_hi = a.cosize() * extra
    r = complement(a, cosize_hi)
    a_img, r_img = values(a), values(r)
    # disjoint codomains (both contain offset 0, nothing else in common)
    assert set(a_img) & set(r_img) == {0}
    # the complement is ordered: strides increase with the mode
    r_strides = [d for s, d in r.modes() if s != 1]
    assert r_strides == sorted(r_strides)
    # (a, r) together: every offset exactly once, covering [0, cosize_hi)
    together = [x + y for y in r_img for x in a_img]
    assert len(set(together)) == len(together)
    assert set(range(cosize_hi)) <= set(together)
    assert set(together) == set(range(len(together)))


@SETTINGS
@given(layouts(max_modes=3, nested=False), st.integers(1, 64))
def test_complement_of_any_injective_layout(a, cosize_hi):
    """Any injective layout: the complement either is refused or satisfies the postconditions."""
    a = coalesce(a)
    assume(all(d != 0 for s, d in a.modes() if s != 1) and injective(a))
    try:
        r = complement(a, cosize_hi)
    except ValueError:
        return
    a_img, r_img = values(a), values(r)
    assert set(a_img) & set(r_img) == {0}
    together = [x + y for y in r_img for x in a_img]
    assert len(set(together)) == len(together)
    assert set(range(cosize_hi)) <= set(together)


def test_complement_examples():
    assert str(complement(Layout(4, 1), 24)) == "6:4"
    assert str(complement(Layout(6, 4), 24)) == "4:1"
    assert str(complement(Layout((2, 2), (1, 6)), 24)) == "(3,2):(2,12)"
    with pytest.raises(ValueError):
        complement(Layout((2, 2), (2, 3)), 12)


# --- right inverse -----------------------------------------------------------------------------


def _contiguous_prefix(a: Layout) -> int:
    img = set(values(a))
    k = 0
    while k in img:
        k += 1
    return k


@SETTINGS
@given(layouts())
def test_right_inverse_gives_identity_on_its_domain(a):
    r = right_inverse(a)
    for i in range(r.size()):
        assert a(r(i)) == i
    # composing through the algebra gives the identity layout
    ident = composition(a, r)
    assert values(ident) == list(range(r.size()))
    # for injective layouts (broadcast modes aside), the domain is the whole contiguous start
    # of the image
    moving = [m for m in a.modes() if m[1] != 0 and m[0] != 1]
    if not moving or injective(Layout(tuple(m[0] for m in moving), tuple(m[1] for m in moving))):
        assert r.size() == _contiguous_prefix(a)


def test_right_inverse_examples():
    assert str(right_inverse(Layout((4, 2), (2, 1)))) == "(2,4):(4,1)"
    assert str(right_inverse(Layout((2, 4), (0, 1)))) == "4:2"  # broadcast modes are skipped
    assert right_inverse(Layout(4, 2)).size() == 1  # image {0,2,4,6}: only 0 is contiguous


# --- composition -------------------------------------------------------------------------------


@SETTINGS
@given(composable())
def test_composition_is_function_composition(ab):
    a, b = ab
    r = composition(a, b)
    assert r.size() == b.size()
    for i in range(b.size()):
        assert r(i) == a(b(i)), (str(a), str(b), str(r), i)


@SETTINGS
@given(layouts(max_modes=3), layouts(max_modes=3, nested=False))
def test_composition_of_arbitrary_layouts(a, b):
    """Arbitrary pairs: either refused, or right wherever b is injective and stays in a's domain."""
    assume(max(values(b)) < a.size())
    nonzero = [m for m in b.modes() if m[1] != 0 and m[0] != 1]
    if nonzero:
        assume(injective(Layout(tuple(m[0] for m in nonzero), tuple(m[1] for m in nonzero))))
    try:
        r = composition(a, b)
    except ValueError:
        return
    assert r.size() == b.size()
    assert values(r) == [a(b(i)) for i in range(b.size())]


def test_composition_examples():
    assert str(composition(Layout((4, 2), (2, 1)), Layout(4, 2))) == "(2,2):(4,1)"
    assert str(composition(Layout(8, 3), Layout((2, 2), (1, 0)))) == "(2,2):(3,0)"
    assert str(composition(Layout((2, 3), (3, 1)), Layout(3, 2))) == "3:1"


@SETTINGS
@given(st.data())
def test_logical_divide_is_composition_with_tile_and_complement(data):
    a = data.draw(layouts(max_modes=3, nested=False))
    n = a.size()
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    t = data.draw(st.sampled_from(divisors))
    step = data.draw(st.sampled_from([d for d in divisors if n % (d * t) == 0]))
    tile = Layout(t, step)
    try:
        div = logical_divide(a, tile)
    except ValueError:
        return
    comp = complement(tile, n)
    inner = Layout(div.shape[0], div.stride[0])
    outer = Layout(div.shape[1], div.stride[1])
    assert values(inner) == [a(tile(i)) for i in range(tile.size())]
    assert values(outer) == [a(comp(j)) for j in range(comp.size())]
    # together the tiles and their translates enumerate a's whole domain once
    offsets = sorted(tile(i) + comp(j) for j in range(comp.size()) for i in range(tile.size()))
    assert offsets == list(range(n))
