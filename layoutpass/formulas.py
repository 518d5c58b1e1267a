"""What each op means to the checker, as sympy formulas (the registry's `view`, `split`,
`formula` and `write` of an op; layoutpass.semantics runs them over a graph).

Every tensor is a view of a *root*: `Val(root, coords)`, where `coords` give the root element
that element `(i0, i1, ...)` of the view reads. A view op is an index map: (input shape, output
shape, its arguments after self) -> the input index as functions of the output index (symbols
i0.. of the output). A computing op's formula, `(s, node) -> contents`, builds its fresh
contents from its inputs' (cat as a Piecewise, roll as a Mod, reductions over a bound
variable); a writing op's, `(s, node, x)`, writes into the view x. `s` is the Semantics
running the graph (its values, and the views by index tensors it builds)."""

import re
from dataclasses import dataclass

import sympy
import torch
import torch.fx

aten = torch.ops.aten


class Unmodeled(Exception):
    """A use the formulas cannot follow (the caller decides whether that matters)."""


def index_symbols(rank: int, prefix: str = "i") -> tuple[sympy.Symbol, ...]:
    return tuple(sympy.Symbol(f"{prefix}{k}", integer=True) for k in range(rank))


UNKNOWN = sympy.Symbol("UNKNOWN")


@dataclass
class Root:
    name: str
    shape: tuple
    versions: list  # (symbols, formula), newest last
    pool: str | None = None
    tainted: bool = False  # its contents depend on a pool's (else formulas would only restate opaque values)

    def read(self, coords) -> sympy.Expr:
        symbols, formula = self.versions[-1]
        return formula.xreplace(dict(zip(symbols, coords))) if symbols else formula

    def write(self, formula) -> None:
        self.versions.append((index_symbols(len(self.shape), "c"), formula))


@dataclass(frozen=True)
class Val:
    root: Root
    coords: tuple  # root index, as functions of this value's index
    shape: tuple

    def content(self) -> sympy.Expr:
        return self.root.read(self.coords)


def x_symbols(value: Val) -> tuple:
    return index_symbols(len(value.shape))


def as_sympy(value):
    """Scalars and other constant arguments as sympy atoms (for uninterpreted functions)."""
    if isinstance(value, sympy.Basic):
        return value
    if isinstance(value, bool):
        return sympy.true if value else sympy.false
    if isinstance(value, (int, float)):
        return sympy.sympify(value)
    if isinstance(value, torch.SymInt | torch.SymFloat):
        return value.node.expr
    if isinstance(value, (list, tuple)):
        return sympy.Tuple(*(as_sympy(v) for v in value))
    return sympy.Symbol(f"'{value}'")


def size(s) -> sympy.Expr:
    return sympy.Integer(s) if isinstance(s, int) else s.node.expr


def shape_of(node: torch.fx.Node) -> tuple:
    return tuple(size(s) for s in node.meta["val"].shape)


def dim_of(d: int, rank: int) -> int:
    """A dim argument counted from 0 (a 0-dim tensor's only dim is 0)."""
    return d % rank if rank else 0


def op_name(node) -> str:
    return getattr(node.target, "__name__", str(node.target))


_BOUND = re.compile(r"^[rk](\d+)_\d+$")


def _binders(body: sympy.Expr, count: int, prefix: str) -> tuple:
    """Bound variables named by how deeply binders nest in the body (sympy's Lambda compares
    its variables by name), so that two formulas binding the same things are equal."""
    depth = 1 + max((int(m.group(1)) for a in body.atoms(sympy.Symbol) if (m := _BOUND.match(a.name))), default=0)
    return tuple(sympy.Symbol(f"{prefix}{depth}_{k}", integer=True) for k in range(count))


def bind(body: sympy.Expr, old: tuple, prefix: str) -> tuple[tuple, sympy.Expr]:
    new = _binders(body, len(old), prefix)
    return new, body.xreplace(dict(zip(old, new)))


# ---------------------------------------------------------------------------------------------
# views: (input shape, output shape, *args after self) -> the input index


def select_view(shape, out_shape, d, c):
    d = dim_of(d, len(shape))
    c = sympy.sympify(c)
    c = c + shape[d] if c.is_negative else c
    out = index_symbols(len(shape) - 1)
    return [out[k] for k in range(d)] + [c] + [out[k - 1] for k in range(d + 1, len(shape))]


def _clamp_start(start, n):
    start = sympy.sympify(0 if start is None else start)
    if start.is_negative:
        start = sympy.Max(start + n, 0)
    return start


def slice_view(shape, out_shape, d=0, start=None, end=None, step=1):
    d = dim_of(d, len(shape))
    i = index_symbols(len(shape))
    start = _clamp_start(start, shape[d])
    return [i[k] if k != d else start + (step or 1) * i[k] for k in range(len(shape))]


def narrow_view(shape, out_shape, d, start, length):
    """A slice from start (a negative start counts from the end)."""
    return slice_view(shape, out_shape, d, start)


