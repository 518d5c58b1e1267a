"""What a captured graph computes, element by element, as sympy formulas.

Every tensor is a view of a *root* (a placeholder, or the fresh result of a computing op):
`Val(root, coords)`, where `coords` give the root element that element `(i0, i1, ...)` of the
view reads. A root's contents are a list of versions, each a formula over the root's own
index; an in-place write appends a version (a Piecewise: the written region takes the new
values, the rest keeps the old ones), so a view read after a write sees the write, as in
eager PyTorch. Computing ops build formulas from their inputs' contents: pointwise ops as
uninterpreted functions, cat as a Piecewise, roll as a Mod, reductions over a bound variable.
Ops it does not model are opaque: their outputs are fresh symbols and the contents of their
inputs are recorded as the op's *obligations*.

A conv-state pool's root reads `P[name](slot, tok, dim)` at its *logical* coordinates, through
the layout it is stored in: two graphs over the same pool stored in different layouts mean the
same thing exactly when their obligations, outputs and final contents are the same formulas.
layoutpass.verify checks that; layoutpass.discover reads a pool's token axis off its writes."""

import operator
import re
from dataclasses import dataclass

import sympy
import torch
import torch.fx

from layoutpass.rewrites.permutes import PERMUTATIONS, permutation_of

from .layout import Layout

aten = torch.ops.aten
CANONICAL = ("slot", "snap", "head", "tok", "dim", "k", "v")  # the argument order of every pool symbol


def canonical(axes: tuple[str, ...]) -> list[str]:
    """A pool's axes in the argument order of its symbol (named axes first, in CANONICAL's
    order; others, such as discovery's d0, d1, ..., by position)."""
    return sorted(axes, key=lambda a: (CANONICAL.index(a), 0) if a in CANONICAL else (len(CANONICAL), axes.index(a)))


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


def _sympify(value):
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
        return sympy.Tuple(*(_sympify(v) for v in value))
    return sympy.Symbol(f"'{value}'")


def size(s) -> sympy.Expr:
    return sympy.Integer(s) if isinstance(s, int) else s.node.expr


def shape_of(node: torch.fx.Node) -> tuple:
    return tuple(size(s) for s in node.meta["val"].shape)


def _norm(d: int, rank: int) -> int:
    return d % rank if rank else 0


_BOUND = re.compile(r"^[rk](\d+)_\d+$")


def _binders(body: sympy.Expr, count: int, prefix: str) -> tuple:
    """Bound variables named by how deeply binders nest in the body (sympy's Lambda compares
    its variables by name), so that two formulas binding the same things are equal."""
    depth = 1 + max((int(m.group(1)) for a in body.atoms(sympy.Symbol) if (m := _BOUND.match(a.name))), default=0)
    return tuple(sympy.Symbol(f"{prefix}{depth}_{k}", integer=True) for k in range(count))


def _bind(body: sympy.Expr, old: tuple, prefix: str) -> tuple[tuple, sympy.Expr]:
    new = _binders(body, len(old), prefix)
    return new, body.xreplace(dict(zip(old, new)))


# ---------------------------------------------------------------------------------------------
# index maps of views: (input shape, output shape, args) -> the input index as functions of the
# output index (symbols i0.. of the output)


def _substitute(coords, mapping) -> tuple:
    return tuple(sympy.sympify(c).xreplace(mapping) for c in coords)


def _select(shape, d, c):
    d = _norm(d, len(shape))
    c = sympy.sympify(c)
    c = c + shape[d] if c.is_negative else c
    out = index_symbols(len(shape) - 1)
    return [out[k] for k in range(d)] + [c] + [out[k - 1] for k in range(d + 1, len(shape))]


def _clamp_start(start, n):
    start = sympy.sympify(0 if start is None else start)
    if start.is_negative:
        start = sympy.Max(start + n, 0)
    return start


def _slice(shape, d=0, start=None, end=None, step=1):
    d = _norm(d, len(shape))
    i = index_symbols(len(shape))
    start = _clamp_start(start, shape[d])
    return [i[k] if k != d else start + (step or 1) * i[k] for k in range(len(shape))]


