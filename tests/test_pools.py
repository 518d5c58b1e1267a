"""Pools belong to the model, not to an entry: every call structure is rewritten for every pool
it takes, in every call order, judged against the untouched original run eagerly."""

import copy
import itertools
import re

import pytest
import torch
from torch import nn

import pass_models as pm
from layoutpass import SD, ArgumentError, LayoutPassError, check_equivalence, optimize
from layoutpass.equivalence import logical_buffers
from layoutpass.examples.scenario import Step
from layoutpass.kernels import conv_update
from layoutpass.report import Action


def run_both(model, calls, layout, **options):
    """The optimized model (captured lazily, in this call order) against a copy of the
    original run eagerly: every output and the pool after every call, exactly."""
    reference, fast = copy.deepcopy(model), optimize(model, layout, **options)
    for call in calls:
        expected, got = reference(**call), fast(**call)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=lambda m: f"{call['mode']}: {m}")
        torch.testing.assert_close(logical_buffers(fast)["pool"], reference.pool, rtol=0, atol=0,
                                   msg=lambda m: f"pool after {call['mode']}: {m}")
    return fast


ORDERS = list(itertools.permutations(["prefill", "trim", "decode"]))


@pytest.mark.parametrize("layout", ["DS", "SD"])
@pytest.mark.parametrize("order", ORDERS, ids="-".join)
def test_an_entry_that_only_trims_the_pool_is_rewritten_in_any_order(order, layout):
    """The trim entry finds no pool by itself; the prefill/decode entries find it. Whichever
    comes first, the trim must zero tokens, not channels."""
    torch.manual_seed(0)
    fast = run_both(pm.Modes(), [pm.mode_call(m) for m in order + order], layout)
    assert list(fast.report.pools) == ["pool"]
    trims = [u for u in fast.report.uses if u.source.endswith("= 0.0")]
    assert trims and all(u.action == Action.LOGICAL for u in trims)  # a slice of tok: logical in any order


@pytest.mark.parametrize("layout", ["DS", "SD"])
@pytest.mark.parametrize("first", ["pure", "prefill"])
def test_a_pure_torch_decode_through_a_transposed_copy(first, layout):
    """The pure decode spells the window through transpose + contiguous + cat; with the pool
    found in the other entry it used to be left as it was and crash."""
    torch.manual_seed(1)
    order = [first, "prefill" if first == "pure" else "pure"]
    run_both(pm.Modes(), [pm.mode_call(m) for m in order * 3], layout)


def test_a_write_only_first_call_is_not_an_error():
    torch.manual_seed(2)
    fast = run_both(pm.Modes(), [pm.mode_call(m) for m in ["store", "decode", "store", "decode"]], "DS")
    assert fast.report.pools["pool"].source == SD
    store = next(e for e in fast.report.entries if "[3, 6, 8]" in e)
    assert any(u.entry == store for u in fast.report.uses)  # captured again once decode found and moved the pool


def test_a_multiplicative_reset_is_followed():
    torch.manual_seed(3)
    run_both(pm.Modes(), [pm.mode_call(m) for m in ["reset", "decode", "reset", "pure", "decode"]], "DS")


def test_forward_with_variadic_keywords_is_captured():
    torch.manual_seed(4)
    fast = run_both(pm.Modes(), [pm.mode_call("prefill"), pm.mode_call("decode"), pm.mode_call("prefill")], "DS")
    assert len(fast.graphs) == 2  # prefill and decode, for the pool stored DS


@pytest.mark.parametrize("width", [7, 8])
def test_a_width_the_kernels_lack_is_not_lowered(width):
    """transformers' Mamba2 with conv_kernel=7, Mamba with 8: the lowering declines at pass
    time and says why; the update keeps its pure-torch form and stays exact."""
    torch.manual_seed(5)
    model = pm.CatIdiom(width)
    fast = optimize(model, "DS", lower=True)
    # exact up to the order torch sums the window in (a contiguous token axis sums otherwise)
    assert check_equivalence(model, fast, [Step("decode", pm.inputs()) for _ in range(3)], rtol=1e-6, atol=1e-6).ok
    reasons = [u.detail for u in fast.report.uses if u.action == Action.NOT_LOWERED]
    assert reasons == [f"conv width {width} is outside the kernels' 2..6"]
    assert not [u for u in fast.report.uses if u.action == Action.LOWERED]


