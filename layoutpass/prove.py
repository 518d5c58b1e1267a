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
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils import _pytree as pytree

from .errors import LayoutPassError
from .registry import Memory, Rows, facts, pointwise
from .report import source_line

aten = torch.ops.aten

# Namespaces of ops known to compute on logical indices whatever their inputs' strides.
LOGICAL_NAMESPACES = {"aten", "prims", "layoutpass"}


class StrideDependent(LayoutPassError):
    """A graph whose result could depend on a pool's memory order; names the node and line."""


def _agnostic(target) -> bool:
    if isinstance(target, torch._ops.OpOverload):
        return (target.namespace in LOGICAL_NAMESPACES and Memory.STRIDED not in facts(target).memory) or \
            facts(target).stride_agnostic or facts(target.overloadpacket).stride_agnostic
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
        if Memory.STRIDED in facts(node.target).memory:
            raise StrideDependent(f"{what} reads memory order on a tensor whose strides follow {pool}: refused")
        if not _agnostic(node.target):
            raise StrideDependent(f"{what} is an op the pass cannot see into and would receive {pool} (or a tensor "
                                  f"derived from it) with other strides; if it is correct for any strides, declare it "
                                  f"with layoutpass.register_stride_agnostic(...)")
        shared = _alias_changes(node, env)
        if shared and _written_while_shared(node, shared):
            raise StrideDependent(f"{what} makes a copy in one order and a view in the other of a tensor written "
                                  f"through afterwards ({pool} stored {layout}): the write would be lost or leak")


def refuse_returned_views(gm: torch.fx.GraphModule, pools: dict[str, str], where: str) -> None:
    """A view of a pool handed to the caller keeps the strides it was made with: once the pool
    moves (in its own memory) the caller's view would read the bytes in the new order. The pool
    itself may be returned (it moves with its object)."""
    placeholders = {n.name: n for n in gm.graph.find_nodes(op="placeholder") if n.name in pools}
    (output,) = gm.graph.find_nodes(op="output")
    for leaf in pytree.tree_leaves(output.args):
        if not isinstance(leaf, torch.fx.Node) or leaf.op == "placeholder":
            continue
        val = leaf.meta.get("val")
        for name, ph in placeholders.items():
            if isinstance(val, torch.Tensor) and torch._C._is_alias_of(val, ph.meta["val"]):
                raise StrideDependent(f"{where} returns a view of {pools[name]} ({leaf.target} at {source_line(leaf)}): "
                                      f"the caller's view would read {pools[name]} in its old order after it moves")


def _touched(env: dict, errors: dict) -> set:
    return set(env) | set(errors)


def _second_run(gm: torch.fx.GraphModule, changed: dict[torch.fx.Node, tuple]) -> tuple[dict, dict]:
    """The graph run again on fake tensors with the `changed` placeholders in their other
    strides: (node -> value, node -> error) for the nodes that read them, directly or not (the
    others keep their traced values)."""
    mode = fake_mode_of(gm)
    env, errors, values = {}, {}, {}
    # the graph's own mode, not the capture running now; the Python dispatcher, as when the graph
    # was traced: composite ops (aten.linear in torch 2.11) run their symbolic-shape decompositions
    with unset_fake_temporarily(), mode, torch.no_grad(), enable_python_dispatcher():
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


def fake_mode_of(gm: torch.fx.GraphModule):
    """The fake mode a graph's metadata lives in (not the tracing context's, which may be
    another capture's)."""
    for n in gm.graph.find_nodes(op="placeholder"):
        if isinstance(n.meta.get("val"), FakeTensor):
            return n.meta["val"].fake_mode
    return detect_fake_mode()


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
    family = _views_of(node) | {m for a in inputs for m in _views_of(_root(a))}
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


def _views_of(node: torch.fx.Node) -> set:
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


def check_slotwise(gm: torch.fx.GraphModule, containers: dict[str, str], where: str) -> None:
    """A container (a raw allocation whose slot rows hold a moved pool) may only be used slot
    by slot: its rows indexed, copied, reset or scaled whole (elementwise with per-slot or scalar
    operands). Anything that reads its bytes as some layout would see the pool's new order:
    refused, naming the op and line."""
    for name, pool in containers.items():
        node = next(n for n in gm.graph.find_nodes(op="placeholder") if n.name == name)
        row = tuple(node.meta["val"].shape[1:])
        rows, stack = {node}, [node]  # every value with the container's rows (reached through any op)
        while stack:
            for user in stack.pop().users:
                if user not in rows and user.op == "call_function" and isinstance(user.meta.get("val"), torch.Tensor):
                    rows.add(user)
                    stack.append(user)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for n in sorted(rows, key=order.get):  # the first offending use in the graph's order
            for user in sorted(n.users, key=order.get):
                if not _keeps_rows(user, n, rows, row):
                    what = "returned" if user.op == "output" else f"{user.target} at {source_line(user)}"
                    raise StrideDependent(f"{name} holds {pool}, which moves: {what} in {where} reads its bytes other "
                                          f"than as whole slot rows, and would see them in the pool's new order")


def _keeps_rows(user: torch.fx.Node, n: torch.fx.Node, rows: set, row: tuple) -> bool:
    """Whether `user`, reading the row-structured value `n`, keeps every slot row whole (a copy
    or view of rows keeps them when its output ends in the row's shape: reshapes of the leading
    dims only)."""
    val = user.meta.get("val")
    if user.op != "call_function":
        return False
    whole = isinstance(val, torch.Tensor) and tuple(val.shape[max(val.dim() - len(row), 0):]) == row
    role = facts(user.target).rows
    if role is Rows.INDEX:
        indexed = user.args[1] if user.target is aten.index.Tensor else None
        dim0 = user.args[1] % n.meta["val"].dim() == 0 if user.target is not aten.index.Tensor else \
            all(i is None for i in indexed[1:])
        return user.args[0] is n and dim0 and whole
    if role is Rows.COPY:
        return whole
    if role is Rows.WRITE or pointwise(user.target):
        return whole and all(a in rows or _per_slot(a, row) for a in _tensor_args(user))
    return False


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, torch.fx.Node)
            and isinstance(a.meta.get("val"), torch.Tensor)]


def _per_slot(a: torch.fx.Node, row: tuple) -> bool:
    """An operand that is the same for every element of a slot's row (a scalar, or size 1 over the row)."""
    val = a.meta["val"]
    trailing = tuple(val.shape[max(val.dim() - len(row), 0):])
    return all(s == 1 for s in trailing) or val.dtype in (torch.int32, torch.int64, torch.bool) and val.dim() <= 1