def _permute(shape, perm):
    out = index_symbols(len(shape))
    inv = [0] * len(perm)
    for k, p in enumerate(perm):
        inv[p] = k
    return [out[inv[j]] for j in range(len(shape))]


def _unsqueeze(shape, d):
    d = _norm(d, len(shape) + 1)
    out = index_symbols(len(shape) + 1)
    return [out[k] if k < d else out[k + 1] for k in range(len(shape))]


def _squeeze(shape, out_shape):
    """Drops size-1 dims (squeeze, or a view that only removes ones)."""
    out, k, coords = index_symbols(len(out_shape)), 0, []
    for s in shape:
        if k < len(out_shape) and s == out_shape[k] and not (s == 1 and len(shape) - len(coords) > len(out_shape) - k):
            coords.append(out[k])
            k += 1
        else:
            coords.append(sympy.Integer(0))
    return coords


def _expand(shape, out_shape):
    out = index_symbols(len(out_shape))
    lead = len(out_shape) - len(shape)
    return [sympy.Integer(0) if s == 1 and out_shape[k + lead] != 1 else out[k + lead] for k, s in enumerate(shape)]


def _reshape(shape, out_shape):
    """Row-major reinterpretation: the flat position of the output index, unravelled."""
    if len(out_shape) != len(shape) and [s for s in shape if s != 1] == [s for s in out_shape if s != 1]:
        return _squeeze(shape, out_shape) if len(out_shape) < len(shape) else _unsqueezed(shape, out_shape)
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


def _size_args(node) -> tuple:
    """The node's arguments with sizes computed in the graph (dynamic shapes: a slice ending at
    `tokens - 1`) as their sympy expressions."""
    return node.args[:1] + torch.fx.node.map_arg(node.args[1:], lambda a: _sympify(a.meta.get("val", a)))


def _view_coords(node, shape, out_shape):
    """The index map of a view node, or None when the node is no view this module knows."""
    t, args = node.target, _size_args(node)
    if t in PERMUTATIONS:
        return _permute(shape, permutation_of(node))
    if t is aten.select.int:
        return _select(shape, args[1], args[2])
    if t is aten.slice.Tensor:
        return _slice(shape, *args[1:])
    if t is aten.narrow.default:  # (dim, start, length): a slice (a negative start counts from the end)
        return _slice(shape, args[1], args[2])
    if t is aten.unsqueeze.default:
        return _unsqueeze(shape, args[1])
    if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        return _squeeze(shape, out_shape)
    if t is aten.expand.default:
        return _expand(shape, out_shape)
    if t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
             aten.unflatten.int, aten.view_as.default, aten.reshape_as.default):
        return _reshape(shape, out_shape)
    if t in (aten.contiguous.default, aten.clone.default, aten._to_copy.default, aten.to.dtype,
             aten.to.dtype_layout, aten.lift_fresh_copy.default):
        return list(index_symbols(len(shape)))
    return None


# Ops that read memory order rather than logical indices.
STRIDED = {aten.as_strided.default, aten.as_strided_.default, aten.as_strided_scatter.default, aten.set_.source_Tensor}

SPLITS = {aten.split_with_sizes.default, aten.split.Tensor, aten.unbind.int, aten.chunk.default}


def _pieces(node, shape):
    """The index maps of a splitting op's outputs."""
    t, args = node.target, node.args
    if t is aten.unbind.int:
        d = args[1] if len(args) > 1 else 0
        return [_select(shape, d, k) for k in range(int(shape[_norm(d, len(shape))]))]
    d = _norm(args[2] if len(args) > 2 else 0, len(shape))
    sizes = [size(s) for s in (v.shape[d] for v in node.meta["val"])]
    starts, total = [], sympy.Integer(0)
    for s in sizes:
        starts.append(total)
        total += s
    return [_slice(shape, d, start, start + s) for start, s in zip(starts, sizes)]


# ---------------------------------------------------------------------------------------------
# writes: which root elements a write reaches, solved for the writer's index


