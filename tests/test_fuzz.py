"""The fuzzer in CI: programs written by tests/fuzz_models.py, optimized to DS and to SD, give the
original's outputs, logical state and Python attributes at every call in their order (half of them
with Python around the graph and a harness acting between calls, issue 20), leave the model given
to optimize() as it was, or are refused with a LayoutPassError before the call changed anything.
Then one test per fuzz finding (issues 10 and 20), each a minimized generated program (a strict
xfail while it is open, a regression test once fixed), and the harness's own checks (it sees a
difference, it is deterministic).

While a finding is open, the property lets a failure of its class pass (OPEN_CLASSES tells the
class; its own test is the strict xfail) and fails on any other.

Programs with recurrent pools (issue "Every state pool", item 6) have a property test of their own,
checked with the mappings {"conv": "DS", "recurrent": "VK"} and {"conv": "SD", "recurrent": "KV"}.

Cost: the property runs CI_EXAMPLES programs (FUZZ_EXAMPLES overrides) and CI_RECURRENT_EXAMPLES
with recurrent pools (FUZZ_RECURRENT_EXAMPLES; about 75 s for 40 on 2 busy cores), derandomized, without
shrinking (FUZZ_SHRINK=1 shrinks a failure to a minimal program; benchmarks/fuzz.py minimizes every
failure class); FUZZ_LOG=path appends every outcome but "equivalent" to that file."""

import copy
import dataclasses
import os
import pickle

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fuzz_models as fm
from layoutpass import LayoutPassError

CI_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 200))
PHASES = (Phase.explicit, Phase.generate) + ((Phase.shrink,) if os.environ.get("FUZZ_SHRINK") else ())
CI_PROGRAMS = fm.programs(max_pools=2, max_entries=3, max_other_uses=1, max_calls=3, max_actions=3)
# programs with recurrent pools (every one of them: the programs above have none), checked with the
# mappings DS + VK and SD + KV; FUZZ_RECURRENT_EXAMPLES overrides their number
CI_RECURRENT_EXAMPLES = int(os.environ.get("FUZZ_RECURRENT_EXAMPLES", 40))
CI_RECURRENT_PROGRAMS = fm.programs(max_pools=1, max_entries=2, max_other_uses=1, max_calls=3, max_actions=2,
                                    recurrent_share=1.0)


@settings(max_examples=CI_EXAMPLES, derandomize=True, database=None, deadline=None, phases=PHASES,
          suppress_health_check=list(HealthCheck), print_blob=False)
@given(program=CI_PROGRAMS, lower=st.booleans())
def test_optimized_programs_match_the_original(program, lower):
    for layout in ("DS", "SD"):
        outcome = fm.check(program, layout, lower)
        known = [name for name in OPEN_FINDINGS if not outcome.ok and OPEN_CLASSES[name](program, outcome)]
        if os.environ.get("FUZZ_LOG") and outcome.kind != "equivalent":
            with open(os.environ["FUZZ_LOG"], "a") as log:
                log.write(f"{layout} lower={lower} {outcome.kind} step {outcome.step} {known}: "
                          f"{outcome.detail.splitlines()[0][:300] if outcome.detail else ''}\n")
        assert outcome.ok or known, \
            f"optimize(..., {layout!r}, lower={lower}): {outcome}\n{program.script(layout, lower)}"


@settings(max_examples=CI_RECURRENT_EXAMPLES, derandomize=True, database=None, deadline=None, phases=PHASES,
          suppress_health_check=list(HealthCheck), print_blob=False)
@given(program=CI_RECURRENT_PROGRAMS, lower=st.booleans())
def test_optimized_recurrent_programs_match_the_original(program, lower):
    """The same property with recurrent pools (issue "Every state pool", item 6): the recurrence ops,
    pure-torch per-slot updates of named pools, resets, gathers, one head, q . state outputs; in the
    layouts DS + VK and SD + KV. (The test above keeps its own copy of the loop: hypothesis derives a
    derandomized test's examples from its source, so the conv-only programs CI draws stay the same.)"""
    for layout in program.layouts:
        outcome = fm.check(program, layout, lower)
        known = [name for name in OPEN_FINDINGS if not outcome.ok and OPEN_CLASSES[name](program, outcome)]
        if os.environ.get("FUZZ_LOG") and outcome.kind != "equivalent":
            with open(os.environ["FUZZ_LOG"], "a") as log:
                log.write(f"{layout} lower={lower} {outcome.kind} step {outcome.step} {known}: "
                          f"{outcome.detail.splitlines()[0][:300] if outcome.detail else ''}\n")
        assert outcome.ok or known, \
            f"optimize(..., {layout!r}, lower={lower}): {outcome}\n{program.script(layout, lower)}"


