"""Kernel benchmark: the decode update and the prefill conv, ours on SD and on DS pools, and the
peers on the same data in the same run: vLLM's Triton kernels (--peer-update / --peer-prefill
MODULE:FUNC with causal_conv1d_update's / causal_conv1d_fn's signatures; benchmarks/peers/fetch.py
extracts vLLM 0.33's) and FLA's causal_conv1d_update (--fla). First everything is checked on fresh
data: ours (SD and DS) against a float64 pure-torch step, SD and DS bit-identical, every peer
against ours; then everything is timed. Figures are fractions of the copy bandwidth measured in
the same run (bytes: every input read once, every output written once). Ours are the Triton
ops as users call them (custom ops launching their Triton kernels on CUDA).

    python benchmarks/kernels.py --out DIR             # checks, timings, kernels.json + kernels.md
    python benchmarks/kernels.py --sweep --out DIR     # first choose the DS block shapes and the prefill tile
    python benchmarks/kernels.py --profile             # one launch per case, for a profiler (ncu)
    TRITON_INTERPRET=1 python benchmarks/kernels.py --tiny --out DIR   # CPU dry run at tiny shapes
"""

import argparse
import importlib
import json
import os
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from layoutpass.kernels import conv_prefill, conv_update, triton_conv


@dataclass(frozen=True)
class Shapes:
    dim: int
    slots: int
    layers: int  # pools touched per CUDA-graph replay (so no decode call finds its state in L2)
    batches: tuple[int, ...]
    prefills: tuple[tuple[int, int], ...]  # (sequences, tokens each)
    device: str
    dtype: torch.dtype

    @property
    def elem(self) -> int:
        return torch.finfo(self.dtype).bits // 8


FULL = Shapes(8192, 4096, 8, (1, 16, 64, 256, 1024), ((8, 2048), (1, 16384)), "cuda", torch.bfloat16)
# The interpreter's dry run, in fp32: vLLM's kernels store fp32 into bf16 outputs, which a GPU
# converts and the interpreter writes as raw bits.
TINY = Shapes(64, 40, 2, (1, 5), ((2, 24), (1, 40)), "cpu", torch.float32)
S = FULL
WIDTH, ROUNDS = 4, 3
STATE_LEN = WIDTH - 1
FLA_NOTE = ("FLA keeps a dense (batch, dim, width) cache of the batch's own rows (no slot pool): a step reads "
            "its last width - 1 columns and writes all width (its bytes counted so); its kernel autotunes on "
            "(dim, width) only and is retuned here at each batch (its best case)")
VLLM_NOTE = ("vLLM's prefill is given the metadata its engine precomputes on the host (without it, "
             "causal_conv1d_fn reads the sequence lengths back from the device on every call)")


def bench_us(fn, graph: bool, rep: int = 100) -> float:
    """Median microseconds per fn() call: CUDA-graph replays or plain launches. On the CPU (the
    dry run) one timed call, which says nothing about speed."""
    if S.device == "cpu":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    fn()
    torch.cuda.synchronize()
    ms = do_bench_cudagraph(fn, rep=rep, return_mode="median") if graph else do_bench(fn, rep=rep,
                                                                                     return_mode="median")
    return ms * 1e3


