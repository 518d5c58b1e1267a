"""The runtime: what a user holds after `optimize()`.

The optimized model is the model itself (a subclass of its class: same methods, attributes and
names; parameters shared, state copied unless `inplace`), whose pool-holding layers (or, when
the model holds pools itself, whose forward) run through torch Dynamo with layoutpass's
compiler as the backend. Dynamo guards every Python value the code read and replays every
Python side effect, so flags, counters, caches in lists and hooks behave as in the model;
the compiler (layoutpass/compiler.py) proves and rewrites each graph Dynamo captures. Pools
move like a tensor going channels_last: same shape, new strides, so code outside the graphs
(other methods, hooks, state_dict, pickle) still computes what it was written for."""

import contextlib
import copy
import dataclasses
import functools
import io
import logging
import random
import re
import threading
import time
import types
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .capture import Unanalyzable, configure_dynamo
from .compiler import Build, compile_graph, prove_build, rebuild
from .discover import PoolNotFound
from .eager import EagerOrderUse, EagerWatch, LiveWatch
from .errors import ArgumentError, LayoutPassError
from .layout import Layout, dense_strides, parse_layout, requested
from .pages import Region, drop_stale, guard, pages_of, put_back, regions_of, settle, stale
from .prove import StrideDependent
from .report import Considered, Pool, Report
from .state import (Block, aliases, move, own_state, place_key, refuse_in_graph_capture, refuse_overlaps, relation,
                    resolve, state_tensors, storage_key)

log = logging.getLogger("layoutpass")
ROOT = ""


@dataclass(frozen=True)
class Options:
    layouts: dict[str, Layout]  # pool kind -> the layout asked for
    named: dict[str, Layout | None]  # state_buffers: pool name -> its axes, if given
    lower: bool | str
    dynamic: bool | None
    inplace: bool
    allow_missing: bool


@dataclass(frozen=True)
class Graph:
    """One captured graph: its code as captured and as it runs, both GraphModules, the pools
    it takes (placeholder -> Pool), the module paths that run it, what each pass took.
    (layoutpass.drawing pictures it; `layoutpass inspect --draw` writes the pictures.)"""

    before: str
    after: str
    module: torch.fx.GraphModule  # as it runs
    seconds: dict[str, float]
    captured: torch.fx.GraphModule  # as captured: what the model computes
    pools: dict[str, Pool]
    instances: tuple[str, ...]