# ----------------------------------------------------------------------------- findings


def pool(layout, slots, state_len, dim, width, index=0):
    return fm.Pool(index, layout, slots, state_len, dim, width, bias=False)


def program(pools, bodies, calls, dispatch="mode", named=False, layers=(), model_lines=(), around=None):
    """A fixed program: bodies are (tokens, lines) per entry, calls (entry, batch). With layers,
    each body is the one layer class's and model_lines the model's own. around: the Python around
    the graph, kept by the model (holder None) or by layer class 0 (holder 0)."""
    if around is not None:
        pools = [around.pools[0] if p.index == around.pools[0].index else p for p in pools]
    entries = tuple(fm.Entry(i, tokens, False, tuple(model_lines), (), (tuple(lines),)) if layers else
                    fm.Entry(i, tokens, False, tuple(lines), ()) for i, (tokens, lines) in enumerate(bodies))
    return fm.Program(tuple(pools), entries, dispatch, True, "int64", tuple(calls), 0, named, tuple(layers),
                      around=around)


def around(p, holder=None, backing="own", binding="buffer", alias="", raw_buffer=False, features=(), hooks=(),
           actions=()):
    """The second axis for one pool: how the holder keeps it, its Python state, the harness's actions
    ((step, kind, code) or (step, kind) for the state_dict round trips and copies)."""
    local = {"buffer": "", "attribute": "", "list": "kv_cache[0][0]", "dict": "cache['conv0']"}[binding]
    acts = tuple(fm.Action(a[0], a[2] if len(a) > 2 else fm.STATE_DICT.get(a[1]) or
                           {"pickle": "m = pickle.loads(pickle.dumps(m))", "deepcopy": "m = copy.deepcopy(m)"}[a[1]],
                           a[1]) for a in actions)
    return fm.Around(holder, (dataclasses.replace(p, local=local, dense=backing == "own"),), backing, binding, alias,
                     raw_buffer, False, tuple(features), 0, tuple(hooks), acts)


DECODE_SD = ["y = conv_update(x[:, 0, :4], self.p0.transpose(1, 2), self.w0, None, None, slots, "
             "out=torch.zeros_like(x[:, 0, :4]))", "outs.append(y)"]
CAT_DECODE_SD = ["win = torch.cat([self.p0[slots], x[:, :, :4]], 1)", "self.p0[slots] = win[:, 1:]",
                 "outs.append((win * self.w0.t()).sum(1))"]

