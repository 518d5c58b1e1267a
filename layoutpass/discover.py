"""Discover: which placeholders are conv-state pools, and in which layout the model stores
them (read off the permutations between the buffer and the conv op's state argument, whose
axes are (slot, dim, tok))."""

import torch
import torch.fx
from torch.export.graph_signature import InputKind

from layoutpass.kernels import ops as kernel_ops
from layoutpass.rewrites.permutes import PERMUTATIONS, compose, permutation_of

from .errors import LayoutPassError
from .layout import Layout
from .report import source_line

aten = torch.ops.aten
STATE_ARGUMENT = {kernel_ops.conv_update_op._opoverload: 1, kernel_ops.conv_prefill_op._opoverload: 3}
OP_AXES = ("slot", "dim", "tok")


class PoolNotFound(LayoutPassError):
    """A conv op's state does not come from a buffer through views, or no pool exists."""


def find_pools(program) -> dict[str, tuple[Layout, torch.fx.Node]]:
    """buffer name -> (stored layout, its placeholder), from every conv op's state argument."""
    specs = {s.arg.name: s for s in program.graph_signature.input_specs}
    found: dict[str, tuple[Layout, torch.fx.Node]] = {}
    for op in program.graph_module.graph.nodes:
        if op.target not in STATE_ARGUMENT:
            continue
        node, chain = op.args[STATE_ARGUMENT[op.target]], (0, 1, 2)
        while node.op == "call_function" and node.target in PERMUTATIONS:
            chain = compose(permutation_of(node), chain)
            node = node.args[0]
        spec = specs.get(node.name)
        if spec is None or spec.kind != InputKind.BUFFER:
            what = f"forward argument {spec.arg.name!r}" if spec is not None else f"node {node.name} ({node.target})"
            raise PoolNotFound(
                f"the conv state of {op.name} comes from {what}, not from a buffer through views; "
                f"keep conv-state pools as module buffers (at {source_line(op)})")
        axes = [""] * 3
        for i, axis in enumerate(OP_AXES):
            axes[chain[i]] = axis
        layout = Layout(tuple(axes))
        if spec.target in found and found[spec.target][0] != layout:
            raise PoolNotFound(f"pool {spec.target!r} is used as {found[spec.target][0]} and as {layout} "
                               f"(at {source_line(op)})")
        found[spec.target] = (layout, node)
    return found
