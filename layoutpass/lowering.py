"""Lowering pure-torch state updates onto the kernels, as pattern rules: here the conv updates
(onto layoutpass::conv_update and conv_prefill) and the table the recurrences' rules join.

Once the pool is stored DS (tok last), the spellings read, in aten:
  cat (vLLM-style reference code; transformers' Mamba/Mamba2, whose batch row is the slot):
    window = cat([index(pool, [slots]) or pool, new], 2)   new: (batch, dim, L)
    index_put_(pool, [slots], window[..., L:])  or  pool.copy_(window[..., L:])
  roll (transformers' older spelling):
    window = roll(index(pool, [slots]), -1, 2); window[..., -1].copy_(x)
    index_put_(pool, [slots], window)
  prompt (pure-torch prefill from no history):
    index_put_(pool, [slots], pad(x)[..., -state_len:])  or  pool.copy_(...);  window = x or pad(x)
and then the convolution: y = sum(window * weight, 2) (one token), or the outputs of
conv1d(window, weight, bias, padding=P, groups=dim) that end at the L new tokens; [silu(y)].
Each is exactly a kernel call on that pool (state_len >= width - 1, the state shifted by L):
conv_update for one token after a history, conv_prefill otherwise. LOWERINGS keys each matcher
by the op its idiom starts from (the recurrences' rules, layoutpass/lowering_recurrent.py, by
their state write); a matcher returns an update, None when the node starts no idiom, or a
NearMiss saying which part of an almost-match differed (for the report). The rewrite driver
(layoutpass/rewrite.py) runs the table."""

import functools
import operator
from dataclasses import dataclass

import sympy
import torch
import torch.fx

from .kernels.checks import WIDTHS
from .lowering_recurrent import DeltaUpdate, SsmUpdate, lower_recurrent, match_recurrent
from .registry import Memory, facts
from .report import Action, Kind, NearMiss, use
from .rewrite import graph_rewrite

aten = torch.ops.aten
END = 1 << 62  # a slice end this large means "to the end"
ASSERT = aten._assert_tensor_metadata.default


@dataclass(frozen=True)
class Update:
    pool: torch.fx.Node
    slots: torch.fx.Node | None  # None: batch row b is slot b
    x: torch.fx.Node  # (batch, dim), or (batch, dim, L); (batch, dim, 1) squeezed when squeeze is set
    squeeze: bool
    tokens: int | sympy.Expr  # L (symbolic under dynamic shapes): one goes to conv_update, more to conv_prefill
    initial: bool  # the rows start from their slots' states (else from zeros: a prompt)
    weight: torch.fx.Node
    bias: torch.fx.Node | None
    result: torch.fx.Node  # what the kernel's output replaces (silu or the convolution)
    activation: str | None
    mutations: tuple[torch.fx.Node, ...]  # the idiom's in-place ops, last one the state write
    anchor: torch.fx.Node  # the kernel goes right after it: once the state write and its inputs exist

    @property
    def kernel(self) -> str:
        return "conv_update" if self.tokens == 1 and self.initial else "conv_prefill"


@dataclass
class Scope:
    """What a matcher reads: the conv pools' (slot, dim, tok) views, the recurrent pools the
    recurrent kernels read (placeholder -> axes), each node's position, and
    lowering_recurrent.varies' memo."""

    conv: set
    states: dict
    order: dict
    memo: dict


@dataclass(frozen=True)
class _Conv:
    weight: torch.fx.Node
    bias: torch.fx.Node | None
    result: torch.fx.Node
    activation: str | None


def _n(size):
    """A size (an int, a SymInt, or a graph node computing one) as an int, or as its sympy
    expression when it is symbolic (a dynamic token count), its symbols positive: a size left
    symbolic is at least 2 (0 and 1 are specialized), which decides the sign of -L."""
    if isinstance(size, torch.fx.Node):
        size = size.meta.get("val")
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        if expr.is_number:
            return int(expr)
        return expr.xreplace({s: _positive(s.name) for s in expr.free_symbols})
    return size


@functools.cache
def _positive(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, positive=True)


def _same_size(a, b) -> bool:
    """Two sizes provably equal for every value of their symbols."""
    return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0


def _slice_args(node):
    """(dim, start, end) of a slice, sizes computed in the graph as sympy expressions."""
    if node.target is not aten.slice.Tensor:
        return None
    given = list(node.args[1:4])
    return [_n(a) for a in given + [0, None, None][len(given):]]  # export drops trailing defaults


