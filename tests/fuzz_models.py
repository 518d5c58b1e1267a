"""Generated models that attack the pass (hypothesis strategies), and the property they must keep.

`programs()` writes small nn.Modules as Python source: one to three rank-3 conv-state pools
stored SD (slot, tok, dim) or DS (slot, dim, tok), one to three entry points (distinct call
structures of `forward`, told apart by a `mode` string, the rank of `x`, a keyword set or
`**kwargs`), each entry a random composition of pool uses: the conv ops, pure-torch updates
(cat or roll, multiply-and-sum or conv1d), slot gathers and scatters, views of every spelling,
resets, tail copies, memory-order views. Every composition is well typed by construction: the
generator tracks each value's axes (slot, b = the call's slots, tok, dim) and sizes.

`check(program, layout, lower)` is the property: the optimized model, called in the program's
order, gives the original's outputs and logical state at every step, or a LayoutPassError
stops it before any buffer moved. Anything else is a failure, classified for the tally."""

import copy
import dataclasses
import linecache
import re
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from layoutpass import LayoutPassError, optimize
from layoutpass.equivalence import logical_buffers

AXES = {"SD": ("slot", "tok", "dim"), "DS": ("slot", "dim", "tok")}
DISPATCH = ("mode", "keys", "kwargs", "rank")
KERNEL_WIDTHS = range(2, 7)  # the conv ops' widths; wider pools get pure-torch updates only
LOWERED_TOLERANCE = 1e-5  # a lowered kernel sums the taps in another order than the model's code
# torch reduces a contiguous axis in another order than a strided one: a sum or a matmul over a
# relayouted axis may differ in the last bits. Such outputs count apart ("rounding"); state is exact.
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

    @property
    def ref(self) -> str:
        return f"{self.owner}.p{self.index}"

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

    def init(self) -> list[str]:
        """Its buffer and parameters, created in the owner's __init__ (`gen` seeds them)."""
        shape = ", ".join(str(self.size(a)) for a in self.axes)
        lines = [f"{self.owner}.register_buffer('p{self.index}', torch.randn({shape}, generator=gen))"
                 f"  # {self.layout}, width {self.width}",
                 f"self.w{self.index} = nn.Parameter(torch.randn({self.dim}, {self.width}, generator=gen))"]
        return lines + ([f"self.b{self.index} = nn.Parameter(torch.randn({self.dim}, generator=gen))"]
                        if self.bias else [])


