"""What a captured graph computes, element by element, as sympy formulas.

Every tensor is a view of a *root* (a placeholder, or the fresh result of a computing op):
`Val(root, coords)`, where `coords` give the root element that element `(i0, i1, ...)` of the
view reads. A root's contents are a list of versions, each a formula over the root's own
index; an in-place write appends a version (a Piecewise: the written region takes the new
values, the rest keeps the old ones), so a view read after a write sees the write, as in
eager PyTorch. Each op's meaning comes from the op registry (layoutpass.registry): the index
map of a view, the formula of a computing or writing op (layoutpass.formulas); pointwise ops
are uninterpreted functions. Ops it does not model are opaque: their outputs are fresh symbols
and the contents of their inputs are recorded as the op's *obligations*.

A conv-state pool's root reads `P[name](slot, tok, dim)` at its *logical* coordinates, through
the layout it is stored in: two graphs over the same pool stored in different layouts mean the
same thing exactly when their obligations, outputs and final contents are the same formulas.
layoutpass.verify checks that; layoutpass.discover reads a pool's token axis off its writes."""

import operator

import sympy
import torch
import torch.fx

from .formulas import (UNKNOWN, Root, Unmodeled, Val, as_sympy, bind, dim_of, index_symbols, op_name, shape_of, size,
                       x_symbols)
from .layout import Layout
from .registry import Memory, facts, pointwise

aten = torch.ops.aten
CANONICAL = ("slot", "snap", "head", "tok", "dim", "k", "v")  # the argument order of every pool symbol


def canonical(axes: tuple[str, ...]) -> list[str]:
    """A pool's axes in the argument order of its symbol (named axes first, in CANONICAL's
    order; others, such as discovery's d0, d1, ..., by position)."""
    return sorted(axes, key=lambda a: (CANONICAL.index(a), 0) if a in CANONICAL else (len(CANONICAL), axes.index(a)))


def _substitute(coords, mapping) -> tuple:
    return tuple(sympy.sympify(c).xreplace(mapping) for c in coords)


def _size_args(node) -> tuple:
    """The node's arguments with sizes computed in the graph (dynamic shapes: a slice ending at
    `tokens - 1`) as their sympy expressions."""
    return node.args[:1] + torch.fx.node.map_arg(node.args[1:], lambda a: as_sympy(a.meta.get("val", a)))


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
            bound, body = bind(e, (k,), "k")
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


def _raised_in_sympy(err: Exception) -> bool:
    """Whether sympy itself raised `err` (a comparison it cannot decide, say, on the formulas
    torch 2.11's trace gives): that node is then unmodeled, not a failure of the pass."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("sympy")


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
                try:
                    self.values[node] = self._eval(node)
                except (TypeError, ValueError) as err:
                    if not _raised_in_sympy(err):
                        raise
                    raise Unmodeled(f"the formulas' algebra could not follow it (sympy: {err})") from None
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
        if Memory.STRIDED in facts(node.target).memory:  # reads memory: the storage layout is part of its input
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
            return as_sympy(value) if not isinstance(value, tuple) else \
                tuple((sympy.Tuple(*v.shape), v.content()) if isinstance(v, Val) else as_sympy(v) for v in value)
        if isinstance(arg, (list, tuple)):
            return tuple(self._describe(a) for a in arg)
        return as_sympy(arg)

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
                    self.write_view(node, target, fresh)
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
        val, op = node.meta.get("val"), facts(node.target)
        if not isinstance(val, torch.Tensor) and op.split is None:
            return _plain(val) if val is not None else self._opaque(node)
        if not any(isinstance(self.values.get(a), Val) for a in node.all_input_nodes):
            return self._opaque(node)
        x = self.values[node.args[0]] if isinstance(self.values.get(node.args[0]), Val) else None
        if _writes_self(node) and x is not None:
            return self._in_place(node, x)
        if _writes_another(node):  # an out= argument and the like: the opaque path places those writes
            return self._opaque(node)
        if op.write is not None and x is not None:  # the functional form of a write: on a copy
            copy = self._fresh(node, x.content(), x.shape)
            op.write(self, node, copy)
            return copy
        if op.split is not None and x is not None:
            return tuple(Val(x.root, _substitute(x.coords, dict(zip(x_symbols(x), c))), tuple(size(s) for s in v.shape))
                         for c, v in zip(op.split(node, x.shape), node.meta["val"]))
        if op.view is not None and x is not None:
            coords = op.view(x.shape, shape_of(node), *_size_args(node)[1:])
            view = Val(x.root, _substitute(x.coords, dict(zip(x_symbols(x), coords))), shape_of(node))
            if _aliases(node):
                return view
            return self._fresh(node, _cast(node, view.content()))
        if not self._tainted(node):  # nothing of a pool in it: the same opaque value in both graphs
            return self._opaque(node)
        if op.formula is not None:
            return self._fresh(node, op.formula(self, node))
        if pointwise(node.target):
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
            return as_sympy(arg)
        value = self.values[arg]
        if not isinstance(value, Val):
            return as_sympy(value)
        out = index_symbols(len(shape))
        lead = len(shape) - len(value.shape)
        mapping = {s: (sympy.Integer(0) if value.shape[k] == 1 and shape[k + lead] != 1 else out[k + lead])
                   for k, s in enumerate(x_symbols(value))}
        return value.content().xreplace(mapping)

    def _pointwise(self, node) -> sympy.Expr:
        shape = shape_of(node)
        args = [self.broadcast(a, shape) for a in node.args]
        kwargs = [sympy.Tuple(sympy.Symbol(k), as_sympy(v)) for k, v in node.kwargs.items()]
        return sympy.Function(op_name(node))(*args, *kwargs)

    def _in_place(self, node, x: Val):
        write = facts(node.target).write
        if write is not None:
            write(self, node, x)
        elif pointwise(node.target):
            args = [x.content()] + [self.broadcast(a, x.shape) for a in node.args[1:]]
            self.write_view(node, x, sympy.Function(op_name(node).replace("_.", "."))(*args))
        else:
            raise Unmodeled(f"an in-place {op_name(node)}")
        return x

    def gathered(self, x: Val, dim, index) -> Val:
        """x read along `dim` at index[i] (gather / scatter_'s map): a view shaped like index."""
        d = dim_of(dim, len(x.shape))
        idx = self.values[index]
        if not isinstance(idx, Val):
            raise Unmodeled("a gather by something that is not an index tensor")
        sym = x_symbols(x)
        mapping = {sym[k]: sym[k] for k in range(len(x.shape))}
        mapping[sym[d]] = idx.content()
        return Val(x.root, _substitute(x.coords, mapping), idx.shape)

    def indexed(self, x: Val, indices, node) -> tuple[Val, tuple]:
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

    def write_view(self, node, view: Val, value: sympy.Expr) -> None:
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
