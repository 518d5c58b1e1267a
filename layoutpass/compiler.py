"""The compiler: what happens to one graph Dynamo captured of a unit (a layer kind, or the whole
model), from its inputs to the graph that runs. PASSES is the whole list, in order; each pass
reads and extends one Build record and names what it requires and ensures.

A pool moves only after the call that found it has returned (Dynamo checks its guards on the
frame it compiled), so a graph is proven for the order its pools are in when it is captured and
for the order they will be stored in; the next call captures again for the new strides."""

import time
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.utils import _pytree as pytree

from layoutpass.rewrites.permutes import inverse

from .capture import Input, describe_inputs, stride_reads, to_aten, traced_code
from .discover import Found, PoolNotFound, discover
from .errors import LayoutPassError
from .layout import DS, Layout, arrange, dense_strides, order_of
from .lowering import lower_updates
from .lowering_recurrent import AXES as RECURRENT_AXES
from .prove import StrideDependent, check_slotwise, fake_mode_of, prove, refuse_returned_views
from .registry import KERNEL_ORDER, Memory, conv_state, facts, permutation_of
from .report import Action, Considered, Kind, Pool, Use, library, use
from .rewrite import relayout_graph
from .verify import UnprovenRewrite, verify

aten = torch.ops.aten


@dataclass
class Build:
    """One captured graph on its way to running: what every pass reads and adds to."""

    session: object  # runtime.Session: options, known pools, the unit call running
    unit: object  # runtime.Unit
    instance: str  # the unit's instance (module path) the capture ran on
    dynamo: torch.fx.GraphModule  # Dynamo's graph (torch IR)
    example_inputs: list
    name: str = ""
    inputs: list[Input] = field(default_factory=list)
    captured: torch.fx.GraphModule | None = None  # aten, as the model computes it (the check's reference)
    gm: torch.fx.GraphModule | None = None  # the graph being rewritten
    candidates: dict[str, tuple[str, tuple]] = field(default_factory=dict)  # placeholder -> (local name, shape)
    pools: dict[str, Pool] = field(default_factory=dict)  # placeholder -> pool (known or found now)
    found: dict[str, Pool] = field(default_factory=dict)  # local name -> pool found by this graph
    considered: dict[str, Considered] = field(default_factory=dict)
    kernel_views: dict[torch.fx.Node, str] = field(default_factory=dict)  # (slot, dim, tok) view -> pool name
    stride_reads: list[str] = field(default_factory=list)  # the model's Python reads of memory order while traced
    uses: list[Use] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _capture(b: Build) -> None:
    b.stride_reads = stride_reads(traced_code(), library())
    b.inputs = describe_inputs(b.dynamo)
    b.captured = to_aten(b.dynamo, b.example_inputs, b.inputs)
    b.gm = _copy(b.captured)
    shapes = [list(i.tensor.shape) for i in b.inputs if i.kind == "argument" and isinstance(i.tensor, torch.Tensor)]
    b.name = f"{b.unit.label}.graph{b.unit.count}({', '.join(map(str, shapes))})"
    b.unit.count += 1


def _identify(b: Build) -> None:
    """Each state tensor or argument of rank >= 3: a pool already known (by its name in the
    unit, or as the same view of a pool's memory), else a candidate for discovery."""
    whole = b.unit.paths == [""]  # a layer's arguments are activations; a model's may be engine-owned pools
    for i in b.inputs:
        if i.kind not in ("state", "argument") or not isinstance(i.tensor, torch.Tensor) or i.tensor.dim() < 3 or \
                (i.kind == "argument" and not whole):
            continue
        local = i.path if i.kind == "state" else f"argument {i.path}"
        known = b.unit.pools.get(local) or b.session.pool_of(i.tensor)
        if known is not None:
            b.pools[i.name] = known
        else:
            b.candidates[i.name] = (local, tuple(i.tensor.shape))


def _discover(b: Build) -> None:
    """New pools, by what the graph does with them; the report's verdict on every candidate."""
    if not b.candidates:
        return
    found, considered = discover(b.captured.graph, b.candidates, b.session.named_for(b.unit))
    b.considered.update(considered)
    tensors = {i.name: i.tensor for i in b.inputs}
    for placeholder, (local, shape) in b.candidates.items():
        if local in found:
            pool = _new_pool(b, local, found[local], tensors[placeholder])
            b.pools[placeholder], b.found[local] = pool, pool


