"""Heterogeneous tensor parallelism: which contiguous runs of each slot's conv state go from
each prefill rank (TP=tp_src) to each decode rank (TP=tp_dst), derived from the layout
algebra, and an executor that moves every layer's pool of a request with torch.distributed.

The pool's channels are `channel_groups` laid end to end (Mamba2: [x | B | C]; GDN: [q | k | v]),
and a rank's local pool holds its share of every group, in group order, stored (slot, ...) in
its layout. A group given as an int is split evenly across a TP world. A group given as
`(width, n_groups)` is made of `n_groups` model groups (Mamba2's B and C: n_groups * d_state
channels): split evenly when TP divides n_groups, otherwise (TP a multiple of n_groups) each rank
holds the one model group its heads belong to, `rank * n_groups // tp`, replicated across
`tp // n_groups` ranks, as vLLM's Mamba2 mixer does for n_groups < TP."""

import math
from dataclasses import dataclass
from functools import lru_cache

import sympy
import torch
import torch.distributed as dist

from .errors import ArgumentError
from .kernels import state
from .layout import Layout, Runs, parse_layout

# A chunk's send overlaps the next chunk's packing. Few large chunks: on 4 H200s, a 1 GB pair
# transfer was fastest at 2-4 chunks, and slower from 8 on (benchmarks/results/tp_nccl.md).
CHUNK_BYTES = 256 << 20  # per (src, dst) pair
MAX_CHUNKS = 4


@dataclass(frozen=True)
class Piece:
    """Channels one src rank sends one dst rank (from one group, or adjacent groups adjacent on
    both sides): `src_dim` / `dst_dim` are the local channel ranges; the runs are within one
    slot's block of each side's pool."""

    src_rank: int
    dst_rank: int
    src_dim: tuple[int, int]
    dst_dim: tuple[int, int]
    src_runs: Runs
    dst_runs: Runs


@dataclass(frozen=True)
class Plan:
    src_layout: Layout
    dst_layout: Layout
    state_len: sympy.Expr
    channel_groups: tuple[tuple[int, int | None], ...]  # (width, n_groups or None for an even split)
    tp_src: int
    tp_dst: int
    pieces: tuple[Piece, ...]

    def local_dim(self, role: str) -> int:
        """Channels of one rank's local pool on the "src" or "dst" side."""
        tp = self.tp_src if role == "src" else self.tp_dst
        return sum(hi - lo for lo, hi in (_share(w, g, tp, 0) for w, g in self.channel_groups))

    def runs_per_slot(self, src_rank: int, dst_rank: int) -> sympy.Expr:
        """Contiguous runs a src rank reads per slot for a dst rank (symbolic in state_len)."""
        return sympy.expand(sum((p.src_runs.count for p in self.pieces
                                 if (p.src_rank, p.dst_rank) == (src_rank, dst_rank)), sympy.Integer(0)))

    def instantiate(self, state_len: int) -> dict[tuple[int, int], list[tuple[int, int, int]]]:
        """(src rank, dst rank) -> [(src_offset, dst_offset, length)] within one slot's block,
        for pools of one layout on both sides."""
        if self.src_layout != self.dst_layout:
            raise ArgumentError("dst_layout", "runs pair up only between pools of one layout; "
                                              "the executor relayouts each piece instead")
        out: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for p in self.pieces:
            subs = {self.state_len: state_len}
            out.setdefault((p.src_rank, p.dst_rank), []).extend(
                _pair(_concrete(p.src_runs, subs), _concrete(p.dst_runs, subs)))
        return out


def plan(pool_layout: "str | Layout", sizes: dict, channel_groups, tp_src: int, tp_dst: int,
         dst_layout: "str | Layout | None" = None) -> Plan:
    """sizes: {"tok": state_len} (an int or a sympy symbol). dst_layout defaults to pool_layout.
    channel_groups: ints (split evenly) or (width, n_groups) pairs (see the module docstring)."""
    src_layout = parse_layout(pool_layout, "pool_layout")
    dst = parse_layout(dst_layout, "dst_layout") if dst_layout is not None else src_layout
    for name, tp in (("tp_src", tp_src), ("tp_dst", tp_dst)):
        if not isinstance(tp, int) or tp < 1:
            raise ArgumentError(name, f"must be a positive int, got {tp!r}")
    groups = _groups(channel_groups, tp_src, tp_dst)
    if "tok" not in sizes:
        raise ArgumentError("sizes", "give the state length as sizes['tok']")
    state_len = sympy.sympify(sizes["tok"])
    src_dim = sum(hi - lo for lo, hi in (_share(w, g, tp_src, 0) for w, g in groups))
    dst_dim = sum(hi - lo for lo, hi in (_share(w, g, tp_dst, 0) for w, g in groups))
    moves = []  # (src rank, dst rank, src channels, dst channels) per group
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
    pieces = [Piece(a, b, sd, dd, src_layout.runs(dict(slot=1, tok=state_len, dim=src_dim), dim=sd),
                    dst.runs(dict(slot=1, tok=state_len, dim=dst_dim), dim=dd)) for a, b, sd, dd in merged]
    return Plan(src_layout, dst, state_len, groups, tp_src, tp_dst, tuple(pieces))


