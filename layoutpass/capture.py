"""Capture: torch Dynamo traces a unit's forward (its guards and side-effect replay keep the
Python around the graph right), and its graph is traced once more to aten ops (make_fx,
pre-dispatch: the IR torch.export produces, in-place ops kept) with every input named after
where it comes from and every node after the model's source line."""

import dis
import re
import types
from dataclasses import dataclass

import torch
import torch.fx
import torch.fx.traceback as fx_traceback
from torch._guards import TracingContext, detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import make_fx

# Dynamo settings the pass needs, raised once for the process (never lowered): a layer kind
# may meet more call structures than the default 8 before it falls back to eager, and a
# counter kept as an int attribute of a module (`self.seen += n`) is an input, not a constant
# that recompiles on every call.
DYNAMO_SETTINGS = {"recompile_limit": 64, "accumulated_recompile_limit": 4096, "allow_unspec_int_on_nn_module": True}
# Guards Dynamo skips by default and the pass needs: on modules' hook dicts (a graph captured
# before a hook was registered, or on the rehearsal's copy, which runs without hooks, would run
# without it), and on a module's buffers while its `_buffers` dict is unchanged (a pool moves
# with Tensor.set_, which leaves the dict as it was: torch 2.11 then skips the stride guard, so
# the graph captured for the old order keeps running and the new order's is not captured).
FORCED_GUARDS = {"skip_nnmodule_hook_guards": False, "skip_tensor_guards_with_matching_dict_tags": False}

# Tensor attributes whose values depend on memory order: Python code that reads them on a
# relayouted pool could branch differently, which no graph shows. (A pool moves in its own
# memory: its data_ptr, storage and storage_offset stay as they were.)
STRIDE_READS = frozenset({"stride", "is_contiguous", "is_non_overlapping_and_dense"})


def configure_dynamo() -> None:
    config = torch._dynamo.config
    for name, value in DYNAMO_SETTINGS.items():
        current = getattr(config, name)
        if isinstance(value, bool):
            setattr(config, name, value or current)
        else:
            setattr(config, name, max(value, current))
    for name, value in FORCED_GUARDS.items():
        setattr(config, name, value)


@dataclass(frozen=True)
class Input:
    """One input of a captured graph and where it comes from."""

    name: str  # the placeholder's name in the aten graph
    source: str  # Dynamo's source: L['self']._buffers['conv_state'], L['h'], ...
    kind: str  # "parameter", "state" (held by the unit: buffers, tensor attributes, containers), "argument", "size"
    path: str  # state: its path under the unit ("conv_state", "kv_cache[0][0]", "norm.weight"); argument: its name
    tensor: object  # the real tensor (or the value) it was captured from


_SEGMENT = re.compile(r"(?:\.__dict__\['_(?:modules|buffers|parameters)'\]|\._(?:modules|buffers|parameters))\['([^']+)'\]"
                      r"|\.__dict__\['([^']+)'\]|\.([A-Za-z_]\w*)|\[([^\]]+)\]")


def _path(source: str) -> tuple[str, str] | None:
    """(root local, path under it) of a source read off frame locals, e.g. L['self']._modules['norm']
    ._parameters['weight'] -> ('self', 'norm.weight'); None for anything else (sizes, globals)."""
    head = re.match(r"L\['([^']+)'\]", source)
    if head is None:
        return None
    rest, parts, at = source[head.end():], [], 0
    while at < len(rest):
        m = _SEGMENT.match(rest, at)
        if m is None or m.group(0).startswith((".size", ".stride")):
            return None
        name, entry, attr, index = m.groups()
        parts.append(f".{name or entry or attr}" if (name or entry or attr) else f"[{index}]")
        at = m.end()
    return head.group(1), "".join(parts).lstrip(".")


def _readable(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W+", "_", name).strip("_") or "input"
    base = base if not base[0].isdigit() else f"_{base}"
    candidate, k = base, 1
    while candidate in taken:
        candidate, k = f"{base}_{k}", k + 1
    taken.add(candidate)
    return candidate


def describe_inputs(gm: torch.fx.GraphModule, owner: str = "self") -> list[Input]:
    """Every placeholder of Dynamo's graph: its source and its real value (`owner`: the local
    that is the unit's module)."""
    inputs, taken = [], set()
    for node in gm.graph.find_nodes(op="placeholder"):
        arg = node.meta.get("grapharg")
        source = arg.source.name if arg is not None and arg.source is not None else node.name
        value = arg.example if arg is not None else None
        where = _path(source)
        if isinstance(value, torch.nn.Parameter):
            kind = "parameter"
        elif not isinstance(value, torch.Tensor):
            kind = "size"
        elif where is not None and where[0] == owner and where[1]:
            kind = "state"
        elif where is not None:
            kind = "argument"
        else:
            kind = "state"  # a global tensor: state the model keeps elsewhere
        if where is None:
            path = source
        elif kind == "argument":
            path = where[0] + (f".{where[1]}" if where[1] and not where[1].startswith("[") else where[1])
        else:
            path = where[1]
        shown = path if kind in ("state", "argument", "parameter") else node.name
        inputs.append(Input(_readable(shown, taken), source, kind, path, value))
    return inputs


class Unanalyzable(Exception):
    """A graph the pass cannot read as aten ops: it runs as the model wrote it."""


def to_aten(gm: torch.fx.GraphModule, example_inputs: list, inputs: list[Input]) -> torch.fx.GraphModule:
    """Dynamo's graph as aten ops (pre-dispatch: composite ops such as reshape and contiguous stay
    whole, in-place ops stay in place), placeholders named after `inputs`, every node carrying
    the stack trace of the model line it came from. A higher-order op (a scan, a cond, ...) is
    not retraced faithfully: Unanalyzable."""
    hops = sorted({str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes
                   if isinstance(n.target, torch._ops.HigherOrderOperator) or "functorch" in str(n.target)})
    if hops:
        raise Unanalyzable(f"it calls {', '.join(hops)}, which the pass cannot read as aten ops")
    fake = detect_fake_mode(example_inputs)
    values = [fake.from_tensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor) else x
              for x in example_inputs]
    with fake, fx_traceback.preserve_node_meta():
        aten = make_fx(torch.fx.Interpreter(gm).run, pre_dispatch=True, _error_on_data_dependent_ops=False,
                       _allow_non_fake_inputs=True)(*values)
    for node, given in zip(aten.graph.find_nodes(op="placeholder"), inputs):
        node._rename(given.name)
        node.target = given.name
    aten.recompile()
    return aten


def traced_code() -> list[types.CodeType]:
    """The code objects Dynamo traced for the graph being compiled."""
    context = TracingContext.try_get()
    return list(context.get_traced_code() or ()) if context is not None else []


def stride_reads(codes: list[types.CodeType], library: tuple[str, ...]) -> list[str]:
    """'file:line: .name' for each read of a memory-order attribute in model code (code under
    `library` folders, torch's own among them, is not the model's)."""
    found = []
    for code in codes:
        if code.co_filename.startswith(library) or not STRIDE_READS.intersection(code.co_names):
            continue
        line = code.co_firstlineno
        for ins in dis.get_instructions(code):
            line = ins.positions.lineno if ins.positions and ins.positions.lineno else line
            if ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and ins.argval in STRIDE_READS:
                found.append(f"{code.co_filename.rsplit('/', 1)[-1]}:{line}: .{ins.argval}")
    return found
