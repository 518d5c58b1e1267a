"""The promise for the whole program: the optimized model against the untouched original, step
after step, in both layouts, on code around the graph -- Python flags and counters, hooks,
caches in lists, shared storage, other methods, custom ops -- or a clear refusal before
anything changes. One test per defect class."""

import contextlib
import copy
import pickle
import random
import re

import pytest
import torch

import promise_models as pm
from layoutpass import LayoutPassError, optimize
from layoutpass.equivalence import logical_buffers
from layoutpass.state import state_tensors

LAYOUTS = ["DS", "SD"]


def same_state(a, b):
    """All state of the reference `a` and the optimized `b`, element by element (a raw
    allocation holding moved pools read back in the model's order)."""
    sa, sb = logical_buffers(a), logical_buffers(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, msg=lambda m, k=k: f"state {k}: {m}")


def run_both(model, steps, layout, between=None, **options):
    """The untouched original (a copy, run eagerly) and the optimized model: every output and
    all state after every call, exactly; `between(m, i)` runs on both before call i."""
    reference, fast = copy.deepcopy(model), optimize(model, layout, **options)
    for i, call in enumerate(steps):
        if between is not None:
            between(reference, i)
            between(fast, i)
        expected, got = reference(**call), fast(**call)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=lambda m: f"call {i}: {m}")
        same_state(reference, fast)
    return reference, fast


def steps(n=5, batch=3):
    return [pm.step(batch if i % 2 else batch - 1, seed=i) for i in range(n)]


# 1. plain attributes read by the forward: guarded, not frozen

@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_flag_the_forward_reads_and_sets_is_followed(layout):
    def server(m, i):
        m.continue_from_cache = i != 3  # the server drops the cache once
    # the first call reads no state, so nothing shows the pool yet: it is named
    _, fast = run_both(pm.Flagged(), steps(6), layout, server, state_buffers={"conv_state": "SD"})
    assert fast.has_previous_state is True


# 2. Python side effects happen once per call

@pytest.mark.parametrize("layout", LAYOUTS)
def test_counters_and_lists_kept_in_python_move_once_per_call(layout):
    reference, fast = run_both(pm.Counted(), steps(6), layout)
    assert fast.seen_tokens == reference.seen_tokens and fast.history == reference.history
    assert len(fast.history) == 6


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_pre_hook_that_frees_slots_runs_on_the_real_call(layout):
    def schedule(m, i):
        if i in (1, 3):
            m.to_free = [3, 5]
    run_both(pm.Draining(), steps(5), layout, schedule)


class Noisy(torch.nn.Module):
    """Eager code around a pool-holding layer that draws random numbers (sampling, dropout)."""

    def __init__(self):
        super().__init__()
        self.inner = pm.Conv()

    def forward(self, x, slots):
        return self.inner(x + torch.rand_like(x), slots) + random.random()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("where", ["model", "layer"])
def test_hooks_see_each_call_once_and_the_random_streams_are_the_models(layout, where):
    """The first call is rehearsed on a copy of the model: hooks (whose closures reach outside the
    model, a server's metrics list) do not run on the copy, and the random number generators are
    put back, so the model draws what it would have drawn."""
    seen = []
    model = Noisy()
    hooked = model if where == "model" else model.inner
    hooked.register_forward_pre_hook(lambda m, args: seen.append("pre"))
    hooked.register_forward_hook(lambda m, args, out: seen.append("post"))
    reference, fast = copy.deepcopy(model), optimize(model, layout)
    for i, call in enumerate(steps(3)):
        torch.manual_seed(i), random.seed(i)
        expected = reference(**call)
        torch.manual_seed(i), random.seed(i)
        torch.testing.assert_close(fast(**call), expected, rtol=0, atol=0)
        assert seen.count("pre") == seen.count("post") == 2 * (i + 1), seen  # reference's and fast's
    same_state(reference, fast)


