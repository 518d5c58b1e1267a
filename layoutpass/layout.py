"""The layout algebra: a layout is an order of named logical axes, outermost first.

Every pool's axes come from one vocabulary: `slot` (outermost, the serving engine's index),
then for a conv state `tok` and `dim`, for a recurrent state `[snap]`, `[head]`, `k` (the key /
B / d_state axis) and `v` (the value / x / head_dim axis). A pool keeps the shape the model
gives it (its *logical* axes, `Pool.axes`); its layout is the order its axes take in memory,
as channels_last is for an image: SD / DS put `dim` / `tok` innermost, KV / VK `v` / `k`.

Sizes may be ints or sympy expressions; everything returned is a sympy expression, so the
rewriter can prove two index maps equal and the distributed code can plan transfers for any
sizes before it instantiates them."""

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import product

import sympy
import torch

from .errors import ArgumentError

Size = int | sympy.Expr


@dataclass(frozen=True)
class Runs:
    """The contiguous runs a logical region covers: `count` runs of `length` elements, run i
    starting at `start + sum(i_a * stride_a)` over the `outer` axes (name, first, stop, stride)."""

    length: sympy.Expr
    start: sympy.Expr
    outer: tuple[tuple[str, sympy.Expr, sympy.Expr, sympy.Expr], ...]

    @property
    def count(self) -> sympy.Expr:
        return sympy.Mul(*(stop - first for _, first, stop, _ in self.outer)) if self.length != 0 else sympy.Integer(0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(offset, length) per run, in memory order; sizes must be concrete."""
        if self.count == 0:
            return
        ranges = [range(int(first), int(stop)) for _, first, stop, _ in self.outer]
        for index in product(*ranges):
            offset = self.start + sum((i - int(first)) * stride
                                      for i, (_, first, _, stride) in zip(index, self.outer))
            yield int(offset), int(self.length)


@dataclass(frozen=True)
class Layout:
    axes: tuple[str, ...]

    def __post_init__(self):
        if len(set(self.axes)) != len(self.axes):
            raise ArgumentError("axes", f"repeated axis in {self.axes}")

    def __str__(self) -> str:
        if self.axes in NAMES or len(self.axes) >= 3 and self.axes[-2:] in INNER and self.axes[-2:] in (
                ("k", "v"), ("v", "k")):
            return INNER[self.axes[-2:]]
        return "(" + ", ".join(self.axes) + ")"

    def shape(self, sizes: Mapping[str, Size]) -> tuple[Size, ...]:
        return tuple(self._sizes(sizes)[a] for a in self.axes)

    def strides(self, sizes: Mapping[str, Size]) -> dict[str, sympy.Expr]:
        """Contiguous strides, in elements, by axis name."""
        sizes = self._sizes(sizes)
        strides, step = {}, sympy.Integer(1)
        for axis in reversed(self.axes):
            strides[axis] = step
            step = step * sizes[axis]
        return strides

    def offset(self, sizes: Mapping[str, Size], index: Mapping[str, Size]) -> sympy.Expr:
        """Element offset of a logical index."""
        strides = self.strides(sizes)
        return sympy.expand(sum(sympy.sympify(index[a]) * strides[a] for a in self.axes))

    def permutation(self, to: "Layout") -> tuple[int, ...]:
        """The dims of a tensor in this layout, in `to`'s order: `t.permute(p)` is `to`-ordered."""
        if set(to.axes) != set(self.axes):
            raise ArgumentError("to", f"layout {to} has other axes than {self}")
        return tuple(self.axes.index(a) for a in to.axes)

    def reorder(self, values: tuple, to: "Layout") -> tuple:
        """Per-axis values (a shape) given in this layout's order, in `to`'s order."""
        return tuple(values[i] for i in self.permutation(to))

    def view(self, tensor: torch.Tensor, to: "Layout") -> torch.Tensor:
        """The same memory seen with `to`'s axis order (no copy)."""
        self._check_rank(tensor)
        return tensor.permute(self.permutation(to))

    def convert(self, tensor: torch.Tensor, to: "Layout") -> torch.Tensor:
        """A contiguous copy of `tensor` (in this layout) stored in `to`'s layout."""
        return self.view(tensor, to).contiguous()

    def runs(self, sizes: Mapping[str, Size], **ranges: tuple[Size, Size]) -> Runs:
        """The contiguous runs covered by the region `axis=(start, stop)` (whole axis when not
        given). Walking from the innermost axis out, whole axes merge into one run; the first
        partial axis sets the run length; every axis outside it adds runs."""
        sizes = self._sizes(sizes)
        unknown = set(ranges) - set(self.axes)
        if unknown:
            raise ArgumentError("ranges", f"axes {sorted(unknown)} are not in layout {self}")
        region = {a: tuple(map(sympy.sympify, ranges.get(a, (0, sizes[a])))) for a in self.axes}
        strides = self.strides(sizes)
        start = sum(region[a][0] * strides[a] for a in self.axes)
        length, outer = sympy.Integer(1), []
        merging = True
        for axis in reversed(self.axes):
            first, stop = region[axis]
            if merging:
                length = length * (stop - first)
                merging = first == 0 and stop == sizes[axis]
            else:
                outer.append((axis, first, stop, strides[axis]))
        return Runs(sympy.expand(length), sympy.expand(start), tuple(reversed(outer)))

    def _sizes(self, sizes: Mapping[str, Size]) -> dict[str, sympy.Expr]:
        missing = [a for a in self.axes if a not in sizes]
        if missing:
            raise ArgumentError("sizes", f"no size for axes {missing} of layout {self}")
        return {a: sympy.sympify(sizes[a]) for a in self.axes}

    def _check_rank(self, tensor: torch.Tensor) -> None:
        if tensor.dim() != len(self.axes):
            raise ArgumentError("tensor", f"rank {tensor.dim()} does not match layout {self}")


SD = Layout(("slot", "tok", "dim"))
DS = Layout(("slot", "dim", "tok"))
KV = Layout(("slot", "head", "k", "v"))
VK = Layout(("slot", "head", "v", "k"))
LAYOUTS = {"SD": SD, "DS": DS, "KV": KV, "VK": VK}
INNER = {("tok", "dim"): "SD", ("dim", "tok"): "DS", ("k", "v"): "KV", ("v", "k"): "VK"}
NAMES = {SD.axes: "SD", DS.axes: "DS"}
KINDS = {"conv": ("SD", "DS"), "recurrent": ("KV", "VK")}  # pool kind -> the layouts it may take
# layout="auto": each kind in the order layoutpass's kernels were measured fastest in on the H200
# (benchmarks/results/kernels.md: the conv on DS never slower than on SD beyond 1%;
# recurrent.md: VK ahead of KV in 26 of 30 cells, the Mamba2 SSM update in all 10)
AUTO = {"conv": "DS", "recurrent": "VK"}


def parse_layout(name: "str | Layout", argument: str = "layout", kind: str | None = None) -> Layout:
    """'SD' / 'DS' / 'KV' / 'VK' (any case; only those of `kind` when given) or a Layout;
    anything else is an ArgumentError naming `argument`."""
    if isinstance(name, Layout):
        return name
    allowed = KINDS[kind] if kind else tuple(LAYOUTS)
    if isinstance(name, str) and name.upper() in allowed:
        return LAYOUTS[name.upper()]
    raise ArgumentError(argument, f"unknown layout {name!r}; expected one of {list(allowed)}")


def requested(layout) -> dict[str, Layout]:
    """optimize()'s layout= as kind -> Layout: a conv layout ("DS", "SD"), a recurrent one ("KV",
    "VK"), "auto" (AUTO), or a mapping kind -> one of those or "auto"."""
    if isinstance(layout, Mapping):
        unknown = [k for k in layout if k not in KINDS]
        if unknown:
            raise ArgumentError("layout", f"unknown pool kinds {unknown}; expected some of {list(KINDS)}")
        return {kind: LAYOUTS[AUTO[kind]] if _is_auto(v) else parse_layout(v, f"layout[{kind!r}]", kind)
                for kind, v in layout.items()}
    if _is_auto(layout):
        return {kind: LAYOUTS[name] for kind, name in AUTO.items()}
    if not isinstance(layout, Layout) and not (isinstance(layout, str) and layout.upper() in LAYOUTS):
        raise ArgumentError("layout", f"unknown layout {layout!r}; expected one of {[*LAYOUTS, 'auto']}, or a "
                                      f"mapping {{kind: layout}}")
    parsed = parse_layout(layout)
    kind = next(k for k, names in KINDS.items() if str(parsed) in names or parsed.axes[-2:] in (
        parse_layout(n).axes[-2:] for n in names))
    return {kind: parsed}


def _is_auto(layout) -> bool:
    return isinstance(layout, str) and layout.lower() == "auto"


def arrange(axes: Layout, request: Layout) -> Layout:
    """The memory order of a pool with logical `axes` in the requested layout: its other axes
    stay outermost in their order, the request's two innermost axes go innermost."""
    inner = request.axes[-2:]
    if not set(inner) <= set(axes.axes):
        raise ArgumentError("layout", f"layout {request} does not apply to a pool of axes {axes.axes}")
    return Layout(tuple(a for a in axes.axes if a not in inner) + inner)


def dense_strides(axes: Layout, order: Layout, shape: tuple, slot_stride=None) -> tuple:
    """Strides of a tensor shaped along `axes` whose memory follows `order` densely (the slot
    axis may keep a larger stride: a pool carved out of a bigger per-slot page)."""
    sizes = dict(zip(axes.axes, shape))
    step, strides = 1, {}
    for axis in reversed(order.axes):
        strides[axis] = step
        step = step * sizes[axis]
    if slot_stride is not None and "slot" in strides:
        strides["slot"] = slot_stride
    return tuple(strides[a] for a in axes.axes)


def order_of(axes: Layout, shape: tuple, strides: tuple) -> Layout | None:
    """The memory order of a tensor shaped along `axes` with these strides when each slot's
    state is one dense block (the slot axis outermost, with any stride); None otherwise. Axes
    of size 1 take their place in the logical order."""
    rest = [i for i, a in enumerate(axes.axes) if a != "slot"]
    ranked = sorted(rest, key=lambda i: (-strides[i] if shape[i] != 1 else 0, i))
    step = 1
    for i in sorted((i for i in rest if shape[i] != 1), key=lambda i: strides[i]):
        if strides[i] != step:
            return None
        step *= shape[i]
    if "slot" in axes.axes:
        slot = axes.axes.index("slot")
        if shape[slot] != 1 and strides[slot] < step:
            return None
        return Layout(("slot",) + tuple(axes.axes[i] for i in ranked))
    return Layout(tuple(axes.axes[i] for i in ranked))