class _Inverse(sympy.Function):
    """Inverse(lambda j: g(j), c): the j with g(j) = c, for a gather by an index tensor."""


class _InImage(sympy.logic.boolalg.BooleanFunction):
    """InImage(lambda j: g(j), c): c is one of the gathered positions."""


def _solve(coords, shape, root_shape, root_symbols):
    """For a write through a view whose element j sits at root element coords(j): j as
    functions of the root index c, and the condition that c is written. Coordinates may be
    constants, a + b*j_k, or a function of one j_k (a gather)."""
    j = index_symbols(len(shape))
    solution, conditions = {}, []
    for c, e, n in zip(root_symbols, coords, root_shape):
        e = sympy.sympify(e)
        used = [s for s in j if s in e.free_symbols]
        if not used:
            conditions.append(sympy.Eq(c, e))
            continue
        if len(used) != 1 or used[0] in solution:
            raise Unmodeled("a write whose positions are not one index per axis")
        k = used[0]
        extent = shape[j.index(k)]
        b = sympy.diff(e, k)
        if b.free_symbols & set(j) or not (e - b * k).free_symbols.isdisjoint(j):
            bound, body = _bind(e, (k,), "k")
            lam = sympy.Lambda(bound, body)
            solution[k] = _Inverse(lam, c)
            conditions.append(_InImage(lam, c))
            continue
        a = sympy.expand(e - b * k)
        if b == 1:
            solution[k] = c - a
            if not (a == 0 and extent == n):
                conditions += [c >= a, c < a + extent]
        elif b.is_integer and b != 0:
            solution[k] = (c - a) / b
            conditions += [sympy.Eq(sympy.Mod(c - a, b), 0), (c - a) / b >= 0, (c - a) / b < extent]
        else:
            raise Unmodeled("a write with a non-integer stride")
    if len(solution) != len(j):
        raise Unmodeled("a write that broadcasts one value to several places")
    return [solution[s] for s in j], sympy.And(*conditions)


def _resolve_inverses(expr: sympy.Expr) -> sympy.Expr:
    """g(Inverse(g, c)) is c."""
    for inv in expr.atoms(_Inverse):
        lam, c = inv.args
        expr = expr.xreplace({lam(inv): c})
    return expr


# ---------------------------------------------------------------------------------------------


