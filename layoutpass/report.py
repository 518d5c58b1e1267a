"""What the pass found, did and refused, with the model's source lines."""

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

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
    FOLDED = "permutation folded"  # a permutation cancelled against the storage layout
    REMAPPED = "remapped"  # the use's axis arguments now name the new storage's dims
    KEPT = "kept"  # the use reads a permuted view of the new storage (correct, not free)
    MATERIALIZED = "materialized"  # a memory-order read now reads a copy in the old order
    REFUSED = "refused"  # cannot be rewritten: optimize raised, nothing moved
    KERNEL_DIRECT = "kernel-direct"  # a conv op that now takes the pool as stored
    LOWERED = "lowered"  # a pure-torch conv update replaced by a conv kernel
    NOT_LOWERED = "not lowered"  # almost a conv update: the detail says what differed


def source_line(node: torch.fx.Node) -> str:
    """'file:line: code' of the model line that made `node`, from its stack trace."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            where = lines[i].split('"')[1].rsplit("/", 1)[-1] + ":" + lines[i].split(", line ")[1].split(",")[0]
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            return f"{where}: {code}"
    return "<no source line>"


@dataclass(frozen=True)
class Pool:
    """One conv-state pool of the model: one record through every stage and every entry."""

    name: str  # the buffer's qualified name, or the forward argument's name
    shape: tuple[int, ...]  # as the model stores it
    source: Layout  # how the model stores it
    target: Layout  # how the optimized model stores it
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
        lines = [f"layoutpass report: {len(self.pools)} conv-state pools, {len(self.entry_uses)} captured entries"]
        for pool in self.pools.values():
            where = "argument" if pool.argument else "pool"
            lines.append(f"  {where} {pool.name} {pool.shape}: {pool.source} -> {pool.target} ({pool.evidence})")
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