class Runner:
    """What Dynamo calls for a captured graph: the graph can be rebuilt in place when a later
    graph finds a pool it takes."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm

    def __call__(self, *args):
        return self.gm(*args)


@dataclass(eq=False)
class Entry:
    name: str
    graph: Graph
    reads: frozenset[str]  # the state it takes, by path (every instance of its unit)
    build: Build  # kept to rewrite it for pools found later
    runner: Runner


@dataclass(eq=False)
class Unit:
    """A module whose forward is captured: a kind of pool-holding layer (its instances share
    every graph), or the whole model (paths == [ROOT])."""

    label: str
    paths: list[str]
    forward: object  # the function captured: forward(module, *args, **kwargs)
    compiled: object = None
    pools: dict[str, Pool] = field(default_factory=dict)  # local name (path under the instance) -> pool
    entries: list[Entry] = field(default_factory=list)
    count: int = 0  # graphs captured so far (names them)
    eager: str | None = None  # why it runs as written, when Dynamo cannot capture it


class Session:
    """The compiler state behind one optimized model: units, pools, report, pending moves."""

    def __init__(self, model: nn.Module, options: Options, units: list[Unit], root: Unit | None):
        self.model_class = type(model)
        self.options, self.units, self.root = options, units, root
        self.pools: dict[str, Pool] = {}  # qualified name -> pool
        self.report = Report()
        self.trees: list = []  # weak references to the optimized module (and its warm-up twins)
        self.running: list[tuple[Unit, str, nn.Module]] = []  # the unit calls in progress
        self.calling: list[nn.Module] = []  # the top-level calls in progress (the optimized model or a twin)
        self.pending: list[tuple[str, Pool]] = []  # (qualified path, pool) to move once the call returns
        self.calls = 0
        self.moves = 0  # pools moved so far
        self.moves_seen: dict[int, int] = {}  # id(unit) -> self.moves when it last captured
        self.warming = False  # example calls running on a twin
        self.rehearsed = False  # the first call (or the example calls) ran on a twin
        self.reverted: str | None = None  # why every pool went back to the model's order
        self._places: dict[tuple, Pool] = {}  # where a pool's elements are (state.place_key) -> the pool
        self.regions: list[Region] = []  # moved pools inside raw pages
        self.watching = False  # a call runs under an EagerWatch or a LiveWatch
        self.live: LiveWatch | None = None  # the later call's watch while pools are moved
        self._blocks: tuple = (None, [])  # ((self.moves, self.reverted), the moved pools' blocks) for the LiveWatch
        for unit in units:
            unit.compiled = torch.compile(_own_code(unit.forward), backend=functools.partial(_backend, self, unit),
                                          fullgraph=True, dynamic=options.dynamic)

    # -- what the compiler asks ----------------------------------------------------------------

    def qualified(self, instance: str, local: str) -> str:
        return f"{instance}.{local}" if instance else local

    def named_for(self, unit: Unit) -> dict[str, Layout | None]:
        """state_buffers, by the names they have under an instance of the unit."""
        out = {}
        for name, axes in self.options.named.items():
            for path in unit.paths:
                prefix = f"{path}." if path else ""
                if name.startswith(prefix):
                    out[name[len(prefix):]] = axes
        return out

    def pool_of(self, tensor: torch.Tensor) -> Pool | None:
        return self._places.get(place_key(tensor))

    def containers_among(self, inputs: list, found: dict[str, Pool]) -> dict[str, str]:
        """Inputs (placeholder -> pool) that are containers of a pool that moved or moves now."""
        tree = self.tree()
        moving = [p for p in list(self.pools.values()) + list(found.values()) if p.moves and not p.argument]
        out = {}
        for pool in moving:
            t = resolve(tree, pool.name)
            for i in inputs:
                if isinstance(i.tensor, torch.Tensor) and i.tensor.dim() >= 1 and \
                        storage_key(i.tensor) == storage_key(t) and relation(t, i.tensor) == "container":
                    out[i.name] = pool.name
        return out

    def lowering(self, gm: torch.fx.GraphModule) -> bool:
        if self.options.lower != "auto":
            return bool(self.options.lower)
        return any(isinstance(v := n.meta.get("val"), torch.Tensor) and v.is_cuda
                   for n in gm.graph.find_nodes(op="placeholder"))

    # -- a captured graph, accepted --------------------------------------------------------------

    def record(self, b: Build) -> "Runner":
        """Take the build's new pools (for every instance of the unit) and its graph; queue the
        moves for after the call. Raises, moving nothing, when a new pool cannot move."""
        trees = self._live_trees()
        moves, kept = [], {}
        for local, pool in b.found.items():
            for path in b.unit.paths:
                name = pool.name if pool.argument else self.qualified(path, local)
                instance = dataclasses.replace(pool, name=name)
                held = self._held_as_written([name]) if pool.moves and not pool.argument else {}
                if held:
                    kept.update(held)
                elif pool.moves and not pool.argument:
                    for tree in trees:
                        _check_movable(tree, name)
                    moves.append((name, instance))
        self._prove_earlier(moves)
        for local, pool in b.found.items():
            b.unit.pools[local] = pool
            for path in b.unit.paths:
                name = pool.name if pool.argument else self.qualified(path, local)
                self.pools[name] = dataclasses.replace(pool, name=name)
                for tree in trees:
                    if not pool.argument:
                        self._remember(resolve(tree, name), self.pools[name])
        self.report.pools = self.pools
        for name, c in b.considered.items():
            qualified = self.qualified(b.instance, name) if not name.startswith("argument ") else name
            if qualified not in self.report.considered or c.taken:
                self.report.considered[qualified] = dataclasses.replace(c, name=qualified)
        reads = frozenset(self.qualified(path, i.path) for i in b.inputs if i.kind == "state" for path in b.unit.paths)
        b.unit.entries.append(Entry(b.name, _graph(b), reads, b, Runner(b.gm)))
        self.report.entry_uses[b.name] = b.uses
        if b.found:
            self._rewrite_earlier(b.unit.entries[:-1], {name for name, _ in moves})
        if kept:
            self._keep(kept)
        self.pending += moves
        why = self._why(b)
        self.moves_seen[id(b.unit)] = self.moves
        log.info("captured %s (%s) in %.2f s: %d pool(s) found, %d to move", b.name, why, sum(b.seconds.values()),
                 len(b.found), len(moves))
        return b.unit.entries[-1].runner

    def _why(self, b: Build) -> str:
        """Why a graph was captured, as far as the runtime can tell (Dynamo's own guard failures:
        TORCH_LOGS=recompiles)."""
        if b.unit.count == 1:
            return "first call"
        if self.moves_seen.get(id(b.unit)) != self.moves:
            return "its pools moved: new strides"
        return "a call the earlier graphs' guards did not accept (new sizes, types or Python values)"

    def _rewrite_earlier(self, entries: list[Entry], moving: set[str]) -> None:
        """Graphs captured before a pool was found, that take it: rewritten for it now (those
        whose pool moves are captured again by Dynamo after the move instead)."""
        for entry in entries:
            b = entry.build
            new = {ph: pool for ph, (local, _) in b.candidates.items()
                   if (pool := b.unit.pools.get(local)) is not None and ph not in b.pools}
            if not new or any(self.qualified(entry_path, local) in moving for ph, (local, _) in b.candidates.items()
                              for entry_path in b.unit.paths):
                continue
            b.pools.update(new)
            rebuild(b)
            entry.runner.gm = b.gm
            entry.graph = _graph(b)
            self.report.entry_uses[entry.name] = b.uses

    def _prove_earlier(self, moves: list[tuple[str, Pool]]) -> None:
        """Every graph captured earlier that takes a pool about to move is proven for its new
        order too (Dynamo would capture it again after the move; a refusal must come now,
        before anything moves)."""
        moving = dict(moves)
        for unit in self.units:
            for entry in unit.entries:
                other, changed = {}, []
                for i in entry.build.inputs:
                    for path in unit.paths:
                        pool = moving.get(self.qualified(path, i.path)) if i.kind == "state" else None
                        if pool is not None:
                            val = i.tensor
                            other[i.name] = dense_strides(pool.axes, pool.target, tuple(val.shape), val.stride(0))
                            changed.append(pool)
                            entry.build.pools.setdefault(i.name, pool)
                if other:
                    prove_build(entry.build, other, changed)

    def _remember(self, tensor: torch.Tensor, pool: Pool) -> None:
        self._places[place_key(tensor)] = pool

    def _live_trees(self) -> list[nn.Module]:
        return [t for t in (ref() for ref in self.trees) if t is not None]

    def tree(self) -> nn.Module:
        """The optimized model (or warm-up twin) whose call is running."""
        return self.calling[-1] if self.calling else self._live_trees()[0]

    # -- running ----------------------------------------------------------------------------------

    def call(self, unit: Unit, path: str, module: nn.Module, args: tuple, kwargs: dict):
        if self.live is not None:
            self.live.writes += 1  # the layer may write its pools: copies of them taken before are stale
        if torch.compiler.is_compiling() or unit.eager is not None:
            return unit.forward(module, *args, **kwargs)
        _refuse_under_dispatch_mode()
        if torch._dynamo.config.disable:
            raise LayoutPassError(f"torch Dynamo is disabled (torch._dynamo.config.disable, TORCHDYNAMO_DISABLE=1), and "
                                  f"the optimized model runs {f'{unit.label} {path!r}' if path else 'its forward'} through "
                                  f"it: enable it (that did not run)")
        with _unwatched(self):  # the layer's captured code and the pass's own work: no eager code of the model
            try:
                out = self._call(unit, path, module, args, kwargs)
            except LayoutPassError as err:
                self.pending.clear()
                refuse_in_graph_capture(f"a refusal ({err}) would put every pool back in the model's order")
                if not self._back_to_the_models_order(err):
                    self._refused()
                    raise err.with_traceback(None) from None
                out = self._call(unit, path, module, args, kwargs)  # captured again, every pool as the model keeps it
        if self.pending and not self.calling:  # a layer called on its own; else once the model's call returns
            self._move_pending()
        return out

    def _call(self, unit: Unit, path: str, module: nn.Module, args: tuple, kwargs: dict):
        """The unit's compiled forward; a refusal raised as the LayoutPassError it is."""
        self.running.append((unit, path, module))
        queued = len(self.pending)  # moves found by earlier layers of this call
        try:
            return unit.compiled(module, *args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            del self.pending[queued:]
            inner = getattr(err, "inner_exception", None)
            if isinstance(inner, LayoutPassError):
                raise inner from None
            if not isinstance(inner, Unanalyzable):
                raise
            return self._run_as_written(unit, module, args, kwargs, inner)
        except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as err:
            del self.pending[queued:]
            moved = self._moved_in(unit, path)
            if moved and isinstance(err, torch._dynamo.exc.TorchRuntimeError):
                raise StrideDependent(
                    f"{unit.label} ({path or 'the model'}): this call cannot be traced with {moved[0]!r} in its new "
                    f"order: {_first_line(err)}; the code depends on the pool's memory order here (a .view() of "
                    f"it?), so the call is refused before it runs") from None
            return self._run_as_written(unit, module, args, kwargs, err)
        finally:
            self.running.pop()

    def _back_to_the_models_order(self, err: LayoutPassError) -> bool:
        """A refusal in a call of the model (not of its twin) comes after the layers before it in
        that call ran: rather than stop there, every pool goes back to the model's order for good
        (values kept), the graphs are captured again as the model wrote them, and the call goes
        on. False on a twin (the rehearsal and example calls: their refusal comes before anything
        changed), for a first call that could not be rehearsed, and when the caller allocates pools
        (`input_layouts` said the new order)."""
        if self.warming or not (self.calls or self.rehearsed) or self.reverted or \
                any(p.argument and p.moves for p in self.pools.values()):
            return False
        self.settle_unbound()
        moved = [p for p in self.pools.values() if p.moves]
        views = self.live.targets() if self.live is not None else []  # views the eager code holds
        for tree in self._live_trees():
            for pool in moved:
                move(tree, pool.name, pool.axes, pool.source, follow=True)
        with torch.no_grad():
            for view, offset, strides in views:
                view.set_(view.untyped_storage(), offset, view.shape, strides)
        if self.live is not None:
            self.live.storages = set()
        self.reverted = f"every pool is back in the model's order, for a later call: {err}"
        self.regions = []
        self.pools.update({n: dataclasses.replace(p, target=p.source) for n, p in self.pools.items()})
        for unit in self.units:
            unit.pools = {k: dataclasses.replace(p, target=p.source) for k, p in unit.pools.items()}
            unit.entries = []
        self._places = {k: self.pools.get(p.name, p) for k, p in self._places.items()}
        self.report.pools, self.report.entry_uses = self.pools, {}
        self.report.notes.append(self.reverted)
        log.warning("%s", self.reverted)
        return True

    def revert_for_eager(self, what: str) -> None:
        """A later call's eager code is about to use a moved pool's memory order (LiveWatch)."""
        if self.reverted:
            return
        err = EagerOrderUse(f"{what} runs outside the captured graphs and depends on the pool's memory order")
        refuse_in_graph_capture(f"{what}: putting every pool back in the model's order for it")
        self.pending.clear()
        if not self._back_to_the_models_order(err):
            self._refused()
            raise err

    def moved_blocks(self, tree: nn.Module) -> list:
        """Each moved pool of `tree` as stored now, with the strides it has in the model's order
        (kept until pools move again)."""
        if self._blocks[0] != (self.moves, self.reverted):
            blocks = []
            for p in self.pools.values():
                if p.moves and not p.argument:
                    t = resolve(tree, p.name)
                    slot = t.stride(p.axes.axes.index("slot"))
                    blocks.append((Block.of(t), dense_strides(p.axes, p.source, tuple(t.shape), slot)))
            self._blocks = ((self.moves, self.reverted), blocks)
        return self._blocks[1]

    def _moved_in(self, unit: Unit, path: str) -> list[str]:
        """The pools of this instance of the unit that moved."""
        names = (self.qualified(path, local) for local in unit.pools)
        return [n for n in names if (p := self.pools.get(n)) is not None and p.moves and not p.argument and
                all(n != name for name, _ in self.pending)]

    def _run_as_written(self, unit: Unit, module: nn.Module, args: tuple, kwargs: dict, err: Exception):
        """Dynamo cannot capture this unit: it runs as the model wrote it, the report says so, and
        the pools it holds stay in (or go back to) the model's order."""
        unit.eager = f"{unit.label} is not captured and runs as written: {type(err).__name__}: {_first_line(err)}"
        if unit.eager not in self.report.notes:  # a second time when its pools went back to the model's order
            self.report.notes.append(unit.eager)
            log.warning("%s", unit.eager)
        self._keep_held_as_written(unit)
        return unit.forward(module, *args, **kwargs)

    def _held_as_written(self, names: list[str]) -> dict[str, str]:
        """Those of the pools `names` whose bytes a layer that runs as written holds: name -> the
        layer (its code is proven for nothing, so these pools stay in the model's order)."""
        tree, held = self.tree(), {}
        for unit in self.units:
            for path in unit.paths if unit.eager is not None else ():
                layer = tree.get_submodule(path)
                held.update({n: repr(path) if path else "the model" for n in names
                             if n not in held and aliases(layer, resolve(tree, n))})
        return held

    def _keep_held_as_written(self, unit: Unit) -> None:
        """Pools a layer that runs as written holds: those about to move stay in the model's
        order; one that moved already is a refusal (its code would now run on the new order)."""
        held = self._held_as_written([n for n, _ in self.pending])
        if held:
            self.pending = [(n, p) for n, p in self.pending if n not in held]
            self._keep(held)
        moved = self._held_as_written([n for n, p in self.pools.items() if p.moves and not p.argument])
        if moved:
            name, layer = next(iter(moved.items()))
            raise StrideDependent(f"{name!r} moved, and {layer}, which holds it, now runs as written: its code is "
                                  f"not proven for the pool's new order ({unit.eager})")

    def _keep(self, held: dict[str, str]) -> None:
        """Pools (name -> the layer run as written that holds them) stay in the model's order:
        their records and the graphs' reports say so."""
        kept = {n: dataclasses.replace(self.pools[n], target=self.pools[n].source) for n in held}
        self.pools.update(kept)
        self._places = {k: kept.get(p.name, p) for k, p in self._places.items()}
        for unit in self.units:
            for entry in unit.entries:
                b = entry.build
                if any(p.name in kept for p in b.pools.values()):
                    b.pools.update({ph: kept[p.name] for ph, p in b.pools.items() if p.name in kept})
                    rebuild(b)
                    entry.runner.gm, entry.graph = b.gm, _graph(b)
                    self.report.entry_uses[entry.name] = b.uses
        for name, layer in held.items():
            self.report.notes.append(f"{name} stays in the model's order: {layer} holds it and runs as written, "
                                     f"so its code is not proven for another order")

    def _move_pending(self) -> None:
        refuse_in_graph_capture(f"pools found in this call ({', '.join(n for n, _ in self.pending)}) cannot move")
        pending, self.pending = self.pending, []
        self.moves += len(pending)
        for name, pool in pending:
            for tree in self._live_trees():
                move(tree, name, pool.axes, pool.target)
        for tree in self._live_trees():
            guard(self, tree, [name for name, _ in pending])
            self.regions += regions_of(tree, pending)
        moved = {name for name, _ in pending}
        dropped = sorted(e.name for u in self.units for e in u.entries if e.reads & moved)
        for unit in self.units:  # Dynamo's guards on strides keep them from running again
            unit.entries = [e for e in unit.entries if not e.reads & moved]
        if dropped and not self.warming:  # a pool found in a later call: its graphs go from the report for now
            self.report.notes.append(f"{', '.join(sorted(moved))} found in a call and moved after it: that "
                                     f"call's graphs reading them ({', '.join(dropped)}) ran with the model's order "
                                     f"and are captured again at their next call")
        live = {e.name for u in self.units for e in u.entries}
        self.report.entry_uses = {k: v for k, v in self.report.entry_uses.items() if k in live}
        log.info("moved %d pool(s): %s", len(pending), ", ".join(f"{n} -> {p.target}" for n, p in pending))

    def settle_unbound(self) -> None:
        """Put back the raw-page bytes a moved pool left when it was rebound (pages.settle)."""
        self.regions = settle(self.regions)

    def _refused(self) -> None:
        """inplace: a refusal hands the model back as it was, its moved pools in their old order
        (their values never changed); a copy keeps its pools where they are."""
        if not self.options.inplace:
            return
        self.settle_unbound()
        self.regions = []
        moved = [p for p in self.pools.values() if p.moves and not p.argument]
        for tree in self._live_trees():
            for pool in moved:
                move(tree, pool.name, pool.axes, pool.source, follow=True)
        for unit in self.units:
            unit.entries, unit.pools = [], {}
        self.pools.clear()
        self._places.clear()
        self.report.pools, self.report.entry_uses = self.pools, {}

    def check_found(self, strict: bool) -> None:
        """A model in which no pool was found is refused (unless allow_missing): after the
        example_inputs (strict), or after a first call whose graphs took no rank-3 state or
        argument at all (a call that reads, stores or trims a pool leaves the verdict to later
        calls, which may show the rest of its use)."""
        seen = bool(self.report.considered)
        tree = self.tree()
        for path, t in state_tensors(tree):
            if t.dim() >= 3 and path not in self.pools and path not in self.report.considered:
                known = self.pool_of(t)  # a second name of a pool (a layer holding another's state)
                self.report.considered[path] = Considered(path, tuple(t.shape), known is not None,
                                                          f"another name of pool {known.name}" if known else
                                                          "no captured graph uses it")
        missing = [name for name in self.options.named if name not in self.pools]
        if missing:
            self.report.notes.append(f"state_buffers {missing}: no captured graph reads or writes them yet; they keep "
                                     f"their layout until one does")
        if self.pools or self.options.allow_missing or self.options.named or (seen and not strict):
            return
        eager = [u.eager for u in self.units if u.eager]
        why = f" ({'; '.join(eager)})" if eager else ""
        when = "in the example calls" if strict else "in the first call"
        raise PoolNotFound(f"no state pool found {when}: no state tensor reaches a conv or recurrence op or is "
                           f"written back shifted along one axis{why}; nothing moved (pass state_buffers=, or "
                           f"allow_missing=True)")


def _refuse_under_dispatch_mode() -> None:
    """Dynamo captures no frame under a TorchDispatchMode of the caller's (a profiler, a debugger;
    not the infra modes or those that ignore compile internals, as Dynamo counts them): the graphs
    written for the moved pools could not run, and the model's own code must not run on them."""
    if torch.compiler.is_compiling():
        return
    from torch.utils._python_dispatch import _get_dispatch_stack_at

    for i in range(torch._C._len_torch_dispatch_stack()):
        mode = _get_dispatch_stack_at(i)
        if not mode.is_infra_mode() and not mode.ignore_compile_internals():
            raise LayoutPassError(f"the optimized model was called under a TorchDispatchMode "
                                  f"({type(mode).__name__}), where torch Dynamo captures nothing: call it outside "
                                  f"the mode (nothing ran)")


def _unwatched(session: Session):
    """The pass's own work and a layer's call run without the watch of the model's eager code
    (the layer's code is captured, and Dynamo would trace the mode into the graph)."""
    watched = session.watching and isinstance(torch.overrides._get_current_function_mode(), (EagerWatch, LiveWatch))
    return torch.overrides._pop_mode_temporarily() if watched else contextlib.nullcontext()


def _first_line(err: Exception) -> str:
    if isinstance(err, torch._dynamo.exc.FailOnRecompileLimitHit):
        return f"Dynamo's recompile limit ({torch._dynamo.config.recompile_limit} graphs of one code) is reached"
    if isinstance(err, torch._dynamo.exc.TorchRuntimeError):  # the op's own error, not Dynamo's wrapper
        found = re.search(r"got (\w+)\((['\"])(.+?)\2\)", f"{err}\n{err.__context__}")
        if found:
            return f"{found[1]}: {found[3]}"[:300]
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _own_code(fn):
    """The function with a code object of its own: Dynamo keeps its graphs on the code object,
    so each optimized model's graphs go with it instead of piling up on the model class's
    forward (which has a recompile limit) across optimize() calls."""
    if not isinstance(fn, types.FunctionType):
        return fn
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__, own.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return own


def _graph(b: Build) -> Graph:
    return Graph(b.captured.code, b.gm.code, b.gm, dict(b.seconds), b.captured, dict(b.pools), tuple(b.unit.paths))


def _check_movable(tree: nn.Module, name: str) -> None:
    if not any(path == name for path, _ in state_tensors(tree)):  # its other names could not be found
        owner = type(resolve(tree, name.rpartition(".")[0])).__name__ if "." in name else "?"
        raise LayoutPassError(f"pool {name!r} is held by a {owner} object, which the pass does not look into for "
                              f"other names of the pool to move with it: hold it as a buffer or a tensor attribute of "
                              f"a module, or in a list, tuple or dict (nothing moved)")
    refuse_overlaps(name, aliases(tree, resolve(tree, name)))


def _backend(session: Session, unit: Unit, gm: torch.fx.GraphModule, example_inputs: list):
    _, path, _ = session.running[-1] if session.running else (unit, unit.paths[0], None)
    b = compile_graph(Build(session, unit, path, gm, example_inputs))
    return session.record(b)


class _LayerCall:
    """A pool-holding layer's forward in the optimized model (hooks still run around it)."""

    def __init__(self, session: Session, unit: Unit, path: str, module: nn.Module):
        self.session, self.unit, self.path, self.module = session, unit, path, module

    def __call__(self, *args, **kwargs):
        return self.session.call(self.unit, self.path, self.module, args, kwargs)

    def __reduce__(self):  # pickled or copied with its model: optimize() binds a new one
        return stale, ()


def _restore(plain: nn.Module, layouts: dict, options: dict, moved: list, pages: list) -> "OptimizedModule":
    """An optimized model unpickled or copied: the model (its state as the optimized one kept it)
    with its moved pools back in the model's order, and the raw pages that held them too,
    optimized again in place; graphs are captured anew."""
    drop_stale(plain)
    put_back(plain, pages)
    for name, axes, order in moved:
        move(plain, name, axes, order)
    return optimize(plain, layouts, inplace=True, **options)


class OptimizedModule(nn.Module):
    """The model with its pools in the layout asked for and its captured graphs proven and
    rewritten. report: what was found, rewritten, refused (with source lines). graphs: graph
    name -> Graph (code before and after)."""

    def forward(self, *args, **kwargs):
        session: Session = self.__dict__["_lp"]
        with _unwatched(session):  # the pass's own work; the model's forward is watched again in _call_model
            if not (session.rehearsed or session.calls or session.calling or session.warming):
                return _first_call(self, args, kwargs)
            return _call_model(self, session, args, kwargs)

    def _call_impl(self, *args, **kwargs):
        """nn.Module's call (your hooks, then forward) under a later call's LiveWatch while pools
        are moved: the hooks are eager code too."""
        session: Session | None = self.__dict__.get("_lp")
        with _live(self, session) if session is not None else contextlib.nullcontext():
            return super()._call_impl(*args, **kwargs)

    @property
    def report(self) -> Report:
        return self.__dict__["_lp"].report

    def __reduce_ex__(self, protocol):
        """pickle and copy.deepcopy: the model as it stands (its class, state and attributes),
        optimized again where it is loaded."""
        session: Session = self.__dict__["_lp"]
        session.settle_unbound()
        plain = session.model_class.__new__(session.model_class)
        plain.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_lp"})
        o = session.options
        options = dict(state_buffers=o.named or None, allow_missing=o.allow_missing, lower=o.lower, dynamic=o.dynamic)
        pools = [p for p in session.pools.values() if not p.argument]
        named = {**{p.name: p.axes for p in pools}, **o.named}  # the copy knows the pools found so far
        options = dict(options, state_buffers=named or None)
        moved = [(p.name, p.axes, p.source) for p in pools if p.moves]
        return _restore, (plain, dict(o.layouts), options, moved, pages_of(self, moved))

    @property
    def graphs(self) -> dict[str, Graph]:
        return {e.name: e.graph for u in self.__dict__["_lp"].units for e in u.entries}

    @property
    def layout(self) -> dict[str, Layout]:
        return dict(self.__dict__["_lp"].options.layouts)

    @property
    def input_layouts(self) -> dict[str, tuple[Layout, tuple]]:
        """Pool arguments of forward -> (memory order, strides) to allocate them with."""
        from .layout import dense_strides

        return {p.name: (p.target, dense_strides(p.axes, p.target, p.shape))
                for p in self.report.pools.values() if p.argument}


@torch.compiler.disable  # eager under your own torch.compile too: it captures, proves and moves pools
def _first_call(fast: OptimizedModule, args: tuple, kwargs: dict):
    """The model's first call: rehearsed on a copy of the model (_rehearse), then run."""
    refuse_in_graph_capture("the first call, which runs on a copy of the model and moves its pools, cannot run")
    _rehearse(fast, args, kwargs)
    return _call_model(fast, fast.__dict__["_lp"], args, kwargs)


def _call_model(fast: OptimizedModule, session: Session, args: tuple, kwargs: dict):
    _refuse_under_dispatch_mode()
    if session.regions and not session.calling:
        session.settle_unbound()
    session.calling.append(fast)
    watch = EagerWatch() if session.warming and session.root is None and not session.watching and \
        not torch.compiler.is_compiling() else None
    try:
        if session.root is not None:
            out = session.call(session.root, ROOT, fast, args, kwargs)
        else:
            # the eager code between the layers: rehearsed, or later (live; from here when forward is called directly)
            with watch or session.live or _live(fast, session):
                session.watching = session.watching or watch is not None
                out = session.model_class.forward(fast, *args, **kwargs)
    finally:
        session.calling.pop()
        if watch is not None:
            session.watching = False
    if watch is not None:
        _refuse_eager_order_uses(fast, session, watch)
    if session.pending and not session.calling:  # every layer's call succeeded: the pools found move now
        session._move_pending()
    if not session.calls:
        session.calls += 1
        if not session.warming and not session.rehearsed:
            session.check_found(strict=False)
    return out


@contextlib.contextmanager
def _live(fast: OptimizedModule, session: Session):
    """A later call under a LiveWatch, while pools are moved."""
    live = _live_watch(fast, session)
    if live is None:
        yield
        return
    session.watching, session.live = True, live
    try:
        with live:
            yield
    finally:
        session.watching, session.live = False, None


def _live_watch(fast: OptimizedModule, session: Session) -> LiveWatch | None:
    """A later call's watch, while some pool is moved (code the rehearsal never ran may use its
    order); None inside another watch, a twin's call, or your torch.compile's trace."""
    if session.watching or session.warming or torch.compiler.is_compiling() or not (session.rehearsed or session.calls):
        return None
    blocks = session.moved_blocks(fast)
    return LiveWatch(blocks, session.revert_for_eager) if blocks else None


def _refuse_eager_order_uses(fast: OptimizedModule, session: Session, watch: EagerWatch) -> None:
    """The rehearsed call's eager code used the memory order of a pool that moves (or moved): a
    refusal before the pools found in that call move."""
    moving = [n for n, _ in session.pending] + [n for n, p in session.pools.items() if p.moves and not p.argument]
    try:
        watch.refuse({n: resolve(fast, n) for n in moving})
    except LayoutPassError:
        session.pending.clear()
        raise


@functools.cache
def _optimized_class(cls: type) -> type:
    if issubclass(cls, OptimizedModule):
        return cls
    return type(f"Optimized{cls.__name__}", (OptimizedModule, cls), {"__module__": cls.__module__})


def _holds_state(module: nn.Module) -> bool:
    """Whether the module itself (not its submodules) keeps a tensor of rank >= 3 as state."""
    return any(t.dim() >= 3 for _, t in own_state(module))


def _kind(module: nn.Module) -> tuple:
    """What decides a layer's graphs: class and code, tensors' names and shapes, plain attributes."""
    tensors = tuple((n, tuple(t.shape), t.dtype, t.device.type) for n, t in
                    list(module.named_parameters()) + list(module.named_buffers()))
    return type(module), type(module).forward.__code__, tensors


def _runs_code(module: nn.Module) -> bool:
    """Whether the module's class defines a forward (a bare nn.Module or ModuleList holding
    tensors for others does not)."""
    return getattr(type(module).forward, "__code__", None) is not getattr(nn.Module.forward, "__code__", None) and \
        not isinstance(module, (nn.ModuleList, nn.ModuleDict))


def _user_of(model: nn.Module, path: str) -> str:
    """The module whose forward uses what `path` holds: itself, or the nearest ancestor that
    has a forward of its own."""
    while path and not _runs_code(model.get_submodule(path)):
        path = path.rpartition(".")[0]
    return path


def _units(model: nn.Module, model_class: type) -> tuple[list[Unit], Unit | None]:
    """The layers that hold pools, grouped by kind; or the whole model when it holds state itself
    (or no layer does)."""
    holders = sorted({_user_of(model, p) for p, m in model.named_modules() if _holds_state(m)})
    if not holders or ROOT in holders:
        root = Unit("model", [ROOT], model_class.forward)
        return [root], root
    outermost = [p for p in holders if not any(p.startswith(q + ".") for q in holders if q != p)]
    kinds: dict[tuple, Unit] = {}
    for path in outermost:
        module = model.get_submodule(path)
        key = _kind(module)
        if key not in kinds:
            name = type(module).__name__
            taken = sum(u.label.split("#")[0] == name for u in kinds.values())
            kinds[key] = Unit(name if not taken else f"{name}#{taken + 1}", [], type(module).forward)
        kinds[key].paths.append(path)
    return list(kinds.values()), None


def _handle_types() -> tuple[type, ...]:
    """What deepcopy cannot copy that is a handle, not state: a copy of the model (and the first
    call's rehearsal) shares these with it."""
    found = [type(threading.Lock()), type(threading.RLock()), torch.Stream, torch.Event, torch.cuda.Stream,
             torch.cuda.Event, io.TextIOWrapper, io.BufferedReader, io.BufferedWriter, io.FileIO]
    if torch.distributed.is_available():
        found.append(torch.distributed.ProcessGroup)
    return tuple(found)


@contextlib.contextmanager
def _handles_shared():
    """copy.deepcopy returns handles (_handle_types) as they are while this lasts (its dispatch
    table is keyed by exact type, which is what a handle has)."""
    added = [t for t in _handle_types() if t not in copy._deepcopy_dispatch]
    copy._deepcopy_dispatch.update({t: lambda x, memo: x for t in added})
    try:
        yield
    finally:
        for t in added:
            copy._deepcopy_dispatch.pop(t, None)


def _copy(model: nn.Module, inplace: bool) -> nn.Module:
    """The model's structure copied, its parameters shared; its state copied too, unless
    inplace (then shared: its pools move in the model's own memory)."""
    shared = list(model.parameters()) + ([t for _, t in state_tensors(model)] if inplace else [])
    try:
        with _handles_shared():
            return copy.deepcopy(model, memo={id(t): t for t in shared})
    except Exception as err:  # an attribute deepcopy cannot copy that is no handle (a generator, say)
        raise ArgumentError("model", f"copy.deepcopy cannot copy it ({type(err).__name__}: {_first_line(err)}); "
                                     f"optimize() copies the model's structure (parameters and handles such as "
                                     f"locks, streams and process groups shared): keep such objects outside the "
                                     f"model") from None


def optimize(model: nn.Module, layout="DS", *, example_inputs: Sequence | None = None,
             state_buffers: Sequence[str] | Mapping[str, str] | None = None, allow_missing: bool = False,
             lower: "bool | str" = "auto", dynamic: bool | None = None, inplace: bool = False) -> OptimizedModule:
    """The model with its state pools stored in `layout` and every use of them rewritten.

    layout: "DS" or "SD" for conv-state pools, "KV" or "VK" for recurrent-state pools, "auto"
    (each kind in the order layoutpass's kernels were measured fastest in: DS and VK), or a
    mapping {"conv": ..., "recurrent": ...} (a value may be "auto"); a kind not named keeps the
    model's order.
    Graphs are captured on the first call of each call structure (Dynamo's guards decide what
    a new structure is). example_inputs: calls (dicts of keyword arguments, tuples of positional
    ones, or (args, kwargs)) to capture now, run on a throwaway copy of the optimized model's
    state. state_buffers: pool names (or name -> axes layout) for pools no conv op reaches.
    allow_missing: do not refuse a model in which no pool is found. lower: replace pure-torch
    conv updates on DS pools by the conv kernels (True, False, or "auto": when the inputs are
    on CUDA). dynamic: Dynamo's dynamic-shape mode (None: sizes that change become symbolic).
    inplace: the pools move in the model's own memory instead of a copy (the model then sees
    the new strides; its values are unchanged). A refused rewrite raises LayoutPassError."""
    if not isinstance(model, nn.Module):
        raise ArgumentError("model", f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, OptimizedModule):
        to = ", ".join(f"{kind} pools {layout}" for kind, layout in model.layout.items())
        raise ArgumentError("model", f"is already optimized by layoutpass (to {to}): optimize the model you "
                                     f"optimized it from")
    if any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
        from .hf import raw_transformers_hint  # a cache object passed to forward cannot be captured

        hint = raw_transformers_hint(model)
        if hint:
            raise ArgumentError("model", hint)
    layouts = requested(layout)
    if lower not in (True, False, "auto"):
        raise ArgumentError("lower", f"expected True, False or 'auto', got {lower!r}")
    dynamic = getattr(model, "layoutpass_dynamic", None) if dynamic is None else dynamic
    for name, value in (("inplace", inplace), ("allow_missing", allow_missing)):
        if not isinstance(value, bool):
            raise ArgumentError(name, f"expected True or False, got {value!r}")
    if dynamic not in (None, True, False):
        raise ArgumentError("dynamic", f"expected None, True or False, got {dynamic!r}")
    patched = [path or "the model" for path, m in model.named_modules() if "forward" in vars(m)]
    if patched:
        raise ArgumentError("model", f"{patched[0]}.forward is replaced on the instance; the pass captures and copies "
                                     f"what the class defines (a function set on the instance may close over the "
                                     f"original): define it in a subclass instead")
    tensors, parameters = dict(state_tensors(model)), {name for name, _ in model.named_parameters()}
    named = {**_explicit_pools(getattr(model, "layoutpass_pools", None), tensors, parameters, "layoutpass_pools"),
             **_explicit_pools(state_buffers, tensors, parameters)}
    if isinstance(example_inputs, (Mapping, str, torch.Tensor)):
        raise ArgumentError("example_inputs", f"expected a list of calls, got a {type(example_inputs).__name__}: to "
                                              "capture one call, put it in a list: example_inputs=[{...}]")
    calls = [_split(call, i) for i, call in enumerate(example_inputs or ())]
    configure_dynamo()
    fast = _copy(model, inplace)
    units, root = _units(fast, type(model))
    session = Session(model, Options(layouts, named, lower, dynamic, inplace, allow_missing), units, root)
    _bind(session, fast)
    start = time.perf_counter()
    if calls:
        session.warming = True
        try:
            for i, (args, kwargs) in enumerate(calls):
                try:
                    _warm_up(fast, args, kwargs)
                except _Uncopyable as err:
                    raise ArgumentError(f"example_inputs[{i}]", f"the model and this call cannot be copied to run "
                                                                f"it on a twin of the model: {err}") from None
        finally:
            session.warming, session.calls = False, 0
        session.check_found(strict=True)
        session.rehearsed = True
        log.info("captured %d example call(s) in %.2f s", len(calls), time.perf_counter() - start)
    return fast


def _bind(session: Session, module: nn.Module) -> None:
    """Make `module` (the model's copy, or a twin of it) run through `session`."""
    module.__class__ = _optimized_class(session.model_class)
    module.__dict__["_lp"] = session
    session.trees.append(weakref.ref(module))
    if session.root is None:
        for unit in session.units:
            for path in unit.paths:
                layer = module.get_submodule(path)
                layer.forward = _LayerCall(session, unit, path, layer)


def _warm_up(fast: OptimizedModule, args: tuple, kwargs: dict, grad: bool = False) -> None:
    """Run one call on a twin of `fast` (its state and the call's arguments copies, values,
    views and aliasing kept; its parameters shared; its Python attributes its own): graphs are
    captured, pools found and moved in `fast` too, refusals raised, and neither `fast`'s state
    and attributes nor the caller's arguments are touched."""
    session: Session = fast.__dict__["_lp"]
    plain = session.model_class.__new__(session.model_class)
    plain.__dict__.update({k: v for k, v in fast.__dict__.items() if k != "_lp"})
    try:
        with _handles_shared():
            twin, args, kwargs = copy.deepcopy((plain, args, kwargs), {id(p): p for p in fast.parameters()})
    except Exception as err:  # something deepcopy cannot copy that is no handle (a generator), or memory
        raise _Uncopyable(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    drop_stale(twin)
    for module in twin.modules():  # your hooks run once per call, on your model (their closures are shared)
        for hooks in (module._forward_pre_hooks, module._forward_hooks, module._forward_pre_hooks_with_kwargs,
                      module._forward_hooks_with_kwargs, module._forward_hooks_always_called):
            hooks.clear()
    _bind(session, twin)
    try:
        with torch.set_grad_enabled(grad):
            for _ in range(1 + len(session.units)):  # again while a call moved pools: its graphs for the new order
                moves = session.moves
                twin(*args, **kwargs)
                log.debug("warm-up call: %d pool move(s) so far, %d graph(s) held", session.moves,
                          sum(len(u.entries) for u in session.units))
                if session.moves == moves:
                    break
    finally:
        session.trees = [r for r in session.trees if r() is not twin and r() is not None]


class _Uncopyable(Exception):
    """The model (or the call's arguments) cannot be copied to run a call on a twin."""


def _rehearse(fast: OptimizedModule, args: tuple, kwargs: dict) -> None:
    """The first call runs on a twin before it runs on the model: Dynamo runs the model's Python
    while it captures, and a refusal, a pool found or moved, must all come before the model's
    own state, its Python attributes or the caller's arguments change. A model that cannot be
    copied runs its first call directly (a refusal may then come after that call ran)."""
    session: Session = fast.__dict__["_lp"]
    session.warming = True
    streams = _random_streams()
    try:
        _warm_up(fast, args, kwargs, grad=torch.is_grad_enabled())
    except _Uncopyable as err:
        session.report.notes.append(f"the first call was not rehearsed on a copy of the model: {err}")
        log.warning("%s", session.report.notes[-1])
        return
    finally:
        session.warming, session.calls = False, 0
        streams()
    session.rehearsed = True
    session.check_found(strict=False)


def _random_streams():
    """Save torch's and Python's random generators; the function returned puts them back (the
    rehearsal draws nothing of the model's)."""
    cpu, python = torch.get_rng_state(), random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore():
        torch.set_rng_state(cpu)
        random.setstate(python)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
    return restore


def _explicit_pools(declared, tensors: dict, parameters: set[str],
                    argument: str = "state_buffers") -> dict[str, Layout | None]:
    """Pools a caller names: a list of names, or a mapping name -> the pool's axes (a conv layout
    "SD" / "DS", a Layout, or a tuple of axis names such as ("slot", "head", "v", "k"))."""
    if declared is None:
        return {}
    if isinstance(declared, Mapping):
        named = {k: _axes(v, argument) for k, v in declared.items()}
    elif isinstance(declared, Sequence) and not isinstance(declared, str):
        named = dict.fromkeys(declared)
    else:
        raise ArgumentError(argument, "expected pool names, or a mapping of names to their axes")
    held = [n for n in named if n in parameters]
    if held:
        raise ArgumentError(argument, f"{held[0]!r} is an nn.Parameter, which the pass never moves (it is weights "
                                      f"to it); hold a pool as a buffer (register_buffer) or a tensor attribute")
    unknown = [n for n in named if n not in tensors]
    if unknown:
        raise ArgumentError(argument, f"no state tensors named {unknown}")
    bad = [n for n, axes in named.items() if (tensors[n].dim() != 3 if axes is None else len(axes.axes) !=
                                               tensors[n].dim()) or tensors[n].dim() < 3]
    if bad:
        raise ArgumentError(argument, f"{bad}: the axes given do not match the tensor's rank (a pool without axes "
                                      f"must be a rank-3 (slot, tok, dim) conv pool)")
    return named


def _axes(value, argument: str) -> Layout:
    if isinstance(value, (tuple, list)) and all(isinstance(a, str) for a in value):
        if "slot" not in value or value[0] != "slot":
            raise ArgumentError(argument, f"axes {tuple(value)} must start with the slot axis")
        return Layout(tuple(value))
    return parse_layout(value, argument)


def _split(call, i: int) -> tuple[tuple, dict]:
    if isinstance(call, Mapping):
        return (), dict(call)
    if isinstance(call, tuple) and len(call) == 2 and isinstance(call[0], tuple) and isinstance(call[1], Mapping):
        return call[0], dict(call[1])
    if isinstance(call, tuple):
        return call, {}
    raise ArgumentError(f"example_inputs[{i}]", "expected a call: a dict of keyword arguments, a tuple of positional "
                                                f"arguments or (args, kwargs); got a {type(call).__name__}")
