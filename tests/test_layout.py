"""The layout algebra against real torch strides and data_ptr arithmetic."""

import itertools

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layoutpass import DS, SD, ArgumentError, Layout
from layoutpass.layout import parse_layout

AXES = ("slot", "tok", "dim")
layouts = st.permutations(AXES).map(lambda p: Layout(tuple(p)))
sizes = st.fixed_dictionaries({a: st.integers(1, 5) for a in AXES})


def storage(layout, sizes):
    """A contiguous tensor in `layout` whose elements are their own offsets."""
    shape = tuple(sizes[a] for a in layout.axes)
    return torch.arange(torch.Size(shape).numel()).view(shape)


def brute_runs(offsets):
    """Maximal runs of consecutive offsets, in memory order."""
    runs = []
    for o in sorted(offsets):
        if runs and runs[-1][0] + runs[-1][1] == o:
            runs[-1][1] += 1
        else:
            runs.append([o, 1])
    return [tuple(r) for r in runs]


@st.composite
def regions(draw):
    layout, sz = draw(layouts), draw(sizes)
    ranges = {}
    for a in AXES:
        if draw(st.booleans()):
            start = draw(st.integers(0, sz[a]))
            ranges[a] = (start, draw(st.integers(start, sz[a])))
    return layout, sz, ranges


@settings(max_examples=300, deadline=None)
@given(regions())
def test_runs_are_the_maximal_contiguous_runs(case):
    layout, sz, ranges = case
    t = storage(layout, sz)
    index = tuple(slice(*ranges.get(a, (0, sz[a]))) for a in layout.axes)
    assert list(layout.runs(sz, **ranges)) == brute_runs(t[index].flatten().tolist())


@settings(max_examples=200, deadline=None)
@given(layouts, sizes, st.data())
def test_strides_and_offsets_match_torch(layout, sz, data):
    t = storage(layout, sz)
    strides = layout.strides(sz)
    assert tuple(int(strides[a]) for a in layout.axes) == t.stride()
    index = {a: data.draw(st.integers(0, sz[a] - 1)) for a in AXES}
    element = t[tuple(index[a] for a in layout.axes)]
    assert int(layout.offset(sz, index)) == int(element)
    assert element.data_ptr() - t.data_ptr() == int(layout.offset(sz, index)) * t.element_size()


@settings(max_examples=100, deadline=None)
@given(layouts, layouts, sizes)
def test_convert_and_view_keep_every_logical_element(src, dst, sz):
    t = torch.randn(src.shape(sz))
    converted = src.convert(t, dst)
    assert converted.is_contiguous() and converted.shape == dst.shape(sz)
    for index in itertools.product(*(range(sz[a]) for a in AXES)):
        at = dict(zip(AXES, index))
        assert converted[tuple(at[a] for a in dst.axes)] == t[tuple(at[a] for a in src.axes)]
    assert src.view(t, dst).data_ptr() == t.data_ptr()


def test_symbolic_runs_of_a_dim_shard_and_a_token_tail():
    n, s, d, d0, d1, k = sympy.symbols("n s d d0 d1 k", positive=True, integer=True)
    sz = dict(slot=n, tok=s, dim=d)
    def same(runs, count, length):
        return sympy.simplify(runs.count - count) == 0 and sympy.simplify(runs.length - length) == 0

    assert same(DS.runs(sz, slot=(0, 1), dim=(d0, d1)), 1, s * (d1 - d0))  # one run per slot
    assert same(SD.runs(sz, slot=(0, 1), dim=(d0, d1)), s, d1 - d0)  # state_len runs
    assert same(SD.runs(sz, slot=(0, 1), tok=(k, s)), 1, d * (s - k))
    assert same(DS.runs(sz, slot=(0, 1), tok=(k, s)), d, s - k)
    assert sympy.simplify(SD.offset(sz, dict(slot=2, tok=k, dim=d0)) - (2 * s * d + k * d + d0)) == 0


def test_permutation_between_sd_and_ds():
    assert SD.permutation(DS) == (0, 2, 1) and DS.permutation(SD) == (0, 2, 1)
    assert SD.permutation(SD) == (0, 1, 2)
    assert str(SD) == "SD" and str(Layout(("dim", "slot", "tok"))) == "(dim, slot, tok)"


def test_bad_layouts_are_named():
    with pytest.raises(ArgumentError, match="^layout: unknown layout 'XY'"):
        parse_layout("XY")
    assert parse_layout("ds") is DS
    with pytest.raises(ArgumentError, match="^axes:"):
        Layout(("slot", "slot", "dim"))
    with pytest.raises(ArgumentError, match="^sizes:"):
        SD.strides(dict(slot=1, tok=2))
    with pytest.raises(ArgumentError, match="^ranges:"):
        SD.runs(dict(slot=1, tok=2, dim=3), head=(0, 1))
    with pytest.raises(ArgumentError, match="^tensor:"):
        SD.view(torch.zeros(2, 2), DS)
