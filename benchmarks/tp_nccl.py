"""Heterogeneous TP transfers of Mamba2-2.7B-shaped conv state over NCCL, one process per GPU
(issue 14): TP1 -> TP2 and TP2 -> TP1 on 3 GPUs, TP2 -> TP2 on 4, one layer and a whole
64-layer model, SD and DS pools (and TP2 -> TP2 from SD to DS, relayouted on receipt). A pool
per layer: channels [x 5120 | B 128 | C 128], state_len 3, bf16, 4096 slots; 1024 random slots
move to 1024 random slots. Groups "even": B and C split across ranks as the issue states them;
"replicated": n_groups = 1, as vLLM shards Mamba2-2.7B (every rank holds all of B and C).

Each row is first checked (every layer's moved slots against the logically sliced source,
untouched slots unchanged), then timed: the ranks meet at a barrier, a host clock runs until
the transfer has finished on every rank, the row's time is the median over iterations of the
slowest rank. The ceiling is one batch_isend_irecv of the same bytes per (src, dst) pair,
already packed. Beside it, on one GPU: the sender's pack and the receiver's unpack alone (one
launch over all slots and layers; CUDA events around ten back-to-back launches). Two whole-model
rows are also timed at several chunk counts.

    python benchmarks/tp_nccl.py --out DIR      # 4 GPUs: tp_nccl.json + tp_nccl.md
    python benchmarks/tp_nccl.py --smoke        # 4 CPU processes over gloo, tiny shapes: the checks only"""

import os

# NVLink multicast stays off in every process (the device machines' rule); spawned children inherit it.
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from layoutpass.kernels import state  # noqa: E402
from layoutpass.layout import DS, SD  # noqa: E402
from layoutpass.tp import _side, execute, plan  # noqa: E402

LAYOUTS = {"SD": SD, "DS": DS}
FULL = dict(groups={"even": [5120, 128, 128], "replicated": [5120, (128, 1), (128, 1)]}, state_len=3, slots=4096,
            moved=1024, layers=(1, 64), iters={1: 30, 64: 8}, dtype=torch.bfloat16)
SMOKE = dict(groups={"even": [40, 8, 8], "replicated": [40, (8, 1), (8, 1)]}, state_len=3, slots=256, moved=64,
             layers=(1, 3), iters={1: 2, 3: 2}, dtype=torch.float32)
PAIRS = [("TP1->TP2", 1, 2, [("SD", "SD"), ("DS", "DS")]),
         ("TP2->TP1", 2, 1, [("SD", "SD"), ("DS", "DS")]),
         ("TP2->TP2", 2, 2, [("SD", "SD"), ("DS", "DS"), ("SD", "DS")])]
FILL = -7.0
SWEEP = {("TP1->TP2", "DSDS", "even"), ("TP2->TP2", "SDDS", "even")}  # whole-model rows timed at several chunk counts


def rows(cfg):
    """(pair, tp_src, tp_dst, layouts, layers, groups): every scope for even groups, the whole
    model for replicated ones."""
    for name, tp_src, tp_dst, layouts in PAIRS:
        for groups in cfg["groups"]:
            for layers in cfg["layers"] if groups == "even" else cfg["layers"][-1:]:
                for lay in layouts:
                    yield name, tp_src, tp_dst, lay, layers, groups


def held_channels(groups, tp, rank):
    """A rank's logical channels, by vLLM's Mamba2 rule (written apart from the plan's own)."""
    out, start = [], 0
    for spec in groups:
        width, n = (spec, None) if isinstance(spec, int) else spec
        if n is None or n % tp == 0:
            out += range(start + rank * width // tp, start + (rank + 1) * width // tp)
        else:
            g = rank * n // tp
            out += range(start + g * width // n, start + (g + 1) * width // n)
        start += width
    return torch.tensor(out)


def source_layer(cfg, groups, layer, device):
    """The whole logical (slot, tok, dim) pool of one layer, the same on every process."""
    width = sum(g if isinstance(g, int) else g[0] for g in cfg["groups"][groups])
    gen = torch.Generator(device=device).manual_seed(1000 + layer)
    return torch.randn(cfg["slots"], cfg["state_len"], width, generator=gen, device=device).to(cfg["dtype"])


def local(logical, cfg, groups, tp, rank, layout):
    return SD.convert(logical[:, :, held_channels(cfg["groups"][groups], tp, rank).to(logical.device)],
                      LAYOUTS[layout])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, group, device, iters, warmup=2):
    """Median over iterations of the slowest rank's time (us), each from a barrier to the end
    of the transfer on this rank."""
    times = []
    for _ in range(warmup + iters):
        sync(device)
        dist.barrier(group=group)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e6)
    slowest = torch.tensor(times[warmup:], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, dist.ReduceOp.MAX, group=group)
    return statistics.median(slowest.tolist())


