"""Generated models that attack the pass (hypothesis strategies), and the property they must keep.

`programs()` writes small nn.Modules as Python source: one to three rank-3 conv-state pools
stored SD (slot, tok, dim) or DS (slot, dim, tok), one to three entry points (distinct call
structures of `forward`, told apart by a `mode` string, the rank of `x`, a keyword set or
`**kwargs`), each entry a random composition of pool uses: the conv ops, pure-torch updates
(cat or roll, multiply-and-sum or conv1d), slot gathers and scatters, views of every spelling,
resets, tail copies, memory-order views. Every composition is well typed by construction: the
generator tracks each value's axes (slot, b = the call's slots, tok, dim) and sizes.

The second axis (issue 20; `Around`, `arounds`, `around_lines`, `actions`): half the programs keep
their pools in one holder class (the model, or a layer class) the ways engines do -- each its own
tensor or views carved out of one raw per-slot page tensor; as buffers, plain attributes, a
vLLM-style `kv_cache` list of tuples or a dict; under a second name; one state shared by two
layers -- with Python state around the graph: flags the forward reads and sets, counters and
lists that reach the outputs, forward pre-hooks and hooks that touch the pool. The program's
`between(step, m)` is its harness: what a server does between calls (free slots, roll back, load
slots from a flat buffer, flip flags, reset the pages slot-wise, rebind or re-allocate the cache,
state_dict round trips, pickle, deepcopy), applied to the original and the optimized model alike.

Recurrent pools (issue "Every state pool", item 6; `RPool`, `programs(recurrent_share=)`): a share
of the programs (none by default) also keep one or two recurrent pools in the Model, axes (slot,
[snap], head, k, v) in either logical order, stored KV or VK (allocated so, or transposed), used by
selective_state_update / delta_rule_update in place by slot, by a pure-torch per-slot update (named
to optimize()), by transformers' pure-torch Mamba2 SSM step or gated delta rule (what the lowering
rules replace by the kernels), resets, gathers, one head, q . state outputs; `Program.layouts` gives the mappings
their checks use (DS + VK, SD + KV).

`check(program, layout, lower)` is the property (`layout` a string or a mapping): the optimized model, called in the program's
order with the harness between calls, gives the original's outputs, logical state and Python
attributes at every step (and after every harness step), and the model given to optimize() never
changes; or a LayoutPassError stops a call before it changed anything (its pre-hooks aside).
Anything else is a failure, classified for the tally. `Program.script()` prints all of it as a
standalone repro."""

import copy
import dataclasses
import linecache
import re
import sys
import time
import types
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from layoutpass import LayoutPassError, optimize
from layoutpass.equivalence import logical_buffers
from layoutpass.state import state_tensors

AXES = {"SD": ("slot", "tok", "dim"), "DS": ("slot", "dim", "tok")}
DISPATCH = ("mode", "keys", "kwargs", "rank")
KERNEL_WIDTHS = range(2, 7)  # the conv ops' widths; wider pools get pure-torch updates only
# a lowered kernel sums the taps in another order than the model's code (outputs), and a lowered
# recurrence computes its state in its own order too (state, from then on)
LOWERED_TOLERANCE = 1e-5
# torch reduces a contiguous axis in another order than a strided one: a sum or a matmul over a
# relayouted axis may differ in the last bits. Such outputs count apart ("rounding"); state is exact
# unless a recurrence was lowered.
ROUNDING = 1e-5


# ----------------------------------------------------------------------------- the program
# (Draws give the plain case at 0, where hypothesis shrinks to: shrunk programs stay plain.)


@dataclass(frozen=True)
class Pool:
    index: int
    layout: str  # as the model stores it
    slots: int
    state_len: int
    dim: int
    width: int
    bias: bool
    owner: str = "self"  # the module expression that keeps it, as the code using it sees it
    local: str = ""  # its name under the owner (default p<index>; `kv_cache[0][1]`, `q0`: see Around)
    dense: bool = True  # its own allocation (False: a view into per-slot pages, so .view() fails)

    @property
    def ref(self) -> str:
        return f"{self.owner}.{self.local or f'p{self.index}'}"

    @property
    def path(self) -> str:
        """Its state path under the module that keeps the owner (as optimize(state_buffers=) names it)."""
        below = self.owner.removeprefix("self").lstrip(".")
        return f"{below}.{self.local or f'p{self.index}'}" if below else self.local or f"p{self.index}"

    @property
    def axes(self) -> tuple[str, ...]:
        return AXES[self.layout]

    def size(self, label: str) -> int:
        return {"slot": self.slots, "tok": self.state_len, "dim": self.dim}[label]

    @property
    def weight(self) -> str:
        return f"self.w{self.index}"

    @property
    def bias_ref(self) -> str:
        return f"self.b{self.index}" if self.bias else "None"

    @property
    def shape(self) -> str:
        return ", ".join(str(self.size(a)) for a in self.axes)

    def init(self) -> list[str]:
        """Its buffer and parameters, created in the owner's __init__ (`gen` seeds them)."""
        lines = [f"{self.owner}.register_buffer('p{self.index}', torch.randn({self.shape}, generator=gen))"
                 f"  # {self.layout}, width {self.width}"]
        return lines + self.parameters()

    def parameters(self) -> list[str]:
        return [f"self.w{self.index} = nn.Parameter(torch.randn({self.dim}, {self.width}, generator=gen))"] + \
            ([f"self.b{self.index} = nn.Parameter(torch.randn({self.dim}, generator=gen))"] if self.bias else [])


@dataclass(frozen=True)
class Entry:
    index: int
    tokens: int  # T: x is (batch, T, E) inside the body
    whole: bool  # every call passes all slots (batch = number of slots)
    lines: tuple[str, ...]  # the model's own body for this call structure (a line may be a compound statement)
    kinds: tuple[str, ...]  # the use kinds in the bodies, for the tally
    layer_lines: tuple[tuple[str, ...], ...] = ()  # layered programs: the body of each layer class


@dataclass(frozen=True)
class Action:
    """What the harness does between two calls, the same on the original and the optimized model:
    `code` runs with `m` bound to the model the harness holds (and may rebind it: a copy goes on)."""

    step: int  # before this call
    code: str
    kind: str


@dataclass(frozen=True)
class Around:
    """The second axis (issue 20): the Python around the graph, in one class that keeps pools (the
    holder: the Model, or one layer class). How it keeps its pools -- each its own tensor or views
    into one per-slot page tensor (`backing`), as buffers, plain attributes, a vLLM-style
    `kv_cache` list of tuples or a dict (`binding`), perhaps under a second name (`alias`) -- and
    the Python state its code keeps: flags, counters, hooks that touch a pool. The entries' bodies
    carry the per-call lines (drawn by `around_lines`); `actions` are the harness's, between calls."""

    holder: int | None  # None: the Model; c: class Layer<c> (every instance of it)
    pools: tuple[Pool, ...]  # the holder's pools, named as its own code names them
    backing: str  # "own" | "raw"
    binding: str  # "buffer" | "attribute" | "list" | "dict"
    alias: str  # "" | "buffer" (registered twice) | "attribute" (a plain second name q<i>)
    raw_buffer: bool  # raw: the page tensor is a registered buffer (else a plain attribute)
    ssm: bool  # raw: an SSM-like state is carved out of the pages too, updated by the forward
    features: tuple[str, ...]  # of FEATURES
    server: int  # the pool (index into pools) that hooks and server methods act on
    hooks: tuple[str, ...] = ()  # module-level hook functions (source)
    actions: tuple[Action, ...] = ()
    shared: tuple[int, int] | None = None  # layer instances (k1, k2): k2 holds k1's pools (one state, two layers)

    def share(self) -> list[str]:
        """The Model's __init__ line binding layer k2's pools to layer k1's."""
        if self.shared is None:
            return []
        (k1, k2), name = self.shared, {"list": "kv_cache", "dict": "cache"}.get(self.binding)
        names = [name] if name else [f"p{p.index}" for p in self.pools] + \
            ([f"q{p.index}" for p in self.pools] if self.alias else [])
        return [f"self.layers[{k2}].{n} = self.layers[{k1}].{n}  # one state, two layers" for n in names]

    @property
    def served(self) -> Pool:
        return self.pools[self.server]

    def init(self) -> list[str]:
        """The holder's __init__ after its parameters: Python state, the pools, hooks."""
        lines = []
        if "flag" in self.features:
            lines += ["self.has_previous_state = False  # set by the forward, cleared by the server",
                      "self.continue_from_cache = True"]
        if "counter" in self.features:
            lines += ["self.seen = 0", "self.history = []"]
        if "drain" in self.features:
            kwargs = any(h.startswith("def drain(module, args, kwargs)") for h in self.hooks)
            lines += ["self.to_free = []  # slots the scheduler queued",
                      f"self.register_forward_pre_hook(drain{', with_kwargs=True' if kwargs else ''})"]
        if "snapshot" in self.features:
            lines += ["self._ckpt = None", "self.register_forward_pre_hook(snapshot)"]
        if "after" in self.features:
            lines.append("self.register_forward_hook(after)")
        if "debug" in self.features:
            lines.append("self.debug = False  # a server turns on debugging: the forward breaks Dynamo's graph")
        return ["self.allocate(gen)"] + lines

    def methods(self) -> list[str]:
        """allocate() (the state, also called by a server to re-allocate it) and the server's
        methods the actions call, all written for the model's own layout."""
        pools, lines = self.pools, ["def allocate(self, gen):"]
        if self.backing == "raw":
            sizes = [p.state_len * p.dim for p in pools]
            lines.append(f"    raw = torch.randn({pools[0].slots}, {sum(sizes) + 4 * self.ssm}, generator=gen)"
                         f"  # one page per slot")
            lines.append("    self.register_buffer('raw', raw)" if self.raw_buffer else "    self.raw = raw")
            starts = [sum(sizes[:i]) for i in range(len(pools))]
            made = [f"raw[:, {a}:{a + n}].view({p.shape})" for p, a, n in zip(pools, starts, sizes)]
            if self.ssm:
                lines.append(f"    self.ssm = raw[:, {sum(sizes)}:].view({pools[0].slots}, 2, 2)")
        else:
            made = [f"torch.randn({p.shape}, generator=gen)" for p in pools]
        if self.binding in ("list", "dict"):
            lines += [f"    p{p.index} = {m}  # {p.layout}, width {p.width}" for p, m in zip(pools, made)]
            lines.append(f"    self.kv_cache = [({''.join(f'p{p.index}, ' for p in pools)})]" if self.binding == "list"
                         else f"    self.cache = {{{', '.join(f'{_key(p)!r}: p{p.index}' for p in pools)}}}")
        else:
            lines += [f"    self.register_buffer('p{p.index}', {m})  # {p.layout}, width {p.width}"
                      if self.binding == "buffer" else f"    self.p{p.index} = {m}  # {p.layout}, width {p.width}"
                      for p, m in zip(pools, made)]
        if self.alias:
            lines += [f"    self.register_buffer('q{p.index}', {p.ref})" if self.alias == "buffer"
                      else f"    self.q{p.index} = {p.ref}  # a second name" for p in pools]
        p, used = self.served.ref, {a.kind for a in self.actions}
        server = {
            "free_slots": ["def free_slots(self, slots):", f"    {p}[slots] = 0.0"],
            "rollback": ["def rollback(self, slot):  # the last token of this slot was rejected",
                         f"    {p}[slot] = torch.roll({p}[slot], 1, 0)"],
            "load_slots": ["def load_slots(self, slots, flat):  # a connector loads states from a flat buffer",
                           f"    {p}[slots] = flat.view(len(slots), *{p}.shape[1:])"],
            "undo": ["def undo(self, slots):  # back to the snapshot taken before the last call",
                     f"    {p}[slots] = self._ckpt[slots]"]}
        for name, method in server.items():
            if name in used:
                lines += ["", *method]
        return lines

    def kinds(self) -> set[str]:
        return {f"py:backing-{self.backing}", f"py:binding-{self.binding}", "py:around",
                *({f"py:alias-{self.alias}"} if self.alias else ()), *({"py:ssm"} if self.ssm else ()),
                *({"py:shared by two layers"} if self.shared else ()),
                *(f"py:{f}" for f in self.features), *(f"act:{a.kind}" for a in self.actions)}

    def between(self) -> list[str]:
        """The harness as a function of the model it holds (the check and the repro both call it)."""
        lines = ["def between(step, m):",
                 '    """The harness before call `step`, the same on the original and the optimized model."""']
        for step in sorted({a.step for a in self.actions}):
            lines.append(f"    if step == {step}:")
            lines += [f"        {line}" for a in self.actions if a.step == step for line in a.code.split("\n")]
        return lines + ["    return m"]


def _key(p: Pool) -> str:
    return f"conv{p.index}"


def _indented(lines, prefix: str) -> list[str]:
    """Source lines under `prefix`; a compound statement (one string of several lines) stays whole."""
    return [f"{prefix}{line}" for s in lines for line in s.split("\n")]