def _new_pool(b: Build, local: str, found: Found, tensor: torch.Tensor) -> Pool:
    source = order_of(found.axes, tuple(tensor.shape), tuple(tensor.stride()))
    if source is None:
        raise PoolNotFound(f"pool {local!r} {tuple(tensor.shape)} has strides {tuple(tensor.stride())}: its slots are "
                           "not dense blocks, so the pass cannot store it in another order")
    request = None if b.session.reverted else b.session.options.layouts.get(found.kind)
    target = arrange(found.axes, request) if request is not None else source
    argument = local.startswith("argument ")
    name = local.removeprefix("argument ") if argument else b.session.qualified(b.instance, local)
    return Pool(name, found.kind, found.axes, tuple(tensor.shape), source, target, found.evidence, argument)


def _prove(b: Build) -> None:
    """The graph computes the same for the order each pool is in and the order it is compared
    with: the model's own (a pool already moved), or the one it is about to move to."""
    other, changed = {}, []
    for placeholder, pool in b.pools.items():
        val = next(n for n in b.captured.graph.find_nodes(op="placeholder") if n.name == placeholder).meta["val"]
        slot = pool.axes.axes.index("slot")
        now = order_of(pool.axes, tuple(val.shape), tuple(val.stride()))
        compare = pool.source if now != pool.source else pool.target
        if compare != now:
            other[placeholder] = dense_strides(pool.axes, compare, tuple(val.shape), val.stride(slot))
            changed.append(pool)
    if not other:
        return
    prove_build(b, other, changed)


def _prove_containers(b: Build) -> None:
    """Raw allocations the graph takes that hold a pool that moves (or moved) are used slot by
    slot only."""
    containers = b.session.containers_among(b.inputs, b.found)
    if containers:
        check_slotwise(b.captured, containers, b.name)


def prove_build(b: Build, other: dict[str, tuple], changed: list[Pool]) -> None:
    """b's captured graph, with the placeholders of `other` in those strides: the same values,
    and no Python read of memory order while it was traced."""
    names = {p: pool.name for p, pool in b.pools.items()}
    layouts = ", ".join(sorted({f"{p.source} and {p.target}" for p in changed}))
    prove(b.captured, other, names, b.name, layouts)
    refuse_returned_views(b.captured, {p: names[p] for p in other}, b.name)
    if b.stride_reads:
        raise StrideDependent(f"{b.name}: the model's Python reads memory order ({'; '.join(b.stride_reads[:3])}); "
                              f"with {', '.join(p.name for p in changed)} stored {layouts} it could branch "
                              f"differently, which no graph shows")


def _canonicalize(b: Build) -> None:
    """Where conv updates may be lowered: every use of a conv pool stored DS is rewritten onto
    its (slot, dim, tok) view (the model's own transposes cancel against it) and proven by the
    formulas of layoutpass.semantics. The captured graph is already proven for any order, so a
    rewrite that cannot be proven is dropped (the graph runs as captured, unlowered) and the
    report says why. Done once the pool is stored DS (the graph the later calls run)."""
    if not b.session.lowering(b.gm):
        return
    kernel = Layout(KERNEL_ORDER)
    placeholders = {n.name: n for n in b.gm.graph.find_nodes(op="placeholder")}
    chosen = {ph: pool for ph, pool in b.pools.items() if pool.kind == "conv" and pool.target.axes[-2:] == DS.axes[-2:]
              and _order_now(placeholders[ph], pool) == pool.target}
    if not chosen:
        return
    graph, uses = b.gm.graph, []
    anchor = list(placeholders.values())[-1].next
    views = {}
    for ph, pool in chosen.items():
        node = placeholders[ph]
        perm = pool.axes.permutation(kernel)
        with graph.inserting_before(anchor):
            view = graph.call_function(aten.permute.default, (node, list(perm)))
        view.meta["val"] = node.meta["val"].permute(perm)
        node.replace_all_uses_with(view, delete_user_cb=lambda u, v=view: u is not v)
        views[view] = (pool.name, inverse(perm))
    try:
        uses = relayout_graph(b.gm, views, b.name)
        try:
            _refresh_meta(b.gm, set(views))
        except Exception as err:  # a rule built a graph torch cannot even run on fake tensors
            raise UnprovenRewrite(f"the rewrite of {b.name} does not typecheck: {str(err).splitlines()[0]}") from err
        # only the rewritten pools are read as pools: every other one holds the same memory order
        # in both graphs, so it is checked like any other buffer (an unmodeled write to it gives
        # both graphs the same fresh contents, named by the writer, instead of unknown ones)
        rewritten = {ph: (pool.name, pool.axes) for ph, pool in chosen.items()}
        verify(b.captured.graph, b.gm.graph, rewritten, rewritten, b.name)
    except LayoutPassError as err:
        b.gm = _copy(b.captured)
        for pool in chosen.values():
            b.uses.append(Use(b.name, pool.name, "(the graph)", Kind.KERNEL, Action.NOT_LOWERED,
                              f"the rewrite onto the kernel order could not be proven, so the graph runs as captured: "
                              f"{str(err).splitlines()[0][:300]}", "<the graph>"))
        return
    b.uses += uses
    b.kernel_views.update({view: name for view, (name, _) in views.items()})