class KeepsStateItself(torch.nn.Module):
    """State on the model itself: the whole model is captured as one unit, its layers inlined."""

    def __init__(self):
        super().__init__()
        self.inner = pm.Conv()
        self.register_buffer("seen", torch.zeros(pm.SLOTS, 1, 1))

    def forward(self, x, slots):
        self.seen[slots] += 1
        return self.inner(x, slots)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_hook_registered_on_an_inlined_layer_after_the_first_call_runs(layout):
    counts = []

    def between(m, i):
        if i == 2:
            m.inner.register_forward_pre_hook(lambda mod, args: counts.append(id(mod)))
    reference, fast = run_both(KeepsStateItself(), steps(4), layout, between)
    assert counts.count(id(fast.inner)) == counts.count(id(reference.inner)) == 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_snapshot_hook_and_an_undo_method(layout):
    def undo(m, i):
        if i == 3:
            m.undo(torch.tensor([1, 4]))
    model = pm.Snapshot()
    reference, fast = run_both(model, steps(5), layout, undo)
    assert model._ckpt is None  # the caller's model is not touched: no fake or meta tensor left in it
    assert type(fast._ckpt) is torch.Tensor and fast._ckpt.device.type == "cpu"


# 3. caches held in plain containers

@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_cache_bound_as_a_list_of_tuples(layout):
    model = pm.ListCache()
    reference, fast = run_both(model, steps(4), layout)
    assert fast.kv_cache[0][0] is not model.kv_cache[0][0]  # the optimized model owns its copies
    assert fast.report.pools and list(fast.report.pools) == ["kv_cache[0][0]"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rebinding_the_cache_list_is_followed(layout):
    def rebind(m, i):
        if i == 2:
            g = torch.Generator().manual_seed(7)
            m.kv_cache = [(torch.randn(pm.SLOTS, pm.TOK, pm.DIM, generator=g), torch.randn(pm.SLOTS, 2, 4, generator=g))]
    run_both(pm.ListCache(), steps(5), layout, rebind)


# 4. storage shared between views and names

@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_pool_registered_in_two_layers_moves_once(layout):
    reference, fast = run_both(pm.Shared(), steps(4), layout)
    assert fast.a.conv_state is fast.b.conv_state


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pools_carved_out_of_one_raw_allocation(layout):
    def reset(m, i):
        if i == 2:
            m.reset(torch.tensor([1, 3]), torch.tensor([[0.0], [0.5]]))
    run_both(pm.RawPages(), steps(5), layout, reset)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_other_names_of_a_paged_pool_read_right_after_the_pool_is_rebound(layout):
    """After a call, the caller keeps the pool under a second name and one slot of it, then
    rebinds the pool to a copy: the pages go back to the model's order, and both names with them."""
    def keep_then_rebind(m, i):
        if i == 1:
            m.second, m.row = m.conv_state, m.conv_state[1]
        if i == 2:
            m.conv_state = m.conv_state.clone()
    reference, fast = run_both(pm.RawPages(), steps(4), layout, keep_then_rebind)
    torch.testing.assert_close(fast.row, reference.row, rtol=0, atol=0)
    torch.testing.assert_close(fast.second, reference.second, rtol=0, atol=0)


# 5. code outside forward

@pytest.mark.parametrize("layout", LAYOUTS)
def test_server_methods_outside_forward(layout):
    def server(m, i):
        if i == 1:
            m.free_slots(torch.tensor([2]))
        if i == 2:
            m.load_slots(torch.tensor([1, 4]), torch.arange(2 * pm.TOK * pm.DIM, dtype=torch.float32))
        if i == 3:
            m.rollback(3)
    run_both(pm.Server(), steps(5), layout, server)


@pytest.mark.parametrize("uncaptured_first", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_pool_held_by_a_layer_that_runs_as_written_stays_in_the_models_order(layout, uncaptured_first):
    """A layer Dynamo cannot capture runs as written, and its code is proven for nothing: a pool
    it holds does not move (whichever layer the call reaches first), and the report says why."""
    _, fast = run_both(pm.WithUncaptured(uncaptured_first, always=True), steps(4), layout)
    assert not fast.report.pools["conv.conv_state"].moves
    assert fast.report.considered["side.conv_state"].reason == "another name of pool conv.conv_state"
    assert "not a pool" not in str(fast.report)
    assert any("Uncaptured is not captured and runs as written" in n for n in fast.report.notes)
    kept = [n for n in fast.report.notes if "stays in the model's order" in n and "conv.conv_state" in n]
    assert len(kept) == (layout == "DS")  # in SD it has nowhere to move


@pytest.mark.parametrize("uncaptured_first", [False, True])
def test_a_layer_that_stops_being_captured_after_its_pool_moved_puts_it_back(uncaptured_first):
    """The pool moved while the layer was captured; a later call the layer cannot be captured in
    would run its code as written on the moved pool: every pool goes back to the model's order
    first, and that call and the later ones go on as the model wrote them."""
    calls = [dict(s, debug=i == 2) for i, s in enumerate(steps(5))]
    model = pm.WithUncaptured(uncaptured_first)
    _, fast = run_both(model, calls[:2], "DS")
    (pool,) = fast.report.pools.values()  # found by whichever layer the call reaches first
    assert pool.moves
    _, fast = run_both(model, calls, "DS")
    assert not any(p.moves for p in fast.report.pools.values())
    assert any("every pool is back in the model's order" in n and pool.name in n for n in fast.report.notes)


def test_a_layer_past_dynamos_recompile_limit_runs_as_written_in_the_models_order():
    """Each new tag is a new graph; past Dynamo's limit the layer runs as written (Dynamo raised
    its own error out of the call), so its pool goes back to the model's order first and the
    rare branch, written for SD memory, stays right."""
    tags = [f"t{i}" for i in range(6)] + ["rare", "t1", "rare"]
    model = pm.Tagged()
    reference, fast = copy.deepcopy(model), optimize(model, "DS")  # optimize() raises the limit to 64
    with torch._dynamo.config.patch(recompile_limit=4):
        for tag, call in zip(tags, steps(len(tags))):
            reference.tag = fast.tag = tag
            torch.testing.assert_close(fast(**call), reference(**call), rtol=0, atol=0)
            same_state(reference, fast)
    assert not fast.report.pools["conv_state"].moves
    assert any("recompile limit (4 graphs of one code) is reached" in n for n in fast.report.notes)
    assert any("every pool is back in the model's order" in n for n in fast.report.notes)


def test_a_call_with_dynamo_disabled_is_refused_before_the_layer_runs():
    reference, fast = run_both(pm.Conv(), steps(2), "DS")
    before = {k: v.clone() for k, v in logical_buffers(fast).items()}
    with torch._dynamo.config.patch(disable=True):
        with pytest.raises(LayoutPassError, match=r"torch Dynamo is disabled .*runs its forward through it"):
            fast(**pm.step())
    assert all(torch.equal(v, logical_buffers(fast)[k]) for k, v in before.items())
    for call in steps(2):  # enabled again, it goes on
        torch.testing.assert_close(fast(**call), reference(**call), rtol=0, atol=0)
        same_state(reference, fast)


class Counting(torch.utils._python_dispatch.TorchDispatchMode):
    """A caller's dispatch mode (a profiler or debugger of its own): Dynamo captures nothing under one."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model", [pm.Conv, pm.ListCache], ids=["buffer", "list-cache"])
def test_a_call_under_a_dispatch_mode_is_refused_before_anything_runs(model):
    reference, fast = run_both(model(), steps(2), "DS")
    before = {k: v.clone() for k, v in logical_buffers(fast).items()}
    with Counting(), pytest.raises(LayoutPassError, match=r"^the optimized model was called under a "
                                                           r"TorchDispatchMode \(Counting\)"):
        fast(**pm.step())
    assert all(torch.equal(v, logical_buffers(fast)[k]) for k, v in before.items())
    for call in steps(2):  # outside the mode it goes on
        torch.testing.assert_close(fast(**call), reference(**call), rtol=0, atol=0)
        same_state(reference, fast)


def test_optimize_under_a_dispatch_mode_is_refused_and_leaves_the_model_as_it_was():
    model = pm.Conv()
    pristine = copy.deepcopy(model)
    with Counting(), pytest.raises(LayoutPassError, match="TorchDispatchMode"):
        optimize(model, "DS", example_inputs=[pm.step()])
    same_state(pristine, model)


def test_a_pool_held_by_a_plain_python_object_is_refused_before_it_moves():
    """Other names of a pool inside an object the pass does not look into could not be moved with
    it (its bytes were rewritten under a tensor that kept the old strides: wrong from the first
    call): refused at the first call, nothing changed; in the order it has, it just runs."""
    model = pm.HeldByObject()
    fast = optimize(model, "DS")
    before = model.cache.conv.clone()
    with pytest.raises(LayoutPassError, match=r"pool 'cache.conv' is held by a CacheObject object"):
        fast(**pm.step())
    assert torch.equal(fast.cache.conv, before) and fast.cache.conv.is_contiguous()
    run_both(pm.HeldByObject(), steps(3), "SD")


@pytest.mark.parametrize("how, refused", [("flat write", "a write into the result of .flatten()"),
                                          ("reshape write", "a write into the result of .reshape()"),
                                          ("merging view", ".view() merging axes"), ("stride read", ".stride()")])
def test_eager_code_that_uses_a_pools_memory_order_is_refused_at_the_first_call(how, refused):
    """No graph shows what a parent module's forward does between its layers: the rehearsed first
    call watches it, and a use of a moving pool's memory order there is refused with its line
    before anything moves (the same code runs right where the pool keeps its order)."""
    model = pm.EagerParent(how)
    fast = optimize(model, "DS")
    before = {k: v.clone() for k, v in state_tensors(fast)}
    with pytest.raises(LayoutPassError, match=re.escape(f"{refused} of pool 'layer.conv_state' at promise_models.py:")):
        fast(**pm.step())
    assert all(torch.equal(v, dict(state_tensors(fast))[k]) and v.is_contiguous() for k, v in before.items())
    run_both(pm.EagerParent(how), steps(3), "SD")


@pytest.mark.parametrize("how", ["logical write", "reshape read", "contiguous read"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eager_code_that_uses_pools_logically_is_not_refused(how, layout):
    _, fast = run_both(pm.EagerParent(how), steps(4), layout)
    assert fast.report.pools["layer.conv_state"].moves == (layout == "DS")


@pytest.mark.parametrize("mode", [contextlib.nullcontext, torch.inference_mode], ids=["grad", "inference"])
@pytest.mark.parametrize("how", list(pm.LateEager.USES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eager_code_first_run_in_a_later_call_runs_as_written(how, layout, mode):
    """Eager code the rehearsed call never ran (a branch taken from the third call on) meets moved
    pools: a use of their memory order puts every pool back in the model's order before it runs,
    re-addressing the views of them the code already holds, and a copy taken in the new order
    that is a view in the model's is made that view once it is written or the pool changed under
    it; uses of the same elements in any order keep the pools where they are. In inference mode
    too, where no view knows its base."""
    with mode():
        _, fast = run_both(pm.LateEager(how), steps(5), layout)
    back = any("every pool is back in the model's order" in n for n in fast.report.notes)
    assert back == (layout == "DS" and pm.LateEager.USES[how][2])
    assert fast.report.pools["layer.conv_state"].moves == (layout == "DS" and not back)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_views_of_a_moved_pool_kept_in_attributes_follow_it_back(layout):
    """Views the model keeps of a moved pool (a row, `.data`) address the same elements once a
    later call puts the pools back in the model's order (they were refused as overlapping views
    while the pools went back, mid-call)."""
    _, fast = run_both(pm.KeepsView(), steps(6), layout)
    assert any("every pool is back in the model's order" in n for n in fast.report.notes) == (layout == "DS")


@pytest.mark.parametrize("model", [lambda: pm.EagerParent("logical write"), pm.Conv], ids=["parent", "holder"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_hooks_on_the_optimized_model_are_watched(model, layout):
    """Your hooks on the optimized model itself run outside its forward (and not in the rehearsal):
    one that writes through a flat view of a pool from the third call on runs as written."""
    def hook(m, args, out):
        if getattr(m, "late", False):
            pool = m.layer.conv_state if hasattr(m, "layer") else m.conv_state
            pool.flatten(1)[:, :pm.DIM].mul_(0.5)

    def late(m, i):
        if i == 0:
            m.register_forward_hook(hook)
        m.late = i >= 2
    _, fast = run_both(model(), steps(5), layout, late)
    assert any("every pool is back in the model's order" in n for n in fast.report.notes) == (layout == "DS")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_called_directly_is_watched_too(layout):
    """A framework calling `model.forward(...)` (no hooks): the later calls' eager code is watched."""
    reference = pm.LateEager("flat write")
    fast = optimize(copy.deepcopy(reference), layout)
    for i, call in enumerate(steps(4)):
        expected, got = reference.forward(**call), fast.forward(**call)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=lambda m: f"call {i}: {m}")
        same_state(reference, fast)


