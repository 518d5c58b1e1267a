"""Capture: one aten-level FX graph per call structure (torch.export, non-strict, every dim
dynamic unless export specializes it), run later with the optimized module's own tensors."""

import copy
import inspect
import time
from dataclasses import dataclass

import torch
from torch.export import Dim, ExportedProgram
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from .errors import ArgumentError


@dataclass
class Entry:
    """One captured call structure. What forward() needs at call time is plain Python data
    (no ExportedProgram lookups), so torch.compile can trace through the dispatch."""

    name: str
    program: ExportedProgram
    graph_module: torch.fx.GraphModule  # rewritten copy of program.graph_module
    before: str  # the captured code, before any rewrite
    seconds: dict[str, float]  # wall time of each stage for this entry
    in_spec: object = None
    out_spec: object = None
    user_inputs: tuple = ()  # per user input: (dtype, rank, ((dim, size), ...) specialized) or the value
    inputs: tuple = ()  # per graph input: (kind, target)
    outputs: tuple = ()  # per graph output: (kind, target)
    constants: dict = None

    def __post_init__(self):
        signature = self.program.graph_signature
        self.constants = dict(self.program.constants)
        self.in_spec, self.out_spec = self.program.call_spec.in_spec, self.program.call_spec.out_spec
        self.inputs = tuple((s.kind, s.target) for s in signature.input_specs)
        self.outputs = tuple((s.kind, s.target) for s in signature.output_specs)
        nodes = {n.name: n for n in self.program.graph_module.graph.find_nodes(op="placeholder")}
        self.user_inputs = tuple(_describe(nodes[s.arg.name].meta.get("val")) for s in signature.input_specs
                                 if s.kind == InputKind.USER_INPUT)

    def accepts(self, flat: list, spec) -> bool:
        if spec != self.in_spec or len(flat) != len(self.user_inputs):
            return False
        for value, expected in zip(flat, self.user_inputs):
            if not isinstance(value, torch.Tensor):
                if value != expected:
                    return False
            elif not isinstance(expected, tuple) or value.dtype != expected[0] or value.dim() != expected[1] \
                    or any(value.shape[i] != size for i, size in expected[2]):
                return False
        return True

    def run(self, module: torch.nn.Module, flat: list):
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
    """A user input as captured: tensors by dtype, rank and the sizes export specialized."""
    if isinstance(val, torch.Tensor):  # a size export replaced by a constant is specialized too
        return (val.dtype, val.dim(), tuple((i, int(s)) for i, s in enumerate(val.shape) if is_concrete_int(s)))
    return val


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, index: int, dynamic: bool = True) -> Entry:
    """Export `model` for this call structure; the model and its buffers are not changed.
    dynamic: sizes > 1 stay symbolic (sizes 0 and 1 export specializes anyway); otherwise
    every size is specialized and a call of other sizes is captured anew."""
    auto = lambda v: ({i: Dim.AUTO for i in range(v.dim()) if v.shape[i] > 1} if dynamic else None) \
        if isinstance(v, torch.Tensor) else None
    start = time.perf_counter()
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
        dynamic = {name: pytree.tree_map(auto, value) for name, value in bound.items()}
        program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as err:  # export's own errors are many; name the argument at fault
        raise ArgumentError("example_inputs", f"the model does not capture on these inputs: "
                                              f"{type(err).__name__}: {str(err).splitlines()[0]}") from err
    described = [f"{k}{list(v.shape)}" for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    described = [f"{list(a.shape)}" for a in args if isinstance(a, torch.Tensor)] + described
    gm = torch.fx.GraphModule(program.graph_module, copy.deepcopy(program.graph_module.graph))
    return Entry(f"entry{index}({', '.join(described)})", program, gm, program.graph_module.code,
                 {"capture": time.perf_counter() - start})
