"""The model zoo: the prefill/decode semantics every later rewrite must preserve."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_build_overrides_win_over_the_size():
    model = build("mamba2", "2.7b", device="meta", num_slots=9, max_len=64)
    assert model.cfg.num_slots == 9 and model.cfg.max_len == 64 and model.cfg.hidden == SIZES["2.7b"]["hidden"]


def test_bad_model_names():
    with pytest.raises(ArgumentError, match="^name:"):
        build("mamba3")
    with pytest.raises(ArgumentError, match="^size:"):
        build("mamba2", size="70b")
    with pytest.raises(ArgumentError, match="^layers:"):
        LM(ModelConfig(layers=("mamba2", "rwkv")))


def _recurrence_case(kind, prefill, device="cuda", heads=4, head_dim=64, n=64, seed=0):
    """Random inputs of the recurrence op (examples/recurrence.py) for one step."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)
    lens = [5, 130, 64, 1] if prefill else [1] * 5
    slots = ints(*range(1, len(lens) + 1))
    context = ints(*[(0 if i % 2 else 7) for i in range(len(lens))])
    qsl = ints(0, *torch.tensor(lens).cumsum(0).tolist()) if prefill else None
    shape = (sum(lens),) if prefill else (len(lens), 1)
    if kind == "mamba2":
        inputs = [rand(*shape, heads, head_dim), F.softplus(rand(*shape, heads)), rand(*shape, heads, n) / n**0.5,
                  rand(*shape, heads, n) / n**0.5]
        params = [-torch.linspace(0.5, 2, heads), torch.ones(heads)]
        pool = rand(len(lens) + 2, 1, heads, head_dim, n)
    else:
        unit = lambda t: F.normalize(t, dim=-1)
        inputs = [rand(*shape, heads, head_dim), unit(rand(*shape, heads, head_dim)) * head_dim**-0.5,
                  unit(rand(*shape, heads, head_dim)), torch.sigmoid(rand(*shape, heads)),
                  torch.exp(-F.softplus(rand(*shape, heads)))]
        params, pool = [], rand(len(lens) + 2, 1, heads, head_dim, head_dim)
    to = lambda t: None if t is None else t.to(device)
    return [to(t) for t in inputs], [to(t) for t in params], to(pool), to(slots), to(context), to(qsl)


