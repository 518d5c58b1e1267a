"""What the pass knows about each op: one table keyed by op (OPS), each entry (Facts) the
op's facts for every part of the pass, as TVM registers FInferCorrectLayout on an op.

- kind, sink: the report's class of a pool's use by the op, and the rewriter's rule that sinks
  a pending permutation below it (rewrites/permutes.py);
- permutation: a permutation op's spelling, (rank, *args after self) -> the permutation;
- view, split, formula, write: the op's meaning for the checker (layoutpass/formulas.py);
- memory: how its result depends on memory order rather than logical indices (Memory);
- rows: what it does to the slot rows of a container (Rows, the slot-wise check);
- state: the argument through which it keeps a pool's state, and the axes it reads it in
  (discovery);
- stride_agnostic: a custom op declared correct for inputs of any strides.

An op not in the table computes on logical indices and nothing more is known of it: the
checker treats it as opaque (or pointwise, by its tags), the rewriter keeps it reading the
pool's permuted view. Ops defined elsewhere (the kernels, the examples', a user's) declare
their own facts when they are defined: register_state, register_stride_agnostic."""

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum, Flag, auto

import torch
import torch.fx

from layoutpass.rewrites.permutes import (folding, moved, sink_binary, sink_cat, sink_contiguous, sink_copy,
                                          sink_fill, sink_index, sink_index_put, sink_reduce, sink_roll,
                                          sink_same_shape, sink_select, sink_slice, sink_view, swap)

from .formulas import (cat_formula, constant, expand_view, flip_formula, full_formula, gather_formula, index_formula,
                       index_select_formula, narrow_view, pad_formula, permuting, reduce_formula, reshape_view,
                       roll_formula, same_view, select_view, slice_view, split_pieces, squeeze_view, stack_formula,
                       unbind_pieces, unsqueeze_view, write_index_copy, write_index_put, write_scatter, write_value,
                       write_zero)
from .report import Kind

aten = torch.ops.aten
KERNEL_ORDER = ("slot", "dim", "tok")  # the axes the conv ops read a conv pool's state in


class Memory(Flag):
    """How an op's result depends on memory order rather than on logical indices."""

    STRIDED = auto()  # reads or sets strides itself (as_strided, set_): refused on a tensor whose strides move
    ORDER = auto()  # reinterprets its input in memory order (view, reshape): no pending permutation passes it
    MAYBE_COPY = auto()  # copies or aliases depending on its input's strides (contiguous, reshape)
    FILL = auto()  # fills its input in place and returns it, whatever its layout


class Rows(Enum):
    """What an op does to a container's slot rows, when it keeps them whole."""

    INDEX = "index"  # picks rows along the slot axis
    COPY = "copy"  # copies or views the rows as they are
    WRITE = "write"  # writes rows from rows or per-slot values


@dataclass(frozen=True)
class State:
    """An op's pool state: its argument (by position), and the axes the op reads it in, or a
    function of the node giving them (None: no pool). A state without the "snap" axis is read
    without it."""

    argument: int
    axes: tuple[str, ...] | Callable

    def axes_for(self, node: torch.fx.Node, rank: int) -> tuple[str, ...] | None:
        axes = self.axes(node) if callable(self.axes) else self.axes
        return axes if axes is None or rank == len(axes) else tuple(a for a in axes if a != "snap")


@dataclass(frozen=True)
class Facts:
    """One op's entry (its fields as the module says; None: not known of it)."""

    kind: Kind | None = None
    sink: Callable | None = None
    permutation: Callable | None = None
    view: Callable | None = None
    split: Callable | None = None
    formula: Callable | None = None
    write: Callable | None = None
    memory: Memory = Memory(0)
    rows: Rows | None = None
    state: State | None = None
    stride_agnostic: bool = False


def _permutation(spelling, rows: Rows | None = None) -> Facts:
    return Facts(kind=Kind.PERMUTATION, sink=folding(spelling), permutation=spelling, view=permuting(spelling),
                 rows=rows)


def _identity(rank: int) -> tuple[int, ...]:
    return tuple(range(rank))


_AGNOSTIC, _AXIS = Kind.AGNOSTIC, Kind.AXIS

