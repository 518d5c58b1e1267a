"""Heterogeneous tensor parallelism for disaggregated serving: which contiguous runs of each
slot's state go from each prefill rank (TP=tp_src) to each decode rank (TP=tp_dst), derived from
the layout algebra, and an executor that moves every pool of every layer of a request.

A plan covers one pool kind (every layer's pool of that kind has one plan):
- conv pools, axes (slot, tok, dim), stored SD or DS. Their channels are `channel_groups` laid
  end to end (Mamba2: [x | B | C]; GDN: [q | k | v]), and a rank's local pool holds its share of
  every group, in group order. A group given as an int is split evenly across a TP world. A group
  given as `(width, n_groups)` is made of `n_groups` model groups (Mamba2's B and C: n_groups *
  d_state channels; GDN's q and k: k_heads * head_k_dim): split evenly when TP divides n_groups,
  otherwise (TP a multiple of n_groups) each rank holds the one model group its heads belong to,
  `rank * n_groups // tp`, replicated across `tp // n_groups` ranks, as vLLM's Mamba2 mixer does
  for n_groups < TP. A destination rank gets each group it needs from one source rank that holds
  it, never a share of an even split of replicated channels (vLLM issue 55208).
- recurrent pools, axes (slot, [snap], head, k, v) (k: the key / B / d_state axis, v: the value /
  x / head_dim axis), stored KV (v contiguous) or VK (k contiguous), sharded by heads: head h of
  H lives on rank h // (H / tp). Either side may have a snapshot axis (spec decode); the plan
  moves the snapshots `snapshots` names ("all", "last", or (src first, src stop, dst first)).

The sharded axis ("dim" or "head") is cut into pieces (src rank, dst rank, local ranges on
both sides); each piece's runs on each side are `Layout.runs` of its region in that side's
memory order. When both sides walk a region in one order (same layout, or orders that differ
only in axes of extent 1) the runs pair up one to one (`Plan.instantiate`); otherwise the two
innermost axes are swapped (SD <-> DS, KV <-> VK) and the receiver relayouts each box.

`Transfer` moves a request's slots of every pool of every plan (conv + recurrent, all layers)
over torch.distributed (NCCL on GPUs, gloo on the CPU): per chunk of slots one packing launch per
pool kind, one batch_isend_irecv (one message per peer), and an unpacking launch per kind while
the next chunk travels, in a ring of `ring` reused buffers. `execute` is the one-shot form for
one plan; `simulate` runs every rank of a transfer in one process (the same tables and copies,
messages handed over in memory)."""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import product

import sympy
import torch
import torch.distributed as dist

from .errors import ArgumentError
from .kernels import state
from .layout import LAYOUTS, Layout, Runs, arrange

# A chunk's send overlaps the next chunk's packing and the previous chunk's unpacking. On 4 H200s the
# conv pools' 1 GB pair transfer was fastest at 2-4 chunks of 256-512 MB (commit 905f931's run,
# benchmarks/NOTES.md); a whole Mamba2 hand-off (tens of GB per pair with the SSM state) goes in
# many chunks through `RING` reused buffers per side (benchmarks/tp_nccl.py sweeps the size).
CHUNK_BYTES = 256 << 20  # per (src, dst) pair
RING = 3
_ALIGN_BYTES = 16  # every record, and every kind's part of a message, starts 16-byte aligned

CONV_AXES = Layout(("slot", "tok", "dim"))


@dataclass(frozen=True)
class Piece:
    """A range of the sharded axis one src rank sends one dst rank (from one group, or adjacent
    groups adjacent on both sides): `src_range` / `dst_range` are local ranges of the sharded axis
    ("dim": channels, "head": heads); the runs cover the piece's region (with the moved snapshots)
    within one slot's block of each side's pool."""

    src_rank: int
    dst_rank: int
    src_range: tuple[int, int]
    dst_range: tuple[int, int]
    src_runs: Runs
    dst_runs: Runs

    @property
    def src_dim(self) -> tuple[int, int]:
        return self.src_range

    @property
    def dst_dim(self) -> tuple[int, int]:
        return self.dst_range


@dataclass(frozen=True)
class Plan:
    kind: str  # "conv" or "recurrent"
    axis: str  # the sharded axis
    src_axes: Layout  # a src rank's pool's logical axes (slot first)
    dst_axes: Layout
    src_layout: Layout  # memory orders (slot outermost)
    dst_layout: Layout
    sizes: tuple[tuple[str, sympy.Expr], ...]  # the unsharded axes both sides share (tok; k, v), slot and snap aside
    snap: tuple[int | None, int | None]  # snapshots per slot on the src and dst side (None: no snapshot axis)
    snapshots: tuple[int, int, int] | None  # moved: src snapshots [first, stop) to dst snapshots from `first`
    channel_groups: tuple[tuple[int, int | None], ...]  # (width, n_groups or None for an even split)
    tp_src: int
    tp_dst: int
    pieces: tuple[Piece, ...]
    mode: str  # "runs": both sides walk a region in one order; "boxes": the two innermost axes swap
    args: tuple = field(default=(), compare=False, repr=False)  # plan()'s arguments, to bind symbolic sizes

    @property
    def state_len(self) -> sympy.Expr | None:
        return dict(self.sizes).get("tok")

    def local_dim(self, role: str) -> int:
        """A rank's local extent of the sharded axis (channels of a conv pool, heads of a
        recurrent one) on the "src" or "dst" side."""
        tp = self.tp_src if role == "src" else self.tp_dst
        return sum(hi - lo for lo, hi in (_share(w, g, tp, 0) for w, g in self.channel_groups))

    def local_sizes(self, role: str) -> dict[str, sympy.Expr]:
        """Every axis size of one rank's pool (slot: 1, one slot's block)."""
        sizes = dict(self.sizes, slot=sympy.Integer(1))
        sizes[self.axis] = sympy.Integer(self.local_dim(role))
        count = self.snap[0 if role == "src" else 1]
        if count is not None:
            sizes["snap"] = sympy.Integer(count)
        return sizes

    def block(self, role: str) -> sympy.Expr:
        """Elements of one slot's state on a rank of that side."""
        return sympy.Mul(*self.local_sizes(role).values())

    def piece_elements(self, piece: Piece) -> sympy.Expr:
        """Elements of one slot's state a piece moves."""
        moved = 1 if self.snapshots is None else self.snapshots[1] - self.snapshots[0]
        others = [s for a, s in self.sizes if a != self.axis]
        return sympy.Mul(piece.dst_range[1] - piece.dst_range[0], moved, *others)

    def runs_per_slot(self, src_rank: int, dst_rank: int, side: str = "src") -> sympy.Expr:
        """Contiguous runs the src rank reads (side "src") or the dst rank writes (side "dst")
        per slot for this pair; symbolic in any symbolic size."""
        return sympy.expand(sum(((p.src_runs if side == "src" else p.dst_runs).count for p in self.pieces
                                 if (p.src_rank, p.dst_rank) == (src_rank, dst_rank)), sympy.Integer(0)))

    def instantiate(self, sizes=None) -> dict[tuple[int, int], list[tuple[int, int, int]]]:
        """(src rank, dst rank) -> [(src_offset, dst_offset, length)] within one slot's block of
        each side, when both sides walk the pieces in one order (an RDMA connector's
        descriptors). `sizes`: values for symbolic sizes (a conv plan also takes the state
        length as an int)."""
        if self.mode != "runs":
            raise ArgumentError("dst_layout", f"runs pair up only between pools walked in one order ({self.src_layout} "
                                              f"-> {self.dst_layout} swaps the innermost axes); the executor "
                                              "relayouts each box instead")
        subs = _subs(self, sizes)
        out: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for p in self.pieces:
            out.setdefault((p.src_rank, p.dst_rank), []).extend(
                _pair(_concrete(p.src_runs, subs), _concrete(p.dst_runs, subs)))
        return out