# name -> (program, layout, lower, what a fixed pass gives: "equivalent", or "ok" (a refusal allowed))
FINDINGS = {
    "F1 a write-only entry is not rewritten once the pool moved: silent wrong state": (program(
        [pool("DS", 3, 3, 3, 2)],
        [(1, ["y = conv_update(x[:, 0], self.p0, self.w0, None, None, slots, out=torch.zeros_like(x[:, 0]))",
              "outs.append(y)"]),
         (3, ["self.p0[0].copy_(x[0].t())"])],
        [(0, 1), (1, 1)]), "SD", False, "equivalent"),
    "F2 an entry written in SD terms runs on the DS buffer: crash": (program(
        [pool("SD", 3, 3, 4, 4)], [(1, CAT_DECODE_SD), (5, ["self.p0[slots] = x[:, -3:]"])],
        [(0, 1), (1, 1)]), "DS", False, "equivalent"),
    "F3 flatten of a permuted pool view was a copy, becomes an alias of the moved pool": (program(
        [pool("SD", 3, 2, 4, 3)],
        [(1, [*DECODE_SD, "kept = self.p0.transpose(1, 2).flatten(1)", "self.p0[slots] = 0.0", "outs.append(kept)"])],
        [(0, 2)]), "DS", False, "ok"),
    "F4 cat without dim crashes discovery": (program(
        [pool("SD", 3, 2, 4, 3)], [(1, [*DECODE_SD, "outs.append(torch.cat([self.p0, self.p0]).sum(0))"])],
        [(0, 2)]), "DS", False, "equivalent"),
    "F4 roll without dims crashes discovery": (program(
        [pool("SD", 3, 2, 4, 3)], [(1, [*DECODE_SD, "outs.append(self.p0.roll(1))"])],
        [(0, 2)]), "DS", False, "ok"),
    "F5 forward(**kwargs) called with keywords is not captured": (program(
        [pool("SD", 3, 2, 4, 3)], [(1, DECODE_SD), (1, DECODE_SD)], [(0, 2), (1, 2)], dispatch="kwargs"),
        "DS", False, "equivalent"),
    "F6 a pool reset by mul_(mask) before the conv op is not found": (program(
        [pool("SD", 3, 2, 4, 3)],
        [(1, ["self.p0.mul_((torch.arange(3) != slots[0]).float()[:, None, None])", *DECODE_SD])],
        [(0, 2)]), "DS", False, "equivalent"),
    "F7 a write-only entry called first is refused": (program(
        [pool("SD", 3, 2, 4, 3)], [(1, DECODE_SD), (5, ["self.p0[slots] = x[:, -2:]"])],
        [(1, 2), (0, 2)]), "DS", False, "equivalent"),
    "F8 a width-7 pure-torch decode is lowered, then fails at its first call": (program(
        [pool("SD", 4, 6, 3, 7)],
        [(1, ["win = torch.cat([self.p0[slots], x[:, :, :3]], 1)",
              "y = F.conv1d(win.transpose(1, 2), self.w0[:, None], None, groups=3)[..., -1:]",
              "self.p0[slots] = win[:, -6:]", "outs.append(y)"])],
        [(0, 2)]), "DS", True, "equivalent"),
    "F9 lowering to conv_prefill with a dynamic batch puts SymInts in the graph": (program(
        [pool("DS", 4, 3, 4, 4)],
        [(1, ["xt = x[:, :, :4].transpose(1, 2)", "self.p0[slots] = F.pad(xt, (3, 0))[..., -3:]",
              "outs.append(F.conv1d(xt, self.w0[:, None], None, padding=3, groups=4)[..., :1])"])],
        [(0, 2)], named=True), "DS", True, "equivalent"),
    "F10 lowering an update whose stored state is written again erases a node still in use": (program(
        [pool("DS", 4, 5, 6, 6)],
        [(1, ["win = torch.cat([self.p0[slots], x[:, :, :6].transpose(1, 2)], -1)", "y = (win * self.w0).sum(-1)",
              "self.p0.index_put_((slots,), win[..., -5:])", "self.p0.index_put_((slots,), self.p0[slots].roll(1, 2))",
              "outs.append(y)"])],
        [(0, 1)]), "DS", True, "equivalent"),
    "F11 a pool returned by the model as is escapes the layer ownership probe": (program(
        [pool("SD", 5, 6, 2, 5)], [(1, ["win = torch.cat([self.p0[slots], x[:, :, :2]], 1)", "self.p0[slots] = win[:, 1:]"])],
        [(0, 1)], layers=(0,), model_lines=["outs.append(self.layers[0].p0)"]), "DS", False, "equivalent"),
    # issue 20's second axis: the Python around the graph
    "F12 a plain model's state_dict loaded into the optimized one: raw pages (a buffer) holding a moved pool "
    "are copied byte for byte, and the pool reads the model's order as its new one": (program(
        [pool("SD", 3, 2, 4, 3)], [(1, DECODE_SD)], [(0, 2), (0, 2)],
        around=around(pool("SD", 3, 2, 4, 3), backing="raw", binding="attribute", raw_buffer=True,
                      actions=[(1, "state_dict-fresh")])), "DS", False, "equivalent"),
    "F13 the optimized model's state_dict loaded into a plain model: raw pages (a buffer) holding a moved pool "
    "come out in the pool's new order": (program(
        [pool("SD", 3, 2, 4, 3)], [(1, DECODE_SD)], [(0, 2), (0, 2)],
        around=around(pool("SD", 3, 2, 4, 3), backing="raw", binding="attribute", raw_buffer=True,
                      actions=[(1, "state_dict-export")])), "DS", False, "equivalent"),
    "F14 a layer kind refused at its first call after the layers before it ran theirs: their state writes stand": (
        fm.Program((pool("SD", 3, 2, 4, 3), pool("SD", 3, 2, 4, 3, index=1)),
                   (fm.Entry(0, 1, False, (), (), (tuple(DECODE_SD), ("outs.append(self.p1.transpose(1, 2))",))),),
                   "mode", True, "int64", ((0, 2),), 0, True, (0, 1)), "DS", False, "ok"),
    "F15 'no state pool found in the first call' is raised after that call ran: its Python side effects stand": (
        program([pool("SD", 3, 2, 4, 3)], [(1, ["self.seen += x.shape[0]"]), (1, DECODE_SD)], [(0, 2), (1, 2)],
                dispatch="rank", around=around(pool("SD", 3, 2, 4, 3), features=("counter",))), "DS", False, "ok"),
    "F16 a pickled or deep-copied optimized model forgets the model's order of its moved pools: raw pages read "
    "back in the moved order, and a later graph reading the pages as bytes runs instead of being refused": (program(
        [pool("SD", 3, 2, 4, 3)], [(1, DECODE_SD), (1, ["outs.append(self.raw[slots, :3] * 1.0)"])],
        [(0, 2), (1, 2)], around=around(pool("SD", 3, 2, 4, 3), backing="raw", binding="attribute",
                                        actions=[(1, "deepcopy")])), "DS", False, "equivalent"),
    "F17 a memory-order view in an entry first called after the pool moved fails in torch (RuntimeError), "
    "not with a LayoutPassError": (program(
        [pool("SD", 3, 2, 4, 3)], [(1, DECODE_SD), (1, ["outs.append(self.p0.view(3, -1) * 1.0)"])],
        [(0, 2), (1, 2)]), "DS", False, "equivalent"),
    "F18 a view of a layer's pool taken by the model's eager code before the layer's first call, returned: the "
    "pool moves after that call and the view reads its new order (silent wrong output)": (dataclasses.replace(program(
        [pool("SD", 3, 2, 4, 3)], [(1, DECODE_SD)], [(0, 2)], layers=(0,),
        model_lines=["outs.append(self.layers[0].p0[0])"]), layer_calls="before"), "DS", False, "equivalent"),
    "F20 a pickled optimized model whose pools are views of raw pages: pickle gives each tensor its own copy of "
    "the memory, so the pages no longer share the pool's and kept its bytes in the moved order": (program(
        [pool("SD", 3, 2, 4, 3)], [(1, DECODE_SD)], [(0, 2), (0, 2)],
        around=around(pool("SD", 3, 2, 4, 3), backing="raw", binding="attribute", actions=[(1, "pickle")])),
        "DS", False, "equivalent"),
    "F21 a layer's forward pre-hook does not run once the model itself keeps state (a recurrent pool: the whole "
    "model is one unit): the snapshot the hook stores is never taken": (dataclasses.replace(program(
        [pool("SD", 3, 2, 4, 3)], [(1, DECODE_SD)], [(0, 2)], layers=(0,),
        model_lines=["outs.append(self.r0[slots] * 1.0)"],
        around=around(pool("SD", 3, 2, 4, 3), holder=0, features=("snapshot",), hooks=[
            "def snapshot(module, args):\n    module._ckpt = module.p0.detach().clone()"])),
        recurrent=(fm.RPool(0, "kv", "KV", 3, 0, 1, 2, 2, "", True),)),
        {"conv": "DS", "recurrent": "VK"}, False, "equivalent"),
    "F22 a pool scaled by a Python counter the forward moves (a symbolic int in the graph): the rewrite asked "
    "the number for its tensor rank and failed at capture (lowering on)": (program(
        [pool("SD", 3, 2, 4, 3)],
        [(1, ["self.seen += x.shape[0]", *DECODE_SD, "self.p0[slots] = self.p0[slots] * (0.5 + self.seen % 2)"])],
        [(0, 2), (0, 2), (0, 1)], around=around(pool("SD", 3, 2, 4, 3), features=("counter",))),
        "DS", True, "equivalent"),
    "F23 a pool carved out of raw pages, moved, then rebound to a copy of itself: the pages keep the old pool's "
    "bytes in its new order, and the pages read back differ from the model's": (program(
        [pool("SD", 3, 2, 4, 3)], [(1, [line.replace("self.p0", "self.kv_cache[0][0]") for line in DECODE_SD])],
        [(0, 2), (0, 2)], around=around(pool("SD", 3, 2, 4, 3), backing="raw", binding="list",
                                        actions=[(1, "rebind-clone", "m.kv_cache = [tuple(c.clone() for c in "
                                                                         "m.kv_cache[0])]")])), "DS", False, "equivalent"),
    "F24 one moved pool under two names (two layers share one state) inside raw pages: its bytes were put "
    "back in the model's order once per name when the pages were read logically (found by the long run)": (
        dataclasses.replace(program(
            [pool("SD", 3, 2, 4, 3)], [(1, [line.replace("self.p0", "self.kv_cache[0][0]") for line in DECODE_SD])],
            [(0, 2), (0, 2)], layers=(0, 0)), around=dataclasses.replace(around(
                pool("SD", 3, 2, 4, 3), holder=0, backing="raw", binding="list"), shared=(0, 1))),
        "DS", False, "equivalent"),
    "F25 a memory-order read of a pool in a graph lowered to the kernel's order: the report's action for its copy "
    "(materialized) was missing, so the capture failed (found by the long run)": (program(
        [pool("SD", 3, 2, 4, 3)], [(1, [*CAT_DECODE_SD, "outs.append(self.p0.reshape(3, -1) * 1.0)"])],
        [(0, 2), (0, 1)]), "DS", True, "equivalent"),
    "F26 a pickled optimized model whose raw pages are a registered buffer: the load_state_dict hook on it held the "
    "model, which was pickled a second time inside itself, and its pages were put back twice (found by the long "
    "run)": (program(
        [pool("SD", 3, 2, 4, 3)], [(1, [line.replace("self.p0", "self.kv_cache[0][0]") for line in DECODE_SD])],
        [(0, 2), (0, 2)], around=around(pool("SD", 3, 2, 4, 3), backing="raw", binding="list", raw_buffer=True,
                                        actions=[(1, "pickle")])), "DS", False, "equivalent"),
    "F27 a holder Dynamo stops capturing (a debug switch breaks its graph) after its pool moved ran its debug "
    "code, written for the model's order, on the moved pool: a write through flatten was lost": (program(
        [pool("SD", 3, 2, 4, 3)],
        [(1, ["if self.debug:", "    torch._dynamo.graph_break()", "    flat = self.p0.flatten(1)",
              "    flat[slots, :4] *= 0.5", *DECODE_SD])],
        [(0, 2), (0, 2), (0, 2)], around=around(pool("SD", 3, 2, 4, 3), features=("debug",),
                                                actions=[(1, "debug-on", "m.debug = True")])), "DS", False, "equivalent"),
    "F28 eager code in the model's forward (no layer of it), first run in a later call structure, writes "
    "through reshape of a moved layer pool: the write goes to a copy and is lost (the rehearsal watches the "
    "first call's eager code only)": (
        fm.Program((pool("SD", 3, 2, 4, 3),),
                   (fm.Entry(0, 1, False, (), (), (tuple(DECODE_SD),)),
                    fm.Entry(1, 1, False, ("self.layers[0].p0.reshape(3, -1)[:, :2].mul_(0.5)",),
                             ("outside write:memory-order-reshape",), (tuple(DECODE_SD),))),
                   "mode", True, "int64", ((0, 2), (1, 2)), 0, False, (0,)), "DS", False, "equivalent"),
    "F29 a layer of a model with eager code stops being captured after its pool (in raw pages) moved: the pool "
    "went back while the later call's eager watch was on, and the pass's own storage reads there were taken for "
    "the model's (found by the long run)": (program(
        [pool("SD", 3, 2, 4, 3)],
        [(1, ["if self.debug:", "    torch._dynamo.graph_break()", "    self.p0.flatten(1)[slots, :4] *= 0.5",
              *DECODE_SD])],
        [(0, 2), (0, 2), (0, 2)], layers=(0,),
        around=around(pool("SD", 3, 2, 4, 3), holder=0, backing="raw", binding="attribute", features=("debug",),
                      actions=[(1, "debug-on", "m.layers[0].debug = True")])), "DS", False, "equivalent"),
    "F30 a pool carved out of raw pages under a second name, moved, then the cache dict rebound to copies: the "
    "pages went back to the model's order, and the second name, still addressing them in the moved order, read "
    "them scrambled (fuzz seed 16)": (program(
        [pool("SD", 3, 2, 4, 3)], [(1, [line.replace("self.p0", "self.cache['conv0']") for line in DECODE_SD])],
        [(0, 2), (0, 2)], around=around(pool("SD", 3, 2, 4, 3), backing="raw", binding="dict", alias="attribute",
                                        actions=[(1, "rebind-clone", "m.cache = {k: v.clone() for k, v in "
                                                                         "m.cache.items()}")])), "DS", False, "equivalent"),
    "F19 a layer kind refused in a later call structure, after the layers before it in that call ran theirs": (
        fm.Program((pool("SD", 3, 2, 4, 3), pool("SD", 3, 2, 4, 3, index=1)),
                   (fm.Entry(0, 1, False, (), (), (tuple(DECODE_SD), tuple(line.replace("self.p0", "self.p1").replace("self.w0", "self.w1") for line in DECODE_SD))),
                    fm.Entry(1, 1, False, (), (), (tuple(DECODE_SD), ("outs.append(self.p1.transpose(1, 2))",)))),
                   "mode", True, "int64", ((0, 2), (1, 2), (0, 1)), 0, True, (0, 1)), "DS", False, "equivalent"),
}