@dataclass(frozen=True)
class Program:
    """pools: without layers, the model's own (owner self or self.sub); with layers, one per
    layer class (owner self inside the layer). layers: the class of each layer instance, in
    order (a class twice: identical layers, one capture for both); empty: no layers."""

    pools: tuple[Pool, ...]
    entries: tuple[Entry, ...]
    dispatch: str
    keyword_mode: bool  # mode passed by keyword (else positionally)
    slot_dtype: str
    calls: tuple[tuple[int, int], ...]  # (entry, batch) in call order
    seed: int
    named: bool  # the pools are named to optimize() (state_buffers=), not left to discovery
    layers: tuple[int, ...] = ()
    layer_calls: str = "after"  # the model's own lines come "after" or "before" the layers; "twice": layers run twice
    upfront: bool = False  # every call structure captured by optimize(example_inputs=), not on its first call
    around: Around | None = None  # the Python around the graph (None: pools as plain buffers, nothing else)
    recurrent: tuple["RPool", ...] = ()  # recurrent pools, kept by the Model (none: a conv-only program)

    def example_inputs(self, inputs) -> list | None:
        """One call of each (entry, batch), other data than the run's, for optimize(example_inputs=)."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        return [inputs(e, b, gen) for e, b in dict.fromkeys(self.calls)] if self.upfront else None

    @property
    def slots(self) -> int:
        return self.pools[0].slots

    @property
    def width_x(self) -> int:
        return max([p.dim for p in self.pools] + [r.heads * max(r.k, r.v) for r in self.recurrent])

    @property
    def layouts(self) -> tuple:
        """The layouts the property checks it in: DS and SD; with recurrent pools, the mappings
        DS + VK and SD + KV (each kind in both of its layouts)."""
        return R_LAYOUTS if self.recurrent else ("DS", "SD")

    @property
    def kinds(self) -> set[str]:
        """The uses in the bodies and the program's shape (config:...), for the tally."""
        config = {f"config:dispatch-{self.dispatch}", f"config:entries-{len(self.entries)}",
                  f"config:pools-{len(self.pools)}"}
        config |= {"config:named pools"} if self.named else set()
        config |= {"config:captured up front"} if self.upfront else set()
        if self.layers:
            config |= {"config:layers", f"config:layers-{self.layer_calls}"}
            config |= {"config:identical layers"} if len(set(self.layers)) < len(self.layers) else set()
            config |= {"config:pool in a layer's child"} if any(p.owner == "self.inner" for p in self.pools) else set()
        config |= self.around.kinds() if self.around else set()
        config |= {k for r in self.recurrent for k in r.kinds()}
        return {k for e in self.entries for k in e.kinds} | config

    def _holds(self, c: int | None) -> bool:
        return self.around is not None and self.around.holder == c

    def source(self) -> str:
        """The model, its inputs and its call order, as a standalone Python module."""
        a = self.around
        classes = []
        for c in sorted(set(self.layers)):
            pool = self.pools[c]
            init = (["self.inner = nn.Module()"] if pool.owner == "self.inner" else []) + \
                (pool.parameters() + a.init() if self._holds(c) else pool.init())
            classes += [f"class Layer{c}(nn.Module):", "    def __init__(self, gen):", "        super().__init__()",
                        *_indented(init, "        "), "",
                        *(_indented(a.methods(), "    ") + [""] if self._holds(c) else []),
                        *self._forward([e.layer_lines[c] for e in self.entries]), "", ""]
        init = [f"gen = torch.Generator().manual_seed({self.seed})"]
        if self.layers:
            init.append(f"self.layers = nn.ModuleList([{', '.join(f'Layer{c}(gen)' for c in self.layers)}])")
            init += a.share() if a else []
        elif self._holds(None):
            init += [line for p in self.pools for line in p.parameters()] + a.init()
        else:
            init += ["self.sub = nn.Module()"] if any(p.owner == "self.sub" for p in self.pools) else []
            init += [line for p in self.pools for line in p.init()]
        init += [line for r in self.recurrent for line in r.init()]
        call = {"mode": "x, slots, mode", "keys": "x, slots, gate=gate, flag=flag", "kwargs": "x, slots, **kwargs",
                "rank": "x, slots"}[self.dispatch]
        layers = ["        for layer in self.layers:", f"            outs.extend(layer({call}))"] if self.layers else []
        layers *= 2 if self.layer_calls == "twice" else 1
        head = ["import copy", "import pickle", ""] if a else ["import copy", ""]  # the driver deep-copies the model
        hooks = [line for h in a.hooks for line in (*h.split("\n"), "", "")] if a else []
        return "\n".join([
            *head, "import torch", "import torch.nn.functional as F", "from torch import nn", "",
            "from layoutpass.kernels import conv_prefill, conv_update" +
            (", delta_rule_update, selective_state_update" if self.recurrent else ""), "", "", *hooks, *classes,
            "class Model(nn.Module):", "    def __init__(self):", "        super().__init__()",
            *_indented(init, "        "), "",
            *(_indented(a.methods(), "    ") + [""] if self._holds(None) else []),
            *self._forward([e.lines for e in self.entries], layers, self.layer_calls == "before"), "", "",
            *self._inputs(), "", *(a.between() + ["", ""] if a and a.actions else []),
            f"CALLS = {list(self.calls)}  # (entry, batch)", ""])

    def _forward(self, bodies, layers=(), layers_last=False) -> list[str]:
        signature = {"mode": "x, slots, mode", "keys": "x, slots, gate=None, flag=None",
                     "kwargs": "x, slots, **kwargs", "rank": "x, slots"}[self.dispatch]
        lines = [f"    def forward(self, {signature}):", "        outs = []", *(() if layers_last else layers)]
        for e, body in zip(self.entries, bodies):
            test, prologue = self._branch(e)
            lines.append(f"        {'if' if e.index == 0 else 'elif'} {test}:")
            lines += _indented((*prologue, *body), "            ") or ["            pass"]
        lines += [*(layers if layers_last else ()), "        return tuple(outs)"]
        return lines

    def _branch(self, e: Entry) -> tuple[str, list[str]]:
        i = e.index
        if self.dispatch == "mode":
            return f"mode == 'e{i}'", []
        if self.dispatch == "rank":
            return (f"x.dim() == {2 + i}", [["x = x[:, None]"], [], ["x = x[0]"]][i])
        if self.dispatch == "kwargs":
            return (f"'e{i}' in kwargs", [f"x = x * kwargs['e{i}'][:, None, None]"]) if i else \
                ("not kwargs", [])
        return [("gate is None and flag is None", []), ("gate is not None", ["x = x * gate[:, None, None]"]),
                ("flag", [])][i]

    def _inputs(self) -> list[str]:
        lines = ["def inputs(entry, batch, gen):",
                 f"    slots = torch.randperm({self.slots}, generator=gen)[:batch].to(torch.{self.slot_dtype})"]
        for e in self.entries:
            x = f"torch.randn(batch, {e.tokens}, {self.width_x}, generator=gen)"
            gate = "torch.rand(batch, generator=gen) + 0.5"
            args, kwargs = {
                "mode": (f"({x}, slots)", f"{{'mode': 'e{e.index}'}}") if self.keyword_mode
                else (f"({x}, slots, 'e{e.index}')", "{}"),
                "rank": ([f"({x}[:, 0], slots)", f"({x}, slots)", f"({x}[None], slots)"][e.index], "{}"),
                "kwargs": (f"({x}, slots)", f"{{'e{e.index}': {gate}}}" if e.index else "{}"),
                "keys": (f"({x}, slots)", ["{}", f"{{'gate': {gate}}}", "{'flag': True}"][e.index]),
            }[self.dispatch]
            lines.append(f"    if entry == {e.index}:")
            lines.append(f"        return {args}, {kwargs}")
        return lines

    def state_buffers(self) -> dict[str, str | tuple[str, ...]] | None:
        recurrent = {r.path: r.axes for r in self.recurrent if r.named}
        if not self.named:
            return recurrent or None
        if self.layers:
            return {f"layers.{k}.{self.pools[c].path}": self.pools[c].layout for k, c in enumerate(self.layers)} | \
                recurrent
        return {p.path: p.layout for p in self.pools} | recurrent

    def script(self, layout: str, lower: bool) -> str:
        """The source and a driver that checks it against its untouched copy: a standalone repro."""
        values = {"LAYOUT": repr(layout), "LOWER": repr(lower), "SEED": str(self.seed), "UPFRONT": repr(self.upfront),
                  "NAMED": repr(self.state_buffers()), "TOLERANCE": repr(LOWERED_TOLERANCE), "ROUNDING": repr(ROUNDING)}
        return self.source() + re.sub(r"\b__([A-Z]+)__\b", lambda m: values[m.group(1)], DRIVER)

    def __repr__(self) -> str:
        return "\n" + self.source() + f"# optimize(..., state_buffers={self.state_buffers()})\n"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis prints a falsifying program as its source
        printer.text(repr(self))

    def namespace(self) -> dict:
        """Execute the source as a module (registered in sys.modules, so pickle finds its classes and
        hooks, and with linecache, so the pass's report quotes its lines). forget() removes it."""
        text = self.source()
        name = f"fuzz_program_{abs(hash((text, time.monotonic_ns()))):x}"
        filename = f"<fuzz program {name[13:]}>"
        linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
        module = types.ModuleType(name)
        sys.modules[name] = module
        exec(compile(text, filename, "exec"), module.__dict__)
        return module.__dict__


def forget(namespace: dict) -> None:
    sys.modules.pop(namespace["__name__"], None)


DRIVER = '''

if __name__ == "__main__":  # the optimized model against its untouched copy, call by call
    from layoutpass import optimize
    from layoutpass.equivalence import logical_buffers
    from layoutpass.state import state_tensors

    SKIP = set(vars(nn.Module())) | {"_lp", "forward"}  # nn.Module's bookkeeping, the optimized model's own

    def same(a, b, tol):
        return a.shape == b.shape and a.dtype == b.dtype and (
            torch.allclose(a, b, rtol=tol, atol=tol) if tol else torch.equal(a, b))

    def summary(v):  # a Python attribute (its tensors by shape: their values are compared as state)
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), v.dtype, v.device.type)
        if isinstance(v, (list, tuple, dict)):
            return type(v).__name__, [(k, summary(x)) for k, x in (v.items() if isinstance(v, dict) else enumerate(v))]
        return type(v).__name__, repr(v)

    def attributes(m):
        return {(path, k): summary(v) for path, mod in m.named_modules() for k, v in vars(mod).items()
                if k not in SKIP and not isinstance(v, nn.Module)}

    def compare(ref, fast, tol, when):
        r, f = logical_buffers(ref), logical_buffers(fast)
        assert r.keys() == f.keys(), f"{when}: state {sorted(r.keys() ^ f.keys())}"
        for name in r:
            assert same(r[name], f[name], tol), f"{when}: state {name} differs"
        assert attributes(ref) == attributes(fast), f"{when}: Python attributes differ"

    def untouched(model, pristine, when):  # the caller's model: its state and attributes as they were
        for (name, a), (_, b) in zip(state_tensors(model), state_tensors(pristine)):
            assert a.device == b.device and a.stride() == b.stride() and torch.equal(a, b), f"{when}: caller's {name}"
        assert attributes(model) == attributes(pristine), f"{when}: the caller's Python attributes changed"

    harness = globals().get("between", lambda step, m: m)
    model = Model()
    reference, pristine = copy.deepcopy(model), copy.deepcopy(model)
    gen0 = torch.Generator().manual_seed(__SEED__ + 1)  # optimize() captures every call structure now
    example = [inputs(e, b, gen0) for e, b in dict.fromkeys(CALLS)] if __UPFRONT__ else None
    fast = optimize(model, __LAYOUT__, lower=__LOWER__, state_buffers=__NAMED__, example_inputs=example)
    gen = torch.Generator().manual_seed(__SEED__)
    # a lowered kernel rounds apart from the model's code, and a recurrence's rounding stays in the
    # state (the report may no longer list a graph that ran): with lowering on, that much
    tol = __TOLERANCE__ if __LOWER__ else 0.0
    for step, (entry, batch) in enumerate(CALLS):
        reference, fast = harness(step, reference), harness(step, fast)
        compare(reference, fast, tol, f"before step {step}")
        args, kwargs = inputs(entry, batch, gen)
        expected, got = reference(*args, **kwargs), fast(*args, **kwargs)
        assert len(expected) == len(got), f"step {step} (entry {entry}): {len(got)} outputs, not {len(expected)}"
        for i, (a, b) in enumerate(zip(expected, got)):  # a sum over a relayouted axis may round apart
            assert same(a, b, max(tol, __ROUNDING__)), f"step {step} (entry {entry}): output {i} differs"
        compare(reference, fast, tol, f"step {step} (entry {entry})")
        untouched(model, pristine, f"step {step}")
    print("equivalent")
'''


# ----------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Value:
    """An expression derived from a pool: per axis its label and size. Labels: slot (the pool's
    slots), b (gathered by the call's slots), b1 (one gathered slot), tok, dim, flat (merged by a
    memory-order view), x (another's axis). offset: where a dim range starts (for x operands)."""

    expr: str
    axes: tuple[tuple[str, object], ...]  # (label, size); size None: the call's batch
    contiguous: bool  # contiguous in the original model (so .view() is valid there)
    dim_offset: int = 0

    @property
    def rank(self) -> int:
        return len(self.axes)

    def labels(self) -> list[str]:
        return [a for a, _ in self.axes]


@dataclass
class Body:
    """The lines of one entry under construction."""

    program_pools: tuple[Pool, ...]
    tokens: int
    whole: bool
    width_x: int
    lines: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    count: int = 0

    def name(self, stem="v") -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def let(self, expr: str, stem="v") -> str:
        var = self.name(stem)
        self.lines.append(f"{var} = {expr}")
        return var


def _swap(rank, a, b):
    p = list(range(rank))
    p[a % rank], p[b % rank] = p[b % rank], p[a % rank]
    return tuple(p)


def _moved(rank, src, dst):
    order = [d for d in range(rank) if d != src % rank]
    order.insert(dst % rank, src % rank)
    return tuple(order)


def _neg(draw, axis, rank) -> int:
    """An axis argument, sometimes negative."""
    return axis - rank if draw(st.booleans()) else axis