def _to_end(end, length) -> bool:
    """A slice end that keeps an axis of `length` to its end."""
    if end is None or (isinstance(end, int) and end >= END):
        return True
    return length is not None and (_same_size(end, length) or (_static(end, length) and end >= length))


def _full(node) -> bool:
    dim, start, end = _slice_args(node)
    return start in (0, None) and _to_end(end, None)


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


def _base(node):
    """The tensor an in-place fill returns is its input (the pool, zeroed for a fresh start)."""
    while isinstance(node, torch.fx.Node) and Memory.FILL in facts(node.target).memory:
        node = node.args[0]
    return node


def _pool_read(node, pools):
    """index(pool, [slots]) of a DS pool: (pool, slots); the pool itself: (pool, None)."""
    if getattr(node, "target", None) is aten.index.Tensor and node.args[0] in pools and len(node.args[1]) == 1:
        return node.args[0], node.args[1][0]
    return (_base(node), None) if _base(node) in pools else None


def _values(node) -> list:
    """node and the casts to its own dtype that copy it (transformers' `.to(weight.dtype)`)."""
    found = [node]
    for value in found:
        found += [u for u in value.users if u.target is aten.to.dtype and u.args[1] == value.meta["val"].dtype]
    return found


def _users(values) -> list:
    return [u for v in values for u in v.users if u not in values]


def _static(*sizes) -> bool:
    return all(isinstance(s, int) for s in sizes)


def _mul_sum(window, tokens):
    """sum over tok of window * weight (one new token): (weight, bias, the sum) or a reason."""
    muls = [u for u in _users(window) if u.target is aten.mul.Tensor]
    reduce = next(iter(muls[0].users), None) if len(muls) == 1 and len(muls[0].users) == 1 else None
    if reduce is None or reduce.target is not aten.sum.dim_IntList or list(reduce.args[1]) not in ([2], [-1]) \
            or len(reduce.args) > 2:
        return "the window is not multiplied by a weight and summed over the token axis"
    if tokens != 1:
        return "a multiply-and-sum window takes one new token"
    return (muls[0].args[1] if muls[0].args[0] in window else muls[0].args[0]), None, reduce


def _conv1d(window):
    """A depthwise conv1d over the window: (weight, bias, the conv), None, or a reason."""
    convs = [u for u in _users(window) if u.target is aten.conv1d.default and u.args[0] in window]
    if len(convs) != 1:
        return None
    conv = convs[0]
    weight, bias, stride, _, dilation, groups = (list(conv.args[1:]) + [None, [1], [0], [1], 1][len(conv.args) - 2:])[:6]
    if list(stride) != [1] or list(dilation) != [1] or groups != weight.meta["val"].shape[0] \
            or weight.meta["val"].shape[1] != 1:
        return "the conv1d is not a depthwise convolution with stride and dilation 1"
    return weight, bias, conv


def _tail(node):
    """Follow the convolution's output through token slices, one SiLU and same-dtype casts (in
    any order): (the last node, the activation, [lo, hi) of the output kept)."""
    lo, hi = 0, _n(node.meta["val"].shape[-1])
    activation = None
    while True:
        users = [u for u in node.users if u.target is not ASSERT]
        nxt = users[0] if len(users) == 1 else None
        if nxt is None:
            return node, activation, (lo, hi)
        if nxt.target is aten.slice.Tensor and _slice_args(nxt)[0] in (2, -1) and node.meta["val"].dim() == 3:
            _, start, end = _slice_args(nxt)
            n = hi - lo
            start, end = (_clamp(v, n) for v in (start or 0, n if end is None else end))
            if start is None or end is None:  # a bound whose sign no symbol decides
                return node, activation, None
            lo, hi = lo + start, lo + end
        elif nxt.target is aten.silu.default and activation is None:
            activation = "silu"
        elif not (nxt.target is aten.to.dtype and nxt.args[1] == node.meta["val"].dtype):
            return node, activation, (lo, hi)
        node = nxt


def _clamp(v, n):
    """Python's slice bound v on an axis of n (either may be symbolic), or None if undecided."""
    if isinstance(v, int) and v >= END:  # "to the end", as Dynamo writes an omitted end
        return n
    negative = sympy.sympify(v).is_negative
    if negative is None:
        return None
    v = v + n if negative else v
    return min(max(v, 0), n) if _static(v, n) else sympy.Min(sympy.Max(v, 0), n)


