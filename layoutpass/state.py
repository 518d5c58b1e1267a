"""The state a model keeps between calls, and moving a pool to another memory order.

State is every tensor the model's modules hold that is not a parameter: buffers, tensor
attributes, and tensors inside plain lists, tuples and dicts of them (vLLM binds
`self.kv_cache = [(conv_state, ssm_state)]`). Each has a path (`mixers.0.conv_state`,
`mixers.0.kv_cache[0][1]`) in the spelling capture.py reads off Dynamo's sources.

A pool moves the way a tensor goes channels_last: its shape stays, its strides change, in its
own storage. Every tensor object that is the same view of that storage (one tensor registered
twice, a buffer also kept in a list) changes with it. A view whose slot rows contain the
pool's (vLLM's raw per-slot pages, the pools carved out of them) is its *container*: the pool
moves inside each slot's row, so slot-wise uses of the container (resetting or copying whole
slots) stay correct, and graphs are held to exactly those (layoutpass/prove.py). Any other
overlapping view is refused, naming both."""

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LayoutPassError
from .layout import Layout, dense_strides, order_of

_MODULE_FIELDS = frozenset(vars(nn.Module()).keys())  # nn.Module's own bookkeeping, not the model's state
_DEPTH = 4  # containers nested deeper than this are not searched


class AliasedPool(LayoutPassError):
    """A pool's storage is also seen through another view the pass cannot move with it."""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def state_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every state tensor reachable from `module` (shared ones under each path)."""
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for name, t in own_state(sub):
            yield _join(prefix, name), t


def own_state(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The state tensors a module keeps itself (not through its submodules)."""
    for name, buf in module._buffers.items():
        if buf is not None:
            yield name, buf
    for name, value in vars(module).items():
        if name not in _MODULE_FIELDS and not isinstance(value, nn.Module):
            yield from _inside(name, value, 0)


def _inside(path: str, value, depth: int) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        if not isinstance(value, nn.Parameter):
            yield path, value
    elif depth < _DEPTH and isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _inside(f"{path}[{i}]", item, depth + 1)
    elif depth < _DEPTH and isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, (str, int)):
                yield from _inside(f"{path}[{key!r}]", item, depth + 1)


_STEP = re.compile(r"\.?(\w+)|\[(-?\d+|'[^']*')\]")


def resolve(module: nn.Module, path: str):
    """The object at `path` under module (attributes, submodules, buffers, items)."""
    value, at = module, 0
    while at < len(path):
        m = _STEP.match(path, at)
        if m is None:
            raise KeyError(path)
        name, index = m.groups()
        value = getattr(value, name) if name else value[int(index) if index[0] != "'" else index[1:-1]]
        at = m.end()
    return value


def storage_key(t: torch.Tensor) -> tuple:
    return t.device, t.untyped_storage().data_ptr()


def view_key(t: torch.Tensor) -> tuple:
    return place_key(t) + (tuple(t.stride()),)


def place_key(t: torch.Tensor) -> tuple:
    """Where a tensor's elements start and what they are, whatever their order: a pool keeps
    this key when it moves."""
    return storage_key(t) + (t.storage_offset(), tuple(t.shape), t.dtype)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def refuse_in_graph_capture(what: str) -> None:
    """State rewritten while a CUDA graph is being captured would be recorded, not done, and then
    done again at every replay of the graph: refused, before anything is recorded."""
    if _capturing():
        raise LayoutPassError(f"{what} inside a CUDA graph capture: the graph would redo it at every replay; run "
                              f"this call once outside the capture first (nothing moved)")


