"""Lowering the pure-torch recurrences onto the recurrent kernels, as pattern rules of the
lowering table (layoutpass/lowering.py), keyed by the state write (`copy_` or `index_put_` into a
recurrent pool whose axes are slot, head, k, v in any order; the pool read whole, its batch row
the slot as in transformers, or gathered by the written slots, by index or index_select):

  Mamba2's SSM update -> selective_state_update
    new = read * exp(dt * A) + dt * B * x
    y = bmm(new.view(b*h, v, k), C.view(b*h, k, 1)).view(b, h, v)   or   (new * C).sum(k)
  the gated delta rule (GDN; KDA, its decay per key) -> delta_rule_update
    decayed = read * exp(g);  delta = (v - (decayed * k).sum(k)) * beta
    new = decayed + k * delta.unsqueeze(k);  o = (new * q).sum(k)

operands in any order, through casts; `new` written back and read by the output, nothing else.
Which operand is which is read off the ops that made it (`varies`): dt and beta are constant
along k and v, A along all but the head, GDN's g along k and v, KDA's along v, B, k and q along
v, x and v along k. The kernels compute the same formulas in fp32 (the state stored back in the
pool's dtype) whatever the idiom rounds its products or its state to in between: as for the
conv kernels, a lowered bf16 idiom differs from the model by its own rounding. q and k go in
as the idiom made them (its l2 norm and scale stay in the graph: scale 1, no in-kernel norm)."""

from dataclasses import dataclass

import torch
import torch.fx

from .registry import pointwise
from .report import NearMiss

aten = torch.ops.aten
ASSERT = aten._assert_tensor_metadata.default
AXES = frozenset(("slot", "head", "k", "v"))  # the pool axes both kernels read (after their snapshot axis)
SSM_AXES = ("slot", "head", "v", "k")  # the order selective_state_update reads them in
DELTA_AXES = ("slot", "head", "k", "v")  # and delta_rule_update
CASTS = (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default)
SAME = CASTS + (aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
                aten.lift_fresh_copy.default)
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _shape(node) -> tuple:
    return tuple(node.meta["val"].shape)


def _float(node) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def _uncast(node):
    """node without the float-to-float casts and copies around it (the kernels compute in fp32
    whatever precision the idiom rounds to)."""
    while isinstance(node, torch.fx.Node) and node.target in SAME and _float(node) and _float(node.args[0]):
        node = node.args[0]
    return node


def _mul(node):
    """The two operands of a multiplication (through casts), or None."""
    node = _uncast(node)
    if isinstance(node, torch.fx.Node) and node.target is aten.mul.Tensor and len(node.args) == 2 \
            and all(isinstance(a, torch.fx.Node) for a in node.args):
        return node.args
    return None


def _factors(node, out: list) -> None:
    """The leaves of a product of multiplications (through casts) into out."""
    operands = _mul(node)
    if operands is None:
        out.append(_uncast(node))
    for a in operands or ():
        _factors(a, out)


def _single_user(node):
    users = [u for u in node.users if u.target is not ASSERT]
    return users[0] if len(users) == 1 else None


def _dim(d, rank):
    return d + rank if d < 0 else d


def _sums_over(node, axes, axis) -> bool:
    """node is a sum of its input over `axis` of `axes` (the input's), the axis dropped."""
    return node is not None and node.target is aten.sum.dim_IntList and len(node.args) == 2 \
        and [_dim(d, len(axes)) for d in node.args[1]] == [axes.index(axis)] and node.kwargs in ({}, {"keepdim": False})


# ------------------------------------------------------------------ which axes a value varies along

def varies(node, memo: dict) -> tuple[bool, ...]:
    """For each axis of node's value: whether it may vary along it (False: provably constant,
    made by expand or unsqueeze, or broadcast so by a pointwise op). Any op not followed below,
    and any tensor written in place, varies along every axis longer than 1. Iterative: chains
    of pointwise ops run through a whole model."""
    stack = [node]
    while stack:
        n = stack[-1]
        if n in memo:
            stack.pop()
            continue
        pending = [a for a in _sources(n) if a not in memo]
        if pending:
            stack.extend(pending)
            continue
        memo[n] = _flags(n, memo)
        stack.pop()
    return memo[node]


