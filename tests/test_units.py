"""Capture units: a layer that owns its pools is captured once per kind and shared by its
instances; a pool touched outside its layer sends the model to one whole capture. Judged
against the untouched original over the serving scenario."""

import copy

import pytest
import torch
from torch import nn

from layoutpass import LayoutPassError, check_equivalence, optimize
from layoutpass.examples import build
from layoutpass.examples.lm import LM, ModelConfig
from layoutpass.units import Watch


def test_identical_layers_share_one_capture_per_call_structure():
    """As many graphs for 6 layers as for 1: one per call structure (prefill, decode, spec
    decode, and the sizes export fixed at 1), shared by every instance."""
    counts = []
    for layers in (1, 6):
        model = LM(ModelConfig(layers=("mamba2",) * layers, num_spec=1))
        fast = optimize(model, "DS")
        result = check_equivalence(model, fast, prefills=3, steps=10)
        assert result.ok, str(result)
        assert len(fast.report.pools) == layers and all(p.moves for p in fast.report.pools.values())
        assert {name.split(".")[0] for name in fast.graphs} == {"Mamba2Mixer"} and not fast.report.notes
        counts.append(len(fast.graphs))
    assert counts[0] == counts[1] <= 5


class ResetsOutside(LM):
    """The model zeroes a layer's pool slots itself (a server-side reset written in SD terms):
    that pool is not its layer's alone."""

    def forward(self, input_ids, slots, context_lens, query_start_loc=None, num_accepted_tokens=None):
        self.mixers[0].conv_state[slots[:1], :1] = 0.0
        return super().forward(input_ids, slots, context_lens, query_start_loc, num_accepted_tokens)


class ReadsAnother(nn.Module):
    """A layer that reads another layer's pool: neither captures alone."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, slots, context_lens, query_start_loc=None, num_accepted_tokens=None):
        logits = self.inner(input_ids, slots, context_lens, query_start_loc, num_accepted_tokens)
        return logits + self.inner.mixers[1].conv_state[slots, -1, :1].sum(-1)[:, None, None] \
            if query_start_loc is None else logits


@pytest.mark.parametrize("layout", ["DS", "SD"])
def test_a_pool_touched_outside_its_layer_is_captured_with_the_whole_model(layout):
    model = ResetsOutside(ModelConfig(layers=("mamba2", "mamba2")))
    fast = optimize(model, layout)
    result = check_equivalence(model, fast, prefills=2, steps=6)
    assert result.ok, str(result)
    assert any("mixers.0.conv_state is used outside its layer" in note and "test_units.py" in note
               for note in fast.report.notes)
    assert all(not name.startswith("Mamba2Mixer") for name in fast.graphs)  # the whole model, per call


def test_a_read_from_outside_the_layer_is_seen_too():
    model = ReadsAnother(LM(ModelConfig(layers=("short_conv", "mamba2"))))
    model.scenario = model.inner.scenario
    fast = optimize(model, "DS")
    result = check_equivalence(model, fast, prefills=2, steps=6)
    assert result.ok, str(result)
    assert any("inner.mixers.1.conv_state is used outside its layer" in note for note in fast.report.notes)


def test_the_report_lists_every_instance_pool():
    model = build("kda")
    fast = optimize(model, "DS", example_inputs=[model.scenario()[0].inputs])
    assert sorted(fast.report.pools) == sorted(f"mixers.{i}.{q}_conv_state" for i in (0, 1) for q in "qkv")
    assert "pool mixers.1.v_conv_state (8, 3, 32): SD -> DS" in str(fast.report)


def test_inplace_relayouts_the_models_own_memory():
    model = build("mamba2", num_spec=1)
    reference = copy.deepcopy(model)
    pointers = {name: model.get_buffer(name).data_ptr() for name in ("mixers.0.conv_state", "mixers.1.conv_state")}
    fast = optimize(model, "DS", inplace=True, example_inputs=[s.inputs for s in model.scenario()[:2]])
    assert {name: fast.get_buffer(name).data_ptr() for name in pointers} == pointers
    assert all(fast.get_buffer(name).is_contiguous() for name in pointers)
    result = check_equivalence(reference, fast, prefills=3, steps=8)
    assert result.ok, str(result)


def test_inplace_refused_leaves_the_model_untouched():
    model = ResetsOutside(ModelConfig(layers=("mamba2",)))
    model.forward = _views_the_pool_flat(model)
    before = {name: b.clone() for name, b in model.named_buffers()}
    with pytest.raises(LayoutPassError, match="memory-order refusal"):
        optimize(model, "DS", inplace=True, example_inputs=[model.scenario()[1].inputs])
    assert all(torch.equal(b, model.get_buffer(name)) for name, b in before.items())


def _views_the_pool_flat(model):
    forward = model.forward

    def patched(input_ids, slots, context_lens, **kwargs):
        model.mixers[0].conv_state.view(model.cfg.num_slots, -1)[slots, :2] = 0.0  # SD memory order, written
        return forward(input_ids, slots, context_lens, **kwargs)
    return patched


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
        return self.layer(x, slots), self.layer.pool  # no torch call touches the pool outside its layer


def test_a_pool_returned_by_the_model_is_not_its_layers_alone():
    model = HandsOutThePool()
    reference, fast = copy.deepcopy(model), optimize(model, "DS")
    x, slots = torch.randn(2, 2), torch.tensor([3, 1])
    for got, expected in zip(fast(x, slots), reference(x, slots)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert any("layer.pool is used outside its layer at the model's outputs" in n for n in fast.report.notes)


def test_the_probe_reruns_no_call_but_one_that_made_a_fresh_tensor():
    """The probe's memo: a repeated call on meta tensors that made a fresh tensor gets a new
    one of the same metadata; an alias (a view, an in-place result) always runs; a pool is seen
    whether or not the call was seen before; 2 and 2.0 are different calls."""
    other, pool = torch.empty(4, 6, device="meta"), torch.empty(4, 6, device="meta")
    counts = torch.empty(4, 6, dtype=torch.int64, device="meta")
    watch = Watch({id(pool): ("layers.1", "conv_state")})
    with watch:
        first, second = other * 2, other * 2
        view = other.view(24)
        touched = pool * 2
        added = other.add_(1)
        ints, floats = counts * 2, counts * 2.0
    assert second is not first and (second.shape, second.stride(), second.dtype) == (first.shape, first.stride(), first.dtype)
    assert view._base is other and added is other and not touched._is_view()
    assert (ints.dtype, floats.dtype) == (torch.int64, torch.float32)
    assert list(watch.outside) == ["layers.1.conv_state"] and "test_units.py" in watch.outside["layers.1.conv_state"]
    assert len(watch.fresh) == 3  # other * 2 (pool * 2 is the same call), counts * 2, counts * 2.0


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


def test_inplace_refused_after_an_earlier_layer_moved_restores_that_layers_pool():
    """The first layer kind is captured, proven and relayouted in the model's own memory before
    the second kind is refused: the refusal hands back the model as it was."""
    model = TwoKinds()
    before = {name: b.clone() for name, b in model.named_buffers()}
    with pytest.raises(LayoutPassError, match="second|memory order"):
        optimize(model, "DS", inplace=True, example_inputs=[(torch.randn(2, 2), torch.tensor([3, 1]))])
    assert all(torch.equal(b, model.get_buffer(name)) for name, b in before.items())
