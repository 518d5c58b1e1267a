"""optimize(model, layout): capture -> discover pools -> relayout and remap every use ->
verify -> lower -> an nn.Module with the model's call signature, names and logical state.

Pools belong to the model, not to an entry: one Pool record per pool, and every captured
entry is rewritten for every known pool it takes, whichever entry found it. When a new call
structure shows a new pool, every earlier entry that takes it is rewritten again from its
captured graph, and only when all of them are rewritten and proven does the pool's buffer
move: all or nothing."""

import contextlib
import copy
import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch._guards import detect_fake_mode
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from layoutpass.kernels.state import relayout_
from layoutpass.rewrites.lowering import lower_updates
from layoutpass.rewrites.permutes import PERMUTATIONS, inverse

from .capture import CaptureFailed, Entry, capture, fresh_copy
from .discover import STATE_ARGUMENT, PoolNotFound, candidates, discover
from .errors import ArgumentError
from .layout import DS, Layout, parse_layout
from .report import Action, Kind, Pool, Report, Use, use
from .rewrite import relayout_graph
from .units import ROOT, Unit, describe, layer_units, materialize, probe, signature
from .verify import UnprovenRewrite, verify


@dataclass(frozen=True)
class Graphs:
    """One captured entry point: its code before and after, and the rewritten GraphModule."""

    before: str
    after: str
    module: torch.fx.GraphModule
    seconds: dict[str, float]  # what capturing and rewriting it took, by stage

    def svg(self, path: str) -> None:
        """Draw the rewritten graph (needs pydot)."""
        try:
            from torch.fx.passes.graph_drawer import FxGraphDrawer
            drawer = FxGraphDrawer(self.module, "layoutpass")
        except (ImportError, RuntimeError) as err:  # torch raises RuntimeError when pydot is missing
            raise ArgumentError("path", f"drawing needs pydot: {err}") from err
        drawer.get_dot_graph().write_svg(path)


@dataclass
class Options:
    layout: Layout
    named: dict[str, Layout | None]  # state_buffers
    lower: bool | str
    dynamic: bool
    inplace: bool


@dataclass(frozen=True)
class Built:
    """An entry rewritten for a set of pools: installed only once every entry is built."""

    graph_module: torch.fx.GraphModule
    uses: list[Use]
    expects: tuple
    arguments: dict
    seconds: float


