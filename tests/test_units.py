"""Units: each kind of pool-holding layer is captured through Dynamo and its graphs are shared by
every instance; the rest of the model runs as written, which stays correct on moved pools
because a pool keeps its shape. Judged against the untouched original over the serving scenario."""

import copy

import pytest
import torch
from torch import nn

from layoutpass import LayoutPassError, check_equivalence, optimize
from layoutpass.examples import build
from layoutpass.examples.lm import LM, ModelConfig
from layoutpass.layout import DS, dense_strides


def test_identical_layers_share_one_capture_per_call_structure():
    """As many graphs for 6 layers as for 2: Dynamo's graphs of a layer kind serve every
    instance (the pools of all instances move together, after the first instance's call)."""
    counts = []
    for layers in (2, 6):
        model = LM(ModelConfig(layers=("mamba2",) * layers, num_spec=1))
        fast = optimize(model, "DS")
        result = check_equivalence(model, fast, prefills=3, steps=10)
        assert result.ok, str(result)
        conv = [p for p in fast.report.pools.values() if p.kind == "conv"]
        assert len(conv) == layers and all(p.moves for p in conv)
        assert {name.split(".")[0] for name in fast.graphs} == {"Mamba2Mixer"} and not fast.report.notes
        counts.append(fast.__dict__["_lp"].units[0].count)
    assert counts[0] == counts[1]


class ResetsOutside(LM):
    """The model zeroes a layer's pool slots itself (a server-side reset written in SD terms)."""

    def forward(self, input_ids, slots, context_lens, query_start_loc=None, num_accepted_tokens=None):
        self.mixers[0].conv_state[slots[:1], :1] = 0.0
        return super().forward(input_ids, slots, context_lens, query_start_loc, num_accepted_tokens)


class ReadsAnother(nn.Module):
    """Code that reads a layer's pool from outside that layer."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, slots, context_lens, query_start_loc=None, num_accepted_tokens=None):
        logits = self.inner(input_ids, slots, context_lens, query_start_loc, num_accepted_tokens)
        return logits + self.inner.mixers[1].conv_state[slots, -1, :1].sum(-1)[:, None, None] \
            if query_start_loc is None else logits


@pytest.mark.parametrize("layout", ["DS", "SD"])
def test_a_pool_touched_outside_its_layer_stays_right(layout):
    model = ResetsOutside(ModelConfig(layers=("mamba2", "mamba2")))
    fast = optimize(model, layout)
    result = check_equivalence(model, fast, prefills=2, steps=6)
    assert result.ok, str(result)
    assert all(name.startswith("Mamba2Mixer") for name in fast.graphs)  # still captured layer by layer


def test_a_read_from_outside_the_layer_stays_right():
    model = ReadsAnother(LM(ModelConfig(layers=("short_conv", "mamba2"))))
    model.scenario = model.inner.scenario
    fast = optimize(model, "DS")
    result = check_equivalence(model, fast, prefills=2, steps=6)
    assert result.ok, str(result)
    assert "inner.mixers.1.conv_state" in fast.report.pools


def test_the_report_lists_every_instance_pool():
    model = build("kda")
    fast = optimize(model, "DS", example_inputs=[model.scenario()[0].inputs])
    conv = [n for n, p in fast.report.pools.items() if p.kind == "conv"]
    assert sorted(conv) == sorted(f"mixers.{i}.{q}_conv_state" for i in (0, 1) for q in "qkv")
    assert "pool mixers.1.v_conv_state (slot, tok, dim) (8, 3, 32): SD -> DS" in str(fast.report)


def test_inplace_relayouts_the_models_own_memory():
    model = build("mamba2", num_spec=1)
    reference = copy.deepcopy(model)
    names = ("mixers.0.conv_state", "mixers.1.conv_state")
    pointers = {name: model.get_buffer(name).data_ptr() for name in names}
    fast = optimize(model, "DS", inplace=True, example_inputs=[s.inputs for s in model.scenario()[:2]])
    assert {name: fast.get_buffer(name).data_ptr() for name in pointers} == pointers
    for name in names:  # the model's own tensors: same shape, DS strides
        pool = fast.report.pools[name]
        assert model.get_buffer(name) is fast.get_buffer(name)
        assert fast.get_buffer(name).stride() == dense_strides(pool.axes, DS, pool.shape)
    result = check_equivalence(reference, fast, prefills=3, steps=8)
    assert result.ok, str(result)


class PoolLayer(nn.Module):
    """Owns an SD pool, found by its pure-torch update."""

    def __init__(self):
        super().__init__()
        self.register_buffer("pool", torch.randn(5, 6, 2))

    def forward(self, x, slots):
        window = torch.cat([self.pool[slots], x[:, None]], 1)
        self.pool[slots] = window[:, 1:]
        return x * window.sum(1)


class HandsOutThePool(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = PoolLayer()

    def forward(self, x, slots):
        return self.layer(x, slots), self.layer.pool


def test_a_pool_returned_by_the_model_reads_the_same():
    model = HandsOutThePool()
    reference, fast = copy.deepcopy(model), optimize(model, "DS")
    for _ in range(3):
        x, slots = torch.randn(2, 2), torch.tensor([3, 1])
        for got, expected in zip(fast(x, slots), reference(x, slots)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert fast.report.pools["layer.pool"].moves


class WritesItsPoolFlat(PoolLayer):
    """A pool layer that also writes its pool through a memory-order view: refused."""

    def forward(self, x, slots):
        y = super().forward(x, slots)
        self.pool.view(self.pool.shape[0], -1)[slots, :1] = 0.0
        return y


class TwoKinds(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = PoolLayer(), WritesItsPoolFlat()

    def forward(self, x, slots):
        return self.second(self.first(x, slots), slots)


@pytest.mark.parametrize("lazily", [False, True])
def test_inplace_refused_after_an_earlier_layer_moved_restores_that_layers_pool(lazily):
    """The first layer kind is captured and proven before the second kind is refused, in the
    same call (the example call, or the model's first call rehearsed on a copy): the refusal
    hands back the model as it was, strides and values included; no layer of the call ran on it."""
    model = TwoKinds()
    before = {name: (b.clone(), b.stride()) for name, b in model.named_buffers()}
    call = (torch.randn(2, 2), torch.tensor([3, 1]))
    with pytest.raises(LayoutPassError, match=r"view.*test_units.py:\d+"):
        fast = optimize(model, "DS", inplace=True, example_inputs=None if lazily else [call])
        fast(*call)
    for name, (b, stride) in before.items():
        now = model.get_buffer(name)
        assert now.stride() == stride and torch.equal(b, now)
