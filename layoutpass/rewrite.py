"""The rewrite engine: relayout pool placeholders and run rewrites/permutes.RULES to a fixed
point (tinygrad's graph_rewrite, on an FX graph)."""

import torch
import torch.fx

from layoutpass.rewrites.permutes import MEMORY_ORDER, RULES

from .discover import STATE_ARGUMENT
from .errors import LayoutPassError
from .report import MEMORY, Report, source_line

aten = torch.ops.aten
KERNELS = set(STATE_ARGUMENT)


class RefusedRewrite(LayoutPassError):
    """A use of a pool depends on its memory order; the message names node, rule and line."""


class Rewriter:
    """Inserts nodes before the use being rewritten; remembers the pending permutations."""

    def __init__(self, graph: torch.fx.Graph, pool: str):
        self.graph, self.pool = graph, pool
        self.worklist: list[torch.fx.Node] = []
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
        self.worklist.append(node)
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
        if "val" in node.meta and hasattr(node.meta["val"], "dim"):
            return node.meta["val"].dim()
        return node.meta["lp_rank"]


def relayout_graph(gm: torch.fx.GraphModule, pools: dict[torch.fx.Node, tuple[str, tuple[int, ...]]],
                   report: Report, entry: str) -> None:
    """pools: placeholder -> (pool name, p) where permute(new storage, p) has the old order."""
    graph = gm.graph
    last_placeholder = list(graph.find_nodes(op="placeholder"))[-1]
    for placeholder, (name, perm) in pools.items():
        rewriter = Rewriter(graph, name)
        rewriter.anchor = last_placeholder.next
        view = rewriter.pending(placeholder, perm)
        view.meta["val"] = placeholder.meta["val"]
        placeholder.replace_all_uses_with(view, delete_user_cb=lambda user: user is not view)
        _run(graph, rewriter, report, entry)
    gm.recompile()


def _run(graph: torch.fx.Graph, r: Rewriter, report: Report, entry: str) -> None:
    while r.worklist:
        q = r.worklist.pop()
        if q.graph is not graph or q not in graph.nodes:
            continue
        x, p = q.args[0], tuple(q.args[1])
        if p == tuple(range(len(p))):
            q.replace_all_uses_with(x)
            graph.erase_node(q)
            continue
        for use in list(q.users):
            if use not in graph.nodes:
                continue
            kind, rule = RULES.get(use.target, (None, None))
            r.anchor = use
            new = rule(r, use, q, x, p) if rule else None
            if new is not None:
                new.meta.setdefault("val", use.meta.get("val"))  # same value, in the old order
                report.add(entry, r.pool, use, kind, "remapped" if kind != "permutation" else "permutation folded")
                use.replace_all_uses_with(new)
                graph.erase_node(use)
            else:
                _keep(use, r.pool, report, entry)
        if not q.users:
            graph.erase_node(q)


def _keep(use: torch.fx.Node, pool: str, report: Report, entry: str) -> None:
    """A use that reads the permuted view as it is: correct for every op that reads logical
    indices (a conv kernel takes any strides); refused when the result depends on memory order."""
    if use.target in MEMORY_ORDER:
        report.add(entry, pool, use, MEMORY, "refused")
        raise RefusedRewrite(
            f"pool {pool!r}: node {use.name} ({use.target}) depends on the pool's memory order and cannot be "
            f"remapped (rule: memory-order refusal), at {source_line(use)}")
    if use.target in KERNELS:
        return  # reported with every kernel use once the graph is final
    if use.op == "output":
        report.add(entry, pool, use, MEMORY, "kept: returned through a permuted view")
    else:
        report.add(entry, pool, use, "layout-agnostic", "kept: reads the pool through a permuted view")