class DefaultDims(nn.Module):
    """cat without dim and roll without dims on a rank-3 buffer (export drops the defaults)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(4, 3, 2))

    def forward(self, x):
        self.table.copy_(torch.roll(self.table, 1))
        return torch.cat([self.table, x])


def test_discovery_with_default_dims_does_not_crash():
    model = DefaultDims()
    with pytest.raises(LayoutPassError, match="no state pool found in the example calls"):
        optimize(model, example_inputs=[(torch.randn(2, 3, 2),)])
    fast = optimize(model, example_inputs=[(torch.randn(2, 3, 2),)], allow_missing=True)
    assert fast.report.considered["table"].reason.startswith("written, but never")


def test_every_buffer_considered_is_reported():
    model = pm.Modes()
    model.register_buffer("other", torch.randn(SLOTS := pm.SLOTS, 2, 2))
    fast = optimize(model, example_inputs=[pm.mode_call("decode")])
    assert fast.report.considered["pool"].taken and "reaches conv_update's state" in fast.report.considered["pool"].reason
    assert not fast.report.considered["other"].taken
    assert "not a pool: other (6, 2, 2): no captured graph uses it" in str(fast.report)
    assert SLOTS == 6


class FixedRows(nn.Module):
    """A rank-3 table written only at fixed positions of its second axis: scaled in place, and
    one row copied onto another. Neither is a window shifted along an axis."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(pm.SLOTS, 3, 4))

    def forward(self, x, slots):
        self.table[slots, 0] *= 0.5
        self.table[:, 2] = self.table[:, 1]
        return x + self.table[slots].sum(1)


def test_a_write_at_fixed_positions_is_no_shift():
    fast = optimize(FixedRows(), example_inputs=[(torch.randn(2, 4), torch.tensor([1, 3]))], allow_missing=True)
    assert not fast.report.pools
    assert fast.report.considered["table"].reason.startswith("written, but never from its own contents shifted")


class TrimsFlat(pm.Modes):
    """Its trim also writes the pool through an SD memory-order view."""

    def forward(self, x, slots, mode, **kwargs):
        if mode == "trim":
            self.pool.view(pm.SLOTS, -1)[slots, :2] = 0.0  # SD memory order, written through
        return super().forward(x, slots, mode, **kwargs)


def test_a_later_entry_that_would_be_refused_leaves_every_pool_in_the_models_order():
    """A pool found by a later call, which a graph captured earlier writes in memory order: that
    call is not refused half way (it is not the first call): no pool moves, for good, the call
    and the graphs already captured run as the model wrote them, and the report says why."""
    model = TrimsFlat()
    fast = optimize(model, "DS")
    reference = copy.deepcopy(model)
    for mode in ("trim", "decode", "trim", "decode"):
        call = pm.mode_call(mode)
        torch.testing.assert_close(fast(**call), reference(**call), rtol=0, atol=0)
        assert torch.equal(fast.pool, reference.pool) and fast.pool.stride() == reference.pool.stride()
    assert not any(p.moves for p in fast.report.pools.values())
    assert any(re.search(r"back in the model's order.*aten.view.default at test_pools.py:\d+", note)
               for note in fast.report.notes), fast.report.notes


