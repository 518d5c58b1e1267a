"""Capture units: which module's forward is captured and rewritten.

A pool is rewritten where every use of it lies. A layer that keeps its pools as its own
buffers and is the only code that touches them *owns* them: it is captured on its own, once per
kind of layer (same class, code, parameter and buffer shapes, plain attributes) and call
structure, and every instance of that kind runs the one rewritten graph with its own tensors;
the rest of the model runs as written. That a layer owns its pools is checked, not assumed: a
probe runs the model's forward on meta tensors (shapes only: no compute, no state touched) and
watches every torch call; a pool touched outside its layer sends the whole model to one capture
(the root unit), as before. The probe also hands each layer kind the inputs to capture it from."""

import dataclasses
import traceback
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

ROOT = ""


@dataclass(eq=False)
class Unit:
    """One kind of module captured on its own (or the whole model: paths == [ROOT])."""

    label: str  # names its entries and uses in the report
    paths: list[str]  # the instances, as submodule paths
    entries: list = field(default_factory=list)
    outputs: dict = field(default_factory=dict)  # probe: input signature -> output metadata

    @staticmethod
    def prefix(path: str) -> str:
        return f"{path}." if path else ""


def layer_units(model: nn.Module) -> dict[str, Unit] | None:
    """Layers that keep rank-3 buffers (pools live there), grouped by kind; None when the
    model itself keeps one (then it owns its pools) or none exists."""
    holders = [path for path, m in model.named_modules() if any(b.dim() == 3 for b in m.buffers(recurse=False))]
    if not holders or ROOT in holders:
        return None
    outermost = [p for p in holders if not any(p.startswith(q + ".") for q in holders if q != p)]
    kinds: dict[tuple, Unit] = {}
    for path in outermost:
        module = model.get_submodule(path)
        key = _kind(module)
        if key not in kinds:
            name = type(module).__name__
            taken = sum(u.label.split("#")[0] == name for u in kinds.values())
            kinds[key] = Unit(name if not taken else f"{name}#{taken + 1}", [])
        kinds[key].paths.append(path)
    return {path: unit for unit in kinds.values() for path in unit.paths}


def _kind(module: nn.Module) -> tuple:
    """What decides a module's captured graph: its class and code, its tensors' names and
    shapes, and the plain attributes its code may branch on (anything else: this instance only)."""
    tensors = tuple((n, tuple(t.shape), t.dtype, t.device.type) for n, t in
                    list(module.named_parameters()) + list(module.named_buffers()))
    attributes = []
    for path, sub in module.named_modules():
        for name, value in sorted(vars(sub).items()):
            if name.startswith("_") or name == "training":
                continue
            attributes.append((path, name, _plain(value)))
    forward = vars(module).get("forward") or type(module).forward
    return type(module), getattr(forward, "__code__", id(forward)), tensors, tuple(attributes)


def _plain(value):
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return repr(value)
    return ("object", id(value))


def signature(flat: list) -> tuple:
    """A call's tensors by shape, dtype and device, the rest by value (the probe's cache key)."""
    return tuple((tuple(v.shape), v.dtype, v.device.type) if isinstance(v, torch.Tensor) else v for v in flat)


class Watch(TorchFunctionMode):
    """Records every torch call that touches a layer's pool while another unit (or none) runs.
    A call on meta tensors that made a fresh tensor before (same function, input metadata and
    plain arguments) gets a new one of the same metadata without running again: meta kernels
    cost ~150 us per elementwise op, and a 64-layer model repeats the same few thousands of times.
    Views, in-place results and other aliases always run: the watch follows a pool through them."""

    def __init__(self, pools: dict[int, tuple[str, str]]):
        super().__init__()
        self.pools = pools  # id(fake tensor) -> (layer path, buffer name)
        self.stack: list[str] = []  # the layer calls running, innermost last
        self.outside: dict[str, str] = {}  # pool -> where it was touched from outside its layer
        self.fresh: dict[tuple, tuple] = {}  # a call's key (_meta_call) -> its fresh output's (shape, stride, dtype)

    def owner(self, value: torch.Tensor) -> tuple[str, str] | None:
        return self.pools.get(id(value)) or self.pools.get(id(value._base))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in _tensors(args, kwargs.values()):
            owner = self.owner(value)
            if owner is not None and (not self.stack or self.stack[-1] != owner[0]):
                self.outside.setdefault(f"{Unit.prefix(owner[0])}{owner[1]}", _caller())
        key, inputs = _meta_call(func, args, kwargs)
        if key in self.fresh:
            shape, stride, dtype = self.fresh[key]
            return torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        out = func(*args, **kwargs)
        if key is not None and type(out) is torch.Tensor and out.device.type == "meta" and \
                not any(torch._C._is_alias_of(out, t) for t in inputs):
            self.fresh[key] = (out.shape, out.stride(), out.dtype)
        return out


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