def plan(pool_layout: "str | Layout", sizes: dict, channel_groups=None, tp_src: int = 1, tp_dst: int = 1,
         dst_layout: "str | Layout | None" = None, *, snapshots=None, axis: str | None = None) -> Plan:
    """The transfer plan of one pool kind.

    pool_layout / dst_layout: "SD" / "DS" (a conv pool) or "KV" / "VK" (a recurrent pool) for
    the src and dst side (dst defaults to src), or a Layout giving a memory order outright.
    sizes: conv {"tok": state_len}; recurrent {"head": H, "k": K, "v": V} and optionally
    "snap": the snapshots per slot, an int (both sides) or (src, dst) with None for a side without
    the axis. Sizes may be sympy symbols (the executor binds them from the pools).
    channel_groups: along the sharded axis, ints (split evenly) or (width, n_groups) pairs (see the
    module docstring); a recurrent pool defaults to its heads split evenly.
    snapshots: "all" (the default when both sides keep as many), "last" (the src's last into
    the dst's last, right-aligned as examples/recurrence.py keeps them; the default otherwise) or
    (src first, src stop, dst first).
    axis: the sharded axis (default "dim" for conv pools, "head" for recurrent ones, "v" when
    a recurrent pool has no head axis)."""
    args = (pool_layout, dict(sizes), channel_groups, tp_src, tp_dst, dst_layout, snapshots, axis)
    src_req = _layout_arg(pool_layout, "pool_layout")
    dst_req = _layout_arg(dst_layout, "dst_layout") if dst_layout is not None else src_req
    kind = "conv" if "dim" in src_req.axes else "recurrent"
    if ("dim" in dst_req.axes) != (kind == "conv"):
        raise ArgumentError("dst_layout", f"layout {dst_layout} is not of a {kind} pool like {pool_layout}")
    for name, tp in (("tp_src", tp_src), ("tp_dst", tp_dst)):
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ArgumentError(name, f"must be a positive int, got {tp!r}")
    if not isinstance(sizes, dict):
        raise ArgumentError("sizes", f"expected a dict of axis sizes, got {sizes!r}")
    sizes = dict(sizes)
    snap = _snap_counts(sizes.pop("snap", None), kind)
    if kind == "conv":
        if "tok" not in sizes:
            raise ArgumentError("sizes", "give the state length as sizes['tok']")
        base = CONV_AXES
        axis = axis or "dim"
    else:
        missing = [a for a in ("k", "v") if a not in sizes]
        if missing:
            raise ArgumentError("sizes", f"a recurrent pool needs sizes {missing}")
        base = Layout(("slot", "head", "k", "v") if "head" in sizes else ("slot", "k", "v"))
        axis = axis or ("head" if "head" in sizes else "v")
    if axis not in base.axes or axis == "slot":
        raise ArgumentError("axis", f"{axis!r} is not an axis of the pool {base.axes}")
    if channel_groups is None:
        if kind == "conv":
            raise ArgumentError("channel_groups", "a conv pool needs its channel groups")
        if axis not in sizes:
            raise ArgumentError("sizes", f"give the size of the sharded axis {axis!r}")
        channel_groups = [sizes[axis]]
    groups = _groups(channel_groups, tp_src, tp_dst)
    width = sum(w for w, _ in groups)
    if axis in sizes and sympy.sympify(sizes[axis]) != width:
        raise ArgumentError("channel_groups", f"groups of {width} do not cover sizes[{axis!r}] = {sizes[axis]}")
    sizes[axis] = width
    unknown = set(sizes) - set(base.axes)
    if unknown:
        raise ArgumentError("sizes", f"axes {sorted(unknown)} are not axes of the pool {base.axes}")
    shared = tuple((a, sympy.sympify(sizes[a])) for a in base.axes[1:])
    side_axes = [Layout(base.axes[:1] + (("snap",) if count is not None else ()) + base.axes[1:]) for count in snap]
    src_layout, dst_layout_ = (_memory_order(axes, req, name) for axes, req, name in
                               zip(side_axes, (src_req, dst_req), ("pool_layout", "dst_layout")))
    moved = _snapshots(snapshots, snap)
    pieces_ = _pieces(groups, tp_src, tp_dst)
    m = 1 if moved is None else moved[1] - moved[0]
    mode = _mode(src_layout, dst_layout_, dict(shared), axis, m)
    local = {role: dict(shared, slot=sympy.Integer(1)) for role in ("src", "dst")}
    for role, tp, count in (("src", tp_src, snap[0]), ("dst", tp_dst, snap[1])):
        local[role][axis] = sympy.Integer(sum(hi - lo for lo, hi in (_share(w, g, tp, 0) for w, g in groups)))
        if count is not None:
            local[role]["snap"] = sympy.Integer(count)
    pieces = []
    for a, b, sr, dr in pieces_:
        src_snap = {"snap": (moved[0], moved[1])} if snap[0] is not None else {}
        dst_snap = {"snap": (moved[2], moved[2] + m)} if snap[1] is not None else {}
        pieces.append(Piece(a, b, sr, dr, src_layout.runs(local["src"], **{axis: sr}, **src_snap),
                            dst_layout_.runs(local["dst"], **{axis: dr}, **dst_snap)))
    return Plan(kind, axis, side_axes[0], side_axes[1], src_layout, dst_layout_, shared, snap, moved, groups, tp_src,
                tp_dst, tuple(pieces), mode, args)


