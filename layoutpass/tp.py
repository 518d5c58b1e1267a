"""Heterogeneous tensor parallelism: which contiguous runs of each slot's conv state go from
each prefill rank (TP=tp_src) to each decode rank (TP=tp_dst), derived from the layout
algebra, and an executor that moves them with torch.distributed.

The pool's channels are `channel_groups` laid end to end (Mamba2: [x | B | C]; GDN: [q | k | v]);
each group is split evenly across a TP world, and a rank's local pool holds its share of every
group, in group order, stored (slot, ...) in its layout."""

from dataclasses import dataclass

import sympy
import torch
import torch.distributed as dist

from .errors import ArgumentError
from .layout import Layout, Runs, parse_layout


@dataclass(frozen=True)
class Piece:
    """The channels one src rank sends one dst rank from one group: `src_dim` / `dst_dim` are
    the local channel ranges; the runs are within one slot's block of each side's pool."""

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
    channel_groups: tuple[int, ...]
    tp_src: int
    tp_dst: int
    pieces: tuple[Piece, ...]

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
    """sizes: {"tok": state_len} (an int or a sympy symbol). dst_layout defaults to pool_layout."""
    src_layout = parse_layout(pool_layout, "pool_layout")
    dst = parse_layout(dst_layout, "dst_layout") if dst_layout is not None else src_layout
    groups = tuple(int(g) for g in channel_groups)
    for name, tp in (("tp_src", tp_src), ("tp_dst", tp_dst)):
        if not isinstance(tp, int) or tp < 1:
            raise ArgumentError(name, f"must be a positive int, got {tp!r}")
        bad = [g for g in groups if g % tp]
        if bad:
            raise ArgumentError("channel_groups", f"groups {bad} do not split evenly across {name}={tp}")
    if "tok" not in sizes:
        raise ArgumentError("sizes", "give the state length as sizes['tok']")
    state_len = sympy.sympify(sizes["tok"])
    total = sum(groups)
    pieces = []
    for a in range(tp_src):
        for b in range(tp_dst):
            src_base = dst_base = 0
            for g in groups:
                gs, gd = g // tp_src, g // tp_dst
                lo, hi = max(a * gs, b * gd), min((a + 1) * gs, (b + 1) * gd)
                if lo < hi:
                    s0, d0 = src_base + lo - a * gs, dst_base + lo - b * gd
                    src_runs = src_layout.runs(dict(slot=1, tok=state_len, dim=total // tp_src), dim=(s0, s0 + hi - lo))
                    dst_runs = dst.runs(dict(slot=1, tok=state_len, dim=total // tp_dst), dim=(d0, d0 + hi - lo))
                    pieces.append(Piece(a, b, (s0, s0 + hi - lo), (d0, d0 + hi - lo), src_runs, dst_runs))
                src_base, dst_base = src_base + gs, dst_base + gd
    return Plan(src_layout, dst, state_len, groups, tp_src, tp_dst, tuple(pieces))


_make_plan = plan  # execute() takes a parameter of that name


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


def _elements(runs: Runs, device) -> torch.Tensor:
    """Offsets, within a slot's block, of every element the (concrete) runs cover, in memory order."""
    return torch.cat([torch.arange(o, o + n, device=device) for o, n in runs])


def execute(plan: Plan, pool: torch.Tensor, slots: torch.Tensor, role: str, index: int,
            src_ranks: list[int], dst_ranks: list[int]) -> int:
    """Run on every process of the transfer. role "src" (prefill rank `index`, sending the
    given slots of its local pool) or "dst" (decode rank `index`, receiving into its slots, in
    the same order). src_ranks / dst_ranks: the process ranks of each TP rank. Every (src, dst)
    pair's runs for all slots travel as one message. Returns the number of runs this process
    read or wrote."""
    if role not in ("src", "dst"):
        raise ArgumentError("role", f"expected 'src' or 'dst', got {role!r}")
    if not isinstance(plan.state_len, sympy.Integer):
        plan = _bind(plan, pool, role)
    state_len = int(plan.state_len)
    mine = [p for p in plan.pieces if (p.src_rank if role == "src" else p.dst_rank) == index]
    block = pool.view(pool.shape[0], -1)
    peers = {}
    for p in mine:
        peers.setdefault(p.dst_rank if role == "src" else p.src_rank, []).append(p)
    requests, inbox, runs = [], [], 0
    for peer, pieces in peers.items():
        if role == "src":
            offsets = torch.cat([_elements(p.src_runs, pool.device) for p in pieces])
            message = block[slots.long()][:, offsets].contiguous()
            requests.append(dist.isend(message, dst_ranks[peer]))
        else:
            size = sum((p.dst_dim[1] - p.dst_dim[0]) * state_len for p in pieces)
            message = torch.empty(slots.shape[0], size, dtype=pool.dtype, device=pool.device)
            requests.append(dist.irecv(message, src_ranks[peer]))
            inbox.append((pieces, message))
        runs += slots.shape[0] * sum(int((p.src_runs if role == "src" else p.dst_runs).count) for p in pieces)
    for request in requests:
        request.wait()
    for pieces, message in inbox:
        start = 0
        for p in pieces:
            width = p.dst_dim[1] - p.dst_dim[0]
            part = message[:, start:start + width * state_len]
            start += width * state_len
            if plan.src_layout != plan.dst_layout:  # arrived in the sender's order: relayout it
                region = [width if a == "dim" else state_len for a in plan.src_layout.axes[1:]]
                part = plan.src_layout.view(part.reshape(-1, *region), plan.dst_layout).reshape(part.shape[0], -1)
            block[slots.long()[:, None], _elements(p.dst_runs, pool.device)[None, :]] = part
    return runs


def _bind(plan: Plan, pool: torch.Tensor, role: str) -> Plan:
    """A plan with the state length read off this process's pool."""
    layout = plan.src_layout if role == "src" else plan.dst_layout
    state_len = pool.shape[1 + layout.axes[1:].index("tok")]
    return _make_plan(plan.src_layout, {"tok": state_len}, plan.channel_groups, plan.tp_src, plan.tp_dst,
                      plan.dst_layout)