class Semantics:
    """Interprets one graph. `pools`: placeholder name -> (pool name, Layout the placeholder
    holds). Placeholders not named there read opaque symbols."""

    def __init__(self, graph: torch.fx.Graph, pools: dict[str, tuple[str, Layout]]):
        self.graph, self.pools = graph, pools
        self.values: dict[torch.fx.Node, object] = {}
        self.obligations: dict[str, tuple] = {}  # opaque node name -> what it was given
        self.roots: dict[str, Root] = {}  # placeholder name -> its root
        self.outputs: tuple = ()
        self.writes: list[tuple[torch.fx.Node, Root, sympy.Expr]] = []  # (node, root, the written contents)
        self.failures: dict[str, str] = {}  # node name -> why it could not be followed
        self.layouts = {name: layout for name, (_, layout) in pools.items()}  # placeholder -> its layout

    def run(self) -> "Semantics":
        for node in self.graph.nodes:
            try:
                self.values[node] = self._eval(node)
            except Unmodeled as why:
                self.failures[node.name] = str(why)
                value = self._opaque(node)
                target = self.values.get(node.args[0]) if node.args else None
                if _writes_self(node) and isinstance(target, Val):  # it returns its (now unknown) self
                    self._unknown_write(node, target.root)
                    value = target
                self.values[node] = value
        return self

    # -- leaves --------------------------------------------------------------------------------

    def _leaf(self, name: str, shape, pool=None, layout: Layout | None = None) -> Root:
        i = index_symbols(len(shape))
        if pool is not None:
            logical = {axis: i[layout.axes.index(axis)] for axis in layout.axes}
            formula = sympy.Function(f"P[{pool}]")(*(logical[a] for a in canonical(layout.axes)))
        else:
            formula = sympy.Function(f"X[{name}]")(*i) if i else sympy.Symbol(f"X[{name}]")
        return Root(name, shape, [(i, formula)], pool, tainted=pool is not None)

    def _fresh(self, node, formula, shape=None) -> Val:
        shape = shape_of(node) if shape is None else shape
        root = Root(node.name, shape, [(index_symbols(len(shape)), formula)], tainted=self._tainted(node))
        return Val(root, index_symbols(len(shape)), shape)

    def _tainted(self, node) -> bool:
        """Whether any tensor the node reads depends on a pool's contents."""
        for a in node.all_input_nodes:
            value = self.values.get(a)
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, Val) and v.root.tainted:
                    return True
        return False

    def _opaque(self, node):
        given = tuple(self._describe(a) for a in node.args) + tuple((k, self._describe(v)) for k, v in node.kwargs.items())
        if node.target in STRIDED:  # reads memory, not logical indices: the storage layout is part of its input
            given += tuple(str(self.layouts.get(v.root.name)) for a in node.all_input_nodes
                           if isinstance(v := self.values.get(a), Val))
        self.obligations[node.name] = given
        self._opaque_writes(node)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            leaf = self._leaf(node.name, shape_of(node))
            if self._views_a_pool(node, val):  # what it reads later depends on writes we cannot place
                self.failures[node.name] = "a view of a pool made by an op the check does not model"
                leaf.versions = [(leaf.versions[0][0], UNKNOWN)]
            return Val(leaf, index_symbols(val.dim()), shape_of(node))
        if isinstance(val, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in val):
            out = []
            for k, v in enumerate(val):
                shape = tuple(size(s) for s in v.shape)
                out.append(Val(self._leaf(f"{node.name}.{k}", shape), index_symbols(v.dim()), shape))
            return tuple(out)
        return _plain(val)

    def _views_a_pool(self, node, val: torch.Tensor) -> bool:
        for a in node.all_input_nodes:
            value, src = self.values.get(a), a.meta.get("val")
            if isinstance(value, Val) and value.root.pool and isinstance(src, torch.Tensor) \
                    and torch._C._is_alias_of(val, src):
                return True
        return False

    def _describe(self, arg):
        """What an opaque op is given: tensors by shape and contents, the rest as is."""
        if isinstance(arg, torch.fx.Node):
            value = self.values[arg]
            if isinstance(value, Val):
                return (sympy.Tuple(*value.shape), value.content())
            return _sympify(value) if not isinstance(value, tuple) else \
                tuple((sympy.Tuple(*v.shape), v.content()) if isinstance(v, Val) else _sympify(v) for v in value)
        if isinstance(arg, (list, tuple)):
            return tuple(self._describe(a) for a in arg)
        return _sympify(arg)

    def _opaque_writes(self, node) -> None:
        """An opaque op that writes an argument gives its written region fresh contents."""
        schema = getattr(node.target, "_schema", None)
        if schema is None:
            return
        for k, arg in enumerate(schema.arguments):
            if not (arg.alias_info and arg.alias_info.is_write):
                continue
            value = node.args[k] if k < len(node.args) else node.kwargs.get(arg.name)
            if isinstance(value, torch.fx.Node) and isinstance(self.values.get(value), Val):
                target = self.values[value]
                fresh = sympy.Function(f"Y[{node.name}.{arg.name}]")(*index_symbols(len(target.shape)))
                try:
                    self._write(node, target, fresh)
                except Unmodeled as why:
                    self.failures[node.name] = str(why)
                    self._unknown_write(node, target.root)

    def _unknown_write(self, node, root: Root) -> None:
        """A write this module cannot follow: a pool's contents become unknown (nothing about
        them can be proven after it); another root's become fresh contents named by the writer,
        whose inputs are among its obligations."""
        c = index_symbols(len(root.shape), "c")
        root.write(UNKNOWN if root.pool else sympy.Function(f"Z[{node.name}]")(*c))

    # -- evaluation ----------------------------------------------------------------------------

    def _eval(self, node: torch.fx.Node):
        if node.op == "placeholder":
            return self._placeholder(node)
        if node.op == "output":
            self.outputs = tuple(self._describe(a) for a in node.args[0])
            return None
        if node.op != "call_function":
            return self._opaque(node)
        if node.target is operator.getitem:
            value = self.values[node.args[0]]
            return value[node.args[1]] if isinstance(value, tuple) else _plain(node.meta.get("val"))
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) and node.target not in SPLITS:
            return _plain(val) if val is not None else self._opaque(node)
        if not any(isinstance(self.values.get(a), Val) for a in node.all_input_nodes):
            return self._opaque(node)
        x = self.values[node.args[0]] if isinstance(self.values.get(node.args[0]), Val) else None
        if _writes_self(node) and x is not None:
            return self._in_place(node, x)
        if _writes_another(node):  # an out= argument and the like: the opaque path places those writes
            return self._opaque(node)
        if node.target in (aten.index_put.default, aten.index_copy.default) and x is not None:  # on a copy
            copy = self._fresh(node, x.content(), x.shape)
            if node.target is aten.index_put.default:
                self._index_put(node, copy)
            else:
                self._index_copy(node, copy)
            return copy
        if node.target in SPLITS and x is not None:
            return tuple(Val(x.root, _substitute(x.coords, dict(zip(x_symbols(x), c))), tuple(size(s) for s in v.shape))
                         for c, v in zip(_pieces(node, x.shape), node.meta["val"]))
        if x is not None:
            coords = _view_coords(node, x.shape, shape_of(node))
            if coords is not None:
                view = Val(x.root, _substitute(x.coords, dict(zip(x_symbols(x), coords))), shape_of(node))
                if _aliases(node):
                    return view
                return self._fresh(node, _cast(node, view.content()))
        if not self._tainted(node):  # nothing of a pool in it: the same opaque value in both graphs
            return self._opaque(node)
        compute = COMPUTE.get(node.target)
        if compute is not None:
            return self._fresh(node, compute(self, node))
        if _is_pointwise(node.target):
            return self._fresh(node, self._pointwise(node))
        return self._opaque(node)

    def _placeholder(self, node):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return _plain(val)
        pool, layout = self.pools.get(node.name, (None, None))
        root = self._leaf(node.name, shape_of(node), pool, layout)
        self.roots[node.name] = root
        return Val(root, index_symbols(val.dim()), shape_of(node))

    def arg(self, node, k, default=None):
        args = node.args
        if k < len(args):
            return args[k]
        name = node.target._schema.arguments[k].name
        return node.kwargs.get(name, default)

    def broadcast(self, arg, shape) -> sympy.Expr:
        """An operand's contents at the output index (right-aligned broadcasting)."""
        if not isinstance(arg, torch.fx.Node):
            return _sympify(arg)
        value = self.values[arg]
        if not isinstance(value, Val):
            return _sympify(value)
        out = index_symbols(len(shape))
        lead = len(shape) - len(value.shape)
        mapping = {s: (sympy.Integer(0) if value.shape[k] == 1 and shape[k + lead] != 1 else out[k + lead])
                   for k, s in enumerate(x_symbols(value))}
        return value.content().xreplace(mapping)

    def _pointwise(self, node) -> sympy.Expr:
        shape = shape_of(node)
        args = [self.broadcast(a, shape) for a in node.args]
        kwargs = [sympy.Tuple(sympy.Symbol(k), _sympify(v)) for k, v in node.kwargs.items()]
        return sympy.Function(_name(node))(*args, *kwargs)

    def _in_place(self, node, x: Val):
        shape = x.shape
        if node.target in (aten.index_put_.default,):
            self._index_put(node, x)
        elif node.target is aten.copy_.default:
            self._write(node, x, self.broadcast(node.args[1], shape))
        elif node.target in (aten.fill_.Scalar, aten.fill_.Tensor):
            self._write(node, x, self.broadcast(node.args[1], shape))
        elif node.target is aten.zero_.default:
            self._write(node, x, sympy.Integer(0))
        elif node.target is aten.index_copy_.default:
            self._index_copy(node, x)
        elif node.target in (aten.scatter_.src, aten.scatter_.value):
            view = self._gathered(x, node.args[1], node.args[2])
            self._write(node, view, self.broadcast(node.args[3], view.shape))
        elif _is_pointwise(node.target):
            args = [x.content()] + [self.broadcast(a, shape) for a in node.args[1:]]
            self._write(node, x, sympy.Function(_name(node).replace("_.", "."))(*args))
        else:
            raise Unmodeled(f"an in-place {_name(node)}")
        return x

    def _index_put(self, node, x: Val) -> None:
        indices, values = node.args[1], node.args[2]
        accumulate = bool(self.arg(node, 3, False))
        view, out_shape = self._indexed(x, indices, node)
        value = self.broadcast(values, out_shape)
        if accumulate:
            value = sympy.Function("add.Tensor")(view.content(), value)
        self._write(node, view, value)

    def _gathered(self, x: Val, dim, index) -> Val:
        """x read along `dim` at index[i] (gather / scatter_'s map): a view shaped like index."""
        d = _norm(dim, len(x.shape))
        idx = self.values[index]
        if not isinstance(idx, Val):
            raise Unmodeled("a gather by something that is not an index tensor")
        sym = x_symbols(x)
        mapping = {sym[k]: sym[k] for k in range(len(x.shape))}
        mapping[sym[d]] = idx.content()
        return Val(x.root, _substitute(x.coords, mapping), idx.shape)

    def _index_copy(self, node, x: Val) -> None:
        """x.index_copy_(dim, index, source): x[..., index[j], ...] = source[..., j, ...] along dim."""
        d = _norm(node.args[1], len(x.shape))
        view, out_shape = self._indexed(x, [None] * d + [node.args[2]], node)
        self._write(node, view, self.broadcast(node.args[3], out_shape))

    def _indexed(self, x: Val, indices, node) -> tuple[Val, tuple]:
        """x[indices] as a view-like map (advanced indexing on consecutive dims)."""
        present = [k for k, t in enumerate(indices) if t is not None]
        if not present or present != list(range(present[0], present[-1] + 1)):
            raise Unmodeled("indexing by tensors on dims that are not consecutive")
        tensors = [self.values[indices[k]] for k in present]
        if not all(isinstance(t, Val) for t in tensors) or \
                any(indices[k].meta["val"].dtype == torch.bool for k in present):
            raise Unmodeled("indexing by a mask or by something that is not an index tensor")
        first = present[0]
        index_shape = _broadcast_symbolic([t.shape for t in tensors])
        if index_shape is None:
            raise Unmodeled("index tensors whose shapes do not broadcast")
        rest_before, rest_after = x.shape[:first], x.shape[present[-1] + 1:]
        out_shape = rest_before + index_shape + rest_after
        out = index_symbols(len(out_shape))
        mapping = {}
        sym = x_symbols(x)
        for k in range(first):
            mapping[sym[k]] = out[k]
        for t, k in zip(tensors, present):
            lead = len(index_shape) - len(t.shape)
            inner = {s: (sympy.Integer(0) if t.shape[m] == 1 and index_shape[m + lead] != 1 else out[first + m + lead])
                     for m, s in enumerate(x_symbols(t))}
            mapping[sym[k]] = t.content().xreplace(inner)
        for k in range(present[-1] + 1, len(x.shape)):
            mapping[sym[k]] = out[k - len(present) + len(index_shape)]
        return Val(x.root, _substitute(x.coords, mapping), out_shape), out_shape

    def _write(self, node, view: Val, value: sympy.Expr) -> None:
        root = view.root
        c = index_symbols(len(root.shape), "c")
        solution, inside = _solve(view.coords, view.shape, root.shape, c)
        j = index_symbols(len(view.shape))
        written = _resolve_inverses(sympy.sympify(value).xreplace(dict(zip(j, solution))))
        old = root.read(c)
        formula = written if inside == sympy.true else sympy.Piecewise((written, inside), (old, True))
        self.writes.append((node, root, written))
        root.tainted = root.tainted or self._tainted(node)
        root.write(formula)

    def final(self, name: str, layout: Layout | None = None) -> sympy.Expr:
        """A placeholder root's contents after the graph, at its logical coordinates when it is
        a pool (so that two layouts of one pool compare)."""
        root = self.roots[name]
        symbols, formula = root.versions[-1]
        if layout is None:
            return formula.xreplace(dict(zip(symbols, index_symbols(len(symbols), "c"))))
        logical = {a: sympy.Symbol(f"{a}", integer=True) for a in layout.axes}
        return formula.xreplace({s: logical[a] for s, a in zip(symbols, layout.axes)})


