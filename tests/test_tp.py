"""TP transfer plans against a brute-force element map, and the executor over gloo."""

import os
import random
import socket

import pytest
import sympy
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from layoutpass import ArgumentError, DS, SD
from layoutpass.tp import execute, plan

LAYOUTS = {"SD": SD, "DS": DS}


def local_pool(global_pool, groups, tp, rank, layout):
    """Rank `rank`'s share of a logical (slot, tok, dim) pool, stored in `layout`."""
    parts, start = [], 0
    for g in groups:
        share = g // tp
        parts.append(global_pool[:, :, start + rank * share:start + (rank + 1) * share])
        start += g
    return SD.convert(torch.cat(parts, dim=2), layout)


@st.composite
def tp_cases(draw):
    tps = draw(st.sampled_from([(1, 2), (2, 1), (2, 2), (2, 4), (4, 2), (1, 4), (4, 1), (3, 1), (1, 1)]))
    lcm = tps[0] * tps[1]
    groups = [lcm * draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, 3)))]
    return tps, groups, draw(st.integers(1, 5)), draw(st.sampled_from(["SD", "DS"]))


@settings(max_examples=80, deadline=None)
@given(tp_cases())
def test_plan_matches_a_brute_force_element_map(case):
    (tp_src, tp_dst), groups, state_len, layout = case
    ids = torch.arange(state_len * sum(groups)).view(1, state_len, sum(groups))
    L = LAYOUTS[layout]
    srcs = [local_pool(ids, groups, tp_src, a, L).flatten() for a in range(tp_src)]
    dsts = [local_pool(ids, groups, tp_dst, b, L).flatten() for b in range(tp_dst)]
    covered = [torch.zeros_like(d, dtype=torch.int) for d in dsts]
    for (a, b), runs in plan(layout, {"tok": state_len}, groups, tp_src, tp_dst).instantiate(state_len).items():
        for s, d, n in runs:
            assert torch.equal(srcs[a][s:s + n], dsts[b][d:d + n])
            covered[b][d:d + n] += 1
    assert all(bool((c == 1).all()) for c in covered), "every destination element exactly once"


def test_mamba2_run_counts():
    s = sympy.Symbol("state_len", positive=True, integer=True)
    groups = [5120, 128, 128]  # Mamba2-2.7B conv channels: x | B | C
    ds, sd = plan("DS", {"tok": s}, groups, 1, 2), plan("SD", {"tok": s}, groups, 1, 2)
    assert ds.runs_per_slot(0, 1) == 3 and sd.runs_per_slot(0, 1) == 3 * s
    assert sum(p.src_runs.length for p in ds.pieces if p.dst_rank == 1) == s * 2688


def test_bad_plans():
    with pytest.raises(ArgumentError, match="^channel_groups: groups \\[6\\] do not split evenly across tp_dst=4"):
        plan("DS", {"tok": 3}, [8, 6], 2, 4)
    with pytest.raises(ArgumentError, match="^tp_src:"):
        plan("DS", {"tok": 3}, [8], 0, 1)
    with pytest.raises(ArgumentError, match="^pool_layout:"):
        plan("XY", {"tok": 3}, [8], 1, 1)
    with pytest.raises(ArgumentError, match="^dst_layout:"):
        plan("SD", {"tok": 3}, [8], 1, 1, dst_layout="DS").instantiate(3)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, tp_src, tp_dst, groups, layouts, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    torch.manual_seed(0)
    slots, state_len = 12, 4
    logical = torch.randn(slots, state_len, sum(groups))  # the same on every process
    src_slots = torch.tensor([7, 2, 9, 0, 5], dtype=torch.int32)
    dst_slots = torch.tensor([1, 3, 4, 10, 11], dtype=torch.int32)
    p = plan(layouts[0], {"tok": state_len}, groups, tp_src, tp_dst, dst_layout=layouts[1])
    src_ranks, dst_ranks = list(range(tp_src)), list(range(tp_src, tp_src + tp_dst))
    if rank < tp_src:
        pool = local_pool(logical, groups, tp_src, rank, LAYOUTS[layouts[0]])
        execute(p, pool, src_slots, "src", rank, src_ranks, dst_ranks)
        queue.put((rank, True))
    else:
        b = rank - tp_src
        pool = torch.full(LAYOUTS[layouts[1]].shape(dict(slot=slots, tok=state_len, dim=sum(groups) // tp_dst)), -7.0)
        runs = execute(p, pool, dst_slots, "dst", b, src_ranks, dst_ranks)
        expected = local_pool(logical[src_slots.long()], groups, tp_dst, b, LAYOUTS[layouts[1]])
        untouched = [i for i in range(slots) if i not in dst_slots.tolist()]
        ok = torch.equal(pool[dst_slots.long()], expected) and bool((pool[untouched] == -7.0).all())
        queue.put((rank, ok and runs > 0))
    dist.destroy_process_group()


@pytest.mark.parametrize("tp_src, tp_dst, layouts", [
    (1, 2, ("SD", "SD")), (2, 1, ("DS", "DS")), (2, 2, ("SD", "DS")), (1, 3, ("DS", "SD")),
])
def test_execute_over_gloo(tp_src, tp_dst, layouts):
    world = tp_src + tp_dst
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, tp_src, tp_dst,
                                               [12, 6, 6], layouts, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    assert results == {r: True for r in range(world)}