def _tensor(node) -> bool:
    return isinstance(node, torch.fx.Node) and isinstance(node.meta.get("val"), torch.Tensor)


def _sources(node) -> list:
    if node.op != "call_function" or not _tensor(node):
        return []
    if node.target in SAME or node.target in RESHAPES or node.target in _VIEWS or pointwise(node.target):
        return [a for a in node.args if _tensor(a)]
    return []


def _longer(node) -> tuple[bool, ...]:
    return tuple(not (isinstance(s, int) and s == 1) for s in _shape(node))


def _reshaped(src: tuple, old: tuple, new: tuple) -> tuple[bool, ...] | None:
    """A reshape that only adds or drops axes of length 1 keeps each other axis's flag."""
    kept = [(s, f) for s, f in zip(old, src) if not (isinstance(s, int) and s == 1)]
    if [s for s, _ in kept] != [s for s in new if not (isinstance(s, int) and s == 1)]:
        return None
    flags = iter(f for _, f in kept)
    return tuple(False if isinstance(s, int) and s == 1 else next(flags) for s in new)


def _flags(node, memo) -> tuple[bool, ...]:
    if not _tensor(node):
        return ()
    if not _sources(node) or _touching(node)[1]:  # written in place: it may vary along any axis then
        return _longer(node)
    src = memo.get(node.args[0], ())
    rank = len(_shape(node))
    if node.target in SAME:
        return src
    if node.target in RESHAPES:
        return _reshaped(src, _shape(node.args[0]), _shape(node)) or _longer(node)
    if node.target in _VIEWS:
        return _VIEWS[node.target](node, list(src))
    out = [False] * rank  # pointwise: broadcast, right-aligned
    for a in node.args:
        if _tensor(a):
            for k, f in enumerate(memo[a]):
                out[rank - len(memo[a]) + k] |= f
    return tuple(out)


def _unsqueeze(node, src):
    src.insert(_dim(node.args[1], len(src) + 1), False)
    return tuple(src)


def _squeeze(node, src):
    dims = node.args[1] if len(node.args) > 1 else range(len(src))
    dims = {_dim(d, len(src)) for d in ([dims] if isinstance(dims, int) else dims)}
    old = _shape(node.args[0])
    return tuple(f for k, f in enumerate(src) if not (k in dims and isinstance(old[k], int) and old[k] == 1))


def _expand(node, src):
    return (False,) * (len(_shape(node)) - len(src)) + tuple(src)


def _permute(node, src):
    return tuple(src[_dim(d, len(src))] for d in node.args[1])


def _transpose(node, src):
    a, b = (_dim(d, len(src)) for d in node.args[1:3])
    src[a], src[b] = src[b], src[a]
    return tuple(src)


def _select(node, src):
    del src[_dim(node.args[1], len(src))]
    return tuple(src)


def _slice(node, src):
    return tuple(src)


_VIEWS = {aten.unsqueeze.default: _unsqueeze, aten.squeeze.dim: _squeeze, aten.squeeze.dims: _squeeze,
          aten.squeeze.default: _squeeze, aten.expand.default: _expand, aten.permute.default: _permute,
          aten.transpose.int: _transpose, aten.select.int: _select, aten.slice.Tensor: _slice}


def _axes_of(node, axes: tuple[str, ...], memo) -> set[str]:
    """The axes (of `axes`, right-aligned) a value broadcast to them varies along."""
    flags = varies(node, memo)
    return {axes[len(axes) - len(flags) + k] for k, f in enumerate(flags) if f}


# ------------------------------------------------------------------ the state: where it is read and written

