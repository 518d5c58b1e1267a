"""Raw pages: moved pools that live inside a larger tensor the model holds (each slot's pages in
one registered buffer, an arena). Code outside the graphs reads those bytes too: state_dict and
load_state_dict, pickle and deepcopy, a pool later rebound to another tensor. What is here keeps
each of them seeing the model's order."""

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .layout import Layout, dense_strides
from .state import (Block, aliases, place_key, readdress, refuse_in_graph_capture, relaid, relation, resolve,
                    storage_key)


@dataclass(frozen=True)
class Region:
    """Where a moved pool sits inside raw pages (a container), as it moved: if the pool is later
    rebound to another tensor, these bytes are left in its new order and are put back."""

    tree: object  # weak reference to the optimized model (or twin) it moved in
    pool: str
    containers: tuple[str, ...]
    place: tuple  # state.place_key of the pool
    strides: tuple[int, ...]
    axes: Layout
    order: Layout  # the model's


def regions_of(tree: nn.Module, moved: list) -> list[Region]:
    """The regions of the (name, pool) pairs just moved in `tree` that sit inside raw pages."""
    out = []
    for name, pool in moved:
        t = resolve(tree, name)
        pages = tuple(path for path, r in aliases(tree, t).items() if r == "container")
        if pages:
            out.append(Region(weakref.ref(tree), name, pages, place_key(t), tuple(t.stride()), pool.axes,
                              pool.source))
    return out


def settle(regions: list[Region]) -> list[Region]:
    """Raw pages whose moved pool was rebound to another tensor since (the model set a new one
    at its path): the bytes the pool left there go back to the model's order, once, and only
    when no other name still holds the pool there. Returns the regions still bound."""
    bound, unbound = [], []
    for r in regions:
        tree = r.tree()
        if tree is not None:
            now = _resolved(tree, r.pool)
            held = isinstance(now, torch.Tensor) and place_key(now) == r.place and tuple(now.stride()) == r.strides
            (bound if held else unbound).append(r)
    held = {(r.tree(), r.place, r.strides) for r in bound}
    for r in unbound:
        tree = r.tree()
        if (tree, r.place, r.strides) in held:
            continue
        held.add((tree, r.place, r.strides))
        pages = next((t for c in r.containers if isinstance(t := _resolved(tree, c), torch.Tensor) and
                      storage_key(t) == r.place[:2]), None)
        if pages is not None:
            refuse_in_graph_capture("the raw pages a rebound pool left would go back to the model's order")
            _, _, offset, shape, dtype = r.place
            inside = torch.empty(0, dtype=dtype, device=pages.device).set_(pages.untyped_storage(), offset,
                                                                            shape, r.strides)
            model = dense_strides(r.axes, r.order, shape, r.strides[r.axes.axes.index("slot")])
            followers = _followers(tree, inside, model)
            with torch.no_grad():
                pages.copy_(relaid(pages, pages, [(inside, r.axes, r.order)]))
                for t, (at, steps) in followers:
                    t.set_(t.untyped_storage(), at, t.shape, steps)
    return bound


def _followers(tree: nn.Module, inside: torch.Tensor, model_strides: tuple) -> list:
    """The model's other names of a rebound pool's bytes (a second name, a view of some slots),
    each with the offset and strides that address its elements once the bytes are back in the
    model's order: (tensor, (offset, strides))."""
    out = {}
    for path, r in aliases(tree, inside).items():
        t = resolve(tree, path)
        if r != "container" and id(t) not in out and (found := readdress(t, Block.of(inside), model_strides)):
            out[id(t)] = (t, found)
    return list(out.values())


def _resolved(tree: nn.Module, path: str):
    """The object at `path`, or None where the model no longer has it."""
    try:
        return resolve(tree, path)
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