def _order_now(node: torch.fx.Node, pool: Pool) -> Layout | None:
    val = node.meta["val"]
    return order_of(pool.axes, tuple(val.shape), tuple(val.stride()))


def _classify(b: Build) -> None:
    """Every use of a pool in the captured graph, by class (what the pass knows about its op),
    with what the pool's memory order means for it; the rewritten graph reports its own."""
    if b.kernel_views:
        return
    for placeholder, pool in b.pools.items():
        node = next(n for n in b.captured.graph.find_nodes(op="placeholder") if n.name == placeholder)
        for user in _pool_users(node):
            if conv_state(user.target) is not None or user.op != "call_function":
                continue  # conv ops are reported from the final graph
            op = facts(user.target)
            kind = op.kind or (Kind.MEMORY if Memory.ORDER in op.memory else Kind.AGNOSTIC)
            if kind is Kind.PERMUTATION:
                action, detail = (Action.FOLDED, f"a free view that walks the pool's {pool.target} order densely") \
                    if _dense_in(user, pool) else (Action.KEPT, "a free view")
            elif kind is Kind.MEMORY or Memory.MAYBE_COPY in op.memory:
                kind, action, detail = Kind.MEMORY, Action.PROVEN, "same values in either order"
            else:
                action, detail = Action.LOGICAL, ""
            b.uses.append(use(b.name, pool.name, user, kind, action, detail))


