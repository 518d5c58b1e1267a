"""optimize(model, layout): capture -> discover pools -> relayout and remap every use ->
verify -> an nn.Module with the model's call signature, names and logical state."""

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from .capture import Entry, capture
from layoutpass.rewrites.permutes import PERMUTATIONS, inverse

from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from layoutpass.rewrites.lowering import MATCHERS, Update, lower, pool_of

from .discover import STATE_ARGUMENT, PoolNotFound, find_idiom_pools, find_pools
from .errors import ArgumentError, LayoutPassError
from .layout import DS, Layout, parse_layout
from .report import KERNEL, Pool, Report, source_line
from .rewrite import relayout_graph

aten = torch.ops.aten


@dataclass(frozen=True)
class Graphs:
    """One captured entry point: its code before and after, and the rewritten GraphModule."""

    before: str
    after: str
    module: torch.fx.GraphModule

    def svg(self, path: str) -> None:
        """Draw the rewritten graph (needs pydot)."""
        try:
            from torch.fx.passes.graph_drawer import FxGraphDrawer
        except ImportError as err:  # pydot missing
            raise ArgumentError("path", f"drawing needs pydot: {err}") from err
        FxGraphDrawer(self.module, "layoutpass").get_dot_graph().write_svg(path)


class OptimizedModule(nn.Module):
    """The model's modules, parameters (shared) and buffers (copied; pools relayouted), run
    through the rewritten graphs. Calls with a new structure are captured on first use."""

    def __init__(self, model: nn.Module, layout: Layout, state_buffers, allow_missing: bool, lower, dynamic: bool):
        super().__init__()
        work = copy.deepcopy(model, memo={id(p): p for p in model.parameters()})
        for name, child in work.named_children():
            self.add_module(name, child)
        for name, param in work.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in work.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        self.__dict__["_model"] = model  # captured from, never run or changed
        self.layout, self.report, self.graphs = layout, Report(), {}
        self._entries: list[Entry] = []
        self._state_buffers = state_buffers
        self._allow_missing, self._lower, self._dynamic = allow_missing, lower, dynamic

    def forward(self, *args, **kwargs):
        flat, spec = pytree.tree_flatten((args, kwargs))
        return self.entry_for(args, kwargs, flat, spec).run(self, flat)

    def entry_for(self, args: tuple, kwargs: dict, flat=None, spec=None) -> Entry:
        """The captured entry that takes this call, captured now if none does."""
        if flat is None:
            flat, spec = pytree.tree_flatten((args, kwargs))
        return next((e for e in self._entries if e.accepts(flat, spec)), None) or self.capture(args, kwargs)

    def capture(self, args: tuple, kwargs: dict) -> Entry:
        entry = capture(self._model, args, kwargs, len(self._entries), self._dynamic)
        start = time.perf_counter()
        pools = self._discover(entry)
        new_pools = {name: pool for name, pool in pools.items() if name not in self.report.pools}
        report = Report(dict(self.report.pools, **new_pools), list(self.report.uses), self.report.entries + [entry.name])
        placeholders = {n.name: n for n in entry.graph_module.graph.find_nodes(op="placeholder")}
        by_buffer = {s.target: s.arg.name for s in entry.program.graph_signature.input_specs if s.kind == InputKind.BUFFER}
        relayouts = {placeholders[by_buffer[name]]: (name, pool.target.permutation(pool.source))
                     for name, pool in pools.items() if pool.source != pool.target}
        relayout_graph(entry.graph_module, relayouts, report, entry.name)  # raises before anything changes
        if self._lower is True or (self._lower == "auto" and any(b.is_cuda for b in self._model.buffers())):
            _refresh_meta(entry.graph_module, relayouts)
            _lower(entry, pools, by_buffer, report)
        _report_kernels(entry, pools, by_buffer, report)
        for name, pool in new_pools.items():  # the graph is sound: now move the state
            owner, leaf = _owner(self, name)
            owner.register_buffer(leaf, pool.source.convert(owner.get_buffer(leaf), pool.target))
        entry.seconds["pass"] = time.perf_counter() - start
        self.report = report
        self.graphs[entry.name] = Graphs(entry.before, entry.graph_module.code, entry.graph_module)
        self._entries.append(entry)
        return entry

    def _discover(self, entry: Entry) -> dict[str, Pool]:
        found = find_pools(entry.program)
        found.update({k: v for k, v in find_idiom_pools(entry.program).items() if k not in found})
        explicit = _explicit_pools(self._state_buffers, dict(self._model.named_buffers()))
        for name, layout in explicit.items():
            if name in found and layout is not None and found[name][0] != layout:
                raise ArgumentError("state_buffers", f"{name!r} is used as {found[name][0]}, not {layout}")
            if name not in found and layout is None:
                raise ArgumentError("state_buffers", f"{name!r} reaches no conv op in {entry.name}; give its layout")
        layouts = {name: layout for name, (layout, _) in found.items()}
        layouts.update({name: layout for name, layout in explicit.items() if layout is not None})
        if not layouts and not self._allow_missing and not self.report.pools:
            raise PoolNotFound(f"no conv-state pool found in {entry.name}: no buffer reaches a conv op "
                               f"(pass state_buffers=, or allow_missing=True)")
        buffers = dict(self._model.named_buffers())
        for name, layout in layouts.items():
            if len(buffers[name].shape) != len(layout.axes):
                raise ArgumentError("state_buffers", f"{name!r} has rank {buffers[name].dim()}, not a (slot, tok, dim) pool")
        return {name: self.report.pools.get(name) or Pool(name, tuple(buffers[name].shape), layout, self.layout)
                for name, layout in layouts.items()}


