"""TP transfer plans against a brute-force element map (evenly split and replicated groups), and
the executor over gloo: one set of processes runs every scenario, through torch and through the
interpreted Triton pack/unpack kernels."""

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
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from layoutpass import ArgumentError, DS, SD
from layoutpass.tp import execute, plan

LAYOUTS = {"SD": SD, "DS": DS}


def held_channels(groups, tp, rank):
    """The logical channels a rank holds, by vLLM's Mamba2 rule: its heads' share of an evenly
    split group; of a (width, n_groups) group, the model groups its heads belong to."""
    out, start = [], 0
    for spec in groups:
        if isinstance(spec, int):
            out += range(start + rank * spec // tp, start + (rank + 1) * spec // tp)
            start += spec
            continue
        width, n = spec
        heads = tp * n  # any multiple of both works
        mine = sorted({h * n // heads for h in range(rank * heads // tp, (rank + 1) * heads // tp)})
        out += [start + g * width // n + j for g in mine for j in range(width // n)]
        start += width
    return out


def local_pool(global_pool, groups, tp, rank, layout):
    """Rank `rank`'s share of a logical (slot, tok, dim) pool, stored in `layout`."""
    return SD.convert(global_pool[:, :, held_channels(groups, tp, rank)], layout)


def _width(spec):
    return spec if isinstance(spec, int) else spec[0]


@st.composite
def tp_cases(draw):
    tps = draw(st.sampled_from([(1, 2), (2, 1), (2, 2), (2, 4), (4, 2), (1, 4), (4, 1), (3, 1), (1, 3), (1, 1),
                                (3, 6), (6, 2)]))
    lcm = math.lcm(*tps)
    groups = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            groups.append(lcm * draw(st.integers(1, 3)))
        else:
            n = draw(st.sampled_from([1, 2, 3, 4, 6, 12]))
            assume(all(n % t == 0 or t % n == 0 for t in tps))
            groups.append((n * draw(st.integers(1, 3)), n))
    layouts = draw(st.sampled_from([("SD", "SD"), ("DS", "DS"), ("SD", "DS"), ("DS", "SD")]))
    return tps, groups, draw(st.integers(1, 4)), layouts


@settings(max_examples=120, deadline=None)
@given(tp_cases())
def test_plan_matches_a_brute_force_element_map(case):
    (tp_src, tp_dst), groups, state_len, (src_layout, dst_layout) = case
    total = sum(map(_width, groups))
    ids = torch.arange(state_len * total).view(1, state_len, total)
    p = plan(src_layout, {"tok": state_len}, groups, tp_src, tp_dst, dst_layout=dst_layout)
    srcs = [local_pool(ids, groups, tp_src, a, SD)[0] for a in range(tp_src)]  # (tok, local dim)
    dsts = [local_pool(ids, groups, tp_dst, b, SD)[0] for b in range(tp_dst)]
    assert p.local_dim("src") == srcs[0].shape[1] and p.local_dim("dst") == dsts[0].shape[1]
    covered = [torch.zeros(d.shape[1], dtype=torch.int) for d in dsts]
    for q in p.pieces:  # channel level, any layouts
        assert torch.equal(srcs[q.src_rank][:, slice(*q.src_dim)], dsts[q.dst_rank][:, slice(*q.dst_dim)])
        covered[q.dst_rank][slice(*q.dst_dim)] += 1
    assert all(bool((c == 1).all()) for c in covered), "every destination channel exactly once"
    if src_layout == dst_layout:  # element level: the runs an RDMA connector would issue
        L = LAYOUTS[src_layout]
        src_flat = [SD.convert(s[None], L).flatten() for s in srcs]
        dst_flat = [SD.convert(d[None], L).flatten() for d in dsts]
        hits = [torch.zeros_like(d, dtype=torch.int) for d in dst_flat]
        for (a, b), runs in p.instantiate(state_len).items():
            for s, d, n in runs:
                assert torch.equal(src_flat[a][s:s + n], dst_flat[b][d:d + n])
                hits[b][d:d + n] += 1
        assert all(bool((h == 1).all()) for h in hits), "every destination element exactly once"


def test_mamba2_run_counts():
    s = sympy.Symbol("state_len", positive=True, integer=True)
    groups = [5120, 128, 128]  # Mamba2-2.7B conv channels: x | B | C, split evenly
    ds, sd = plan("DS", {"tok": s}, groups, 1, 2), plan("SD", {"tok": s}, groups, 1, 2)
    assert ds.runs_per_slot(0, 1) == 3 and sd.runs_per_slot(0, 1) == 3 * s
    assert sum(p.src_runs.length for p in ds.pieces if p.dst_rank == 1) == s * 2688


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
    with pytest.raises(ArgumentError, match="^pools: expected \\(slot, ., .\\) pools"):
        execute(p, torch.zeros(12, 3, 4).permute(2, 0, 1), slots, "src", 0, [0], [1, 2])
    with pytest.raises(ArgumentError, match="^slots:"):
        execute(p, good, slots.float(), "src", 0, [0], [1, 2])
    with pytest.raises(ArgumentError, match="^chunks:"):
        execute(p, good, slots, "src", 0, [0], [1, 2], chunks=0)
    with pytest.raises(ArgumentError, match="^src_ranks:"):
        execute(p, good, slots, "src", 0, [0, 1], [1, 2])


# Every gloo scenario: (tp_src, tp_dst, groups, (src layout, dst layout), layers, chunks, path).
# "kernel" runs the pack/unpack through the Triton kernels (interpreted on the CPU).
SCENARIOS = [
    (1, 2, [12, 6, 6], ("SD", "SD"), 1, None, "torch"),
    (2, 1, [12, 6, 6], ("DS", "DS"), 3, 2, "kernel"),
    (2, 2, [12, 6, 6], ("SD", "DS"), 2, 3, "kernel"),
    (1, 3, [12, 6, 6], ("DS", "SD"), 2, 1, "torch"),
    (1, 3, [12, 6, 6], ("SD", "DS"), 1, 2, "kernel"),
    (1, 2, [16, (8, 1), (8, 1)], ("DS", "DS"), 2, 2, "kernel"),  # replicated B and C at the dst
    (2, 1, [16, (8, 1), (8, 1)], ("SD", "DS"), 2, 1, "torch"),  # replicated at the src
    (2, 2, [16, (8, 1), (8, 1)], ("SD", "SD"), 3, 2, "kernel"),
    (1, 3, [18, (6, 1), (6, 1)], ("DS", "SD"), 1, 1, "kernel"),
    (3, 1, [18, (6, 1), (6, 1)], ("SD", "SD"), 2, None, "torch"),
]
WORLD = max(s[0] + s[1] for s in SCENARIOS)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pools(layers, layout, slots, state_len, dim, fill, strided):
    """One pool per layer; `strided`: views into one buffer, layers interleaved per slot (a slot
    stride larger than its block, as servers that keep every layer's state of a slot together)."""
    shape = LAYOUTS[layout].shape(dict(slot=slots, tok=state_len, dim=dim))
    if not strided:
        return [torch.full(shape, fill) for _ in range(layers)]
    buffer = torch.full((slots, layers, *shape[1:]), fill)
    return [buffer[:, layer] for layer in range(layers)]


def _scenario(rank, case, number):
    tp_src, tp_dst, groups, layouts, layers, chunks, _ = case
    torch.manual_seed(number)
    slots, state_len, total = 12, 4, sum(map(_width, groups))
    logical = [torch.randn(slots, state_len, total) for _ in range(layers)]  # the same on every process
    src_slots = torch.tensor([7, 2, 9, 0, 5], dtype=torch.int32)
    dst_slots = torch.tensor([1, 3, 4, 10, 11], dtype=torch.int32)
    p = plan(layouts[0], {"tok": sympy.Symbol("s")}, groups, tp_src, tp_dst, dst_layout=layouts[1])
    src_ranks, dst_ranks = list(range(tp_src)), list(range(tp_src, tp_src + tp_dst))
    if rank < tp_src:
        pools = _pools(layers, layouts[0], slots, state_len, p.local_dim("src"), 0.0, number % 2)
        for pool, whole in zip(pools, logical):
            pool.copy_(local_pool(whole, groups, tp_src, rank, LAYOUTS[layouts[0]]))
        execute(p, pools, src_slots, "src", rank, src_ranks, dst_ranks, chunks=chunks)
        return True
    b = rank - tp_src
    pools = _pools(layers, layouts[1], slots, state_len, p.local_dim("dst"), -7.0, number % 2)
    runs = execute(p, pools, dst_slots, "dst", b, src_ranks, dst_ranks, chunks=chunks)
    untouched = [i for i in range(slots) if i not in dst_slots.tolist()]
    ok = all(torch.equal(pool[dst_slots.long()], local_pool(whole[src_slots.long()], groups, tp_dst, b,
                                                            LAYOUTS[layouts[1]]))
             and bool((pool[untouched] == -7.0).all()) for pool, whole in zip(pools, logical))
    return ok and runs > 0


def _through_kernels(state):
    def copy_runs(pools, slots, entries, message, to_message):
        state.launch_copy_runs(pools, slots, tuple(map(tuple, entries)), message, to_message)

    def unpack_boxes(pools, layout, slots, entries, message, message_layout):
        views = [state._logical(p, LAYOUTS[str(layout)]) for p in pools]
        state.launch_unpack_boxes(pools, views, slots, tuple(map(tuple, entries)), message, message_layout)

    return copy_runs, unpack_boxes


def _worker(rank, port, queue):
    from layoutpass.kernels import state
    originals = state.copy_runs, state.unpack_boxes
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    for number, case in enumerate(SCENARIOS):
        if rank >= case[0] + case[1]:
            continue
        if case[-1] == "kernel":
            state.copy_runs, state.unpack_boxes = _through_kernels(state)
        try:
            queue.put((number, rank, _scenario(rank, case, number)))
        except Exception as error:  # reported by the test, not lost in a child
            queue.put((number, rank, repr(error)))
        state.copy_runs, state.unpack_boxes = originals
    dist.destroy_process_group()


def test_execute_over_gloo():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "layoutpass.tp"])
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(WORLD)]
    for proc in procs:
        proc.start()
    expected = {(n, r) for n, case in enumerate(SCENARIOS) for r in range(case[0] + case[1])}
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