def _convolution(window, tokens, order, last_write):
    """The tail all idioms share: the convolution of the window (a value and its copies), an
    optional SiLU, used only after the state is written. A _Conv or a reason."""
    conv = _conv1d(window) or _mul_sum(window, tokens)
    if isinstance(conv, str):
        return conv
    weight, bias, op = conv
    if not _static(*weight.meta["val"].shape):
        return "the weight's shape is not static"
    if weight.meta["val"].shape[-1] not in WIDTHS:
        return f"conv width {weight.meta['val'].shape[-1]} is outside the kernels' {WIDTHS.start}..{WIDTHS.stop - 1}"
    result, activation, kept = _tail(op)
    if op.target is aten.conv1d.default:
        # output j sees window columns j - P .. j - P + width - 1: keep those ending at the new tokens
        padding = op.args[4][0] if len(op.args) > 4 else 0
        first = _n(window[0].meta["val"].shape[2]) - tokens + padding - weight.meta["val"].shape[-1] + 1
        if kept is None or not (_same_size(kept[0], first) and _same_size(kept[1], first + tokens)):
            return "the conv1d's outputs kept are not those of the new tokens"
    if any(order[u] < order[last_write] for u in result.users):
        return "the output is used before the new state is written"
    return _Conv(weight, bias, result, activation)


def _pool_write(node, value, pools):
    """(pool, slots or None) when node writes value into a DS pool (whole, or gathered slots)."""
    if node.target is aten.copy_.default and _base(node.args[0]) in pools and node.args[1] is value:
        return _base(node.args[0]), None
    if node.target is aten.index_put_.default and node.args[0] in pools and len(node.args[1]) == 1 \
            and node.args[2] is value:
        return node.args[0], node.args[1][0]
    return None


def _token_tails(value, length):
    """(slice, its start) for each slice of value from a static start to the end of the token
    axis (of size length), looking through slices that keep whole axes."""
    tails = _through_full_slices(value, lambda u: _slice_args(u) is not None and _slice_args(u)[0] in (2, -1)
                                 and _static(_slice_args(u)[1] or 0) and _to_end(_slice_args(u)[2], length))
    return [(t, start + length if (start := _slice_args(t)[1] or 0) < 0 else start) for t in tails]


def match_cat(window, scope):
    pools, order = scope.conv, scope.order
    if len(window.args[0]) != 2:
        return None
    gathered = _pool_read(window.args[0][0], pools)
    if gathered is None:
        return None
    pool, slots = gathered
    if window.args[1:] not in ((2,), (-1,)):
        return NearMiss(pool, "the window does not extend the state along the token axis")
    new = window.args[0][1]
    tokens, state_len = new.meta["val"].shape[2] if new.meta["val"].dim() == 3 else None, pool.meta["val"].shape[2]
    if tokens is None or not _static(tokens, state_len):
        return NearMiss(pool, "the new tokens are not (batch, dim, L) with L static")
    length = tokens + state_len
    windows = _values(window)
    writes = [u for w in windows for t, start in _token_tails(w, length) if start == tokens
              for u in t.users if _pool_write(u, t, {pool}) == (pool, slots)]
    if len(writes) != 1:
        return NearMiss(pool, "the window's tail is not written back to the same slots")
    conv = _convolution(windows, tokens, order, writes[0])
    if isinstance(conv, str):
        return NearMiss(pool, conv)
    squeeze = conv.result.meta["val"].dim() == 2  # multiply-and-sum: (batch, dim) out of one token
    return _update(pool, slots, new, squeeze, tokens, True, conv, (writes[0],), order)