def permuting(spelling):
    """The index map of a permutation op whose permutation `spelling(rank, *args)` gives."""
    def permute_view(shape, out_shape, *args):
        perm = spelling(len(shape), *args)
        out = index_symbols(len(shape))
        inv = [0] * len(perm)
        for k, p in enumerate(perm):
            inv[p] = k
        return [out[inv[j]] for j in range(len(shape))]
    return permute_view


def unsqueeze_view(shape, out_shape, d):
    d = dim_of(d, len(shape) + 1)
    out = index_symbols(len(shape) + 1)
    return [out[k] if k < d else out[k + 1] for k in range(len(shape))]


def squeeze_view(shape, out_shape, *args):
    """Drops size-1 dims (squeeze, or a view that only removes ones)."""
    out, k, coords = index_symbols(len(out_shape)), 0, []
    for s in shape:
        if k < len(out_shape) and s == out_shape[k] and not (s == 1 and len(shape) - len(coords) > len(out_shape) - k):
            coords.append(out[k])
            k += 1
        else:
            coords.append(sympy.Integer(0))
    return coords


def expand_view(shape, out_shape, *args):
    out = index_symbols(len(out_shape))
    lead = len(out_shape) - len(shape)
    return [sympy.Integer(0) if s == 1 and out_shape[k + lead] != 1 else out[k + lead] for k, s in enumerate(shape)]


def reshape_view(shape, out_shape, *args):
    """Row-major reinterpretation: the flat position of the output index, unravelled."""
    if len(out_shape) != len(shape) and [s for s in shape if s != 1] == [s for s in out_shape if s != 1]:
        return squeeze_view(shape, out_shape) if len(out_shape) < len(shape) else _unsqueezed(shape, out_shape)
    out = index_symbols(len(out_shape))
    flat, stride = sympy.Integer(0), sympy.Integer(1)
    for k in reversed(range(len(out_shape))):
        flat, stride = flat + out[k] * stride, stride * out_shape[k]
    coords, stride = [], sympy.Integer(1)
    for k in reversed(range(len(shape))):
        coords.insert(0, sympy.Mod(sympy.floor(flat / stride), shape[k]))
        stride = stride * shape[k]
    return coords


def _unsqueezed(shape, out_shape):
    out, k, coords = index_symbols(len(out_shape)), 0, []
    for j, s in enumerate(out_shape):
        if k < len(shape) and s == shape[k] and not (s == 1 and len(out_shape) - j > len(shape) - k):
            coords.append(out[j])
            k += 1
    return coords


def same_view(shape, out_shape, *args):
    """Element i reads element i (a copy or a cast, read as a view of its input)."""
    return list(index_symbols(len(shape)))


# splits: (node, input shape) -> the index map of each output


def unbind_pieces(node, shape):
    d = node.args[1] if len(node.args) > 1 else 0
    return [select_view(shape, None, d, k) for k in range(int(shape[dim_of(d, len(shape))]))]


def split_pieces(node, shape):
    """split, split_with_sizes, chunk: consecutive slices of one dim, sized as traced."""
    d = dim_of(node.args[2] if len(node.args) > 2 else 0, len(shape))
    sizes = [size(s) for s in (v.shape[d] for v in node.meta["val"])]
    starts, total = [], sympy.Integer(0)
    for s in sizes:
        starts.append(total)
        total += s
    return [slice_view(shape, None, d, start, start + s) for start, s in zip(starts, sizes)]


# ---------------------------------------------------------------------------------------------
# computing ops: (s, node) -> the contents of their fresh result


def flip_formula(s, node) -> sympy.Expr:
    value = s.values[node.args[0]]
    i = index_symbols(len(value.shape))
    dims = {dim_of(d, len(value.shape)) for d in node.args[1]}
    return value.content().xreplace({i[d]: value.shape[d] - 1 - i[d] for d in dims})


def cat_formula(s, node) -> sympy.Expr:
    tensors = [t for t in node.args[0] if isinstance(s.values.get(t), Val) and s.values[t].shape != (0,)]
    shape = shape_of(node)
    d = dim_of(s.arg(node, 1, 0), len(shape))
    i = index_symbols(len(shape))
    pieces, offset = [], sympy.Integer(0)
    for t in tensors:
        value = s.values[t]
        n = value.shape[d]
        inner = {sym: (i[k] - offset if k == d else i[k]) for k, sym in enumerate(x_symbols(value))}
        pieces.append((value.content().xreplace(inner), i[d] < offset + n))
        offset += n
    pieces[-1] = (pieces[-1][0], True)
    return sympy.Piecewise(*pieces)


