"""A small CuTe-style layout core: a layout is a (shape, stride) pair of nested int tuples.

Layouts map coordinates to offsets.  Strides are always explicit (no column-major default).
Free functions follow pycute's vocabulary: :func:`coalesce`, :func:`composition`,
:func:`complement`, :func:`right_inverse`, :func:`logical_divide`, plus
:func:`coalesce_joint`, which coalesces one domain against several codomains at once (the
planner's "contiguous on both sides" rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from itertools import product
from typing import Any, Union

IntTuple = Union[int, tuple["IntTuple", ...]]  # noqa: UP007 - a recursive alias


def flatten(t: IntTuple) -> tuple[int, ...]:
    if isinstance(t, int):
        return (t,)
    return tuple(x for e in t for x in flatten(e))


def size(t: IntTuple) -> int:
    return reduce(lambda a, b: a * b, flatten(t), 1)


@dataclass(frozen=True)
class Layout:
    shape: IntTuple
    stride: IntTuple

    def __post_init__(self) -> None:
        if len(flatten(self.shape)) != len(flatten(self.stride)):
            raise ValueError(f"shape {self.shape} and stride {self.stride} differ in rank")

    @staticmethod
    def row_major(shape: tuple[int, ...]) -> Layout:
        strides = []
        acc = 1
        for n in reversed(shape):
            strides.append(acc)
            acc *= n
        return Layout(tuple(shape), tuple(reversed(strides)))

    @staticmethod
    def from_tensor(t: Any) -> Layout:
        return Layout(tuple(t.shape), tuple(t.stride()))

    def size(self) -> int:
        return size(self.shape)

    def cosize(self) -> int:
        """One past the largest offset."""
        return 1 + sum((s - 1) * d for s, d in zip(flatten(self.shape), flatten(self.stride)))

    def modes(self) -> list[tuple[int, int]]:
        return list(zip(flatten(self.shape), flatten(self.stride)))

    def __call__(self, i: int | tuple) -> int:
        """Offset of a flat index (colexicographic, CuTe order) or a flat coordinate tuple."""
        modes = self.modes()
        if isinstance(i, tuple):
            coords = flatten(i)
            if len(coords) != len(modes):
                raise ValueError("coordinate rank mismatch")
            return sum(c * d for c, (_, d) in zip(coords, modes))
        off = 0
        for s, d in modes:
            off += (i % s) * d
            i //= s
        return off

    def __str__(self) -> str:
        def fmt(t: IntTuple) -> str:
            return str(t) if isinstance(t, int) else "(" + ",".join(fmt(e) for e in t) + ")"

        return f"{fmt(self.shape)}:{fmt(self.stride)}"


def _make(modes: list[tuple[int, int]]) -> Layout:
    if not modes:
        return Layout(1, 0)
    if len(modes) == 1:
        return Layout(modes[0][0], modes[0][1])
    return Layout(tuple(m[0] for m in modes), tuple(m[1] for m in modes))


def coalesce(layout: Layout) -> Layout:
    """Merge modes (innermost first, CuTe order) while the function stays the same."""
    out: list[tuple[int, int]] = []
    for s, d in layout.modes():
        if s == 1:
            continue
        if out and out[-1][0] * out[-1][1] == d:
            out[-1] = (out[-1][0] * s, out[-1][1])
        else:
            out.append((s, d))
    return _make(out)


def coalesce_joint(
    shape: tuple[int, ...], *strides: tuple[int, ...]
) -> tuple[tuple[int, ...], ...]:
    """Coalesce a domain mapped into several codomains at once (modes innermost first).

    Two neighbouring modes merge only when they are contiguous in *every* codomain.  Returns
    (shape, strides...) as tuples, innermost first, with size-1 modes dropped.
    """
    out_s: list[int] = []
    out_d: list[list[int]] = [[] for _ in strides]
    for i, s in enumerate(shape):
        if s == 1:
            continue
        if out_s and all(o[-1] * out_s[-1] == st[i] for o, st in zip(out_d, strides)):
            out_s[-1] *= s
        else:
            out_s.append(s)
            for o, st in zip(out_d, strides):
                o.append(st[i])
    return (tuple(out_s), *(tuple(o) for o in out_d))


def composition(a: Layout, b: Layout) -> Layout:
    """R(i) = a(b(i)), for b with flat modes; each mode of b divides into a's modes."""
    modes = []
    for bs, bd in b.modes():
        modes.extend(_compose_mode(coalesce(a), bs, bd))
    return coalesce(_make(modes)) if modes else Layout(1, 0)


def _compose_mode(a: Layout, n: int, d: int) -> list[tuple[int, int]]:
    # take every d-th element of a, n of them
    if d == 0 or n == 1:  # a broadcast mode of b stays a broadcast mode (a(0) == 0)
        return [(n, 0)]
    out = []
    rest_stride, rest_n = d, n
    for s, st in a.modes():
        if rest_n == 1:
            break
        if rest_stride >= s and rest_stride % s == 0:
            rest_stride //= s
            continue
        if rest_stride > 1:
            if s % rest_stride:
                raise ValueError("stride does not divide shape")
            s_new = s // rest_stride
            st_new = st * rest_stride
            rest_stride = 1
        else:
            s_new, st_new = s, st
        take = min(s_new, rest_n)
        if rest_n % take:
            raise ValueError("shape does not divide")
        out.append((take, st_new))
        rest_n //= take
    if rest_n != 1:
        last_s, last_st = a.modes()[-1] if a.modes() else (1, 0)
        out.append((rest_n, last_st * last_s * max(rest_stride, 1)))
    return out


def complement(layout: Layout, cosize_hi: int) -> Layout:
    """The layout that fills [0, cosize_hi) with translates of `layout` (injective layouts)."""
    modes = sorted((d, s) for s, d in layout.modes() if s != 1 and d != 0)
    out = []
    current = 1
    for d, s in modes:
        if d % current:
            raise ValueError("layout is not complementable")
        out.append((d // current, current))
        current = d * s
    out.append((-(-cosize_hi // current), current))
    return coalesce(_make(out))


def right_inverse(layout: Layout) -> Layout:
    """R with layout(R(i)) == i for i in [0, size of the contiguous image)."""
    # broadcast (stride-0) modes add nothing to the image: the inverse keeps their coordinate 0
    modes = sorted((d, s, i) for i, (s, d) in enumerate(layout.modes()) if s != 1 and d != 0)
    # column-major (CuTe) strides of the domain
    dom = []
    acc = 1
    for s, _ in layout.modes():
        dom.append(acc)
        acc *= s
    out = []
    current = 1
    for d, s, i in modes:
        if d != current:
            break
        out.append((s, dom[i]))
        current = d * s
    return coalesce(_make(out))


def logical_divide(layout: Layout, tile: Layout) -> Layout:
    """Split `layout`'s domain into (tile, rest) using the tile and its complement."""
    comp = complement(tile, layout.size())
    first = composition(layout, tile)
    second = composition(layout, comp)
    return Layout((first.shape, second.shape), (first.stride, second.stride))


def image(layout: Layout) -> list[int]:
    """Every offset, in index order (for tests and small layouts)."""
    shapes = flatten(layout.shape)
    strides = flatten(layout.stride)
    return [
        sum(c * d for c, d in zip(reversed(coord), strides))
        for coord in product(*[range(s) for s in reversed(shapes)])
    ]