# Findings open now: a name here marks its test a strict xfail, and OPEN_CLASSES[name]
# (program, outcome) -> bool tells the property which failures are that finding's.
OPEN_FINDINGS: set[str] = set()
OPEN_CLASSES: dict = {}


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.xfail(strict=True, reason="open: " + name)]
                                               if name in OPEN_FINDINGS else []) for name in FINDINGS])
def test_finding(name):
    prog, layout, lower, fixed = FINDINGS[name]
    outcome = fm.check(prog, layout, lower)
    assert outcome.kind == "equivalent" if fixed == "equivalent" else outcome.ok, \
        f"{outcome}\n{prog.script(layout, lower)}"


# ----------------------------------------------------------------------------- the harness


class Sabotaged:
    """Stand-ins for optimize(): a plain copy (always equivalent) and others that break the promise."""

    @staticmethod
    def copy(model, layout, **kwargs):
        return copy.deepcopy(model)

    @staticmethod
    def nudged_weight(model, layout, **kwargs):
        fast = copy.deepcopy(model)
        with torch.no_grad():
            fast.w0.add_(1e-3)
        return fast

    @staticmethod
    def refuses(model, layout, **kwargs):
        raise LayoutPassError("refused")

    @staticmethod
    def changes_then_refuses(model, layout, **kwargs):
        fast = copy.deepcopy(model)

        def capture(*args, **kw):
            fast.p0.add_(1.0)
            raise LayoutPassError("refused after the state changed")
        fast.forward = capture
        return fast

    @staticmethod
    def fails_running(model, layout, **kwargs):
        """A captured graph whose op raises (as a kernel's argument check would)."""
        fast = copy.deepcopy(model)
        graph = torch.fx.symbolic_trace(lambda x: _kernel_check(x))
        fast.forward = lambda x, *args, **kw: graph(x)
        return fast


    @staticmethod
    def touches_the_caller(model, layout, **kwargs):
        """Leaves a meta tensor in the model it was given (as a probe on meta tensors could)."""
        fast = copy.deepcopy(model)
        model._ckpt = torch.empty(0, device="meta")
        return fast

    @staticmethod
    def loses_side_effects(model, layout, **kwargs):
        """Its forward's Python side effects are lost (as a graph that froze `self.seen` would)."""
        fast = copy.deepcopy(model)

        def forward(*args, **kw):
            seen = fast.seen
            out = type(fast).forward(fast, *args, **kw)
            fast.seen = seen
            return out
        fast.forward = forward
        return fast

    @staticmethod
    def pickles_to_another_order(model, layout, **kwargs):
        """A copy whose pickled self comes back with the pool in another memory order, its bytes
        left as they were (as a copy that forgot what moved would)."""
        return _Misordered(copy.deepcopy(model))

    @staticmethod
    def refuses_after_hooks(model, layout, **kwargs):
        """Refuses every call after the model's pre-hooks ran (they are eager code: allowed)."""
        fast = copy.deepcopy(model)

        def refuse(*args, **kw):
            raise LayoutPassError("refused once the pre-hooks ran")
        fast.forward = refuse
        return fast


