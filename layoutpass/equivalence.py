"""check_equivalence: run one serving scenario through two models and compare every step's
outputs and all their state (buffers, tensor attributes, tensors in lists and dicts) after
every step. A relayouted pool keeps its shape, so both sides compare element by element."""

from collections.abc import Iterable, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import ArgumentError

# Default tolerances: none. Relayouting changes strides, not arithmetic, so the same kernels
# give bit-identical results; pass rtol/atol when the two sides run different kernels.
EXACT = (0.0, 0.0)


@dataclass(frozen=True)
class StepResult:
    step: int
    kind: str
    output_error: float  # max |difference| of the step's outputs
    state_error: float  # max |difference| over every buffer's logical contents after the step
    worst_buffer: str | None
    ok: bool


@dataclass(frozen=True)
class EquivalenceResult:
    steps: tuple[StepResult, ...]
    rtol: float
    atol: float

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        bad = [s for s in self.steps if not s.ok]
        steps = f"{len(self.steps)} step{'s' if len(self.steps) != 1 else ''}"
        head = (f"equivalent over {steps} (rtol={self.rtol}, atol={self.atol})" if not bad else
                f"NOT equivalent: {len(bad)} of {steps} differ{'s' if len(bad) == 1 else ''} "
                f"(rtol={self.rtol}, atol={self.atol})")
        rows = [f"  step {s.step:3d} {s.kind:8s} output {s.output_error:.3g}  state {s.state_error:.3g}"
                f"{'' if s.ok else '  <- ' + str(s.worst_buffer)}" for s in self.steps]
        return "\n".join([head, *rows])