class TwoPools(nn.Module):
    """Mode 0 updates pool `a` with the conv op; mode 1 shifts pool `b` by hand: `b` is found by
    the first call of mode 1."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4))
        self.register_buffer("a", torch.randn(6, 3, 8))
        self.register_buffer("b", torch.randn(6, 3, 8))

    def forward(self, x, slots, mode=0):
        if mode == 0:
            return conv_update(x, self.a.transpose(1, 2), self.w, None, None, slots, out=torch.empty_like(x))
        win = torch.cat([self.b[slots], x[:, None]], 1)
        self.b[slots] = win[:, 1:]
        return (win * self.w.t()[None]).sum(1)


def test_the_report_says_when_a_pool_found_later_drops_that_calls_graphs():
    """The graphs of the call that found `b` read it in the model's order; once it moves they
    never run again and leave the report: a note says so until the next call captures them anew."""
    model = TwoPools()
    fast, reference = optimize(model, "DS"), copy.deepcopy(model)
    x, slots = torch.randn(2, 8), torch.tensor([1, 4])
    for mode in (0, 1, 1):
        torch.testing.assert_close(fast(x, slots, mode), reference(x, slots, mode), rtol=0, atol=0)
        if mode == 1 and not any(u.pool == "b" for u in fast.report.uses):
            assert any(re.search(r"^b found in a call and moved after it: that call's graphs reading them "
                                 r"\(model\.graph\d", note) for note in fast.report.notes), fast.report.notes
    assert str(fast.report.pools["b"].target) == "DS" and any(u.pool == "b" for u in fast.report.uses)


def test_a_forward_set_on_the_instance_is_refused():
    model = pm.Modes()
    model.forward = lambda x, slots, mode, **kw: model.pool.sum()  # closes over the original
    with pytest.raises(ArgumentError, match="^model: the model.forward is replaced on the instance"):
        optimize(model, "DS")


class Branches(nn.Module):
    """Python branches on a size: export proves the graph traced at 7 tokens for >= 4 only."""

    def __init__(self):
        super().__init__()
        self.register_buffer("pool", torch.randn(4, 3, 4))

    def forward(self, x):  # x: (batch, dim, tokens)
        if x.shape[-1] >= 4:
            tail = x[..., -4:]
        else:
            tail = torch.nn.functional.pad(x, (4 - x.shape[-1], 0)) * 2
        self.pool.copy_(torch.cat([self.pool[..., 1:], tail[..., -1:]], -1))
        return tail.sum(-1)


def test_a_graph_runs_only_within_the_sizes_export_proved_it_for():
    model = Branches()
    reference, fast = copy.deepcopy(model), optimize(model, "SD", allow_missing=True)
    for tokens in (7, 2, 5, 3, 9, 1):
        x = torch.randn(4, 3, tokens)
        torch.testing.assert_close(fast(x), reference(x), rtol=0, atol=0)
    assert len(fast.graphs) <= 4  # 7 tokens, then each branch for every size that takes it (1 specialized)


class Parity(Branches):
    """A branch no range expresses (pad to an even length or not): export records it as a guard
    on the token count, which a reused graph must satisfy too."""

    def forward(self, x):  # x: (batch, dim, tokens)
        if x.shape[-1] % 2:
            x = torch.nn.functional.pad(x, (1, 0)) * 2  # odd: one leading zero, and scaled
        self.pool.copy_(torch.cat([self.pool[..., 1:], x[..., -1:]], -1))
        return x.sum(-1) + self.pool.sum(-1)


def test_a_graph_runs_only_where_the_branches_it_took_are_taken():
    model = Parity()
    reference, fast = copy.deepcopy(model), optimize(model, "DS", allow_missing=True)
    for tokens in (7, 8, 5, 6, 9, 11, 4):
        x = torch.randn(4, 3, tokens)
        torch.testing.assert_close(fast(x), reference(x), rtol=0, atol=0)
        torch.testing.assert_close(logical_buffers(fast)["pool"], reference.pool, rtol=0, atol=0)
    assert len(fast.graphs) <= 3  # 7 tokens; then odd and even lengths, each once


class _NoSnapshots(nn.Module):
    """Recurrent pools without a snapshot axis, (slot, head, v, k) and (slot, head, k, v): the
    ops take a snapshot axis, so the model adds one of size 1 by a view."""

    def __init__(self):
        super().__init__()
        self.register_buffer("ssm", torch.randn(6, 2, 4, 3))
        self.register_buffer("delta", torch.randn(6, 2, 3, 5))
        self.A, self.D = nn.Parameter(-torch.rand(2)), nn.Parameter(torch.rand(2))

    def forward(self, x, dt, B, C, k, v, slots):
        from layoutpass.kernels.recurrent import delta_rule_update, selective_state_update

        y = selective_state_update(self.ssm.unsqueeze(1), x, dt, self.A, B, C, self.D, state_batch_indices=slots)
        o = delta_rule_update(self.delta[:, None], k, k, v, -dt, dt, state_indices=slots)
        return y.sum() + o


@pytest.mark.parametrize("layout", ["KV", "VK"])
def test_a_recurrent_pool_without_snapshots_is_found_through_the_view_that_adds_them(layout):
    def call(b):
        g = torch.Generator().manual_seed(b)
        r = lambda *s: torch.randn(*s, generator=g)
        return dict(x=r(b, 1, 2, 4), dt=torch.rand(b, 1, 2, generator=g), B=r(b, 1, 1, 3), C=r(b, 1, 1, 3),
                    k=r(b, 1, 2, 3), v=r(b, 1, 2, 5), slots=torch.randperm(6, generator=g)[:b].int())

    model = _NoSnapshots()
    fast = optimize(model, layout)
    assert check_equivalence(model, fast, [call(3), call(2), call(3)]).ok
    pools = fast.report.pools
    assert sorted(pools) == ["delta", "ssm"] and all("snap" not in p.axes.axes for p in pools.values())
    assert all(str(p.target) == layout for p in pools.values())
    assert [p.name for p in pools.values() if p.moves] == [n for n, p in pools.items() if str(p.source) != layout]


class _SlotsAsSnapshots(_NoSnapshots):
    """The view adds the op's slot axis (size 1) and hands the pool's slots in as snapshots."""

    def forward(self, x, dt, B, C, k, v, slots):
        from layoutpass.kernels.recurrent import selective_state_update

        return selective_state_update(self.ssm[None], x[:1], dt[:1], self.A, B[:1], C[:1], self.D,
                                      num_accepted_tokens=slots[:1] % 5 + 1)


def test_only_a_snapshot_axis_may_be_added_by_a_view():
    g = torch.Generator().manual_seed(0)
    call = dict(x=torch.randn(1, 1, 2, 4, generator=g), dt=torch.rand(1, 1, 2, generator=g),
                B=torch.randn(1, 1, 1, 3, generator=g), C=torch.randn(1, 1, 1, 3, generator=g), k=None, v=None,
                slots=torch.tensor([2], dtype=torch.int32))
    with pytest.raises(LayoutPassError, match="no state pool found"):
        optimize(_SlotsAsSnapshots(), "KV", example_inputs=[call])
