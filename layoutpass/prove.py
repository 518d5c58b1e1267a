"""The proof that a captured graph computes the same thing whatever memory order its pools have.

A pool keeps its shape when it moves, only its strides change. Every aten op reads and writes
logical indices, so two runs of one graph whose inputs differ only in strides compute the same
values, except where the strides decide something else:
- which op results are views and which are copies (reshape, contiguous, flatten: a copy in one
  order, a view in the other), which matters when anything writes through either side;
- whether a view can be taken at all (`view` across axes that are no longer adjacent in memory);
- ops that read memory order itself (as_strided, set_);
- ops whose code the pass cannot see (the model's own custom ops, higher-order ops), which may
  assume their inputs' strides;
- Python code that read strides while the graph was traced (checked in capture.py).
The graph's nodes are run a second time on fake tensors with the pools in the other order, and
each node's aliasing, success and opaque inputs are compared with the first run. Reductions may
still round differently in the last bit (a sum follows memory order); everything else is exact."""

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch.utils import _pytree as pytree

from .errors import LayoutPassError
from .report import source_line

aten = torch.ops.aten

# Ops that read or set memory order rather than logical indices.
STRIDED = frozenset({aten.as_strided.default, aten.as_strided_.default, aten.as_strided_scatter.default,
                     aten.set_.source_Tensor, aten.set_.source_Storage, aten.set_.source_Storage_storage_offset,
                     aten._unsafe_view.default, aten._reshape_alias.default})

# Namespaces of ops known to compute on logical indices whatever their inputs' strides.
LOGICAL_NAMESPACES = {"aten", "prims", "layoutpass", "lp_examples"}
_stride_agnostic: set = set()


def register_stride_agnostic(op) -> None:
    """Declare a custom op (an OpOverloadPacket or OpOverload) correct for inputs of any strides,
    so a relayouted pool may reach it."""
    _stride_agnostic.add(op)


class StrideDependent(LayoutPassError):
    """A graph whose result could depend on a pool's memory order; names the node and line."""


def _agnostic(target) -> bool:
    if isinstance(target, torch._ops.OpOverload):
        return (target.namespace in LOGICAL_NAMESPACES and target not in STRIDED) or target in _stride_agnostic \
            or target.overloadpacket in _stride_agnostic
    return not isinstance(target, torch._ops.HigherOrderOperator)  # operator.getitem, sym arithmetic


def prove(gm: torch.fx.GraphModule, other: dict[str, tuple], pools: dict[str, str], where: str, layout: str) -> None:
    """`other`: placeholder name -> the strides it would have in the other order (the graph's
    own meta holds the order it was traced in); `pools`: placeholder name -> pool name. Raises
    StrideDependent naming the first node whose result could differ."""
    placeholders = {n.name: n for n in gm.graph.find_nodes(op="placeholder")}
    changed = {placeholders[name]: tuple(strides) for name, strides in other.items()
               if tuple(placeholders[name].meta["val"].stride()) != tuple(strides)}
    if not changed:
        return
    pool = ", ".join(sorted({pools.get(p.name, p.name) for p in changed}))
    env, errors = _second_run(gm, changed)
    for node in gm.graph.nodes:
        if node.op != "call_function" or not any(a in env for a in node.all_input_nodes if a in _touched(env, errors)):
            continue
        what = f"{node.target} at {source_line(node)} in {where}"
        if node in errors:
            raise StrideDependent(f"{what} cannot run with {pool} stored {layout}: {errors[node]}")
        if not _strides_differ(node, env):
            continue
        if node.target in STRIDED:
            raise StrideDependent(f"{what} reads memory order on a tensor whose strides follow {pool}: refused")
        if not _agnostic(node.target):
            raise StrideDependent(f"{what} is an op the pass cannot see into and would receive {pool} (or a tensor "
                                  f"derived from it) with other strides; if it is correct for any strides, declare it "
                                  f"with layoutpass.register_stride_agnostic(...)")
        shared = _alias_changes(node, env)
        if shared and _written_while_shared(node, shared):
            raise StrideDependent(f"{what} makes a copy in one order and a view in the other of a tensor written "
                                  f"through afterwards ({pool} stored {layout}): the write would be lost or leak")


