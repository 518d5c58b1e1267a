"""Capture: one aten-level FX graph per call structure (torch.export, non-strict, every dim
dynamic unless export specializes it), run later with the optimized module's own tensors."""

import copy
import inspect
import time
from dataclasses import dataclass

import torch
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from .errors import ArgumentError


@dataclass
class Entry:
    name: str
    program: ExportedProgram
    graph_module: torch.fx.GraphModule  # rewritten copy of program.graph_module
    before: str  # the captured code, before any rewrite
    seconds: dict[str, float]  # wall time of each stage for this entry

    def accepts(self, flat: list, spec) -> bool:
        if spec != self.program.call_spec.in_spec:
            return False
        placeholders = [n for n in self.graph_module.graph.find_nodes(op="placeholder")]
        users = [p for p, s in zip(placeholders, self.program.graph_signature.input_specs) if s.kind == InputKind.USER_INPUT]
        for value, node in zip(flat, users):
            expected = node.meta.get("val")
            if isinstance(value, torch.Tensor) != isinstance(expected, torch.Tensor):
                return False
            if isinstance(value, torch.Tensor):
                if value.dtype != expected.dtype or value.dim() != expected.dim():
                    return False
                if any(isinstance(e, int) and e != v for e, v in zip(expected.shape, value.shape)):
                    return False
            elif value != expected:
                return False
        return True

    def run(self, module: torch.nn.Module, flat: list):
        user = iter(flat)
        inputs = []
        for spec in self.program.graph_signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                inputs.append(next(user))
            elif spec.kind == InputKind.PARAMETER:
                inputs.append(module.get_parameter(spec.target))
            elif spec.kind == InputKind.BUFFER:
                inputs.append(module.get_buffer(spec.target))
            else:
                inputs.append(self.program.constants[spec.target])
        outputs = self.graph_module(*inputs)
        user_outputs = []
        for spec, value in zip(self.program.graph_signature.output_specs, outputs):
            if spec.kind == OutputKind.BUFFER_MUTATION:
                module.get_buffer(spec.target).copy_(value)
            elif spec.kind == OutputKind.USER_OUTPUT:
                user_outputs.append(value)
        return pytree.tree_unflatten(user_outputs, self.program.call_spec.out_spec)


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, index: int) -> Entry:
    """Export `model` for this call structure; the model and its buffers are not changed."""
    # Sizes 0 and 1 are specialized by export anyway; every other size stays symbolic.
    auto = lambda v: {i: Dim.AUTO for i in range(v.dim()) if v.shape[i] > 1} if isinstance(v, torch.Tensor) else None
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