OPS: dict = {
    # permutations: fold into the pending one; views that permute the index
    aten.permute.default: _permutation(lambda rank, dims: tuple(d % rank for d in dims)),
    aten.transpose.int: _permutation(swap),
    aten.swapaxes.default: _permutation(swap),
    aten.swapdims.default: _permutation(swap),
    aten.movedim.int: _permutation(moved),
    aten.t.default: _permutation(lambda rank: swap(rank, 0, 1) if rank == 2 else _identity(rank)),
    aten.numpy_T.default: _permutation(lambda rank: tuple(reversed(range(rank)))),
    aten.mT.default: _permutation(lambda rank: swap(rank, -1, -2)),
    aten.adjoint.default: _permutation(lambda rank: swap(rank, -1, -2)),
    aten.alias.default: _permutation(_identity, Rows.COPY),
    aten.detach.default: _permutation(_identity, Rows.COPY),
    # views of one axis
    aten.select.int: Facts(kind=_AXIS, sink=sink_select, view=select_view, rows=Rows.INDEX),
    aten.slice.Tensor: Facts(kind=_AXIS, sink=sink_slice, view=slice_view, rows=Rows.INDEX),
    aten.narrow.default: Facts(view=narrow_view),
    aten.unsqueeze.default: Facts(view=unsqueeze_view, rows=Rows.COPY),
    aten.squeeze.dim: Facts(view=squeeze_view, rows=Rows.COPY),
    aten.squeeze.dims: Facts(view=squeeze_view),
    aten.squeeze.default: Facts(view=squeeze_view),
    aten.expand.default: Facts(view=expand_view, rows=Rows.COPY),
    # reshapes: views in memory order
    aten.view.default: Facts(kind=_AGNOSTIC, sink=sink_view, view=reshape_view, memory=Memory.ORDER, rows=Rows.COPY),
    aten._unsafe_view.default: Facts(kind=_AGNOSTIC, sink=sink_view, view=reshape_view,
                                     memory=Memory.STRIDED | Memory.ORDER),
    aten.reshape.default: Facts(kind=_AGNOSTIC, sink=sink_view, view=reshape_view,
                                memory=Memory.ORDER | Memory.MAYBE_COPY, rows=Rows.COPY),
    aten.flatten.using_ints: Facts(view=reshape_view, memory=Memory.ORDER | Memory.MAYBE_COPY),
    aten.unflatten.int: Facts(view=reshape_view, memory=Memory.ORDER),
    aten.view_as.default: Facts(view=reshape_view, memory=Memory.ORDER),
    aten.reshape_as.default: Facts(view=reshape_view),
    # memory itself
    aten.as_strided.default: Facts(memory=Memory.STRIDED | Memory.ORDER),
    aten.as_strided_.default: Facts(memory=Memory.STRIDED | Memory.ORDER),
    **dict.fromkeys((aten.as_strided_scatter.default, aten.set_.source_Tensor, aten.set_.source_Storage,
                     aten.set_.source_Storage_storage_offset, aten._reshape_alias.default),
                    Facts(memory=Memory.STRIDED)),
    # copies: element i is element i
    aten.contiguous.default: Facts(kind=_AGNOSTIC, sink=sink_contiguous, view=same_view, memory=Memory.MAYBE_COPY,
                                   rows=Rows.COPY),
    aten.clone.default: Facts(kind=_AGNOSTIC, sink=sink_same_shape, view=same_view, rows=Rows.COPY),
    aten._to_copy.default: Facts(kind=_AGNOSTIC, sink=sink_same_shape, view=same_view, rows=Rows.COPY),
    aten.to.dtype: Facts(view=same_view, rows=Rows.COPY),
    aten.to.dtype_layout: Facts(view=same_view),
    aten.lift_fresh_copy.default: Facts(view=same_view),
    # splits
    **dict.fromkeys((aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default), Facts(split=split_pieces)),
    aten.unbind.int: Facts(split=unbind_pieces),
    # indexing
    aten.index.Tensor: Facts(kind=_AXIS, sink=sink_index, formula=index_formula, rows=Rows.INDEX),
    aten.index_select.default: Facts(formula=index_select_formula, rows=Rows.INDEX),
    aten.gather.default: Facts(formula=gather_formula),
    # writes (the functional index_put / index_copy write a copy)
    **dict.fromkeys((aten.index_put_.default, aten.index_put.default),
                    Facts(kind=_AXIS, sink=sink_index_put, write=write_index_put, rows=Rows.WRITE)),
    **dict.fromkeys((aten.index_copy_.default, aten.index_copy.default), Facts(write=write_index_copy, rows=Rows.WRITE)),
    aten.copy_.default: Facts(kind=_AXIS, sink=sink_copy, write=write_value, rows=Rows.WRITE),
    **dict.fromkeys((aten.fill_.Scalar, aten.fill_.Tensor),
                    Facts(kind=_AGNOSTIC, sink=sink_fill, write=write_value, memory=Memory.FILL, rows=Rows.WRITE)),
    aten.zero_.default: Facts(kind=_AGNOSTIC, sink=sink_fill, write=write_zero, memory=Memory.FILL, rows=Rows.WRITE),
    **dict.fromkeys((aten.scatter_.src, aten.scatter_.value), Facts(write=write_scatter)),
    # computing ops
    aten.cat.default: Facts(kind=_AXIS, sink=sink_cat, formula=cat_formula),
    aten.roll.default: Facts(kind=_AXIS, sink=sink_roll, formula=roll_formula),
    aten.flip.default: Facts(formula=flip_formula),
    **dict.fromkeys((aten.sum.dim_IntList, aten.mean.dim, aten.amax.default),
                    Facts(kind=_AXIS, sink=sink_reduce, formula=reduce_formula)),
    **dict.fromkeys((aten.amin.default, aten.sum.default), Facts(formula=reduce_formula)),
    aten.stack.default: Facts(formula=stack_formula),
    **dict.fromkeys((aten.zeros_like.default, aten.new_zeros.default), Facts(formula=constant(0))),
    **dict.fromkeys((aten.ones_like.default, aten.new_ones.default), Facts(formula=constant(1))),
    **dict.fromkeys((aten.full_like.default, aten.new_full.default), Facts(formula=full_formula)),
    aten.constant_pad_nd.default: Facts(formula=pad_formula),
    # elementwise: the checker reads them off their tags
    **dict.fromkeys((aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor),
                    Facts(kind=_AGNOSTIC, sink=sink_binary)),
    **dict.fromkeys((aten.silu.default, aten.neg.default, aten.exp.default, aten.sigmoid.default, aten.mul.Scalar,
                     aten.add.Scalar), Facts(kind=_AGNOSTIC, sink=sink_same_shape)),
}
_NOTHING = Facts()


