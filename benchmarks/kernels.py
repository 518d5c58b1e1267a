"""Kernel benchmark on a CUDA card: the decode update and the prefill conv, ours with SD and
with DS pools, against a pure-torch path, torch.compile of it, and optional peers
(--peer-update / --peer-prefill MODULE:FUNC with vLLM's signatures), each as a fraction of
the device copy bandwidth measured in the same run (../shared/PERFORMANCE.md).

    python benchmarks/kernels.py --out DIR            # table + kernels.json + kernels.md
    python benchmarks/kernels.py --sweep --out DIR    # first choose the block shapes, then the same
"""

import argparse
import importlib
import json
import random
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from layoutpass.kernels import conv_prefill, conv_update, triton_conv

DIM, WIDTH, SLOTS, LAYERS, DTYPE = 8192, 4, 4096, 8, torch.bfloat16
STATE_LEN = WIDTH - 1
BATCHES = (1, 16, 64, 256, 1024)
PREFILLS = ((8, 2048), (64, 256), (1, 16384))
ROUNDS = 3
ELEM = torch.finfo(DTYPE).bits // 8


def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy, bytes read + written."""
    src = torch.randn(1 << 29, device="cuda", dtype=DTYPE)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * ELEM / ms / 1e6


def make_pools(layout: str, count: int) -> list[torch.Tensor]:
    """`count` random pools stored in `layout`, as (slot, dim, state_len) views."""
    shape = (SLOTS, STATE_LEN, DIM) if layout == "SD" else (SLOTS, DIM, STATE_LEN)
    pools = [torch.randn(shape, device="cuda", dtype=DTYPE) for _ in range(count)]
    return [p.transpose(1, 2) if layout == "SD" else p for p in pools]


def torch_update(x, state, weight, bias, idx):
    """The pure-torch decode step (one token, no spec, no null slots): gather, cat, scatter."""
    window = torch.cat([state[idx], x.unsqueeze(-1)], -1)
    state[idx] = window[..., 1:]
    return F.silu((window.float() * weight.float()).sum(-1) + bias.float()).to(x.dtype)


def torch_prefill(x, weight, bias, state, lens, idx, has_init):
    """The pure-torch prefill for equal-length sequences: F.conv1d over [initial state | x]."""
    batch, length = len(lens), lens[0]
    xs = x.view(DIM, batch, length).permute(1, 0, 2)
    init = state[idx] * has_init.to(x.dtype)[:, None, None]
    full = torch.cat([init, xs], -1)
    y = F.conv1d(full.float(), weight.float()[:, None, :], bias.float(), groups=DIM)[..., -length:]
    state[idx] = full[..., -STATE_LEN:]
    return F.silu(y).permute(1, 0, 2).reshape(DIM, -1).to(x.dtype)


def peer(spec: str | None):
    if not spec:
        return None
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def decode_case(batch: int, gen: random.Random):
    idx = torch.tensor(gen.sample(range(1, SLOTS), batch), device="cuda", dtype=torch.int32)
    xs = [torch.randn(batch, DIM, device="cuda", dtype=DTYPE) for _ in range(LAYERS)]
    weight = torch.randn(DIM, WIDTH, device="cuda", dtype=DTYPE)
    bias = torch.randn(DIM, device="cuda", dtype=DTYPE)
    return idx, xs, weight, bias


def decode_impls(args, idx, weight, bias):
    """name -> (layout, call(x, state, out) -> output, graphable)."""
    update_peer = peer(args.peer_update)
    impls = {
        "ours": lambda x, s, o: conv_update(x, s, weight, bias, "silu", idx, out=o),
        "torch": lambda x, s, o: torch_update(x, s, weight, bias, idx),
        "torch.compile": lambda x, s, o: compiled_update(x, s, weight, bias, idx),
    }
    if update_peer:
        impls["peer"] = lambda x, s, o: update_peer(x, s, weight, bias, activation="silu", conv_state_indices=idx)
    return impls


torch._dynamo.config.cache_size_limit = 64  # one compile per batch size and pool layout
compiled_update = torch.compile(torch_update, dynamic=False)
compiled_prefill = torch.compile(torch_prefill, dynamic=False)


def check_decode(args, name, batch, gen):
    """The implementation against the pure-torch step on fresh data, before any timing."""
    idx, xs, weight, bias = decode_case(batch, gen)
    call = decode_impls(args, idx, weight, bias)[name]
    for layout in ("SD", "DS"):
        (state,) = make_pools(layout, 1)
        expected_state = state.clone()
        expected = torch_update(xs[0].clone(), expected_state, weight, bias, idx)
        got = call(xs[0].clone(), state, torch.empty_like(xs[0]))
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(state.float(), expected_state.float(), rtol=0, atol=0)


def time_decode(call, pools, xs, outs, graph: bool, rep: int = 200) -> float:
    """Microseconds per call: one replay calls every layer's pool once (L2-cold pools)."""
    def step():
        for layer in range(LAYERS):
            call(xs[layer], pools[layer], outs[layer])
    step()
    torch.cuda.synchronize()
    ms = do_bench_cudagraph(step, rep=rep, return_mode="median") if graph else do_bench(step, return_mode="median")
    return ms * 1e3 / LAYERS