def mamba2(*, heads: int, head_dim: int, d_state: int, n_groups: int, conv_width: int, tp_src: int, tp_dst: int,
           conv=("DS", "DS"), ssm=("VK", "VK"), snap=None, snapshots=None) -> tuple[Plan, Plan]:
    """The plans of a Mamba2 layer's two pools: the conv state (channels [x | B | C], x =
    heads * head_dim split with the heads, B and C n_groups * d_state each, split or replicated
    by vLLM's rule) and the SSM state (heads, k = d_state, v = head_dim). conv / ssm: (src, dst)
    layouts; snap: snapshots per slot of the SSM pool (see plan)."""
    for name, tp in (("tp_src", tp_src), ("tp_dst", tp_dst)):
        if isinstance(tp, int) and tp >= 1 and heads % tp:
            raise ArgumentError(name, f"{heads} heads do not split across {name}={tp}")
    groups = [heads * head_dim, (n_groups * d_state, n_groups), (n_groups * d_state, n_groups)]
    sizes = {"head": heads, "k": d_state, "v": head_dim} | ({"snap": snap} if snap is not None else {})
    return (plan(conv[0], {"tok": conv_width - 1}, groups, tp_src, tp_dst, dst_layout=conv[1]),
            plan(ssm[0], sizes, None, tp_src, tp_dst, dst_layout=ssm[1], snapshots=snapshots))


def gated_delta_net(*, k_heads: int, v_heads: int, head_k_dim: int, head_v_dim: int, conv_width: int, tp_src: int,
                    tp_dst: int, conv=("DS", "DS"), state=("VK", "VK"), snap=None, snapshots=None) -> tuple[Plan, Plan]:
    """The plans of a gated-delta-rule layer's pools: the conv state (channels [q | k | v], q and
    k with k_heads heads of head_k_dim, v with v_heads of head_v_dim) and the recurrent state
    (v_heads heads, k = head_k_dim, v = head_v_dim)."""
    for name, tp in (("tp_src", tp_src), ("tp_dst", tp_dst)):
        if isinstance(tp, int) and tp >= 1 and v_heads % tp:
            raise ArgumentError(name, f"{v_heads} value heads do not split across {name}={tp}")
    groups = [(k_heads * head_k_dim, k_heads), (k_heads * head_k_dim, k_heads), (v_heads * head_v_dim, v_heads)]
    sizes = {"head": v_heads, "k": head_k_dim, "v": head_v_dim} | ({"snap": snap} if snap is not None else {})
    return (plan(conv[0], {"tok": conv_width - 1}, groups, tp_src, tp_dst, dst_layout=conv[1]),
            plan(state[0], sizes, None, tp_src, tp_dst, dst_layout=state[1], snapshots=snapshots))


def _layout_arg(value, argument: str) -> Layout:
    if isinstance(value, Layout):
        return value
    if isinstance(value, str) and value.upper() in LAYOUTS:
        return LAYOUTS[value.upper()]
    raise ArgumentError(argument, f"unknown layout {value!r}; expected one of {list(LAYOUTS)} or a Layout")


def _memory_order(axes: Layout, request: Layout, argument: str) -> Layout:
    """A named layout applies to the pool's axes as arrange() places it; a Layout of exactly
    the pool's axes is the memory order itself."""
    if request in LAYOUTS.values():
        return arrange(axes, request)
    if set(request.axes) != set(axes.axes) or request.axes[0] != "slot":
        raise ArgumentError(argument, f"layout {request} is not an order of the pool's axes {axes.axes} "
                                      "with the slot outermost")
    return request


def _snap_counts(value, kind: str) -> tuple[int | None, int | None]:
    if value is None:
        return None, None
    if kind == "conv":
        raise ArgumentError("sizes", "conv pools have no snapshot axis")
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(v is None or (isinstance(v, int) and v >= 1) for v in pair):
        raise ArgumentError("sizes", f"sizes['snap'] is a positive int or a (src, dst) pair of them or None, "
                                     f"got {value!r}")
    return pair


def _snapshots(spec, snap) -> tuple[int, int, int] | None:
    s, d = snap
    if s is None and d is None:
        if spec not in (None, "all", "last"):
            raise ArgumentError("snapshots", "neither side has a snapshot axis")
        return None
    a, b = s or 1, d or 1
    if spec is None:
        spec = "all" if s is not None and s == d else "last"
    if spec == "all":
        if a != b:
            raise ArgumentError("snapshots", f"'all' needs as many snapshots on both sides, got {a} and {b}")
        return 0, a, 0
    if spec == "last":
        return a - 1, a, b - 1
    if (isinstance(spec, (tuple, list)) and len(spec) == 3 and all(isinstance(v, int) for v in spec)
            and 0 <= spec[0] < spec[1] <= a and 0 <= spec[2] and spec[2] + spec[1] - spec[0] <= b):
        return tuple(spec)
    raise ArgumentError("snapshots", f"expected 'all', 'last' or (src first, src stop, dst first) within {a} src and "
                                     f"{b} dst snapshots, got {spec!r}")


def _walk(layout: Layout, sizes: dict, axis: str, moved: int) -> tuple[str, ...]:
    """The order in which a side walks a piece's region: its memory order without the slot and
    without axes of extent 1 (one snapshot moved, an unsharded axis of size 1)."""
    return tuple(a for a in layout.axes[1:] if not (a == "snap" and moved == 1)
                 and not (a not in (axis, "snap") and sizes[a] == 1))


def _mode(src: Layout, dst: Layout, sizes: dict, axis: str, moved: int) -> str:
    """"runs" when both sides walk a region in one order, "boxes" when their orders differ in
    the two innermost axes only (the receiver relayouts)."""
    s, d = _walk(src, sizes, axis, moved), _walk(dst, sizes, axis, moved)
    if s == d:
        return "runs"
    if len(s) >= 2 and s[:-2] == d[:-2] and s[-2:] == d[-2:][::-1]:
        return "boxes"
    raise ArgumentError("dst_layout", f"{src} -> {dst}: the orders differ in more than their two innermost axes")


def _groups(channel_groups, tp_src: int, tp_dst: int) -> tuple[tuple[int, int | None], ...]:
    if not isinstance(channel_groups, (list, tuple)):
        raise ArgumentError("channel_groups", f"expected a list of groups, got {channel_groups!r}")
    out = []
    for spec in channel_groups:
        pair = isinstance(spec, (tuple, list)) and len(spec) == 2
        width, n = spec if pair else (spec, None)
        values = (width, n) if pair else (width,)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise ArgumentError("channel_groups", f"expected an int or a (width, n_groups) pair of positive ints, "
                                                  f"got {spec!r}")
        if n is not None and width % n:
            raise ArgumentError("channel_groups", f"width {width} is not a multiple of n_groups={n}")
        for name, tp in (("tp_src", tp_src), ("tp_dst", tp_dst)):
            if n is None and width % tp:
                raise ArgumentError("channel_groups", f"groups [{width}] do not split evenly across {name}={tp}")
            if n is not None and n % tp and tp % n:
                raise ArgumentError("channel_groups", f"n_groups={n} of group {width} neither splits across nor "
                                                      f"replicates over {name}={tp}")
        out.append((width, n))
    if not out:
        raise ArgumentError("channel_groups", "no groups")
    return tuple(out)