class OptimizedModule(nn.Module):
    """The model (a subclass of its own class, parameters shared, buffers copied, pools stored
    in the new layout) whose forward runs the rewritten graphs: of each layer that owns its
    pools, or of the whole model. Calls with a new structure are captured on first use.

    report: what was found, rewritten, refused (with source lines). graphs: entry name ->
    Graphs (code before and after). input_layouts: pool arguments -> the layout and shape the
    caller must allocate them in."""

    def forward(self, *args, **kwargs):
        state = self.__dict__["_lp"]
        if state.layers is not None and not torch.compiler.is_compiling() and \
                _structure(args, kwargs, state.options.dynamic) not in state.probed:
            self._probe(args, kwargs, "forward call")
        if state.layers is None:
            return self._call_unit(state.root, ROOT, args, kwargs)
        return state.forward(self, *args, **kwargs)

    @property
    def report(self) -> Report:
        return self.__dict__["_lp"].report

    @property
    def graphs(self) -> dict[str, Graphs]:
        return {e.name: Graphs(e.before, e.graph_module.code, e.graph_module, dict(e.seconds))
                for e in _entries(self.__dict__["_lp"])}

    @property
    def layout(self) -> Layout:
        return self.__dict__["_lp"].options.layout

    @property
    def input_layouts(self) -> dict[str, tuple[Layout, tuple]]:
        """Pool arguments of forward -> (layout, shape) the caller must pass them in."""
        return {p.name: (p.target, p.source.reorder(p.shape, p.target))
                for p in self.report.pools.values() if p.argument and p.moves}

    def _call_unit(self, unit: Unit, path: str, args: tuple, kwargs: dict):
        state = self.__dict__["_lp"]
        module = self.get_submodule(path) if path else self
        for entry in unit.entries:
            flat, spec = entry.flatten(args, kwargs)
            if entry.accepts(flat, spec):
                return entry.run(module, flat, state.stored, Unit.prefix(path))
        entry = self._rewrite_call(unit, path, args, kwargs, "forward call", during_call=True)
        return entry.run(module, entry.flatten(args, kwargs)[0], state.stored, Unit.prefix(path))

    def _probe(self, args: tuple, kwargs: dict, label: str) -> None:
        """Check that every layer owns its pools on this call structure (a run on meta
        tensors), and capture the layer calls it shows; otherwise capture the whole model."""
        state = self.__dict__["_lp"]
        pending = []

        @contextlib.contextmanager
        def watching(watch):
            state.probing = (watch, pending)
            try:
                yield
            finally:
                state.probing = None

        moved = {name: pool.shape for name, pool in state.pools.items() if name in state.stored}
        try:
            watch = probe(self, state.forward, state.layers, args, kwargs, watching, moved)
        except Exception as err:  # the model's own code does not run on meta tensors: capture it whole
            state.report.notes.append(f"captured whole: the ownership probe could not run the model ({_first_line(err)})")
            state.layers = None
            return
        if watch.outside:
            state.report.notes.extend(f"captured whole: {pool} is used outside its layer at {where}"
                                      for pool, where in watch.outside.items())
            state.layers = None
            return
        for unit, path, call_args, call_kwargs in pending:
            device = next(iter(self.get_submodule(path).buffers())).device
            call_args, call_kwargs = materialize(describe((call_args, call_kwargs)), device)
            if not any(e.accepts(*e.flatten(call_args, call_kwargs)) for e in unit.entries):
                try:
                    self._rewrite_call(unit, path, call_args, call_kwargs, label)
                except CaptureFailed as err:  # a layer's inputs export cannot take: capture the whole model
                    state.report.notes.append(f"captured whole: {unit.label} does not capture alone ({err})")
                    state.layers = None
                    return
        state.probed.add(_structure(args, kwargs, state.options.dynamic))

    def _rewrite_call(self, unit: Unit, path: str, args: tuple, kwargs: dict, label: str = "example_inputs",
                during_call: bool = False) -> Entry:
        """Capture a new call structure of a unit, discover its pools, rewrite it (and every
        earlier entry of any unit that takes a newly found pool), prove the rewrites, then move
        the pools' buffers (of every instance of the unit). during_call: the call's own
        arguments are already allocated (a pool argument found now keeps its layout)."""
        state = self.__dict__["_lp"]
        module = state.model.get_submodule(path) if path else state.model
        name = f"entry{len(unit.entries)}" if unit is state.root else f"{unit.label}.entry{len(unit.entries)}"
        entry = capture(module, args, kwargs, name, state.options.dynamic, label, whole=unit is state.root)
        start = time.perf_counter()
        prefixes = [Unit.prefix(p) for p in unit.paths]
        named = {q[len(pre):]: v for q, v in state.options.named.items() for pre in prefixes if q.startswith(pre)}
        found, considered = discover(entry, named)
        pools = dict(state.pools)
        for local, f in found.items():
            for pre in prefixes:
                known = pools.get(pre + local)
                if known is not None and known.source != f.layout:
                    raise PoolNotFound(f"pool {pre + local!r} is used as {known.source} ({known.evidence}) and as "
                                       f"{f.layout} ({f.evidence})")
                if known is None:
                    pools[pre + local] = _new_pool(pre + local, local, entry, f, state, during_call)
        new = set(pools) - set(state.pools)
        affected = [(e, u) for u in _units(state) for e in u.entries if new & set(_taken_names(e, u, pools))]
        built = [(e, _build(e, u, pools, state.options, self)) for e, u in affected + [(entry, unit)]]
        for qualified in sorted(new):  # every entry is rewritten and proven: now move the state
            if pools[qualified].moves and not pools[qualified].argument:
                self._move(pools[qualified])
                state.stored[qualified] = pools[qualified].target
        for e, b in built:
            e.graph_module, e.expects, e.arguments = b.graph_module, b.expects, b.arguments
            e.seconds["pass"] = b.seconds
            state.report.entry_uses[e.name] = b.uses
        entry.seconds["discover"] = time.perf_counter() - start - sum(b.seconds for _, b in built)
        state.pools = pools
        state.report.pools = pools
        for local, c in considered.items():
            for pre in prefixes:
                if pre + local not in state.report.considered or c.taken:
                    state.report.considered[pre + local] = dataclasses.replace(c, name=pre + local)
        unit.entries.append(entry)
        return entry

    def _move(self, pool: Pool) -> None:
        """Store a pool in its new layout: a new tensor, or the same memory when inplace."""
        owner, leaf = _owner(self, pool.name)
        buf = owner.get_buffer(leaf)
        if self.__dict__["_lp"].options.inplace and buf.is_contiguous():
            moved = relayout_(buf, pool.source, pool.target)
        else:
            moved = pool.source.convert(buf, pool.target)
        owner.register_buffer(leaf, moved, persistent=leaf not in owner._non_persistent_buffers_set)