@dataclass(frozen=True)
class Entry:
    index: int
    tokens: int  # T: x is (batch, T, E) inside the body
    whole: bool  # every call passes all slots (batch = number of slots)
    lines: tuple[str, ...]  # the model's own body for this call structure
    kinds: tuple[str, ...]  # the use kinds in the bodies, for the tally
    layer_lines: tuple[tuple[str, ...], ...] = ()  # layered programs: the body of each layer class


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

    def example_inputs(self, inputs) -> list | None:
        """One call of each (entry, batch), other data than the run's, for optimize(example_inputs=)."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        return [inputs(e, b, gen) for e, b in dict.fromkeys(self.calls)] if self.upfront else None

    @property
    def slots(self) -> int:
        return self.pools[0].slots

    @property
    def width_x(self) -> int:
        return max(p.dim for p in self.pools)

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
        return {k for e in self.entries for k in e.kinds} | config

    def source(self) -> str:
        """The model, its inputs and its call order, as a standalone Python module."""
        classes = []
        for c in sorted(set(self.layers)):
            init = [f"        {line}" for line in (["self.inner = nn.Module()"] if self.pools[c].owner == "self.inner"
                                                        else []) + self.pools[c].init()]
            classes += [f"class Layer{c}(nn.Module):", "    def __init__(self, gen):", "        super().__init__()",
                        *init, "", *self._forward([e.layer_lines[c] for e in self.entries]), "", ""]
        init = [f"        gen = torch.Generator().manual_seed({self.seed})"]
        if self.layers:
            init.append(f"        self.layers = nn.ModuleList([{', '.join(f'Layer{c}(gen)' for c in self.layers)}])")
        else:
            init += ["        self.sub = nn.Module()"] if any(p.owner == "self.sub" for p in self.pools) else []
            init += [f"        {line}" for p in self.pools for line in p.init()]
        call = {"mode": "x, slots, mode", "keys": "x, slots, gate=gate, flag=flag", "kwargs": "x, slots, **kwargs",
                "rank": "x, slots"}[self.dispatch]
        layers = ["        for layer in self.layers:", f"            outs.extend(layer({call}))"] if self.layers else []
        layers *= 2 if self.layer_calls == "twice" else 1
        return "\n".join([
            "import torch", "import torch.nn.functional as F", "from torch import nn",
            "from layoutpass.kernels import conv_prefill, conv_update", "", "", *classes,
            "class Model(nn.Module):", "    def __init__(self):", "        super().__init__()", *init, "",
            *self._forward([e.lines for e in self.entries], layers, self.layer_calls == "before"), "", "",
            *self._inputs(), "",
            f"CALLS = {list(self.calls)}  # (entry, batch)", ""])

    def _forward(self, bodies, layers=(), layers_last=False) -> list[str]:
        signature = {"mode": "x, slots, mode", "keys": "x, slots, gate=None, flag=None",
                     "kwargs": "x, slots, **kwargs", "rank": "x, slots"}[self.dispatch]
        lines = [f"    def forward(self, {signature}):", "        outs = []", *(() if layers_last else layers)]
        for e, body in zip(self.entries, bodies):
            test, prologue = self._branch(e)
            lines.append(f"        {'if' if e.index == 0 else 'elif'} {test}:")
            lines += [f"            {s}" for s in (*prologue, *body)] or ["            pass"]
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

    def state_buffers(self) -> dict[str, str] | None:
        if not self.named:
            return None
        if self.layers:
            return {f"layers.{k}.{self.pools[c].owner[5:]}.p{c}".replace("..", "."): self.pools[c].layout
                    for k, c in enumerate(self.layers)}
        return {("sub." if p.owner == "self.sub" else "") + f"p{p.index}": p.layout for p in self.pools}

    def script(self, layout: str, lower: bool) -> str:
        """The source and a driver that checks it against its untouched copy: a standalone repro."""
        return self.source() + DRIVER.format(layout=layout, lower=lower, seed=self.seed, upfront=self.upfront,
                                             named=self.state_buffers(), tolerance=LOWERED_TOLERANCE)

    def __repr__(self) -> str:
        return "\n" + self.source() + f"# optimize(..., state_buffers={self.state_buffers()})\n"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis prints a falsifying program as its source
        printer.text(repr(self))

    def namespace(self) -> dict:
        """Execute the source (registered with linecache, so the pass's report quotes its lines)."""
        text = self.source()
        name = f"<fuzz program {abs(hash(text)):x}>"
        linecache.cache[name] = (len(text), None, text.splitlines(True), name)
        namespace = {"__name__": "fuzz_program"}
        exec(compile(text, name, "exec"), namespace)
        return namespace


DRIVER = """

if __name__ == "__main__":  # optimized vs untouched copy, step by step
    import copy
    from layoutpass import optimize
    from layoutpass.equivalence import logical_buffers

    model = Model()
    reference = copy.deepcopy(model)
    gen0 = torch.Generator().manual_seed({seed} + 1)  # optimize() captures every call structure now
    example = [inputs(e, b, gen0) for e, b in dict.fromkeys(CALLS)] if {upfront} else None
    fast = optimize(model, {layout!r}, lower={lower}, state_buffers={named}, example_inputs=example)
    gen = torch.Generator().manual_seed({seed})
    for step, (entry, batch) in enumerate(CALLS):
        args, kwargs = inputs(entry, batch, gen)
        expected, got = reference(*args, **kwargs), fast(*args, **kwargs)
        lowered = any(u.action == "lowered" for u in fast.report.uses)
        same = lambda a, b: a.shape == b.shape and torch.allclose(a, b, rtol={tolerance}, atol={tolerance}) \\
            if lowered else torch.equal(a, b)
        for i, (a, b) in enumerate(zip(expected, got)):
            assert same(a, b), f"step {{step}} (entry {{entry}}): output {{i}} differs"
        state = logical_buffers(fast)
        for name, buf in reference.named_buffers():
            assert same(buf, state[name]), f"step {{step}} (entry {{entry}}): buffer {{name}} differs"
    print("equivalent")
"""


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
    return Value(p.ref, tuple((a, p.size(a)) for a in p.axes), True)


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


UPDATES = (conv_update_use, conv_prefill_use, cat_update_use, roll_update_use, prompt_use)
OTHER_USES = (read_use, write_use, store_use)


def _applicable(use, body: Body, p: Pool) -> bool:
    if use in (conv_update_use, conv_prefill_use):
        return p.width in KERNEL_WIDTHS
    if use is roll_update_use:
        return body.tokens == 1
    return True


def _body(draw, pools: tuple[Pool, ...], tokens: int, whole: bool, width_x: int, max_other_uses: int) -> Body:
    """Most bodies update most of their pools (a layer's state each step), other uses between."""
    body = Body(pools, tokens, whole, width_x)
    updated = [p for p in pools if draw(st.integers(0, 3)) > 0]
    others = [draw(st.sampled_from(pools)) for _ in range(draw(st.integers(0, max_other_uses)))]
    uses = [(p, UPDATES) for p in updated] + [(p, OTHER_USES) for p in others]
    for p, group in draw(st.permutations(uses)):
        use = draw(st.sampled_from([u for u in group if _applicable(u, body, p)]))
        draw(use(body, p))
    return body


@st.composite
def entries(draw, index: int, pools: tuple[Pool, ...], dispatch: str, width_x: int, max_other_uses: int,
            layers: tuple[int, ...]):
    tokens = 1 if dispatch == "rank" and index == 0 else draw(st.integers(1, 4))
    whole = draw(st.integers(0, 5)) == 5
    if not layers:
        body = _body(draw, pools, tokens, whole, width_x, max_other_uses)
        return Entry(index, tokens, whole, tuple(body.lines), tuple(body.kinds))
    inner = [_body(draw, (p,), tokens, whole, width_x, max_other_uses) for p in pools]
    model = Body((), tokens, whole, width_x)
    if draw(st.integers(0, 3)) == 3:  # the model itself touches a layer's pool: not owned by the layer
        k = draw(st.integers(0, len(layers) - 1))
        below = pools[layers[k]].owner.removeprefix("self")  # "" or ".inner"
        outside = dataclasses.replace(pools[layers[k]], owner=f"self.layers[{k}]{below}")
        model.program_pools = (outside,)
        draw(draw(st.sampled_from([read_use, write_use]))(model, outside))
        model.kinds[:] = [f"outside {kind}" for kind in model.kinds]
    return Entry(index, tokens, whole, tuple(model.lines), tuple(model.kinds + [k for b in inner for k in b.kinds]),
                 tuple(tuple(b.lines) for b in inner))


@st.composite
def pools_of(draw, index: int, slots: int, layered: bool):
    width = draw(st.integers(2, 8))
    owner = "self" if draw(st.integers(0, 3)) < 3 else "self.inner" if layered else "self.sub"
    return Pool(index, draw(st.sampled_from(["SD", "DS"])), slots, width - 1 + draw(st.integers(0, 2)),
                draw(st.integers(2, 6)), width, draw(st.booleans()), owner)


@st.composite
def programs(draw, max_pools: int = 3, max_entries: int = 3, max_other_uses: int = 3, max_calls: int = 6):
    """A program; the bounds keep CI's examples small (the benchmark takes the defaults). A third
    keep each pool in a layer of its own (some layers twice: identical layers)."""
    slots = draw(st.integers(3, 6))
    layered = draw(st.integers(0, 2)) == 2
    pools = tuple(draw(pools_of(i, slots, layered)) for i in range(draw(st.integers(1, max_pools))))
    layers = tuple(draw(st.permutations(list(range(len(pools))) + draw(st.lists(
        st.integers(0, len(pools) - 1), max_size=2))))) if layered else ()
    dispatch = draw(st.sampled_from(DISPATCH))
    width_x = max(p.dim for p in pools)
    bodies = tuple(draw(entries(i, pools, dispatch, width_x, max_other_uses, layers))
                   for i in range(draw(st.integers(1, max_entries))))
    batch = st.integers(1, min(slots, 4))
    calls = draw(st.lists(st.tuples(st.integers(0, len(bodies) - 1), batch), min_size=1, max_size=max_calls))
    calls = tuple((e, slots if bodies[e].whole else b) for e, b in calls)
    layer_calls = draw(st.sampled_from(["after", "twice"] + (["before"] if dispatch != "rank" else [])))
    return Program(pools, bodies, dispatch, draw(st.booleans()), draw(st.sampled_from(["int64", "int32"])),
                   calls, draw(st.integers(0, 2**16)), draw(st.integers(0, 3)) == 3, layers, layer_calls,
                   draw(st.integers(0, 3)) == 3)


# ----------------------------------------------------------------------------- the property


class GeneratorError(Exception):
    """The original model itself failed: a bug of this generator, not of the pass."""


@dataclass(frozen=True)
class Outcome:
    # equivalent | rounding | refused | refused-partial (logical state intact, an earlier layer's
    # pools of the same call already moved) | mismatch | crash | late-refusal | other
    kind: str
    detail: str = ""
    step: int | None = None
    lowered: bool = False

    @property
    def ok(self) -> bool:
        return self.kind in ("equivalent", "rounding", "refused", "refused-partial")

    def reason(self) -> str:
        """The detail with names, numbers and source lines taken out: a failure's class."""
        text = re.sub(r"at <fuzz program.*|at .*\.py:\d+.*", "", self.detail.splitlines()[0] if self.detail else "")
        text = re.sub(r"'[^']*'|\"[^\"]*\"|\(\d[\d, ]*\)|\[[^\]]*\]|\b\d+\b", "_", text)
        return f"{self.kind}: {text.strip()[:140]}"


def _clone(tree):
    return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


def _same(a, b, tolerance: float) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.allclose(a, b, rtol=tolerance, atol=tolerance, equal_nan=True) if tolerance else \
        torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all())


