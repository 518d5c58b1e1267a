"""What the pass found, did and refused, with the model's source lines."""

from collections import Counter
from dataclasses import dataclass, field

import torch.fx

from .layout import Layout

# The DESIGN table's classes of pool uses.
AGNOSTIC, AXIS, PERMUTATION, MEMORY, KERNEL = "layout-agnostic", "axis-sensitive", "permutation", "memory-order", "kernel"


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
    name: str  # the buffer's qualified name
    shape: tuple[int, ...]  # as the model stores it
    source: Layout
    target: Layout


@dataclass(frozen=True)
class Use:
    entry: str  # which captured entry point
    pool: str
    op: str
    kind: str  # one of the DESIGN classes
    action: str
    source: str


@dataclass
class Report:
    pools: dict[str, Pool] = field(default_factory=dict)
    uses: list[Use] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)

    def add(self, entry: str, pool: str, node: torch.fx.Node, kind: str, action: str) -> None:
        self.uses.append(Use(entry, pool, _op_name(node), kind, action, source_line(node)))

    @property
    def counts(self) -> Counter:
        return Counter(use.action.split(":")[0] for use in self.uses)

    def __str__(self) -> str:
        lines = [f"layoutpass report: {len(self.pools)} conv-state pools, {len(self.entries)} captured entries"]
        for pool in self.pools.values():
            lines.append(f"  pool {pool.name} {pool.shape}: {pool.source} -> {pool.target}")
        counts = self.counts
        lines.append("  " + ", ".join(f"{n} {what}" for what, n in sorted(counts.items())))
        for entry in self.entries:
            lines.append(f"  {entry}")
        grouped = Counter((u.pool, u.op, u.kind, u.action, u.source) for u in self.uses)
        for (pool, op, kind, action, source), n in grouped.items():
            times = f" (in {n} entries)" if n > 1 else ""
            lines.append(f"  {pool}: {op} [{kind}] -> {action}{times}\n      at {source}")
        return "\n".join(lines)


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", None) or str(target)