def _pieces(groups, tp_src: int, tp_dst: int) -> list[tuple[int, int, tuple[int, int], tuple[int, int]]]:
    """(src rank, dst rank, src local range, dst local range) along the sharded axis: each dst
    rank's share of every group, from one src rank holding it; pieces adjacent on both sides merge."""
    moves = []
    for b in range(tp_dst):
        src_base, dst_base = [0] * tp_src, 0
        for w, g in groups:
            shares = [_share(w, g, tp_src, a) for a in range(tp_src)]
            dlo, dhi = _share(w, g, tp_dst, b)
            for lo, hi in sorted(set(shares)):  # each distinct src share once: one holder sends it
                lo_, hi_ = max(lo, dlo), min(hi, dhi)
                if lo_ < hi_:
                    a = _holder([r for r in range(tp_src) if shares[r] == (lo, hi)], b, tp_src, tp_dst)
                    s0, d0 = src_base[a] + lo_ - lo, dst_base + lo_ - dlo
                    moves.append([a, b, (s0, s0 + hi_ - lo_), (d0, d0 + hi_ - lo_)])
            src_base = [base + hi - lo for base, (lo, hi) in zip(src_base, shares)]
            dst_base += dhi - dlo
    moves.sort(key=lambda m: (m[0], m[1]))  # stable: group order within a pair
    merged = []
    for m in moves:  # adjacent on both sides (a whole local block, say): one piece
        last = merged[-1] if merged else None
        if last and last[:2] == m[:2] and last[2][1] == m[2][0] and last[3][1] == m[3][0]:
            last[2], last[3] = (last[2][0], m[2][1]), (last[3][0], m[3][1])
        else:
            merged.append(m)
    return [tuple(m) for m in merged]


def _share(width: int, n_groups: int | None, tp: int, rank: int) -> tuple[int, int]:
    """The range [lo, hi) of one group that a rank holds."""
    if n_groups is None or n_groups % tp == 0:
        return rank * width // tp, (rank + 1) * width // tp
    group = rank * n_groups // tp  # replicated: the model group of the rank's heads
    return group * width // n_groups, (group + 1) * width // n_groups