class _StateDictHook:
    """state_dict and load_state_dict hooks of a module whose registered buffer holds moved
    pools in its slot rows: those bytes are saved in the model's order and loaded back into the
    pools' order, so a state_dict moves between the model and the optimized one as it would
    between two copies of the model. `session`: the runtime's (its pools, pending moves, and
    settle_unbound)."""

    def __init__(self, session, tree: nn.Module, module: nn.Module, loading: bool):
        self.session, self.tree, self.module = weakref.ref(session), weakref.ref(tree), weakref.ref(module)
        self.loading = loading

    def _pools(self, pages: torch.Tensor) -> list:
        """(pool, axes, the model's order) for the moved pools inside `pages`, as they are now."""
        session, tree = self.session(), self.tree()
        if session is None or tree is None:
            return []
        pending = {n for n, _ in session.pending}
        out = []
        for pool in session.pools.values():
            if pool.moves and not pool.argument and pool.name not in pending:
                t = resolve(tree, pool.name)
                if storage_key(t) == storage_key(pages) and relation(t, pages) == "container":
                    out.append((t, pool.axes, pool.source))
        return out

    def __call__(self, *args):  # a state_dict hook (module, state_dict, prefix, ...), or a load pre-hook
        state_dict, prefix = args[1:3] if not self.loading else args[:2]  # (state_dict, prefix, ...)
        module, session = self.module(), self.session()
        if module is None:
            return
        if session is not None:
            session.settle_unbound()
        for name, pages in module._buffers.items():
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and value.shape == pages.shape and (pools := self._pools(pages)):
                state_dict[prefix + name] = relaid(value, pages, pools, into_model=not self.loading)

    def __reduce__(self):  # pickled or copied with its module: dropped where it is loaded
        return stale, ()


def guard(session, tree: nn.Module, moved: list[str]) -> None:
    """Hook the modules whose registered buffers hold the pools just moved (see _StateDictHook)."""
    for name in moved:
        for path, r in aliases(tree, resolve(tree, name)).items():
            owner, _, attr = path.rpartition(".")
            module = tree.get_submodule(owner) if r == "container" and "[" not in path else None
            if module is None or attr not in module._buffers or \
                    any(isinstance(h, _StateDictHook) for h in module._state_dict_hooks.values()):
                continue
            module._register_state_dict_hook(_StateDictHook(session, tree, module, loading=False))
            # without the module: a hook holding it would pickle the optimized model a second time
            module._register_load_state_dict_pre_hook(_StateDictHook(session, tree, module, loading=True))


class _Stale:
    """Where a layer's bound forward or a page hook was when its model was pickled or copied."""


_STALE = _Stale()


def stale() -> _Stale:
    return _STALE


def drop_stale(model: nn.Module) -> None:
    """What a pickled or copied optimized model kept of its binding: the layers' forward and the
    raw-page hooks (optimize() binds new ones)."""
    for module in model.modules():
        if vars(module).get("forward") is _STALE:
            del module.forward
        for hooks in (module._state_dict_hooks, module._load_state_dict_pre_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "hook", h) is _STALE]:
                del hooks[key]


def pages_of(model: nn.Module, moved: list) -> list:
    """Where each moved pool ((name, axes, the model's order) in `moved`) sits in the raw pages
    that hold it: (pages path, pool name, offset, shape, strides now, axes, the model's order)."""
    out = []
    for name, axes, order in moved:
        pool = resolve(model, name)
        out += [(path, name, pool.storage_offset(), tuple(pool.shape), tuple(pool.stride()), axes, order)
                for path, r in aliases(model, pool).items() if r == "container"]
    return out


_RELAID: dict[int, set] = {}  # id of raw pages (while they live) -> the regions put back in them


def put_back(model: nn.Module, pages: list) -> None:
    """An unpickled or copied model's raw pages (as pages_of listed them) back in the model's
    order where they no longer share memory with the pool (pickle keeps no storage shared
    between two tensors; deepcopy does, and such pages come back with the pool's own move)."""
    for path, name, offset, shape, strides, axes, order in pages:
        container, pool = resolve(model, path), resolve(model, name)
        key = (offset, shape, strides)  # one pool under two names; pages reached twice in one unpickling
        if key in _RELAID.get(id(container), ()):
            continue
        if id(container) not in _RELAID:
            _RELAID[id(container)] = set()
            weakref.finalize(container, _RELAID.pop, id(container), None)
        _RELAID[id(container)].add(key)
        if storage_key(container) != storage_key(pool):
            inside = torch.empty(0, dtype=pool.dtype, device=pool.device).set_(
                container.untyped_storage(), offset, shape, strides)
            with torch.no_grad():
                container.copy_(relaid(container, container, [(inside, axes, order)]))