def bench_decode(args, bw, rows, gen):
    for batch in BATCHES:
        idx, xs, weight, bias = decode_case(batch, gen)
        outs = [torch.empty_like(x) for x in xs]
        impls = decode_impls(args, idx, weight, bias)
        for name in impls:
            check_decode(args, name, batch, gen)
        layouts = {name: (("SD", "DS") if name in ("ours", "peer") else ("DS",)) for name in impls}
        pools = {layout: make_pools(layout, LAYERS) for layout in ("SD", "DS")}
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(ROUNDS):
            for name, call in impls.items():
                for layout in layouts[name]:
                    graph = name in ("ours", "peer")
                    times.setdefault((name, layout), []).append(time_decode(call, pools[layout], xs, outs, graph))
        moved = batch * (2 * STATE_LEN * DIM + 2 * DIM) * ELEM + (WIDTH + 1) * DIM * ELEM
        for (name, layout), ts in times.items():
            us = statistics.median(ts)
            rows.append(dict(work=f"decode B={batch}", impl=name, layout=layout, us=us,
                             frac_bw=moved / (us * 1e-6) / 1e9 / bw, timing="cudagraph" if name in ("ours", "peer") else "launches"))


def bench_prefill(args, bw, rows, gen):
    prefill_peer = peer(args.peer_prefill)
    for batch, length in PREFILLS:
        tokens = batch * length
        x = torch.randn(tokens, DIM, device="cuda", dtype=DTYPE).t()  # vLLM's tokens-major buffer
        weight = torch.randn(DIM, WIDTH, device="cuda", dtype=DTYPE)
        bias = torch.randn(DIM, device="cuda", dtype=DTYPE)
        idx = torch.tensor(gen.sample(range(1, SLOTS), batch), device="cuda", dtype=torch.int32)
        has_init = torch.tensor([gen.random() < 0.5 for _ in range(batch)], device="cuda")
        qsl = torch.arange(0, tokens + 1, length, device="cuda", dtype=torch.int32)
        lens = [length] * batch
        impls = {
            "ours": lambda s: conv_prefill(x, weight, bias, s, qsl, idx, has_init, "silu"),
            "torch": lambda s: torch_prefill(x, weight, bias, s, lens, idx, has_init),
            "torch.compile": lambda s: compiled_prefill(x, weight, bias, s, lens, idx, has_init),
        }
        if prefill_peer:
            impls["peer"] = lambda s: prefill_peer(x, weight, bias, conv_states=s, query_start_loc=qsl,
                                                   cache_indices=idx, has_initial_state=has_init, activation="silu")
        for name, call in impls.items():
            for layout in ("SD", "DS"):
                (state,) = make_pools(layout, 1)
                expected_state = state.clone()
                expected = torch_prefill(x, weight, bias, expected_state, lens, idx, has_init)
                got = call(state)
                torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
                torch.testing.assert_close(state.float(), expected_state.float(), rtol=0, atol=0)
        pools = {layout: make_pools(layout, 1)[0] for layout in ("SD", "DS")}
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(ROUNDS):
            for name, call in impls.items():
                for layout in (("SD", "DS") if name in ("ours", "peer") else ("DS",)):
                    ms = do_bench(lambda: call(pools[layout]), return_mode="median")
                    times.setdefault((name, layout), []).append(ms * 1e3)
        moved = 2 * tokens * DIM * ELEM + 2 * batch * STATE_LEN * DIM * ELEM
        for (name, layout), ts in times.items():
            us = statistics.median(ts)
            rows.append(dict(work=f"prefill {batch} x {length}", impl=name, layout=layout, us=us,
                             frac_bw=moved / (us * 1e-6) / 1e9 / bw, timing="launches"))


