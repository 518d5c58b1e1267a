"""Lowering pure-torch conv updates onto layoutpass::conv_update, as pattern rules.

Once the pool is stored DS (tok last), the two spellings read, in aten:
  cat (vLLM-style reference code):
    window = cat([index(pool, [slots]), new], 2)        new: (batch, dim, 1)
    index_put_(pool, [slots], window[..., 1:])
  roll (Hugging Face transformers):
    window = roll(index(pool, [slots]), -1, 2); window[..., -1].copy_(x)
    index_put_(pool, [slots], window)
and then y = sum(window * weight, 2) [silu(y)]. Both are exactly conv_update on that pool (the
cat form with state_len = width - 1, the roll form with state_len = width). A matcher returns
an Update, None when the node is not the start of either idiom, or a string saying which part
of an almost-match differed (for the report)."""

from dataclasses import dataclass

import torch
import torch.fx

aten = torch.ops.aten
END = 1 << 62  # a slice end this large means "to the end"


@dataclass(frozen=True)
class Update:
    pool: torch.fx.Node
    slots: torch.fx.Node
    x: torch.fx.Node  # (batch, dim), or (batch, dim, 1) when squeeze is set
    squeeze: bool
    weight: torch.fx.Node
    reduce: torch.fx.Node  # the sum
    result: torch.fx.Node  # what the kernel's output replaces (silu or the sum)
    activation: str | None
    mutations: tuple[torch.fx.Node, ...]  # the idiom's in-place ops, last one the state write
    anchor: torch.fx.Node  # the kernel goes right after it: once the state write and its inputs exist


def _slice_args(node):
    return (list(node.args[1:4]) + [0, None, None])[:3] if node.target is aten.slice.Tensor else None


def _full(node) -> bool:
    dim, start, end = _slice_args(node)
    return start in (0, None) and (end is None or end >= END)


def _through_full_slices(node, want):
    """Users of node matching want(user), looking through slices that keep whole axes."""
    found, stack = [], list(node.users)
    while stack:
        user = stack.pop()
        if want(user):
            found.append(user)
        elif user.target is aten.slice.Tensor and _full(user):
            stack.extend(user.users)
    return found


def _gather(node, pools):
    """index(pool, [slots]) of a DS pool: (pool, slots), else None."""
    if getattr(node, "target", None) is aten.index.Tensor and node.args[0] in pools and len(node.args[1]) == 1:
        return node.args[0], node.args[1][0]
    return None


def _convolution(window, order, last_write):
    """The tail both idioms share: sum over tok of window * weight, optional SiLU, used after
    the state is written. (weight, reduce, result, activation) or a reason."""
    muls = [u for u in window.users if u.target is aten.mul.Tensor]
    reduce = next(iter(muls[0].users), None) if len(muls) == 1 and len(muls[0].users) == 1 else None
    if reduce is None or reduce.target is not aten.sum.dim_IntList or list(reduce.args[1]) not in ([2], [-1]) \
            or len(reduce.args) > 2:
        return "the window is not multiplied by a weight and summed over the token axis"
    weight = muls[0].args[1] if muls[0].args[0] is window else muls[0].args[0]
    if not all(isinstance(s, int) for s in (*weight.meta["val"].shape, reduce.meta["val"].shape[1])):
        return "the weight's shape is not static"
    users = list(reduce.users)
    silu = users[0] if len(users) == 1 and users[0].target is aten.silu.default else None
    result = silu or reduce
    if any(order[u] < order[last_write] for u in result.users):
        return "the output is used before the new state is written"
    return weight, reduce, result, "silu" if silu else None


def match_cat(window, pools, order):
    if window.target is not aten.cat.default or len(window.args[0]) != 2:
        return None
    gathered = _gather(window.args[0][0], pools)
    if gathered is None:
        return None
    pool, slots = gathered
    new = window.args[0][1]
    if window.args[1] not in (2, -1):
        return "the window does not extend the state along the token axis"
    if new.meta["val"].dim() != 3 or new.meta["val"].shape[2] != 1:
        return "the new token is not (batch, dim, 1)"
    tails = _through_full_slices(window, lambda u: _slice_args(u) is not None and _slice_args(u)[0] in (2, -1)
                                 and _slice_args(u)[1] == 1 and (_slice_args(u)[2] is None or _slice_args(u)[2] >= END))
    writes = [u for t in tails for u in t.users if u.target is aten.index_put_.default and u.args[0] is pool
              and u.args[1] == [slots] and u.args[2] is t]
    if len(writes) != 1:
        return "the window's tail is not written back to the same slots"
    conv = _convolution(window, order, writes[0])
    if isinstance(conv, str):
        return conv
    return _update(pool, slots, new, True, conv, (writes[0],), order)


def match_roll(window, pools, order):
    if window.target is not aten.roll.default:
        return None
    gathered = _gather(window.args[0], pools)
    if gathered is None:
        return None
    pool, slots = gathered
    if list(window.args[1]) != [-1] or list(window.args[2]) not in ([2], [-1]):
        return "the state is not rolled back by one token"
    sets = [c for s in _through_full_slices(window, lambda u: u.target is aten.select.int
                                            and tuple(u.args[1:]) in ((2, -1), (-1, -1)))
            for c in s.users if c.target is aten.copy_.default and c.args[0] is s]
    writes = [u for u in window.users if u.target is aten.index_put_.default and u.args[0] is pool
              and u.args[1] == [slots] and u.args[2] is window]
    if len(sets) != 1 or len(writes) != 1 or order[sets[0]] > order[writes[0]]:
        return "the new token is not set in the last column before the state is written back"
    conv = _convolution(window, order, writes[0])
    if isinstance(conv, str):
        return conv
    return _update(pool, slots, sets[0].args[1], False, conv, (sets[0], writes[0]), order)


def _update(pool, slots, x, squeeze, conv, mutations, order):
    """The match, placed after the state write and everything the kernel reads; refused if the
    pool is read in between (that read would see the new state too early)."""
    weight, reduce, result, activation = conv
    write = mutations[-1]
    anchor = max((write, weight, x), key=lambda n: order[n])
    if any(order[write] < order[u] <= order[anchor] for u in pool.users):
        return "the pool is read between the state write and the convolution"
    return Update(pool, slots, x, squeeze, weight, reduce, result, activation, mutations, anchor)


MATCHERS = (match_cat, match_roll)


def lower(graph: torch.fx.Graph, m: Update, conv_update) -> None:
    """Replace a match by one kernel call (null_block_id -1: the idiom skips no slot)."""
    dim, width = m.reduce.meta["val"].shape[1], m.weight.meta["val"].shape[-1]
    with graph.inserting_before(m.anchor.next):  # in order, after the anchor
        x = graph.call_function(aten.select.int, (m.x, 2, 0)) if m.squeeze else m.x
        weight = graph.call_function(aten.reshape.default, (m.weight, [dim, width]))
        out = graph.call_function(aten.empty_like.default, (x,), {"memory_format": torch.contiguous_format})
        graph.call_function(conv_update, (x, m.pool, weight, None, m.activation, m.slots, None, None, -1, -1, out))
    m.result.replace_all_uses_with(out)
    for node in reversed(m.mutations):  # the kernel writes the state; the idiom's writes go
        graph.erase_node(node)
    graph.eliminate_dead_code()
