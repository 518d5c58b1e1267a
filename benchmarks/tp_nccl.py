"""The whole disaggregated hand-off over NCCL (issue 21): every pool of every layer of a request,
conv and SSM state, from TP prefill ranks to TP decode ranks of other sizes and layouts, one
process per GPU on 4 GPUs: TP1->TP2, TP2->TP1, TP2->TP2 (3 or 4 GPUs, prefill and decode on
separate GPUs), TP1->TP4 and TP4->TP1 (4 GPUs: the TP1 rank shares GPU 0 with TP4 rank 0, whose
pair is copied on the GPU).

Mamba2-2.7B shapes, bf16: per layer a conv pool (channels [x 5120 | B 128 | C 128], n_groups 1
so every TP2/TP4 rank holds all of B and C, state_len 3) and an SSM pool (80 heads, head_dim 64
(v), d_state 128 (k): 1.31 MB per slot). Pools of 1056 slots; a request of 1024 random slots
moves to 1024 random slots (all 64 layers: ~86 GB of SSM state leave a TP1 rank). Layouts:
"same" keeps conv DS and SSM VK on both sides, "cross" sends conv SD / SSM KV into DS / VK
(relayouted on receipt).

Each configuration is first checked: every source element holds a hash of (pool, layer, slot,
logical index); after a hand-off every destination element of every moved slot of every layer is
compared with the hash of its logical index at the source slot, and unmoved slots must keep
their fill. Then timed, each scope (the 64-layer model; one layer, conv + SSM; one layer's conv
alone, where the fixed cost shows) against its ceiling measured in the same run: one
batch_isend_irecv of the same bytes per (src, dst) pair, already contiguous (sent from and into
the pools' own memory; the co-located pair as one device copy). Rows: ranks meet at a barrier,
a host clock runs until the transfer has finished on every rank; the median over iterations of
the slowest rank. `host` is the time until tp.Transfer's call returns (its host work: the
rest is the GPU's and NCCL's). The links' own bandwidth is measured at the start of the run (1 GiB
per peer: one pair, one GPU to three, three to one).

    python benchmarks/tp_nccl.py --out benchmarks/results      # 4 GPUs: tp_nccl.json + tp_nccl.md
    python benchmarks/tp_nccl.py --smoke                       # 4 CPU processes over gloo, tiny shapes
    python benchmarks/tp_nccl.py --out DIR --profile DIR2      # + torch.profiler traces of one-layer rows"""

import os

# NVLink multicast stays off in every process (the device machines' rule); spawned children inherit it.
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from layoutpass import tp  # noqa: E402
from layoutpass.layout import LAYOUTS, Layout, arrange  # noqa: E402

FULL = dict(heads=80, head_dim=64, d_state=128, n_groups=1, conv_width=4, slots=1056, moved=1024, layers=64,
            iters={"model": 3, "layer": 20, "conv layer": 30}, link_bytes=1 << 30, sweep=(64 << 20, 256 << 20, 1 << 30))
SMOKE = dict(heads=8, head_dim=4, d_state=8, n_groups=1, conv_width=4, slots=40, moved=32, layers=3,
             iters={"model": 2, "layer": 2, "conv layer": 2}, link_bytes=1 << 20, sweep=(4 << 10, 64 << 10))
# (name, tp_src, tp_dst, src processes, dst processes)
PAIRS = [("TP1->TP2", 1, 2, [0], [1, 2]), ("TP2->TP1", 2, 1, [0, 1], [2]), ("TP2->TP2", 2, 2, [0, 1], [2, 3]),
         ("TP1->TP4", 1, 4, [0], [0, 1, 2, 3]), ("TP4->TP1", 4, 1, [0, 1, 2, 3], [0])]