def facts(target) -> Facts:
    """What the pass knows about an op (a node's target)."""
    return OPS.get(target, _NOTHING)


def _declare(op, **more) -> None:
    OPS[op] = replace(facts(op), **more)


def register_state(op: torch._ops.OpOverload, argument: str, axes: tuple[str, ...] | Callable) -> None:
    """Declare that `op` keeps a pool's state in its `argument` (by name), read in `axes` (the
    pool's axes in the op's order, "snap" left out when the state has none; or a function of
    the node giving them, or None). A tensor that reaches that argument through views is a
    pool, its axes named by the op's."""
    names = [a.name for a in op._schema.arguments]
    _declare(op, state=State(names.index(argument), axes))


def register_stride_agnostic(op) -> None:
    """Declare a custom op (an OpOverloadPacket or OpOverload) correct for inputs of any strides,
    so a relayouted pool may reach it."""
    _declare(op, stride_agnostic=True)


def conv_state(target) -> int | None:
    """The argument of a conv op (one that reads its state in KERNEL_ORDER) that takes its
    pool, or None."""
    state = facts(target).state
    return state.argument if state is not None and state.axes == KERNEL_ORDER else None


def permutation_of(node: torch.fx.Node) -> tuple[int, ...]:
    """The permutation a permutation op applies to its input."""
    rank = len(node.meta["val"].shape) if "val" in node.meta else node.meta["lp_rank"]
    return facts(node.target).permutation(rank, *node.args[1:])


def pointwise(target) -> bool:
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
    return functional is not None and pointwise(functional)
