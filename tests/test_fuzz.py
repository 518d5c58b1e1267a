"""The fuzzer in CI: programs written by tests/fuzz_models.py, optimized to DS and to SD, give the
original's outputs and logical state at every call in their order, or are refused with a
LayoutPassError before any buffer moved. Then one test per fuzz finding (issue 10), each a
minimized generated program (a strict xfail while it is open, a regression
test once fixed), and the harness's own checks (it sees a difference, it is
deterministic).

Cost: the property runs CI_EXAMPLES programs (FUZZ_EXAMPLES overrides), derandomized, without
shrinking (FUZZ_SHRINK=1 shrinks a failure to a minimal program; benchmarks/fuzz.py minimizes every
failure class)."""

import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fuzz_models as fm
from layoutpass import LayoutPassError

CI_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 200))
PHASES = (Phase.explicit, Phase.generate) + ((Phase.shrink,) if os.environ.get("FUZZ_SHRINK") else ())
CI_PROGRAMS = fm.programs(max_pools=2, max_entries=3, max_other_uses=1, max_calls=3)


@settings(max_examples=CI_EXAMPLES, derandomize=True, database=None, deadline=None, phases=PHASES,
          suppress_health_check=list(HealthCheck), print_blob=False)
@given(program=CI_PROGRAMS, lower=st.booleans())
def test_optimized_programs_match_the_original(program, lower):
    for layout in ("DS", "SD"):
        outcome = fm.check(program, layout, lower)
        assert outcome.ok, f"optimize(..., {layout!r}, lower={lower}): {outcome}\n{program.script(layout, lower)}"


# ----------------------------------------------------------------------------- findings


def pool(layout, slots, state_len, dim, width, index=0):
    return fm.Pool(index, layout, slots, state_len, dim, width, bias=False)


def program(pools, bodies, calls, dispatch="mode", named=False, layers=(), model_lines=()):
    """A fixed program: bodies are (tokens, lines) per entry, calls (entry, batch). With layers,
    each body is the one layer class's and model_lines the model's own."""
    entries = tuple(fm.Entry(i, tokens, False, tuple(model_lines), (), (tuple(lines),)) if layers else
                    fm.Entry(i, tokens, False, tuple(lines), ()) for i, (tokens, lines) in enumerate(bodies))
    return fm.Program(tuple(pools), entries, dispatch, True, "int64", tuple(calls), 0, named, tuple(layers))


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
}


OPEN_FINDINGS: set[str] = set()


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.xfail(strict=True, reason="open: " + name)]
                                               if name in OPEN_FINDINGS else []) for name in FINDINGS])
def test_finding(name):
    prog, layout, lower, fixed = FINDINGS[name]
    outcome = fm.check(prog, layout, lower)
    assert outcome.kind == "equivalent" if fixed == "equivalent" else outcome.ok, \
        f"{outcome}\n{prog.script(layout, lower)}"


# ----------------------------------------------------------------------------- the harness


class Sabotaged:
    """Stand-ins for optimize(): a plain copy (always equivalent) and three that break the promise."""

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


def _kernel_check(x):
    raise LayoutPassError("a kernel's argument check, at run time")


torch.fx.wrap("_kernel_check")


@settings(max_examples=20, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(program=CI_PROGRAMS)
def test_programs_are_valid_and_deterministic(program):
    """The original against its own copy is always equivalent: the programs are valid, well-typed
    and deterministic, so every failure the property reports is the pass's."""
    assert fm.check(program, "DS", False, optimizer=Sabotaged.copy).kind == "equivalent"


def test_the_property_tells_each_outcome():
    prog = program([pool("SD", 3, 2, 4, 3)], [(1, DECODE_SD)], [(0, 2), (0, 2)])
    assert fm.check(prog, "DS", False, optimizer=Sabotaged.nudged_weight).kind == "mismatch"
    assert fm.check(prog, "DS", False, optimizer=Sabotaged.refuses).kind == "refused"
    assert fm.check(prog, "DS", False, optimizer=Sabotaged.changes_then_refuses).kind == "late-refusal"
    assert fm.check(prog, "DS", False, optimizer=Sabotaged.fails_running).kind == "crash"