def _touched(env: dict, errors: dict) -> set:
    return set(env) | set(errors)


def _second_run(gm: torch.fx.GraphModule, changed: dict[torch.fx.Node, tuple]) -> tuple[dict, dict]:
    """The graph run again on fake tensors with the `changed` placeholders in their other
    strides: (node -> value, node -> error) for the nodes that read them, directly or not (the
    others keep their traced values)."""
    mode = detect_fake_mode([n.meta["val"] for n in gm.graph.find_nodes(op="placeholder") if "val" in n.meta])
    env, errors, values = {}, {}, {}
    with mode, torch.no_grad():
        for node in gm.graph.nodes:
            if node in changed:
                val = node.meta["val"]
                env[node] = values[node] = torch.empty_strided(val.shape, changed[node], dtype=val.dtype,
                                                               device=val.device)
            elif node.op == "call_function" and any(a in env for a in node.all_input_nodes):
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs),
                                                     lambda a: env[a] if a in env else a.meta.get("val"))
                try:
                    env[node] = node.target(*args, **kwargs)
                except Exception as err:  # a view this order cannot give, and the like
                    errors[node] = str(err).strip().splitlines()[0][:200]
    return env, errors


def _tensors(value) -> list:
    return [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def _strides_differ(node: torch.fx.Node, env: dict) -> bool:
    """Whether a tensor the node reads has other strides in the second run."""
    for a in node.all_input_nodes:
        if a in env:
            first, second = _tensors(a.meta.get("val")), _tensors(env[a])
            if len(first) != len(second) or any(x.stride() != y.stride() for x, y in zip(first, second)):
                return True
    return False


def _alias_changes(node: torch.fx.Node, env: dict) -> list[torch.fx.Node]:
    """The tensor inputs whose storage the node's result shares in one run and not the other."""
    out = []
    for a in node.all_input_nodes:
        x0, x1 = a.meta.get("val"), env.get(a, a.meta.get("val"))
        if not isinstance(x0, torch.Tensor) or not isinstance(x1, torch.Tensor):
            continue
        before = any(torch._C._is_alias_of(t, x0) for t in _tensors(node.meta.get("val")))
        after = any(torch._C._is_alias_of(t, x1) for t in _tensors(env.get(node)))
        if before != after:
            out.append(a)
    return out


def _written_while_shared(node: torch.fx.Node, inputs: list[torch.fx.Node]) -> bool:
    """Whether anything writes, after `node`, into its result or into the inputs it shares
    storage with in one of the runs (a conservative reading: any later write to either)."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    family = _aliases(node) | {m for a in inputs for m in _aliases(_root(a))}
    return any(order[n] > order[node] and _mutates(n) and any(a in family for a in _mutated_args(n))
               for n in node.graph.nodes)


def _root(node: torch.fx.Node) -> torch.fx.Node:
    """The node a chain of views starts from."""
    while node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node):
        val, src = node.meta.get("val"), node.args[0].meta.get("val")
        if not (isinstance(val, torch.Tensor) and isinstance(src, torch.Tensor) and torch._C._is_alias_of(val, src)):
            break
        node = node.args[0]
    return node


def _aliases(node: torch.fx.Node) -> set:
    """node and every node whose value is a view of it (through view chains)."""
    found, stack = {node}, [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            val, src = u.meta.get("val"), n.meta.get("val")
            if u not in found and any(torch._C._is_alias_of(v, src) for v in _tensors(val)) \
                    and isinstance(src, torch.Tensor):
                found.add(u)
                stack.append(u)
    return found


def _mutates(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _mutated_args(node: torch.fx.Node) -> list:
    schema = node.target._schema
    out = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            out += [v for v in pytree.tree_leaves(value) if isinstance(v, torch.fx.Node)]
    return out
