"""Capture: one aten-level FX graph per call structure (torch.export, non-strict, every dim
dynamic unless export specializes it), run later with the optimized module's own tensors."""

import copy
import inspect
import math
import sys
import time
from dataclasses import dataclass, field

import torch
from torch.export import Dim, ExportedProgram, ShapesCollection
from torch.export.exported_program import _get_shape_env
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree
from torch.utils._sympy.printers import PythonPrinter

from .errors import ArgumentError, LayoutPassError
from .layout import Layout


class CaptureFailed(ArgumentError):
    """torch.export could not capture the module on these inputs."""


class _Call(torch.nn.Module):
    """forward(*args, **kwargs) as forward(args, kwargs): torch.export cannot give dynamic
    shapes to a variadic signature."""

    PREFIX = "model."

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, args, kwargs):
        return self.model(*args, **kwargs)


def _variadic(model: torch.nn.Module) -> bool:
    kinds = {p.kind for p in inspect.signature(model.forward).parameters.values()}
    return bool(kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD})


@dataclass(eq=False)
class Entry:
    """One captured call structure. What forward() needs at call time is plain Python data
    (no ExportedProgram lookups), so torch.compile can trace through the dispatch."""

    name: str
    program: ExportedProgram
    before: str  # the captured code, before any rewrite
    variadic: bool  # captured through _Call
    arguments_may_be_pools: bool  # the whole model: a caller may pass pools in
    seconds: dict[str, float]  # wall time of each stage for this entry
    graph_module: torch.fx.GraphModule = field(init=False)  # the rewritten graph now in use
    expects: tuple = ()  # (buffer, layout it must be stored in, None: as the model stores it)
    arguments: dict = field(default_factory=dict)  # user input index -> a pool argument's (name, layout,
    #   fixed sizes, the captured dim of each of its dims)
    in_spec: object = field(init=False)
    out_spec: object = field(init=False)
    user_inputs: tuple = field(init=False)  # per user input: (dtype, rank, sizes: ints or symbols) or the value
    ranges: dict = field(init=False)  # size symbol -> (least, most) export proved the graph for
    guards: tuple = field(init=False)  # (size symbols, predicate): the branches export took, or ()
    inputs: tuple = field(init=False)  # per graph input: (kind, target)
    outputs: tuple = field(init=False)  # per graph output: (kind, target)
    constants: dict = field(init=False)

    def __post_init__(self):
        signature = self.program.graph_signature
        strip = (lambda t: t[len(_Call.PREFIX):] if t and t.startswith(_Call.PREFIX) else t) if self.variadic \
            else (lambda t: t)
        self.constants = dict(self.program.constants)
        self.in_spec, self.out_spec = self.program.call_spec.in_spec, self.program.call_spec.out_spec
        self.inputs = tuple((s.kind, s.target if s.kind == InputKind.CONSTANT_TENSOR else strip(s.target))
                            for s in signature.input_specs)
        self.outputs = tuple((s.kind, strip(s.target)) for s in signature.output_specs)
        nodes = {n.name: n for n in self.program.graph_module.graph.find_nodes(op="placeholder")}
        self.user_inputs = tuple(_describe(nodes[s.arg.name].meta.get("val")) for s in signature.input_specs
                                 if s.kind == InputKind.USER_INPUT)
        self.ranges = {str(symbol): (_bound(r.lower, 0), _bound(r.upper, sys.maxsize))
                       for symbol, r in self.program.range_constraints.items() if symbol.is_Symbol}
        self.guards = _guards(self.program, {s for u in self.user_inputs if isinstance(u, tuple)
                                             for s in u[2] if isinstance(s, str)})
        self.graph_module = self.program.graph_module

    def flatten(self, args: tuple, kwargs: dict):
        return pytree.tree_flatten(((args, kwargs), {}) if self.variadic else (args, kwargs))

    def takes(self) -> dict[str, str]:
        """Buffer target -> its placeholder name in the graph."""
        specs = self.program.graph_signature.input_specs
        return {kind_target[1]: s.arg.name for kind_target, s in zip(self.inputs, specs) if s.kind == InputKind.BUFFER}

    def accepts(self, flat: list, spec) -> bool:
        """Whether the graph computes this call: same structure, dtypes and ranks, every size
        the graph fixed, and every symbolic size within what export proved it for (one symbol,
        one value, within its range, and taking every branch the trace took: a graph traced at
        7 tokens, which padded them to a chunk of 8, is wrong at 8 or 9)."""
        if spec != self.in_spec or len(flat) != len(self.user_inputs):
            return False
        sizes, derived = {}, []
        for k, (value, expected) in enumerate(zip(flat, self.user_inputs)):
            if not isinstance(value, torch.Tensor):
                if value != expected:
                    return False
                continue
            if not isinstance(expected, tuple) or value.dtype != expected[0] or value.dim() != expected[1]:
                return False
            pairs = zip(value.shape, expected[2])
            if k in self.arguments:  # a pool argument, in its new layout: its slot count is checked here; its
                _, _, fixed, order = self.arguments[k]  # tok and dim sizes in run(), so they count as given
                pairs = [(dict(fixed).get(i, n), expected[2][order[i]]) for i, n in enumerate(value.shape)]
            for n, size in pairs:
                if isinstance(size, int):
                    if n != size:
                        return False
                elif isinstance(size, str):
                    if sizes.setdefault(size, n) != n:
                        return False
                else:
                    derived.append((size, n))
        for symbol, n in sizes.items():
            least, most = self.ranges.get(symbol, (0, sys.maxsize))
            if not least <= n <= most:
                return False
        if self.guards and not (all(s in sizes for s in self.guards[0]) and
                                self.guards[1](*(sizes[s] for s in self.guards[0]))):
            return False
        return all(all(s in sizes for s in symbols) and f(*(sizes[s] for s in symbols)) == n
                   for (symbols, f), n in derived)

    def run(self, module: torch.nn.Module, flat: list, stored: dict[str, Layout], prefix: str = ""):
        for name, layout in self.expects:
            if stored.get(prefix + name) != layout:
                raise LayoutPassError(f"internal: {self.name} was rewritten for {prefix + name!r} in {layout}, "
                                      f"which is stored as {stored.get(prefix + name)}")
        for k, (name, layout, sizes, _) in self.arguments.items():
            if not flat[k].is_contiguous() or any(flat[k].shape[i] != n for i, n in sizes):
                raise ArgumentError(name, f"a pool argument: expected a contiguous {layout} tensor with sizes "
                                    f"{dict(sizes)} (see input_layouts), got shape {tuple(flat[k].shape)}, "
                                    f"strides {tuple(flat[k].stride())}")
        user = iter(flat)
        inputs = []
        for kind, target in self.inputs:
            if kind == InputKind.USER_INPUT:
                inputs.append(next(user))
            elif kind == InputKind.PARAMETER:
                inputs.append(module.get_parameter(target))
            elif kind == InputKind.BUFFER:
                inputs.append(module.get_buffer(target))
            else:
                inputs.append(self.constants[target])
        outputs = self.graph_module(*inputs)
        user_outputs = []
        for (kind, target), value in zip(self.outputs, outputs):
            if kind == OutputKind.BUFFER_MUTATION:
                module.get_buffer(target).copy_(value)
            elif kind == OutputKind.USER_OUTPUT:
                user_outputs.append(value)
        return pytree.tree_unflatten(user_outputs, self.out_spec)