def spell(draw, perm: tuple[int, ...]) -> str:
    """A method-call suffix applying permutation `perm` (result axis i = input axis perm[i]),
    in one of the spellings that give it."""
    rank = len(perm)
    if perm == tuple(range(rank)):
        return draw(st.sampled_from(["", "", ".permute(" + ", ".join(map(str, perm)) + ")", ".mT.mT"])) \
            if rank >= 2 else ""
    options = [".permute(" + ", ".join(map(str, perm)) + ")"]
    moved = [i for i in range(rank) if perm[i] != i]
    if len(moved) == 2:
        a, b = moved
        options += [f".transpose({_neg(draw, a, rank)}, {_neg(draw, b, rank)})", f".swapaxes({a}, {b})",
                    f".swapdims({b}, {a})"]
        if (a, b) == (rank - 2, rank - 1):
            options.append(".mT")
        if rank == 2:
            options += [".t()", ".T"]
    options += [f".movedim({s}, {d})" for s in range(rank) for d in range(rank) if _moved(rank, s, d) == perm]
    return draw(st.sampled_from(options))


def _permuted(v: Value, perm, suffix) -> Value:
    identity = perm == tuple(range(len(perm)))
    return Value(f"{v.expr}{suffix}", tuple(v.axes[i] for i in perm), v.contiguous and identity, v.dim_offset)


# Read transforms: each takes a Value and gives (Value, kind) or None when it does not apply.

def t_permute(draw, body, v):
    if v.rank < 2:
        return None
    perm = tuple(draw(st.permutations(range(v.rank))))
    return _permuted(v, perm, spell(draw, perm)), "read:permute"


def t_select(draw, body, v):
    choices = [i for i, (label, size) in enumerate(v.axes) if size is not None or label == "b"]
    if v.rank < 2 or not choices:
        return None
    axis = draw(st.sampled_from(choices))
    label, size = v.axes[axis]
    index = 0 if size is None else draw(st.integers(-size, size - 1))
    spelled = draw(st.sampled_from(["select", "index"]))
    expr = f"{v.expr}.select({_neg(draw, axis, v.rank)}, {index})" if spelled == "select" else \
        f"{v.expr}[{':, ' * axis}{index}]"
    axes = v.axes[:axis] + v.axes[axis + 1:]
    return Value(expr, axes, v.contiguous and axis == 0, v.dim_offset), f"read:select-{label}"


def t_slice(draw, body, v):
    choices = [i for i, (label, size) in enumerate(v.axes) if isinstance(size, int) and size > 1
               and label in ("slot", "tok", "dim")]
    if not choices:
        return None
    axis = draw(st.sampled_from(choices))
    label, size = v.axes[axis]
    start = draw(st.integers(0, size - 1))
    stop = draw(st.integers(start + 1, size))
    how = draw(st.sampled_from(["slice", "narrow", "negative"]))
    if how == "narrow":
        expr = f"{v.expr}.narrow({_neg(draw, axis, v.rank)}, {start}, {stop - start})"
    else:
        lo, hi = (start - size, "" if stop == size else stop - size) if how == "negative" else (start, stop)
        expr = f"{v.expr}[{':, ' * axis}{lo}:{hi}]"
    axes = v.axes[:axis] + ((label, stop - start),) + v.axes[axis + 1:]
    offset = v.dim_offset + start if label == "dim" else v.dim_offset
    return Value(expr, axes, v.contiguous and axis == 0, offset), f"read:slice-{label}"


def t_gather(draw, body, v):
    if "slot" not in v.labels():
        return None
    axis = v.labels().index("slot")
    if v.axes[axis][1] != body.program_pools[0].slots:
        return None  # a slice of the slots: the call's slots may fall outside it
    how = draw(st.sampled_from(["index", "index_select"] if axis else ["index", "index", "index_select"]))
    expr = f"{v.expr}[{':, ' * axis}slots]" if how == "index" else \
        f"{v.expr}.index_select({_neg(draw, axis, v.rank)}, slots)"
    axes = v.axes[:axis] + (("b", None),) + v.axes[axis + 1:]
    return Value(expr, axes, v.contiguous and axis == 0, v.dim_offset), f"read:gather-{how}"


def t_copy(draw, body, v):
    how = draw(st.sampled_from(["contiguous", "clone", "double"]))
    suffix = {"contiguous": ".contiguous()", "clone": ".clone()", "double": ".to(torch.float64)"}[how]
    return Value(v.expr + suffix, v.axes, how == "contiguous" or v.contiguous, v.dim_offset), f"read:{how}"


def t_elementwise(draw, body, v):
    op = draw(st.sampled_from(["* 0.5", "+ 1.0", "sigmoid", "silu", "square", "x"]))
    if op == "x":
        operand = x_operand(draw, body, v)
        if operand is None:
            return None
        expr = f"{v.expr} * {operand}"
    else:
        expr = {"sigmoid": f"torch.sigmoid({v.expr})", "silu": f"F.silu({v.expr})",
                "square": f"{v.expr} * {v.expr}"}.get(op, f"({v.expr} {op})")
    return Value(expr, v.axes, False, v.dim_offset), f"read:elementwise{'-x' if op == 'x' else ''}"


def t_cat(draw, body, v):
    labels = v.labels()
    how = draw(st.sampled_from(["self-tok", "x", "no-dim"]))
    if how == "no-dim":  # torch.cat's default dim 0, whatever axis that is
        if v.rank == 0 or v.axes[0][1] is None:
            return None
        return Value(f"torch.cat([{v.expr}, {v.expr}])", ((v.axes[0][0], 2 * v.axes[0][1]),) + v.axes[1:],
                     False, v.dim_offset), "read:cat-no-dim"
    if "tok" not in labels:
        return None
    axis = labels.index("tok")
    tok = v.axes[axis][1]
    if how == "self-tok":
        return Value(f"torch.cat([{v.expr}, {v.expr}], {_neg(draw, axis, v.rank)})",
                     v.axes[:axis] + (("tok", 2 * tok),) + v.axes[axis + 1:], False, v.dim_offset), \
            "read:cat-tok"
    if sorted(labels) != ["b", "dim", "tok"]:
        return None
    d = dict(v.axes)["dim"]
    new = f"x[:, :, {v.dim_offset}:{v.dim_offset + d}]" + spell(draw, tuple(("b", "tok", "dim").index(a)
                                                                             for a in labels))
    return Value(f"torch.cat([{v.expr}, {new}], {_neg(draw, axis, v.rank)})",
                 v.axes[:axis] + (("tok", tok + body.tokens),) + v.axes[axis + 1:], False, v.dim_offset), "read:cat-x"


def t_roll(draw, body, v):
    static = [i for i, (_, s) in enumerate(v.axes) if s is not None]
    how = draw(st.sampled_from(["axis", "function", "no-dims"]))
    shift = draw(st.sampled_from([-1, 1, 2]))
    if how == "no-dims":  # rolls the flattened tensor: depends on the logical order of every axis
        return Value(f"{v.expr}.roll({shift})", v.axes, False, v.dim_offset), "read:roll-no-dims"
    if not static:
        return None
    axis = draw(st.sampled_from(static))
    expr = f"{v.expr}.roll({shift}, {_neg(draw, axis, v.rank)})" if how == "axis" else \
        f"torch.roll({v.expr}, shifts={shift}, dims={axis})"
    return Value(expr, v.axes, False, v.dim_offset), f"read:roll-{v.axes[axis][0]}"


def t_flip(draw, body, v):
    if v.rank == 0:
        return None
    axis = draw(st.integers(0, v.rank - 1))
    return Value(f"{v.expr}.flip({axis})", v.axes, False, v.dim_offset), "read:flip"


def t_reduce(draw, body, v):
    if v.rank < 2:
        return None
    op = draw(st.sampled_from(["sum", "mean", "amax"]))
    axis = draw(st.integers(0, v.rank - 1))
    keep = draw(st.booleans())
    expr = f"{v.expr}.{op}({_neg(draw, axis, v.rank)}{', keepdim=True' if keep else ''})"
    axes = v.axes[:axis] + ((("x", 1),) if keep else ()) + v.axes[axis + 1:]
    return Value(expr, axes, False, v.dim_offset), f"read:{op}-{v.axes[axis][0]}"


def t_memory_view(draw, body, v):
    """A view that merges axes: its result depends on the order of memory (when it is a view)."""
    if v.rank < 2:
        return None
    how = draw(st.sampled_from(["flatten", "reshape", "view"] if v.contiguous else ["flatten", "reshape"]))
    if how == "flatten":
        axis = draw(st.integers(0, v.rank - 2))
        merged = v.axes[axis:axis + 2]
        size = None if any(s is None for _, s in merged) else merged[0][1] * merged[1][1]
        return Value(f"{v.expr}.flatten({axis}, {axis + 1})", v.axes[:axis] + (("flat", size),) + v.axes[axis + 2:],
                     v.contiguous, 0), "read:memory-order-flatten"
    rest = [s for _, s in v.axes[1:]]
    size = None if None in rest else int(torch.tensor(rest).prod())
    return Value(f"{v.expr}.{how}({v.expr}.shape[0], -1)", (v.axes[0], ("flat", size)), v.contiguous, 0), \
        f"read:memory-order-{how}"


def t_matmul(draw, body, v):
    if v.rank != 2:
        return None
    how = draw(st.sampled_from(["@ mT", "t @"]))
    expr = f"({v.expr} @ {v.expr}.mT)" if how == "@ mT" else f"({v.expr}.t() @ {v.expr})"
    axis = v.axes[0] if how == "@ mT" else v.axes[1]
    return Value(expr, (axis, axis), False, 0), "read:matmul"


READ_TRANSFORMS = (t_select, t_slice, t_gather, t_permute, t_copy, t_elementwise, t_reduce, t_cat, t_roll,
                   t_flip, t_memory_view, t_matmul)


def x_operand(draw, body, v: Value) -> str | None:
    """An x-derived tensor that broadcasts against v (batch and dim axes from x, tok as 1)."""
    labels = v.labels()
    if labels.count("b") != 1 or labels.count("dim") > 1 or any(a not in ("b", "dim", "tok") for a in labels):
        return None
    if "dim" in labels:
        d = dict(v.axes)["dim"]
        base, present = f"x[:, -1, {v.dim_offset}:{v.dim_offset + d}]", ["b", "dim"]
    else:
        base, present = "x[:, -1, 0]", ["b"]
    order = [a for a in labels if a in present]
    base += spell(draw, tuple(present.index(a) for a in order)) if len(order) == 2 else ""
    if len(order) < len(labels):
        base += "[" + ", ".join(":" if a in present else "None" for a in labels) + "]"
    return base


def pool_value(p: Pool) -> Value:
    return Value(p.ref, tuple((a, p.size(a)) for a in p.axes), p.dense)


@st.composite
def read_use(draw, body: Body, p: Pool):
    """A chain of read transforms from the pool, its result returned."""
    v = pool_value(p)
    kinds = []
    if draw(st.integers(0, 5)) == 0:  # the pool itself, as it is
        body.lines.append(f"outs.append({p.ref})")
        body.kinds += ["read", "read:as-is"]
        return
    for _ in range(draw(st.integers(1, 4))):
        step = draw(st.sampled_from(READ_TRANSFORMS))(draw, body, v)
        if step is not None:
            v, kind = step
            v = Value(body.let(v.expr), v.axes, v.contiguous, v.dim_offset)
            kinds.append(kind)
    if not kinds:
        return
    body.lines.append(f"outs.append({v.expr})")
    body.kinds.append("read")
    body.kinds.extend(kinds)


# ----------------------------------------------------------------------------- writes


