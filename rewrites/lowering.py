"""Lowering a pure-torch conv update onto layoutpass::conv_update, as a pattern rule.

The idiom, once the pool is stored DS (tok last), reads in aten:
    state  = index(pool, [slots])                 (batch, dim, state_len)
    window = cat([state, new], 2)                 new: (batch, dim, 1)
    y      = sum(mul(window, weight), [2])        weight broadcasts to (1, dim, state_len + 1)
    index_put_(pool, [slots], slice(window, 2, 1))
    [silu(y)]
which is exactly conv_update with width state_len + 1 on that pool. `match_cat_update` returns
what the replacement needs, or a reason the pattern almost matched (for the report)."""

from dataclasses import dataclass

import torch
import torch.fx

aten = torch.ops.aten


@dataclass(frozen=True)
class CatUpdate:
    reduce: torch.fx.Node  # the sum
    result: torch.fx.Node  # the node whose value the kernel's output replaces (silu or the sum)
    pool: torch.fx.Node
    slots: torch.fx.Node
    new: torch.fx.Node  # (batch, dim, 1)
    weight: torch.fx.Node
    write: torch.fx.Node  # the index_put_ that stores the new state
    activation: str | None


def _full(node: torch.fx.Node) -> bool:
    """A slice that keeps its whole axis (what `x[:, 1:]` spells for the first axis)."""
    start, end = (list(node.args[2:4]) + [None, None])[:2]
    return start in (0, None) and (end is None or (isinstance(end, int) and end >= 1 << 62))


def _tails(window: torch.fx.Node) -> list[torch.fx.Node]:
    """Slices of the window that drop its first token (through slices that keep whole axes)."""
    tails, stack = [], [u for u in window.users if u.target is aten.slice.Tensor]
    while stack:
        node = stack.pop()
        start, end = (list(node.args[2:4]) + [None, None])[:2]
        if node.args[1] in (2, -1) and start == 1 and (end is None or (isinstance(end, int) and end >= 1 << 62)):
            tails.append(node)
        elif _full(node):
            stack.extend(u for u in node.users if u.target is aten.slice.Tensor)
    return tails


def _rank(node) -> int:
    return node.meta["val"].dim() if isinstance(node, torch.fx.Node) and "val" in node.meta else -1


def match_cat_update(window: torch.fx.Node, pools: set[torch.fx.Node]) -> "CatUpdate | str | None":
    """None: not this idiom at all. A string: the idiom almost matched, and why it did not."""
    if window.target is not aten.cat.default or len(window.args[0]) != 2:
        return None
    state, new = window.args[0]
    if getattr(state, "target", None) is not aten.index.Tensor or state.args[0] not in pools:
        return None
    if window.args[1] not in (2, -1) or len(state.args[1]) != 1:
        return "the window is not a slot gather extended along the token axis"
    if _rank(new) != 3 or new.meta["val"].shape[2] != 1:
        return "the new token is not (batch, dim, 1)"
    muls = [u for u in window.users if u.target is aten.mul.Tensor]
    reduce = next(iter(muls[0].users), None) if len(muls) == 1 and len(muls[0].users) == 1 else None
    if reduce is None or reduce.target is not aten.sum.dim_IntList or list(reduce.args[1]) not in ([2], [-1]) \
            or len(reduce.args) > 2:
        return "the window is not multiplied by a weight and summed over the token axis"
    weight = muls[0].args[1] if muls[0].args[0] is window else muls[0].args[0]
    if not all(isinstance(s, int) for s in (*weight.meta["val"].shape, reduce.meta["val"].shape[1])):
        return "the weight's shape is not static"
    writes = [u for s in _tails(window) for u in s.users if u.target is aten.index_put_.default
              and u.args[0] is state.args[0] and u.args[1] == state.args[1] and u.args[2] is s]
    if len(writes) != 1 or len(window.users) != 2:
        return "the window's tail is not (only) written back to the same slots"
    users = list(reduce.users)
    silu = users[0] if len(users) == 1 and users[0].target is aten.silu.default else None
    result = silu or reduce
    order = {n: i for i, n in enumerate(window.graph.nodes)}
    if any(order[u] < order[writes[0]] for u in result.users):
        return "the output is used before the new state is written"
    return CatUpdate(reduce, result, state.args[0], state.args[1][0], new, weight, writes[0],
                     "silu" if silu else None)


def lower_cat_update(graph: torch.fx.Graph, m: CatUpdate, conv_update) -> None:
    """Replace a match by one kernel call (null_block_id -1: the idiom skips no slot)."""
    dim, width = m.reduce.meta["val"].shape[1], m.weight.meta["val"].shape[-1]
    with graph.inserting_before(m.write):
        x = graph.call_function(aten.select.int, (m.new, 2, 0))
        weight = graph.call_function(aten.reshape.default, (m.weight, [dim, width]))
        out = graph.call_function(aten.empty_like.default, (x,), {"memory_format": torch.contiguous_format})
        graph.call_function(conv_update, (x, m.pool, weight, None, m.activation, m.slots, None, None, -1, -1, out))
    m.result.replace_all_uses_with(out)
    graph.erase_node(m.write)  # the kernel writes the new state; what fed the write is now dead
    graph.eliminate_dead_code()