class _LayerCall:
    """A layer's forward in the optimized model: its kind's rewritten graph, with its own
    tensors (during a probe: meta outputs, and its new call structures noted for capture)."""

    def __init__(self, fast: OptimizedModule, path: str):
        self.fast, self.path = fast, path

    def __call__(self, *args, **kwargs):
        state = self.fast.__dict__["_lp"]
        unit = state.layers[self.path]
        if state.probing is None:
            return self.fast._call_unit(unit, self.path, args, kwargs)
        watch, pending = state.probing
        flat = pytree.tree_leaves((args, kwargs))
        if not any(e.accepts(*e.flatten(args, kwargs)) for e in unit.entries) and \
                not any(u is unit and signature(pytree.tree_leaves((a, k))) == signature(flat) for u, _, a, k in pending):
            pending.append((unit, self.path, args, kwargs))
        key = (pytree.tree_structure((args, kwargs)), signature(flat))
        if key not in unit.outputs:
            layer = self.fast.get_submodule(self.path)
            watch.stack.append(self.path)
            try:
                unit.outputs[key] = describe(type(layer).forward(layer, *args, **kwargs))
            finally:
                watch.stack.pop()
        return materialize(unit.outputs[key])


@dataclass
class _State:
    model: nn.Module  # captured from, never run or changed
    forward: object  # the model's own forward (run as written when layers are captured)
    options: Options
    root: Unit  # the whole model as one unit
    layers: dict | None  # layer path -> its unit, or None: the whole model is captured
    pools: dict
    stored: dict  # pool name -> the layout its buffer is stored in now (moved pools only)
    report: Report
    probed: set = dataclasses.field(default_factory=set)  # call structures checked by a probe
    probing: tuple | None = None  # (watch, captures pending) while a probe runs


def _units(state: _State) -> list[Unit]:
    layers = {id(u): u for u in (state.layers or {}).values()}
    return [state.root, *layers.values()]


def _entries(state: _State) -> list[Entry]:
    return [e for u in _units(state) for e in u.entries]


