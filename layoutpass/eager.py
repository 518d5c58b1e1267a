"""The model's eager code in the rehearsed call: the Python between the captured layers (a parent
module's forward, a module that holds no pool) is run, not traced, so no graph shows what it does
to a pool. While the first call (and each example call) runs on its twin, a torch function mode
records what of it depends on a tensor's memory order: a read of the order itself, a `view` that
merges axes, and a write through the result of `reshape` / `flatten` / `contiguous` (a view in one
order, a copy in the other). Before that call's pools move, any such use of a pool that moves is
refused, with the line (EagerWatch).

Later calls run code the rehearsal never saw (a branch, a call structure first taken now). While
pools are moved, each later call's eager code runs under a LiveWatch: before a use that depends on
a moved pool's order runs, every pool goes back to the model's order (values kept, as when a later
layer is refused) and the views of moved pools that code holds are re-addressed to the same
elements, so the use, and everything after it, runs as written."""

import linecache
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from .errors import LayoutPassError
from .report import library
from .state import Block, readdress, relation, storage_key

ORDER_READS = frozenset({"as_strided", "data_ptr", "untyped_storage", "storage", "set_", "stride", "is_contiguous"})
MERGING_VIEWS = frozenset({"view", "view_as"})
MAYBE_COPIES = frozenset({"reshape", "reshape_as", "flatten", "contiguous"})
ORDER_OPS = ORDER_READS | MERGING_VIEWS | MAYBE_COPIES
UNBASED_ALIASES = frozenset({"__get__", "detach"})  # `.data`, `.detach()`: aliases whose _base is None
IN_PLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                              "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__"})


@dataclass(frozen=True)
class Event:
    what: str  # what the code did, in words
    line: str  # file:line: source
    tensor: torch.Tensor  # the tensor it did it to (or the one a maybe-copy was taken of)


class EagerWatch(TorchFunctionMode):
    """Records the memory-order uses of every tensor in the eager code it runs around."""

    def __init__(self):
        super().__init__()
        self.events: list[Event] = []
        self.maybe_copies: dict[int, tuple[torch.Tensor, Event]] = {}  # id(result) -> (result, its origin)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if first is None:
            return out
        origin = self.maybe_copies.get(id(first))
        written = _writes(name)
        if origin is not None and (written or id(kwargs.get("out")) in self.maybe_copies):
            self.events.append(Event(f"a write into the result of {origin[1].what}", _line(), origin[1].tensor))
        elif origin is not None and isinstance(out, torch.Tensor) and storage_key(out) == storage_key(first):
            self.maybe_copies[id(out)] = (out, origin[1])  # a view of it: writes through it count too
        if name in ORDER_READS:
            self.events.append(Event(f".{name}()", _line(), first))
        elif name in MERGING_VIEWS and isinstance(out, torch.Tensor) and _rank(out) < _rank(first):
            self.events.append(Event(f".{name}() merging axes", _line(), first))
        elif name in MAYBE_COPIES and isinstance(out, torch.Tensor) and storage_key(out) == storage_key(first):
            self.maybe_copies[id(out)] = (out, Event(f".{name}()", _line(), first))
        return out

    def refuse(self, pools: dict[str, torch.Tensor]) -> None:
        """Raise for the first recorded use of one of `pools` (name -> the tensor, about to move
        or moved): the use would read or write other elements in the new order."""
        for event in self.events:
            for name, pool in pools.items():
                if storage_key(event.tensor) == storage_key(pool) and relation(pool, event.tensor) in ("same", "overlap"):
                    raise EagerOrderUse(f"{event.what} of pool {name!r} at {event.line} runs outside the captured "
                                        f"graphs (eager code) and depends on the pool's memory order, which is about "
                                        f"to change: use logical indexing, or move that code into a layer's forward "
                                        f"(nothing moved)")