# 6. what used to crash at run time

@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_pool_reallocated_after_optimize(layout):
    def grow(m, i):
        if i == 2:
            m.grow()
    run_both(pm.Reallocates(), steps(5), layout, grow)


def test_a_custom_op_that_needs_contiguous_memory_is_refused_before_anything_moves():
    model = pm.CustomOp()
    fast = optimize(model, "DS")
    before = {k: v.clone() for k, v in state_tensors(fast)}
    with pytest.raises(LayoutPassError, match=r"contiguous_only.*test_promise|promise_models.py:\d+"):
        fast(**pm.step())
    assert all(torch.equal(v, dict(state_tensors(fast))[k]) for k, v in before.items())
    assert all(t.is_contiguous() for _, t in state_tensors(fast))
    run_both(pm.CustomOp(), steps(3), "SD")  # no move: nothing to refuse


@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_round_trips_both_ways(layout):
    model = pm.Conv()
    reference, fast = run_both(model, steps(2), layout)
    fresh = pm.Conv()
    fresh.load_state_dict(fast.state_dict())
    same_state(fast, fresh)
    reference.conv_state.mul_(-1.5)  # a state the optimized model never held, loaded in the model's order
    fast.load_state_dict(reference.state_dict())
    same_state(reference, fast)
    for call in steps(2):
        torch.testing.assert_close(fast(**call), reference(**call), rtol=0, atol=0)
        same_state(reference, fast)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pickle_and_deepcopy(layout):
    reference, fast = run_both(pm.Conv(), steps(2), layout)
    for clone in (pickle.loads(pickle.dumps(fast)), copy.deepcopy(fast)):
        same_state(reference, clone)
        call = pm.step(seed=11)
        torch.testing.assert_close(clone(**call), copy.deepcopy(reference)(**call), rtol=0, atol=0)