def _pool_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes reading `node` or a view of it (through chains of views)."""
    found, stack, seen = [], [node], {node}
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            found.append(u)
            val, src = u.meta.get("val"), n.meta.get("val")
            if isinstance(val, torch.Tensor) and isinstance(src, torch.Tensor) and torch._C._is_alias_of(val, src):
                stack.append(u)
    return found


def _dense_in(user: torch.fx.Node, pool: Pool) -> bool:
    """Whether a permutation of the pool itself walks memory in order once the pool is stored
    in its target order (the model's transpose then only undid the storage order)."""
    if user.args[0].op != "placeholder":
        return False
    strides = dense_strides(pool.axes, pool.target, pool.shape)
    permuted = [strides[p] for p in permutation_of(user)]
    return permuted == sorted(permuted, reverse=True)


def _lower(b: Build) -> None:
    states = {n: (pool.name, pool.axes.axes) for n in b.gm.graph.find_nodes(op="placeholder")
              if (pool := b.pools.get(n.name)) is not None and pool.kind == "recurrent"
              and pool.axes.axes[0] == "slot" and set(pool.axes.axes) == RECURRENT_AXES}
    if b.kernel_views or (states and b.session.lowering(b.gm)):
        b.uses += lower_updates(b.gm, b.name, dict(b.kernel_views), states, _autograd_records(b))


def _autograd_records(b: Build) -> str | None:
    """Why autograd may record this graph (the kernels have no backward, so a lowered update
    would drop gradients the model's own code computes): grad mode on at the capture (Dynamo
    guards it, so a call with grad mode off captures anew) or turned on inside the graph, and
    a tensor input that requires grad. None when it cannot record."""
    enabled = torch.is_grad_enabled() or any(n.target is torch._C._set_grad_enabled and n.args[0]
                                             for n in b.captured.graph.nodes)
    needs = [i.path for i in b.inputs if isinstance(i.tensor, torch.Tensor) and i.tensor.requires_grad]
    if not (enabled and needs):
        return None
    names = ", ".join(needs[:2]) + (f" and {len(needs) - 2} more" if len(needs) > 2 else "")
    return (f"autograd records this call (grad mode is on; {names} require{'s' if len(needs) == 1 else ''} grad) "
            f"and the kernels have no backward: the update runs as written (call under torch.no_grad() or "
            f"torch.inference_mode() to lower it)")


def _report_kernels(b: Build) -> None:
    """Every conv op on a pool, and the memory order its kernel reads."""
    names = {ph: pool for ph, pool in b.pools.items()}
    for op in b.gm.graph.nodes:
        argument = conv_state(op.target)
        if argument is None:
            continue
        state, views = op.args[argument], 0
        while state.op == "call_function" and facts(state.target).permutation is not None:
            state, views = state.args[0], views + 1
        pool = names.get(state.name) if state.op == "placeholder" else None
        if pool is not None:
            val = op.args[argument].meta.get("val")
            order = "DS" if val is not None and val.stride(-1) == 1 else "SD"
            b.uses.append(use(b.name, pool.name, op, Kind.KERNEL, Action.KERNEL_DIRECT,
                              f"{order} kernel on the pool's (slot, dim, tok) view"))


@dataclass(frozen=True)
class Pass:
    name: str
    run: object
    requires: tuple[str, ...]
    ensures: tuple[str, ...]


PASSES = [
    Pass("capture", _capture, ("Dynamo's graph",), ("an aten graph, inputs named after their sources",)),
    Pass("identify", _identify, ("inputs",), ("known pools", "candidates")),
    Pass("discover", _discover, ("candidates",), ("new pools, their axes and evidence",)),
    Pass("prove", _prove, ("pools",), ("the same values in the model's order and the pools' orders",)),
    Pass("containers", _prove_containers, ("pools", "inputs"), ("raw allocations holding moved pools used slot-wise",)),
    Pass("canonicalize", _canonicalize, ("pools",), ("conv pools read through their (slot, dim, tok) views",
                                                     "the rewrite proven equal to the captured graph")),
    Pass("lower", _lower, ("kernel views", "recurrent pools"),
         ("pure-torch conv updates and recurrences replaced by kernel calls",)),
    Pass("classify", _classify, ("pools",), ("every use of a pool in the report, by class",)),
    Pass("report", _report_kernels, ("the final graph",), ("every conv op's kernel order in the report",)),
]


def compile_graph(b: Build) -> Build:
    """Run every pass on one capture; raises LayoutPassError before anything moved."""
    for p in PASSES:
        start = time.perf_counter()
        p.run(b)
        b.seconds[p.name] = time.perf_counter() - start
    b.gm.recompile()
    return b


REWRITES = ("canonicalize", "lower", "classify", "report")  # the passes that build the graph that runs


def rebuild(b: Build) -> None:
    """The graph that runs, built again from the captured one: pools a later graph found are
    now among b.pools (a captured graph is rewritten for every pool it takes)."""
    b.gm, b.uses, b.kernel_views = _copy(b.captured), [], {}
    for p in PASSES:
        if p.name in REWRITES:
            p.run(b)
    b.gm.recompile()


def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A graph to rewrite (the captured one stays as it was: the reference the check reads);
    node metadata is shared, not copied."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return torch.fx.GraphModule(gm, graph)


def _refresh_meta(gm: torch.fx.GraphModule, changed: set = frozenset()) -> None:
    """Fake values for the nodes a rewrite made (they have none) and for what reads them or the
    `changed` nodes (whose values were replaced)."""
    mode = fake_mode_of(gm)
    forced, changed = set(changed), set(changed)
    with mode, torch.no_grad():
        for node in gm.graph.nodes:
            if node.op != "call_function" or node in forced or \
                    ("val" in node.meta and not changed.intersection(node.all_input_nodes)):
                continue
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta.get("val"))
            value = node.target(*args, **kwargs)
            old = node.meta.get("val")
            if isinstance(old, torch.Tensor) and isinstance(value, torch.Tensor) and _same_meta(old, value) and \
                    not any(isinstance(a, torch.Tensor) and torch._C._is_alias_of(value, a)
                            for a in pytree.tree_leaves((args, kwargs))):
                continue
            node.meta["val"] = value
            changed.add(node)


def _same_meta(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape, a.stride(), a.dtype, a.storage_offset()) == (b.shape, b.stride(), b.dtype, b.storage_offset())
