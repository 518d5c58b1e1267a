"""TP hand-offs against a brute-force element map: every pool of a model (conv pools with evenly
split and replicated channel groups, recurrent pools sharded by heads, snapshot axes), each side
in its own layout and TP size. The map is written here apart from layoutpass.tp: each rank's
shard is cut from the whole logical state by vLLM's rules and stored in its side's memory order;
every element of every destination shard is compared with the source element of the same
logical index. Plans are checked at the element level (the runs an RDMA connector would issue),
the executor in one process (`tp.simulate`, the executor's own tables, buffers and copies) and
over gloo in several processes (`tp.Transfer`, through torch and the interpreted Triton
kernels)."""

import datetime
import math
import os
import queue as queue_module
import socket
import time

import pytest
import sympy
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from layoutpass import ArgumentError
from layoutpass import tp
from layoutpass.layout import LAYOUTS, Layout, arrange
from layoutpass.tp import execute, plan

FILL = -7


# ---- the brute-force map ----------------------------------------------------------------------

def held_channels(groups, t, rank):
    """The logical channels a rank holds, by vLLM's Mamba2 rule: its heads' share of an evenly
    split group; of a (width, n_groups) group, the model groups its heads belong to."""
    out, start = [], 0
    for spec in groups:
        if isinstance(spec, int):
            out += range(start + rank * spec // t, start + (rank + 1) * spec // t)
            start += spec
            continue
        width, n = spec
        heads = t * n  # any multiple of both works
        mine = sorted({h * n // heads for h in range(rank * heads // t, (rank + 1) * heads // t)})
        out += [start + g * width // n + j for g in mine for j in range(width // n)]
        start += width
    return out


def held_heads(heads, t, rank):
    """Head h lives on rank h // (heads / t)."""
    return [h for h in range(heads) if h // (heads // t) == rank]


class Kind:
    """One pool kind of a test model: its logical shapes on each side, its plan arguments."""

    def __init__(self, conv=None, tok=None, heads=None, k=None, v=None, snap=(None, None), snapshots=None,
                 layouts=("DS", "DS"), dtype=torch.int64):
        self.conv, self.tok, self.heads, self.k, self.v = conv, tok, heads, k, v
        self.snap, self.snapshots, self.layouts, self.dtype = snap, snapshots, layouts, dtype

    def plan(self, tp_src, tp_dst, symbolic=False):
        if self.conv is not None:
            tok = sympy.Symbol("s", positive=True, integer=True) if symbolic else self.tok
            return plan(self.layouts[0], {"tok": tok}, self.conv, tp_src, tp_dst, dst_layout=self.layouts[1])
        sizes = {"head": self.heads, "k": self.k, "v": self.v}
        if self.snap != (None, None):
            sizes["snap"] = self.snap
        return plan(self.layouts[0], sizes, None, tp_src, tp_dst, dst_layout=self.layouts[1], snapshots=self.snapshots)

    def moved(self):
        """(src first, src stop, dst first) of the snapshots, by the rule plan() documents."""
        s, d = self.snap
        a, b = s or 1, d or 1
        spec = self.snapshots or ("all" if s is not None and s == d else "last")
        return {"all": (0, a, 0), "last": (a - 1, a, b - 1)}.get(spec, spec) if isinstance(spec, str) else spec

    def axes(self, side):
        if self.conv is not None:
            return ("slot", "tok", "dim")
        has = self.snap[0 if side == "src" else 1] is not None
        return ("slot",) + (("snap",) if has else ()) + ("head", "k", "v")

    def whole(self, side, slots):
        """Shape of a side's whole logical state."""
        if self.conv is not None:
            return slots, self.tok, sum(g if isinstance(g, int) else g[0] for g in self.conv)
        count = self.snap[0 if side == "src" else 1]
        return (slots,) + ((count,) if count is not None else ()) + (self.heads, self.k, self.v)

    def shard(self, whole, side, t, rank):
        """A rank's logical shard of a side's whole state."""
        if self.conv is not None:
            return whole[:, :, held_channels(self.conv, t, rank)]
        heads = held_heads(self.heads, t, rank)
        return whole[:, :, heads] if self.snap[0 if side == "src" else 1] is not None else whole[:, heads]

    def order(self, side):
        return arrange(Layout(self.axes(side)), LAYOUTS[self.layouts[0 if side == "src" else 1]])

    def expected(self, src_whole, requests, slots):
        """The dst side's whole state after the hand-offs of `requests` ((src slots, dst slots)
        each, in order): FILL, but the moved slots' moved snapshots, which hold the source
        element of the same logical index."""
        out = torch.full(self.whole("dst", slots), FILL, dtype=src_whole.dtype)
        for src_slots, dst_slots in requests:
            if self.conv is not None:
                out[dst_slots] = src_whole[src_slots]
                continue
            first, stop, dst_first = self.moved()
            src = src_whole if self.snap[0] is not None else src_whole[:, None]
            dst = out if self.snap[1] is not None else out[:, None]
            for i in range(stop - first):
                dst[dst_slots, dst_first + i] = src[src_slots, first + i]
        return out


def store(logical, kind, side, form):
    """A logical shard stored in the side's memory order: "physical" (dims in memory order) or
    "logical" (logical dims, the order in the strides, as layoutpass keeps a relayouted pool)."""
    order = kind.order(side)
    physical = Layout(kind.axes(side)).convert(logical, order)
    return order.view(physical, Layout(kind.axes(side))) if form == "logical" else physical


class Model:
    """Every pool of a test model on every rank of both sides (stored in `form`, see store),
    and the dst shards the brute-force map expects after the requests."""

    def __init__(self, kinds, tp_src, tp_dst, layers, slots, requests, form="physical", seed=0):
        self.kinds, self.tp_src, self.tp_dst, self.form = kinds, tp_src, tp_dst, form
        self.src = [[[] for _ in kinds] for _ in range(tp_src)]
        self.dst = [[[] for _ in kinds] for _ in range(tp_dst)]
        self.want = [[[] for _ in kinds] for _ in range(tp_dst)]
        base = seed * 10_000_000
        for c, kind in enumerate(kinds):
            buffers = {}
            for layer in range(layers):
                shape = kind.whole("src", slots)
                whole = (torch.arange(math.prod(shape)) + base).view(shape).to(kind.dtype)  # unique per element
                base += math.prod(shape)
                expected = kind.expected(whole, requests, slots)
                for a in range(tp_src):
                    self.src[a][c].append(self._pool(kind, "src", kind.shard(whole, "src", tp_src, a), layers, layer,
                                                     buffers, ("src", a)))
                for b in range(tp_dst):
                    want = kind.shard(expected, "dst", tp_dst, b)
                    self.want[b][c].append(want)
                    self.dst[b][c].append(self._pool(kind, "dst", torch.full_like(want, FILL), layers, layer,
                                                     buffers, ("dst", b)))

    def _pool(self, kind, side, logical, layers, layer, buffers, key):
        if self.form != "interleaved":
            return store(logical, kind, side, self.form)
        physical = Layout(kind.axes(side)).convert(logical, kind.order(side))
        if key not in buffers:  # every layer's pool of a rank in one buffer, the layers side by side per slot
            buffers[key] = torch.full((physical.shape[0], layers, *physical.shape[1:]), FILL, dtype=physical.dtype)
        buffers[key][:, layer] = physical
        return buffers[key][:, layer]

    def mismatches(self, b=None):
        """(dst rank, kind, layer) of every dst pool that differs from the map anywhere."""
        out = []
        for rank in range(self.tp_dst) if b is None else [b]:
            for c, kind in enumerate(self.kinds):
                for layer, (pool, want) in enumerate(zip(self.dst[rank][c], self.want[rank][c])):
                    logical = pool if self.form == "logical" else kind.order("dst").view(pool, Layout(kind.axes("dst")))
                    if not torch.equal(logical, want):
                        out.append((rank, c, layer))
        return out


def mamba2(heads, head_dim, d_state, n_groups, tok, conv, ssm, snap=(None, None), snapshots=None, dtype=torch.int64):
    return [Kind(conv=[heads * head_dim, (n_groups * d_state, n_groups), (n_groups * d_state, n_groups)], tok=tok,
                 layouts=conv, dtype=torch.int32),
            Kind(heads=heads, k=d_state, v=head_dim, snap=snap, snapshots=snapshots, layouts=ssm, dtype=dtype)]


def gdn(k_heads, v_heads, dk, dv, tok, conv, state, snap=(None, None), snapshots=None):
    return [Kind(conv=[(k_heads * dk, k_heads), (k_heads * dk, k_heads), (v_heads * dv, v_heads)], tok=tok,
                 layouts=conv, dtype=torch.int32),
            Kind(heads=v_heads, k=dk, v=dv, snap=snap, snapshots=snapshots, layouts=state)]


# ---- plans at the element level ---------------------------------------------------------------

TPS = [(1, 2), (2, 1), (2, 2), (1, 4), (4, 1), (2, 4), (4, 2), (1, 1), (3, 1), (1, 3), (3, 6), (6, 2)]
CONV_LAYOUTS = [("SD", "SD"), ("DS", "DS"), ("SD", "DS"), ("DS", "SD")]
REC_LAYOUTS = [("KV", "KV"), ("VK", "VK"), ("KV", "VK"), ("VK", "KV")]
SNAPS = [((None, None), None), ((3, 3), "all"), ((3, 3), "last"), ((3, None), "last"), ((None, 2), "last"),
         ((4, 2), (1, 3, 0)), ((3, 3), (0, 2, 1))]


@st.composite
def models(draw):
    """A model's pool kinds for a TP pair: Mamba2 (n_groups 1, 2 or 8), GDN, or a conv pool of
    arbitrary groups beside a recurrent pool."""
    tps = draw(st.sampled_from(TPS))
    lcm = math.lcm(*tps)
    conv = draw(st.sampled_from(CONV_LAYOUTS))
    rec = draw(st.sampled_from(REC_LAYOUTS))
    snap, snapshots = draw(st.sampled_from(SNAPS))
    tok = draw(st.integers(1, 3))
    family = draw(st.sampled_from(["mamba2", "gdn", "groups"]))
    if family == "mamba2":
        n_groups = draw(st.sampled_from([1, 2, 8]))
        heads = n_groups * draw(st.sampled_from([1, 2, 4]))
        assume(heads % lcm == 0 and all(n_groups % t == 0 or t % n_groups == 0 for t in tps))
        kinds = mamba2(heads, draw(st.integers(1, 3)), draw(st.integers(1, 3)), n_groups, tok, conv, rec, snap,
                       snapshots)
    elif family == "gdn":
        k_heads = draw(st.sampled_from([1, 2, 4]))
        v_heads = k_heads * draw(st.sampled_from([1, 2, 4]))
        assume(v_heads % lcm == 0 and all(k_heads % t == 0 or t % k_heads == 0 for t in tps))
        kinds = gdn(k_heads, v_heads, draw(st.integers(1, 3)), draw(st.integers(1, 3)), tok, conv, rec, snap, snapshots)
    else:
        groups = []
        for _ in range(draw(st.integers(1, 3))):
            if draw(st.booleans()):
                groups.append(lcm * draw(st.integers(1, 3)))
            else:
                n = draw(st.sampled_from([1, 2, 4, 8]))
                assume(all(n % t == 0 or t % n == 0 for t in tps))
                groups.append((n * draw(st.integers(1, 2)), n))
        kinds = [Kind(conv=groups, tok=tok, layouts=conv),
                 Kind(heads=lcm * draw(st.integers(1, 2)), k=draw(st.integers(1, 3)), v=draw(st.integers(1, 3)),
                      snap=snap, snapshots=snapshots, layouts=rec, dtype=torch.int32)]
    return tps, kinds


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(models())
def test_plans_match_a_brute_force_element_map(case):
    """Every piece at the level of the sharded axis (any layouts), and where both sides walk the
    pieces in one order, the runs themselves: every dst element written exactly once, from
    the src element of the same logical index."""
    (tp_src, tp_dst), kinds = case
    slots = torch.tensor([0])
    for kind in kinds:
        p = kind.plan(tp_src, tp_dst)
        shape = kind.whole("src", 1)
        whole = torch.arange(math.prod(shape)).view(shape)
        expected = kind.expected(whole, [(slots, slots)], 1)
        srcs = [kind.shard(whole, "src", tp_src, a) for a in range(tp_src)]
        dsts = [kind.shard(expected, "dst", tp_dst, b) for b in range(tp_dst)]
        axis = 2 if kind.conv is not None else len(kind.axes("src")) - 3
        dst_axis = 2 if kind.conv is not None else len(kind.axes("dst")) - 3
        assert p.local_dim("src") == srcs[0].shape[axis] and p.local_dim("dst") == dsts[0].shape[dst_axis]
        covered = [torch.zeros(d.shape[dst_axis], dtype=torch.int) for d in dsts]
        for q in p.pieces:
            src_part = srcs[q.src_rank].narrow(axis, q.src_range[0], q.src_range[1] - q.src_range[0])
            dst_part = dsts[q.dst_rank].narrow(dst_axis, q.dst_range[0], q.dst_range[1] - q.dst_range[0])
            if kind.conv is None:  # the moved snapshots only
                first, stop, dst_first = kind.moved()
                src_part = src_part[:, first:stop] if kind.snap[0] is not None else src_part[:, None]
                dst_part = dst_part[:, dst_first:dst_first + stop - first] if kind.snap[1] is not None \
                    else dst_part[:, None]
            assert torch.equal(src_part, dst_part)
            covered[q.dst_rank][q.dst_range[0]:q.dst_range[1]] += 1
        assert all(bool((c == 1).all()) for c in covered), "every destination range exactly once"
        if p.mode != "runs":
            with pytest.raises(ArgumentError, match="^dst_layout:"):
                p.instantiate()
            continue
        src_flat = [store(s, kind, "src", "physical").flatten() for s in srcs]
        dst_flat = [store(d, kind, "dst", "physical").flatten() for d in dsts]
        written = [torch.full_like(d, FILL) for d in dst_flat]
        hits = [torch.zeros_like(d, dtype=torch.int) for d in dst_flat]
        for (a, b), runs in p.instantiate().items():
            for s, d, n in runs:
                written[b][d:d + n] = src_flat[a][s:s + n]
                hits[b][d:d + n] += 1
        for b in range(tp_dst):
            assert torch.equal(written[b], dst_flat[b]), "every destination element from its logical source"
            moved = dst_flat[b] != FILL
            assert bool((hits[b][moved] == 1).all()) and bool((hits[b][~moved] == 0).all())


# ---- the executor in one process ---------------------------------------------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(models(), st.integers(1, 2), st.integers(1, 5), st.booleans(), st.integers(1, 3),
       st.sampled_from(["physical", "logical", "interleaved"]), st.randoms(use_true_random=False))
def test_handoff_matches_a_brute_force_element_map(case, layers, moved, colocate, chunks, form, rng):
    """A request's every pool of every layer through the executor's own tables, buffers and
    copies (torch's), every rank of both sides in this process: every element of every dst
    shard equals the brute-force map's, the slots not moved keep their state."""
    (tp_src, tp_dst), kinds = case
    slots = 6
    src_slots = torch.tensor(rng.sample(range(slots), moved))
    dst_slots = torch.tensor(rng.sample(range(slots), moved))
    model = Model(kinds, tp_src, tp_dst, layers, slots, [(src_slots, dst_slots)], form)
    plans = [k.plan(tp_src, tp_dst) for k in kinds]
    tp.simulate(plans, model.src, model.dst, src_slots.int(), dst_slots, colocate=colocate, chunks=chunks)
    assert model.mismatches() == []


@pytest.mark.parametrize("tps, kinds, colocate", [
    ((1, 2), mamba2(4, 2, 3, 1, 3, ("SD", "DS"), ("KV", "VK")), False),
    ((4, 1), mamba2(8, 1, 2, 2, 3, ("DS", "SD"), ("VK", "KV"), (3, None), "last", torch.int16), True),
    ((2, 4), gdn(2, 4, 2, 3, 2, ("DS", "DS"), ("VK", "KV"), (2, 2), "all"), True),
])
def test_handoff_through_the_triton_kernels(tps, kinds, colocate):
    """The same, through the Triton pack, unpack and relayout kernels (interpreted on the CPU):
    the launches CUDA runs, with their tables and alignment."""
    src_slots, dst_slots = torch.tensor([4, 1, 3]), torch.tensor([0, 5, 2])
    model = Model(kinds, *tps, 2, 6, [(src_slots, dst_slots)], "interleaved")
    plans = [k.plan(*tps) for k in kinds]
    tp.simulate(plans, model.src, model.dst, src_slots.int(), dst_slots.int(), colocate=colocate, chunks=2,
                kernels="triton")
    assert model.mismatches() == []


# ---- plans: run counts and replicated groups -----------------------------------------------------

def test_mamba2_run_counts():
    s = sympy.Symbol("state_len", positive=True, integer=True)
    groups = [5120, 128, 128]  # Mamba2-2.7B conv channels: x | B | C, split evenly
    ds, sd = plan("DS", {"tok": s}, groups, 1, 2), plan("SD", {"tok": s}, groups, 1, 2)
    assert ds.runs_per_slot(0, 1) == 3 and sd.runs_per_slot(0, 1) == 3 * s
    assert sum(p.src_runs.length for p in ds.pieces if p.dst_rank == 1) == s * 2688


def test_recurrent_run_counts():
    """Mamba2-2.7B's SSM state (80 heads, head_dim 64, d_state 128) by heads: one run per slot
    and pair in either layout; with snapshots, one per moved snapshot; a relayout's boxes."""
    h, k, v = sympy.symbols("h k v", positive=True, integer=True)
    for layout in ("KV", "VK"):
        p = plan(layout, {"head": 80, "k": k, "v": v}, None, 1, 2)
        assert [p.runs_per_slot(0, b) for b in range(2)] == [1, 1]
        assert p.pieces[1].src_runs.start == 40 * k * v and p.pieces[1].src_runs.length == 40 * k * v
        snap = plan(layout, {"head": 80, "k": 128, "v": 64, "snap": 4}, None, 2, 4, snapshots="all")
        assert snap.runs_per_slot(0, 1) == 4 and snap.runs_per_slot(0, 1, side="dst") == 1  # its whole block
        last = plan(layout, {"head": 80, "k": 128, "v": 64, "snap": (4, None)}, None, 2, 1)
        assert last.runs_per_slot(1, 0) == 1 and last.pieces[1].src_runs.start == 3 * 40 * 128 * 64
    whole = plan("KV", {"head": 80, "k": 128, "v": 64}, None, 2, 2)  # each dst rank's block from one src rank
    assert [(q.src_rank, q.dst_rank, q.src_range) for q in whole.pieces] == [(0, 0, (0, 40)), (1, 1, (0, 40))]
    cross = plan("KV", {"head": 80, "k": 128, "v": 64}, None, 2, 2, dst_layout="VK")
    assert cross.mode == "boxes" and plan("SD", {"tok": 1}, [8], 1, 2, dst_layout="DS").mode == "runs"
    assert tp._side(cross, "dst", 0, 2).boxes == (1, 128)  # k then v in the record; k contiguous at the dst
    # a pool without heads (Mamba1: v = channel, k = d_state) shards its channels
    assert [plan(layout, {"k": 16, "v": 64}, None, 1, 2).runs_per_slot(0, 1) for layout in ("VK", "KV")] == [1, 16]


def test_replicated_groups_follow_the_heads():
    """Mamba2-2.7B has one group: at TP=2 vLLM gives each rank all of B and C (2560 + 128 + 128)."""
    groups = [5120, (128, 1), (128, 1)]
    up = plan("DS", {"tok": 3}, groups, 1, 2)
    assert up.local_dim("src") == 5376 and up.local_dim("dst") == 2816
    sd = plan("SD", {"tok": 3}, groups, 1, 2)  # rank 1's x half, B and C are adjacent at the src: one piece
    assert (up.runs_per_slot(0, 0), up.runs_per_slot(0, 1), sd.runs_per_slot(0, 0), sd.runs_per_slot(0, 1)) == (
        2, 1, 6, 3)
    same = plan("DS", {"tok": 3}, groups, 2, 2)  # each dst rank hears from one src rank only
    assert {(q.src_rank, q.dst_rank) for q in same.pieces} == {(0, 0), (1, 1)}
    assert same.runs_per_slot(1, 1) == 1  # the whole local block
    down = plan("DS", {"tok": 3}, groups, 2, 1)  # B and C come once, from src rank 0
    assert [(q.src_rank, q.src_dim, q.dst_dim) for q in down.pieces] == [
        (0, (0, 2560), (0, 2560)), (0, (2560, 2816), (5120, 5376)), (1, (0, 2560), (2560, 5120))]
    four = tp.mamba2(heads=8, head_dim=2, d_state=4, n_groups=2, conv_width=4, tp_src=1, tp_dst=4)[0]
    # n_groups 2 over TP4: ranks 0, 1 hold group 0 of B and C, ranks 2, 3 group 1 -- never half a group
    assert [[q.src_range for q in four.pieces if q.dst_rank == b] for b in range(4)] == [
        [(0, 4), (16, 20), (24, 28)], [(4, 8), (16, 20), (24, 28)], [(8, 12), (20, 24), (28, 32)],
        [(12, 16), (20, 24), (28, 32)]]


def test_bad_plans():
    with pytest.raises(ArgumentError, match="^channel_groups: groups \\[6\\] do not split evenly across tp_dst=4"):
        plan("DS", {"tok": 3}, [8, 6], 2, 4)
    with pytest.raises(ArgumentError, match="^channel_groups: n_groups=2 of group 8 neither splits"):
        plan("DS", {"tok": 3}, [(8, 2)], 1, 3)
    with pytest.raises(ArgumentError, match="^channel_groups: width 9 is not a multiple of n_groups=2"):
        plan("DS", {"tok": 3}, [(9, 2)], 1, 1)
    with pytest.raises(ArgumentError, match="^channel_groups: expected an int or a"):
        plan("DS", {"tok": 3}, [(8, 2, 1)], 1, 1)
    with pytest.raises(ArgumentError, match="^tp_src:"):
        plan("DS", {"tok": 3}, [8], 0, 1)
    with pytest.raises(ArgumentError, match="^pool_layout:"):
        plan("XY", {"tok": 3}, [8], 1, 1)
    with pytest.raises(ArgumentError, match="^dst_layout:"):
        plan("SD", {"tok": 3}, [8], 1, 1, dst_layout="DS").instantiate(3)
    with pytest.raises(ArgumentError, match="^dst_layout: layout VK is not of a conv pool"):
        plan("SD", {"tok": 3}, [8], 1, 1, dst_layout="VK")
    with pytest.raises(ArgumentError, match="^channel_groups: groups \\[6\\] do not split evenly across tp_dst=4"):
        plan("KV", {"head": 6, "k": 2, "v": 2}, None, 1, 4)
    with pytest.raises(ArgumentError, match="^sizes: a recurrent pool needs sizes \\['k'\\]"):
        plan("KV", {"head": 4, "v": 2}, None, 1, 2)
    with pytest.raises(ArgumentError, match="^snapshots: 'all' needs as many snapshots"):
        plan("KV", {"head": 4, "k": 2, "v": 2, "snap": (3, 2)}, None, 1, 2, snapshots="all")
    with pytest.raises(ArgumentError, match="^snapshots: expected 'all', 'last' or"):
        plan("KV", {"head": 4, "k": 2, "v": 2, "snap": (3, None)}, None, 1, 2, snapshots=(0, 2, 0))
    with pytest.raises(ArgumentError, match="^sizes: conv pools have no snapshot axis"):
        plan("DS", {"tok": 3, "snap": 2}, [8], 1, 2)
    with pytest.raises(ArgumentError, match="^tp_dst: 6 heads do not split"):
        tp.mamba2(heads=6, head_dim=2, d_state=2, n_groups=1, conv_width=4, tp_src=1, tp_dst=4)


def test_bad_execute_arguments():
    p = plan("DS", {"tok": 3}, [8, (4, 1)], 1, 2)
    slots = torch.tensor([1])
    good = torch.zeros(4, 12, 3)
    with pytest.raises(ArgumentError, match="^role:"):
        execute(p, good, slots, "both", 0, [0], [1, 2])
    with pytest.raises(ArgumentError, match="^index:"):
        execute(p, good, slots, "src", 1, [0], [1, 2])
    with pytest.raises(ArgumentError, match="^pools: a src rank's pool holds 12 channels"):
        execute(p, torch.zeros(4, 10, 3), slots, "src", 0, [0], [1, 2])
    with pytest.raises(ArgumentError, match="^pools: every layer's pool"):
        execute(p, [good, torch.zeros(5, 12, 3)], slots, "src", 0, [0], [1, 2])
    with pytest.raises(ArgumentError, match="^pools: expected \\(slot, dim, tok\\) pools with each slot's block dense"):
        execute(p, torch.zeros(12, 3, 4).permute(2, 0, 1), slots, "src", 0, [0], [1, 2])
    with pytest.raises(ArgumentError, match="^slots:"):
        execute(p, good, slots.float(), "src", 0, [0], [1, 2])
    with pytest.raises(ArgumentError, match="^chunks:"):
        execute(p, good, slots, "src", 0, [0], [1, 2], chunks=0)
    with pytest.raises(ArgumentError, match="^src_ranks:"):
        execute(p, good, slots, "src", 0, [0, 1], [1, 2])
    with pytest.raises(ArgumentError, match="^src: process 1 is also dst rank 0: give that role too"):
        execute(p, good, slots, "src", 0, [1], [1, 2])  # the process would wait on itself
    ssm = plan("VK", {"head": 4, "k": 2, "v": 3}, None, 1, 2)
    with pytest.raises(ArgumentError, match="^dst: a process's src and dst pools must be"):
        tp.Transfer(ssm, src=(0, torch.zeros(2, 4, 3, 2)), dst=(0, torch.zeros(2, 2, 3, 2, dtype=torch.float64)),
                    src_ranks=[0], dst_ranks=[0, 1])
    with pytest.raises(ArgumentError, match="^pools: a dst rank's pool holds 2 heads"):
        tp.Transfer(ssm, dst=(1, torch.zeros(2, 4, 3, 2)), src_ranks=[0], dst_ranks=[1, 2])


# ---- the executor over gloo ----------------------------------------------------------------------

# Every scenario: (tp_src, tp_dst, src processes, dst processes, kinds, layers, chunks, ring, kernels, form).
# Processes shared by a src and a dst rank (1 -> 4 on 4 processes, say) move their own pair locally.
SCENARIOS = [
    (1, 2, [0], [1, 2], [Kind(conv=[12, 6, 6], tok=3, layouts=("SD", "SD"))], 1, None, 3, "execute", "physical"),
    (2, 1, [0, 1], [2], [Kind(conv=[16, (8, 1), (8, 1)], tok=3, layouts=("SD", "DS"))], 3, 2, 3, "execute",
     "interleaved"),
    (1, 2, [0], [1, 2], mamba2(4, 2, 3, 1, 3, ("DS", "SD"), ("VK", "KV")), 2, 3, 2, "triton", "interleaved"),
    (2, 2, [0, 1], [2, 3], mamba2(4, 2, 3, 2, 3, ("SD", "DS"), ("KV", "VK")), 2, 3, 1, None, "logical"),
    (1, 4, [0], [0, 1, 2, 3], mamba2(8, 2, 2, 1, 3, ("DS", "DS"), ("VK", "VK"), (3, None), "last"), 2, 2, 3, None,
     "physical"),
    (4, 1, [0, 1, 2, 3], [0], mamba2(8, 1, 2, 8, 3, ("SD", "DS"), ("KV", "VK")), 2, 2, 2, "triton", "physical"),
    (2, 4, [0, 1], [0, 1, 2, 3], gdn(2, 4, 2, 3, 3, ("DS", "SD"), ("VK", "KV"), (2, 2), "all"), 2, 3, 2, None,
     "interleaved"),
    (4, 2, [0, 1, 2, 3], [2, 3], gdn(4, 4, 2, 2, 2, ("DS", "DS"), ("KV", "KV")), 1, None, 3, None, "logical"),
]
WORLD = 4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scenario(rank, case, number):
    tp_src, tp_dst, src_procs, dst_procs, kinds, layers, chunks, ring, kernels, form = case
    slots = 12
    requests = [(torch.tensor([7, 2, 9, 0, 5]), torch.tensor([1, 3, 4, 10, 11])),
                (torch.tensor([3, 11, 6]), torch.tensor([6, 0, 9]))]  # a second request through the same buffers
    a = src_procs.index(rank) if rank in src_procs else None
    b = dst_procs.index(rank) if rank in dst_procs else None
    runs = 0
    if kernels == "execute":  # the one-shot API, one plan, symbolic sizes bound from the pools
        model = Model(kinds, tp_src, tp_dst, layers, slots, requests[:1], form, seed=number)
        p = kinds[0].plan(tp_src, tp_dst, symbolic=True)
        src_slots, dst_slots = requests[0]
        if a is not None:
            runs += execute(p, model.src[a][0], src_slots.int(), "src", a, src_procs, dst_procs, chunks=chunks)
        if b is not None:
            runs += execute(p, model.dst[b][0], dst_slots, "dst", b, src_procs, dst_procs, chunks=chunks)
        return runs > 0 and (b is None or model.mismatches(b) == [])
    model = Model(kinds, tp_src, tp_dst, layers, slots, requests, form, seed=number)
    transfer = tp.Transfer([k.plan(tp_src, tp_dst) for k in kinds],
                           src=(a, model.src[a]) if a is not None else None,
                           dst=(b, model.dst[b]) if b is not None else None,
                           src_ranks=src_procs, dst_ranks=dst_procs, ring=ring, kernels=kernels)
    for src_slots, dst_slots in requests:
        runs += transfer(src_slots.int() if a is not None else None, dst_slots if b is not None else None,
                         chunks=chunks)
    return runs > 0 and (b is None or model.mismatches(b) == [])


def _worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    for number, case in enumerate(SCENARIOS):
        if rank not in set(case[2]) | set(case[3]):
            continue
        try:
            queue.put((number, rank, _scenario(rank, case, number)))
        except Exception as error:  # reported by the test, not lost in a child
            queue.put((number, rank, repr(error)))
    dist.destroy_process_group()


def test_handoff_over_gloo():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "layoutpass.tp"])
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(WORLD)]
    for proc in procs:
        proc.start()
    expected = {(n, r) for n, case in enumerate(SCENARIOS) for r in set(case[2]) | set(case[3])}
    results, deadline = {}, time.monotonic() + 180
    while len(results) < len(expected) and time.monotonic() < deadline:
        try:
            number, rank, ok = queue.get(timeout=2)
            results[number, rank] = ok
        except queue_module.Empty:
            dead = [proc.exitcode for proc in procs if proc.exitcode]
            assert not dead, f"a worker died (exit codes {dead}): see its stderr above"
    for proc in procs:
        proc.join(timeout=60)
    failed = sorted((n, r, ok) for (n, r), ok in results.items() if ok is not True)
    assert set(results) == expected and not failed, f"failed: {failed}"