# 7. inplace: a refusal at the first call leaves the model as it was

def test_inplace_refusal_at_the_first_call_leaves_the_model_as_it_was():
    model = pm.CustomOp()
    before = {k: (v.clone(), v.stride()) for k, v in state_tensors(model)}
    fast = optimize(model, "DS", inplace=True)
    with pytest.raises(LayoutPassError):
        fast(**pm.step())
    for k, (v, stride) in before.items():
        now = dict(state_tensors(model))[k]
        assert torch.equal(now, v) and now.stride() == stride


class CountsThenRefused(pm.Conv):
    """A counter the forward moves, and a second call structure (peek) whose .view() of the pool
    only works in the model's order."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x, slots, peek=False):
        self.seen += 1
        y = self.conv(x, slots)
        return y + self.conv_state.view(pm.SLOTS, -1)[slots, :pm.DIM] if peek else y


class CountsAroundLayers(torch.nn.Module):
    """Eager code that counts, then a layer that moves its pool, then one that is refused."""

    def __init__(self):
        super().__init__()
        self.seen = 0
        self.first, self.second = pm.Conv(), CountsThenRefused()

    def forward(self, x, slots):
        self.seen += 1
        return self.second(self.first(x, slots), slots, peek=True)


def test_a_refusal_at_the_first_call_comes_before_the_models_python_state_changes():
    """The first layer's graph and the model's counter would have run before the second layer is
    refused; the first call runs on a copy first, so neither has when the refusal comes."""
    model = CountsAroundLayers()
    fast = optimize(model, "DS")
    before = {k: (v.clone(), v.stride()) for k, v in fast.named_buffers()}
    with pytest.raises(LayoutPassError, match="view"):
        fast(**pm.step())
    assert fast.seen == 0 and fast.second.seen == 0
    assert all(torch.equal(v, fast.get_buffer(k)) and fast.get_buffer(k).stride() == s for k, (v, s) in before.items())


def test_a_call_structure_refused_after_the_first_call_puts_the_pools_back_and_goes_on():
    """peek first comes at call 2, after the pool moved: the call is not stopped half way (the
    counter already moved); every pool goes back to the model's order, for good, reported."""
    calls = [dict(pm.step(seed=i), peek=i in (2, 4)) for i in range(6)]
    _, fast = run_both(CountsThenRefused(), calls, "DS")
    assert fast.seen == 6 and fast.conv_state.stride() == CountsThenRefused().conv_state.stride()
    assert not any(p.moves for p in fast.report.pools.values())
    assert any("back in the model's order" in note and "view" in note for note in fast.report.notes)