def _relative_error(got, expected):
    return ((got.double().cpu() - expected.double().cpu()).norm() / expected.double().cpu().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mamba2", "delta_rule"])
@pytest.mark.parametrize("prefill", [True, False], ids=["prefill", "decode"])
def test_recurrence_on_fla_matches_the_torch_loop(kind, prefill):
    """On CUDA the op runs FLA's kernels; on the CPU the pure-torch loop (the oracle)."""
    from layoutpass.examples.recurrence import fla_ops, recurrence

    if fla_ops() is None:
        pytest.skip("fla-core is not installed")
    inputs, params, pool, slots, context, qsl = _recurrence_case(kind, prefill)
    cpu = [[t.cpu() for t in inputs], [t.cpu() for t in params], pool.cpu(), slots.cpu(), context.cpu(),
           None if qsl is None else qsl.cpu()]
    got = recurrence(kind, inputs, params, pool, slots, context, qsl, None)
    expected = recurrence(kind, *cpu, None)
    assert _relative_error(got, expected) < 1e-2
    assert _relative_error(pool, cpu[2]) < 1e-2
    untouched = [0, pool.shape[0] - 1]
    assert torch.equal(pool[untouched].cpu(), cpu[2][untouched])


@pytest.mark.gpu
@pytest.mark.parametrize("prefill", [True, False], ids=["prefill", "decode"])
def test_sdpa_attention_matches_the_torch_scores(prefill):
    from layoutpass.examples.attention import cached_attention

    gen = torch.Generator().manual_seed(1)
    heads, hd, slots, max_len = 4, 32, 6, 160
    lens = [5, 130, 1] if prefill else [1, 1, 1]
    q, k, v = (torch.randn(sum(lens), heads, hd, generator=gen) for _ in range(3))
    if not prefill:
        q, k, v = (t.view(len(lens), 1, heads, hd) for t in (q, k, v))
    caches = [torch.randn(slots, max_len, heads, hd, generator=gen) for _ in range(2)]
    args = [ints(1, 3, 4), ints(0, 9, 20), ints(0, *torch.tensor(lens).cumsum(0).tolist()) if prefill else None]
    expected = cached_attention(q, k, v, *[c.clone() for c in caches], *args)
    cuda = lambda t: None if t is None else t.cuda()
    got = cached_attention(cuda(q), cuda(k), cuda(v), *[cuda(c) for c in caches], *[cuda(a) for a in args])
    assert _relative_error(got, expected) < 1e-3


def _attention_oracle(q, caches, slots, ctx):
    """softmax(q k^T / sqrt(hd)) v in float64, token t of sequence b over positions 0..ctx[b] + t."""
    batch, tokens, heads, hd = q.shape
    out = torch.empty(batch, tokens, heads, hd, dtype=torch.float64)
    for b, (slot, start) in enumerate(zip(slots.tolist(), ctx.tolist())):
        for t in range(tokens):
            keys, values = (c[slot, :start + t + 1].double() for c in caches)  # (positions, heads, hd)
            weights = torch.softmax(torch.einsum("hd,phd->hp", q[b, t].double(), keys) / hd ** 0.5, -1)
            out[b, t] = torch.einsum("hp,phd->hd", weights, values)
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("tokens", [1, 3])
def test_decode_attention_kernel_against_float64(tokens, device):
    """The decode kernel (interpreted on the CPU) reads each slot in place up to its own length:
    caches in a permuted memory order, a head_dim that is no power of two, contexts from 0 to
    past a block, against softmax(q k^T) v in float64."""
    from layoutpass.examples.attention import decode_attention

    gen = torch.Generator().manual_seed(tokens)
    batch, heads, hd, num_slots, max_len = 4, 3, 80, 7, 150
    q = torch.randn(batch, tokens, heads, hd, generator=gen)
    caches = [torch.randn(num_slots, heads, max_len, hd, generator=gen).transpose(1, 2) for _ in range(2)]
    slots, ctx = ints(5, 0, 3, 6), ints(0, 1, 70, max_len - tokens)
    got = decode_attention(*(t.to(device) for t in (q, *caches, slots, ctx)))
    assert (got.cpu().double() - _attention_oracle(q, caches, slots, ctx)).abs().max() < 1e-5


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.data())
def test_decode_attention_kernel_any_shape_and_memory_order(data):
    """Random batch, tokens, heads, head_dim, slots, contexts and cache memory orders."""
    from layoutpass.examples.attention import decode_attention

    batch, tokens, heads = (data.draw(st.integers(1, n)) for n in (4, 3, 3))
    hd, max_len = data.draw(st.sampled_from([8, 24, 64, 80])), data.draw(st.integers(tokens, 140))
    num_slots = batch + data.draw(st.integers(0, 3))
    order = data.draw(st.permutations(range(4)))  # memory order of the (slot, position, head, hd) caches
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    shape = (num_slots, max_len, heads, hd)
    caches = [torch.randn([shape[i] for i in order], generator=gen).permute(*[order.index(i) for i in range(4)])
              for _ in range(2)]
    q = torch.randn(batch, tokens, heads, hd, generator=gen)
    slots = torch.randperm(num_slots, generator=gen)[:batch].int()
    ctx = torch.tensor([data.draw(st.integers(0, max_len - tokens)) for _ in range(batch)], dtype=torch.int32)
    got = decode_attention(q, *caches, slots, ctx)
    assert (got.double() - _attention_oracle(q, caches, slots, ctx)).abs().max() < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mamba2", "hybrid"])
@torch.no_grad()
def test_cuda_model_matches_the_cpu_model(name):
    """The whole serving scenario: CUDA (Triton convs, FLA recurrences, SDPA) against the CPU
    (pure-torch ops) from the same weights and states."""
    sizes = dict(hidden=128, head_dim=32, d_state=32, heads=4, max_len=160)
    model = build(name, **sizes)
    fill_state(model, seed=6)
    steps = make_scenario(model.cfg, seed=7)
    expected = run_scenario(model, steps)
    cuda = build(name, **sizes, device="cuda")
    cuda.load_state_dict(model.state_dict())
    cuda_steps = [type(s)(s.kind, {k: v.cuda() for k, v in s.inputs.items()}) for s in steps]
    for got, want in zip(run_scenario(cuda, cuda_steps), expected):
        assert _relative_error(got, want) < 1e-2