class _Misordered:
    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        return _misordered, (pickle.dumps(self.model),)


def _misordered(data):
    model = pickle.loads(data)
    pool = model.p0
    model.p0 = torch.empty_strided(pool.shape, (pool.stride(0), 1, pool.shape[1])).set_(
        pool.untyped_storage(), 0, pool.shape, (pool.stride(0), 1, pool.shape[1]))
    return model


def _kernel_check(x):
    raise LayoutPassError("a kernel's argument check, at run time")


torch.fx.wrap("_kernel_check")


@settings(max_examples=20, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(program=CI_PROGRAMS)
def test_programs_are_valid_and_deterministic(program):
    """The original against its own copy is always equivalent: the programs are valid, well-typed
    and deterministic, so every failure the property reports is the pass's."""
    assert fm.check(program, "DS", False, optimizer=Sabotaged.copy).kind == "equivalent"


@settings(max_examples=20, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(program=CI_RECURRENT_PROGRAMS)
def test_recurrent_programs_are_valid_and_deterministic(program):
    """The same for the programs with recurrent pools (the recurrence ops' argument checks pass)."""
    assert program.recurrent
    assert fm.check(program, program.layouts[0], False, optimizer=Sabotaged.copy).kind == "equivalent"


def test_the_property_tells_each_outcome():
    prog = program([pool("SD", 3, 2, 4, 3)], [(1, DECODE_SD)], [(0, 2), (0, 2)])
    assert fm.check(prog, "DS", False, optimizer=Sabotaged.nudged_weight).kind == "mismatch"
    assert fm.check(prog, "DS", False, optimizer=Sabotaged.refuses).kind == "refused"
    assert fm.check(prog, "DS", False, optimizer=Sabotaged.changes_then_refuses).kind == "late-refusal"
    assert fm.check(prog, "DS", False, optimizer=Sabotaged.fails_running).kind == "crash"


def test_the_property_on_the_python_around_the_graph():
    p = pool("SD", 3, 2, 4, 3)
    counted = program([p], [(1, ["self.seen += x.shape[0]", *DECODE_SD])], [(0, 2), (0, 2)],
                      around=around(p, features=("counter",)))
    assert fm.check(counted, "DS", False, optimizer=Sabotaged.touches_the_caller).kind == "caller-changed"
    lost = fm.check(counted, "DS", False, optimizer=Sabotaged.loses_side_effects)
    assert lost.kind == "mismatch" and "Python attribute seen" in lost.detail
    pickled = program([p], [(1, DECODE_SD)], [(0, 2), (0, 2)], around=around(p, actions=[(1, "pickle")]))
    assert fm.check(pickled, "DS", False, optimizer=Sabotaged.copy).kind == "equivalent"
    wrong = fm.check(pickled, "DS", False, optimizer=Sabotaged.pickles_to_another_order)
    assert wrong.kind == "mismatch" and "after the harness before step 1 (pickle)" in wrong.detail
    hooked = program([p], [(1, DECODE_SD)], [(0, 2)], around=around(p, features=("snapshot",), hooks=[
        "def snapshot(module, args):\n    module._ckpt = module.p0.detach().clone()"]))
    assert fm.check(hooked, "DS", False, optimizer=Sabotaged.refuses_after_hooks).kind == "refused"


def test_a_script_is_a_standalone_repro(tmp_path):
    """script() runs on its own: the harness, the checks of outputs, state, attributes and the caller."""
    import subprocess
    import sys
    prog, layout, lower, _ = FINDINGS[next(name for name in FINDINGS if name.startswith("F12 "))]
    p = pool("SD", 3, 2, 4, 3)
    listed = [line.replace("self.p0", "self.kv_cache[0][0]") for line in DECODE_SD]
    fine = program([p], [(1, ["self.seen += x.shape[0]", *listed])], [(0, 2), (0, 1), (0, 2)],
                   around=around(p, binding="list", features=("counter",),
                                 actions=[(1, "pickle"), (1, "state_dict-scaled"), (2, "rebind-same",
                                          "m.kv_cache = [tuple(m.kv_cache[0])]")]))
    for script, expected in ((fine.script("DS", False), "equivalent"), (prog.script(layout, lower), "equivalent")):
        path = tmp_path / "repro.py"
        path.write_text(script)
        run = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert expected in run.stdout + run.stderr, run.stdout + run.stderr[-3000:]