def match_roll(window, scope):
    pools, order = scope.conv, scope.order
    gathered = _pool_read(window.args[0], pools)
    if gathered is None or gathered[1] is None:
        return None
    pool, slots = gathered
    if list(window.args[1]) != [-1] or len(window.args) < 3 or list(window.args[2]) not in ([2], [-1]):
        return NearMiss(pool, "the state is not rolled back by one token")
    sets = [c for s in _through_full_slices(window, lambda u: u.target is aten.select.int
                                            and tuple(u.args[1:]) in ((2, -1), (-1, -1)))
            for c in s.users if c.target is aten.copy_.default and c.args[0] is s]
    writes = [u for u in window.users if _pool_write(u, window, {pool}) == (pool, slots)]
    if len(sets) != 1 or len(writes) != 1 or order[sets[0]] > order[writes[0]]:
        return NearMiss(pool, "the new token is not set in the last column before the state is written back")
    conv = _convolution([window], 1, order, writes[0])
    if isinstance(conv, str):
        return NearMiss(pool, conv)
    return _update(pool, slots, sets[0].args[1], False, 1, True, conv, (sets[0], writes[0]), order)


def _update(pool, slots, x, squeeze, tokens, initial, conv, mutations, order):
    """The match, placed after the state write and everything the kernel reads; refused if the
    pool is read in between (that read would see the new state too early)."""
    write = mutations[-1]
    anchor = max((n for n in (write, conv.weight, conv.bias, x) if n is not None), key=lambda n: order[n])
    readers = list(pool.users) + list(write.users)  # the write returns the pool: later code may read it so
    if any(order[write] < order[u] <= order[anchor] for u in readers):
        return NearMiss(pool, "the pool is read between the state write and the convolution")
    return Update(pool, slots, x, squeeze, tokens, initial, conv.weight, conv.bias, conv.result, conv.activation,
                  mutations, anchor)


def _left_pad_of(node):
    """x when node zero-pads x on the left of its last axis only, else None."""
    pad = node.args[1] if node.target in (aten.constant_pad_nd.default, aten.pad.default) else None
    value = node.args[2] if node.target is aten.constant_pad_nd.default and len(node.args) > 2 else \
        node.kwargs.get("value") if node.target is aten.constant_pad_nd.default else None
    mode = node.args[2] if node.target is aten.pad.default and len(node.args) > 2 else "constant"
    if pad is None or len(pad) != 2 or pad[1] != 0 or mode != "constant" or value not in (None, 0) \
            or (node.target is aten.pad.default and len(node.args) > 3 and node.args[3] not in (None, 0)):
        return None
    return node.args[0]


def match_prompt(conv, scope):
    """A prompt from no history (transformers' prefill without a cache, pure-torch vLLM-style
    prefill): a depthwise conv1d over the new tokens x (or x zero-padded on the left), and the
    last state_len columns of x (or of x zero-padded on the left) written to a DS pool."""
    pools, order = scope.conv, scope.order
    window = conv.args[0]
    while window.target is aten.to.dtype and window.args[1] == window.args[0].meta["val"].dtype:
        window = window.args[0]
    x = _left_pad_of(window) or window
    if x.target is aten.cat.default or x.meta["val"].dim() != 3:
        return None  # a window with history is match_cat's
    tokens = _n(x.meta["val"].shape[2])
    padded = [u for u in x.users if _left_pad_of(u) is x]
    writes = [(user, found) for value in {v for w in [x, *padded] for v in _values(w)}
              for length in [_n(value.meta["val"].shape[2])]
              for tail, start in _token_tails(value, length) for user in tail.users
              if (found := _pool_write(user, tail, pools)) and _same_size(start, length - found[0].meta["val"].shape[2])]
    if len(writes) != 1:
        return None  # no pool keeps these tokens: a stateless conv, not ours
    write, (pool, slots) = writes[0]
    conv = _convolution(_values(conv.args[0]), tokens, order, write)
    if isinstance(conv, str):
        return NearMiss(pool, conv)
    return _update(pool, slots, x, False, tokens, False, conv, (write,), order)


# The op each idiom starts from (the conv's window, the recurrences' state write) -> its
# matcher: (node, Scope) -> Update / SsmUpdate / DeltaUpdate, NearMiss, or None (not this idiom).
LOWERINGS = {aten.cat.default: match_cat, aten.roll.default: match_roll, aten.conv1d.default: match_prompt,
             aten.copy_.default: match_recurrent, aten.index_put_.default: match_recurrent}