def _explicit_pools(state_buffers, buffers) -> dict[str, Layout | None]:
    if state_buffers is None:
        return {}
    if isinstance(state_buffers, Mapping):
        named = {k: parse_layout(v, "state_buffers") for k, v in state_buffers.items()}
    elif isinstance(state_buffers, Sequence) and not isinstance(state_buffers, str):
        named = dict.fromkeys(state_buffers)
    else:
        raise ArgumentError("state_buffers", "expected buffer names, or a mapping of names to layouts")
    unknown = [n for n in named if n not in buffers]
    if unknown:
        raise ArgumentError("state_buffers", f"no buffers named {unknown}")
    return named


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def _refresh_meta(gm: torch.fx.GraphModule, relayouts) -> None:
    """Shapes for every node of the rewritten graph (the rules' new nodes have none), the
    relayouted pools entering in their new layout."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    mode = detect_fake_mode([n.meta["val"] for n in placeholders])
    with mode:
        inputs = [n.meta["val"].permute(inverse(relayouts[n][1])).contiguous() if n in relayouts else n.meta["val"]
                  for n in placeholders]
    with torch.no_grad():  # shapes only; export's fake buffers may say they require grad
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)


def _lower(entry: Entry, pools, by_buffer, report: Report) -> None:
    """Pure-torch conv updates on DS pools -> the conv kernels (rewrites/lowering.py)."""
    graph = entry.graph_module.graph
    placeholders = {n.name: n for n in graph.find_nodes(op="placeholder")}
    ds = {placeholders[by_buffer[name]]: name for name, pool in pools.items() if pool.target.axes == DS.axes}
    for node in list(graph.nodes):
        if node not in graph.nodes:
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        for matcher in MATCHERS:
            match = matcher(node, set(ds), order)
            if isinstance(match, Update):
                idiom = node.target.__name__.split(".")[0]
                report.add(entry.name, ds[match.pool], node, KERNEL, f"lowered: pure-torch {idiom} update -> {match.kernel}")
                lower(graph, match)
            elif match is not None:
                report.add(entry.name, ds.get(pool_of(node)), node, KERNEL, f"not lowered: {match}")
    entry.graph_module.recompile()


def _report_kernels(entry: Entry, pools, by_buffer, report: Report) -> None:
    """Every conv op on a pool: the layout its kernel runs on, and whether a view is left."""
    pool_of = {by_buffer[name]: name for name in pools}
    for op in entry.graph_module.graph.nodes:
        if op.target not in STATE_ARGUMENT:
            continue
        state, views = op.args[STATE_ARGUMENT[op.target]], 0
        while state.op == "call_function" and state.target in PERMUTATIONS:
            state, views = state.args[0], views + 1
        name = pool_of.get(state.name) if state.op == "placeholder" else None
        if name is not None:
            layout = pools[name].target
            report.add(entry.name, name, op, KERNEL, f"lowered: {layout} kernel, pool passed directly" if not views
                       else f"kept: {layout} kernel through {views} permutation(s) of the pool")


def optimize(model: nn.Module, layout: "str | Layout" = "DS", *, example_inputs: Sequence | None = None,
             state_buffers: Sequence[str] | Mapping[str, str] | None = None,
             allow_missing: bool = False, lower: "bool | str" = "auto", dynamic: bool | None = None) -> OptimizedModule:
    """Store every conv-state pool of `model` in `layout` ("DS" or "SD") and rewrite every use.

    example_inputs: calls to capture now, each a dict of keyword arguments, a tuple of
    positional ones, or an (args, kwargs) pair; otherwise each new call structure is captured
    on first use. state_buffers: pool buffer names (or name -> stored layout, for pools no conv
    op reaches). lower: replace pure-torch conv updates on DS pools by the conv_update kernel
    (True, False, or "auto": when the model's buffers are on CUDA). dynamic: one graph for
    every size (True) or one per size (False: for code whose export is not sound for other
    sizes); by default the model's `layoutpass_dynamic` attribute, else True. The model is
    never modified; a refused rewrite raises LayoutPassError."""
    if not isinstance(model, nn.Module):
        raise ArgumentError("model", f"expected an nn.Module, got {type(model).__name__}")
    if lower not in (True, False, "auto"):
        raise ArgumentError("lower", f"expected True, False or 'auto', got {lower!r}")
    dynamic = getattr(model, "layoutpass_dynamic", True) if dynamic is None else dynamic
    if not isinstance(dynamic, bool):
        raise ArgumentError("dynamic", f"expected True or False, got {dynamic!r}")
    fast = OptimizedModule(model, parse_layout(layout), state_buffers, allow_missing, lower, dynamic)
    for call in example_inputs or ():
        fast.entry_for(*_split(call))
    return fast


def _split(call) -> tuple[tuple, dict]:
    if isinstance(call, Mapping):
        return (), dict(call)
    if isinstance(call, tuple) and len(call) == 2 and isinstance(call[0], tuple) and isinstance(call[1], Mapping):
        return call[0], dict(call[1])
    if isinstance(call, tuple):
        return call, {}
    raise ArgumentError("example_inputs", f"each call must be a dict, a tuple or (args, kwargs); got {type(call).__name__}")