def _groups(channel_groups, tp_src: int, tp_dst: int) -> tuple[tuple[int, int | None], ...]:
    out = []
    for spec in channel_groups:
        pair = isinstance(spec, (tuple, list)) and len(spec) == 2
        width, n = spec if pair else (spec, None)
        if not all(isinstance(v, int) and v >= 1 for v in ((width, n) if pair else (width,))):
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
    return tuple(out)


def _share(width: int, n_groups: int | None, tp: int, rank: int) -> tuple[int, int]:
    """The channels [lo, hi) of one group that a rank holds."""
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


def _concrete(runs: Runs, subs) -> list[tuple[int, int]]:
    concrete = Runs(runs.length.subs(subs), runs.start.subs(subs),
                    tuple((a, f.subs(subs), s.subs(subs), st.subs(subs)) for a, f, s, st in runs.outer))
    return list(concrete)


@dataclass(frozen=True)
class _Side:
    """What one process moves. Its message holds, per peer (in `peers` order), a record of
    `records[k]` elements per (slot, layer): the pair's pieces in plan order, each piece's
    (width x state_len) box in the src layout's order. Entries are (pool offset or first
    channel, record offset, run length or width, record size, elements of the earlier peers'
    records), the tables of kernels.state.copy_runs / unpack_boxes."""

    peers: tuple[int, ...]
    records: tuple[int, ...]
    runs: tuple[tuple[int, int, int, int, int], ...]
    boxes: tuple[tuple[int, int, int, int, int], ...] | None  # a dst of another layout: relayout on receipt
    runs_per_slot: int  # pool-side runs per slot and layer


@lru_cache(maxsize=64)
def _side(plan: Plan, role: str, index: int) -> _Side:
    state_len = int(plan.state_len)
    mine = [p for p in plan.pieces if (p.src_rank if role == "src" else p.dst_rank) == index]
    peers = sorted({p.dst_rank if role == "src" else p.src_rank for p in mine})
    records, runs, boxes, count = [], [], [], 0
    for peer in peers:
        pieces = [p for p in mine if (p.dst_rank if role == "src" else p.src_rank) == peer]
        records.append(sum((p.dst_dim[1] - p.dst_dim[0]) * state_len for p in pieces))
    for k, peer in enumerate(peers):
        offset, prefix = 0, sum(records[:k])
        for p in (p for p in mine if (p.dst_rank if role == "src" else p.src_rank) == peer):
            width = p.dst_dim[1] - p.dst_dim[0]
            pool_runs = _concrete(p.src_runs if role == "src" else p.dst_runs, {plan.state_len: state_len})
            count += len(pool_runs)
            boxes.append((p.dst_dim[0], offset, width, records[k], prefix))
            at = offset
            for start, length in pool_runs:  # same layout: the runs walk the box in record order
                runs.append((start, at, length, records[k], prefix))
                at += length
            offset += width * state_len
    cross = role == "dst" and plan.src_layout != plan.dst_layout
    return _Side(tuple(peers), tuple(records), tuple(runs), tuple(boxes) if cross else None, count)