@st.composite
def region(draw, body: Body, p: Pool, tensor_index: bool):
    """A region of the pool written through indexing: (its expression, its axes, whether it is a
    view (no tensor index)), seen through an optional permutation of the pool."""
    perm = tuple(draw(st.permutations(range(3)))) if draw(st.integers(0, 3)) == 3 else (0, 1, 2)
    base = p.ref + spell(draw, perm)
    parts, axes, view = [], [], True
    for label in (p.axes[i] for i in perm):
        size = p.size(label)
        kinds = ["all", "range", "int"] + (["slots", "slots1"] if label == "slot" and tensor_index else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "all":
            parts.append(":")
            axes.append((label, size))
        elif kind == "range":
            start = draw(st.integers(0, size - 1))
            stop = draw(st.integers(start + 1, size))
            parts.append(f"{start}:{stop}")
            axes.append((label, stop - start))
        elif kind == "int":
            parts.append(str(draw(st.integers(-size, size - 1))))
        else:
            parts.append("slots" if kind == "slots" else "slots[:1]")
            axes.append(("b" if kind == "slots" else "b1", None if kind == "slots" else 1))
            view = False
    while parts and parts[-1] == ":":
        parts.pop()
    return f"{base}[{', '.join(parts) or ':'}]", tuple(axes), view


@st.composite
def source_for(draw, body: Body, target: Pool, axes):
    """A tensor of exactly the region's axes and sizes: the same region shifted, of the same or
    another pool, permuted into the region's order, perhaps transformed elementwise."""
    need = dict(axes)
    fits = [q for q in body.program_pools if all(q.size(a) >= s for a, s in axes if a in ("tok", "dim", "slot"))]
    q = draw(st.sampled_from(fits))
    parts, got = [], []
    for label in q.axes:
        if label in need:
            start = draw(st.integers(0, q.size(label) - need[label]))
            parts.append(f"{start}:{start + need[label]}")
            got.append(label)
        elif label == "slot" and ("b" in need or "b1" in need):
            parts.append("slots" if "b" in need else draw(st.sampled_from(["slots[:1]", "slots[-1:]"])))
            got.append("b" if "b" in need else "b1")
        else:
            parts.append(str(draw(st.integers(0, q.size(label) - 1))))
    order = [a for a, _ in axes]
    expr = f"{q.ref}[{', '.join(parts)}]" + spell(draw, tuple(got.index(a) for a in order))
    copied = "slots" in " ".join(parts)
    how = draw(st.sampled_from(["as is", "* 0.5", "roll", "flip", "x"]))
    if how == "* 0.5":
        expr, copied = f"{expr} * 0.5", True
    elif how in ("roll", "flip") and order:
        axis = draw(st.integers(0, len(order) - 1))
        expr, copied = (f"{expr}.roll(1, {axis})" if how == "roll" else f"{expr}.flip({axis})"), True
    elif how == "x":
        operand = x_operand(draw, body, Value(expr, tuple(axes), False, 0))
        if operand is not None:
            expr, copied = f"{expr} + {operand}", True
    if q is target and not copied:
        expr += ".clone()"  # a view of the pool written into the pool would overlap
    return expr


@st.composite
def write_use(draw, body: Body, p: Pool):
    how = draw(st.sampled_from(["setitem", "copy_", "fill", "index_put_", "index_copy_", "mul_", "tail copy",
                                "gathered copy"]))
    ref = p.ref
    if how == "setitem":
        expr, axes, view = draw(region(body, p, tensor_index=True))
        value = draw(st.sampled_from(["scalar", "tensor"]))
        rhs = "0.0" if value == "scalar" else draw(source_for(body, p, axes))
        body.lines.append(f"{expr} = {rhs}")
        kind = f"write:setitem-{value}"
    elif how == "copy_":
        expr, axes, _ = draw(region(body, p, tensor_index=False))
        body.lines.append(f"{expr}.copy_({draw(source_for(body, p, axes))})")
        kind = "write:copy_"
    elif how == "fill":
        expr, _, _ = draw(region(body, p, tensor_index=False))
        op = draw(st.sampled_from(["zero_()", "fill_(0.5)", "mul_(0.5)", "add_(1.0)"]))
        body.lines.append(f"{expr}.{op}")
        kind = f"reset:{op.split('(')[0]}"
    elif how == "index_put_":
        value = draw(source_for(body, p, (("b", None),) + tuple((a, p.size(a)) for a in p.axes[1:])))
        accumulate = ", accumulate=True" if draw(st.booleans()) else ""
        body.lines.append(f"{ref}.index_put_((slots,), {value}{accumulate})")
        kind = "write:index_put_"
    elif how == "index_copy_":
        value = draw(source_for(body, p, (("b", None),) + tuple((a, p.size(a)) for a in p.axes[1:])))
        body.lines.append(f"{ref}.index_copy_(0, slots.long(), {value})")
        kind = "write:index_copy_"
    elif how == "mul_":  # reset the call's first slot by a mask (vLLM-style), not by zero_()
        spelled = draw(st.sampled_from(["index_fill", "arange", "masked_fill_"]))
        if spelled == "index_fill":
            mask = f"torch.ones({p.slots}, 1, 1).index_fill(0, slots[:1].long(), 0.0)"
            body.lines.append(f"{ref}.mul_({mask})")
        elif spelled == "arange":
            body.lines.append(f"{ref}.mul_((torch.arange({p.slots}) != slots[0]).float()[:, None, None])")
        else:
            body.lines.append(f"{ref}.masked_fill_((torch.arange({p.slots}) == slots[0])[:, None, None], 0.0)")
        kind = f"reset:mul_-{spelled}"
    elif how == "tail copy":  # spec decode: a sequence's state shifted by k accepted tokens
        s = p.state_len
        if s < 2:
            return
        k = draw(st.integers(1, s - 1))
        if draw(st.booleans()):
            d, src = draw(st.lists(st.integers(0, p.slots - 1), min_size=2, max_size=2, unique=True))
        else:
            d = src = "slots"
        sd = p.layout == "SD"
        body.lines.append(f"{ref}[{d}, {':' + str(s - k) if sd else ':, :' + str(s - k)}] = "
                          f"{ref}[{src}, {str(k) + ':' if sd else ':, ' + str(k) + ':'}]")
        kind = "write:tail-copy"
    else:  # in-place on a gathered copy: writes nothing in the original either
        body.lines.append(f"{ref}[slots].zero_()")
        kind = "write:gathered-copy"
    body.kinds.append(kind)


# ----------------------------------------------------------------------------- conv updates


def pool_as_op_state(draw, p: Pool) -> str:
    """The pool as the conv ops take it, (slot, dim, tok), in one of the spellings that give it."""
    return p.ref + spell(draw, tuple(p.axes.index(a) for a in ("slot", "dim", "tok")))


def x_tokens(p: Pool, order: str) -> str:
    """The entry's tokens for this pool: (batch, dim, T) for "BDT", (batch, T, dim) for "BTD"."""
    return f"x[:, :, :{p.dim}].transpose(1, 2)" if order == "BDT" else f"x[:, :, :{p.dim}]"


def _activation(draw, body, y):
    if draw(st.booleans()):
        body.lines.append(f"{y} = F.silu({y})")


@st.composite
def conv_update_use(draw, body: Body, p: Pool):
    flat = body.tokens == 1 and draw(st.booleans())
    xx = body.let(f"x[:, 0, :{p.dim}]" if flat else x_tokens(p, "BDT"), "xx")
    extra = ""
    if draw(st.booleans()):  # spec decode: accepted tokens per sequence, 1 .. state_len - width + 2
        extra += f", num_accepted_tokens=slots % {p.state_len - p.width + 2} + 1"
    if draw(st.booleans()):
        extra += ", null_block_id=-1"
    activation = draw(st.sampled_from(["None", "'silu'"]))
    y = body.let(f"conv_update({xx}, {pool_as_op_state(draw, p)}, {p.weight}, {p.bias_ref}, {activation}, "
                 f"slots{extra}, out=torch.zeros_like({xx}))", "y")
    body.lines.append(f"outs.append({y})")
    body.kinds.append("update:conv_update")


@st.composite
def conv_prefill_use(draw, body: Body, p: Pool):
    xx = body.let(f"x[:, :, :{p.dim}].reshape(-1, {p.dim}).t()", "xx")
    qsl = body.let("torch.arange(0, x.shape[0] * x.shape[1] + 1, x.shape[1], dtype=torch.int32)", "qsl")
    initial = draw(st.sampled_from(["None", "torch.ones_like(slots, dtype=torch.bool)", "slots % 2 == 0"]))
    activation = draw(st.sampled_from(["None", "'silu'"]))
    y = body.let(f"conv_prefill({xx}, {p.weight}, {p.bias_ref}, {pool_as_op_state(draw, p)}, {qsl}, slots, "
                 f"{initial}, {activation})", "y")
    body.lines.append(f"outs.append({y})")
    body.kinds.append("update:conv_prefill")


def _gathered(draw, body: Body, p: Pool, order: str) -> str:
    """The call's slots of the pool in the working order; in a whole-pool entry (batch = slots)
    perhaps the pool itself, row b being slot b (transformers' cache)."""
    want = ("slot", "dim", "tok") if order == "BDT" else ("slot", "tok", "dim")
    suffix = spell(draw, tuple(p.axes.index(a) for a in want))
    gathered = p.ref if body.whole and draw(st.booleans()) else f"{p.ref}[slots]"
    return gathered + suffix + (".contiguous()" if suffix and draw(st.booleans()) else "")


def _write_back(draw, body: Body, p: Pool, order: str, value: str) -> str:
    """Store a (batch, ...) value in the working order into the call's slots."""
    have = ("slot", "dim", "tok") if order == "BDT" else ("slot", "tok", "dim")
    value += spell(draw, tuple(have.index(a) for a in p.axes))
    how = draw(st.sampled_from(["setitem", "index_put_"] + (["copy_"] if body.whole else [])))
    if how == "copy_":
        return f"{p.ref}.copy_({value})"
    return f"{p.ref}[slots] = {value}" if how == "setitem" else f"{p.ref}.index_put_((slots,), {value})"


@st.composite
def cat_update_use(draw, body: Body, p: Pool):
    """cat the new tokens to the state, convolve (multiply-and-sum or conv1d), store the tail."""
    order = draw(st.sampled_from(["BDT", "BTD"]))
    tok = -1 if order == "BDT" else 1
    state = body.let(_gathered(draw, body, p, order), "st")
    win = body.let(f"torch.cat([{state}, {x_tokens(p, order)}], {tok})", "win")
    conv = draw(st.sampled_from(["mul-sum", "conv1d"] if body.tokens == 1 else ["conv1d"]))
    if conv == "mul-sum":
        last = "" if p.state_len + 1 == p.width else (f"[..., -{p.width}:]" if order == "BDT"
                                                          else f"[:, -{p.width}:]")
        weight = p.weight if order == "BDT" else f"{p.weight}.t()"
        y = body.let(f"({win}{last} * {weight}).sum({tok})", "y")
        if p.bias:
            body.lines.append(f"{y} = {y} + {p.bias_ref}")
    else:
        window = win if order == "BDT" else f"{win}.transpose(1, 2)"
        y = body.let(f"F.conv1d({window}, {p.weight}[:, None], {p.bias_ref}, groups={p.dim})"
                     f"[..., -{body.tokens}:]", "y")
    _activation(draw, body, y)
    tail = f"{win}[..., -{p.state_len}:]" if order == "BDT" else f"{win}[:, -{p.state_len}:]"
    body.lines.append(_write_back(draw, body, p, order, tail))
    body.lines.append(f"outs.append({y})")
    body.kinds.append(f"update:cat-{conv}")


@st.composite
def roll_update_use(draw, body: Body, p: Pool):
    """transformers' older spelling: roll back one token, set the last column, write back."""
    order = draw(st.sampled_from(["BDT", "BTD"]))
    state_roll = body.let(f"{_gathered(draw, body, p, order)}.roll(-1, {-1 if order == 'BDT' else 1})", "st")
    body.lines.append(f"{state_roll}[..., -1] = x[:, 0, :{p.dim}]" if order == "BDT"
                      else f"{state_roll}[:, -1] = x[:, 0, :{p.dim}]")
    body.lines.append(_write_back(draw, body, p, order, state_roll))
    k = min(p.state_len, p.width)
    if order == "BDT":
        y = body.let(f"({state_roll}[..., -{k}:] * {p.weight}[:, -{k}:]).sum(-1)", "y")
    else:
        y = body.let(f"({state_roll}[:, -{k}:] * {p.weight}[:, -{k}:].t()).sum(1)", "y")
    body.lines.append(f"outs.append({y})")
    body.kinds.append("update:roll")


@st.composite
def prompt_use(draw, body: Body, p: Pool):
    """A prefill from no history: conv1d over the prompt, its left-zero-padded tail stored."""
    xt = body.let(x_tokens(p, "BDT"), "xt")
    tail = f"F.pad({xt}, ({p.state_len}, 0))[..., -{p.state_len}:]"
    body.lines.append(_write_back(draw, body, p, "BDT", tail))
    y = body.let(f"F.conv1d({xt}, {p.weight}[:, None], {p.bias_ref}, padding={p.width - 1}, groups={p.dim})"
                 f"[..., :{xt}.shape[-1]]", "y")
    _activation(draw, body, y)
    body.lines.append(f"outs.append({y})")
    body.kinds.append("update:prompt")


@st.composite
def store_use(draw, body: Body, p: Pool):
    """A write-only prefill: the prompt's tail stored (setitem, index_put_, copy_), nothing read."""
    tail = f"F.pad({x_tokens(p, 'BDT')}, ({p.state_len}, 0))[..., -{p.state_len}:]"
    if draw(st.booleans()):
        body.lines.append(_write_back(draw, body, p, "BDT", tail))
    else:
        one = tail + "[0]" + spell(draw, tuple(("dim", "tok").index(a) for a in p.axes[1:]))
        body.lines.append(f"{p.ref}[{draw(st.integers(0, p.slots - 1))}].copy_({one})")
    body.kinds.append("write:store-tail")


# ----------------------------------------------------------------------------- recurrent pools
# Issue "Every state pool", item 6: recurrent states (Mamba2's SSM state, the gated delta rule's),
# axes (slot, [snap], head, k, v) in the order the model gives them, stored KV (v contiguous) or VK
# (k contiguous): allocated in that order, or allocated in the other one and transposed (so the
# logical axes and the memory order differ). Their uses: the recurrence ops (in place by slot, the
# pool passed as the op's (slot, snap, head, .., ..) view: a pool without a snap axis gains one by
# `[:, None]` / `unsqueeze(1)`), a pure-torch per-slot update (gather, decay, add k (x) v, write
# back: found only when named, so such pools always are), resets of fresh slots, gathers, one
# head read, q . state outputs, memory-order reshapes and views of gathered rows. Kept by the
# Model (as a buffer or a plain attribute), in every program shape.

R_OPS = ("ssu", "delta", "")  # the op a pool's updates may use ("": pure-torch updates only)
R_LAYOUTS = ({"conv": "DS", "recurrent": "VK"}, {"conv": "SD", "recurrent": "KV"})  # a recurrent program's checks


@dataclass(frozen=True)
class RPool:
    index: int
    order: str  # its logical axes after (slot, [snap], head): "kv" or "vk"
    stored: str  # its memory order: "KV" (v contiguous) or "VK" (k contiguous)
    slots: int
    snaps: int  # 0: no snap axis
    heads: int
    k: int
    v: int
    op: str  # of R_OPS
    named: bool  # named to optimize() (state_buffers={path: axes})
    binding: str = "buffer"  # "buffer" | "attribute"

    @property
    def ref(self) -> str:
        return f"self.r{self.index}"

    @property
    def path(self) -> str:
        return f"r{self.index}"

    @property
    def axes(self) -> tuple[str, ...]:
        return ("slot",) + (("snap",) if self.snaps else ()) + ("head",) + \
            (("k", "v") if self.order == "kv" else ("v", "k"))

    def size(self, label: str) -> int:
        return {"slot": self.slots, "snap": self.snaps, "head": self.heads, "k": self.k, "v": self.v}[label]

    @property
    def shape(self) -> str:
        return ", ".join(str(self.size(a)) for a in self.axes)

    @property
    def dense(self) -> bool:
        """Allocated in its logical order (contiguous), not transposed."""
        return self.axes[-1] == self.stored[-1].lower()

    def init(self) -> list[str]:
        if self.dense:
            made = f"torch.randn({self.shape}, generator=gen)"
        else:
            swapped = self.axes[:-2] + self.axes[-2:][::-1]
            made = f"torch.randn({', '.join(str(self.size(a)) for a in swapped)}, generator=gen).transpose(-1, -2)"
        note = f"  # {self.stored}, axes {self.axes}"
        lines = [f"self.register_buffer('r{self.index}', {made}){note}" if self.binding == "buffer"
                 else f"self.r{self.index} = {made}{note}"]
        h, i = self.heads, self.index
        return lines + [f"self.A{i} = nn.Parameter(-torch.rand({h}, generator=gen) - 0.5)",
                        f"self.D{i} = nn.Parameter(torch.randn({h}, generator=gen))",
                        f"self.dtb{i} = nn.Parameter(torch.randn({h}, generator=gen) * 0.1)"]

    def kinds(self) -> set[str]:
        return {"config:recurrent pools", f"config:recurrent-stored-{self.stored}",
                f"config:recurrent-op-{self.op or 'none'}",
                *({"config:recurrent-snap"} if self.snaps else ()),
                *({"config:recurrent-named"} if self.named else ()),
                *({"config:recurrent-transposed allocation"} if not self.dense else ()),
                *({"config:recurrent-attribute"} if self.binding == "attribute" else ())}


@st.composite
def rpools_of(draw, index: int, slots: int):
    op = draw(st.sampled_from(R_OPS))
    snaps = draw(st.sampled_from([0, 0, 1, 2, 3]))
    # a pool without a snap axis reaches the ops through [:, None]: found through that view
    named = op == "" or draw(st.integers(0, 3)) >= 3
    return RPool(index, draw(st.sampled_from(["kv", "vk"])), draw(st.sampled_from(["KV", "VK"])), slots, snaps,
                 draw(st.integers(1, 2)), draw(st.integers(2, 4)), draw(st.integers(1, 4)), op, named,
                 draw(st.sampled_from(["buffer", "buffer", "attribute"])))


def _xpart(draw, body: Body, n: int, dims: tuple[int, ...], last: bool = False) -> str:
    """(batch, n, *dims) from the entry's x: its last n tokens, a range of its features."""
    width = 1
    for d in dims:
        width *= d
    start = draw(st.integers(0, body.width_x - width))
    expr = f"x[:, -{n}:, {start}:{start + width}]"
    expr += f".unflatten(-1, ({', '.join(map(str, dims))}))" if len(dims) > 1 else ""
    return f"{expr}[:, 0]" if last else expr


def _r_state(draw, r: RPool, want: tuple[str, ...]) -> str:
    """The pool as an op takes it, in the op's axes (slot, snap, head, .., ..): a snap axis added
    to a pool without one, then permuted, in one of the spellings that give it."""
    base, have = r.ref, r.axes
    if not r.snaps:
        base += draw(st.sampled_from(["[:, None]", ".unsqueeze(1)", "[:, None, ...]"]))
        have = ("slot", "snap") + have[1:]
    return base + spell(draw, tuple(have.index(a) for a in want))


def _r_extra(draw, r: RPool, n: int, indices: str, body: Body) -> str:
    """The slot indices (or none, in a whole-pool entry: row b is slot b) and spec-decode counts."""
    extra = "" if body.whole and draw(st.integers(0, 3)) == 0 else f", {indices}=slots"
    if r.snaps > 1 and extra and draw(st.booleans()):
        extra += f", num_accepted_tokens=slots % {r.snaps - n + 1} + 1"
    return extra


def _r_tokens(draw, body: Body, r: RPool) -> int:
    return draw(st.integers(1, min(body.tokens, r.snaps))) if r.snaps else 1


@st.composite
def ssu_use(draw, body: Body, r: RPool):
    """selective_state_update on the pool (as (slot, snap, head, v, k)), in place by slot."""
    n = _r_tokens(draw, body, r)
    groups = draw(st.sampled_from(sorted({1, r.heads})))
    xr = body.let(_xpart(draw, body, n, (r.heads, r.v)), "xr")
    dt = body.let(_xpart(draw, body, n, (r.heads,)), "dt")
    b = body.let(_xpart(draw, body, n, (groups, r.k)), "B")
    c = body.let(_xpart(draw, body, n, (groups, r.k)), "C")
    d = f"self.D{r.index}" if draw(st.booleans()) else "None"
    z = body.let(_xpart(draw, body, n, (r.heads, r.v)), "z") if draw(st.booleans()) else "None"
    bias = f"self.dtb{r.index}" if draw(st.booleans()) else "None"
    out = f", out=torch.zeros_like({xr})" if draw(st.booleans()) else ""
    extra = _r_extra(draw, r, n, "state_batch_indices", body)
    y = body.let(f"selective_state_update({_r_state(draw, r, ('slot', 'snap', 'head', 'v', 'k'))}, {xr}, {dt}, "
                 f"self.A{r.index}, {b}, {c}, {d}, {z}, {bias}, dt_softplus=True{extra}{out})", "y")
    body.lines.append(f"outs.append({y})")
    body.kinds.append("rec:selective_state_update")


@st.composite
def delta_use(draw, body: Body, r: RPool):
    """delta_rule_update on the pool (as (slot, snap, head, k, v)), in place by slot."""
    n = _r_tokens(draw, body, r)
    qk = draw(st.sampled_from(sorted({1, r.heads})))
    norm = draw(st.booleans())  # else q and k normalized by the model (the state stays bounded)
    q, k = (body.let(_xpart(draw, body, n, (qk, r.k)) if norm else f"F.normalize({_xpart(draw, body, n, (qk, r.k))}, "
                                                                    "dim=-1)", s) for s in ("q", "k"))
    v = body.let(_xpart(draw, body, n, (r.heads, r.v)), "vv")
    per_k = draw(st.booleans())  # KDA: one decay per key channel
    g = body.let(f"-F.softplus({_xpart(draw, body, n, (r.heads, r.k) if per_k else (r.heads,))})", "g")
    beta = body.let(f"torch.sigmoid({_xpart(draw, body, n, (r.heads,))})", "beta")
    scale = draw(st.sampled_from(["", ", scale=1.0", ", scale=0.5"]))
    out = f", out=torch.zeros_like({v})" if draw(st.booleans()) else ""
    extra = _r_extra(draw, r, n, "state_indices", body)
    o = body.let(f"delta_rule_update({_r_state(draw, r, ('slot', 'snap', 'head', 'k', 'v'))}, {q}, {k}, {v}, {g}, "
                 f"{beta}{scale}{extra}{', use_qk_l2norm=True' if norm else ''}{out})", "o")
    body.lines.append(f"outs.append({o})")
    body.kinds.append("rec:delta_rule_update" + ("-kda" if per_k else ""))


def _r_gathered(draw, body: Body, r: RPool) -> tuple[str, tuple[str, ...]]:
    """The call's slots' states (the last snapshot of a pool with snaps): (expression, axes)."""
    how = draw(st.sampled_from(["index", "index", "index_select"]))
    ref = f"{r.ref}[slots]" if how == "index" else f"{r.ref}.index_select(0, slots)"
    if r.snaps:
        ref = draw(st.sampled_from([f"{r.ref}[slots, -1]", f"{r.ref}[slots][:, -1]", f"{ref}.select(1, -1)"]))
    return ref, ("b",) + tuple(a for a in r.axes[1:] if a != "snap")


def _r_outer(draw, body: Body, r: RPool) -> str:
    """k (x) v from x: (batch, head, k, v)."""
    kk, vv = _xpart(draw, body, 1, (r.heads, r.k), last=True), _xpart(draw, body, 1, (r.heads, r.v), last=True)
    return draw(st.sampled_from([f"{kk}[..., :, None] * {vv}[..., None, :]",
                                 f"torch.einsum('bhk,bhv->bhkv', {kk}, {vv})",
                                 f"{kk}.unsqueeze(-1) @ {vv}.unsqueeze(-2)"]))


def _r_readout(draw, body: Body, r: RPool, h: str) -> str:
    """q . state over k, from a (batch, head, k, v) state: (batch, head, v)."""
    q = _xpart(draw, body, 1, (r.heads, r.k), last=True)
    return draw(st.sampled_from([f"({h} * {q}[..., None]).sum(-2)", f"torch.einsum('bhk,bhkv->bhv', {q}, {h})",
                                 f"({q}[:, :, None, :] @ {h})[:, :, 0]"]))


@st.composite
def torch_update_use(draw, body: Body, r: RPool):
    """A pure-torch decode step: gather the call's states, decay them (per head or per key
    channel), add k (x) v, write them back by slot, read q . state out."""
    gathered, axes = _r_gathered(draw, body, r)
    work = ("b", "head", "k", "v")
    perm = spell(draw, tuple(axes.index(a) for a in work))
    h = body.let(gathered + perm + (".contiguous()" if perm and draw(st.booleans()) else ""), "h")
    per_k = draw(st.booleans())
    decay = f"torch.exp(-F.softplus({_xpart(draw, body, 1, (r.heads, r.k) if per_k else (r.heads,), last=True)}))"
    decay += "[..., None]" if per_k else "[:, :, None, None]"
    new = body.let(f"{h} * {decay} + {_r_outer(draw, body, r)}", "h")
    value = new + spell(draw, tuple(work.index(a) for a in axes))
    if r.snaps:
        if r.snaps > 1 and draw(st.booleans()):  # the snapshots shift down, the new state goes last
            body.lines.append(f"{r.ref}[slots, :-1] = {r.ref}[slots, 1:]")
        how = draw(st.sampled_from(["setitem", "index_put_"]))
        body.lines.append(f"{r.ref}[slots, -1] = {value}" if how == "setitem" else
                          f"{r.ref}.index_put_((slots, torch.full_like(slots, {r.snaps - 1})), {value})")
    else:
        how = draw(st.sampled_from(["setitem", "index_put_", "index_copy_"]))
        body.lines.append({"setitem": f"{r.ref}[slots] = {value}",
                           "index_put_": f"{r.ref}.index_put_((slots,), {value})",
                           "index_copy_": f"{r.ref}.index_copy_(0, slots.long(), {value})"}[how])
    y = body.let(_r_readout(draw, body, r, new), "y")
    body.lines.append(f"outs.append({y})")
    body.kinds.append(f"rec:torch-update-{how}" + ("-per-k" if per_k else ""))


@st.composite
def r_reset_use(draw, body: Body, r: RPool):
    """Fresh sequences start from zeros (or a gathered copy is zeroed: nothing written)."""
    how = draw(st.sampled_from(["setitem", "first", "index_fill_", "mul_", "gathered"]))
    lead = ", None" * (len(r.axes) - 1)
    body.lines.append({
        "setitem": f"{r.ref}[slots] = 0.0", "first": f"{r.ref}[slots[:1]] = 0",
        "index_fill_": f"{r.ref}.index_fill_(0, slots.long(), 0.0)",
        "mul_": f"{r.ref}.mul_((torch.arange({r.slots}) != slots[0]).float()[:{lead}])",
        "gathered": f"{r.ref}[slots].zero_()"}[how])
    body.kinds.append(f"rec:reset-{how}")


@st.composite
def r_read_use(draw, body: Body, r: RPool):
    """A read returned: gathered rows (permuted, copied), one head, q . state, a reduction, rows
    reshaped or viewed in memory order, the pool itself reduced."""
    how = draw(st.sampled_from(["gather", "head", "readout", "reduce", "reshape", "view", "pool"]))
    if how == "view" and not r.dense:
        how = "reshape"  # .view() of a transposed allocation's rows fails in the model itself
    gathered, axes = _r_gathered(draw, body, r)
    if how == "gather":
        perm = tuple(draw(st.permutations(range(len(axes)))))
        expr = gathered + spell(draw, perm) + draw(st.sampled_from(["", " * 1.0", ".clone()", ".contiguous()"]))
    elif how == "head":
        h = draw(st.integers(-r.heads, r.heads - 1))
        expr = draw(st.sampled_from([f"{gathered}[:, {h}]", f"{gathered}.select(1, {h})"]))
        expr += draw(st.sampled_from(["", ".sum(-1)", ".amax(-2)"]))
    elif how == "readout":
        expr = _r_readout(draw, body, r, body.let(gathered + spell(draw, tuple(axes.index(a) for a in
                                                                             ("b", "head", "k", "v"))), "h"))
    elif how == "reduce":
        expr = f"{gathered}.{draw(st.sampled_from(['sum', 'mean', 'amax']))}({draw(st.integers(1, 3))})"
    elif how == "reshape":
        expr = draw(st.sampled_from([f"{gathered}.reshape({gathered}.shape[0], -1)", f"{gathered}.flatten(-2)",
                                     f"{gathered}.flatten(1)"]))
    elif how == "view":  # the rows' memory order: a view of contiguous rows in the model's order only
        expr = f"{r.ref}[slots].view(slots.shape[0], -1)" if not r.snaps else f"{r.ref}[slots].view(-1)"
    else:
        expr = f"{r.ref}.sum({draw(st.integers(1, len(r.axes) - 1))})"
    y = body.let(expr, "y")
    body.lines.append(f"outs.append({y})")
    body.kinds.append(f"rec:read-{how}")


@st.composite
def torch_recurrence_use(draw, body: Body, r: RPool):
    """transformers' one-token decode in pure torch, in the pool's own axis order: Mamba2's SSM
    update or the gated delta rule (a decay per head or per key), written back by slot and read
    out (what the lowering rules replace by the kernels when lowering is on)."""
    kv = r.axes[-2:] == ("k", "v")
    at = {"k": -2 if kv else -1, "v": -1 if kv else -2}  # where k and v sit in the state
    read = body.let(draw(st.sampled_from([f"{r.ref}[slots]", f"{r.ref}.index_select(0, slots)"])), "h")
    per_k = draw(st.booleans())
    if draw(st.booleans()):  # Mamba2's SSM update
        dt = body.let(f"F.softplus({_xpart(draw, body, 1, (r.heads,), last=True)} + self.dtb{r.index})[:, :, None, None]",
                      "dt")
        B = f"{_xpart(draw, body, 1, (r.k,), last=True)}[:, None].unsqueeze({at['v']})"
        x = body.let(_xpart(draw, body, 1, (r.heads, r.v), last=True), "xs")
        C = f"{_xpart(draw, body, 1, (r.k,), last=True)}[:, None].unsqueeze({at['v']})"
        new = body.let(f"{read} * torch.exp({dt} * self.A{r.index}[:, None, None]) + {dt} * {B} * "
                       f"{x}.unsqueeze({at['k']})", "h")
        y = f"({new} * {C}).sum({at['k']}) + {x} * self.D{r.index}[:, None]"
        kind = "ssm"
    else:  # the gated delta rule
        q, k = (body.let(f"F.normalize({_xpart(draw, body, 1, (r.heads, r.k), last=True)}, dim=-1)", name)
                for name in ("q", "kk"))
        v = _xpart(draw, body, 1, (r.heads, r.v), last=True)
        g = _xpart(draw, body, 1, (r.heads, r.k) if per_k else (r.heads,), last=True)
        decay = f"torch.exp(-F.softplus({g})).unsqueeze({at['v']})" if per_k else \
            f"torch.exp(-F.softplus({g}))[:, :, None, None]"
        beta = f"torch.sigmoid({_xpart(draw, body, 1, (r.heads,), last=True)})[..., None]"
        decayed = body.let(f"{read} * {decay}", "h")
        delta = body.let(f"({v} - ({decayed} * {k}.unsqueeze({at['v']})).sum({at['k']})) * {beta}", "delta")
        new = body.let(f"{decayed} + {k}.unsqueeze({at['v']}) * {delta}.unsqueeze({at['k']})", "h")
        y = f"({new} * {q}.unsqueeze({at['v']})).sum({at['k']})"
        kind = "delta" + ("-per-k" if per_k else "")
    body.lines.append(f"{r.ref}[slots] = {new}")
    body.lines.append(f"outs.append({body.let(y, 'y')})")
    body.kinds.append(f"rec:torch-{kind}")


R_UPDATES = (ssu_use, delta_use, torch_update_use, torch_recurrence_use)
R_OTHER_USES = (r_reset_use, r_read_use)


def _r_applicable(use, r: RPool) -> bool:
    return {ssu_use: r.op == "ssu", delta_use: r.op == "delta", torch_recurrence_use: not r.snaps}.get(use, True)


def _recurrent_uses(draw, body: Body, recurrent: tuple[RPool, ...], max_other_uses: int) -> None:
    """The recurrent pools' uses, one block inserted among the body's lines (each use keeps to its
    own names): most pools updated, other uses between."""
    if not recurrent:
        return
    lines, kinds, body.lines, body.kinds = body.lines, body.kinds, [], []
    updated = [r for r in recurrent if draw(st.integers(0, 3)) > 0]
    others = [draw(st.sampled_from(recurrent)) for _ in range(draw(st.integers(0, max_other_uses)))]
    uses = [(r, R_UPDATES) for r in updated] + [(r, R_OTHER_USES) for r in others]
    for r, group in draw(st.permutations(uses)):
        # a pool with an op takes it most of the time; a pure-torch update sometimes (one state, two styles)
        choices = [u for u in group if _r_applicable(u, r)]
        if group is R_UPDATES and r.op and draw(st.integers(0, 3)) > 0:
            choices = [u for u in choices if u not in (torch_update_use, torch_recurrence_use)]
        draw(draw(st.sampled_from(choices))(body, r))
    at = draw(st.integers(0, len(lines)))
    body.lines, body.kinds = lines[:at] + body.lines + lines[at:], kinds + body.kinds


UPDATES = (conv_update_use, conv_prefill_use, cat_update_use, roll_update_use, prompt_use)
OTHER_USES = (read_use, write_use, store_use)


def _applicable(use, body: Body, p: Pool) -> bool:
    if use in (conv_update_use, conv_prefill_use):
        return p.width in KERNEL_WIDTHS
    if use is roll_update_use:
        return body.tokens == 1
    return True


def _body(draw, pools: tuple[Pool, ...], tokens: int, whole: bool, width_x: int, max_other_uses: int,
          recurrent: tuple[RPool, ...] = ()) -> Body:
    """Most bodies update most of their pools (a layer's state each step), other uses between."""
    body = Body(pools, tokens, whole, width_x)
    updated = [p for p in pools if draw(st.integers(0, 3)) > 0]
    others = [draw(st.sampled_from(pools)) for _ in range(draw(st.integers(0, max_other_uses)))]
    uses = [(p, UPDATES) for p in updated] + [(p, OTHER_USES) for p in others]
    for p, group in draw(st.permutations(uses)):
        use = draw(st.sampled_from([u for u in group if _applicable(u, body, p)]))
        draw(use(body, p))
    _recurrent_uses(draw, body, recurrent, max_other_uses)
    return body


@st.composite
def entries(draw, index: int, pools: tuple[Pool, ...], dispatch: str, width_x: int, max_other_uses: int,
            layers: tuple[int, ...], around: Around | None = None, recurrent: tuple[RPool, ...] = ()):
    tokens = 1 if dispatch == "rank" and index == 0 else draw(st.integers(1, 4))
    whole = draw(st.integers(0, 5)) == 5
    if not layers:
        body = _body(draw, spelled(draw, around, pools) if around else pools, tokens, whole, width_x, max_other_uses,
                     recurrent)
        if around:
            draw(around_lines(around, body))
        return Entry(index, tokens, whole, tuple(body.lines), tuple(body.kinds))
    inner = []
    for c, p in enumerate(pools):
        holds = around is not None and around.holder == c
        inner.append(_body(draw, spelled(draw, around, (p,)) if holds else (p,), tokens, whole, width_x,
                           max_other_uses))
        if holds:
            draw(around_lines(around, inner[-1]))
    model = Body((), tokens, whole, width_x)
    if draw(st.integers(0, 3)) == 3:  # the model itself touches a layer's pool: not owned by the layer
        k = draw(st.integers(0, len(layers) - 1))
        below = pools[layers[k]].owner.removeprefix("self")  # "" or ".inner"
        outside = dataclasses.replace(pools[layers[k]], owner=f"self.layers[{k}]{below}")
        model.program_pools = (outside,)
        if draw(st.integers(0, 3)) == 0:  # eager code written for the layer pool's own memory order
            how = draw(st.sampled_from(["flatten(1)", f"reshape({outside.slots}, -1)"]))
            model.lines.append(f"{outside.ref}.{how}[:, :{draw(st.integers(1, outside.state_len * outside.dim))}]"
                               f".mul_(0.5)")
            model.kinds.append(f"write:memory-order-{how.split('(')[0]}")
        else:
            draw(draw(st.sampled_from([read_use, write_use]))(model, outside))
        model.kinds[:] = [f"outside {kind}" for kind in model.kinds]
    _recurrent_uses(draw, model, recurrent, max_other_uses)  # the Model keeps the recurrent pools
    return Entry(index, tokens, whole, tuple(model.lines), tuple(model.kinds + [k for b in inner for k in b.kinds]),
                 tuple(tuple(b.lines) for b in inner))


@st.composite
def pools_of(draw, index: int, slots: int, layered: bool):
    width = draw(st.integers(2, 8))
    owner = "self" if draw(st.integers(0, 3)) < 3 else "self.inner" if layered else "self.sub"
    return Pool(index, draw(st.sampled_from(["SD", "DS"])), slots, width - 1 + draw(st.integers(0, 2)),
                draw(st.integers(2, 6)), width, draw(st.booleans()), owner)


@st.composite
def programs(draw, max_pools: int = 3, max_entries: int = 3, max_other_uses: int = 3, max_calls: int = 6,
             python: bool = True, max_actions: int = 4, recurrent_share: float = 0.0, max_recurrent: int = 2):
    """A program; the bounds keep CI's examples small (the benchmark takes the defaults). A third
    keep each pool in a layer of its own (some layers twice: identical layers). With `python`, half
    have the second axis: Python around the graph in one class that keeps pools, and a harness.
    A `recurrent_share` of them also have one to `max_recurrent` recurrent pools, kept by the Model."""
    slots = draw(st.integers(3, 6))
    layered = draw(st.integers(0, 2)) == 2
    pools = tuple(draw(pools_of(i, slots, layered)) for i in range(draw(st.integers(1, max_pools))))
    layers = tuple(draw(st.permutations(list(range(len(pools))) + draw(st.lists(
        st.integers(0, len(pools) - 1), max_size=2))))) if layered else ()
    around = None
    if python and draw(st.integers(0, 1)):
        holder = draw(st.sampled_from(sorted(set(layers)))) if layers else None
        around = draw(arounds(holder, pools if holder is None else (pools[holder],)))
        pools = around.pools if holder is None else pools[:holder] + around.pools + pools[holder + 1:]
    recurrent = ()  # (nothing drawn at share 0: the conv-only programs stay as they were)
    if recurrent_share > 0 and (recurrent_share >= 1 or draw(st.integers(0, 999)) >= 1000 * (1 - recurrent_share)):
        recurrent = tuple(draw(rpools_of(i, slots)) for i in range(draw(st.integers(1, max_recurrent))))
    dispatch = draw(st.sampled_from(DISPATCH))
    width_x = max([p.dim for p in pools] + [r.heads * max(r.k, r.v) for r in recurrent])
    bodies = tuple(draw(entries(i, pools, dispatch, width_x, max_other_uses, layers, around, recurrent))
                   for i in range(draw(st.integers(1, max_entries))))
    batch = st.integers(1, min(slots, 4))
    calls = draw(st.lists(st.tuples(st.integers(0, len(bodies) - 1), batch), min_size=1, max_size=max_calls))
    calls = tuple((e, slots if bodies[e].whole else b) for e, b in calls)
    layer_calls = draw(st.sampled_from(["after", "twice"] + (["before"] if dispatch != "rank" else [])))
    if around is not None:
        around = dataclasses.replace(around, actions=draw(actions(around, layers, len(calls), max_actions)))
        instances = [k for k, c in enumerate(layers) if c == around.holder]
        if len(instances) > 1 and draw(st.integers(0, 2)) == 2:
            around = dataclasses.replace(around, shared=tuple(draw(st.permutations(instances)))[:2])
    return Program(pools, bodies, dispatch, draw(st.booleans()), draw(st.sampled_from(["int64", "int32"])),
                   calls, draw(st.integers(0, 2**16)), draw(st.integers(0, 3)) == 3, layers, layer_calls,
                   draw(st.integers(0, 3)) == 3, around, recurrent)


# ----------------------------------------------------------------------------- around the graph
# Issue 20's second axis. The holder (the Model, or one layer class) keeps its pools in one of
# the ways engines do and Python state its forward reads and writes; hooks touch the served
# pool; between calls the harness acts like a server (the same on both models).

BINDINGS = ("buffer", "attribute", "list", "dict")
FEATURES = ("flag", "counter", "drain", "snapshot", "after", "debug")


def _hook(draw, name: str, p: Pool) -> str:
    """A module-level hook function on the served pool (module.<its name>)."""
    ref = "module" + p.ref.removeprefix("self")
    if name == "drain":
        kwargs = draw(st.booleans())
        write = draw(st.sampled_from([f"{ref}[idx] = 0.0", f"{ref}.index_fill_(0, idx, 0.0)",
                                      f"{ref}[idx, -1] = 1.0", f"{ref}[idx] *= 0.5"]))
        return "\n".join([f"def drain(module, args{', kwargs' if kwargs else ''}):",
                          '    """A forward pre-hook: the slots the scheduler queued are freed first."""',
                          "    if module.to_free:", "        idx = torch.tensor(module.to_free)", f"        {write}",
                          "        module.to_free = []"])
    if name == "snapshot":
        return "\n".join(["def snapshot(module, args):",
                          '    """A forward pre-hook: the pool before the call, kept for undo()."""',
                          f"    module._ckpt = {ref}.detach().clone()"])
    slot = draw(st.integers(0, p.slots - 1))
    body = draw(st.sampled_from([f"{ref}[{slot}] *= 0.5", f"{ref}[{slot}] = torch.roll({ref}[{slot}], 1, 0)",
                                 "return tuple(o * 2 for o in out)"]))
    return "\n".join(["def after(module, args, out):", '    """A forward hook."""', f"    {body}"])


@st.composite
def arounds(draw, holder: int | None, pools: tuple[Pool, ...]) -> Around:
    """How the holder keeps `pools` (its own, owner self or a child) and what Python it keeps."""
    backing = draw(st.sampled_from(["own", "own", "raw"]))
    binding = draw(st.sampled_from(BINDINGS))
    local = {"buffer": "p{i}", "attribute": "p{i}", "list": "kv_cache[0][{j}]", "dict": "cache['conv{i}']"}[binding]
    pools = tuple(dataclasses.replace(p, owner="self", local=local.format(i=p.index, j=j), dense=backing == "own")
                  for j, p in enumerate(pools))
    features = tuple(draw(st.lists(st.sampled_from(FEATURES), unique=True, max_size=3)))
    server = draw(st.integers(0, len(pools) - 1))
    hooks = tuple(_hook(draw, f, pools[server]) for f in features if f in ("drain", "snapshot", "after"))
    return Around(holder, pools, backing, binding, draw(st.sampled_from(["", "", "buffer", "attribute"])),
                  draw(st.booleans()), backing == "raw" and draw(st.booleans()), features, server, hooks)


def spelled(draw, around: Around, pools: tuple[Pool, ...]) -> tuple[Pool, ...]:
    """The pools as one entry's code names them: through their second name, sometimes."""
    if not around.alias:
        return pools
    return tuple(dataclasses.replace(p, local=f"q{p.index}") if draw(st.booleans()) else p for p in pools)


@st.composite
def around_lines(draw, around: Around, body: Body) -> None:
    """One entry's lines for the holder's Python state, around the body (which they wrap)."""
    pre, post, kinds = [], [], []
    pools = body.program_pools
    if "flag" in around.features:
        cond = draw(st.sampled_from(["self.has_previous_state",
                                     "self.has_previous_state and self.continue_from_cache"]))
        p = draw(st.sampled_from(pools))
        how = draw(st.sampled_from(["reset", "init", "gated use"]))
        if how == "reset":  # transformers' caches: no previous state, the call's slots start from zeros
            pre.append(f"if not ({cond}):\n    {p.ref}[slots] = 0.0")
        elif how == "init":  # the state read is the pool's or zeros, by the flag
            init, win = body.name("init"), body.name("win")
            tok, x = (1, x_tokens(p, "BTD")) if p.layout == "SD" else (2, x_tokens(p, "BDT"))
            tail = f"{win}[:, -{p.state_len}:]" if p.layout == "SD" else f"{win}[..., -{p.state_len}:]"
            pre += [f"{init} = {p.ref}[slots] if {cond} else torch.zeros_like({p.ref}[slots])",
                    f"{win} = torch.cat([{init}, {x}], {tok})", f"{p.ref}[slots] = {tail}", f"outs.append({win})"]
        else:  # a generated use, taken only while the flag is set
            sub = Body(pools, body.tokens, body.whole, body.width_x, count=100 + body.count)
            use = draw(st.sampled_from([u for u in UPDATES + OTHER_USES if _applicable(u, sub, p)]))
            draw(use(sub, p))
            body.count = sub.count
            if sub.lines:
                pre.append(f"if {cond}:\n" + "\n".join(f"    {line}" for line in sub.lines))
                kinds += [f"flag {k}" for k in sub.kinds]
        if draw(st.integers(0, 3)) > 0:
            post.append("self.has_previous_state = True")
        kinds.append(f"py:flag-{how}")
    if "counter" in around.features:
        pre += draw(st.lists(st.sampled_from(["self.seen += x.shape[0]", "self.history.append(x.shape[1])"]),
                             min_size=1, max_size=2, unique=True))
        p = draw(st.sampled_from(pools))
        how = draw(st.sampled_from(["output", "scale", "branch", "sum"]))
        post.append({"output": "outs.append(x[:, -1, 0] * (1 + self.seen % 3))",
                     "scale": f"{p.ref}[slots] = {p.ref}[slots] * (0.5 + self.seen % 2)",
                     "branch": f"if len(self.history) % 2 == 0:\n    {p.ref}[slots[:1]] = 0.0",
                     "sum": "outs.append(x[:, 0, 0] * float(sum(self.history)))"}[how])
        kinds.append(f"py:counter-{how}")
    if "debug" in around.features:  # from then on the holder runs as written, its code proven for nothing
        p = draw(st.sampled_from(pools))
        sub = Body(pools, body.tokens, body.whole, body.width_x, count=200 + body.count)
        if draw(st.booleans()):  # debug code written for the model's memory order: a write through a flat view
            how = draw(st.sampled_from(["flatten(1)", f"view({p.slots}, -1)", f"reshape({p.slots}, -1)"]))
            sub.lines.append(f"{p.ref}.{how}[slots, :{draw(st.integers(1, p.state_len * p.dim))}] *= 0.5")
            sub.kinds.append(f"write:memory-order-{how.split('(')[0]}")
        else:
            draw(draw(st.sampled_from([u for u in UPDATES + OTHER_USES if _applicable(u, sub, p)]))(sub, p))
        body.count = sub.count
        pre.append("\n".join(["if self.debug:", "    torch._dynamo.graph_break()", *(f"    {x}" for x in sub.lines)]))
        kinds += ["py:debug-break", *(f"debug {k}" for k in sub.kinds)]
    if around.backing == "raw" and draw(st.booleans()):  # the pages used in the forward, slot by slot
        how = draw(st.sampled_from(["reset", "scale", "copy row", "copy row", "peek"]))
        pre.append({"reset": "self.raw[slots[:1]] = 0.0", "scale": "self.raw[slots] *= 0.5",
                    "copy row": "self.raw[slots[:1]] = self.raw[slots[-1:]]",
                    "peek": "outs.append(self.raw[slots, :3] * 1.0)"}[how])  # peek: bytes read as a layout
        kinds.append(f"py:raw-{how}")
    if around.ssm and draw(st.booleans()):
        pre += ["self.ssm[slots] = self.ssm[slots] * 0.5 + x[:, -1, None, :2]", "outs.append(self.ssm[slots])"]
        kinds.append("py:ssm-update")
    body.lines[:0] = pre
    body.lines += post
    body.kinds += kinds


@st.composite
def actions(draw, around: Around, layers: tuple[int, ...], calls: int, max_actions: int):
    """What the harness does between calls. Actions on the holder go to `m` (or each instance of
    its layer class, `m.layers[k]`); state_dict round trips and copies to the whole model."""
    targets = ["m"] if around.holder is None else [f"m.layers[{k}]" for k, c in enumerate(layers)
                                                   if c == around.holder]
    slots = st.lists(st.integers(0, around.served.slots - 1), min_size=1, max_size=around.served.slots, unique=True)
    kinds = ["free_slots", "rollback", "load_slots", "realloc", "state_dict-self", "state_dict-fresh",
             "state_dict-plain", "state_dict-scaled", "state_dict-export", "pickle", "deepcopy"]
    kinds += ["flag-clear", "flag-continue"] if "flag" in around.features else []
    kinds += ["counter-reset"] if "counter" in around.features else []
    kinds += ["queue-free"] if "drain" in around.features else []
    kinds += ["undo"] if "snapshot" in around.features else []
    kinds += ["raw-scale", "raw-copy-row"] if around.backing == "raw" else []
    kinds += ["alias-write"] if around.alias else []
    kinds += ["rebind-same", "rebind-clone"] if around.binding in ("list", "dict") else []
    kinds += ["realloc-one"] if around.binding in ("buffer", "attribute") and around.backing == "own" else []
    out = []
    for _ in range(draw(st.integers(0, max_actions))):
        kind = draw(st.sampled_from(kinds))
        if kind == "undo" and calls < 2:
            continue
        step = draw(st.integers(1 if kind == "undo" else 0, calls - 1))
        out.append(Action(step, _action_code(draw, kind, draw(st.sampled_from(targets)), around, draw(slots)), kind))
    if "debug" in around.features:  # the switch is the feature's point; its step is drawn
        step = draw(st.integers(min(1, calls - 1), calls - 1))  # after the first call, which moves the pools
        out.append(Action(step, f"{draw(st.sampled_from(targets))}.debug = True", "debug-on"))
    return tuple(sorted(out, key=lambda a: a.step))


STATE_DICT = {  # round trips, each the same on both models
    "state_dict-self": "m.load_state_dict(m.state_dict())",
    "state_dict-fresh": "m.load_state_dict(Model().state_dict())  # a plain model's state into it",
    "state_dict-plain": "plain = Model()  # its state through a plain model and back\n"
                        "plain.load_state_dict(m.state_dict())\nm.load_state_dict(plain.state_dict())",
    "state_dict-scaled": "m.load_state_dict({k: v * 0.5 if v.dim() == 3 else v for k, v in m.state_dict().items()})",
    "state_dict-export": "plain = Model()  # its state into a plain model, which goes on in its place\n"
                         "plain.load_state_dict(m.state_dict())\nm = plain",
}


def _action_code(draw, kind: str, t: str, around: Around, chosen: list[int]) -> str:
    """The statement of one harness action on target `t` (the model, or a layer of it)."""
    p = around.served
    ref = t + p.ref.removeprefix("self")
    container = {"list": "kv_cache", "dict": "cache"}.get(around.binding)
    if kind in STATE_DICT:
        return STATE_DICT[kind]
    if kind in ("pickle", "deepcopy"):  # the copy goes on in the model's place
        return "m = pickle.loads(pickle.dumps(m))" if kind == "pickle" else "m = copy.deepcopy(m)"
    if kind in ("free_slots", "undo", "queue-free"):
        return f"{t}.to_free = {chosen}" if kind == "queue-free" else f"{t}.{kind}(torch.tensor({chosen}))"
    if kind == "rollback":
        return f"{t}.rollback({chosen[0]})"
    if kind == "load_slots":
        n = len(chosen) * p.state_len * p.dim
        return f"{t}.load_slots(torch.tensor({chosen}), torch.arange({n}, dtype=torch.float32) / 10)"
    if kind == "realloc":
        return f"{t}.allocate(torch.Generator().manual_seed({draw(st.integers(0, 999))}))  # new, the model's order"
    if kind == "realloc-one":
        return f"{ref} = torch.randn({p.shape}, generator=torch.Generator().manual_seed({draw(st.integers(0, 999))}))"
    if kind == "flag-clear":
        return f"{t}.has_previous_state = False  # new sequences"
    if kind == "flag-continue":
        return f"{t}.continue_from_cache = {draw(st.booleans())}"
    if kind == "counter-reset":
        return draw(st.sampled_from([f"{t}.seen = 0", f"{t}.history.clear()"]))
    if kind == "raw-scale":
        return f"{t}.raw[torch.tensor({chosen})] *= torch.tensor({[[0.5 * (i % 3)] for i in range(len(chosen))]})"
    if kind == "raw-copy-row":
        return f"{t}.raw[{chosen[0]}] = {t}.raw[{chosen[-1]}]"
    if kind == "alias-write":
        return f"{t}.q{p.index}[{chosen[0]}] = 0.0  # through the second name"
    if kind == "rebind-same":  # a new container, the same tensors
        return f"{t}.{container} = [tuple({t}.{container}[0])]" if container == "kv_cache" else \
            f"{t}.{container} = dict({t}.{container})"
    assert kind == "rebind-clone", kind  # a new container of copies
    return f"{t}.{container} = [tuple(c.clone() for c in {t}.{container}[0])]" if container == "kv_cache" else \
        f"{t}.{container} = {{k: v.clone() for k, v in {t}.{container}.items()}}"


# ----------------------------------------------------------------------------- the property


class GeneratorError(Exception):
    """The original model itself failed: a bug of this generator, not of the pass."""


@dataclass(frozen=True)
class Outcome:
    # equivalent | rounding | refused | refused-partial (logical state intact, an earlier layer's
    # pools of the same call already moved) | mismatch | crash | late-refusal | caller-changed (the
    # model passed to optimize() changed: state, attributes, a meta/fake tensor left) | other
    kind: str
    detail: str = ""
    step: int | None = None
    lowered: bool = False

    @property
    def ok(self) -> bool:
        return self.kind in ("equivalent", "rounding", "refused", "refused-partial")

    def reason(self) -> str:
        """The detail with names, numbers and source lines taken out: a failure's class."""
        lines = [line for line in self.detail.splitlines() if line.strip()]
        first = " ".join(lines[:2]) if lines and lines[0].endswith("raised:") else lines[0] if lines else ""
        text = re.sub(r"at <fuzz program.*|at .*\.py:\d+.*", "", first)  # (Dynamo's wrapper: its cause too)
        text = re.sub(r"'[^']*'|\"[^\"]*\"|\(\d[\d, ]*\)|\[[^\]]*\]|\b\d+\b", "_", text)
        return f"{self.kind}: {text.strip()[:140]}"


def _clone(tree):
    return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


def _same(a, b, tolerance: float) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.allclose(a, b, rtol=tolerance, atol=tolerance, equal_nan=True) if tolerance else \
        torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all())