def move(module: nn.Module, path: str, axes: Layout, order: Layout, chunk_bytes: int = 1 << 28,
         follow: bool = False) -> tuple[str, ...]:
    """Store the pool at `path` (shaped along `axes`) in memory `order`, in its own storage:
    each slot's state is rewritten in place, a chunk of slots at a time (bounded scratch), and
    every tensor object that is the same view takes the new strides. Returns the paths that
    moved. Raises AliasedPool (nothing moved) when another view shares the bytes; with `follow`
    (a moved pool put back: views of it the model made since are of the moved pool), a view of
    some of its elements is re-addressed to the same elements instead."""
    pool = resolve(module, path)
    if order_of(axes, tuple(pool.shape), tuple(pool.stride())) is None:
        raise LayoutPassError(f"pool {path!r} {tuple(pool.shape)} with strides {tuple(pool.stride())}: its slots are "
                              "not dense blocks, so it cannot be stored in another order in place")
    slot = axes.axes.index("slot")
    strides = dense_strides(axes, order, tuple(pool.shape), pool.stride(slot))
    views = aliases(module, pool)
    followed = {}
    for p in [p for p, r in views.items() if r == "overlap"] if follow else ():
        found = readdress(resolve(module, p), Block.of(pool), strides)
        if found is not None:
            followed[p] = found
            del views[p]
    refuse_overlaps(path, views)
    same = [p for p, r in views.items() if r == "same"]
    if tuple(pool.stride()) == strides:
        return tuple(same)
    _rewrite(pool, strides, slot, chunk_bytes)
    storage, offset = pool.untyped_storage(), pool.storage_offset()
    with torch.no_grad():
        for p in same:
            t = resolve(module, p)
            if t.stride() != strides:
                t.set_(storage, offset, t.shape, strides)
        for p, (at, steps) in followed.items():
            t = resolve(module, p)
            t.set_(storage, at, t.shape, steps)
    return tuple(same)


def readdress(view: torch.Tensor, block: "Block", strides: tuple) -> tuple[int, tuple] | None:
    """The storage offset and strides that address the elements `view` addresses in `block` once
    the block is stored with `strides`; None when `view` is not a plain view of the block's
    elements (outside it, another dtype, or stepping across its axes)."""
    if view.dtype != block.dtype or storage_key(view) != block.storage:
        return None
    axes = sorted((a for a, n in enumerate(block.shape) if n > 1), key=lambda a: -block.strides[a])

    def index(distance: int) -> list[int] | None:
        at = [0] * len(block.shape)
        for a in axes:
            at[a], distance = divmod(distance, block.strides[a])
        return at if distance == 0 and all(i < n for i, n in zip(at, block.shape)) else None

    start = index(view.storage_offset() - block.offset) if view.storage_offset() >= block.offset else None
    if start is None:
        return None
    new, corner = [], list(start)
    for size, stride in zip(view.shape, view.stride()):
        step = index(stride) if size > 1 and stride else [0] * len(block.shape)
        if step is None:
            return None
        corner = [c + (size - 1) * s for c, s in zip(corner, step)]
        new.append(sum(i * s for i, s in zip(step, strides)) if size > 1 else stride)
    if any(c >= n for c, n in zip(corner, block.shape)):
        return None
    return block.offset + sum(i * s for i, s in zip(start, strides)), tuple(new)