def _aliases(node, of) -> bool:
    val, src = node.meta.get("val"), of.meta.get("val")
    return isinstance(val, torch.Tensor) and isinstance(src, torch.Tensor) and torch._C._is_alias_of(val, src)


def _touching(tensor) -> tuple[list, list]:
    """(readers, writers): the ops that read the tensor or a view of it, and those that may
    write it in place."""
    readers, writers, views = [], [], [tensor]
    for view in views:
        for user in view.users:
            schema = getattr(user.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                writers.append(user)
            if _aliases(user, view):
                views.append(user)  # a view, or an in-place op's result: its users read the tensor
            else:
                readers.append(user)
    return readers, writers


def _pool_of(node):
    """The tensor node stands for: through in-place ops (they return their input) and casts
    that alias their input (a no-op .to() of the pool)."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.args \
            and isinstance(node.args[0], torch.fx.Node) and (
            getattr(getattr(node.target, "_schema", None), "name", "").endswith("_")
            or (node.target in CASTS and _aliases(node, node.args[0]))):
        node = node.args[0]
    return node


def _reads(node, pool, slots) -> bool:
    node = _uncast(node)
    if slots is None:
        return _pool_of(node) is pool
    if node.target is aten.index_select.default:
        return _pool_of(node.args[0]) is pool and node.args[1] == 0 and node.args[2] is slots
    return node.target is aten.index.Tensor and _pool_of(node.args[0]) is pool and list(node.args[1]) == [slots]


def _first_read(read, term, pool):
    """The node that reads the pool's memory for this term: the innermost copy or gather on the
    way to it, else the term itself (views read nothing)."""
    node, reader = read, term
    while node is not pool:
        if not _aliases(node, node.args[0]):
            reader = node
        node = node.args[0]
    return reader


def _decayed(term, pool, slots):
    """(the decay, where the pool is read) when term is read * decay, else None."""
    operands = _mul(term)
    for read, decay in (operands, operands[::-1]) if operands else ():
        if _reads(read, pool, slots):
            return decay, _first_read(read, _uncast(term), pool)
    return None


@dataclass(frozen=True)
class _State:
    """A write of a new state into a pool: what every rule starts from."""

    write: torch.fx.Node
    pool: torch.fx.Node
    axes: tuple[str, ...]
    slots: torch.fx.Node | None
    new: torch.fx.Node  # the computed state, before the casts and unit reshapes the write takes it through
    chain: frozenset  # those casts and reshapes

    def output(self) -> tuple | str:
        """(the one op besides the write that reads the new state, the operand it reads it as:
        the state or a cast of it)."""
        casts, readers = [self.new], []
        for node in casts:
            for user in node.users:
                (casts if user.target in CASTS or user in self.chain else readers).append(user)
        others = [u for u in readers if u is not self.write and u.target is not ASSERT]
        if self.write not in readers or len(others) != 1:
            return "the new state is not read by the state write and one output only"
        return others[0], next(a for a in others[0].all_input_nodes if a in casts)


def _state(write, scope) -> _State | None:
    pool = _pool_of(write.args[0]) if write.args and isinstance(write.args[0], torch.fx.Node) else None
    if pool not in scope.states:
        return None
    if write.target is aten.copy_.default:
        slots, value = None, write.args[1]
    elif write.target is aten.index_put_.default and len(write.args[1]) == 1 and len(write.args) == 3:
        slots, value = write.args[1][0], write.args[2]
    else:
        return None
    new, chain = value, set()  # through casts and reshapes that only add or drop axes of length 1
    while isinstance(new, torch.fx.Node) and isinstance(new.args[0], torch.fx.Node) and (new.target in CASTS or (
            new.target in RESHAPES and _reshaped(_longer(new.args[0]), _shape(new.args[0]), _shape(new)))):
        chain.add(new)
        new = new.args[0]
    rows = _shape(pool) if slots is None else (_shape(slots)[0], *_shape(pool)[1:])
    if not isinstance(new, torch.fx.Node) or new.target is not aten.add.Tensor or len(new.args) != 2 \
            or new.kwargs or not all(isinstance(a, torch.fx.Node) for a in new.args) or _shape(new) != rows:
        return None  # not an update these rules read (a reset, a copy of another state, a scan's end)
    return _State(write, pool, scope.states[pool], slots, new, frozenset(chain))


def _placed(s: _State, read, inputs, result, order):
    """The node the kernel goes after (the last of its inputs), or why it cannot go anywhere: the
    kernel reads the pool there and writes it there, so no other op may write the pool between
    the idiom's read and the later of kernel and write, nor use it between the two."""
    anchor = max((n for n in (*inputs, s.slots) if n is not None), key=lambda n: order[n])
    if order[result] <= order[anchor]:
        return "the output is computed before the kernel's inputs"
    lo, hi = sorted((order[anchor], order[s.write]))
    readers, writers = _touching(s.pool)
    if any(order[read] < order[n] < hi for n in writers if n is not s.write):
        return "the pool is written between the state read and the state write"
    own = {read, s.write}
    if any(lo < order[n] <= hi for n in readers if n not in own):
        return "the pool is read between the state write and the output"
    return anchor


class _Emit:
    """Builds a kernel's arguments after the anchor: operands broadcast to the state's rows (or
    to the rows without k) and read in the kernel's axis order, constant axes at index 0."""

    def __init__(self, graph, update, order):
        self.call, self.axes = graph.call_function, update.axes
        shape = _shape(update.pool)
        batch = shape[0] if update.slots is None else self.call(aten.sym_size.int, (update.slots, 0))
        self.rows = [batch, *shape[1:]]
        self.order = order

    def ordered(self, node, order):
        return node if order == sorted(order) else self.call(aten.permute.default, (node, order))

    def per(self, node, *drop, without=()):
        """node broadcast to the rows (less the `without` axes), in the kernel's order, each
        `drop` axis read at index 0."""
        axes = [a for a in self.axes if a not in without]
        rows = [r for a, r in zip(self.axes, self.rows) if a not in without]
        kernel = [a for a in self.order if a not in without]
        view = self.ordered(self.call(aten.expand.default, (node, rows)), [axes.index(a) for a in kernel])
        for axis in sorted((kernel.index(a) for a in drop), reverse=True):
            view = self.call(aten.select.int, (view, axis, 0))
        return view

    def token(self, node):  # the kernels' token axis (one token)
        return self.call(aten.unsqueeze.default, (node, 1))

    def state(self, pool):
        return self.token(self.ordered(pool, [self.axes.index(a) for a in self.order]))

    def out(self, like, dtype, result):
        """(operand, output buffer, output dtype) for an operand `like` of `dtype`: an fp32 result
        takes the kernel's output in fp32 (the operand upcast exactly), else it is cast after."""
        want = result.meta["val"].dtype
        if want == torch.float32 and dtype != want:
            like, dtype = self.call(aten.to.dtype, (like, want)), want
        return like, self.call(aten.empty_like.default, (like,), {"memory_format": torch.contiguous_format}), dtype

    def result(self, out, dtype, result, result_axes, kernel_axes):
        y = self.call(aten.select.int, (out, 1, 0))
        y = self.ordered(y, [kernel_axes.index(a) for a in result_axes])
        return y if dtype == result.meta["val"].dtype else self.call(aten.to.dtype, (y, result.meta["val"].dtype))


def _replace(graph, update, kernel, y) -> None:
    kernel.meta["stack_trace"] = update.write.meta.get("stack_trace")
    update.result.replace_all_uses_with(y)
    update.write.replace_all_uses_with(update.write.args[0])  # what read the written pool then reads it
    graph.erase_node(update.write)


# ------------------------------------------------------------------ Mamba2's SSM update

@dataclass(frozen=True)
class SsmUpdate:
    pool: torch.fx.Node
    axes: tuple[str, ...]  # the pool's axes, in its logical order
    slots: torch.fx.Node | None  # None: batch row b is slot b
    dt: torch.fx.Node
    A: torch.fx.Node
    B: torch.fx.Node
    x: torch.fx.Node
    C: torch.fx.Node
    c_broadcast: bool  # C broadcasts to the state (the sum's form), else it is (batch, head, k) (bmm's)
    result: torch.fx.Node  # y: what the kernel's output replaces
    result_axes: tuple[str, ...]
    write: torch.fx.Node
    anchor: torch.fx.Node
    kernel = "selective_state_update"
    idiom = "SSM"


def _ssm_roles(product, inflow, axes, memo):
    """(dt, A, B, x) from exp(dt * A) and the inflow's factors dt, B, x, by the axes each varies
    along; a string saying what differed otherwise."""
    leaves = []
    _factors(inflow, leaves)
    if len(leaves) != 3:
        return "the input to the state is not one product dt * B * x"
    for dt, A in (product, product[::-1]):
        dt, A = _uncast(dt), _uncast(A)
        if dt not in leaves or not _axes_of(A, axes, memo) <= {"head"}:
            continue
        if not _axes_of(dt, axes, memo) <= {"slot", "head"}:
            return "dt varies along the state's v or k axis (the kernel takes one step per head)"
        rest = list(leaves)
        rest.remove(dt)
        for B, x in (rest, rest[::-1]):
            if _axes_of(B, axes, memo) <= {"slot", "head", "k"} and _axes_of(x, axes, memo) <= {"slot", "head", "v"}:
                return dt, A, B, x
        return "the input is not dt * B * x with B along k and x along v"
    return "the decay is not exp(dt * A) with A one value per head"


def _ssm_output(s: _State, memo):
    """(C, whether it broadcasts, result, result axes): y = new . C over k, by bmm or by sum."""
    found = s.output()
    if isinstance(found, str):
        return found
    user, state = found
    axes = s.axes
    b, h, v, k = (_shape(s.new)[axes.index(a)] for a in SSM_AXES)
    if user.target in RESHAPES and axes == SSM_AXES and _shape(user) == (b * h, v, k):
        mm = _single_user(user)
        if mm is not None and mm.target is aten.bmm.default and mm.args[0] is user \
                and mm.args[1].target in RESHAPES and _shape(mm.args[1]) == (b * h, k, 1) \
                and _shape(mm.args[1].args[0]) == (b, h, k):
            result = _single_user(mm)
            if result is not None and result.target in RESHAPES and _shape(result) == (b, h, v):
                return mm.args[1].args[0], False, result, ("slot", "head", "v")
        return "the output is not bmm(state.view(b*h, v, k), C.view(b*h, k, 1)).view(b, h, v)"
    if user.target is aten.mul.Tensor:
        C = next((a for a in user.args if a is not state), None)
        total = _single_user(user)
        if isinstance(C, torch.fx.Node) and _axes_of(C, axes, memo) <= {"slot", "head", "k"} \
                and _sums_over(total, axes, "k"):
            return C, True, total, tuple(a for a in axes if a != "k")
    return "the output is not the new state times C summed over k"


def match_ssm(s: _State, scope):
    for term, inflow in (s.new.args, s.new.args[::-1]):
        decayed = _decayed(term, s.pool, s.slots)
        exp = _uncast(decayed[0]) if decayed else None
        if exp is not None and exp.target is aten.exp.default and (product := _mul(exp.args[0])) is not None:
            read = decayed[1]
            break
    else:
        return None  # not this recurrence
    roles = _ssm_roles(product, inflow, s.axes, scope.memo)
    if isinstance(roles, str):
        return NearMiss(s.pool, roles)
    output = _ssm_output(s, scope.memo)
    if isinstance(output, str):
        return NearMiss(s.pool, output)
    C, c_broadcast, result, result_axes = output
    anchor = _placed(s, read, (*roles, C), result, scope.order)
    if isinstance(anchor, str):
        return NearMiss(s.pool, anchor)
    return SsmUpdate(s.pool, s.axes, s.slots, *roles, C, c_broadcast, result, result_axes, s.write, anchor)


def lower_ssm(graph: torch.fx.Graph, m: SsmUpdate) -> None:
    """One selective_state_update call after the anchor; D, z and dt_bias stay in the graph,
    every group its own head."""
    with graph.inserting_before(m.anchor.next):
        e = _Emit(graph, m, SSM_AXES)
        x, out, dtype = e.out(e.token(e.per(m.x, "k")), m.x.meta["val"].dtype, m.result)
        C = e.token(e.per(m.C, "v") if m.c_broadcast else m.C)
        kernel = e.call(torch.ops.layoutpass.selective_state_update.default,
                        (e.state(m.pool), x, e.token(e.per(m.dt, "v", "k")), e.per(m.A, "slot", "v", "k"),
                         e.token(e.per(m.B, "v")), C, None, None, None, False, m.slots, None, -1, out))
        y = e.result(out, dtype, m.result, m.result_axes, ("slot", "head", "v"))
    _replace(graph, m, kernel, y)


# ------------------------------------------------------------------ the gated delta rule

@dataclass(frozen=True)
class DeltaUpdate:
    pool: torch.fx.Node
    axes: tuple[str, ...]
    slots: torch.fx.Node | None
    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node  # broadcast to the rows less k
    beta: torch.fx.Node  # broadcast to the rows less k
    g: torch.fx.Node  # the log decay, as exp's operand
    g_views: tuple  # the views exp's result went through to the decay factor, outermost first
    per_key: bool  # KDA: the decay varies along k
    result: torch.fx.Node
    result_axes: tuple[str, ...]
    write: torch.fx.Node
    anchor: torch.fx.Node
    kernel = "delta_rule_update"
    idiom = "delta-rule"


def _exp_through_views(decay):
    """(exp's operand, the views from exp to decay, outermost first) or None."""
    views, node = [], _uncast(decay)
    while node.target in _VIEWS or node.target in RESHAPES:
        views.append(node)
        node = _uncast(node.args[0])
    return (node.args[0], tuple(views)) if node.target is aten.exp.default else None


def _view_args(node) -> tuple:
    """A view's arguments, its axis argument counted from the front (unsqueeze(t, -1) is
    unsqueeze(t, 3) of a 3-d t)."""
    args = list(node.args[1:])
    if node.target in (aten.unsqueeze.default, aten.select.int, aten.squeeze.dim, aten.slice.Tensor) and args:
        args[0] = _dim(args[0], len(_shape(node if node.target is aten.unsqueeze.default else node.args[0])))
    return tuple(args)


def _same(a, b) -> bool:
    """Two nodes computing the same view of the same value (one unsqueeze each of a node, say)."""
    a, b = _uncast(a), _uncast(b)
    if a is b:
        return True
    return a.target is b.target and (a.target in _VIEWS or a.target in RESHAPES) and a.kwargs == b.kwargs \
        and _shape(a) == _shape(b) and _view_args(a) == _view_args(b) and _same(a.args[0], b.args[0])


def _delta_inflow(inflow, decayed, axes, memo):
    """(k, v, beta) when inflow is k * unsqueeze((v - sum_k(decayed * k)) * beta, k), else a reason."""
    less = tuple(a for a in axes if a != "k")
    operands = _mul(inflow)
    for k, d in (operands, operands[::-1]) if operands else ():
        d = _uncast(d)
        if d.target is not aten.unsqueeze.default or _dim(d.args[1], len(axes)) != axes.index("k"):
            continue
        operands = _mul(d.args[0])
        for diff, beta in (operands, operands[::-1]) if operands else ():
            diff = _uncast(diff)
            if diff.target is not aten.sub.Tensor or len(diff.args) != 2 or diff.kwargs \
                    or not all(isinstance(a, torch.fx.Node) for a in diff.args):
                continue
            v, recalled = diff.args[0], _uncast(diff.args[1])
            product = _mul(recalled.args[0]) if recalled.target is aten.sum.dim_IntList else None
            if not (product and _sums_over(recalled, axes, "k")):
                continue
            for s, k2 in (product, product[::-1]):
                if _uncast(s) is decayed and _same(k2, k):
                    if not _axes_of(k, axes, memo) <= {"slot", "head", "k"}:
                        return "k varies along the state's v axis"
                    if not _axes_of(beta, less, memo) <= {"slot", "head"}:
                        return "beta varies along the state's v axis (the kernel takes one per head)"
                    return k, v, beta
    return None


def match_delta(s: _State, scope):
    axes, memo = s.axes, scope.memo
    for term, inflow in (s.new.args, s.new.args[::-1]):
        decayed = _decayed(term, s.pool, s.slots)
        g = _exp_through_views(decayed[0]) if decayed else None
        if g is None:
            continue
        roles = _delta_inflow(inflow, _uncast(term), axes, memo)
        if roles is not None:
            break
    else:
        return None  # not this recurrence
    if isinstance(roles, str):
        return NearMiss(s.pool, roles)
    k, v, beta = roles
    decay_axes = _axes_of(decayed[0], axes, memo)
    if not decay_axes <= {"slot", "head", "k"}:
        return NearMiss(s.pool, "the decay varies along the state's v axis")
    found = s.output()
    if isinstance(found, str):
        return NearMiss(s.pool, found)
    user, state = found
    q = next((a for a in user.args if a is not state), None)
    result = _single_user(user)
    if user.target is not aten.mul.Tensor or not isinstance(q, torch.fx.Node) or not _sums_over(result, axes, "k") \
            or not _axes_of(q, axes, memo) <= {"slot", "head", "k"}:
        return NearMiss(s.pool, "the output is not the new state times q summed over k")
    anchor = _placed(s, decayed[1], (q, k, v, beta, g[0], decayed[0]), result, scope.order)
    if isinstance(anchor, str):
        return NearMiss(s.pool, anchor)
    return DeltaUpdate(s.pool, axes, s.slots, q, k, v, beta, g[0], g[1], "k" in decay_axes, result,
                       tuple(a for a in axes if a != "k"), s.write, anchor)


def lower_delta(graph: torch.fx.Graph, m: DeltaUpdate) -> None:
    """One delta_rule_update call after the anchor: scale 1, no in-kernel norm (the idiom's q
    and k as it made them), the log decay through the views its exp went through."""
    with graph.inserting_before(m.anchor.next):
        e = _Emit(graph, m, DELTA_AXES)
        g = m.g
        for view in reversed(m.g_views):
            g = e.call(view.target, (g, *view.args[1:]), view.kwargs)
        v, out, dtype = e.out(e.token(e.per(m.v, without=("k",))), m.v.meta["val"].dtype, m.result)
        kernel = e.call(torch.ops.layoutpass.delta_rule_update.default,
                        (e.state(m.pool), e.token(e.per(m.q, "v")), e.token(e.per(m.k, "v")), v,
                         e.token(e.per(g, "v") if m.per_key else e.per(g, "k", "v")),
                         e.token(e.per(m.beta, "v", without=("k",))), 1.0, m.slots, None, -1, False, out))
        y = e.result(out, dtype, m.result, m.result_axes, ("slot", "head", "v"))
    _replace(graph, m, kernel, y)


# ------------------------------------------------------------------ the rule

def match_recurrent(write, scope):
    """The state write of a pure-torch SSM update or delta rule: an SsmUpdate or DeltaUpdate, a
    NearMiss, or None."""
    s = _state(write, scope)
    if s is None:
        return None
    found = [match(s, scope) for match in (match_ssm, match_delta)]
    return next((f for f in found if isinstance(f, (SsmUpdate, DeltaUpdate))), None) \
        or next((f for f in found if f is not None), None)


def lower_recurrent(graph: torch.fx.Graph, m) -> None:
    (lower_ssm if isinstance(m, SsmUpdate) else lower_delta)(graph, m)
