"""optimize(): every example model in both layouts, every permutation spelling, the
axis-sensitive uses, the refusals, and the rewrites that must not happen."""

import os
import re
from pathlib import Path

import pytest
import torch

import pass_models as pm
from layoutpass import DS, SD, ArgumentError, LayoutPassError, check_equivalence, optimize
from layoutpass.report import Action, Kind
from layoutpass.examples import ZOO, build
from layoutpass.examples.scenario import Step, make_scenario
from layoutpass.rewrites.permutes import PERMUTATIONS

GOLDEN = Path(__file__).parent / "golden"


def pool_permutations(fast) -> int:
    """Permutation nodes applied to a pool placeholder, in every rewritten graph."""
    pools = {name.replace(".", "_") for name in fast.report.pools} | {name.rsplit(".")[-1] for name in fast.report.pools}
    return sum(1 for g in fast.graphs.values() for n in g.module.graph.nodes
               if n.target in PERMUTATIONS and n.args[0].op == "placeholder" and n.args[0].name[2:] in pools)


def calls(n=4, batch=3):
    torch.manual_seed(0)
    return [Step("decode", pm.inputs(batch)) for _ in range(n)]


@pytest.mark.parametrize("layout", ["DS", "SD"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_stay_equivalent(name, layout):
    model = build(name, num_spec=1)
    fast = optimize(model, layout)
    result = check_equivalence(model, fast, prefills=3, steps=16)
    assert result.ok, str(result)
    assert {s.kind for s in result.steps} == {"prefill", "decode", "spec"} and len(result.steps) >= 19
    pools = [n for n, b in model.named_buffers() if n.endswith("conv_state")]
    assert sorted(fast.report.pools) == sorted(pools)
    assert all(p.source == SD and p.target.axes == (DS if layout == "DS" else SD).axes
               for p in fast.report.pools.values())
    if layout == "DS":
        assert pool_permutations(fast) == 0
    assert all(use.source != "<no source line>" and ".py:" in use.source for use in fast.report.uses)
    kernels = [u for u in fast.report.uses if u.kind == Kind.KERNEL]
    assert len(kernels) == sum(g.after.count("layoutpass.conv_") for g in fast.graphs.values()) > 0


@pytest.mark.parametrize("name", ["mamba2", "short_conv"])
def test_golden_code(name):
    """Before/after code of the decode entry, compared with the committed golden files
    (LAYOUTPASS_REGOLD=1 rewrites them)."""
    model = build(name)
    step = next(s for s in make_scenario(model.cfg) if s.kind == "decode")
    fast = optimize(model, "DS", example_inputs=[step.inputs])
    graphs = next(iter(fast.graphs.values()))
    for which, code in (("before", graphs.before), ("after", graphs.after)):
        path = GOLDEN / f"{name}_decode_{which}.txt"
        if os.environ.get("LAYOUTPASS_REGOLD"):
            path.write_text(code)
        assert code == path.read_text(), f"{path.name} changed"
    assert graphs.before.count("conv_state, 1, 2)") + graphs.before.count("m_t") > 0
    assert "aten.transpose.int(b_mixers" not in graphs.after and "mT.default(b_mixers" not in graphs.after


def test_op_counts_and_what_is_left_alone():
    """The hybrid's Mamba2 and GDN layers are captured once per kind (its attention layer keeps
    no pool and runs as written): one conv op and one pool transpose each, which goes."""
    model = build("hybrid")
    fast = optimize(model, "DS", example_inputs=[s.inputs for s in make_scenario(model.cfg)[:2]])
    assert sorted(name.split(".")[0] for name in fast.graphs) == ["GatedDeltaNetMixer"] * 2 + ["Mamba2Mixer"] * 2
    for graphs in fast.graphs.values():
        before, after = graphs.before, graphs.after
        assert after.count("layoutpass.conv_") == before.count("layoutpass.conv_") == 1
        on_pools = r"aten\.(transpose\.int|swapaxes\.default)\(b_conv_state"
        assert len(re.findall(on_pools, before)) == 1 and not re.findall(on_pools, after)
        # the transposes of activations are not pool uses: they stay
        pool_transposes = len(re.findall(r"aten\.transpose\.int\(b_conv_state", before))
        assert after.count("aten.transpose.int") == before.count("aten.transpose.int") - pool_transposes
        assert after.count("lp_examples.recurrence") == before.count("lp_examples.recurrence")
    for name, buf in fast.named_buffers():
        original = model.get_buffer(name)
        if name in fast.report.pools:
            assert buf.shape == SD.convert(original, DS).shape and buf.is_contiguous()
        else:
            assert buf.shape == original.shape  # ssm states and KV caches keep their layout


def test_already_in_target_layout_is_unchanged():
    model = build("mamba1")
    step = make_scenario(model.cfg)[0]
    fast = optimize(model, "SD", example_inputs=[step.inputs])
    graphs = next(iter(fast.graphs.values()))
    assert graphs.after == graphs.before
    assert {u.action for u in fast.report.uses} == {Action.KEPT}


@pytest.mark.parametrize("spelling", sorted(pm.OneConv.SPELLINGS))
def test_every_permutation_spelling(spelling):
    model = pm.OneConv(spelling)
    fast = optimize(model, "DS")
    assert check_equivalence(model, fast, calls()).ok
    assert fast.report.pools["pool"].source == SD
    assert pool_permutations(fast) == 0


@pytest.mark.parametrize("use", sorted(pm.USES))
def test_axis_sensitive_uses_are_remapped(use):
    model = pm.OneConv(extra=pm.USES[use])
    fast = optimize(model, "DS")
    result = check_equivalence(model, fast, calls())
    assert result.ok, str(result)
    assert pool_permutations(fast) == 0
    kinds = {u.kind for u in fast.report.uses}
    assert "kernel" in kinds and kinds <= {"kernel", "permutation", "axis-sensitive", "layout-agnostic"}


def test_axis_sensitive_use_changes_state():
    """The tail copy really moves state (so its equivalence test can fail)."""
    model = pm.OneConv(extra=pm.USES["tail copy"])
    untouched = model.pool[5, pm.TOK - 1].clone()
    assert not torch.equal(model.pool[5, :pm.TOK - 1], model.pool[4, 1:])
    model(**pm.inputs())
    assert torch.equal(model.pool[5, :pm.TOK - 1], model.pool[4, 1:])
    assert torch.equal(model.pool[5, pm.TOK - 1], untouched)


def test_ds_idiom_to_sd_keeps_one_permutation_and_says_so():
    model = pm.DSIdiom()
    fast = optimize(model, "SD")
    assert check_equivalence(model, fast, calls()).ok
    assert fast.report.pools["pool"].source.axes == DS.axes and fast.report.pools["pool"].target == SD
    kept = [u for u in fast.report.uses if u.action == Action.KEPT]
    assert kept and "permutation" in kept[0].detail
    assert fast.get_buffer("pool").shape == (pm.SLOTS, pm.TOK, pm.DIM)


def test_memory_order_read_reads_a_copy_in_the_old_order():
    model = pm.OneConv(extra=pm._flattened)
    fast = optimize(model, "DS")
    assert check_equivalence(model, fast, calls()).ok
    assert [u.op for u in fast.report.uses if u.action == Action.MATERIALIZED] == ["view.default"]


def test_memory_order_write_is_refused_and_nothing_changes():
    model = pm.OneConv(extra=pm._flattened_write)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LayoutPassError, match=r"node view .*memory order.*written through.*memory-order refusal"
                                              r".*pass_models.py:\d+: "):
        optimize(model, "DS", example_inputs=[pm.inputs()])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("layout", ["DS", "SD"])
def test_pool_passed_as_argument_is_optimized_and_declared(layout):
    """The engine owns the pool: the optimized module says how to allocate it, checks what it
    gets, and computes on it what the model computes on the old layout."""
    model = pm.PoolArgument()
    pool = torch.randn(pm.SLOTS, pm.TOK, pm.DIM)
    fast = optimize(model, layout, example_inputs=[dict(pm.inputs(), pool=pool.clone())])
    target = DS if layout == "DS" else SD
    assert fast.input_layouts == ({"pool": (DS, (pm.SLOTS, pm.DIM, pm.TOK))} if layout == "DS" else {})
    assert fast.report.pools["pool"].argument and fast.report.pools["pool"].target == target
    theirs = SD.convert(pool, target).clone()
    for _ in range(3):
        step = pm.inputs()
        torch.testing.assert_close(fast(**step, pool=theirs), model(**step, pool=pool), rtol=0, atol=0)
        assert torch.equal(target.view(theirs, SD), pool)
    if layout == "DS":
        captured = len(fast.graphs)
        with pytest.raises(ArgumentError, match="^pool: a pool argument: expected a contiguous DS tensor"):
            fast(**pm.inputs(), pool=pool)
        assert len(fast.graphs) == captured  # told at once, not captured anew for the wrong tensor
    shared = torch.randn(pm.SLOTS, pm.TOK, pm.DIM)  # one engine-owned pool across the steps
    result = check_equivalence(model, fast, [Step("decode", dict(pm.inputs(), pool=shared)) for _ in range(3)])
    assert result.ok, str(result)


def test_optimize_never_changes_the_model():
    model = build("gdn", num_spec=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize(model, "DS")
    for step in make_scenario(model.cfg)[:4]:
        fast(**step.inputs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p is q for p, q in zip(model.parameters(), fast.parameters()))  # shared, not copied
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in fast.named_parameters()]
    assert [n for n, _ in model.named_buffers()] == [n for n, _ in fast.named_buffers()]


def test_new_batch_size_does_not_recapture():
    model = pm.OneConv()
    fast = optimize(model, "DS")
    for batch in (2, 3, 4):
        fast(**pm.inputs(batch))
    assert len(fast.graphs) == 1


def test_bad_input():
    with pytest.raises(ArgumentError, match="^layout:"):
        optimize(pm.OneConv(), "DX")
    with pytest.raises(ArgumentError, match="^model:"):
        optimize(lambda x: x)
    with pytest.raises(LayoutPassError, match="no conv-state pool found"):
        optimize(pm.NoPool(), example_inputs=[pm.inputs()])
    assert not optimize(pm.NoPool(), example_inputs=[pm.inputs()], allow_missing=True).report.pools
    with pytest.raises(ArgumentError, match="^example_inputs: the model does not capture"):
        optimize(pm.OneConv(), example_inputs=[dict(x=torch.randn(3, 5), slots=torch.tensor([1, 2, 3]))])
    with pytest.raises(ArgumentError, match="^state_buffers: no buffers named"):
        optimize(pm.OneConv(), state_buffers=["pol"], example_inputs=[pm.inputs()])
    with pytest.raises(ArgumentError, match="^example_inputs: each call"):
        optimize(pm.OneConv(), example_inputs=[[1, 2]])
    with pytest.raises(ArgumentError, match="^lower:"):
        optimize(pm.OneConv(), lower="yes")
    with pytest.raises(ArgumentError, match="^dynamic:"):
        optimize(pm.OneConv(), dynamic="yes")


def test_report_reads_well():
    model = build("kda")
    fast = optimize(model, "DS", example_inputs=[make_scenario(model.cfg)[0].inputs])
    text = str(fast.report)
    assert "pool mixers.0.q_conv_state (8, 3, 32): SD -> DS" in text
    assert "deltanet.py" in text and "permute(0, 2, 1)" in text


def test_check_equivalence_reports_a_difference():
    reference, other = build("mamba2"), build("mamba2")
    with torch.no_grad():
        other.mixers[1].conv_weight.add_(1e-3)
    result = check_equivalence(reference, other, steps=4)
    assert not result.ok and "NOT equivalent" in str(result)
    assert check_equivalence(reference, other, steps=4, atol=1e-1, rtol=1e-1).ok
    bad = next(s for s in result.steps if not s.ok)
    assert bad.step == 0 and bad.output_error > 0


def test_check_equivalence_restores_both_models():
    model = build("short_conv")
    fast = optimize(model, "DS")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert check_equivalence(model, fast, steps=3).ok
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(DS.view(fast.get_buffer("mixers.0.conv_state"), SD), model.get_buffer("mixers.0.conv_state"))


@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize("model_class", [pm.CatIdiom, pm.RollIdiom])
def test_pure_torch_idioms_are_found_and_remapped(model_class, named):
    model = model_class()
    fast = optimize(model, "DS", state_buffers={"pool": "SD"} if named else None)
    result = check_equivalence(model, fast, calls())
    assert result.ok, str(result)
    assert pool_permutations(fast) == 0
    assert fast.get_buffer("pool").shape == (pm.SLOTS, pm.DIM, model.pool.shape[1])
    assert fast.report.pools["pool"].source == SD
    ops = {u.op for u in fast.report.uses}
    assert ops & {"cat.default", "roll.default"} and "sum.dim_IntList" in ops


def test_a_buffer_that_is_never_written_is_not_a_pool():
    with pytest.raises(LayoutPassError, match="no conv-state pool found"):
        optimize(pm.ReadOnlyCat(), example_inputs=[pm.inputs()])


def test_torch_compile_of_the_optimized_model():
    """No graph breaks (fullgraph): the dispatch is plain Python, the ops are custom ops."""
    model = build("short_conv")
    steps = make_scenario(model.cfg)[:4]
    fast = optimize(model, "DS", example_inputs=[s.inputs for s in steps])
    compiled = torch.compile(fast, fullgraph=True)
    result = check_equivalence(model, compiled, steps, rtol=1e-4, atol=1e-5)
    assert result.ok, str(result)


@pytest.mark.parametrize("model_class, op", [(pm.CatIdiom, "cat"), (pm.RollIdiom, "roll")])
def test_pure_torch_updates_are_lowered_to_the_kernel(model_class, op):
    model = model_class()
    fast = optimize(model, "DS", lower=True, example_inputs=[pm.inputs()])
    code = next(iter(fast.graphs.values())).after
    assert "layoutpass.conv_update" in code and f"aten.{op}" not in code and "index_put_" not in code
    assert "copy_" not in code and "aten.mul" not in code
    assert [u.detail for u in fast.report.uses if u.action == Action.LOWERED] == [f"pure-torch {op} update -> conv_update"]
    # the kernel sums the taps in another order than (window * weight).sum(): rounding only
    assert check_equivalence(model, fast, calls(), rtol=1e-5, atol=1e-6).ok
    unlowered = optimize(model, "DS", lower=False, example_inputs=[pm.inputs()])
    assert f"aten.{op}" in next(iter(unlowered.graphs.values())).after


def test_a_pure_torch_prompt_is_lowered_to_the_prefill_kernel():
    """conv1d over the prompt (any length, shorter than the state too) and its tail written to
    the pool: one conv_prefill from zero history. Sizes are specialized (dynamic=False): the
    pad amount is a Python expression of the length."""
    model, calls = pm.PromptIdiom(), [pm.prompt(n) for n in (1, 2, 9)]
    fast = optimize(model, "DS", lower=True, dynamic=False, state_buffers={"pool": "DS"}, example_inputs=calls)
    for graphs in fast.graphs.values():
        assert "layoutpass.conv_prefill" in graphs.after and "aten.conv1d" not in graphs.after
        assert "index_put_" not in graphs.after
    assert {u.detail for u in fast.report.uses if u.action == Action.LOWERED} == {"pure-torch conv1d update -> conv_prefill"}
    # another summation order than conv1d's: rounding only
    assert check_equivalence(model, fast, [Step("prefill", c) for c in calls], rtol=1e-5, atol=1e-5).ok


def test_a_lowered_prefill_reads_a_dynamic_batch_from_the_graph():
    model = pm.PaddedPrompt()
    fast = optimize(model, "DS", lower=True, state_buffers={"pool": "DS"})
    steps = [Step("prefill", dict(x=torch.randn(batch, pm.DIM, 1), slots=torch.tensor([1, 3, 4][:batch])))
             for batch in (2, 3, 2)]
    assert check_equivalence(model, fast, steps, rtol=1e-5, atol=1e-5).ok
    assert len(fast.graphs) == 1 and "layoutpass.conv_prefill" in next(iter(fast.graphs.values())).after


def test_a_stateless_conv1d_is_not_lowered():
    fast = optimize(pm.PromptIdiom(stateless=True), "DS", lower=True, dynamic=False, state_buffers={"pool": "DS"},
                    example_inputs=[pm.prompt(5)])
    assert "aten.conv1d" in next(iter(fast.graphs.values())).after
    assert not [u for u in fast.report.uses if u.kind == Kind.KERNEL]


def test_lowering_says_why_a_near_match_is_not_lowered():
    model = pm.CatIdiom()
    model.forward = lambda x, slots: torch.cat([model.pool[slots], x[:, None, :]], dim=1).sum(1)
    fast = optimize(model, "DS", lower=True, state_buffers={"pool": "SD"}, example_inputs=[pm.inputs()])
    reasons = [u.detail for u in fast.report.uses if u.action == Action.NOT_LOWERED]
    assert reasons == ["the window's tail is not written back to the same slots"]


class WrittenAgain(torch.nn.Module):
    """A pure-torch decode on a DS pool whose written state is read and written again."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(pm.DIM, pm.WIDTH))
        self.register_buffer("pool", torch.randn(pm.SLOTS, pm.DIM, pm.TOK))

    def forward(self, x, slots):
        window = torch.cat([self.pool[slots], x[..., None]], -1)
        y = (window * self.weight).sum(-1)
        self.pool.index_put_((slots,), window[..., -pm.TOK:])
        self.pool.index_put_((slots,), self.pool[slots].roll(1, 2))
        return y


def test_a_lowered_update_whose_state_is_read_again():
    model = WrittenAgain()
    fast = optimize(model, "DS", lower=True, example_inputs=[pm.inputs()])
    assert [u.detail for u in fast.report.uses if u.action == Action.LOWERED] == ["pure-torch cat update -> conv_update"]
    assert check_equivalence(model, fast, calls(), rtol=1e-5, atol=1e-5).ok
