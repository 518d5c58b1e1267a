"""Discover: which state tensors (or forward arguments) of a captured graph are pools, of which
kind, and which of their axes is which.

A pool is found by what it is, read off the graph's formulas (layoutpass.semantics): a tensor
that reaches the state argument of a conv or recurrence op through views (STATES: the axes each
op reads its state in), or a rank-3 tensor written back from its own contents shifted along
one axis (cat / roll / slice-and-shift, through any views, copies and casts) -- a conv state,
whose shifted axis is the token axis. The slot axis is the outermost, as in every serving
engine's pool. A model may also declare its pools and their axes (state_buffers, or a
`layoutpass_pools` attribute: what an adapter knows of a pure-torch recurrence)."""

from dataclasses import dataclass

import sympy
import torch
import torch.fx

import layoutpass.examples.recurrence  # noqa: F401  registers lp_examples::recurrence, whose state is a pool
from layoutpass.kernels import ops as kernel_ops
from layoutpass.kernels import recurrent  # noqa: F401  registers the recurrence ops

from .errors import ArgumentError, LayoutPassError
from .layout import Layout
from .report import Considered, source_line
from .semantics import Semantics, Val, index_symbols

CONV = ("slot", "dim", "tok")
_RECURRENCE_AXES = {"mamba2": ("slot", "snap", "head", "v", "k"), "delta_rule": ("slot", "snap", "head", "k", "v"),
                    "mamba1": ("slot", "snap", "v", "k")}


def _fixed(kind: str, axes: tuple[str, ...]):
    return lambda node, rank: (kind, axes if rank == len(axes) else tuple(a for a in axes if a != "snap"))


# The ops with a pool state argument: op -> (its index, (node, the state's rank) -> (pool kind, the
# axes the op reads the state in)).
STATES = {
    kernel_ops.conv_update_op._opoverload: (1, _fixed("conv", CONV)),
    kernel_ops.conv_prefill_op._opoverload: (3, _fixed("conv", CONV)),
    torch.ops.layoutpass.selective_state_update.default: (0, _fixed("recurrent", _RECURRENCE_AXES["mamba2"])),
    torch.ops.layoutpass.delta_rule_update.default: (0, _fixed("recurrent", _RECURRENCE_AXES["delta_rule"])),
    torch.ops.lp_examples.recurrence.default: (3, lambda node, rank: ("recurrent", _RECURRENCE_AXES.get(node.args[0]))),
}
STATE_ARGUMENT = {op: index for op, (index, _) in STATES.items() if op in (kernel_ops.conv_update_op._opoverload,
                                                                        kernel_ops.conv_prefill_op._opoverload)}


def physical(rank: int) -> Layout:
    """How discovery reads a candidate: its dims in order, unnamed."""
    return Layout(tuple(f"d{k}" for k in range(rank)))


def kind_of(axes: Layout) -> str:
    return "conv" if {"tok", "dim"} <= set(axes.axes) else "recurrent"


class PoolNotFound(LayoutPassError):
    """No conv-state pool where one is needed, or one used two ways."""


@dataclass(frozen=True)
class Found:
    axes: Layout  # the pool's logical axes, in the order of its shape
    evidence: str  # why, with the source line
    kind: str = "conv"


def discover(graph: torch.fx.Graph, candidates: dict[str, tuple[str, tuple]],
             named: dict[str, Layout | None]) -> tuple[dict[str, Found], dict[str, Considered]]:
    """candidates: placeholder -> (pool name, shape) of the graph's rank-3 state tensors and
    arguments. Returns name -> Found for every pool the graph shows (or `named` gives the axes
    of), and a verdict on every candidate."""
    semantics = Semantics(graph, {p: (name, physical(len(shape))) for p, (name, shape) in candidates.items()}).run()
    by_pool = {name: shape for name, shape in candidates.values()}
    evidence: dict[str, list[tuple[Layout, str]]] = {}
    written = set()
    for node in graph.nodes:
        if node.target in STATES:
            index, axes_of = STATES[node.target]
            state = semantics.values.get(node.args[index])
            op_axes = axes_of(node, len(state.shape))[1] if isinstance(state, Val) else None
            layout = _through_views(state, by_pool, op_axes) if op_axes else None
            if layout is not None:
                evidence.setdefault(state.root.pool, []).append(
                    (layout, f"reaches {node.target.__name__.split('.')[0]}'s state at {source_line(node)}"))
    for node, root, contents in semantics.writes:
        if root.pool not in by_pool or len(by_pool[root.pool]) != 3:
            continue
        written.add(root.pool)
        tok = _shifted_axis(contents, root.pool)
        if tok is not None:
            axes = ["dim"] * 3
            axes[0], axes[tok] = "slot", "tok"
            evidence.setdefault(root.pool, []).append(
                (Layout(tuple(axes)), f"token axis {tok} shifted and written back at {source_line(node)}"))
    found, considered = {}, {}
    for name, shape in by_pool.items():
        seen = evidence.get(name, [])
        layouts = {layout for layout, _ in seen}
        if len(layouts) > 1:
            raise PoolNotFound(f"pool {name!r} is used as " + " and as ".join(
                f"{layout} ({why})" for layout, why in {layout: why for layout, why in seen}.items()))
        if name in named and named[name] is not None:
            if layouts and named[name] not in layouts:
                raise ArgumentError("state_buffers", f"{name!r} is used as {layouts.pop()} ({seen[0][1]}), "
                                                     f"not {named[name]}")
            found[name] = Found(named[name], "declared by the model (state_buffers / layoutpass_pools)",
                                kind_of(named[name]))
        elif seen:
            found[name] = Found(seen[0][0], seen[0][1], kind_of(seen[0][0]))
        reason = found[name].evidence if name in found else (
            "written, but never from its own contents shifted along one axis, and it reaches no conv op"
            if name in written else "never written and reaches no conv op")
        considered[name] = Considered(name, shape, name in found, reason)
    return found, considered


def _through_views(state, by_pool, op_axes: tuple[str, ...]) -> Layout | None:
    """The axes of a pool a permutation of which is an op's state, read in `op_axes`; the dim or
    head axis may start past 0 (a tensor-parallel rank's shard of the channels or heads)."""
    if not isinstance(state, Val) or state.root.pool not in by_pool or len(op_axes) != len(state.shape) or \
            len(by_pool[state.root.pool]) != len(op_axes):
        return None
    op_index = index_symbols(len(state.shape))
    axes = []
    for c in state.coords:
        index = [k for k, i in enumerate(op_index) if i in sympy.sympify(c).free_symbols]
        if len(index) != 1 or sympy.expand(c - op_index[index[0]]).free_symbols or \
                (op_axes[index[0]] not in ("dim", "head") and sympy.expand(c - op_index[index[0]]) != 0):
            return None
        axes.append(op_axes[index[0]])
    return Layout(tuple(axes)) if len(set(axes)) == len(axes) else None


def _shifted_axis(contents: sympy.Expr, pool: str) -> int | None:
    """The one non-slot axis along which a pool's written contents read the pool itself shifted
    (`P(c0, c1 + 1, c2)`, `P(c0, Mod(c1 + 1, n), c2)`), or None."""
    c = index_symbols(3, "c")
    shifted = set()
    for call in contents.atoms(sympy.core.function.AppliedUndef):
        if str(call.func) == f"P[{pool}]":
            shifted |= {d for d in (1, 2) if sympy.expand(call.args[d] - c[d]) != 0}
    return shifted.pop() if len(shifted) == 1 else None