def execute(plan: Plan, pools: "torch.Tensor | list[torch.Tensor]", slots: torch.Tensor, role: str, index: int,
            src_ranks: list[int], dst_ranks: list[int], *, group=None, chunks: int | None = None) -> int:
    """Run on every process of the transfer. role "src" (prefill rank `index`, sending the
    given slots of its local pools) or "dst" (decode rank `index`, receiving into its slots, in
    the same order). pools: one layer's pool or every layer's (one shape, dtype and device; a
    request moves all of them in one transfer; each slot's block contiguous, any slot stride).
    src_ranks / dst_ranks: the process ranks (in `group`, default the world) of each TP rank.

    The slots go in `chunks` slices (default: about CHUNK_BYTES per pair, the same on every
    process; an explicit value must be too): each slice is packed run-wise by one kernel over all
    layers and peers, and its messages to every peer go in one batch_isend_irecv, so on CUDA the
    next slice's packing overlaps this one's sending, and a receiver unpacks a slice while the
    next arrives (relayouting it when its pools' layout differs from the sender's). It returns
    once the work is queued on the current stream (CUDA) or done (CPU), with the number of pool
    runs this process read or wrote."""
    if role not in ("src", "dst"):
        raise ArgumentError("role", f"expected 'src' or 'dst', got {role!r}")
    tp = plan.tp_src if role == "src" else plan.tp_dst
    if not isinstance(index, int) or not 0 <= index < tp:
        raise ArgumentError("index", f"must be a {role} rank in 0..{tp - 1}, got {index!r}")
    if len(src_ranks) != plan.tp_src or len(dst_ranks) != plan.tp_dst:
        raise ArgumentError("src_ranks", f"expected {plan.tp_src} src and {plan.tp_dst} dst process ranks, "
                                         f"got {len(src_ranks)} and {len(dst_ranks)}")
    pools = _check_pools(plan, pools, role)
    if not isinstance(plan.state_len, sympy.Integer):
        plan = _bind(plan, pools[0], role)
    if slots.dim() != 1 or slots.dtype not in (torch.int32, torch.int64) or slots.device != pools[0].device:
        raise ArgumentError("slots", f"expected a 1-D int32/int64 tensor on {pools[0].device}, "
                                     f"got {tuple(slots.shape)} {slots.dtype} on {slots.device}")
    side = _side(plan, role, index)
    n, layers = slots.shape[0], len(pools)
    if chunks is None:
        chunks = _auto_chunks(plan, n, layers, pools[0].element_size())
    if not isinstance(chunks, int) or chunks < 1:
        raise ArgumentError("chunks", f"must be a positive int, got {chunks!r}")
    if not side.peers or n == 0:
        return 0
    peers = [(dst_ranks if role == "src" else src_ranks)[p] for p in side.peers]
    device = pools[0].device
    bounds = [n * c // chunks for c in range(chunks + 1)]
    spans = [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
    messages = [torch.empty((hi - lo) * layers * sum(side.records), dtype=pools[0].dtype, device=device)
                for lo, hi in spans]
    op = dist.isend if role == "src" else dist.irecv
    batches = []
    for (lo, hi), message in zip(spans, messages):
        if role == "src":
            state.copy_runs(pools, slots[lo:hi], side.runs, message, to_message=True)
        parts = message.split([(hi - lo) * layers * r for r in side.records])
        batches.append(dist.batch_isend_irecv([dist.P2POp(op, part, peer, group) for part, peer in zip(parts, peers)]))
    for (lo, hi), message, works in zip(spans, messages, batches):
        for work in works:
            work.wait()
        if role == "src":
            continue
        if side.boxes is None:
            state.copy_runs(pools, slots[lo:hi], side.runs, message, to_message=False)
        else:
            state.unpack_boxes(pools, plan.dst_layout, slots[lo:hi], side.boxes, message, plan.src_layout)
    return side.runs_per_slot * n * layers


def _check_pools(plan: Plan, pools, role: str) -> list[torch.Tensor]:
    pools = [pools] if isinstance(pools, torch.Tensor) else list(pools)
    if not pools or not all(isinstance(p, torch.Tensor) for p in pools):
        raise ArgumentError("pools", "expected a pool tensor or a non-empty list of them")
    first = pools[0]
    if any((p.shape, p.stride(), p.dtype, p.device) != (first.shape, first.stride(), first.dtype, first.device)
           for p in pools):
        raise ArgumentError("pools", "every layer's pool must have one shape, strides, dtype and device")
    layout = plan.src_layout if role == "src" else plan.dst_layout
    if first.dim() != 3 or not first[0].is_contiguous():
        raise ArgumentError("pools", f"expected (slot, ., .) pools with each slot's block contiguous, "
                                     f"got shape {tuple(first.shape)} strides {first.stride()}")
    dim = first.shape[1 + layout.axes[1:].index("dim")]
    if dim != plan.local_dim(role):
        raise ArgumentError("pools", f"a {role} rank's pool holds {plan.local_dim(role)} channels in layout "
                                     f"{layout}, got shape {tuple(first.shape)}")
    return pools


def _auto_chunks(plan: Plan, slots: int, layers: int, element_size: int) -> int:
    """From quantities every process shares, so all agree on the number of batches."""
    pair = {}
    for p in plan.pieces:
        pair[p.src_rank, p.dst_rank] = pair.get((p.src_rank, p.dst_rank), 0) + p.dst_dim[1] - p.dst_dim[0]
    largest = max(pair.values()) * int(plan.state_len) * slots * layers * element_size
    return max(1, min(math.ceil(largest / CHUNK_BYTES), MAX_CHUNKS, slots))


def _bind(symbolic: Plan, pool: torch.Tensor, role: str) -> Plan:
    """A plan with the state length read off this process's pool."""
    layout = symbolic.src_layout if role == "src" else symbolic.dst_layout
    state_len = pool.shape[1 + layout.axes[1:].index("tok")]
    groups = [w if n is None else (w, n) for w, n in symbolic.channel_groups]
    return plan(symbolic.src_layout, {"tok": state_len}, groups, symbolic.tp_src, symbolic.tp_dst, symbolic.dst_layout)