_MODULE_FIELDS = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping
_OPTIMIZED_FIELDS = frozenset({"_lp", "forward"})  # what optimize() keeps on the instance (its session, bound layers)


def _strides(module) -> dict:
    return {n: t.stride() for n, t in state_tensors(module)}


def _pre_hooked(model):
    """The model after its forward pre-hooks ran once (a refused call ran them: they are the
    model's own eager code, before any graph)."""
    for m in model.modules():
        for key, hook in list(m._forward_pre_hooks.items()):
            hook(m, (), {}) if key in m._forward_pre_hooks_with_kwargs else hook(m, ())
    return model


def _kept_by_refusal(fast, logical: dict, attributes: dict, hooked) -> bool:
    """Whether a refused call left the optimized model's logical state and Python attributes as
    they were before it, but for what its pre-hooks did (each item as before, or as after them)."""
    now, after = logical_buffers(fast), logical_buffers(hooked)
    if not all((n in logical and _same(t, logical[n], 0.0)) or (n in after and _same(t, after[n], 0.0))
               for n, t in now.items()):
        return False
    now, after = _attributes(fast), _attributes(hooked)
    return all(v == attributes.get(n) or v == after.get(n) for n, v in now.items())


def _summary(value):
    """A Python attribute as the harness compares it between the two models: tensors by their
    metadata (their values are compared as state, logically), the rest by type and value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", type(value).__name__, tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, (list, tuple)):
        return type(value).__name__, tuple(_summary(v) for v in value)
    if isinstance(value, dict):
        return type(value).__name__, tuple((k, _summary(v)) for k, v in value.items())
    if value is None or isinstance(value, (bool, int, float, str)):
        return type(value).__name__, value
    return type(value).__name__  # functions, objects: by kind


def _attributes(model) -> dict:
    """Every module's Python attributes (not nn.Module's bookkeeping, not submodules)."""
    return {f"{path}.{k}".lstrip("."): _summary(v) for path, m in model.named_modules() for k, v in vars(m).items()
            if k not in _MODULE_FIELDS and k not in _OPTIMIZED_FIELDS and not isinstance(v, nn.Module)}


def _exact(value, depth=0):
    """A model attribute as it is, for telling that the caller's model did not change: tensors by
    class, device, metadata and a copy of their values; containers and hook tables item by item;
    other objects by identity."""
    if isinstance(value, torch.Tensor):
        meta = (type(value).__name__, value.device.type, value.dtype, tuple(value.shape), value.stride(),
                value.storage_offset(), value.requires_grad)
        return ("tensor", meta, None if value.is_meta or isinstance(value, FakeTensor) else value.detach().clone())
    if depth < 6 and isinstance(value, (list, tuple)):
        return type(value).__name__, tuple(_exact(v, depth + 1) for v in value)
    if depth < 6 and isinstance(value, dict):
        return type(value).__name__, tuple((k, _exact(v, depth + 1)) for k, v in value.items())
    if value is None or isinstance(value, (bool, int, float, str)):
        return type(value).__name__, value
    return "object", id(value)


def _fingerprint(model) -> dict:
    return {(path, k): _exact(v) for path, m in model.named_modules(remove_duplicate=False)
            for k, v in vars(m).items() if k != "_modules"}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _caller_changed(model, before: dict) -> str | None:
    """How the model passed to optimize() changed (its state, Python attributes, hooks), if it did."""
    now = _fingerprint(model)
    for key in sorted(before.keys() | now.keys(), key=str):
        if key not in now or key not in before or not _equal(before[key], now[key]):
            return f"the caller's model changed: {key[0] or 'the model'}.{key[1]}"
    return _fake_tensors(model, "the caller's model")


def _fake_tensors(model, whose: str) -> str | None:
    for path, t in state_tensors(model):
        if t.is_meta or isinstance(t, FakeTensor):
            return f"{whose} holds a {'fake' if isinstance(t, FakeTensor) else 'meta'} tensor at {path}"
    return None


def _differs(reference, fast, tolerance: float) -> str | None:
    """Where the optimized model's state (logically: a container of moved pools read back in the
    model's order) or Python attributes differ from the original's, if they do."""
    want, have = logical_buffers(reference), logical_buffers(fast)
    if want.keys() != have.keys():
        return f"state differs in its paths: {sorted(want.keys() ^ have.keys())[:3]}"
    for name, t in want.items():
        if not _same(t, have[name], tolerance):
            return f"state {name} differs"
    want, have = _attributes(reference), _attributes(fast)
    for name in sorted(want.keys() | have.keys()):
        if want.get(name) != have.get(name):
            return f"Python attribute {name} differs: {have.get(name)} instead of {want.get(name)}"
    return _fake_tensors(fast, "the optimized model")


def _frames(err: BaseException):
    tb = err.__traceback__
    while tb is not None:
        yield tb.tb_frame.f_code
        tb = tb.tb_next


def _in_a_graph(err: BaseException) -> bool:
    """Raised while a captured graph ran (its code is generated: `<eval_with_key...>`)."""
    return any(code.co_filename.startswith("<eval_with_key") for code in _frames(err))


def _harness_line(err: BaseException) -> str:
    """The line of the program's harness (between()) that raised."""
    tb, line = err.__traceback__, ""
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "between":
            line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).strip()
        tb = tb.tb_next
    return line