def _describe(val):
    """A user input as captured: tensors by dtype, rank and sizes (an int where export fixed it,
    a symbol's name, or (names, function) for a size derived from symbols), in plain Python so
    that torch.compile traces the dispatch."""
    if isinstance(val, torch.Tensor):
        return (val.dtype, val.dim(), tuple(_size(s) for s in val.shape))
    return val


def _size(s):
    if is_concrete_int(s):
        return int(s)
    expr = s.node.expr
    if expr.is_Symbol:
        return str(expr)
    return _python(expr.free_symbols, [expr])


def _guards(program: ExportedProgram, known: set[str]) -> tuple:
    """export's guards on the input sizes (each branch or loop of the model's Python that read a
    size), as one predicate; guards on other symbols are checked in the graph itself."""
    env = _get_shape_env(program.graph_module)
    exprs = [g.expr for g in (env.guards if env else ()) if {str(s) for s in g.expr.free_symbols} <= known]
    if not exprs:
        return ()
    symbols, predicate = _python(set().union(*(e.free_symbols for e in exprs)), exprs, " and ")
    return symbols, predicate


def _python(symbols, exprs: list, join: str = ""):
    """(symbol names, a plain-Python function of them) computing `join` over the sympy
    expressions, printed the way torch prints guards (so its floor division and modulo keep
    Python's meaning); plain Python, so torch.compile traces the dispatch."""
    names = sorted(map(str, symbols))
    body = join.join(f"({PythonPrinter().doprint(e)})" for e in exprs)
    return tuple(names), eval(f"lambda {', '.join(names)}: {body}", {"math": math})  # our own printout of sympy


def _bound(value, unbounded: int) -> int:
    try:
        return int(value)
    except (OverflowError, TypeError, AttributeError):  # sympy's or torch's infinity
        return unbounded


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, name: str, dynamic: bool = True,
            label: str = "example_inputs", whole: bool = True) -> Entry:
    """Export `model` for this call structure; the model and its buffers are not changed.
    dynamic: sizes > 1 stay symbolic (sizes 0 and 1 export specializes anyway); otherwise
    every size is specialized and a call of other sizes is captured anew. `label` names the
    argument an error blames; `whole`: the model itself, not one of its layers."""
    start = time.perf_counter()
    variadic = _variadic(model)
    module, inputs = (_Call(model), ((args, kwargs), {})) if variadic else (model, (args, kwargs))
    shapes = ShapesCollection()  # by tensor, whatever structure (dataclasses too) holds it
    for leaf in pytree.tree_leaves(inputs):
        if isinstance(leaf, torch.Tensor) and dynamic:
            shapes[leaf] = {i: Dim.AUTO for i in range(leaf.dim()) if leaf.shape[i] > 1}
    try:  # each op is traced once, so fake-tensor caching costs more than it saves (capture of the
        # 64-layer hybrid: 2.4 -> 1.3 s on CI's CPU)
        with torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
            program = torch.export.export(module, *inputs, strict=False,
                                          dynamic_shapes=shapes.dynamic_shapes(module, *inputs) if dynamic else None)
    except Exception as err:  # export's own errors are many; name the argument at fault
        raise CaptureFailed(label, f"the model does not capture on these inputs: "
                                   f"{type(err).__name__}: {_first_sentence(err)}") from err
    described = [f"{k}{list(v.shape)}" for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    described = [f"{list(a.shape)}" for a in args if isinstance(a, torch.Tensor)] + described
    return Entry(f"{name}({', '.join(described)})", program, program.graph_module.code, variadic, whole,
                 {"capture": time.perf_counter() - start})


def _first_sentence(err: Exception) -> str:
    line = (str(err).strip().splitlines() or [""])[0]
    return line if len(line) < 300 else line[:300] + "..."


def fresh_copy(program: ExportedProgram) -> torch.fx.GraphModule:
    """A graph to rewrite: the captured one stays as it was (the reference the check reads)."""
    return torch.fx.GraphModule(program.graph_module, copy.deepcopy(program.graph_module.graph))
