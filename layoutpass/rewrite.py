"""The rewrite engine: one fixed-point driver (graph_rewrite) that runs the rules as data -- the
rules that sink a relayouted pool's storage permutation through every use (each op's `sink` in
the op registry, rewrites/permutes.py), and the lowerings of pure-torch conv updates
(lowering.LOWERINGS). tinygrad's graph_rewrite, on an FX graph."""

from collections import deque

import torch
import torch.fx

from layoutpass.rewrites.permutes import copied

from .errors import LayoutPassError
from .registry import Memory, conv_state, facts
from .report import Action, Kind, Use, source_line, use

aten = torch.ops.aten


class RefusedRewrite(LayoutPassError):
    """A use of a pool depends on its memory order; the message names node, rule and line."""


class Rewriter:
    """Inserts nodes before the use being rewritten; remembers the pending permutations."""

    def __init__(self, graph: torch.fx.Graph, pool: str):
        self.graph, self.pool = graph, pool
        self.created: list[torch.fx.Node] = []  # pending permutations made by the current rule
        self.anchor: torch.fx.Node | None = None

    def call(self, target, args, kwargs=None, *, rank: int) -> torch.fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, tuple(args), dict(kwargs or {}))
        node.meta["lp_rank"] = rank
        node.meta["stack_trace"] = self.anchor.meta.get("stack_trace")
        return node

    def pending(self, x: torch.fx.Node, perm: tuple[int, ...]) -> torch.fx.Node:
        node = self.call(aten.permute.default, (x, list(perm)), rank=len(perm))
        node.meta["lp_pool"] = self.pool
        self.created.append(node)
        return node

    def adjust(self, operand, perm: tuple[int, ...]):
        """`operand` permuted by perm to meet a rewritten use. A pool value's pending permutation
        absorbs it (and may cancel); any other operand gets a plain permute, left alone."""
        if isinstance(operand, torch.fx.Node) and operand.target is aten.permute.default and "lp_pool" in operand.meta:
            inner = tuple(operand.args[1])
            return self.pending(operand.args[0], tuple(inner[i] for i in perm))
        return self.call(aten.permute.default, (operand, list(perm)), rank=len(perm))

    @staticmethod
    def rank(node) -> int:
        if not isinstance(node, torch.fx.Node):
            return 0
        if "val" in node.meta:  # a tensor, or a number (a SymInt from a size: rank 0)
            return node.meta["val"].dim() if hasattr(node.meta["val"], "dim") else 0
        return node.meta["lp_rank"]


def graph_rewrite(graph: torch.fx.Graph, nodes, step) -> None:
    """The one driver: visit `nodes` in order; `step(node)` applies whatever rule of its table
    matches and returns the nodes a rewrite made that need a visit, until none is left."""
    work = deque(nodes)
    while work:
        node = work.popleft()
        if not node._erased and node.graph is graph:
            work.extend(step(node))


def relayout_graph(gm: torch.fx.GraphModule, pools: dict[torch.fx.Node, tuple[str, tuple[int, ...]]],
                   entry: str) -> list[Use]:
    """pools: storage node (a placeholder, or a view of one) -> (pool name, p) where
    permute(storage, p) has the order the graph reads. Each pool enters as that pending
    permutation; the ops' sink rules move it below every use. Returns what was done to each use; raises
    RefusedRewrite before the caller moves anything."""
    graph, uses = gm.graph, []
    last_placeholder = list(graph.find_nodes(op="placeholder"))[-1]
    for placeholder, (name, perm) in pools.items():
        rewriter = Rewriter(graph, name)
        rewriter.anchor = (last_placeholder if placeholder.op == "placeholder" else placeholder).next
        view = rewriter.pending(placeholder, perm)
        view.meta["val"] = placeholder.meta["val"]
        placeholder.replace_all_uses_with(view, delete_user_cb=lambda user: user is not view)
        graph_rewrite(graph, [view], lambda q: _sink(rewriter, q, uses, entry))
    gm.recompile()
    return uses


def _sink(r: Rewriter, q: torch.fx.Node, uses: list[Use], entry: str) -> list[torch.fx.Node]:
    """Move the pending permutation q below each of its users (their sink rules), or keep the
    user reading it; a permutation that became the identity goes. Returns the new pending
    permutations."""
    graph, x, p = q.graph, q.args[0], tuple(q.args[1])
    r.created = []
    if p == tuple(range(len(p))):
        _keep_copies(r, q, x)
        q.replace_all_uses_with(x)
        graph.erase_node(q)
        return []
    for user in list(q.users):
        op = facts(user.target)
        r.anchor = user
        new = op.sink(r, user, q, x, p) if op.sink else None
        if new is not None:
            new.meta.setdefault("val", user.meta.get("val"))  # same value, in the old order
            uses.append(use(entry, r.pool, user, op.kind,
                            Action.FOLDED if op.kind is Kind.PERMUTATION else Action.REMAPPED))
            user.replace_all_uses_with(new)
            graph.erase_node(user)
        else:
            _keep(r, user, q, uses, entry)
    if not q.users:
        graph.erase_node(q)
    return r.created


def _keep_copies(r: Rewriter, q: torch.fx.Node, x: torch.fx.Node) -> None:
    """A permutation that cancelled leaves its users the storage itself: a contiguous() or
    reshape() that copied the model's permuted view would now alias the pool; make it copy."""
    for user in list(q.users):
        if Memory.MAYBE_COPY in facts(user.target).memory and copied(user, q):
            r.anchor = user
            user.replace_input_with(q, r.call(aten.clone.default, (x,), {"memory_format": torch.contiguous_format},
                                              rank=r.rank(q)))


def _keep(r: Rewriter, user: torch.fx.Node, q: torch.fx.Node, uses: list[Use], entry: str) -> None:
    """A use that reads the permuted view as it is: correct for every op that reads logical
    indices (a conv kernel takes any strides). An op that reads memory order gets a copy in the
    old order when nothing writes through its result; otherwise it is refused."""
    if Memory.ORDER in facts(user.target).memory:
        if _written_through(user):
            uses.append(use(entry, r.pool, user, Kind.MEMORY, Action.REFUSED))
            raise RefusedRewrite(
                f"pool {r.pool!r}: node {user.name} ({user.target}) depends on the pool's memory order and is "
                f"written through, so it cannot be remapped (rule: memory-order refusal), at {source_line(user)}")
        r.anchor = user
        copy = r.call(aten.clone.default, (q,), {"memory_format": torch.contiguous_format}, rank=r.rank(q))
        user.replace_input_with(q, copy)
        uses.append(use(entry, r.pool, user, Kind.MEMORY, Action.MATERIALIZED, "reads a copy in the old order"))
    elif user.op == "output":
        uses.append(use(entry, r.pool, user, Kind.MEMORY, Action.KEPT, "returned through a permuted view"))
    elif conv_state(user.target) is None:  # conv ops are reported once the graph is final
        uses.append(use(entry, r.pool, user, Kind.AGNOSTIC, Action.KEPT, "reads the pool through a permuted view"))


def _written_through(node: torch.fx.Node) -> bool:
    """Whether an in-place op or an op that mutates an argument reaches node's value through
    its views (a copy would lose those writes)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            schema = getattr(user.target, "_schema", None)
            if schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
                return True
            val = user.meta.get("val")
            if isinstance(val, torch.Tensor) and isinstance(n.meta.get("val"), torch.Tensor) \
                    and torch._C._is_alias_of(val, n.meta["val"]):
                stack.append(user)
    return False