def _lowered(fast) -> bool:
    report = getattr(fast, "report", None)
    return any(u.action == "lowered" for u in getattr(report, "uses", ()))


@torch.no_grad()
def check(program: Program, layout: str, lower: bool, optimizer=optimize) -> Outcome:
    """Run the program's calls, and its harness's actions between them, through the original (a
    deep copy, eager) and optimize(model) (`optimizer`: a stand-in, for testing this harness)."""
    try:
        namespace = program.namespace()
    except Exception as err:
        raise GeneratorError(f"the program does not compile: {type(err).__name__}: {err}") from err
    try:
        return _check(program, namespace, layout, lower, optimizer)
    finally:
        forget(namespace)


def _check(program: Program, namespace: dict, layout: str, lower: bool, optimizer) -> Outcome:
    try:
        model = namespace["Model"]()
    except Exception as err:
        raise GeneratorError(f"the model cannot be built: {type(err).__name__}: {err}") from err
    reference, caller = copy.deepcopy(model), _fingerprint(model)
    try:
        fast = optimizer(model, layout, lower=lower, state_buffers=program.state_buffers(),
                         example_inputs=program.example_inputs(namespace["inputs"]))
    except LayoutPassError as err:
        changed = _caller_changed(model, caller)
        return Outcome("caller-changed", f"{changed}, refused: {err}") if changed else \
            Outcome("refused", f"{type(err).__name__}: {err}", None)
    except Exception as err:  # noqa: BLE001 - anything else is the pass's failure, classified
        return Outcome("other", f"{type(err).__name__}: {err}", None)
    if changed := _caller_changed(model, caller):
        return Outcome("caller-changed", f"{changed} by optimize()", None)
    between = namespace.get("between")
    gen = torch.Generator().manual_seed(program.seed)
    rounding = False
    # a lowered kernel rounds apart from the model's code, and a recurrence's rounding stays in the
    # state: with lowering on, outputs and state within LOWERED_TOLERANCE (the report may no longer
    # list the lowered graph that ran: a later call can drop the graphs, see benchmarks/NOTES.md)
    tolerance = LOWERED_TOLERANCE if lower else 0.0
    for step, (entry, batch) in enumerate(program.calls):
        if between is not None:
            try:
                reference = between(step, reference)
            except Exception as err:
                raise GeneratorError(f"the harness fails on the original before step {step}: "
                                     f"{type(err).__name__}: {err}") from err
            try:
                fast = between(step, fast)
            except Exception as err:  # noqa: BLE001
                message = f"the harness before step {step}: `{_harness_line(err)}`: {type(err).__name__}: {err}"
                return Outcome("crash" if _in_a_graph(err) else "other", message, step, _lowered(fast))
            if difference := _differs(reference, fast, tolerance):
                acts = ", ".join(a.kind for a in program.around.actions if a.step == step) if program.around else ""
                return Outcome("mismatch", f"after the harness before step {step} ({acts}): {difference}", step,
                               _lowered(fast))
            if changed := _caller_changed(model, caller):
                return Outcome("caller-changed", f"{changed} by the harness before step {step}", step)
        args, kwargs = namespace["inputs"](entry, batch, gen)
        try:
            pre = copy.deepcopy(reference)  # as it was before the call (a refusal is judged against it)
            expected = reference(*_clone(args), **_clone(kwargs))
        except Exception as err:
            raise GeneratorError(f"the original model fails at step {step}: {type(err).__name__}: {err}") from err
        strides, logical, attributes = _strides(fast), _clone(logical_buffers(fast)), _attributes(fast)
        try:
            got = fast(*_clone(args), **_clone(kwargs))
        except Exception as err:  # noqa: BLE001
            message = f"{type(err).__name__}: {err}"
            if _in_a_graph(err):
                return Outcome("crash", message, step, _lowered(fast))
            if not isinstance(err, LayoutPassError):
                return Outcome("other", message, step, _lowered(fast))
            if changed := _caller_changed(model, caller):
                return Outcome("caller-changed", f"{changed}, refused: {message}", step)
            if not _kept_by_refusal(fast, logical, attributes, _pre_hooked(pre)):
                return Outcome("late-refusal", message, step, _lowered(fast))
            moved = any(t.stride() != strides.get(n, t.stride()) for n, t in state_tensors(fast))
            return Outcome("refused-partial" if moved else "refused", message, step, _lowered(fast))
        expected, got = torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)
        if len(expected) != len(got):
            return Outcome("mismatch", f"{len(got)} outputs, expected {len(expected)}", step, _lowered(fast))
        for i, (a, b) in enumerate(zip(expected, got)):
            if not _same(a, b, tolerance) and not _same(a, b, max(tolerance, ROUNDING)):
                return Outcome("mismatch", f"output {i} differs (shape {tuple(b.shape)} vs {tuple(a.shape)})",
                               step, _lowered(fast))
            rounding |= not _same(a, b, tolerance)
        if difference := _differs(reference, fast, tolerance):
            return Outcome("mismatch", difference, step, _lowered(fast))
        if changed := _caller_changed(model, caller):
            return Outcome("caller-changed", changed, step, _lowered(fast))
    return Outcome("rounding" if rounding else "equivalent", "", None, _lowered(fast))


