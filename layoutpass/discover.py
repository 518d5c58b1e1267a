"""Discover: which state tensors (or forward arguments) of a captured graph are pools, of which
kind, and which of their axes is which.

A pool is found by what it is, read off the graph's formulas (layoutpass.semantics): a tensor
that reaches the state argument of a conv or recurrence op through views (the op registry's
`state`: which argument, and the axes the op reads it in), or a rank-3 tensor written back from its own contents shifted along
one axis (cat / roll / slice-and-shift, through any views, copies and casts) -- a conv state,
whose shifted axis is the token axis. The slot axis is the outermost, as in every serving
engine's pool. A model may also declare its pools and their axes (state_buffers, or a
`layoutpass_pools` attribute: what an adapter knows of a pure-torch recurrence)."""

from dataclasses import dataclass

import sympy
import torch
import torch.fx

from .errors import ArgumentError, LayoutPassError
from .formulas import Val, index_symbols
from .layout import Layout
from .registry import facts
from .report import Considered, source_line
from .semantics import Semantics


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
        role = facts(node.target).state
        if role is not None:
            state = semantics.values.get(node.args[role.argument])
            op_axes = role.axes_for(node, len(state.shape)) if isinstance(state, Val) else None
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
            "written, but never from its own contents shifted along one axis, and it reaches no state op"
            if name in written else "never written and reaches no state op")
        considered[name] = Considered(name, shape, name in found, reason)
    return found, considered


def _through_views(state, by_pool, op_axes: tuple[str, ...]) -> Layout | None:
    """The axes of a pool a permutation of which is an op's state, read in `op_axes`; the dim or
    head axis may start past 0 (a tensor-parallel rank's shard of the channels or heads), and a
    snapshot axis of size 1 the pool lacks may be added by a view (`pool[:, None]`)."""
    if not isinstance(state, Val) or state.root.pool not in by_pool or len(op_axes) != len(state.shape) or \
            len(by_pool[state.root.pool]) != len(state.coords):
        return None
    op_index = index_symbols(len(state.shape))
    axes, used = [], set()
    for c in state.coords:
        index = [k for k, i in enumerate(op_index) if i in sympy.sympify(c).free_symbols]
        if len(index) != 1 or sympy.expand(c - op_index[index[0]]).free_symbols or \
                (op_axes[index[0]] not in ("dim", "head") and sympy.expand(c - op_index[index[0]]) != 0):
            return None
        axes.append(op_axes[index[0]])
        used.add(index[0])
    if any(op_axes[k] != "snap" or state.shape[k] != 1 for k in range(len(op_axes)) if k not in used):
        return None
    return Layout(tuple(axes)) if len(set(axes)) == len(axes) else None


def _shifted_axis(contents: sympy.Expr, pool: str) -> int | None:
    """The one non-slot axis along which a pool's written contents read the pool itself shifted
    (`P(c0, c1 + 1, c2)`, `P(c0, Mod(c1 + 1, n), c2)`), or None. A read at a fixed position
    (`P(c0, 0, c2)`: a row scaled or copied in place) is no shift."""
    c = index_symbols(3, "c")
    shifted = set()
    for call in contents.atoms(sympy.core.function.AppliedUndef):
        if str(call.func) == f"P[{pool}]":
            shifted |= {d for d in (1, 2) if c[d] in sympy.sympify(call.args[d]).free_symbols and
                        sympy.expand(call.args[d] - c[d]) != 0}
    return shifted.pop() if len(shifted) == 1 else None
