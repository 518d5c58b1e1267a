"""What the pass found, did and refused, with the model's source lines."""

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

import os

import torch
import torch.fx

from .layout import Layout


class Kind(StrEnum):
    """How a use of a pool depends on its layout (TVM ConvertLayout's classes, for one buffer)."""

    AGNOSTIC = "layout-agnostic"  # slot gathers, fills, elementwise: pass through
    AXIS = "axis-sensitive"  # slices, selects, cat, roll, reductions: the axis argument is remapped
    PERMUTATION = "permutation"  # transpose and its spellings: composed, cancelled
    MEMORY = "memory-order"  # view/reshape across axes, as_strided: rewritten or refused
    KERNEL = "kernel"  # conv update / prefill


class Action(StrEnum):
    FOLDED = "permutation folded"  # a permutation that is the pool's own memory order: a free dense view
    REMAPPED = "remapped"  # rewritten onto the kernel-order view (canonicalized for lowering)
    KEPT = "kept"  # a permuted view the rest of the graph reads as it is (correct, not free)
    MATERIALIZED = "materialized"  # a read of memory order given a copy in the model's order
    LOGICAL = "logical"  # computes on logical indices: the same values in any memory order
    PROVEN = "proven"  # may copy or alias depending on strides: shown to give the same values
    REFUSED = "refused"  # cannot be proven: optimize raised, nothing moved
    KERNEL_DIRECT = "kernel-direct"  # a conv op that now takes the pool as stored
    LOWERED = "lowered"  # a pure-torch state update replaced by a kernel
    NOT_LOWERED = "not lowered"  # almost a state update: the detail says what differed


def library() -> tuple[str, ...]:
    """Folders whose frames are not the model's: torch, and this library's own code (its
    examples are model code)."""
    import layoutpass
    import layoutpass.kernels
    import layoutpass.rewrites

    return tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, layoutpass, layoutpass.kernels,
                                                                layoutpass.rewrites))


def source_line(node: torch.fx.Node) -> str:
    """'file:line: code' of the model line that made `node`: the innermost frame of its stack
    trace outside torch and this library."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines()]
    frames = []
    for i, line in enumerate(lines):
        if line.startswith("File "):
            path = line.split('"')[1]
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            frames.append((path, line.split(", line ")[1].split(",")[0], code))
    skip = library()
    for path, number, code in reversed(frames):
        if not path.startswith(skip) or "/examples/" in path:
            return f"{path.rsplit('/', 1)[-1]}:{number}: {code}"
    if frames:
        path, number, code = frames[-1]
        return f"{path.rsplit('/', 1)[-1]}:{number}: {code}"
    return "<no source line>"


@dataclass(frozen=True)
class Pool:
    """One state pool of the model: one record through every stage and every graph. Its shape
    never changes; `source` and `target` are the orders of its axes in memory."""

    name: str  # its path in the model (mixers.0.conv_state, mixers.0.kv_cache[0][1]), or the argument's name
    kind: str  # "conv" or "recurrent"
    axes: Layout  # its logical axes, in the order of its shape
    shape: tuple[int, ...]
    source: Layout  # its memory order in the model
    target: Layout  # its memory order in the optimized model
    evidence: str  # why it is a pool, with the source line
    argument: bool = False  # passed to forward by the caller (the engine allocates it)

    @property
    def moves(self) -> bool:
        return self.source != self.target


@dataclass(frozen=True)
class Considered:
    """A rank-3 buffer or argument discovery looked at, and its verdict."""

    name: str
    shape: tuple[int, ...]
    taken: bool
    reason: str


@dataclass(frozen=True)
class NearMiss:
    """Almost an update a lowering rule replaces by a kernel on `pool`: `reason` says which part
    differed (reported as not lowered)."""

    pool: torch.fx.Node
    reason: str


@dataclass(frozen=True)
class Use:
    entry: str  # which captured entry point
    pool: str
    op: str
    kind: Kind
    action: Action
    detail: str
    source: str


@dataclass
class Report:
    pools: dict[str, Pool] = field(default_factory=dict)
    considered: dict[str, Considered] = field(default_factory=dict)
    entry_uses: dict[str, list[Use]] = field(default_factory=dict)  # entry -> its uses, as last rewritten
    notes: list[str] = field(default_factory=list)  # how the model was captured, when not layer by layer

    @property
    def entries(self) -> list[str]:
        return list(self.entry_uses)

    @property
    def uses(self) -> list[Use]:
        return [use for uses in self.entry_uses.values() for use in uses]

    @property
    def counts(self) -> Counter:
        return Counter(use.action for use in self.uses)

    def __str__(self) -> str:
        kinds = Counter(p.kind for p in self.pools.values())
        found = ", ".join(f"{n} {kind}-state pool{'s' if n != 1 else ''}" for kind, n in sorted(kinds.items()))
        lines = [f"layoutpass report: {found or 'no pools'}, {len(self.entry_uses)} captured graphs"]
        for pool in self.pools.values():
            where = "argument" if pool.argument else "pool"
            move = f"{pool.source} -> {pool.target}" if pool.moves else f"{pool.source}, kept"
            axes = "(" + ", ".join(pool.axes.axes) + ")"
            lines.append(f"  {where} {pool.name} {axes} {pool.shape}: {move} ({pool.evidence})")
        lines += [f"  {note}" for note in self.notes]
        for c in self.considered.values():
            if not c.taken:
                lines.append(f"  not a pool: {c.name} {c.shape}: {c.reason}")
        lines.append("  " + (", ".join(f"{n} {action}" for action, n in sorted(self.counts.items())) or "no uses"))
        for entry in self.entry_uses:
            lines.append(f"  {entry}")
        grouped = Counter((u.pool, u.op, u.kind, u.action, u.detail, u.source) for u in self.uses)
        for (pool, op, kind, action, detail, source), n in grouped.items():
            times = f" (in {n} entries)" if n > 1 else ""
            lines.append(f"  {pool}: {op} [{kind}] -> {action}{': ' + detail if detail else ''}{times}\n      at {source}")
        return "\n".join(lines)


def use(entry: str, pool: str, node: torch.fx.Node, kind: Kind, action: Action, detail: str = "") -> Use:
    target = node.target
    return Use(entry, pool, getattr(target, "__name__", None) or str(target), kind, action, detail, source_line(node))