# ----------------------------------------------------------------------------- minimizing


def _variants(program: Program):
    """Smaller programs: a call dropped, a batch shrunk, a line or an entry's body dropped, an
    unused pool dropped. Most are invalid (a name no longer defined): check() says so."""
    from dataclasses import replace
    calls = program.calls
    for i in range(len(calls)):
        if len(calls) > 1:
            yield replace(program, calls=calls[:i] + calls[i + 1:], around=_without_call(program.around, i))
        entry, batch = calls[i]
        if batch > 1 and not program.entries[entry].whole:
            yield replace(program, calls=calls[:i] + ((entry, batch - 1),) + calls[i + 1:])
    for e in program.entries:
        for shorter in _shorter_bodies(e):
            yield replace(program, entries=program.entries[:e.index] + (shorter,) + program.entries[e.index + 1:])
    model_lines = " ".join(line for e in program.entries for line in e.lines)
    for k, c in enumerate(program.layers):  # a layer instance the model's own lines do not name
        if len(program.layers) > 1 and (program.layers.count(c) > 1 or "self.layers[" not in model_lines):
            yield replace(program, layers=program.layers[:k] + program.layers[k + 1:])
    text = "\n".join(line for e in program.entries for lines in (e.lines, *e.layer_lines) for line in lines)
    for p in program.pools if not program.layers else ():
        if len(program.pools) > 1 and not re.search(rf"\bp{p.index}\b|\bw{p.index}\b|\bb{p.index}\b", text):
            yield replace(program, pools=tuple(q for q in program.pools if q is not p))
    for r in program.recurrent:  # a recurrent pool no line names; a named one left to discovery
        if not re.search(rf"\br{r.index}\b|\b(A|D|dtb){r.index}\b", text):
            yield replace(program, recurrent=tuple(s for s in program.recurrent if s is not r))
        elif r.named and r.op:
            yield replace(program, recurrent=tuple(replace(s, named=False) if s is r else s for s in program.recurrent))
    yield from _smaller_arounds(program)
    if program.named:
        yield replace(program, named=False)
    if program.upfront:
        yield replace(program, upfront=False)
    if program.layer_calls != "after":
        yield replace(program, layer_calls="after")