def logical_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every state tensor of the model by path (through torch.compile's wrapper), as the model
    it was optimized from holds it: a raw allocation its moved pools live in reads back in the
    model's order."""
    from .state import logical_state

    model = getattr(model, "_orig_mod", model)
    if "_lp" in vars(model):  # raw pages a rebound pool left in its new order go back first
        model.__dict__["_lp"].settle_unbound()
    pools = getattr(getattr(model, "report", None), "pools", {})
    return logical_state(model, {p.name: (p.axes, p.source) for p in pools.values() if p.moves and not p.argument})


def _load_logical(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Load state by path; a container of moved pools is not written directly (its pools are,
    through their own paths)."""
    from .state import state_tensors

    model = getattr(model, "_orig_mod", model)
    given = dict(state_tensors(model))
    logical = logical_buffers(model)
    for name, tensor in given.items():
        if name in values and logical[name] is tensor:
            tensor.copy_(values[name])
    for name, tensor in given.items():
        if name in values and logical[name] is not tensor:
            _load_container(model, name, tensor, values[name])


def _load_container(model: nn.Module, name: str, tensor: torch.Tensor, value: torch.Tensor) -> None:
    """A container's bytes outside its moved pools (the pools are loaded through their paths)."""
    kept = {p: t.clone() for p, t in logical_buffers(model).items() if p != name and t.untyped_storage().data_ptr()
            == tensor.untyped_storage().data_ptr()}
    tensor.copy_(value)
    from .state import state_tensors

    for p, t in state_tensors(model):
        if p in kept:
            t.copy_(kept[p])


@contextmanager
def _restored(model: nn.Module):
    """Both models' state is as it was once the comparison is done."""
    saved = {name: t.clone() for name, t in logical_buffers(model).items()}
    try:
        yield
    finally:
        with torch.no_grad():
            _load_logical(model, saved)


@torch.no_grad()
def check_equivalence(reference: nn.Module, candidate: nn.Module, scenario=None, *, steps: int = 16,
                      prefills: int = 3, seed: int = 0, rtol: float | None = None,
                      atol: float | None = None) -> EquivalenceResult:
    """Run `scenario` through both models from the same random logical state, comparing outputs
    and every buffer after every step; both models' buffers are restored afterwards. scenario:
    a list of calls, each a dict of keyword arguments of forward (or a
    layoutpass.examples.scenario.Step, which names its kind); by default the reference's own,
    `reference.scenario(prefills=, decode_steps=steps, seed=)`, as layoutpass.examples LMs and
    layoutpass.hf.CacheAsBuffers give. rtol, atol: tolerances (default: exact)."""
    from layoutpass.examples.scenario import fill_state

    _count("steps", steps, 0)
    _count("prefills", prefills, 1)
    _count("seed", seed, None)
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
            raise ArgumentError(name, f"expected a number >= 0, got {value!r}")
    if scenario is None:
        if not callable(getattr(reference, "scenario", None)):
            raise ArgumentError("scenario", "give a scenario for a model without a scenario() method")
        scenario = reference.scenario(prefills=prefills, decode_steps=steps, seed=seed)
    scenario = _steps(scenario)
    rtol, atol = (EXACT[0] if rtol is None else rtol), (EXACT[1] if atol is None else atol)
    results = []
    with ExitStack() as stack:
        stack.enter_context(_restored(reference))
        stack.enter_context(_restored(candidate))
        fill_state(reference, seed)
        _load_logical(candidate, logical_buffers(reference))
        arguments = _pool_arguments(candidate)
        moved: dict[int, tuple] = {}  # id(the caller's pool) -> (name, Pool, it, the candidate's own copy)
        for i, step in enumerate(scenario):
            theirs = {k: _own_copy(k, v, arguments[k], moved) if k in arguments and isinstance(v, torch.Tensor) else v
                      for k, v in step.inputs.items()}
            out_ref, out_cand = reference(**step.inputs), candidate(**theirs)
            out_err = _error(out_ref, out_cand)
            ok = _close(out_ref, out_cand, rtol, atol)
            state_err, worst = 0.0, None
            cand_state = logical_buffers(candidate)
            pairs = [(name, ref, cand_state[name]) for name, ref in logical_buffers(reference).items()]
            pairs += [(f"pool argument {name}", ref, copy_) for name, pool, ref, copy_ in moved.values()]
            for name, ref, cand in pairs:
                err = _error(ref, cand)
                if not _close(ref, cand, rtol, atol):
                    ok, worst = False, worst or name
                state_err = max(state_err, err)
            results.append(StepResult(i, step.kind, out_err, state_err, worst, ok))
    return EquivalenceResult(tuple(results), rtol, atol)


def _count(name: str, value, least: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
        raise ArgumentError(name, f"expected an int{f' >= {least}' if least is not None else ''}, got {value!r}")


def _steps(scenario) -> list:
    """The scenario as a list of Steps: a plain dict is one call of kind "call"."""
    from layoutpass.examples.scenario import Step

    if isinstance(scenario, (str, bytes, Mapping)) or not isinstance(scenario, Iterable):
        hint = " (one call? put it in a list: [{...}])" if isinstance(scenario, Mapping) else ""
        raise ArgumentError("scenario", f"expected a list of steps, got a {type(scenario).__name__}{hint}")
    steps = []
    for i, step in enumerate(scenario):
        inputs = step if isinstance(step, Mapping) else getattr(step, "inputs", None)
        if not isinstance(inputs, Mapping):
            raise ArgumentError(f"scenario[{i}]", f"expected a dict of keyword arguments or a Step, "
                                                  f"got a {type(step).__name__}")
        bad = [key for key in inputs if not isinstance(key, str)]
        if bad:
            raise ArgumentError(f"scenario[{i}]", f"keyword arguments are named by strings, got {bad[0]!r}")
        steps.append(Step("call" if isinstance(step, Mapping) else getattr(step, "kind", "call"), dict(inputs)))
    if not steps:
        raise ArgumentError("scenario", "no steps: nothing to compare")
    return steps


def _pool_arguments(candidate: nn.Module) -> dict:
    """Pools the candidate takes as forward arguments: name -> Pool."""
    candidate = getattr(candidate, "_orig_mod", candidate)
    pools = getattr(getattr(candidate, "report", None), "pools", {})
    return {name: pool for name, pool in pools.items() if pool.argument}


def _own_copy(name: str, tensor: torch.Tensor, pool, moved: dict) -> torch.Tensor:
    """The candidate's own copy of a pool the caller passes, stored in the candidate's layout,
    made the first time the caller passes it: the same state then evolves in each model."""
    from .layout import dense_strides

    if id(tensor) not in moved:
        own = torch.empty_strided(tensor.shape, dense_strides(pool.axes, pool.target, tuple(tensor.shape)),
                                  dtype=tensor.dtype, device=tensor.device)
        moved[id(tensor)] = (name, pool, tensor, own.copy_(tensor))
    return moved[id(tensor)][3]


def _error(a, b) -> float:
    """max |a - b| over the tensors of two outputs (inf when their structures differ)."""
    a, b = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    return max(((x.double() - y.double()).abs().max().item() if x.numel() else 0.0 for x, y in zip(a, b)), default=0.0)


def _close(a, b, rtol: float, atol: float) -> bool:
    a, b = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(a) == len(b) and all(x.shape == y.shape and bool(torch.isclose(x.double(), y.double(), rtol=rtol,
                                                                            atol=atol).all()) for x, y in zip(a, b))
