"""Discover: which rank-3 buffers (or forward arguments) of a captured entry are conv-state
pools, and in which layout the model stores them.

A pool is found by what it is, read off the graph's formulas (layoutpass.semantics): a tensor
that reaches a conv op's state argument through views (whose axes are (slot, dim, tok)), or
one written back from its own contents shifted along one axis (cat / roll / slice-and-shift,
through any views, copies and casts) -- that axis is the token axis. The slot axis is the
outermost, as in every serving engine's pool."""

from dataclasses import dataclass

import sympy
import torch
import torch.fx
from torch.export.graph_signature import InputKind

from layoutpass.kernels import ops as kernel_ops

from .errors import ArgumentError, LayoutPassError
from .layout import Layout
from .report import Considered, source_line
from .semantics import CANONICAL, Semantics, Val, index_symbols

STATE_ARGUMENT = {kernel_ops.conv_update_op._opoverload: 1, kernel_ops.conv_prefill_op._opoverload: 3}
OP_AXES = ("slot", "dim", "tok")
PHYSICAL = Layout(CANONICAL)  # discovery reads a candidate's symbols in its physical order


class PoolNotFound(LayoutPassError):
    """No conv-state pool where one is needed, or one used two ways."""


@dataclass(frozen=True)
class Found:
    layout: Layout
    evidence: str  # why, with the source line


@dataclass(frozen=True)
class Candidate:
    name: str  # buffer target, or the argument's placeholder name
    placeholder: str
    shape: tuple[int, ...]
    argument: bool


def candidates(entry) -> list[Candidate]:
    """Rank-3 buffers, and rank-3 tensor arguments of a captured model (not of a layer:
    a layer's pools are its own buffers), of a captured entry."""
    program = entry.program
    buffers = {placeholder: name for name, placeholder in entry.takes().items()}
    nodes = {n.name: n for n in program.graph_module.graph.find_nodes(op="placeholder")}
    found = []
    for spec in program.graph_signature.input_specs:
        val = nodes[spec.arg.name].meta.get("val")
        kinds = (InputKind.BUFFER, InputKind.USER_INPUT) if entry.arguments_may_be_pools else (InputKind.BUFFER,)
        if spec.kind in kinds and isinstance(val, torch.Tensor) and val.dim() == 3:
            argument = spec.kind == InputKind.USER_INPUT
            shape = tuple(int(s) if isinstance(s, int) else int(s.node.hint) for s in val.shape)  # the example's
            found.append(Candidate(spec.arg.name if argument else buffers[spec.arg.name], spec.arg.name, shape, argument))
    return found


def discover(entry, named: dict[str, Layout | None]) -> tuple[dict[str, Found], dict[str, Considered]]:
    """name -> Found for every pool this captured entry shows (or `named` gives a layout for),
    and a verdict on every candidate."""
    cands = {c.placeholder: c for c in candidates(entry)}
    graph = entry.program.graph_module.graph
    semantics = Semantics(graph, {p: (c.name, PHYSICAL) for p, c in cands.items()}).run()
    by_pool = {c.name: c for c in cands.values()}
    evidence: dict[str, list[tuple[Layout, str]]] = {}
    written = set()
    for node in graph.nodes:
        if node.target in STATE_ARGUMENT:
            state = semantics.values.get(node.args[STATE_ARGUMENT[node.target]])
            layout = _through_views(state, by_pool)
            if layout is not None:
                evidence.setdefault(state.root.pool, []).append(
                    (layout, f"reaches {node.target.__name__.split('.')[0]}'s state at {source_line(node)}"))
    for node, root, contents in semantics.writes:
        if root.pool not in by_pool:
            continue
        written.add(root.pool)
        tok = _shifted_axis(contents, root.pool)
        if tok is not None:
            axes = ["dim"] * 3
            axes[0], axes[tok] = "slot", "tok"
            evidence.setdefault(root.pool, []).append(
                (Layout(tuple(axes)), f"token axis {tok} shifted and written back at {source_line(node)}"))
    found, considered = {}, {}
    for name, c in by_pool.items():
        seen = evidence.get(name, [])
        layouts = {layout for layout, _ in seen}
        if len(layouts) > 1:
            raise PoolNotFound(f"pool {name!r} is used as " + " and as ".join(
                f"{layout} ({why})" for layout, why in {layout: why for layout, why in seen}.items()))
        if name in named and named[name] is not None:
            if layouts and named[name] not in layouts:
                raise ArgumentError("state_buffers", f"{name!r} is used as {layouts.pop()} ({seen[0][1]}), "
                                                     f"not {named[name]}")
            found[name] = Found(named[name], "named in state_buffers")
        elif seen:
            found[name] = Found(seen[0][0], seen[0][1])
        reason = found[name].evidence if name in found else (
            "written, but never from its own contents shifted along one axis, and it reaches no conv op"
            if name in written else "never written and reaches no conv op")
        if not c.argument or name in found:
            considered[name] = Considered(name, c.shape, name in found, reason)
    return found, considered


def _through_views(state, by_pool) -> Layout | None:
    """The stored layout of a pool whose plain permutation is a conv op's (slot, dim, tok) state."""
    if not isinstance(state, Val) or state.root.pool not in by_pool:
        return None
    op_index = index_symbols(len(state.shape))
    if sorted(map(str, state.coords)) != sorted(map(str, op_index)):
        return None
    return Layout(tuple(OP_AXES[op_index.index(c)] for c in state.coords))


def _shifted_axis(contents: sympy.Expr, pool: str) -> int | None:
    """The one non-slot axis along which a pool's written contents read the pool itself shifted
    (`P(c0, c1 + 1, c2)`, `P(c0, Mod(c1 + 1, n), c2)`), or None."""
    c = index_symbols(3, "c")
    shifted = set()
    for call in contents.atoms(sympy.core.function.AppliedUndef):
        if str(call.func) == f"P[{pool}]":
            shifted |= {d for d in (1, 2) if sympy.expand(call.args[d] - c[d]) != 0}
    return shifted.pop() if len(shifted) == 1 else None
