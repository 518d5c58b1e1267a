"""Discover: which placeholders are conv-state pools, and in which layout the model stores
them (read off the permutations between the buffer and the conv op's state argument, whose
axes are (slot, dim, tok))."""

import torch
import torch.fx
from torch.export.graph_signature import InputKind

from layoutpass.kernels import ops as kernel_ops
from layoutpass.rewrites.permutes import FILLS, PERMUTATIONS, compose, permutation_of

from .errors import LayoutPassError
from .layout import Layout
from .report import source_line

aten = torch.ops.aten
STATE_ARGUMENT = {kernel_ops.conv_update_op._opoverload: 1, kernel_ops.conv_prefill_op._opoverload: 3}
OP_AXES = ("slot", "dim", "tok")


class PoolNotFound(LayoutPassError):
    """A conv op's state does not come from a buffer through views, or no pool exists."""


def find_idiom_pools(program) -> dict[str, tuple[Layout, torch.fx.Node]]:
    """Buffers used the pure-torch way (HF transformers, `cat([state, x], tok)`): gathered by
    slot, extended along one axis with cat or roll, and written back. That axis is the token
    axis, the gathered one the slot axis."""
    found = {}
    for spec in program.graph_signature.input_specs:
        if spec.kind != InputKind.BUFFER:
            continue
        node = next(n for n in program.graph_module.graph.find_nodes(op="placeholder") if n.name == spec.arg.name)
        if node.meta["val"].dim() == 3:
            tok = _token_axis(node)
            if tok is not None:
                axes = ["dim"] * 3
                axes[0], axes[tok] = "slot", "tok"
                found[spec.target] = (Layout(tuple(axes)), node)
    return found


def _token_axis(buffer: torch.fx.Node) -> int | None:
    """Follow the buffer through slot gathers and permutations (dims[i]: the buffer dim that
    the node's dim i is); the axis a cat or roll extends is the token axis, if it is written back."""
    stack, written, tok = [(buffer, (0, 1, 2))], False, None
    while stack:
        node, dims = stack.pop()
        for use in node.users:
            if use.target in PERMUTATIONS:
                stack.append((use, tuple(dims[i] for i in permutation_of(use))))
            elif use.target is aten.index.Tensor and use.args[0] is node and len(use.args[1]) == 1:
                stack.append((use, dims))
            elif use.target in FILLS and use.args[0] is node:  # the same tensor, zeroed (a fresh start)
                stack.append((use, dims))
            elif use.target in (aten.index_put_.default, aten.copy_.default) and use.args[0] is node:
                written = True
            elif use.target is aten.cat.default and dims[0] == 0:
                tok = dims[use.args[1] % 3]
            elif use.target is aten.roll.default and dims[0] == 0:
                tok = dims[use.args[2][0] % 3]
    return tok if written and tok not in (None, 0) else None


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