def roll_formula(s, node) -> sympy.Expr:
    value = s.values[node.args[0]]
    shifts, dims = list(s.arg(node, 1)), list(s.arg(node, 2, []))
    if len(dims) != len(shifts):
        raise Unmodeled("a roll over the flattened tensor")
    i = index_symbols(len(value.shape))
    mapping = {}
    for shift, d in zip(shifts, dims):
        d = dim_of(d, len(value.shape))
        mapping[i[d]] = sympy.Mod(mapping.get(i[d], i[d]) - shift, value.shape[d])
    return value.content().xreplace(mapping)


def reduce_formula(s, node) -> sympy.Expr:
    value = s.values[node.args[0]]
    rank = len(value.shape)
    dims = None if node.target is aten.sum.default else s.arg(node, 1, None)
    dims = list(range(rank)) if dims in (None, []) else [dim_of(d, rank) for d in dims]
    keepdim = node.target is not aten.sum.default and bool(s.arg(node, 2, False))
    i_in, out = x_symbols(value), index_symbols(len(shape_of(node)))
    bound, k = {}, 0
    for d in range(rank):
        if d in dims:
            bound[d] = sympy.Symbol(f"free{d}", integer=True)
        else:
            bound[d] = out[k]
            k += 1
        if keepdim and d in dims:
            k += 1
    body = value.content().xreplace({i_in[d]: bound[d] for d in range(rank)})
    symbols, body = bind(body, tuple(bound[d] for d in dims), "r")
    return sympy.Function(op_name(node))(sympy.Lambda(symbols, body), sympy.Tuple(*(value.shape[d] for d in dims)))


def index_formula(s, node) -> sympy.Expr:
    view, _ = s.indexed(s.values[node.args[0]], node.args[1], node)
    return view.content()


def index_select_formula(s, node) -> sympy.Expr:
    x = s.values[node.args[0]]
    d = dim_of(node.args[1], len(x.shape))
    view, _ = s.indexed(x, [None] * d + [node.args[2]], node)
    return view.content()


def gather_formula(s, node) -> sympy.Expr:
    return s.gathered(s.values[node.args[0]], node.args[1], node.args[2]).content()


def stack_formula(s, node) -> sympy.Expr:
    tensors = [s.values[t] for t in node.args[0]]
    shape = shape_of(node)
    d = dim_of(s.arg(node, 1, 0), len(shape))
    i = index_symbols(len(shape))
    pieces = []
    for k, value in enumerate(tensors):
        if not isinstance(value, Val):
            raise Unmodeled("a stack of something that is not a tensor")
        inner = {sym: (i[m] if m < d else i[m + 1]) for m, sym in enumerate(x_symbols(value))}
        pieces.append((value.content().xreplace(inner), sympy.Eq(i[d], k) if k < len(tensors) - 1 else True))
    return sympy.Piecewise(*pieces)


def constant(value: int):
    """The formula of an op filling its result with `value` (zeros_like, new_ones, ...)."""
    return lambda s, node: sympy.Integer(value)


def full_formula(s, node) -> sympy.Expr:
    """full_like / new_full: their fill value."""
    return as_sympy(node.args[1])


def pad_formula(s, node) -> sympy.Expr:
    value = s.values[node.args[0]]
    pad, fill = list(node.args[1]), as_sympy(s.arg(node, 2, 0) or 0)
    i = x_symbols(value)
    content, conditions = value.content(), []
    mapping = {}
    for k in range(len(pad) // 2):
        d = len(value.shape) - 1 - k
        left, n = pad[2 * k], value.shape[d]
        mapping[i[d]] = i[d] - left
        conditions += [i[d] < left, i[d] >= left + n]
    return sympy.Piecewise((fill, sympy.Or(*conditions)), (content.xreplace(mapping), True))


# ---------------------------------------------------------------------------------------------
# writing ops: (s, node, x) -> None, their write into x (in place, or into the copy the
# functional form returns)


def write_value(s, node, x: Val) -> None:
    """copy_ / fill_: x takes its second argument, broadcast."""
    s.write_view(node, x, s.broadcast(node.args[1], x.shape))


def write_zero(s, node, x: Val) -> None:
    s.write_view(node, x, sympy.Integer(0))


def write_index_put(s, node, x: Val) -> None:
    indices, values = node.args[1], node.args[2]
    accumulate = bool(s.arg(node, 3, False))
    view, out_shape = s.indexed(x, indices, node)
    value = s.broadcast(values, out_shape)
    if accumulate:
        value = sympy.Function("add.Tensor")(view.content(), value)
    s.write_view(node, view, value)


def write_index_copy(s, node, x: Val) -> None:
    """x.index_copy_(dim, index, source): x[..., index[j], ...] = source[..., j, ...] along dim."""
    d = dim_of(node.args[1], len(x.shape))
    view, out_shape = s.indexed(x, [None] * d + [node.args[2]], node)
    s.write_view(node, view, s.broadcast(node.args[3], out_shape))


def write_scatter(s, node, x: Val) -> None:
    view = s.gathered(x, node.args[1], node.args[2])
    s.write_view(node, view, s.broadcast(node.args[3], view.shape))