def local_time(fn, device, reps=10):
    """One GPU's time per call (us): CUDA events around `reps` back-to-back calls (the GPU's
    time when it is the slower side, else the host's launch time); None on the CPU."""
    if device.type != "cuda":
        return None
    fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / reps


def run_row(row, cfg, rank, device, groups_by_world):
    name, tp_src, tp_dst, (src_layout, dst_layout), layers, groups = row
    world = tp_src + tp_dst
    group = groups_by_world[world]
    src_ranks, dst_ranks = list(range(tp_src)), list(range(tp_src, world))
    p = plan(src_layout, {"tok": cfg["state_len"]}, cfg["groups"][groups], tp_src, tp_dst, dst_layout=dst_layout)
    gen = random.Random(0)
    src_slots = torch.tensor(gen.sample(range(cfg["slots"]), cfg["moved"]), dtype=torch.int32, device=device)
    dst_slots = torch.tensor(gen.sample(range(cfg["slots"]), cfg["moved"]), dtype=torch.int32, device=device)
    role, index = ("src", rank) if rank < tp_src else ("dst", rank - tp_src)
    tp = tp_src if role == "src" else tp_dst
    layout = src_layout if role == "src" else dst_layout
    shape = LAYOUTS[layout].shape(dict(slot=cfg["slots"], tok=cfg["state_len"], dim=p.local_dim(role)))
    pools = [torch.full(shape, FILL, dtype=cfg["dtype"], device=device) for _ in range(layers)]
    if role == "src":
        for layer, pool in enumerate(pools):
            pool.copy_(local(source_layer(cfg, groups, layer, device), cfg, groups, tp, index, layout))
    slots = src_slots if role == "src" else dst_slots
    move = lambda chunks=None: execute(p, pools, slots, role, index, src_ranks, dst_ranks,  # noqa: E731
                                       group=group, chunks=chunks)
    move()
    ok = True
    if role == "dst":
        untouched = torch.tensor(sorted(set(range(cfg["slots"])) - set(dst_slots.tolist()))[:64], device=device)
        for layer, pool in enumerate(pools):
            whole = source_layer(cfg, groups, layer, device)
            expected = local(whole[src_slots.long()], cfg, groups, tp, index, layout)
            ok &= torch.equal(pool[dst_slots.long()], expected) and bool((pool[untouched] == FILL).all())
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, dist.ReduceOp.MIN, group=group)
    side = _side(p, role, index)  # this process's peers and records, as the executor lays them out
    pair_elems = {peer: r * len(slots) * layers for peer, r in zip(side.peers, side.records)}
    pairs = sorted({(q.src_rank, q.dst_rank) for q in p.pieces})
    size = torch.tensor([], dtype=cfg["dtype"]).element_size()
    result = dict(pair=name, layouts=f"{src_layout}->{dst_layout}", layers=layers, groups=groups,
                  checked=bool(flag.item()),
                  runs_per_slot={f"{a}->{b}": int(p.runs_per_slot(a, b)) for a, b in pairs},
                  bytes_per_pair={f"{a}->{b}": sum(q.dst_dim[1] - q.dst_dim[0] for q in p.pieces
                                                   if (q.src_rank, q.dst_rank) == (a, b))
                                  * cfg["state_len"] * cfg["moved"] * layers * size for a, b in pairs})
    if not result["checked"]:
        return result
    iters = cfg["iters"][layers]
    buffers = {peer: torch.randn(n, device=device).to(cfg["dtype"]) for peer, n in pair_elems.items()}
    op = dist.isend if role == "src" else dist.irecv
    peers = dst_ranks if role == "src" else src_ranks

    def ceiling():
        for work in dist.batch_isend_irecv([dist.P2POp(op, buf, peers[peer], group) for peer, buf in buffers.items()]):
            work.wait()

    result["ceiling_us"] = timed(ceiling, group, device, iters)
    result["ours_us"] = timed(move, group, device, iters)
    result["one_batch_us"] = timed(lambda: move(1), group, device, iters)
    if (name, src_layout + dst_layout, groups) in SWEEP and layers == max(cfg["layers"]):
        result["chunks_us"] = {c: timed(lambda: move(c), group, device, iters) for c in (2, 4, 8, 16, 32)}
    message = torch.empty(sum(pair_elems.values()), dtype=cfg["dtype"], device=device)
    if role == "src":
        pack = local_time(lambda: state.copy_runs(pools, slots, side.runs, message, True), device)
    elif side.boxes is None:
        pack = local_time(lambda: state.copy_runs(pools, slots, side.runs, message, False), device)
    else:
        pack = local_time(lambda: state.unpack_boxes(pools, dst_layout, slots, side.boxes, message, src_layout), device)
    kernel = torch.tensor([pack or 0.0], dtype=torch.float64, device=device)
    parts = [torch.zeros_like(kernel) for _ in range(world)]
    dist.all_gather(parts, kernel, group=group)
    result["pack_us"] = [float(t) for t in parts[:tp_src]]  # per src rank: all its peers' messages
    result["unpack_us"] = [float(t) for t in parts[tp_src:]]  # per dst rank
    return result