LAYOUT_SETS = {"same": (("DS", "DS"), ("VK", "VK")), "cross": (("SD", "DS"), ("KV", "VK"))}
CONFIGS = [(pair, "same") for pair in PAIRS] + [(pair, "cross") for pair in PAIRS[:3]]
SWEEP = [("TP1->TP2", "same"), ("TP2->TP2", "cross")]  # model rows also timed at other chunk sizes
FILL = -12345
DTYPE = torch.bfloat16


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, group, device, iters, warmup=1):
    """(median of the slowest rank's time, median of the slowest rank's host time until fn
    returned), us: each iteration from a barrier to the end of the transfer on this rank."""
    times, host = [], []
    for _ in range(warmup + iters):
        sync(device)
        dist.barrier(group=group)
        start = time.perf_counter()
        fn()
        host.append((time.perf_counter() - start) * 1e6)
        sync(device)
        times.append((time.perf_counter() - start) * 1e6)
    both = torch.tensor([times[warmup:], host[warmup:]], dtype=torch.float64, device=device)
    dist.all_reduce(both, dist.ReduceOp.MAX, group=group)
    return statistics.median(both[0].tolist()), statistics.median(both[1].tolist())


def gpu_time(fn, device, reps=5):
    """One GPU's time per call (us), CUDA events around back-to-back calls; None on the CPU."""
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


# ---- the state: hashes of logical indices, each rank's shard in its memory order (vLLM's rules,
# written apart from layoutpass.tp's)