def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy, bytes read + written."""
    src = torch.randn(1 << (29 if S.device == "cuda" else 20), device=S.device, dtype=S.dtype)
    dst = torch.empty_like(src)
    return 2 * src.numel() * S.elem / bench_us(lambda: dst.copy_(src), graph=False) / 1e3


def rand(*shape) -> torch.Tensor:
    return torch.randn(shape, device=S.device, dtype=S.dtype)


def stored(layout: str, logical: torch.Tensor) -> torch.Tensor:
    """A copy of a (slot, dim, state_len) pool stored in `layout`, as the op sees it."""
    if layout == "SD":
        return logical.transpose(1, 2).contiguous().transpose(1, 2)
    return logical.clone()


def make_pools(layout: str, count: int, batch: int = 0) -> list[torch.Tensor]:
    """`count` random pools stored in `layout`; "dense" is FLA's (batch, dim, width) cache."""
    if layout == "dense":
        return [rand(batch, S.dim, WIDTH) for _ in range(count)]
    return [stored(layout, rand(S.slots, S.dim, STATE_LEN)) for _ in range(count)]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected|| over the whole output (NaN, e.g. an unwritten poisoned
    element, fails). Elementwise bounds do not fit millions of bf16 outputs summed in another
    order: a rounding flip near a bf16 step moves an element by one step."""
    got, expected = got.double(), expected.double()
    error = ((got - expected).norm() / expected.norm()).item()
    assert error < 1e-2, f"relative error {error:.3g}"
    return error


def same_state(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert torch.equal(got, expected), f"{what}: state differs"


def ours_update(x, pool, weight, bias, idx, out):
    """Our decode step as users call it: the public op. The dry run calls its Triton function
    itself (on the CPU the op runs the pure-torch reference)."""
    if S.device == "cpu":
        return triton_conv.update(x, pool, weight, bias, "silu", idx, None, None, -1, 0, out)
    conv_update(x, pool, weight, bias, "silu", idx, out=out)


def ours_prefill(x, weight, bias, pool, qsl, idx, has_init):
    """Our prefill as users call it (the dry run: its Triton function, as ours_update)."""
    prefill = triton_conv.prefill if S.device == "cpu" else conv_prefill
    return prefill(x, weight, bias, pool, qsl, idx, has_init, "silu", 0)


def peer(spec: str | None):
    if not spec:
        return None
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


# ---------------------------------------------------------------- decode

def decode_case(batch: int, gen: random.Random):
    idx = torch.tensor(gen.sample(range(1, S.slots), batch), device=S.device, dtype=torch.int32)
    return idx, [rand(batch, S.dim) for _ in range(S.layers)], rand(S.dim, WIDTH), rand(S.dim)


def decode_impls(args, idx, weight, bias) -> dict:
    """(name, layout) -> call(x, pool, out) returning the output."""
    def ours(x, s, o):
        ours_update(x, s, weight, bias, idx, o)
        return o
    impls = {("ours", layout): ours for layout in ("SD", "DS")}
    update_peer = peer(args.peer_update)
    if update_peer:
        def vllm(x, s, o):
            update_peer(x, s, weight, bias, activation="silu", conv_state_indices=idx, out=o)
            return o
        impls.update({(args.peer_label, layout): vllm for layout in ("SD", "DS")})
    if args.fla:
        from fla.modules.causal_conv1d import causal_conv1d_update as fla_update

        impls[("FLA", "dense")] = lambda x, s, o: fla_update(x, s, weight=weight, bias=bias, activation="silu")[0]
    return impls


def retune_fla() -> None:
    """FLA's update kernel autotunes on (dim, width) alone, so it keeps the block it chose at its
    first call whatever the batch. Forget the choice: each batch is timed with the block tuned
    for it (FLA's best case; its on-disk cache of choices is off, FLA_CACHE_RESULTS=0)."""
    from fla.modules.causal_conv1d import ops
    from triton.runtime.autotuner import Autotuner

    tuner = ops.causal_conv1d_update_kernel
    while not isinstance(tuner, Autotuner):
        tuner = tuner.fn
    tuner.cache.clear()


def reference_update(x, pool, weight, bias, idx):
    """The decode step in float64, pure torch (one token, no spec, no null slots): the output
    and the new pool (logical order)."""
    window = torch.cat([pool[idx].double(), x.double().unsqueeze(-1)], -1)
    new_pool = pool.clone()
    new_pool[idx] = window[..., 1:].to(pool.dtype)
    return F.silu((window * weight.double()).sum(-1) + bias.double()), new_pool


def guarded(result: dict, failed: set, key: tuple, label: str, check) -> None:
    """result[label] = check(); a failed check is recorded (and its implementation left out of
    the timings) instead of ending the run."""
    try:
        result[label] = check()
    except AssertionError as error:
        result[label] = f"FAILED: {error}"
        failed.add(key)
        print(f"check failed: {key} {label}: {error}", flush=True)


def check_decode(args, batch: int, gen: random.Random, failed: set) -> dict:
    """On fresh data, one initial state for all: ours (SD, DS) against the float64 step (states
    exact), ours SD == DS (bits), every peer against ours (FLA's dense window built from the
    same history: its column 0 is dropped by the step)."""
    work = f"decode B={batch}"
    idx, xs, weight, bias = decode_case(batch, gen)
    x, start = xs[0], make_pools("DS", 1)[0]
    expected, expected_pool = reference_update(x, start, weight, bias, idx)
    result, ours = {}, {}
    for (name, layout), call in decode_impls(args, idx, weight, bias).items():
        def check():
            poisoned = torch.full_like(x, float("nan"))
            if layout == "dense":
                window = torch.cat([rand(batch, S.dim, 1), start[idx]], -1)
                out = call(x.clone(), window, poisoned)
                same_state(window[..., 1:], expected_pool[idx], "FLA")
                return relative_error(out, ours["DS"])
            pool = stored(layout, start)
            out = call(x.clone(), pool, poisoned)
            if name == "ours":
                ours[layout] = out
            same_state(pool, expected_pool, f"{name} {layout}")
            return relative_error(out, expected if name == "ours" else ours[layout])
        label = ("FLA vs ours DS" if layout == "dense" else
                 f"ours {layout} vs float64" if name == "ours" else f"{name} {layout} vs ours")
        guarded(result, failed, (work, name, layout), label, check)
    result["ours SD == DS (bits)"] = torch.equal(ours["SD"], ours["DS"])
    return result


def decode_bytes(batch: int, layout: str) -> int:
    cols = STATE_LEN + WIDTH if layout == "dense" else 2 * STATE_LEN
    return batch * (cols * S.dim + 2 * S.dim) * S.elem + (WIDTH + 1) * S.dim * S.elem


def time_decode(call, pools, xs, outs, rep: int = 200) -> float:
    """Microseconds per call: one CUDA-graph replay calls every layer's pool once (L2-cold)."""
    def step():
        for layer in range(S.layers):
            call(xs[layer], pools[layer], outs[layer])
    return bench_us(step, graph=True, rep=rep) / S.layers


def bench_decode(args, bw, rows, gen, failed: set):
    for batch in S.batches:
        idx, xs, weight, bias = decode_case(batch, gen)
        outs = [torch.empty_like(x) for x in xs]
        impls = {key: call for key, call in decode_impls(args, idx, weight, bias).items()
                 if (f"decode B={batch}", *key) not in failed}
        pools = {layout: make_pools(layout, S.layers, batch) for layout in {layout for _, layout in impls}}
        if args.fla:
            retune_fla()
        times = {key: [] for key in impls}
        for _ in range(ROUNDS):
            for (name, layout), call in impls.items():
                times[(name, layout)].append(time_decode(call, pools[layout], xs, outs))
        for (name, layout), ts in times.items():
            us = statistics.median(ts)
            rows.append(dict(work=f"decode B={batch}", impl=name, layout=layout, us=us, runs_us=ts,
                             frac_bw=decode_bytes(batch, layout) / (us * 1e-6) / 1e9 / bw, timing="cudagraph"))
        print(f"decode B={batch}: " + ", ".join(f"{n} {l} {statistics.median(t):.2f} us"
                                                for (n, l), t in times.items()), flush=True)


# ---------------------------------------------------------------- prefill

def prefill_case(batch: int, length: int, gen: random.Random):
    tokens = batch * length
    x = rand(tokens, S.dim).t()  # vLLM's buffer: (dim, tokens), tokens-major in memory
    idx = torch.tensor(gen.sample(range(1, S.slots), batch), device=S.device, dtype=torch.int32)
    has_init = torch.tensor([gen.random() < 0.5 for _ in range(batch)], device=S.device)
    qsl = torch.arange(0, tokens + 1, length, device=S.device, dtype=torch.int32)
    return x, rand(S.dim, WIDTH), rand(S.dim), idx, has_init, qsl


def vllm_metadata(module, lengths: list[int], device):
    """What vLLM's engine passes causal_conv1d_fn as `metadata` (computed on the host from the
    CPU copy of query_start_loc): for its BLOCK_M of 8 tokens, the sequence and chunk of each
    program."""
    chunks = [-(-n // 8) for n in lengths]
    owner = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(chunks)).to(torch.int32)
    offset = torch.cat([torch.arange(n) for n in chunks]).to(torch.int32)
    pad = lambda t: torch.cat([t, torch.full((max(1024, len(t)) * 2 - len(t),), module.PAD_SLOT_ID,
                                             dtype=torch.int32)]).to(device)
    entry = dict(nums=torch.tensor(chunks), tot=sum(chunks), mlist=owner, mlist_len=len(owner), offsetlist=offset,
                 batch_ptr=pad(owner), token_chunk_offset_ptr=pad(offset))
    return SimpleNamespace(nums_dict={8: entry}, batch_ptr=entry["batch_ptr"],
                           token_chunk_offset_ptr=entry["token_chunk_offset_ptr"])


def prefill_impls(args, x, weight, bias, idx, has_init, qsl) -> dict:
    """name -> call(pool) returning the output; every one runs on SD and DS pools."""
    impls = {"ours": lambda s: ours_prefill(x, weight, bias, s, qsl, idx, has_init)}
    for spec in args.prefill_variant:
        variant = peer(spec)
        impls[spec.split(":")[1]] = lambda s, variant=variant: variant(x, weight, bias, s, qsl, idx, has_init, "silu")
    prefill_peer = peer(args.peer_prefill)
    if prefill_peer:
        lengths = qsl.diff().tolist()
        meta = vllm_metadata(importlib.import_module(args.peer_prefill.split(":")[0]), lengths, x.device)
        impls[args.peer_label] = lambda s: prefill_peer(x, weight, bias, conv_states=s, query_start_loc=qsl,
                                                        cache_indices=idx, has_initial_state=has_init,
                                                        activation="silu", metadata=meta)
    return impls


def reference_prefill(x, weight, bias, pool, length, idx, has_init):
    """Equal-length sequences in float64, pure torch: the output and the new pool."""
    batch = idx.shape[0]
    xs = x.view(S.dim, batch, length).permute(1, 0, 2).double()
    full = torch.cat([pool[idx].double() * has_init[:, None, None], xs], -1)
    y = bias.double()[:, None] + sum(full[..., k:k + length] * weight.double()[:, k, None] for k in range(WIDTH))
    new_pool = pool.clone()
    new_pool[idx] = full[..., -STATE_LEN:].to(pool.dtype)
    return F.silu(y).permute(1, 0, 2).reshape(S.dim, -1), new_pool


def check_prefill(args, batch: int, length: int, gen: random.Random, failed: set) -> dict:
    """On fresh data, one initial state for all: ours (SD, DS) against the float64 prefill
    (states exact), SD == DS (bits), variants bit-identical to ours, the peer against ours."""
    work = f"prefill {batch} x {length}"
    case = prefill_case(batch, length, gen)
    x, weight, bias, idx, has_init, _ = case
    start = make_pools("DS", 1)[0]
    expected, expected_pool = reference_prefill(x, weight, bias, start, length, idx, has_init)
    result, ours = {}, {}
    for name, call in prefill_impls(args, *case).items():
        for layout in ("SD", "DS"):
            def check():
                pool = stored(layout, start)
                got = call(pool)
                if name == "ours":
                    ours[layout] = got
                same_state(pool, expected_pool, f"{name} {layout}")
                if name in ("ours", args.peer_label):
                    return relative_error(got, expected if name == "ours" else ours[layout])
                assert torch.equal(got, ours[layout]), f"variant {name} differs from ours"
                return True
            label = (f"ours {layout} vs float64" if name == "ours" else f"{name} {layout} vs ours"
                     if name == args.peer_label else f"{name} {layout} == ours (bits)")
            guarded(result, failed, (work, name, layout), label, check)
    result["ours SD == DS (bits)"] = torch.equal(ours["SD"], ours["DS"])
    return result


def bench_prefill(args, bw, rows, gen, failed: set):
    """Each prefill twice: in CUDA graphs (the GPU's time: what a captured step pays) and as
    plain launches (eager: the host's work per call shows wherever it exceeds the GPU's)."""
    for batch, length in S.prefills:
        work = f"prefill {batch} x {length}"
        impls = prefill_impls(args, *prefill_case(batch, length, gen))
        pools = {layout: make_pools(layout, 1)[0] for layout in ("SD", "DS")}
        times = {(name, layout, graph): [] for name in impls for layout in pools for graph in (True, False)
                 if (work, name, layout) not in failed}
        for _ in range(ROUNDS):
            for (name, layout, graph), ts in times.items():
                ts.append(bench_us(lambda: impls[name](pools[layout]), graph=graph, rep=50))
        moved = 2 * batch * length * S.dim * S.elem + 2 * batch * STATE_LEN * S.dim * S.elem
        for (name, layout, graph), ts in times.items():
            us = statistics.median(ts)
            rows.append(dict(work=work + ("" if graph else ", eager"), impl=name, layout=layout, us=us, runs_us=ts,
                             frac_bw=moved / (us * 1e-6) / 1e9 / bw, timing="cudagraph" if graph else "launches"))
        print(f"{work}: " + ", ".join(f"{n} {l} {'graph' if g else 'eager'} {statistics.median(t):.1f} us"
                                      for (n, l, g), t in times.items()), flush=True)


# ---------------------------------------------------------------- sweep, compile check, profile

def sweep(gen, log) -> None:
    """Time the DS decode candidates per batch (the shipped table's entry, and the vec path's
    block shapes, sequences per program and programmatic dependent launch) and the prefill
    tiles, then put the winners in the kernels' tables (the benchmark that follows uses them;
    commit them). The SD table is kept."""
    table, pdl_wins = [], 0
    for batch in S.batches:
        idx, xs, weight, bias = decode_case(batch, gen)
        outs = [torch.empty_like(x) for x in xs]
        pools = make_pools("DS", S.layers)
        shipped = triton_conv._update_config(True, batch)
        candidates = [(*shipped, False)] + [
            (block, seqs, warps, "vec", pdl) for block in (256, 512, 1024) for warps in (1, 2, 4)
            for seqs in (1, 2, 4) for pdl in (False, True) if block >= 256 * warps and seqs <= batch]
        results = []
        for block, seqs, warps, path, pdl in candidates:
            triton_conv.UPDATE_BLOCKS[True] = [(1 << 62, block, seqs, warps, path)]
            triton_conv.PDL = pdl
            call = lambda x, s, o: ours_update(x, s, weight, bias, idx, o)
            results.append((time_decode(call, pools, xs, outs, rep=50), block, seqs, warps, path, pdl))
        results.sort()
        log(f"sweep decode DS B={batch}: " + "; ".join(f"{r[0]:.2f} us {r[1:]}" for r in results[:6]) +
            f"; shipped {shipped}: {next(r[0] for r in results if r[1:] == (*shipped, False)):.2f} us")
        us, *config, pdl = results[0]
        pdl_wins += pdl
        table.append((batch, *config))
    table[-1] = (1 << 62, *table[-1][1:])
    triton_conv.UPDATE_BLOCKS[True] = table
    triton_conv.PDL = pdl_wins > len(S.batches) // 2
    x, weight, bias, idx, has_init, qsl = prefill_case(*S.prefills[0], gen)
    (pool,) = make_pools("DS", 1)
    results = []
    for tile in ((64, 64, 8), (32, 128, 4), (64, 128, 8), (16, 256, 4), (32, 256, 8), (16, 512, 8)):
        triton_conv.PREFILL_BLOCKS[False] = tile
        results.append((bench_us(lambda: ours_prefill(x, weight, bias, pool, qsl, idx, has_init), graph=False), *tile))
    results.sort()
    triton_conv.PREFILL_BLOCKS[False] = tuple(results[0][1:])
    log(f"sweep prefill {S.prefills[0]} DS: " + "; ".join(f"{r[0]:.1f} us {r[1:]}" for r in results))
    log(f"UPDATE_BLOCKS[True] = {triton_conv.UPDATE_BLOCKS[True]}\nPDL = {triton_conv.PDL}\n"
        f"PREFILL_BLOCKS = {triton_conv.PREFILL_BLOCKS}")


def check_compiled(gen) -> str:
    """torch.compile(fullgraph=True) of a DS decode step through the public op gives eager's
    bits (smallest and largest batch; inductor launches our kernels itself, PDL included)."""
    results = []
    for batch in (S.batches[0], S.batches[-1]):
        idx, xs, weight, bias = decode_case(batch, gen)
        (pool,) = make_pools("DS", 1)
        step = lambda x, s: conv_update(x, s, weight, bias, "silu", idx, out=torch.empty_like(x))
        try:
            got = torch.compile(step, fullgraph=True)(xs[0].clone(), compiled_pool := pool.clone())
        except Exception as error:  # reported in the results, not raised: the timings still run
            return f"torch.compile failed at B={batch}: {type(error).__name__}: {str(error)[:300]}"
        eager_pool = pool.clone()
        results.append(torch.equal(got, step(xs[0].clone(), eager_pool)) and torch.equal(compiled_pool, eager_pool))
    batches = f"B={S.batches[0]} and B={S.batches[-1]}"
    return f"torch.compile == eager (bits) at {batches}" if all(results) else f"torch.compile differs: {results}"


def profile(args, gen) -> None:
    """One launch per case and nothing else of ours or the peers' (for ncu's kernel filter):
    ours DS decode at every batch, ours SD decode at the largest, the peer's SD decode at the
    two smallest, and the first prefill on a DS pool (ours, each variant, the peer). Prints
    which launch is which."""
    cases = [("ours", "DS", b) for b in S.batches] + [("ours", "SD", S.batches[-1])]
    cases += [(args.peer_label, "SD", b) for b in S.batches[:2] if args.peer_update]
    for name, layout, batch in cases:
        idx, xs, weight, bias = decode_case(batch, gen)
        call = decode_impls(args, idx, weight, bias)[(name, layout)]
        (pool,) = make_pools(layout, 1)
        call(xs[0], pool, torch.empty_like(xs[0]))
        torch.cuda.synchronize() if S.device == "cuda" else None
        print(f"profiled: decode B={batch} {name} {layout}", flush=True)
    batch, length = S.prefills[0]
    for name, call in prefill_impls(args, *prefill_case(batch, length, gen)).items():
        (pool,) = make_pools("DS", 1)
        call(pool)
        torch.cuda.synchronize() if S.device == "cuda" else None
        print(f"profiled: prefill {batch} x {length} {name} DS", flush=True)


# ---------------------------------------------------------------- report

def wide_table(rows: list[dict], peer_label: str) -> list[str]:
    """One line per work, one column per implementation and pool (the issue's table)."""
    columns = [(peer_label, "SD"), (peer_label, "DS"), ("FLA", "dense"), ("ours", "SD"), ("ours", "DS")]
    columns += [(r["impl"], r["layout"]) for r in rows]
    columns = [c for c in dict.fromkeys(columns) if any((r["impl"], r["layout"]) == c for r in rows)]
    names = {"dense": "dense (B, D, 4)"}
    lines = ["| us (% of copy bw) | " + " | ".join(f"{i} {names.get(l, l)}" for i, l in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for work in dict.fromkeys(r["work"] for r in rows):
        cells = {(r["impl"], r["layout"]): r for r in rows if r["work"] == work}
        lines.append(f"| {work} | " + " | ".join(
            f"{cells[c]['us']:.2f} ({100 * cells[c]['frac_bw']:.0f}%)" if c in cells else "-" for c in columns) + " |")
    return lines


def report(args, card: str, bw: float, rows: list[dict], checks: list[dict], log_lines: list[str]) -> list[str]:
    meta = dict(card=card, torch=torch.__version__, triton=triton.__version__, copy_bw_gbs=round(bw),
                update_blocks={str(k): v for k, v in triton_conv.UPDATE_BLOCKS.items()}, pdl=triton_conv.PDL,
                prefill_blocks={str(k): v for k, v in triton_conv.PREFILL_BLOCKS.items()},
                dim=S.dim, width=WIDTH, slots=S.slots, dtype=str(S.dtype), layers_per_replay=S.layers, rounds=ROUNDS,
                peers=dict(update=args.peer_update, prefill=args.peer_prefill, label=args.peer_label, fla=args.fla,
                           prefill_variants=args.prefill_variant))
    (args.out / "kernels.json").write_text(json.dumps(dict(meta, rows=rows, checks=checks), indent=1))
    lines = [f"Card: {card}; torch {torch.__version__}; triton {triton.__version__}; copy bandwidth {bw:.0f} GB/s "
             f"(bytes read + written), measured in this run. {S.dtype}, dim {S.dim}, width {WIDTH}, pools of {S.slots} "
             f"slots, random slots; decode: CUDA-graph replays calling the kernel once per layer over {S.layers} "
             f"layers' pools (L2-cold), time per call; prefill: CUDA-graph replays, and (eager) plain launches "
             f"(do_bench, L2 flushed), where host work per call shows if it exceeds the GPU's; median of "
             f"{ROUNDS} interleaved rounds. Ours: the public ops (conv_update, conv_prefill). Every "
             "implementation checked before timing (below; kernels.json: checks).", ""]
    lines += wide_table(rows, args.peer_label)
    lines += [""] + ([f"FLA: {FLA_NOTE}."] if args.fla else []) + ([f"{VLLM_NOTE}."] if args.peer_prefill else [])
    lines += [f"Prefill variant {spec.split(':')[1]} ({spec}, checked bit-identical to ours): "
              f"{peer(spec).__doc__.strip()}" for spec in args.prefill_variant]
    lines += ["", "| checks (relative error of the whole output; states compared exactly) |", "|---|"]
    lines += [f"| {c['work']}: " + ", ".join(f"{k} {v if isinstance(v, (bool, str)) else f'{v:.2g}'}"
                                              for k, v in c.items() if k != "work") + " |" for c in checks]
    (args.out / "kernels.md").write_text("\n".join(lines) + "\n")
    (args.out / "bench.log").write_text("\n".join(log_lines) + "\n")
    return lines


def main():
    global S
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--profile", action="store_true", help="one launch per case, for ncu; no timing, no files")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (needs TRITON_INTERPRET=1)")
    parser.add_argument("--peer-update", help="MODULE:FUNC with causal_conv1d_update's signature")
    parser.add_argument("--peer-prefill", help="MODULE:FUNC with causal_conv1d_fn's signature (and its metadata)")
    parser.add_argument("--peer-label", default="vLLM", help="the peer's name in the tables")
    parser.add_argument("--fla", action="store_true", help="FLA's causal_conv1d_update (fla-core installed)")
    parser.add_argument("--prefill-variant", action="append", default=[],
                        help="MODULE:FUNC with conv_prefill's signature: checked bit-identical to ours, timed")
    parser.add_argument("--no-compile-check", action="store_true", help="skip the torch.compile bit check")
    args = parser.parse_args()
    if args.tiny:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--tiny runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
        S = TINY
        from triton.runtime.autotuner import Autotuner  # no timer in the interpreter: autotuned peers

        Autotuner._bench = lambda self, *a, config, **kw: [0.0, 0.0, 0.0]  # (FLA) take their first config
        if args.peer_prefill:  # its grid function swaps launch arguments, which the interpreter does not carry
            print("dry run: vLLM's causal_conv1d_fn runs on a GPU only; its prefill is left out")
            args.peer_prefill = None
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or --tiny under TRITON_INTERPRET=1 for a dry run")
    os.environ.setdefault("FLA_CACHE_RESULTS", "0")  # read when fla is imported (see retune_fla)
    gen = random.Random(0)
    torch.manual_seed(0)
    if args.profile:
        return profile(args, gen)
    card = torch.cuda.get_device_name() if S.device == "cuda" else "CPU, Triton interpreter (dry run: no timing)"
    bw = copy_bandwidth()
    args.out.mkdir(parents=True, exist_ok=True)
    log_lines = []

    def log(line):
        log_lines.append(line)
        print(line, flush=True)

    log(f"{card}, torch {torch.__version__}, triton {triton.__version__}: copy bandwidth {bw:.0f} GB/s")
    if args.sweep:
        sweep(gen, log)
    failed = set()  # (work, implementation, layout) whose check failed: not timed
    checks = [dict(work=f"decode B={b}", **check_decode(args, b, gen, failed)) for b in S.batches]
    checks += [dict(work=f"prefill {b} x {n}", **check_prefill(args, b, n, gen, failed)) for b, n in S.prefills]
    if S.device == "cuda" and not args.no_compile_check:
        checks.append(dict(work="torch.compile", result=check_compiled(gen)))
    for c in checks:
        log(f"checked {c}")
    rows = []
    bench_decode(args, bw, rows, gen, failed)
    bench_prefill(args, bw, rows, gen, failed)
    print("\n".join(report(args, card, bw, rows, checks, log_lines)))


if __name__ == "__main__":
    main()