def _holder(holders: list[int], dst_rank: int, tp_src: int, tp_dst: int) -> int:
    """Of the src ranks holding a replicated share, the one nearest the dst rank's own position
    (rank dst_rank * tp_src // tp_dst also sends it its other channels: no extra message)."""
    return min(max(dst_rank * tp_src // tp_dst, holders[0]), holders[-1])


def _pair(src: list[tuple[int, int]], dst: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Both sides list the same elements in the same order, cut into runs differently (a
    whole-width local pool merges what the other side splits): walk both, cutting at every
    boundary of either."""
    out, i, j, taken_src, taken_dst = [], 0, 0, 0, 0
    while i < len(src) and j < len(dst):
        n = min(src[i][1] - taken_src, dst[j][1] - taken_dst)
        out.append((src[i][0] + taken_src, dst[j][0] + taken_dst, n))
        taken_src, taken_dst = taken_src + n, taken_dst + n
        if taken_src == src[i][1]:
            i, taken_src = i + 1, 0
        if taken_dst == dst[j][1]:
            j, taken_dst = j + 1, 0
    return out


def _subs(p: Plan, sizes) -> dict:
    if sizes is None:
        sizes = {}
    if not isinstance(sizes, dict):  # a conv plan's state length
        sizes = {"tok": sizes}
    subs = {}
    for axis, value in p.sizes:
        if axis in sizes and not value.is_Integer:
            subs[value] = sympy.Integer(sizes[axis])
    return subs


def _concrete(runs: Runs, subs) -> list[tuple[int, int]]:
    concrete = Runs(sympy.sympify(runs.length).subs(subs), sympy.sympify(runs.start).subs(subs),
                    tuple((a, sympy.sympify(f).subs(subs), sympy.sympify(s).subs(subs), sympy.sympify(st).subs(subs))
                          for a, f, s, st in runs.outer))
    return list(concrete)


def _is_concrete(p: Plan) -> bool:
    return all(v.is_Integer for _, v in p.sizes)


@lru_cache(maxsize=256)
def _bound(p: Plan, values: tuple[tuple[str, int], ...]) -> Plan:
    """The plan with its symbolic sizes set (from plan()'s own arguments: the same derivation)."""
    layout, sizes, groups, tp_src, tp_dst, dst_layout, snapshots, axis = p.args
    sizes = {**sizes, **dict(values)}
    return plan(layout, sizes, groups, tp_src, tp_dst, dst_layout, snapshots=snapshots, axis=axis)


# ---------------------------------------------------------------------------------------------
# What one rank moves, per plan: its peers, the (padded) record per (slot, layer) for each, and the
# rows of runs or boxes, offsets within one slot's block and within the peer's record.

@dataclass(frozen=True)
class _Side:
    peers: tuple[int, ...]  # TP ranks of the other side, ascending
    records: tuple[int, ...]  # elements per (slot, layer) for each peer, padded to _ALIGN_BYTES
    rows: tuple[tuple[tuple[int, ...], ...], ...]  # per peer: (pool offset, record offset, length) runs,
    # or (pool offset, record offset, x extent, y extent) boxes
    boxes: tuple[int, int] | None  # a receiver that relayouts: the pool strides (sx, sy) of the box's x and y
    runs_per_slot: int  # pool-side runs per slot and layer


@lru_cache(maxsize=256)
def _side(p: Plan, role: str, index: int, element_size: int) -> _Side:
    mine = [q for q in p.pieces if (q.src_rank if role == "src" else q.dst_rank) == index]
    peer_of = (lambda q: q.dst_rank) if role == "src" else (lambda q: q.src_rank)
    peers = sorted({peer_of(q) for q in mine})
    pad = max(1, _ALIGN_BYTES // element_size)
    boxes = role == "dst" and p.mode == "boxes"
    records, rows, count = [], [], 0
    strides = None
    for peer in peers:
        offset, peer_rows = 0, []
        for q in (q for q in mine if peer_of(q) == peer):
            runs = _concrete(q.src_runs if role == "src" else q.dst_runs, {})
            count += len(runs)
            if boxes:
                box_rows, strides = _boxes(p, q, offset)
                peer_rows += box_rows
            else:  # the record holds the region in the src's order, which both sides walk here
                at = offset
                for start, length in runs:
                    peer_rows.append((start, at, length))
                    at += length
            offset += int(p.piece_elements(q))
        records.append(-(-offset // pad) * pad)
        rows.append(tuple(peer_rows))
    return _Side(tuple(peers), tuple(records), tuple(rows), strides if boxes else None, count)


def _boxes(p: Plan, q: Piece, offset: int) -> tuple[list[tuple[int, int, int, int]], tuple[int, int]]:
    """A piece's region, held in the record in the src's order (outer axes..., x, y), as (x, y)
    boxes, one per index of the outer axes, each placed in the dst pool by the dst layout's
    offsets and strides (its order has x and y swapped)."""
    moved = 1 if p.snapshots is None else p.snapshots[1] - p.snapshots[0]
    x, y = _walk(p.src_layout, dict(p.sizes), p.axis, moved)[-2:]
    extent = {a: q.dst_range[1] - q.dst_range[0] if a == p.axis else int(s) for a, s in p.sizes}
    extent["snap"] = moved
    region = [a for a in p.src_layout.axes[1:] if a != "snap" or p.snap[1] is not None]  # the dst's axes
    outer = [a for a in region if a not in (x, y)]
    first = {p.axis: q.dst_range[0], "snap": p.snapshots[2] if p.snapshots else 0}
    dst_sizes = p.local_sizes("dst")
    strides = p.dst_layout.strides(dst_sizes)
    rows, box = [], extent[x] * extent[y]
    for k, index in enumerate(product(*(range(extent[a]) for a in outer))):
        at = {a: first.get(a, 0) for a in p.dst_layout.axes if a != "slot"}
        at.update({a: first.get(a, 0) + i for a, i in zip(outer, index)})
        at["slot"] = 0
        rows.append((int(p.dst_layout.offset(dst_sizes, at)), offset + k * box, extent[x], extent[y]))
    return rows, (int(strides[x]), int(strides[y]))


# ---------------------------------------------------------------------------------------------
# The executor.

@dataclass
class _Kind:
    """One plan's pools on one role of this process."""

    plan: Plan
    pools: list[torch.Tensor]  # flat (slots, block) views, one per layer
    side: _Side
    layers: int
    dtype: torch.dtype
    size: int


class _Role:
    """One side (src or dst) this process plays: its kinds, peers and message layout."""

    def __init__(self, plans: list[Plan], role: str, index: int, pools, ranks: list[int]):
        if not isinstance(pools, (list, tuple)) or len(pools) != len(plans):
            raise ArgumentError(role, f"expected (index, pools) with one entry of pools per plan ({len(plans)})")
        self.role, self.index = role, index
        self.kinds: list[_Kind] = []
        for p, layer_pools in zip(plans, pools):
            layer_pools = _check_pools(p, layer_pools, role)
            if not _is_concrete(p):
                p = _bind(p, layer_pools[0], role)
            flat = [_flat(t, p, role) for t in layer_pools]
            size = flat[0].element_size()
            self.kinds.append(_Kind(p, flat, _side(p, role, index, size), len(flat), flat[0].dtype, size))
        devices = {k.pools[0].device for k in self.kinds}
        if len(devices) != 1:
            raise ArgumentError("pools", f"every pool of a transfer must be on one device, got "
                                         f"{sorted(map(str, devices))}")
        self.device = devices.pop()
        self.peers = sorted({peer for k in self.kinds for peer in k.side.peers})  # TP ranks of the other side
        self.process = [ranks[peer] for peer in self.peers]  # their process ranks
        # per peer, bytes per slot of the chunk, and each kind's prefix (elements of its dtype per slot)
        self.per_slot, self.prefix = [], []
        total = 0
        for peer in self.peers:
            prefixes, at = [], total
            for k in self.kinds:
                prefixes.append(at // k.size)
                at += k.layers * _record(k, peer) * k.size
            self.prefix.append(prefixes)
            self.per_slot.append(at - total)
            total = at
        self.runs_per_slot = sum(k.side.runs_per_slot * k.layers for k in self.kinds)

    def rows(self, kind: int, peers) -> tuple:
        """The launch rows of one kind for the given peers (positions in self.peers)."""
        k = self.kinds[kind]
        out = []
        for j in peers:
            if self.peers[j] not in k.side.peers:
                continue
            at = k.side.peers.index(self.peers[j])
            rec, prefix = k.side.records[at], self.prefix[j][kind]
            out += [row + (rec, prefix) for row in k.side.rows[at]]
        return tuple(out)


def _record(k: _Kind, peer: int) -> int:
    return k.side.records[k.side.peers.index(peer)] if peer in k.side.peers else 0


class Transfer:
    """A prepared hand-off of a request's slots of every pool of every layer, on one process.

    plans: one Plan per pool kind (or a single Plan). src / dst: this process's role(s), each
    `(tp index, pools)` with pools one entry per plan: that kind's pool of every layer (a tensor
    for one layer, or a list of tensors of one shape, strides, dtype and device). A pool is
    either stored as its memory order shows (dims in the layout's order, as kernels.state's
    functions take them) or keeps its logical axes with the layout in its strides (as layoutpass
    stores a relayouted pool); each slot's state must be one dense block, at any slot stride. A
    process may be both a src and a dst rank (say TP1 -> TP4 on 4 GPUs): the pair between its
    own roles is copied locally. src_ranks / dst_ranks: the process ranks (torch.distributed's
    global ranks) of every TP rank of each side; group: the process group the messages go in
    (default the world). Both sides must give each kind's pools the same dtype and layer count
    (the messages' sizes follow from them).

    Everything that does not depend on the request is done here: pools checked and flattened,
    the tables of every launch built on the device, the launches prepared; message buffers are
    allocated on first use and reused (a ring of `ring` per direction, each for a chunk of about
    `chunk_bytes` per (src, dst) pair). A call moves one request: `transfer(src_slots,
    dst_slots)`. The pools are held by reference: build the Transfer once they are in their
    final memory (a relayout in place moves the bytes under it). kernels: "triton" or "torch"
    for the packing and unpacking (default: Triton on CUDA, torch indexing elsewhere; "triton" on
    the CPU needs TRITON_INTERPRET=1)."""

    def __init__(self, plans, *, src=None, dst=None, src_ranks: Sequence[int], dst_ranks: Sequence[int], group=None,
                 chunk_bytes: int = CHUNK_BYTES, ring: int = RING, kernels: str | None = None):
        plans = [plans] if isinstance(plans, Plan) else list(plans)
        if not plans or not all(isinstance(p, Plan) for p in plans):
            raise ArgumentError("plans", "expected a Plan or a non-empty sequence of Plans")
        if len(plans) == 1:
            src, dst = _one_kind(src), _one_kind(dst)
        tp_src, tp_dst = plans[0].tp_src, plans[0].tp_dst
        if any((p.tp_src, p.tp_dst) != (tp_src, tp_dst) for p in plans):
            raise ArgumentError("plans", "every plan of a transfer must have the same tp_src and tp_dst")
        if len(src_ranks) != tp_src or len(dst_ranks) != tp_dst:
            raise ArgumentError("src_ranks", f"expected {tp_src} src and {tp_dst} dst process ranks, "
                                             f"got {len(src_ranks)} and {len(dst_ranks)}")
        if len(set(src_ranks)) != tp_src or len(set(dst_ranks)) != tp_dst:
            raise ArgumentError("src_ranks", f"one process per TP rank of a side, got {list(src_ranks)} and "
                                             f"{list(dst_ranks)}")
        if src is None and dst is None:
            raise ArgumentError("src", "give this process's src role, dst role or both")
        for name, role, tp in (("src", src, tp_src), ("dst", dst, tp_dst)):
            if role is None:
                continue
            if not isinstance(role, (tuple, list)) or len(role) != 2:
                raise ArgumentError(name, f"expected (a {name} rank, its pools), got {role!r}")
            if not isinstance(role[0], int) or isinstance(role[0], bool) or not 0 <= role[0] < tp:
                raise ArgumentError("index", f"must be a {name} rank in 0..{tp - 1}, got {role[0]!r}")
        if not isinstance(chunk_bytes, int) or chunk_bytes < 1 or not isinstance(ring, int) or ring < 1:
            raise ArgumentError("chunk_bytes", f"chunk_bytes and ring must be positive ints, got {chunk_bytes!r}, "
                                               f"{ring!r}")
        if kernels not in (None, "torch", "triton"):
            raise ArgumentError("kernels", f"expected None, 'torch' or 'triton', got {kernels!r}")
        self.src_ranks, self.dst_ranks, self.group, self.ring = list(src_ranks), list(dst_ranks), group, ring
        self.src = _Role(plans, "src", src[0], src[1], self.dst_ranks) if src is not None else None
        self.dst = _Role(plans, "dst", dst[0], dst[1], self.src_ranks) if dst is not None else None
        self.plans = [k.plan for k in (self.src or self.dst).kinds]
        me = {self.src_ranks[src[0]]} if src is not None else set()
        me |= {self.dst_ranks[dst[0]]} if dst is not None else set()
        if len(me) != 1:
            raise ArgumentError("dst", f"src rank {src[0]} and dst rank {dst[0]} are processes {sorted(me)}: one "
                                       "Transfer is one process's part")
        self.rank = me.pop()
        if self.src and self.dst and (self.src.device != self.dst.device
                                      or [k.dtype for k in self.src.kinds] != [k.dtype for k in self.dst.kinds]):
            raise ArgumentError("dst", "a process's src and dst pools must be on one device, each kind in one dtype")
        self.device = (self.src or self.dst).device
        for role, other in ((self.src, self.dst), (self.dst, self.src)):
            for j, process in enumerate(role.process if role else []):
                if process == self.rank and (other is None or other.index != role.peers[j]):
                    raise ArgumentError(role.role, f"process {self.rank} is also {'dst' if role is self.src else 'src'}"
                                                   f" rank {role.peers[j]}: give that role too")
        use_triton = {None: None, "torch": False, "triton": True}[kernels]
        # the local pair (this process's src role -> its dst role) is copied out of the outgoing buffer
        self.local = -1 if not (self.src and self.dst and self.dst.index in self.src.peers) else \
            self.src.peers.index(self.dst.index)
        self.remote_out = [j for j in range(len(self.src.peers)) if j != self.local] if self.src else []
        self.remote_in = [j for j in range(len(self.dst.peers)) if self.dst.process[j] != self.rank] if self.dst else []
        self.packs = [state.prepare_move_runs(k.pools, self.src.rows(i, range(len(self.src.peers))), True, use_triton)
                      for i, k in enumerate(self.src.kinds)] if self.src else []
        self.unpacks = [self._unpacker(i, self.remote_in, use_triton) for i in range(len(self.dst.kinds))] \
            if self.dst else []
        self.local_unpacks = [self._unpacker(i, None, use_triton) for i in range(len(self.dst.kinds))] \
            if self.local >= 0 else []
        self.chunk_slots = max(1, chunk_bytes // max(1, _largest_pair(self)))
        self._buffers: dict[str, list] = {"out": [], "in": []}
        self._capacity = 0
        self._ops: dict[tuple[int, int], list] = {}
        self._plain: dict[tuple[int, int], tuple] = {}
        self._in_offsets = _offsets(self.dst, self.remote_in) if self.dst else ([], 0)
        self._out_offsets = _offsets(self.src, range(len(self.src.peers))) if self.src else ([], 0)

    def _unpacker(self, kind: int, remote, use_triton):
        """The receive side's launch for one kind: from the incoming buffer (remote peers,
        whose prefixes are those of an incoming layout of the remote peers only) or, for the local
        pair (remote None), from the outgoing buffer's part for this process's dst rank."""
        k = self.dst.kinds[kind]
        if remote is None:
            rows = self._local_rows(kind)
        else:
            rows = []
            base, prefixes = 0, []
            for j in remote:  # the incoming buffer holds the remote peers only, in peer order
                prefixes.append((j, base))
                base += self.dst.per_slot[j]
            for j, start in prefixes:
                if self.dst.peers[j] not in k.side.peers:
                    continue
                at = k.side.peers.index(self.dst.peers[j])
                prefix = (start + sum(o.layers * _record(o, self.dst.peers[j]) * o.size
                                      for o in self.dst.kinds[:kind])) // k.size
                rows += [row + (k.side.records[at], prefix) for row in k.side.rows[at]]
            rows = tuple(rows)
        if k.side.boxes is not None:
            return state.prepare_unpack_tiles(k.pools, rows, *k.side.boxes, use_triton)
        return state.prepare_move_runs(k.pools, rows, False, use_triton)

    def _local_rows(self, kind: int) -> tuple:
        """The dst side's rows for its own process's src rank, with that peer's prefixes in the
        outgoing buffer."""
        k, j = self.dst.kinds[kind], self.local
        peer = self.src.index
        if peer not in k.side.peers:
            return ()
        at = k.side.peers.index(peer)
        src_kind = self.src.kinds[kind]
        start = sum(self.src.per_slot[:j])
        prefix = (start + sum(o.layers * _record(o, self.dst.index) * o.size for o in self.src.kinds[:kind])) // k.size
        if _record(src_kind, self.dst.index) != k.side.records[at]:
            raise AssertionError("the local pair's records differ between its two sides")
        return tuple(row + (k.side.records[at], prefix) for row in k.side.rows[at])

    # -- one call

    def __call__(self, src_slots: torch.Tensor | None = None, dst_slots: torch.Tensor | None = None, *,
                 chunks: int | None = None) -> int:
        """Move the request: src_slots (this process's src role) to dst_slots (its dst role), the
        i-th src slot into the i-th dst slot, the same number on every process. Returns once the
        work is queued on the current stream (CUDA: NCCL's own stream waits on it and it on
        NCCL) or done (CPU), with the number of pool runs this process read or wrote. chunks:
        the number of slot chunks (default: about chunk_bytes per pair each); the same on every
        process."""
        n, spans = self._spans(src_slots, dst_slots, chunks)
        if not spans:
            return 0
        self._reserve(max(hi - lo for lo, hi in spans))
        ring = len(self._buffers["out"] or self._buffers["in"])
        if ring == 0:  # nothing to send or receive: this rank holds nothing the other side needs
            return self._runs(n)
        works: list = [None] * len(spans)
        waited = [False] * len(spans)

        def wait(c):
            if not waited[c]:
                for work in works[c]:
                    work.wait()
                waited[c] = True

        for c, (lo, hi) in enumerate(spans):
            r = c % ring
            if self.src is not None and c >= ring:
                wait(c - ring)  # its sends have read this buffer
            self._pack(r, lo, hi, src_slots, dst_slots)
            ops = self._p2p(r, hi - lo)
            works[c] = dist.batch_isend_irecv(ops) if ops else []
            if self.dst is not None and c - ring + 1 >= 0:
                wait(c - ring + 1)
                self._unpack(c - ring + 1, spans, dst_slots, ring)
        for c in range(max(0, len(spans) - ring + 1), len(spans)):
            wait(c)
            if self.dst is not None:
                self._unpack(c, spans, dst_slots, ring)
        for c in range(len(spans)):
            wait(c)
        return self._runs(n)

    def _spans(self, src_slots, dst_slots, chunks) -> tuple[int, list[tuple[int, int]]]:
        n = None
        for name, role, slots in (("src_slots", self.src, src_slots), ("dst_slots", self.dst, dst_slots)):
            if role is None:
                continue
            if (not isinstance(slots, torch.Tensor) or slots.dim() != 1 or slots.dtype not in (torch.int32, torch.int64)
                    or slots.device != role.device):
                raise ArgumentError(name if self.src and self.dst else "slots",
                                    f"expected a 1-D int32/int64 tensor on {role.device}, got "
                                    + (f"{tuple(slots.shape)} {slots.dtype} on {slots.device}"
                                       if isinstance(slots, torch.Tensor) else repr(slots)))
            if n is not None and slots.shape[0] != n:
                raise ArgumentError("dst_slots", f"{slots.shape[0]} dst slots for {n} src slots")
            n = slots.shape[0]
        if chunks is not None and (not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1):
            raise ArgumentError("chunks", f"must be a positive int, got {chunks!r}")
        if chunks is None:
            chunks = -(-n // self.chunk_slots)
        chunks = min(chunks, n)
        bounds = [n * c // chunks for c in range(chunks + 1)] if chunks else [0]
        return n, [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]

    def _reserve(self, slots: int) -> None:
        """Message buffers for chunks of `slots` slots (a ring of them per direction), reused
        across calls; grown (and the cached messages dropped) when a chunk needs more."""
        if slots <= self._capacity:
            return
        self._capacity = slots
        self._ops.clear()
        self._plain.clear()
        for name, total in (("out", self._out_offsets[1]), ("in", self._in_offsets[1])):
            if total == 0:
                self._buffers[name] = []
                continue
            size = -(-slots * total // _ALIGN_BYTES) * _ALIGN_BYTES
            self._buffers[name] = []
            for _ in range(self.ring):
                buf = torch.empty(size, dtype=torch.uint8, device=self.device)
                role = self.src if name == "out" else self.dst
                views = {k.dtype: buf.view(k.dtype) for k in role.kinds}
                self._buffers[name].append((buf, views))

    def _messages(self, r: int, n: int) -> tuple[list, list]:
        """(process rank, bytes) of each message this process sends and receives for ring slot r
        and a chunk of n slots (cached)."""
        key = (r, n)
        if key not in self._plain:
            sends, recvs = [], []
            for role, name, peers, out in ((self.src, "out", self.remote_out, sends),
                                           (self.dst, "in", self.remote_in, recvs)):
                if role is None or not peers:
                    continue
                offsets, buf = (self._out_offsets if name == "out" else self._in_offsets)[0], self._buffers[name][r][0]
                for j in peers:
                    lo, hi = offsets[j]
                    out.append((role.process[j], buf[n * lo:n * hi]))
            self._plain[key] = (sends, recvs)
        return self._plain[key]

    def _p2p(self, r: int, n: int) -> list:
        """The chunk's batch: the messages as torch.distributed P2P operations (cached)."""
        key = (r, n)
        if key not in self._ops:
            sends, recvs = self._messages(r, n)
            self._ops[key] = ([dist.P2POp(dist.isend, t, peer, self.group) for peer, t in sends]
                              + [dist.P2POp(dist.irecv, t, peer, self.group) for peer, t in recvs])
        return self._ops[key]

    def _pack(self, r: int, lo: int, hi: int, src_slots, dst_slots) -> None:
        if self.src is None:
            return
        views = self._buffers["out"][r][1]
        chunk = src_slots[lo:hi]
        for pack, k in zip(self.packs, self.src.kinds):
            pack(chunk, views[k.dtype])
        if self.local >= 0:
            chunk = dst_slots[lo:hi]
            for unpack, k in zip(self.local_unpacks, self.dst.kinds):
                unpack(chunk, views[k.dtype])

    def _unpack(self, c: int, spans, dst_slots, ring: int) -> None:
        if not self.remote_in:
            return
        lo, hi = spans[c]
        views = self._buffers["in"][c % ring][1]
        chunk = dst_slots[lo:hi]
        for unpack, k in zip(self.unpacks, self.dst.kinds):
            unpack(chunk, views[k.dtype])

    def _runs(self, n: int) -> int:
        return n * sum(role.runs_per_slot for role in (self.src, self.dst) if role is not None)


def _one_kind(role):
    """With one plan, a role's pools may be given bare (a tensor or a list of layers)."""
    if role is None or not isinstance(role, (tuple, list)) or len(role) != 2:
        return role
    index, pools = role
    if isinstance(pools, torch.Tensor) or (isinstance(pools, (list, tuple)) and pools
                                           and all(isinstance(t, torch.Tensor) for t in pools)):
        pools = [pools]
    return index, pools


def _offsets(role: _Role, peers) -> tuple[dict[int, tuple[int, int]], int]:
    """Each peer's bytes per slot in a buffer holding the given peers in order: [lo, hi) (times
    the chunk's slot count), and the total."""
    out, at = {}, 0
    for j in peers:
        out[j] = (at, at + role.per_slot[j])
        at += role.per_slot[j]
    return out, at


def _largest_pair(t: Transfer) -> int:
    """Bytes per slot of the largest (src, dst) pair over the whole transfer, from the plans
    (every process finds the same chunking)."""
    kinds = (t.src or t.dst).kinds
    per_pair: dict[tuple[int, int], int] = {}
    for k in kinds:
        pad = max(1, _ALIGN_BYTES // k.size)
        totals: dict[tuple[int, int], int] = {}
        for q in k.plan.pieces:
            totals[q.src_rank, q.dst_rank] = totals.get((q.src_rank, q.dst_rank), 0) + int(k.plan.piece_elements(q))
        for key, elements in totals.items():
            per_pair[key] = per_pair.get(key, 0) + -(-elements // pad) * pad * k.size * k.layers
    return max(per_pair.values(), default=1)


def _check_pools(p: Plan, pools, role: str) -> list[torch.Tensor]:
    pools = [pools] if isinstance(pools, torch.Tensor) else list(pools) if isinstance(pools, (list, tuple)) else None
    if not pools or not all(isinstance(t, torch.Tensor) for t in pools):
        raise ArgumentError("pools", "expected a pool tensor or a non-empty list of them")
    first = pools[0]
    if any((t.shape, t.stride(), t.dtype, t.device) != (first.shape, first.stride(), first.dtype, first.device)
           for t in pools):
        raise ArgumentError("pools", "every layer's pool must have one shape, strides, dtype and device")
    return pools


def _bind(p: Plan, pool: torch.Tensor, role: str) -> Plan:
    """A plan with its symbolic sizes read off this process's pool (cached)."""
    layout, axes = (p.src_layout, p.src_axes) if role == "src" else (p.dst_layout, p.dst_axes)
    sizes = p.local_sizes(role)
    for order in (layout, axes):
        if pool.dim() != len(order.axes):
            continue
        values, ok = {}, True
        for a, n in zip(order.axes[1:], pool.shape[1:]):
            s = sizes[a]
            if s.is_Integer:
                ok &= int(s) == n
            elif s.is_Symbol and values.get(a, n) == n:
                values[a] = n
            else:
                ok = False
        if ok and values:
            return _bound(p, tuple(sorted(values.items())))
    raise ArgumentError("pools", f"a {role} rank's pool of shape {tuple(pool.shape)} does not fit the plan's sizes "
                                 f"{dict(p.sizes)} in layout {layout}")


def _flat(t: torch.Tensor, p: Plan, role: str) -> torch.Tensor:
    """The pool as a (slots, block) view of its memory: each slot's block dense in the side's
    memory order, given either with its dims in that order or in its logical axes' order."""
    layout, axes = (p.src_layout, p.src_axes) if role == "src" else (p.dst_layout, p.dst_axes)
    sizes = {a: int(v) for a, v in p.local_sizes(role).items()}
    block = math.prod(v for a, v in sizes.items() if a != "slot")
    for order in (layout, axes):
        if t.dim() != len(order.axes) or tuple(t.shape[1:]) != tuple(sizes[a] for a in order.axes[1:]):
            continue
        stride = {a: s for a, s, n in zip(order.axes[1:], t.stride()[1:], t.shape[1:]) if n != 1}
        step, dense = 1, True
        for a in reversed(layout.axes[1:]):
            if a in stride:
                dense &= stride[a] == step
                step *= sizes[a]
        if dense and (t.shape[0] <= 1 or t.stride(0) >= block):
            return torch.as_strided(t, (t.shape[0], block), (t.stride(0), 1), t.storage_offset())
    unit = "channels" if p.axis == "dim" else f"{p.axis}s"
    shape = "(" + ", ".join(layout.axes) + ")"
    fits = [t.dim() == len(o.axes) and tuple(t.shape[1:]) == tuple(sizes[a] for a in o.axes[1:]) for o in (layout, axes)]
    if any(fits):
        raise ArgumentError("pools", f"expected {shape} pools with each slot's block dense in layout {layout}, got "
                                     f"shape {tuple(t.shape)} strides {t.stride()}")
    raise ArgumentError("pools", f"a {role} rank's pool holds {sizes[p.axis]} {unit} in layout {layout} "
                                 f"(sizes {({a: v for a, v in sizes.items() if a != 'slot'})}), got shape "
                                 f"{tuple(t.shape)}")


def execute(plan: Plan, pools: "torch.Tensor | list[torch.Tensor]", slots: torch.Tensor, role: str, index: int,
            src_ranks: list[int], dst_ranks: list[int], *, group=None, chunks: int | None = None) -> int:
    """One plan's pools, one role, one call: `Transfer(plan, src=(index, pools) or dst=...,
    ...)(slots)`. Run on every process of the transfer; role "src" (prefill rank `index`,
    sending the given slots of its pools) or "dst" (decode rank `index`, receiving into its
    slots, in the same order). A serving engine keeps a Transfer instead: it prepares the
    tables and buffers once."""
    if role not in ("src", "dst"):
        raise ArgumentError("role", f"expected 'src' or 'dst', got {role!r}")
    tp = plan.tp_src if role == "src" else plan.tp_dst
    if not isinstance(index, int) or not 0 <= index < tp:
        raise ArgumentError("index", f"must be a {role} rank in 0..{tp - 1}, got {index!r}")
    t = Transfer(plan, **{role: (index, pools)}, src_ranks=src_ranks, dst_ranks=dst_ranks, group=group)
    return t(slots if role == "src" else None, slots if role == "dst" else None, chunks=chunks)


def handoff(plans: Sequence[Plan], pools: Sequence, slots: torch.Tensor, role: str, index: int, src_ranks: list[int],
            dst_ranks: list[int], *, group=None, chunks: int | None = None) -> int:
    """Every kind's pools in one call (execute for several plans): pools holds, per plan, its
    pool of every layer."""
    if role not in ("src", "dst"):
        raise ArgumentError("role", f"expected 'src' or 'dst', got {role!r}")
    t = Transfer(list(plans), **{role: (index, list(pools))}, src_ranks=src_ranks, dst_ranks=dst_ranks, group=group)
    return t(slots if role == "src" else None, slots if role == "dst" else None, chunks=chunks)


def simulate(plans, src_pools: Sequence, dst_pools: Sequence, src_slots: torch.Tensor, dst_slots: torch.Tensor, *,
             colocate: bool = False, chunks: int | None = None, kernels: str | None = None) -> None:
    """Every rank of a transfer in this one process, with the executor's own tables, buffers and
    copies, the messages handed from each sender's buffer to each receiver's in memory (no
    torch.distributed). src_pools[a] / dst_pools[b]: each rank's pools, one entry per plan.
    colocate: src rank i and dst rank i share a process (a local pair)."""
    plans = [plans] if isinstance(plans, Plan) else list(plans)
    tp_src, tp_dst = plans[0].tp_src, plans[0].tp_dst
    src_ranks = list(range(tp_src))
    dst_ranks = list(range(tp_dst)) if colocate else list(range(tp_src, tp_src + tp_dst))
    processes = sorted(set(src_ranks) | set(dst_ranks))
    transfers = {}
    for proc in processes:
        a = src_ranks.index(proc) if proc in src_ranks else None
        b = dst_ranks.index(proc) if proc in dst_ranks else None
        transfers[proc] = Transfer(plans, src=(a, list(src_pools[a])) if a is not None else None,
                                   dst=(b, list(dst_pools[b])) if b is not None else None,
                                   src_ranks=src_ranks, dst_ranks=dst_ranks, ring=1, kernels=kernels)
    spans = None
    for proc, t in transfers.items():
        n, s = t._spans(src_slots if t.src else None, dst_slots if t.dst else None, chunks)
        spans = s if spans is None else spans
        if s:
            t._reserve(max(hi - lo for lo, hi in s))
    for lo, hi in spans or []:
        for t in transfers.values():
            t._pack(0, lo, hi, src_slots, dst_slots)
        for proc, t in transfers.items():
            for peer, tensor in t._messages(0, hi - lo)[1]:
                tensor.copy_(next(m for to, m in transfers[peer]._messages(0, hi - lo)[0] if to == proc))
        for t in transfers.values():
            t._unpack(0, [(lo, hi)], dst_slots, 1)