def _without_call(around: Around | None, i: int) -> Around | None:
    """The harness once call i is dropped: its actions go before the next call."""
    if around is None:
        return None
    return dataclasses.replace(around, actions=tuple(dataclasses.replace(a, step=a.step - (a.step > i))
                                                     for a in around.actions))


def _smaller_arounds(program: Program):
    """The program with one harness action, one feature or one storage option less."""
    from dataclasses import replace
    a = program.around
    if a is None:
        return
    for i in range(len(a.actions)):
        yield replace(program, around=replace(a, actions=a.actions[:i] + a.actions[i + 1:]))
    for f in a.features:
        hooks = tuple(h for h in a.hooks if not h.startswith(f"def {f}("))
        yield replace(program, around=replace(a, features=tuple(g for g in a.features if g != f), hooks=hooks))
    for field_, plain in (("alias", ""), ("ssm", False), ("raw_buffer", False), ("shared", None)):
        if getattr(a, field_) != plain:
            yield replace(program, around=replace(a, **{field_: plain}))


def _shorter_bodies(e: Entry):
    """The entry with one body emptied, or one line of one body dropped."""
    from dataclasses import replace
    bodies = [e.lines, *e.layer_lines]

    def with_body(i, lines):
        return replace(e, lines=lines) if i == 0 else \
            replace(e, layer_lines=e.layer_lines[:i - 1] + (lines,) + e.layer_lines[i:])
    for i, lines in enumerate(bodies):
        if len(lines) > 1:
            yield with_body(i, ())
        for j in range(len(lines)):
            yield with_body(i, lines[:j] + lines[j + 1:])


def minimize(program: Program, layout: str, lower: bool, reason: str, budget_s: float = 300.0) -> Program:
    """The smallest program (greedy, line by line) whose check() still fails with `reason`."""
    import time
    deadline = time.monotonic() + budget_s
    improved = True
    while improved and time.monotonic() < deadline:
        improved = False
        for candidate in _variants(program):
            if time.monotonic() > deadline:
                break
            try:
                outcome = check(candidate, layout, lower)
            except Exception:  # noqa: BLE001 - the candidate is no valid program (check() classifies the pass's errors)
                continue
            if outcome.reason() == reason:
                program, improved = candidate, True
                break
    return program