def sweep(gen) -> None:
    """Time every decode block shape per layout and batch and every prefill tile, then put the
    winners in the kernels' tables (the benchmark that follows uses them; commit them)."""
    for flat, layout in ((False, "SD"), (True, "DS")):
        table = []
        for batch in BATCHES:
            idx, xs, weight, bias = decode_case(batch, gen)
            outs = [torch.empty_like(x) for x in xs]
            pools = make_pools(layout, LAYERS)
            results = []
            for block in (128, 256, 512):
                for seqs in (s for s in (1, 4) if s <= batch):
                    for warps in (1, 2, 4):
                        for path in (("rows", "flat", "tiled") if flat else ("tiled",)):
                            if path == "rows" and seqs > 1:
                                continue  # one sequence per program on that path
                            triton_conv.UPDATE_BLOCKS[flat] = [(1 << 62, block, seqs, warps, path)]
                            call = lambda x, s, o: conv_update(x, s, weight, bias, "silu", idx, out=o)
                            us = time_decode(call, pools, xs, outs, True, rep=50)
                            results.append((us, block, seqs, warps, path))
            us, *config = min(results)
            table.append((batch, *config))
            print(f"sweep decode {layout} B={batch}: {us:.2f} us with (BLOCK_D, SEQS, warps, path)={tuple(config)}",
                  flush=True)
        table[-1] = (1 << 62, *table[-1][1:])
        triton_conv.UPDATE_BLOCKS[flat] = table
    x = torch.randn(8 * 2048, DIM, device="cuda", dtype=DTYPE).t()
    weight, bias = torch.randn(DIM, WIDTH, device="cuda", dtype=DTYPE), torch.randn(DIM, device="cuda", dtype=DTYPE)
    idx = torch.tensor(gen.sample(range(1, SLOTS), 8), device="cuda", dtype=torch.int32)
    qsl = torch.arange(0, 8 * 2048 + 1, 2048, device="cuda", dtype=torch.int32)
    (state,) = make_pools("DS", 1)
    results = []
    for bt, bd in ((16, 128), (32, 128), (32, 256), (64, 128), (16, 256), (8, 512), (64, 64), (128, 64)):
        for warps in (4, 8):
            triton_conv.PREFILL_BLOCKS[False] = (bt, bd, warps)
            ms = do_bench(lambda: conv_prefill(x, weight, bias, state, qsl, idx, None, "silu"), return_mode="median")
            results.append((ms * 1e3, bt, bd, warps))
    us, *best = min(results)
    triton_conv.PREFILL_BLOCKS[False] = tuple(best)
    print(f"sweep prefill 8x2048 DS: {us:.1f} us with (BLOCK_T, BLOCK_D, warps)={tuple(best)}", flush=True)
    print(f"UPDATE_BLOCKS = {triton_conv.UPDATE_BLOCKS}\nPREFILL_BLOCKS = {triton_conv.PREFILL_BLOCKS}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--peer-update", help="MODULE:FUNC with causal_conv1d_update's signature")
    parser.add_argument("--peer-prefill", help="MODULE:FUNC with causal_conv1d_fn's signature")
    args = parser.parse_args()
    gen = random.Random(0)
    torch.manual_seed(0)
    card = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"{card}, torch {torch.__version__}, triton {triton.__version__}: copy bandwidth {bw:.0f} GB/s", flush=True)
    if args.sweep:
        sweep(gen)
    rows = []
    bench_decode(args, bw, rows, gen)
    bench_prefill(args, bw, rows, gen)
    meta = dict(card=card, torch=torch.__version__, triton=triton.__version__, copy_bw_gbs=round(bw),
                update_blocks={str(k): v for k, v in triton_conv.UPDATE_BLOCKS.items()},
                prefill_blocks={str(k): v for k, v in triton_conv.PREFILL_BLOCKS.items()},
                dim=DIM, width=WIDTH, slots=SLOTS, dtype=str(DTYPE), layers_per_replay=LAYERS, rounds=ROUNDS)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(dict(meta, rows=rows), indent=1))
    lines = [f"Card: {card}; torch {torch.__version__}; triton {triton.__version__}; copy bandwidth {bw:.0f} GB/s "
             f"(bytes read + written). bf16, dim {DIM}, width {WIDTH}, pools of {SLOTS} slots, random slots; "
             f"decode timed per call over {LAYERS} layers' pools (L2-cold); median of {ROUNDS} interleaved rounds.",
             "", "| work | impl | pool | time (us) | of copy bw | timing |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['work']} | {r['impl']} | {r['layout']} | {r['us']:.1f} | {100 * r['frac_bw']:.0f}% | {r['timing']} |"
              for r in rows]
    (args.out / "kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