def _untouched(module, saved: dict) -> bool:
    now = dict(module.named_buffers())
    return all(now[n].shape == b.shape and now[n].stride() == b.stride() and torch.equal(now[n], b)
               for n, b in saved.items())


def _snapshot(module) -> dict:
    return {n: b.clone() for n, b in module.named_buffers()}


def _frames(err: BaseException):
    tb = err.__traceback__
    while tb is not None:
        yield tb.tb_frame.f_code
        tb = tb.tb_next


def _in_a_graph(err: BaseException) -> bool:
    """Raised while a captured graph ran (its code is generated: `<eval_with_key...>`)."""
    return any(code.co_filename.startswith("<eval_with_key") for code in _frames(err))


def _lowered(fast) -> bool:
    report = getattr(fast, "report", None)
    return any(u.action == "lowered" for u in getattr(report, "uses", ()))


@torch.no_grad()
def check(program: Program, layout: str, lower: bool, optimizer=optimize) -> Outcome:
    """Run the program's calls through the original (a deep copy, eager) and optimize(model)
    (`optimizer`: a stand-in, for testing this harness)."""
    namespace = program.namespace()
    model = namespace["Model"]()
    reference, initial = copy.deepcopy(model), _snapshot(model)
    try:
        fast = optimizer(model, layout, lower=lower, state_buffers=program.state_buffers(),
                         example_inputs=program.example_inputs(namespace["inputs"]))
    except LayoutPassError as err:
        return Outcome("refused", f"{type(err).__name__}: {err}", None)
    except Exception as err:  # noqa: BLE001 - anything else is the pass's failure, classified
        return Outcome("other", f"{type(err).__name__}: {err}", None)
    gen = torch.Generator().manual_seed(program.seed)
    rounding = False
    for step, (entry, batch) in enumerate(program.calls):
        args, kwargs = namespace["inputs"](entry, batch, gen)
        try:
            expected = reference(*_clone(args), **_clone(kwargs))
        except Exception as err:
            raise GeneratorError(f"the original model fails at step {step}: {type(err).__name__}: {err}") from err
        before, logical = _snapshot(fast), {n: b.clone() for n, b in logical_buffers(fast).items()}
        try:
            got = fast(*_clone(args), **_clone(kwargs))
        except Exception as err:  # noqa: BLE001
            message = f"{type(err).__name__}: {err}"
            if _in_a_graph(err):
                return Outcome("crash", message, step, _lowered(fast))
            if not isinstance(err, LayoutPassError):
                return Outcome("other", message, step, _lowered(fast))
            if not _untouched(model, initial) or not all(
                    torch.equal(b, logical[n]) for n, b in logical_buffers(fast).items()):
                return Outcome("late-refusal", message, step, _lowered(fast))
            return Outcome("refused" if _untouched(fast, before) else "refused-partial", message, step,
                           _lowered(fast))
        tolerance = LOWERED_TOLERANCE if _lowered(fast) else 0.0
        expected, got = torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)
        if len(expected) != len(got):
            return Outcome("mismatch", f"{len(got)} outputs, expected {len(expected)}", step, _lowered(fast))
        for i, (a, b) in enumerate(zip(expected, got)):
            if not _same(a, b, tolerance) and not _same(a, b, max(tolerance, ROUNDING)):
                return Outcome("mismatch", f"output {i} differs (shape {tuple(b.shape)} vs {tuple(a.shape)})",
                               step, _lowered(fast))
            rounding |= not _same(a, b, tolerance)
        state = logical_buffers(fast)
        for name, buf in reference.named_buffers():
            if not _same(buf, state[name], tolerance):
                return Outcome("mismatch", f"buffer {name} differs", step, _lowered(fast))
    if not _untouched(model, initial):
        return Outcome("mismatch", "optimize() changed the original model's buffers", None, _lowered(fast))
    return Outcome("rounding" if rounding else "equivalent", "", None, _lowered(fast))


# ----------------------------------------------------------------------------- minimizing


def _variants(program: Program):
    """Smaller programs: a call dropped, a batch shrunk, a line or an entry's body dropped, an
    unused pool dropped. Most are invalid (a name no longer defined): check() says so."""
    from dataclasses import replace
    calls = program.calls
    for i in range(len(calls)):
        if len(calls) > 1:
            yield replace(program, calls=calls[:i] + calls[i + 1:])
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
    if program.named:
        yield replace(program, named=False)
    if program.upfront:
        yield replace(program, upfront=False)
    if program.layer_calls != "after":
        yield replace(program, layer_calls="after")


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
            except GeneratorError:
                continue
            if outcome.reason() == reason:
                program, improved = candidate, True
                break
    return program
