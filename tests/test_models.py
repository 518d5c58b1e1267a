"""The model zoo: the prefill/decode semantics every later rewrite must preserve."""

from dataclasses import replace

import pytest
import torch

from layoutpass import ArgumentError
from layoutpass.examples import ZOO, build
from layoutpass.examples.lm import LM, SIZES, ModelConfig
from layoutpass.examples.scenario import fill_state, make_scenario, run_scenario

MODELS = sorted(ZOO)


def ints(*values):
    return torch.tensor(values, dtype=torch.int32)


def prefill(model, ids, slot, context=0):
    return model(ids, ints(slot), ints(context), ints(0, len(ids)))


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_chunked_prefill_and_decode_equal_one_prefill(name):
    model = build(name)
    fill_state(model, seed=1)
    seq = torch.randint(0, model.cfg.vocab, (11,))
    full = prefill(model, seq, slot=5)
    pieces = [prefill(model, seq[:4], slot=2), prefill(model, seq[4:8], slot=2, context=4)]
    for t in range(8, 11):
        pieces.append(model(seq[t].view(1, 1), ints(2), ints(t))[0])
    torch.testing.assert_close(torch.cat(pieces), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_spec_decode_equals_prefill_of_the_accepted_tokens(name):
    """Spec steps carry num_spec + 1 tokens; rejected drafts must leave no trace."""
    model = build(name, num_spec=2)
    fill_state(model, seed=2)
    seq = torch.randint(0, model.cfg.vocab, (13,))
    full = prefill(model, seq, slot=6)
    got = [prefill(model, seq[:5], slot=3)]
    context, accepted = 5, 3
    for take in (2, 1, 3):  # tokens of `seq` accepted at each step; the rest are wrong drafts
        drafts = torch.cat([seq[context:context + take], torch.randint(0, model.cfg.vocab, (3 - take,))])
        out = model(drafts.view(1, 3), ints(3), ints(context), num_accepted_tokens=ints(accepted))[0]
        got.append(out[:take])
        context, accepted = context + take, take
    torch.testing.assert_close(torch.cat(got), full[:context], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_scenario_outputs_do_not_depend_on_unwritten_state(name):
    """Every sequence starts fresh, so the pools' initial contents must not matter: a step
    that reads a slot it never wrote (or the wrong slot) changes the outputs."""
    model = build(name, num_spec=1)
    steps = make_scenario(model.cfg, seed=3)
    assert {s.kind for s in steps} == {"prefill", "decode", "spec"}
    assert all(int(s.inputs["slots"].min()) >= 1 for s in steps)
    fill_state(model, seed=4)
    first = run_scenario(model, steps)
    fill_state(model, seed=5)
    second = run_scenario(model, steps)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_scenario_reuses_freed_slots():
    cfg = ModelConfig(layers=("mamba2",), num_slots=5)
    steps = make_scenario(cfg, prefills=3, decode_steps=16, seed=0)
    prefilled = [int(s) for st in steps if st.kind == "prefill" and int(st.inputs["context_lens"].max()) == 0
                 for s in st.inputs["slots"]]
    assert len(prefilled) > len(set(prefilled)), "a freed slot should be prefilled again"


@pytest.mark.parametrize("name", MODELS)
def test_pools_follow_vllm_shapes(name):
    model = build(name, num_spec=2)
    pools = {k: v for k, v in model.named_buffers() if "conv_state" in k}
    assert pools and all(v.shape[0] == model.cfg.num_slots and v.shape[1] == model.cfg.conv_kernel - 1 + 2
                         for v in pools.values())


def test_real_widths():
    cfg = replace(ModelConfig(layers=("mamba2", "mamba1")), **SIZES["2.7b"])
    with torch.device("meta"):
        model = LM(cfg)
    assert model.mixers[0].conv_state.shape == (cfg.num_slots, 3, 5120 + 2 * 128)
    assert model.mixers[1].conv_state.shape == (cfg.num_slots, 3, 5120)


def test_bad_model_names():
    with pytest.raises(ArgumentError, match="^name:"):
        build("mamba3")
    with pytest.raises(ArgumentError, match="^size:"):
        build("mamba2", size="70b")
    with pytest.raises(ArgumentError, match="^layers:"):
        LM(ModelConfig(layers=("mamba2", "rwkv")))