def held_channels(cfg, t, rank):
    """A rank's global conv channels: its heads' x, and B and C of its heads' group."""
    x = cfg["heads"] * cfg["head_dim"]
    n, width = cfg["n_groups"], cfg["n_groups"] * cfg["d_state"]
    out = list(range(rank * x // t, (rank + 1) * x // t))
    for start in (x, x + width):
        if n % t == 0:
            out += range(start + rank * width // t, start + (rank + 1) * width // t)
        else:
            g = rank * n // t
            out += range(start + g * width // n, start + (g + 1) * width // n)
    return out


def logical_index(cfg, kind, t, rank, layout, device):
    """The global logical index of every element of one slot's block of a rank's pool, in its
    memory order (int64, flat)."""
    if kind == "conv":
        total = cfg["heads"] * cfg["head_dim"] + 2 * cfg["n_groups"] * cfg["d_state"]
        chans = torch.tensor(held_channels(cfg, t, rank), device=device)
        g = torch.arange(cfg["conv_width"] - 1, device=device)[:, None] * total + chans  # (tok, dim)
        axes = Layout(("slot", "tok", "dim"))
    else:
        h, k, v = cfg["heads"], cfg["d_state"], cfg["head_dim"]
        heads = torch.arange(rank * h // t, (rank + 1) * h // t, device=device)
        g = (heads[:, None, None] * k + torch.arange(k, device=device)[:, None]) * v + torch.arange(v, device=device)
        axes = Layout(("slot", "head", "k", "v"))
    return axes.convert(g[None], arrange(axes, LAYOUTS[layout]))[0].flatten()


def hashed(seed, slots, index):
    """16 bits per (seed, slot, logical index): int64 arithmetic, the same on every GPU."""
    x = index[None, :] * 0x9E3779B1 + slots[:, None].long() * 0x85EBCA77 + seed * 0xC2B2AE3D
    x = x ^ (x >> 15)
    return (x * 0x2C1B3C6D ^ (x >> 13)).to(torch.int16)


def fill_source(pool, seed, index, step=64):
    bits = pool.view(torch.int16).view(pool.shape[0], -1)
    for lo in range(0, pool.shape[0], step):
        rows = torch.arange(lo, min(lo + step, pool.shape[0]), device=pool.device)
        bits[lo:lo + rows.shape[0]] = hashed(seed, rows, index)


def check_dest(pool, seed, index, src_slots, dst_slots, untouched, step=64):
    bits = pool.view(torch.int16).view(pool.shape[0], -1)
    ok = True
    for lo in range(0, src_slots.shape[0], step):
        want = hashed(seed, src_slots[lo:lo + step], index)
        ok &= torch.equal(bits[dst_slots[lo:lo + step].long()], want)
    return ok and bool((bits[untouched] == FILL).all())


# ---- one configuration

class Rank:
    """This process's pools for one configuration: per role and kind, one buffer of every
    layer's pool ((layers, slots, ...) in the memory order), and the logical indices."""

    def __init__(self, cfg, plans, layouts, role, index, tp_size, device):
        self.role, self.index, self.pools, self.buffers, self.index_of = role, index, [], [], []
        for kind, p, layout in zip(("conv", "ssm"), plans, layouts):
            sizes = {a: int(v) for a, v in p.local_sizes(role).items()}
            order = p.src_layout if role == "src" else p.dst_layout
            shape = (cfg["layers"], cfg["slots"], *[sizes[a] for a in order.axes[1:]])
            buffer = torch.empty(shape, dtype=DTYPE, device=device)
            self.buffers.append(buffer)
            self.pools.append([buffer[layer] for layer in range(cfg["layers"])])
            self.index_of.append(logical_index(cfg, kind, tp_size, index, layout[0 if role == "src" else 1], device))

    def fill(self):
        for c, pools in enumerate(self.pools):
            for layer, pool in enumerate(pools):
                if self.role == "src":
                    fill_source(pool, 1000 * c + layer, self.index_of[c])
                else:
                    pool.view(torch.int16).fill_(FILL)


def check_scope(move, dst, kinds, layers, src_slots, dst_slots, untouched, device, group):
    """Reset the dst pools, move once, check every moved element; True on every rank or False."""
    if dst:
        for c in kinds:
            for pool in dst.pools[c][:layers]:
                pool.view(torch.int16).fill_(FILL)
    move()
    sync(device)
    ok = True
    if dst:
        for c in kinds:
            for layer, pool in enumerate(dst.pools[c][:layers]):
                ok &= check_dest(pool, 1000 * c + layer, dst.index_of[c], src_slots, dst_slots, untouched)
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def pair_bytes(plans, kinds, moved, layers):
    """(src rank, dst rank) -> bytes per kind (unpadded) that the pair moves."""
    out = {}
    for c in kinds:
        p = plans[c]
        for q in p.pieces:
            entry = out.setdefault((q.src_rank, q.dst_rank), [0, 0])
            entry[c] += int(p.piece_elements(q)) * moved * layers * torch.finfo(DTYPE).bits // 8
    return out


def ceiling_fn(plans, kinds, moved, layers, src, dst, src_procs, dst_procs, rank, group):
    """One batch of the same bytes per pair, already contiguous: from the src pools' memory into
    the dst pools' memory (each dst's peers side by side); the co-located pair a device copy."""
    sizes = pair_bytes(plans, kinds, moved, layers)
    ops, copies = [], []
    flat = {role.role: [b.view(-1).view(torch.uint8) for b in role.buffers] for role in (src, dst) if role}
    at = [0, 0]
    for (a, b), per_kind in sorted(sizes.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for c in kinds:
            nbytes = per_kind[c]
            if not nbytes:
                continue
            if src is not None and a == src.index and dst_procs[b] == rank:  # co-located
                copies.append((flat["dst"][c][at[c]:at[c] + nbytes], flat["src"][c][:nbytes]))
            elif src is not None and a == src.index:
                ops.append(dist.P2POp(dist.isend, flat["src"][c][:nbytes], dst_procs[b], group))
            elif dst is not None and b == dst.index:
                ops.append(dist.P2POp(dist.irecv, flat["dst"][c][at[c]:at[c] + nbytes], src_procs[a], group))
            if dst is not None and b == dst.index:
                at[c] += nbytes

    def run():
        for out, inp in copies:
            out.copy_(inp)
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
    busiest = max([sum(sum(v) for (a, b), v in sizes.items() if src_procs[a] == r and dst_procs[b] != r)
                   for r in set(src_procs) | set(dst_procs)]
                  + [sum(sum(v) for (a, b), v in sizes.items() if dst_procs[b] == r and src_procs[a] != r)
                     for r in set(src_procs) | set(dst_procs)])
    return run, sum(sum(v) for v in sizes.values()), busiest


def run_config(config, cfg, rank, device, groups_by_world, profile):
    (name, tp_src, tp_dst, src_procs, dst_procs), layout_set = config
    conv_layouts, ssm_layouts = LAYOUT_SETS[layout_set]
    procs = sorted(set(src_procs) | set(dst_procs))
    group = groups_by_world[len(procs)]
    plans = tp.mamba2(heads=cfg["heads"], head_dim=cfg["head_dim"], d_state=cfg["d_state"], n_groups=cfg["n_groups"],
                      conv_width=cfg["conv_width"], tp_src=tp_src, tp_dst=tp_dst, conv=conv_layouts, ssm=ssm_layouts)
    layouts = (conv_layouts, ssm_layouts)
    src = Rank(cfg, plans, layouts, "src", src_procs.index(rank), tp_src, device) if rank in src_procs else None
    dst = Rank(cfg, plans, layouts, "dst", dst_procs.index(rank), tp_dst, device) if rank in dst_procs else None
    for role in (src, dst):
        if role:
            role.fill()
    gen = random.Random(0)
    src_slots = torch.tensor(gen.sample(range(cfg["slots"]), cfg["moved"]), dtype=torch.int32, device=device)
    dst_slots = torch.tensor(gen.sample(range(cfg["slots"]), cfg["moved"]), dtype=torch.int32, device=device)
    untouched = torch.tensor(sorted(set(range(cfg["slots"])) - set(dst_slots.tolist())), device=device)
    results = []
    scopes = [("model", [0, 1], cfg["layers"]), ("layer", [0, 1], 1), ("conv layer", [0], 1)]
    for scope, kinds, layers in scopes:
        def transfer_for(chunk_bytes=tp.CHUNK_BYTES):
            return tp.Transfer([plans[c] for c in kinds],
                               src=(src.index, [src.pools[c][:layers] for c in kinds]) if src else None,
                               dst=(dst.index, [dst.pools[c][:layers] for c in kinds]) if dst else None,
                               src_ranks=src_procs, dst_ranks=dst_procs, group=group, chunk_bytes=chunk_bytes)
        t = transfer_for()
        move = lambda t=t: t(src_slots if src else None, dst_slots if dst else None)  # noqa: E731
        checked = check_scope(move, dst, kinds, layers, src_slots, dst_slots, untouched, device, group)
        chunks = -(-cfg["moved"] // t.chunk_slots)
        row = dict(pair=name, layouts=layout_set, conv=f"{conv_layouts[0]}->{conv_layouts[1]}",
                   ssm=f"{ssm_layouts[0]}->{ssm_layouts[1]}", scope=scope, layers=layers, checked=checked,
                   chunks=chunks, runs_per_slot={f"{q.src_rank}->{q.dst_rank}": int(sum(plans[c].runs_per_slot(
                       q.src_rank, q.dst_rank) for c in kinds)) for q in plans[0].pieces})
        if not row["checked"]:
            results.append(row)
            continue
        ceiling, total, busiest = ceiling_fn(plans, kinds, cfg["moved"], layers, src, dst, src_procs, dst_procs, rank,
                                             group)
        iters = cfg["iters"][scope]
        row["bytes"], row["busiest_gpu_bytes"] = total, busiest
        row["ceiling_us"], _ = timed(ceiling, group, device, iters)
        row["ours_us"], row["host_us"] = timed(move, group, device, iters)
        if scope == "model" and (name, layout_set) in SWEEP:
            sweep = {}
            for chunk_bytes in cfg["sweep"]:
                t2 = transfer_for(chunk_bytes)
                move2 = lambda t2=t2: t2(src_slots if src else None, dst_slots if dst else None)  # noqa: E731
                ok = check_scope(move2, dst, kinds, layers, src_slots, dst_slots, untouched, device, group)
                sweep[chunk_bytes] = timed(move2, group, device, iters)[0] if ok else None
                del t2, move2
            row["chunk_bytes_us"] = sweep
        # one GPU alone: a chunk's pack / unpack (this process's kernels, back to back)
        n = min(cfg["moved"], t.chunk_slots)
        t._reserve(n)
        pack = gpu_time(lambda: t._pack(0, 0, n, src_slots, dst_slots), device) if src else None
        unpack = gpu_time(lambda: t._unpack(0, [(0, n)], dst_slots, 1), device) if dst and t.remote_in else None
        times = torch.tensor([pack or 0.0, unpack or 0.0], dtype=torch.float64, device=device)
        parts = [torch.zeros_like(times) for _ in procs]
        dist.all_gather(parts, times, group=group)
        row["chunk_slots"] = n
        row["pack_us"] = [float(parts[procs.index(p)][0]) for p in src_procs]
        row["unpack_us"] = [float(parts[procs.index(p)][1]) for p in dst_procs]
        if profile is not None and scope != "model" and device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile as prof
            with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                for _ in range(3):
                    sync(device)
                    dist.barrier(group=group)
                    move()
                    sync(device)
            profile.mkdir(parents=True, exist_ok=True)
            p.export_chrome_trace(str(profile / f"{name}_{layout_set}_{scope.replace(' ', '_')}_rank{rank}.json"))
        results.append(row)
    return results


def links(cfg, rank, device, world):
    """GB/s of the links, measured here: GPU 0 to GPU 1; GPU 0 to the three others at once; the
    three others to GPU 0 at once (1 GiB per peer, one batch, median of 5)."""
    n = cfg["link_bytes"]
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty(n * (world - 1), dtype=torch.uint8, device=device)
    out = {}
    for name, sends in (("one pair", [(0, 1)]), ("one to three", [(0, r) for r in range(1, world)]),
                        ("three to one", [(r, 0) for r in range(1, world)])):
        ops = []
        for s, d in sends:
            if rank == s:
                ops.append(dist.P2POp(dist.isend, a, d))
            elif rank == d:
                k = [x for x, _ in sends].index(s) if d == 0 else 0
                ops.append(dist.P2POp(dist.irecv, b[k * n:(k + 1) * n], s))

        def run(ops=ops):
            if ops:
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
        us, _ = timed(run, None, device, 5)
        out[name] = len(sends) * n / us / 1e3
    return out


def worker(rank, world, cfg, out, backend, profile, only):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("TP_NCCL_PORT", "29517"))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600),
                            device_id=device if device.type == "cuda" else None)
    groups_by_world = {3: dist.new_group([0, 1, 2]), 4: dist.group.WORLD}
    if rank < 3:
        dist.barrier(group=groups_by_world[3])  # every rank of a group in its first collective
    dist.barrier()
    link = links(cfg, rank, device, world)
    results = []
    for config in CONFIGS:
        if only and config[0][0] not in only:
            continue
        if rank in set(config[0][3]) | set(config[0][4]):
            for row in run_config(config, cfg, rank, device, groups_by_world, profile):
                results.append(row)
                if rank == 0:
                    print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # this configuration's pools, before the next one's
        dist.barrier()
    if rank == 0 and out is not None:
        write(results, link, out, device, cfg)
    dist.destroy_process_group()


def copy_bandwidth(device):
    """One GPU's device-to-device copy, GB/s counting bytes read and written."""
    a = torch.empty(1 << 29, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() / gpu_time(lambda: b.copy_(a), device) / 1e3


def write(results, link, out, device, cfg):
    import triton
    cuda = device.type == "cuda"
    cards = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else ["cpu (gloo)"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    meta = dict(cards=cards, torch=torch.__version__, triton=triton.__version__,
                nccl=str(torch.cuda.nccl.version()) if cuda else None,
                copy_gbps=copy_bandwidth(device) if cuda else None,
                links_gbps=link, commit=commit, chunk_bytes=tp.CHUNK_BYTES, ring=tp.RING)
    lines = [f"Commit {commit}. Cards: {', '.join(sorted(set(cards)))} x {len(cards)}; torch {meta['torch']}; "
             f"triton {meta['triton']}; NCCL {meta['nccl']}; one GPU's device copy "
             + (f"{meta['copy_gbps']:.0f} GB/s (read + write)" if cuda else "n/a")
             + f"; links measured in this run ({cfg['link_bytes'] / 2**20:g} MiB per peer): "
             + ", ".join(f"{k} {v:.0f} GB/s" for k, v in link.items()) + ".", "",
             f"Mamba2-shaped pools (bf16; conv [x {cfg['heads'] * cfg['head_dim']} | "
             f"B {cfg['n_groups'] * cfg['d_state']}"
             f" | C {cfg['n_groups'] * cfg['d_state']}] n_groups {cfg['n_groups']}, state_len {cfg['conv_width'] - 1}; "
             f"SSM {cfg['heads']} heads x {cfg['d_state']} (k) x {cfg['head_dim']} (v)), {cfg['layers']} layers, "
             f"{cfg['moved']} random slots of {cfg['slots']} to {cfg['moved']} random slots; layouts 'same' = conv DS, "
             "SSM VK on both "
             "sides, 'cross' = conv SD -> DS, SSM KV -> VK. TP1<->TP2 on 3 GPUs, TP2->TP2 on 4, TP1<->TP4 on 4 "
             "(the TP1 rank shares GPU 0 with TP4 rank 0). Every row checked element by element before timing. "
             "GB/s: the busiest GPU's bytes over the link per second. Goal: ours / ceiling <= 1.15 (model), "
             "<= 1.3 (layer).", "",
             "| pair | layouts | scope | chunks | bytes | ceiling (us) | ours (us) | ours / ceiling | ours GB/s "
             "(busiest GPU) | ceiling GB/s | host (us) | pack per chunk, per src (us) | "
             "unpack per chunk, per dst (us) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if not r["checked"]:
            lines.append(f"| {r['pair']} | {r['layouts']} | {r['scope']} | | | CHECK FAILED | | | | | | | |")
            continue
        fmt = lambda ts: " / ".join(f"{t:.0f}" for t in ts)  # noqa: E731
        lines.append(
            f"| {r['pair']} | {r['layouts']} | {r['scope']} | {r['chunks']} | {r['bytes'] / 1e9:.2f} GB | "
            f"{r['ceiling_us']:.0f} | {r['ours_us']:.0f} | {r['ours_us'] / r['ceiling_us']:.2f} | "
            f"{r['busiest_gpu_bytes'] / r['ours_us'] / 1e3:.0f} | "
            f"{r['busiest_gpu_bytes'] / r['ceiling_us'] / 1e3:.0f} | "
            f"{r['host_us']:.0f} | {fmt(r['pack_us'])} | {fmt(r['unpack_us'])} |")
    sweeps = [r for r in results if "chunk_bytes_us" in r]
    if sweeps:
        sizes = list(sweeps[0]["chunk_bytes_us"])
        lines += ["", f"Chunk size per pair (MiB) against time (us), whole model (default {tp.CHUNK_BYTES >> 20} MiB, "
                      f"a ring of {tp.RING} buffers per side); each size checked before it was timed:", "",
                  "| pair | layouts | ceiling | " + " | ".join(f"{b / 2**20:g}" for b in sizes) + " |",
                  "|---|---|---|" + "---|" * len(sizes)]
        lines += [f"| {r['pair']} | {r['layouts']} | {r['ceiling_us']:.0f} | "
                  + " | ".join("CHECK FAILED" if r['chunk_bytes_us'][b] is None else f"{r['chunk_bytes_us'][b]:.0f}"
                               for b in sizes) + " |" for r in sweeps]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tp_nccl.json").write_text(json.dumps(dict(meta, rows=results), indent=1))
    (out / "tp_nccl.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="gloo on the CPU, tiny shapes (checks; times meaningless)")
    parser.add_argument("--profile", type=Path, default=None, help="torch.profiler traces of the one-layer rows")
    parser.add_argument("--only", nargs="*", default=None, help="pairs to run, e.g. TP1->TP2 TP4->TP1")
    args = parser.parse_args()
    cfg, backend = (SMOKE, "gloo") if args.smoke else (FULL, "nccl")
    if backend == "nccl" and torch.cuda.device_count() < 4:
        raise SystemExit(f"needs 4 GPUs, found {torch.cuda.device_count()}")
    mp.spawn(worker, args=(4, cfg, args.out, backend, args.profile, args.only), nprocs=4)


if __name__ == "__main__":
    main()