class LiveWatch(TorchFunctionMode):
    """A later call's eager code while pools are moved (`blocks`: each moved pool as it is stored
    now, with the strides it has in the model's order). `revert(what)` puts every pool back in
    the model's order; it is called before the first use that would address other elements, or
    alias otherwise, there. A `reshape` / `flatten` / `contiguous` that is a copy here and a view
    there is let be a copy until it is written, or read after the pool was written (`writes`
    counts the pool writes: layer calls and in-place ops): then the pools go back and the copy
    (with its views) becomes the view of the pool it is in the model's order."""

    def __init__(self, blocks: list[tuple[Block, tuple]], revert: Callable[[str], None]):
        super().__init__()
        self.blocks = blocks
        self.storages = {b.storage for b, _ in blocks}  # emptied once the pools are back
        self.views: list[weakref.ref] = []  # views of moved pools the eager code made
        self.copies: dict[tuple, _Copy] = {}  # storage of a copy that is a view in the model's order
        self.writes = 0
        self.revert = revert

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not (self.storages or self.copies):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if self.copies:
            self._settle_stale(name, args, kwargs, first is not None and _writes(name))
        copied = False
        if name in ORDER_OPS and first is not None and self.storages and storage_key(first) in self.storages:
            kind = self._kind(func, name, args, kwargs)
            if kind == "order":
                self._revert(f"{_describe(name)} of a moved pool at {_line()}")
            copied = kind == "copy"
        out = func(*args, **kwargs)
        if copied:
            self.copies[storage_key(out)] = _Copy(Block.of(out), [weakref.ref(out)], func, args, kwargs, self.writes)
        else:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                # a view; `.data` or `.detach()`; anything in inference mode (no view has a _base there)
                if isinstance(t, torch.Tensor) and (t._base is not None or name in UNBASED_ALIASES or t.is_inference()):
                    self._track(t)
        if self.copies and self.storages and any(isinstance(t, torch.Tensor) and storage_key(t) in self.storages
                                                 for t in ((first,) if _writes(name) else ()) + (kwargs.get("out"),)):
            self.writes += 1  # a pool written: the copies taken of it before are stale
        return out

    def _kind(self, func, name: str, args: tuple, kwargs: dict) -> str | None:
        """"order": the use depends on the pool's order; "copy": a copy here, a view in the
        model's order; None: the same elements in any order."""
        first = args[0]
        if name in ORDER_READS:
            return "order"
        if name in MERGING_VIEWS:
            if any(isinstance(a, torch.dtype) for a in args[1:]):
                return "order"
            shape = args[1].shape if name == "view_as" else args[1:] if isinstance(args[1], int) else args[1]
            merged = _merges(tuple(first.shape), tuple(torch.empty(first.shape, device="meta").view(*shape).shape))
            return "order" if merged else None
        there = self._as_written(first)
        if there is None:
            return "order"
        with torch.inference_mode(False):  # in inference mode no view knows it is one
            here = torch.empty_strided(first.shape, first.stride(), dtype=first.dtype, device="meta")
            view_here, view_there = (_aliases(func(t, *args[1:], **kwargs), t) for t in (here, there))
        return None if view_here == view_there else "copy" if view_there else "order"

    def _as_written(self, t: torch.Tensor) -> torch.Tensor | None:
        """A meta tensor with the strides `t` has in the model's order (None: no plain view of a pool)."""
        for block, strides in self.blocks:
            found = readdress(t, block, strides)
            if found is not None:
                with torch.inference_mode(False):
                    return torch.empty_strided(t.shape, found[1], dtype=t.dtype, device="meta")
        return None

    def _track(self, view: torch.Tensor) -> None:
        """Remember a view of a moved pool, or of such a copy."""
        key = storage_key(view)
        if key in self.storages:
            self.views.append(weakref.ref(view))
        elif key in self.copies:
            self.copies[key].tensors.append(weakref.ref(view))

    def _settle_stale(self, name: str, args: tuple, kwargs: dict, written: bool) -> None:
        """A copy written, or read after the pool was written: from now on the view it is there."""
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        for t in tensors:
            c = self.copies.get(storage_key(t))
            if c is not None and not any(r() is not None for r in c.tensors):  # freed: its memory may be reused
                del self.copies[storage_key(t)]
            elif c is not None and (c.made < self.writes or (written and t is args[0]) or t is kwargs.get("out")):
                self._revert(f"{_describe(c.func.__name__)} of a moved pool (a copy in its new order), used at "
                             f"{_line()}")
                self._rebind(self.copies.pop(storage_key(t)))

    def _revert(self, what: str) -> None:
        if self.storages:
            self.revert(what)
            self.storages = set()

    @staticmethod
    def _rebind(c: "_Copy") -> None:
        """Point the copy and its views at the view of the pool the model's code had."""
        view = c.func(*c.args, **c.kwargs)  # the pools are in the model's order now
        with torch.no_grad():
            for t in [r() for r in c.tensors]:
                found = readdress(t, c.block, tuple(view.stride())) if t is not None else None
                if found is not None:
                    t.set_(view.untyped_storage(), found[0] - c.block.offset + view.storage_offset(), t.shape, found[1])

    def targets(self) -> list[tuple[torch.Tensor, int, tuple]]:
        """(view, storage offset, strides) that address each live view's elements in the model's order."""
        out = []
        for ref in self.views:
            view = ref()
            for block, strides in self.blocks if view is not None else ():
                found = readdress(view, block, strides)
                if found is not None:
                    out.append((view, *found))
                    break
        return out


@dataclass
class _Copy:
    """A copy of a moved pool that is a view of it in the model's order."""
    block: Block  # the copy as made
    tensors: list  # weak references to it and to the views of it the eager code made
    func: Callable  # what made it, from args and kwargs
    args: tuple
    kwargs: dict
    made: int  # LiveWatch.writes when it was made


class EagerOrderUse(LayoutPassError):
    """Eager code around the graphs uses a pool's memory order."""


def _merges(shape: tuple, into: tuple) -> bool:
    """Whether viewing `shape` as `into` merges axes (splitting and adding or removing size-1
    axes address the same elements in any memory order; merging does not)."""
    a, b = [n for n in shape if n != 1], [n for n in into if n != 1]
    i = j = 0
    while i < len(a) and j < len(b):
        product = 1
        while j < len(b) and product < a[i]:
            product, j = product * b[j], j + 1
        if product != a[i]:
            return True
        i += 1
    return False


def _aliases(result: torch.Tensor, t: torch.Tensor) -> bool:
    return result is t or result._is_view()


def _writes(name: str) -> bool:
    """Whether the torch function of this name writes its first argument."""
    return name in IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("_"))


def _describe(name: str) -> str:
    return f".{name}()" + (" merging axes" if name in MERGING_VIEWS else "")


def _rank(t: torch.Tensor) -> int:
    return sum(n != 1 for n in t.shape)


def _line() -> str:
    """file:line: source of the model's code running now (the first frame outside torch and
    layoutpass)."""
    frame, skip = sys._getframe(2), library()
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    where = frame.f_code.co_filename
    return f"{where.rsplit('/', 1)[-1]}:{frame.f_lineno}: {linecache.getline(where, frame.f_lineno).strip()}"
