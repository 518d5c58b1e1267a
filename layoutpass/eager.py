"""The model's eager code in the rehearsed call: the Python between the captured layers (a parent
module's forward, a module that holds no pool) is run, not traced, so no graph shows what it does
to a pool. While the first call (and each example call) runs on its twin, a torch function mode
records what of it depends on a tensor's memory order: a read of the order itself, a `view` that
merges axes, and a write through the result of `reshape` / `flatten` / `contiguous` (a view in one
order, a copy in the other). Before that call's pools move, any such use of a pool that moves is
refused, with the line. Only the code that call runs is seen."""

import linecache
import sys
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from .errors import LayoutPassError
from .report import library
from .state import relation, storage_key

ORDER_READS = frozenset({"as_strided", "data_ptr", "untyped_storage", "storage", "set_", "stride", "is_contiguous"})
MERGING_VIEWS = frozenset({"view", "view_as"})
MAYBE_COPIES = frozenset({"reshape", "reshape_as", "flatten", "contiguous"})
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
        written = name in IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("_"))
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


class EagerOrderUse(LayoutPassError):
    """Eager code around the graphs uses a pool's memory order."""


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
