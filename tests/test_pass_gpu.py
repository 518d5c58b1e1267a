"""The pass on CUDA: the original model on our SD kernels against the optimized one on our DS
kernels, the lowering of a pure-torch update, and CUDA-graph capture of a decode step."""

import pytest
import torch

import pass_models as pm
from layoutpass import check_equivalence, optimize
from layoutpass.report import Action
from layoutpass.examples import ZOO, build
from layoutpass.examples.scenario import fill_state, make_scenario

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_on_cuda(name):
    model = build(name, num_spec=1, device="cuda")
    fast = optimize(model, "DS")
    result = check_equivalence(model, fast, prefills=3, steps=16)
    assert result.ok, str(result)
    conv = [p for p in fast.report.pools.values() if p.kind == "conv"]  # a layout string moves conv pools only
    assert conv and all(p.target.axes == ("slot", "dim", "tok") for p in conv)


@pytest.mark.parametrize("idiom", [pm.CatIdiom, pm.RollIdiom])
def test_pure_torch_idioms_lowered_on_cuda(idiom):
    model = idiom().cuda()
    calls = [pm.inputs() for _ in range(4)]
    calls = [{k: v.cuda() for k, v in c.items()} for c in calls]
    with torch.no_grad():  # as a server runs it: in grad mode the kernels (no backward) are not lowered
        fast = optimize(model, "DS", example_inputs=calls[:1])  # lower="auto": on, the buffers are on CUDA
        assert any(u.action == Action.LOWERED for u in fast.report.uses), str(fast.report)
        from layoutpass.examples.scenario import Step
        assert check_equivalence(model, fast, [Step("decode", c) for c in calls], rtol=1e-5, atol=1e-5).ok


def test_pure_torch_prompt_lowered_on_cuda():
    model = pm.PromptIdiom().cuda()
    calls = [{k: v.cuda() for k, v in pm.prompt(n).items()} for n in (1, 2, 9, 300)]
    fast = optimize(model, "DS", dynamic=False, state_buffers={"pool": "DS"}, example_inputs=calls)
    assert "pure-torch conv1d update -> conv_prefill" in {u.detail for u in fast.report.uses if u.action == Action.LOWERED}
    from layoutpass.examples.scenario import Step
    assert check_equivalence(model, fast, [Step("prefill", c) for c in calls], rtol=1e-5, atol=1e-5).ok


def test_decode_step_captures_in_a_cuda_graph():
    model = build("hybrid", num_spec=1, device="cuda")
    steps = make_scenario(model.cfg, device="cuda")
    fast = optimize(model, "DS")
    fill_state(fast)
    with torch.no_grad():
        for step in steps[:2]:
            fast(**step.inputs)
        decode = steps[1].inputs
        eager_state = {k: v.clone() for k, v in fast.named_buffers()}
        expected = fast(**decode)
        for k, v in fast.named_buffers():
            v.copy_(eager_state[k])
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fast(**decode)  # warm up on the side stream
        torch.cuda.current_stream().wait_stream(stream)
        for k, v in fast.named_buffers():
            v.copy_(eager_state[k])
        with torch.cuda.graph(graph):
            out = fast(**decode)
        for k, v in fast.named_buffers():
            v.copy_(eager_state[k])
        graph.replay()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name", ["mamba2", "hybrid"])
@torch.no_grad()
def test_torch_compile_over_the_optimized_model_on_cuda(name):
    """inductor around the kernels at real widths, B=64: it may pad the buffers it hands them, so
    the kernels must read strides at run time (when inductor traced into their Triton wrappers,
    strides were baked in and the logits came out wrong at B=64, right at B=1)."""
    from layoutpass.equivalence import logical_buffers

    model = build(name, "2.7b", dtype=torch.bfloat16, device="cuda", num_slots=65, max_len=512)
    fast = optimize(model, {"conv": "DS", "recurrent": "VK"})
    gen = torch.Generator(device="cuda").manual_seed(0)
    decode = dict(input_ids=torch.randint(0, model.cfg.vocab, (64, 1), device="cuda", generator=gen),
                  slots=torch.randperm(64, device="cuda", generator=gen).int() + 1,
                  context_lens=torch.randint(1, 256, (64,), device="cuda", generator=gen).int())
    for _ in range(3):  # captures, moves the pools, captures again in their new order
        fast(**decode)
    compiled = torch.compile(fast, dynamic=False)
    fill_state(model, seed=1)
    for key, view in logical_buffers(fast).items():
        view.copy_(logical_buffers(model)[key])
    want, got = model(**decode).float(), compiled(**decode).float()
    assert (want - got).abs().max() < 0.05 * want.abs().max()  # inductor rounds its fused bf16 ops once
    theirs = logical_buffers(fast)
    for key, buf in logical_buffers(model).items():
        assert (buf.float() - theirs[key].float()).abs().max() < 0.05 * buf.float().abs().max(), key


def test_a_first_call_inside_a_cuda_graph_capture_is_refused():
    """The first call rehearses on a copy and moves pools: inside a capture that work would be
    recorded, not done, and redone at every replay. Refused before anything is recorded."""
    from layoutpass import LayoutPassError
    from layoutpass.equivalence import logical_buffers

    model = build("mamba2", num_spec=1, device="cuda")
    fill_state(model)
    fast = optimize(model, "DS")
    decode = next(s.inputs for s in make_scenario(model.cfg, device="cuda") if s.kind == "decode")
    before = {k: v.clone() for k, v in logical_buffers(fast).items()}
    with pytest.raises(LayoutPassError, match="inside a CUDA graph capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            fast(**decode)
    torch.cuda.synchronize()
    assert not fast.report.pools
    assert all(torch.equal(v, before[k]) for k, v in logical_buffers(fast).items())
    torch.testing.assert_close(fast(**decode), model(**decode), rtol=0, atol=0)