def worker(rank, world, cfg, out, backend):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("TP_NCCL_PORT", "29517"))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=180),
                            device_id=device if device.type == "cuda" else None)
    groups_by_world = {3: dist.new_group([0, 1, 2]), 4: dist.group.WORLD}
    results = []
    for row in rows(cfg):
        if rank < row[1] + row[2]:
            result = run_row(row, cfg, rank, device, groups_by_world)
            results.append(result)
            if rank == 0:
                print(json.dumps(result), flush=True)
    dist.barrier()
    if rank == 0 and out is not None:
        write(results, out, device)
    dist.destroy_process_group()


def copy_bandwidth(device):
    """One GPU's device-to-device copy, GB/s counting bytes read and written."""
    a = torch.empty(1 << 29, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    us = local_time(lambda: b.copy_(a), device)
    return 2 * a.numel() / us / 1e3


def write(results, out, device):
    import triton
    cards = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    meta = dict(cards=cards, torch=torch.__version__, triton=triton.__version__,
                nccl=str(torch.cuda.nccl.version()), copy_gbps=copy_bandwidth(device))
    lines = [f"Cards: {', '.join(sorted(set(cards)))} x {len(cards)}; torch {meta['torch']}; triton {meta['triton']}; "
             f"NCCL {meta['nccl']}; one GPU's device copy {meta['copy_gbps']:.0f} GB/s (read + write). "
             f"Mamba2-2.7B conv pools (bf16, state_len 3, 4096 slots), 1024 random slots to 1024 random slots; "
             "3 GPUs for TP1<->TP2, 4 for TP2->TP2. Every row checked against the sliced source before timing.", "",
             "| pair | pools | layers | groups | runs/slot (src->dst) | largest message per pair | ceiling (us) | ours (us) | "
             "ours / ceiling | one batch (us) | pack, per src (us) | unpack, per dst (us) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        runs = ", ".join(f"{k}: {v}" for k, v in r["runs_per_slot"].items())
        if not r["checked"]:
            lines.append(f"| {r['pair']} | {r['layouts']} | {r['layers']} | {r['groups']} | {runs} | | CHECK FAILED |"
                         " | | | | |")
            continue
        per_pair = max(r["bytes_per_pair"].values())
        lines.append(f"| {r['pair']} | {r['layouts']} | {r['layers']} | {r['groups']} | {runs} | "
                     f"{per_pair / 1e6:.1f} MB | {r['ceiling_us']:.0f} | {r['ours_us']:.0f} | "
                     f"{r['ours_us'] / r['ceiling_us']:.2f} | {r['one_batch_us']:.0f} | "
                     f"{' / '.join(f'{t:.0f}' for t in r['pack_us'])} | {' / '.join(f'{t:.0f}' for t in r['unpack_us'])} |")
    sweeps = [r for r in results if "chunks_us" in r]
    if sweeps:
        counts = list(sweeps[0]["chunks_us"])
        lines += ["", "Chunks (batches per transfer) against time (us), whole model:", "", "| pair | pools | " + " | ".join(map(str, counts)) + " |",
                  "|---|---|" + "---|" * len(counts)]
        lines += [f"| {r['pair']} | {r['layouts']} | " + " | ".join(f"{r['chunks_us'][c]:.0f}" for c in counts) + " |"
                  for r in sweeps]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tp_nccl.json").write_text(json.dumps(dict(meta, rows=results), indent=1))
    (out / "tp_nccl.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="gloo on the CPU, tiny shapes, checks only")
    args = parser.parse_args()
    cfg, backend = (SMOKE, "gloo") if args.smoke else (FULL, "nccl")
    if backend == "nccl" and torch.cuda.device_count() < 4:
        raise SystemExit(f"needs 4 GPUs, found {torch.cuda.device_count()}")
    mp.spawn(worker, args=(4, cfg, args.out, backend), nprocs=4)


if __name__ == "__main__":
    main()