# 8. what used to be a silent no-op or a false refusal

@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_shard_that_does_not_start_at_zero_is_found(layout):
    _, fast = run_both(pm.Sharded(), steps(3), layout)
    assert list(fast.report.pools) == ["conv_state"]
    assert fast.report.pools["conv_state"].target.axes[-1] == ("tok" if layout == "DS" else "dim")


@pytest.mark.parametrize("model_class", [pm.StackWrite, pm.SelectWrite, pm.Gathered])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_write_backs_through_other_ops_are_found(model_class, layout):
    _, fast = run_both(model_class(), steps(3), layout)
    assert list(fast.report.pools) == ["conv_state"]


def test_a_model_without_a_pool_is_refused_at_its_first_call():
    class NoPool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(pm.DIM, pm.DIM)

        def forward(self, x, slots):
            return self.lin(x)
    fast = optimize(NoPool())
    with pytest.raises(LayoutPassError, match="no state pool found"):
        fast(**pm.step())
    assert not optimize(NoPool(), allow_missing=True)(**pm.step()).isnan().any()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_converting_the_optimized_model_to_another_dtype(layout):
    model = pm.Conv()
    reference, fast = run_both(model, steps(2), layout)
    reference, fast = reference.to(torch.bfloat16), fast.to(torch.bfloat16)
    for call in steps(3):
        call = {k: v.bfloat16() if v.is_floating_point() else v for k, v in call.items()}
        torch.testing.assert_close(fast(**call), reference(**call), rtol=0, atol=0)
        same_state(reference, fast)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_optional_argument_given_as_none(layout):
    calls = [dict(pm.step(seed=0)), dict(pm.step(seed=1), qsl=None), dict(pm.step(seed=2), qsl=torch.ones(2))]
    run_both(pm.OptionalArg(), calls, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_slot_rows_of_the_raw_pages_used_inside_forward(layout):
    calls = [dict(pm.step(seed=i), keep=torch.rand(3, 1)) for i in range(4)]
    run_both(pm.RawInForward(), calls, layout)


def test_the_raw_pages_read_as_a_layout_inside_forward_is_refused():
    model = pm.RawInForward(peek=True)
    with pytest.raises(LayoutPassError, match=r"raw holds conv_state, which moves: .*slice.*promise_models.py:\d+"):
        optimize(model, "DS", example_inputs=[pm.step()])
    run_both(pm.RawInForward(peek=True), steps(3), "SD")


class TwoPools(pm.Conv):
    """A second pool that only some calls use: found (and moved) by the first call that does."""

    def __init__(self):
        super().__init__()
        self.register_buffer("other_state", torch.randn(pm.SLOTS, pm.TOK, pm.DIM))

    def forward(self, x, slots, other: bool = False):
        return self.conv(x, slots, self.other_state if other else None)


@pytest.fixture
def graph_capture(monkeypatch):
    """A CUDA graph being captured, as layoutpass sees it (a real capture: tests/test_pass_gpu.py)."""
    from layoutpass import state

    @contextlib.contextmanager
    def capture():
        with monkeypatch.context() as m:
            m.setattr(state, "_capturing", lambda: True)
            yield
    return capture


def test_nothing_moves_inside_a_cuda_graph_capture(graph_capture):
    """Work launched while a CUDA graph is captured is recorded, not done, and redone at every
    replay: a pool moved then would be moved again by each replay. The first call (rehearsal,
    moves) and a call that finds a new pool are refused there; outside the capture they go on."""
    model = TwoPools()
    reference, fast = copy.deepcopy(model), optimize(model, "DS")
    before = {k: v.clone() for k, v in logical_buffers(fast).items()}
    with graph_capture(), pytest.raises(LayoutPassError, match="inside a CUDA graph capture"):
        fast(**pm.step(seed=0))
    assert not fast.report.pools and all(torch.equal(v, before[k]) for k, v in logical_buffers(fast).items())
    for i in range(2):
        torch.testing.assert_close(fast(**pm.step(seed=i)), reference(**pm.step(seed=i)), rtol=0, atol=0)
    assert [p.name for p in fast.report.pools.values() if p.moves] == ["conv_state"]
    with graph_capture():  # nothing to move: runs
        torch.testing.assert_close(fast(**pm.step(seed=5)), reference(**pm.step(seed=5)), rtol=0, atol=0)
        with pytest.raises(LayoutPassError, match=r"pools found in this call \(other_state\) cannot move"):
            fast(**pm.step(seed=6), other=True)  # (on the CPU its work ran: in a capture it is only recorded)
    reference(**pm.step(seed=6), other=True)
    assert fast.other_state.stride() == reference.other_state.stride()  # not moved
    torch.testing.assert_close(fast(**pm.step(seed=7), other=True), reference(**pm.step(seed=7), other=True),
                               rtol=0, atol=0)
    assert {p.name for p in fast.report.pools.values() if p.moves} == {"conv_state", "other_state"}
    assert fast.other_state.stride() != reference.other_state.stride()  # moved after the call outside the capture
    same_state(reference, fast)


def test_a_refusal_inside_a_cuda_graph_capture_moves_nothing_back(graph_capture):
    """A later call structure refused while a graph is captured: putting the pools back in the
    model's order would be recorded too, so the refusal is raised as is; outside the capture the
    same call puts them back and goes on."""
    fast = optimize(CountsThenRefused(), "DS")
    fast(**pm.step(seed=0))
    moved = fast.conv_state.stride()
    with graph_capture(), pytest.raises(LayoutPassError, match="would put every pool back .* CUDA graph capture"):
        fast(**pm.step(seed=1), peek=True)
    assert fast.conv_state.stride() == moved and any(p.moves for p in fast.report.pools.values())
    fast(**pm.step(seed=2), peek=True)
    assert fast.conv_state.stride() == CountsThenRefused().conv_state.stride()


class HoldsHandles(pm.Conv):
    """A server's layer keeps a lock, a condition, a stream and a log file beside its state."""

    def __init__(self, log):
        super().__init__()
        import threading

        self.lock, self.ready, self.stream, self.log = threading.Lock(), threading.Condition(), torch.Stream(), log


class HoldsAGenerator(pm.Conv):
    def __init__(self):
        super().__init__()
        self.pending = (i for i in range(3))  # deepcopy cannot copy a generator, and it is no handle


def test_handles_are_shared_by_the_copy_and_the_rehearsal(tmp_path):
    """Locks, streams, process groups, files: copy.deepcopy cannot copy them, and a copy of the
    model should not have its own. optimize() and the first call's rehearsal share them."""
    with open(tmp_path / "log", "w") as log:
        model = HoldsHandles(log)
        reference, fast = HoldsHandles(log), optimize(model, "DS")
        reference.load_state_dict(model.state_dict())
        assert fast.lock is model.lock and fast.stream is model.stream and fast.log is log
        assert fast.ready is not model.ready and fast.ready._lock is model.ready._lock  # copied around its lock
        for i in range(3):
            torch.testing.assert_close(fast(**pm.step(seed=i)), reference(**pm.step(seed=i)), rtol=0, atol=0)
        assert not fast.report.notes and [p.name for p in fast.report.pools.values() if p.moves] == ["conv_state"]
    same_state(reference, fast)


def test_a_model_deepcopy_cannot_copy_is_refused_in_one_line():
    with pytest.raises(LayoutPassError, match=r"^model: copy.deepcopy cannot copy it \(TypeError: cannot pickle "
                                              r"'generator' object\)"):
        optimize(HoldsAGenerator(), "DS")


class Context:
    """A server's per-call object that cannot be copied (it holds a generator)."""

    def __init__(self):
        self.pending, self.calls = (i for i in range(3)), 0


class TakesAContext(pm.Conv):
    def forward(self, x, slots, ctx: Context):
        ctx.calls += 1
        return self.conv(x, slots)


@pytest.mark.parametrize("why", ["an argument deepcopy cannot copy", "out of memory for a second copy"])
def test_a_first_call_that_cannot_be_rehearsed_runs_directly_and_says_so(why, monkeypatch):
    """No copy of the model and the call for the rehearsal (an argument holding a generator; the
    state not fitting twice in memory): the first call runs on the model itself, reported, and every
    call is still the model's."""
    model = TakesAContext()
    reference, fast = copy.deepcopy(model), optimize(model, "DS")
    if why.startswith("out of memory"):
        from layoutpass import runtime

        def no_room(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        monkeypatch.setattr(runtime.copy, "deepcopy", no_room)
    ctx, ref_ctx = Context(), Context()
    for i in range(3):
        torch.testing.assert_close(fast(**pm.step(seed=i), ctx=ctx), reference(**pm.step(seed=i), ctx=ref_ctx),
                                   rtol=0, atol=0)
    assert ctx.calls == ref_ctx.calls == 3  # the call ran once on the model, not on a copy as well
    assert any(note.startswith("the first call was not rehearsed on a copy of the model") for note in fast.report.notes)
    assert [p.name for p in fast.report.pools.values() if p.moves] == ["conv_state"]
    same_state(reference, fast)


def test_raw_pages_left_by_a_rebound_pool_are_not_put_back_inside_a_cuda_graph_capture(graph_capture):
    """The pool is rebound to a copy of itself after it moved inside its raw pages: the bytes it
    left there go back to the model's order at the next call, but not while a graph is captured."""
    model = pm.RawPages()
    reference, fast = copy.deepcopy(model), optimize(model, "DS")
    torch.testing.assert_close(fast(**pm.step(seed=0)), reference(**pm.step(seed=0)), rtol=0, atol=0)
    for m in (reference, fast):
        m.conv_state = m.conv_state.clone()
    with graph_capture(), pytest.raises(LayoutPassError, match="rebound pool left .* CUDA graph capture"):
        fast(**pm.step(seed=1))
    torch.testing.assert_close(fast(**pm.step(seed=1)), reference(**pm.step(seed=1)), rtol=0, atol=0)
    same_state(reference, fast)