@dataclass(frozen=True)
class Block:
    """Where a pool's elements are and how they are addressed now."""
    storage: tuple
    offset: int
    shape: tuple
    strides: tuple
    dtype: torch.dtype

    @staticmethod
    def of(t: torch.Tensor) -> "Block":
        return Block(storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def aliases(module: nn.Module, pool: torch.Tensor) -> dict[str, str]:
    """Every state tensor sharing bytes with `pool`, by path: "same" (the same view),
    "container" (its slot rows hold the pool's), or "overlap" (anything else)."""
    out = {}
    for p, t in state_tensors(module):
        if storage_key(t) == storage_key(pool) and t.untyped_storage().nbytes():
            r = relation(pool, t)
            if r != "disjoint":
                out[p] = r
    return out


def refuse_overlaps(path: str, views: dict[str, str]) -> None:
    other = [p for p, r in views.items() if r == "overlap"]
    if other:
        raise AliasedPool(f"pool {path!r} shares its memory with {other[0]!r}, another view of the same bytes that "
                          f"does not hold whole slots of it: moving {path!r} would change what {other[0]!r} reads")


def relation(pool: torch.Tensor, other: torch.Tensor) -> str:
    if view_key(other) == view_key(pool):
        return "same"
    if other.dim() and other.shape[0] == pool.shape[0] and other.stride(0) == pool.stride(0):
        a0, a1 = pool.storage_offset(), pool.storage_offset() + _extent(pool)
        b0, b1 = other.storage_offset(), other.storage_offset() + _extent(other)
        if a1 <= b0 or b1 <= a0:
            return "disjoint"  # side by side in every slot's row
        return "container" if b0 <= a0 and a1 <= b1 else "overlap"
    a0, b0 = pool.storage_offset(), other.storage_offset()
    if a0 + _extent(pool, 0) <= b0 or b0 + _extent(other, 0) <= a0:
        return "disjoint"
    return "overlap"


def _extent(t: torch.Tensor, first: int = 1) -> int:
    """Elements spanned by one slot (first=1) or by the whole tensor (first=0)."""
    return 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape[first:], t.stride()[first:]))


def logical_state(module: nn.Module, moved: dict[str, tuple[Layout, Layout]]) -> dict[str, torch.Tensor]:
    """Every state tensor by path, as the model would hold it: a container of moved pools (path
    -> (axes, the model's order) in `moved`) is given back with those pools' bytes in the
    model's order, so it compares element by element with the model's own."""
    tensors = dict(state_tensors(module))
    inside: dict[str, list[str]] = {}
    for name in moved:
        for path, r in aliases(module, tensors[name]).items():
            if r == "container":
                inside.setdefault(path, []).append(name)
    for path, names in inside.items():
        tensors[path] = relaid(tensors[path], tensors[path], [(tensors[n], *moved[n]) for n in names])
    return tensors


@torch.no_grad()
def relaid(values: torch.Tensor, container: torch.Tensor, pools: list, into_model: bool = True) -> torch.Tensor:
    """`values` (a tensor shaped like `container`) on fresh memory laid out as the container's
    storage, each moved pool's bytes inside it rewritten from the pool's order to the model's
    (into_model) or back: pools is [(pool, axes, the model's order)]. state_dict and
    load_state_dict move raw pages through this; equivalence compares them through it."""
    storage = torch.empty(container.untyped_storage().nbytes(), dtype=torch.uint8,
                          device=container.device).untyped_storage()
    out = _on(storage, container, container.stride())
    out.copy_(values)
    regions = {(p.storage_offset(), tuple(p.shape), tuple(p.stride()), p.dtype): (p, a, o) for p, a, o in pools}
    for pool, axes, order in regions.values():  # a pool under two names is rewritten once
        model = dense_strides(axes, order, tuple(pool.shape), pool.stride(axes.axes.index("slot")))
        src, dst = (pool.stride(), model) if into_model else (model, pool.stride())
        _on(storage, pool, dst).copy_(_on(storage, pool, src).clone())
    return out


def _on(storage: torch.UntypedStorage, t: torch.Tensor, strides) -> torch.Tensor:
    """A tensor like `t` (dtype, shape, offset) on `storage` with `strides`."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, t.storage_offset(), t.shape, strides)


@torch.no_grad()
def _rewrite(pool: torch.Tensor, strides: tuple, slot: int, chunk_bytes: int) -> None:
    """Each slot's block holds the same addresses in either order: rewrite it chunk by chunk."""
    target = pool.as_strided(pool.shape, strides, pool.storage_offset())
    per_slot = max(1, pool[0:1].numel() * pool.element_size()) if pool.shape[slot] else 1
    step = max(1, chunk_bytes // per_slot)
    for start in range(0, pool.shape[slot], step):
        rows = slice(start, min(start + step, pool.shape[slot]))
        index = (slice(None),) * slot + (rows,)
        target[index].copy_(pool[index].clone())