def _structure(args: tuple, kwargs: dict, dynamic: bool):
    """A top-level call's structure: what the probe decides on (sizes only when specialized)."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    return spec, tuple((v.dtype, v.dim(), v.device.type, tuple(v.shape) if not dynamic else None)
                       if isinstance(v, torch.Tensor) else v for v in flat)


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


def _new_pool(qualified, local, entry, found, state, during_call: bool) -> Pool:
    candidate = next(c for c in candidates(entry) if c.name == local)
    target = state.options.layout
    if candidate.argument and during_call:
        target = found.layout  # the caller already passed this call's tensor: keep its layout
    return Pool(qualified, candidate.shape, found.layout, target, found.evidence, candidate.argument)


def _taken_names(entry: Entry, unit: Unit, pools: dict[str, Pool]) -> list[str]:
    """The qualified pools an entry takes, over every instance of its unit."""
    locals_ = list(entry.takes()) + [c.name for c in candidates(entry) if c.argument]
    return [Unit.prefix(p) + name for p in unit.paths for name in locals_ if Unit.prefix(p) + name in pools]


def _local_pools(entry: Entry, unit: Unit, pools: dict[str, Pool]) -> dict[str, tuple[str, Pool]]:
    """local name -> (placeholder, the pool record of the unit's first instance)."""
    pre = Unit.prefix(unit.paths[0])
    taken = {name: ph for name, ph in entry.takes().items() if pre + name in pools}
    taken.update({c.name: c.placeholder for c in candidates(entry) if c.argument and pre + c.name in pools})
    return {name: (ph, pools[pre + name]) for name, ph in taken.items()}


def _build(entry: Entry, unit: Unit, pools: dict[str, Pool], options: Options, module: nn.Module) -> Built:
    """The column of passes for one entry: relayout -> remap (rules) -> verify -> lower ->
    report the conv ops. Raises LayoutPassError; changes nothing outside the new graph."""
    start = time.perf_counter()
    gm = fresh_copy(entry.program)
    local = _local_pools(entry, unit, pools)  # local name -> (placeholder, pool)
    shown = {name: name if unit.paths == [ROOT] else f"{unit.label}:{name}" for name in local}
    placeholders = {n.name: n for n in gm.graph.find_nodes(op="placeholder")}
    relayouts = {placeholders[ph]: (shown[name], pool.target.permutation(pool.source))
                 for name, (ph, pool) in local.items() if pool.moves}
    uses = relayout_graph(gm, relayouts, entry.name) if relayouts else []
    if relayouts:
        try:
            _refresh_meta(gm, relayouts)
        except Exception as err:  # a rule built a graph torch cannot even run on fake tensors
            raise UnprovenRewrite(f"the rewrite of {entry.name} does not typecheck: {str(err).splitlines()[0]}") from err
        verify(entry.program.graph_module.graph, gm.graph, {ph: (name, pool.source) for name, (ph, pool) in local.items()},
               {ph: (name, pool.target) for name, (ph, pool) in local.items()}, entry.name)
    if options.lower is True or (options.lower == "auto" and any(b.is_cuda for b in module.buffers())):
        if not relayouts:
            _refresh_meta(gm, {})
        uses += lower_updates(gm, entry.name, {placeholders[ph]: shown[name] for name, (ph, pool) in local.items()
                                               if pool.target.axes == DS.axes})
    uses += _kernel_uses(gm, entry.name, {ph: (shown[name], pool) for name, (ph, pool) in local.items()})
    rank3 = {c.name for c in candidates(entry)}
    expects = tuple((name, local[name][1].target if name in local and local[name][1].moves else None)
                    for name in sorted(entry.takes()) if name in rank3)
    users = [s.arg.name for s in entry.program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    arguments = {users.index(ph): (name, pool.target, _fixed_sizes(pool), pool.source.permutation(pool.target))
                 for name, (ph, pool) in local.items() if pool.argument and pool.moves}
    return Built(gm, uses, expects, arguments, time.perf_counter() - start)


def _fixed_sizes(pool: Pool) -> tuple:
    """(dim, size) of a pool argument's tok and dim axes in its new layout: a tensor passed in
    the old layout has them swapped, and is refused (unless state_len equals dim)."""
    shape = pool.source.reorder(pool.shape, pool.target)
    return tuple((i, shape[i]) for i, axis in enumerate(pool.target.axes) if axis != "slot")


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def _refresh_meta(gm: torch.fx.GraphModule, relayouts) -> None:
    """Fake values for the nodes of the rewritten graph that need new ones: the rules' new
    nodes, and every node downstream of a relayouted pool whose value (shape, strides, storage)
    changed with it. The relayouted pools enter in their new layout."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    mode = detect_fake_mode([n.meta["val"] for n in placeholders if "val" in n.meta])
    with mode:
        inputs = [n.meta["val"].permute(inverse(relayouts[n][1])).contiguous() if n in relayouts else n.meta.get("val")
                  for n in placeholders]
    with torch.no_grad():  # shapes only; export's fake buffers may say they require grad
        _Propagate(gm, mode, set(relayouts)).run(*inputs)


class _Propagate(torch.fx.Interpreter):
    """FakeTensorProp for the changed part of a graph only (the rest keeps export's values)."""

    def __init__(self, gm, mode, changed: set):
        super().__init__(gm)
        self.mode, self.changed = mode, set(changed)

    def run_node(self, n):
        if n.op == "placeholder":
            value = super().run_node(n)
            n.meta["val"] = value
            return value
        if n.op == "output" or ("val" in n.meta and not self.changed.intersection(n.all_input_nodes)):
            return n.meta.get("val") if n.op != "output" else None
        with self.mode:
            value = super().run_node(n)
        old = n.meta.get("val")
        if isinstance(value, torch.Tensor) and isinstance(old, torch.Tensor) and _same_tensor_meta(value, old) \
                and not any(isinstance(a, torch.Tensor) and torch._C._is_alias_of(value, a)
                            for a in pytree.tree_leaves((self.fetch_args_kwargs_from_env(n)))):
            return old  # a fresh tensor as before: what follows it is unchanged
        self.changed.add(n)
        n.meta["val"] = value
        return value


def _same_tensor_meta(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape, a.stride(), a.dtype, a.storage_offset()) == (b.shape, b.stride(), b.dtype, b.storage_offset())


def _kernel_uses(gm: torch.fx.GraphModule, entry: str, placeholders: dict[str, tuple[str, Pool]]) -> list[Use]:
    """Every conv op on a pool: the layout its kernel runs on, and whether a view is left."""
    uses = []
    for op in gm.graph.nodes:
        if op.target not in STATE_ARGUMENT:
            continue
        state, views = op.args[STATE_ARGUMENT[op.target]], 0
        while state.op == "call_function" and state.target in PERMUTATIONS:
            state, views = state.args[0], views + 1
        name, pool = placeholders.get(state.name, (None, None)) if state.op == "placeholder" else (None, None)
        if name is not None:
            layout = pool.target
            uses.append(use(entry, name, op, Kind.KERNEL, Action.KERNEL_DIRECT, f"{layout} kernel, pool passed directly")
                        if not views else use(entry, name, op, Kind.KERNEL, Action.KEPT,
                                              f"{layout} kernel through {views} permutation(s) of the pool"))
    return uses


@functools.cache
def _optimized_class(cls: type) -> type:
    """The model's class with OptimizedModule's forward in front: every other method, and the
    model's own attributes, stay as they were."""
    if issubclass(cls, OptimizedModule):
        return cls
    return type(f"Optimized{cls.__name__}", (OptimizedModule, cls), {"__module__": cls.__module__})


def optimize(model: nn.Module, layout: "str | Layout" = "DS", *, example_inputs: Sequence | None = None,
             state_buffers: Sequence[str] | Mapping[str, str] | None = None,
             allow_missing: bool = False, lower: "bool | str" = "auto", dynamic: bool | None = None,
             inplace: bool = False) -> OptimizedModule:
    """Store every conv-state pool of `model` in `layout` ("DS" or "SD") and rewrite every use.

    example_inputs: calls to capture now, each a dict of keyword arguments, a tuple of
    positional ones, or an (args, kwargs) pair; otherwise each new call structure is captured
    on first use. state_buffers: pool buffer names (or name -> stored layout, for pools no conv
    op reaches). lower: replace pure-torch conv updates on DS pools by the conv kernels
    (True, False, or "auto": when the model's buffers are on CUDA). dynamic: one graph for
    every size (True) or one per size (False: for code whose export is not sound for other
    sizes); by default the model's `layoutpass_dynamic` attribute, else True. inplace: the
    pools are relayouted in their own memory instead of copied (the model's pool buffers then
    hold the new layout's bytes: use only the optimized module afterwards). The model is never
    otherwise modified; a refused rewrite raises LayoutPassError and changes nothing."""
    if not isinstance(model, nn.Module):
        raise ArgumentError("model", f"expected an nn.Module, got {type(model).__name__}")
    if any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
        from .hf import raw_transformers_hint  # a cache object passed to forward cannot be captured

        hint = raw_transformers_hint(model)
        if hint:
            raise ArgumentError("model", hint)
    target = parse_layout(layout)
    if lower not in (True, False, "auto"):
        raise ArgumentError("lower", f"expected True, False or 'auto', got {lower!r}")
    dynamic = getattr(model, "layoutpass_dynamic", True) if dynamic is None else dynamic
    for name, value in (("dynamic", dynamic), ("inplace", inplace), ("allow_missing", allow_missing)):
        if not isinstance(value, bool):
            raise ArgumentError(name, f"expected True or False, got {value!r}")
    named = _explicit_pools(state_buffers, dict(model.named_buffers()))
    calls = [_split(call) for call in example_inputs or ()]
    fast = _copy(model, inplace)
    layers = layer_units(model) if "forward" not in vars(model) else None
    state = _State(model, type(model).forward, Options(target, named, lower, dynamic, inplace), Unit("model", [ROOT]),
                   layers, {}, {}, Report())
    fast.__dict__["_lp"] = state
    for path in layers or ():
        fast.get_submodule(path).forward = _LayerCall(fast, path)
    try:
        for args, kwargs in calls:
            if state.layers is not None:
                fast._probe(args, kwargs, "example_inputs")
            if state.layers is None:
                if not any(e.accepts(*e.flatten(args, kwargs)) for e in state.root.entries):
                    fast._rewrite_call(state.root, ROOT, args, kwargs)
        if calls:
            _check_found(fast.report, named, allow_missing)
    except BaseException:  # a refusal, or anything else, after earlier layers' pools moved in the model's memory
        if inplace:
            _move_back(fast, state)
        raise
    return fast


def _move_back(fast: OptimizedModule, state: "_State") -> None:
    """Every moved pool back to its layout, in place: the model's own memory is as it was (a
    pool that was copied instead goes with the discarded copy)."""
    for name in state.stored:
        pool = state.pools[name]
        owner, leaf = _owner(fast, name)
        relayout_(owner.get_buffer(leaf), pool.target, pool.source)


def _copy(model: nn.Module, inplace: bool) -> OptimizedModule:
    """The model's structure copied, its parameters shared; its buffers copied too, unless
    inplace (then shared: only the pools' memory is rewritten)."""
    shared = list(model.parameters()) + (list(model.buffers()) if inplace else [])
    fast = copy.deepcopy(model, memo={id(t): t for t in shared})
    fast.__class__ = _optimized_class(type(model))
    fast.__dict__.pop("forward", None)  # a forward patched onto the instance would run the model as written
    return fast


def _check_found(report: Report, named: dict, allow_missing: bool) -> None:
    missing = [name for name in named if name not in report.pools]
    if missing:
        raise ArgumentError("state_buffers", f"{missing} reach no conv op and are never shifted and written "
                                             "back in the captured calls; give their layouts")
    if not report.pools and not allow_missing:
        raise PoolNotFound("no conv-state pool found in the captured calls: no rank-3 buffer reaches a conv op or is "
                           "written back shifted along one axis (pass state_buffers=, or allow_missing=True)")


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
    bad = [n for n in named if buffers[n].dim() != 3]
    if bad:
        raise ArgumentError("state_buffers", f"{bad} are not rank-3 (slot, tok, dim) pools")
    return named


def _split(call) -> tuple[tuple, dict]:
    if isinstance(call, Mapping):
        return (), dict(call)
    if isinstance(call, tuple) and len(call) == 2 and isinstance(call[0], tuple) and isinstance(call[1], Mapping):
        return call[0], dict(call[1])
    if isinstance(call, tuple):
        return call, {}
    raise ArgumentError("example_inputs", f"each call must be a dict, a tuple or (args, kwargs); got {type(call).__name__}")
