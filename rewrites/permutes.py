"""The rewriter's rules: how a pool's pending storage permutation sinks below each op.

A relayouted pool enters the graph as `permute(pool, p)`: the new storage seen in the old
order, so every use still computes what it did. The rules sink that pending permutation below
each use, remapping the use's axis arguments, until it meets another permutation and cancels
(the transpose the model wrote for its storage layout) or reaches a use that reads the view as
it is (kept, reported). Each rule returns the node that replaces the use, or None to decline;
`r` is the Rewriter (layoutpass/rewrite.py) that inserts nodes before the use. The op registry
(layoutpass/registry.py) names each op's rule; this module knows no op table, so it imports
nothing of the pass."""

import torch
import torch.fx

aten = torch.ops.aten


def compose(p: tuple[int, ...], u: tuple[int, ...]) -> tuple[int, ...]:
    """permute(permute(x, p), u) == permute(x, compose(p, u))."""
    return tuple(p[i] for i in u)


def inverse(p: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(p)
    for i, v in enumerate(p):
        inv[v] = i
    return tuple(inv)


def _norm(d: int, rank: int) -> int:
    return d % rank


def swap(rank: int, a: int, b: int) -> tuple[int, ...]:
    swap = list(range(rank))
    swap[a % rank], swap[b % rank] = b % rank, a % rank
    return tuple(swap)


def moved(rank: int, src: int, dst: int) -> tuple[int, ...]:
    order = [d for d in range(rank) if d != src % rank]
    order.insert(dst % rank, src % rank)
    return tuple(order)


def folding(spelling):
    """The rule of a permutation op whose permutation `spelling(rank, *args after self)` gives:
    it folds into the pending permutation."""
    def fold(r, use, q, x, p):
        return r.pending(x, compose(p, spelling(len(p), *use.args[1:])))
    return fold


def sink_select(r, use, q, x, p):
    a = _norm(use.args[1], len(p))
    y = r.call(aten.select.int, (x, p[a], use.args[2]), rank=len(p) - 1)
    return r.pending(y, tuple(d - (d > p[a]) for i, d in enumerate(p) if i != a))


def sink_slice(r, use, q, x, p):
    a = _norm(use.args[1] if len(use.args) > 1 else 0, len(p))
    y = r.call(aten.slice.Tensor, (x, p[a], *use.args[2:]), use.kwargs, rank=len(p))
    return r.pending(y, p)


def sink_same_shape(r, use, q, x, p):
    """Ops whose output has the input's shape and whose only tensor argument is it."""
    y = r.call(use.target, (x, *use.args[1:]), use.kwargs, rank=len(p))
    return r.pending(y, p)


def sink_view(r, use, q, x, p):
    """A view that only drops leading size-1 dims the permutation fixes (setitem inserts these;
    none dropped is an alias); any other reshape depends on memory order and is declined."""
    if "val" not in use.meta:
        return None
    shape_in, shape_out = tuple(q.meta["val"].shape), tuple(use.meta["val"].shape)
    drop = len(shape_in) - len(shape_out)
    if drop < 0 or shape_in[drop:] != shape_out or any(s != 1 for s in shape_in[:drop]) \
            or tuple(p[:drop]) != tuple(range(drop)):
        return None
    sizes, inv = list(use.args[1]), inverse(p)
    y = r.call(use.target, (x, [sizes[inv[t] - drop] for t in range(drop, len(p))]), rank=len(p) - drop)
    return r.pending(y, tuple(d - drop for d in p[drop:]))


def _indexed_perm(p, indices, index_rank):
    """The permutation left after indexing the leading len(indices) dims (which p must fix)."""
    k = len(indices)
    if any(i is None for i in indices) or tuple(p[:k]) != tuple(range(k)):
        return None
    return tuple(range(index_rank)) + tuple(d - k + index_rank for d in p[k:])


def sink_index(r, use, q, x, p):
    indices = use.args[1]
    perm = _indexed_perm(p, indices, max(r.rank(i) for i in indices))
    if perm is None:
        return None
    return r.pending(r.call(aten.index.Tensor, (x, indices), rank=len(perm)), perm)


def sink_index_put(r, use, q, x, p):
    if use.args[0] is not q:
        return None
    indices, values = use.args[1], use.args[2]
    perm = _indexed_perm(p, indices, max(r.rank(i) for i in indices))
    if perm is None:
        return None
    lead = len(perm) - r.rank(values)  # values broadcast against the trailing dims
    if lead < 0 or sorted(perm[:lead]) != list(range(lead)):
        return None
    if lead < len(perm):
        values = r.adjust(values, inverse(tuple(d - lead for d in perm[lead:])))
    y = r.call(use.target, (x, indices, values, *use.args[3:]), use.kwargs, rank=len(p))
    return r.pending(y, p)


def sink_copy(r, use, q, x, p):
    if use.args[0] is not q or r.rank(use.args[1]) != len(p):
        return None  # reading the pool into another tensor keeps the view; broadcasts too
    y = r.call(aten.copy_.default, (x, r.adjust(use.args[1], inverse(p)), *use.args[2:]), rank=len(p))
    return r.pending(y, p)


def sink_fill(r, use, q, x, p):
    if use.args[0] is not q:
        return None
    return r.pending(r.call(use.target, (x, *use.args[1:]), use.kwargs, rank=len(p)), p)


def sink_roll(r, use, q, x, p):
    if len(use.args) < 3 or not use.args[2]:
        return None  # a roll of the flattened tensor depends on the order of every axis: keep the view
    dims = [p[_norm(d, len(p))] for d in use.args[2]]
    return r.pending(r.call(use.target, (x, use.args[1], dims), rank=len(p)), p)


def sink_cat(r, use, q, x, p):
    """cat along an axis: every operand is brought to the pool's new order."""
    tensors, dim = use.args[0], _norm(use.args[1] if len(use.args) > 1 else 0, len(p))
    if any(r.rank(t) != len(p) for t in tensors):
        return None
    moved = [x if t is q else r.adjust(t, inverse(p)) for t in tensors]
    return r.pending(r.call(use.target, (moved, p[dim]), rank=len(p)), p)


def sink_reduce(r, use, q, x, p):
    """sum / mean / amax over axes."""
    dims = [_norm(d, len(p)) for d in use.args[1]]
    keepdim = use.args[2] if len(use.args) > 2 else use.kwargs.get("keepdim", False)
    y = r.call(use.target, (x, [p[d] for d in dims], *use.args[2:]), use.kwargs,
               rank=len(p) if keepdim else len(p) - len(dims))
    if keepdim:
        return r.pending(y, p)
    gone = sorted(p[d] for d in dims)
    return r.pending(y, tuple(v - sum(g < v for g in gone) for i, v in enumerate(p) if i not in dims))


def sink_binary(r, use, q, x, p):
    """Elementwise with another operand: scalars pass; a tensor operand is broadcast to the
    pool's rank (leading unsqueezes) and brought to its new order."""
    operands = []
    for a in use.args[:2]:
        if a is q:
            operands.append(x)
        elif not isinstance(a, torch.fx.Node) or r.rank(a) == 0:
            operands.append(a)
        else:
            for _ in range(len(p) - r.rank(a)):
                a = r.call(aten.unsqueeze.default, (a, 0), rank=r.rank(a) + 1)
            operands.append(r.adjust(a, inverse(p)))
    return r.pending(r.call(use.target, (*operands, *use.args[2:]), use.kwargs, rank=len(p)), p)


def copied(use, q) -> bool:
    """Whether `use` (contiguous, reshape: a copy or a view depending on strides) copied in the
    model. After a relayout the strides differ: a copy that became an alias would see the
    pool's later writes, so the copy is kept explicit."""
    if "val" not in use.meta or "val" not in q.meta:
        return True
    return not torch._C._is_alias_of(use.meta["val"], q.meta["val"])


def sink_contiguous(r, use, q, x, p):
    if copied(use, q):
        y = r.call(aten.clone.default, (x,), {"memory_format": torch.contiguous_format}, rank=len(p))
    else:
        y = r.call(aten.contiguous.default, (x,), rank=len(p))
    return r.pending(y, p)