class _NotPlain(Exception):
    pass


def _meta_call(func, args, kwargs) -> tuple:
    """(key, its tensors) for a call on meta tensors and plain values, whose output's metadata
    depends on nothing else (the key holds values with their types: 2 and 2.0 promote
    differently); (None, ()) for any other call."""
    inputs = []
    try:
        key = (func, _keyed(args, inputs), _keyed(tuple(kwargs.items()), inputs))
    except _NotPlain:
        return None, ()
    return (key, inputs) if inputs else (None, ())


def _keyed(value, inputs: list):
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta" or type(value) not in (torch.Tensor, nn.Parameter):
            raise _NotPlain
        inputs.append(value)
        return tuple(value.shape), value.stride(), value.dtype, value.storage_offset(), value.requires_grad
    if type(value) in (tuple, list, torch.Size):
        return type(value), tuple(_keyed(v, inputs) for v in value)
    if type(value) in _PLAIN:
        return type(value), value
    raise _NotPlain


def _tensors(*groups):
    """The tensors among a call's arguments (and in its lists of tensors)."""
    for group in groups:
        for value in group:
            if isinstance(value, torch.Tensor):
                yield value
            elif isinstance(value, (list, tuple)):
                yield from (v for v in value if isinstance(v, torch.Tensor))


def _caller() -> str:
    """The innermost frame outside torch and layoutpass: where the model touched the pool."""
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and "/layoutpass/" not in frame.filename:
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}: {frame.line}"
    return "<unknown>"


def probe(module: nn.Module, forward, units: dict[str, Unit], args: tuple, kwargs: dict, watching,
          stored_as: dict[str, tuple]) -> Watch:
    """Run `forward(module, *args, **kwargs)` on meta tensors, `watching(watch)` entered around
    it (the layer calls see the watch there and answer with meta outputs); pools already moved
    appear as the model stores them (`stored_as`: name -> shape). Returns the watch: `outside`
    holds the pools touched outside their layers."""
    named = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    metas = {name: torch.empty_like(t, device="meta") for name, t in named.items() if name not in stored_as}
    metas.update({name: torch.empty(shape, dtype=named[name].dtype, device="meta") for name, shape in stored_as.items()})
    pools = {id(metas[f"{Unit.prefix(path)}{name}"]): (path, name) for path in units
             for name, b in module.get_submodule(path).named_buffers() if b.dim() == 3}
    meta_args, meta_kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
    watch = Watch(pools)
    with _reparametrize_module(module, metas), watch, watching(watch), torch.no_grad():
        result = forward(module, *meta_args, **meta_kwargs)
    for value in pytree.tree_leaves(result):  # a pool handed out by the model leaves its layer too
        owner = watch.owner(value) if isinstance(value, torch.Tensor) else None
        if owner is not None:
            watch.outside.setdefault(f"{Unit.prefix(owner[0])}{owner[1]}", "the model's outputs")
    return watch


def describe(value):
    """A probe output's shape, strides and dtype, to hand out again without running the layer."""
    return pytree.tree_map_only(torch.Tensor, lambda t: (tuple(t.shape), t.stride(), t.dtype), value)


def _is_described(m) -> bool:
    return isinstance(m, tuple) and len(m) == 3 and isinstance(m[2], torch.dtype)


def materialize(meta, device="meta"):
    """Tensors of described shapes on `device` (zeros: what a layer is captured from needs shapes only)."""
    return pytree.tree_map(lambda m: torch.empty_strided(m[0], m[1], dtype=m[2], device=device).zero_()
                           if _is_described(m) else m, meta, is_leaf=_is_described)