def x_symbols(value: Val) -> tuple:
    return index_symbols(len(value.shape))


def _broadcast_symbolic(shapes) -> tuple | None:
    rank = max(len(s) for s in shapes)
    out = []
    for k in range(rank):
        sizes = {s[k - rank + len(s)] for s in shapes if k - rank + len(s) >= 0} - {1}
        if len(sizes) > 1:
            return None
        out.append(sizes.pop() if sizes else sympy.Integer(1))
    return tuple(out)


def _plain(val):
    if isinstance(val, torch.SymInt | torch.SymFloat | torch.SymBool):
        return val.node.expr
    return val


def _name(node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _is_pointwise(target) -> bool:
    """Elementwise with broadcasting: tagged so, or the in-place form of an op that is (torch
    tags only some of those: masked_fill_ is not), or masked_fill by a 0-dim tensor."""
    tags = getattr(target, "tags", ())
    if torch.Tag.nondeterministic_seeded in tags:  # random draws follow memory order, not logical indices
        return False
    if target is aten.masked_fill.Tensor or torch.Tag.pointwise in tags:
        return True
    schema = getattr(target, "_schema", None)
    name = schema.name.split("::")[-1] if schema is not None else ""
    if not name.endswith("_"):
        return False
    functional = getattr(getattr(aten, name[:-1], None), target._overloadname, None)
    return functional is not None and _is_pointwise(functional)


def _writes_self(node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.arguments:
        return False
    first = schema.arguments[0].alias_info
    returned = schema.returns[0].alias_info if schema.returns else None
    return bool(first and first.is_write and returned and returned.is_write)  # returns its written self


def _writes_another(node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments[1:])


def _aliases(node) -> bool:
    """Whether the op's result shares its input's storage (from the traced fake tensors: a
    contiguous() or reshape() copies or not depending on the input's strides)."""
    val, src = node.meta.get("val"), node.args[0].meta.get("val")
    if node.target in (aten.clone.default, aten._to_copy.default, aten.lift_fresh_copy.default):
        return False
    if isinstance(val, torch.Tensor) and isinstance(src, torch.Tensor):
        return torch._C._is_alias_of(val, src)
    return node.target not in (aten.contiguous.default, aten.reshape.default, aten.to.dtype)


def _cast(node, content: sympy.Expr) -> sympy.Expr:
    val, src = node.meta.get("val"), node.args[0].meta.get("val")
    if isinstance(val, torch.Tensor) and isinstance(src, torch.Tensor) and val.dtype != src.dtype:
        return sympy.Function(f"to[{val.dtype}]")(content)
    return content


# ---------------------------------------------------------------------------------------------
# computing ops


def _flip(s: Semantics, node) -> sympy.Expr:
    value = s.values[node.args[0]]
    i = index_symbols(len(value.shape))
    dims = {_norm(d, len(value.shape)) for d in node.args[1]}
    return value.content().xreplace({i[d]: value.shape[d] - 1 - i[d] for d in dims})


def _cat(s: Semantics, node) -> sympy.Expr:
    tensors = [t for t in node.args[0] if isinstance(s.values.get(t), Val) and s.values[t].shape != (0,)]
    shape = shape_of(node)
    d = _norm(s.arg(node, 1, 0), len(shape))
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


def _roll(s: Semantics, node) -> sympy.Expr:
    value = s.values[node.args[0]]
    shifts, dims = list(s.arg(node, 1)), list(s.arg(node, 2, []))
    if len(dims) != len(shifts):
        raise Unmodeled("a roll over the flattened tensor")
    i = index_symbols(len(value.shape))
    mapping = {}
    for shift, d in zip(shifts, dims):
        d = _norm(d, len(value.shape))
        mapping[i[d]] = sympy.Mod(mapping.get(i[d], i[d]) - shift, value.shape[d])
    return value.content().xreplace(mapping)


def _reduce(s: Semantics, node) -> sympy.Expr:
    value = s.values[node.args[0]]
    rank = len(value.shape)
    dims = None if node.target is aten.sum.default else s.arg(node, 1, None)
    dims = list(range(rank)) if dims in (None, []) else [_norm(d, rank) for d in dims]
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
    symbols, body = _bind(body, tuple(bound[d] for d in dims), "r")
    return sympy.Function(_name(node))(sympy.Lambda(symbols, body), sympy.Tuple(*(value.shape[d] for d in dims)))


def _index(s: Semantics, node) -> sympy.Expr:
    view, _ = s._indexed(s.values[node.args[0]], node.args[1], node)
    return view.content()


def _index_select(s: Semantics, node) -> sympy.Expr:
    x = s.values[node.args[0]]
    d = _norm(node.args[1], len(x.shape))
    view, _ = s._indexed(x, [None] * d + [node.args[2]], node)
    return view.content()


def _gather(s: Semantics, node) -> sympy.Expr:
    return s._gathered(s.values[node.args[0]], node.args[1], node.args[2]).content()


def _stack(s: Semantics, node) -> sympy.Expr:
    tensors = [s.values[t] for t in node.args[0]]
    shape = shape_of(node)
    d = _norm(s.arg(node, 1, 0), len(shape))
    i = index_symbols(len(shape))
    pieces = []
    for k, value in enumerate(tensors):
        if not isinstance(value, Val):
            raise Unmodeled("a stack of something that is not a tensor")
        inner = {sym: (i[m] if m < d else i[m + 1]) for m, sym in enumerate(x_symbols(value))}
        pieces.append((value.content().xreplace(inner), sympy.Eq(i[d], k) if k < len(tensors) - 1 else True))
    return sympy.Piecewise(*pieces)


def _constant(s: Semantics, node) -> sympy.Expr:
    fills = {aten.zeros_like.default: 0, aten.ones_like.default: 1, aten.zeros.default: 0, aten.ones.default: 1,
             aten.new_zeros.default: 0, aten.new_ones.default: 1}
    if node.target in fills:
        return sympy.Integer(fills[node.target])
    return _sympify(node.args[1])  # full_like / new_full: the value


def _pad(s: Semantics, node) -> sympy.Expr:
    value = s.values[node.args[0]]
    pad, fill = list(node.args[1]), _sympify(s.arg(node, 2, 0) or 0)
    i = x_symbols(value)
    content, conditions = value.content(), []
    mapping = {}
    for k in range(len(pad) // 2):
        d = len(value.shape) - 1 - k
        left, n = pad[2 * k], value.shape[d]
        mapping[i[d]] = i[d] - left
        conditions += [i[d] < left, i[d] >= left + n]
    return sympy.Piecewise((fill, sympy.Or(*conditions)), (content.xreplace(mapping), True))


COMPUTE = {
    aten.cat.default: _cat,
    aten.roll.default: _roll,
    aten.flip.default: _flip,
    **{op: _reduce for op in (aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default,
                              aten.sum.default)},
    aten.index.Tensor: _index,
    aten.index_select.default: _index_select,
    aten.gather.default: _gather,
    aten.stack.default: _stack,
    **{op: _constant for op in (aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
                                aten.new_zeros.default, aten.new_ones.default, aten.new_full.default)},
    aten.constant_pad_nd.default: _pad,
}
