"""The static check after rewriting: the rewritten graph, its pools stored in the new layout,
means what the captured graph meant with the pools in the old one.

Both graphs are read as formulas (layoutpass.semantics), each pool at its logical (slot, tok,
dim) coordinates through the layout its placeholder holds. Then every op the formulas do not
model (conv kernels, matmuls, the model's own custom ops) must be given the same values in both
graphs, every output must be the same formula, and every buffer must end with the same logical
contents. Index arithmetic of remapped selects, slices, cats, rolls and writes is compared as
sympy expressions, so a rule that remaps an axis wrongly is caught here, before any buffer moves."""

import sympy
import torch.fx

from .errors import LayoutPassError
from .layout import Layout
from .report import source_line
from .formulas import UNKNOWN
from .semantics import Semantics


class UnprovenRewrite(LayoutPassError):
    """The rewritten graph could not be shown to compute what the model computes."""


def verify(before: torch.fx.Graph, after: torch.fx.Graph, source: dict[str, tuple[str, Layout]],
           target: dict[str, tuple[str, Layout]], entry: str) -> None:
    """source / target: placeholder name -> (pool name, layout it holds) before / after."""
    old = Semantics(before, source).run()
    new = Semantics(after, target).run()
    nodes = {n.name: n for n in after.nodes}
    for name, given in new.obligations.items():
        where = f"node {name} ({nodes[name].target}) in {entry}, at {source_line(nodes[name])}"
        if name not in old.obligations:
            raise UnprovenRewrite(f"the rewrite added {where}, which the check cannot follow")
        _same(given, old.obligations[name], f"{where}: its inputs differ from the model's", new)
    _same(new.outputs, old.outputs, f"the outputs of {entry} differ from the model's", new)
    for placeholder, root in new.roots.items():
        layouts = (source.get(placeholder, (None, None))[1], target.get(placeholder, (None, None))[1])
        name = root.pool or placeholder
        _same(new.final(placeholder, layouts[1]), old.final(placeholder, layouts[0]),
              f"{name!r} ends {entry} with other contents than in the model", new)


def _same(new, old, what: str, semantics: Semantics) -> None:
    if _unknown(new) or _unknown(old):
        why = "; ".join(f"{k}: {v}" for k, v in semantics.failures.items()) or "a write it cannot follow"
        raise UnprovenRewrite(f"{what}: cannot be proven ({why})")
    if new != old:
        raise UnprovenRewrite(f"{what}: {_difference(new, old)}")


def _unknown(value) -> bool:
    if isinstance(value, tuple):
        return any(_unknown(v) for v in value)
    return isinstance(value, sympy.Basic) and UNKNOWN in value.free_symbols


def _difference(new, old) -> str:
    if isinstance(new, tuple) and isinstance(old, tuple) and len(new) == len(old):
        for k, (a, b) in enumerate(zip(new, old)):
            if a != b:
                return f"argument {k}: {_short(a)} instead of {_short(b)}"
    return f"{_short(new)} instead of {_short(old)}"


def _short(value, limit: int = 300) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."