def lower(graph: torch.fx.Graph, m: Update) -> None:
    """Replace a match by one m.kernel call (null_block_id -1: the idiom skips no slot). One
    token after a history: conv_update. Otherwise conv_prefill over the rows as varlen
    sequences of L, each from its slot's state (m.initial) or from zeros."""
    dim, width = m.result.meta["val"].shape[1], m.weight.meta["val"].shape[-1]
    with graph.inserting_before(m.anchor.next):  # in order, after the anchor
        call = graph.call_function
        weight = call(aten.reshape.default, (m.weight, [dim, width]))
        if m.kernel == "conv_update":
            x = call(aten.select.int, (m.x, 2, 0)) if m.squeeze else m.x
            out = call(aten.empty_like.default, (x,), {"memory_format": torch.contiguous_format})
            kernel = call(torch.ops.layoutpass.conv_update.default,
                          (x, m.pool, weight, m.bias, m.activation, m.slots, None, None, -1, -1, out))
        else:
            device = m.x.meta["val"].device
            # batch and token count may be dynamic: sizes of the graph, not constants
            batch = call(aten.sym_size.int, (m.x, 0))
            length = m.tokens if isinstance(m.tokens, int) else call(aten.sym_size.int, (m.x, 2))
            total = call(operator.mul, (batch, length))
            tokens = call(aten.reshape.default, (call(aten.permute.default, (m.x, [1, 0, 2])), [dim, total]))
            starts = call(aten.arange.start_step, (0, call(operator.add, (total, 1)), length),
                          {"dtype": torch.int32, "device": device})
            initial = call(aten.ones.default, ([batch],), {"dtype": torch.bool, "device": device}) if m.initial else None
            kernel = call(torch.ops.layoutpass.conv_prefill.default,
                          (tokens, weight, m.bias, m.pool, starts, m.slots, initial, m.activation, -1))
            out = call(aten.permute.default, (call(aten.reshape.default, (kernel, [dim, batch, length])), [1, 0, 2]))
    kernel.meta["stack_trace"] = m.mutations[-1].meta.get("stack_trace")
    m.result.replace_all_uses_with(out)
    m.mutations[-1].replace_all_uses_with(m.pool)  # what read the written pool after the kernel reads the pool
    for node in reversed(m.mutations):  # the kernel writes the state; the idiom's writes go
        graph.erase_node(node)


def _sweep(graph: torch.fx.Graph) -> None:
    """Drop what only the replaced idiom read. Its dtype asserts go with the values they check
    (an assert met before the value's last other user is gone survives one sweep: sweep again)."""
    while graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() and not (
            n.target is ASSERT and all(u.target is ASSERT for u in n.args[0].users))):
        pass


def lower_updates(gm: torch.fx.GraphModule, entry: str, pools: dict[torch.fx.Node, str],
                  states: dict[torch.fx.Node, tuple[str, tuple[str, ...]]], refused: str | None = None) -> list:
    """Every pure-torch conv update on a DS pool (its (slot, dim, tok) view -> pool name) and
    every SSM update or delta rule on a recurrent pool (placeholder -> (pool name, axes)) -> one
    kernel call, by the LOWERINGS table run through the rewrite driver; near misses are reported,
    and so is every update left as written because of `refused` (why none may be lowered)."""
    graph, uses = gm.graph, []
    scope = Scope(set(pools), {n: axes for n, (_, axes) in states.items()}, {}, {})
    names = {**pools, **{n: name for n, (name, _) in states.items()}}

    def step(node):
        matcher = LOWERINGS.get(node.target)
        if matcher is None or not names:
            return ()
        if node not in scope.order:  # a rewrite inserted nodes: number them again
            scope.order.clear()
            scope.order.update((n, i) for i, n in enumerate(graph.nodes))
        match = matcher(node, scope)
        recurrent = isinstance(match, (SsmUpdate, DeltaUpdate))
        if (recurrent or isinstance(match, Update)) and refused:
            uses.append(use(entry, names[match.pool], node, Kind.KERNEL, Action.NOT_LOWERED, refused))
        elif recurrent or isinstance(match, Update):
            idiom = match.idiom if recurrent else node.target.__name__.split(".")[0]
            uses.append(use(entry, names[match.pool], node, Kind.KERNEL, Action.LOWERED,
                            f"pure-torch {idiom} update -> {match.kernel}"))
            (lower_recurrent if recurrent else lower)(graph, match)
            _sweep(graph)
            scope.order.clear()
        elif isinstance(match, NearMiss):
            uses.append(use(entry, names[match.pool], node, Kind.KERNEL, Action.NOT_LOWERED, match.reason))
        return ()

    graph_rewrite(graph, list(graph.nodes), step)
    gm.recompile()
    return uses
