"""Kernel benchmark on a CUDA card: the decode update and the prefill conv, ours with SD and
with DS pools, and the peers in the same run on the same data: vLLM's Triton kernels
(--peer-update / --peer-prefill MODULE:FUNC, functions with causal_conv1d_update's /
causal_conv1d_fn's signatures; benchmarks/peers/fetch.py extracts vLLM 0.33's) and FLA's
causal_conv1d_update (--fla; fla-core must be importable). Every implementation is checked
against ours (and ours against a pure-torch step) before it is timed. Figures are fractions of
the device copy bandwidth measured in the same run (the fewest bytes: every input read once, every output written once).

    python benchmarks/kernels.py --out DIR            # tables + kernels.json + kernels.md
    python benchmarks/kernels.py --sweep --out DIR    # first choose the DS block shapes, then the same
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
FLA_NOTE = ("FLA keeps a dense (batch, dim, width) cache of the batch's own rows (no slot pool): a step reads "
            "its last width - 1 columns and writes all width (its bytes counted so)")


def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy, bytes read + written."""
    src = torch.randn(1 << 29, device="cuda", dtype=DTYPE)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * ELEM / ms / 1e6


def make_pools(layout: str, count: int, batch: int = 0) -> list[torch.Tensor]:
    """`count` random pools stored in `layout` as the op sees them: (slot, dim, state_len)
    views; "dense" is FLA's (batch, dim, width) cache."""
    shape = {"SD": (SLOTS, STATE_LEN, DIM), "DS": (SLOTS, DIM, STATE_LEN), "dense": (batch, DIM, WIDTH)}[layout]
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


def decode_impls(args, idx, weight, bias) -> dict:
    """name -> (pool layouts, call(x, pool, out) writing out)."""
    impls = {"ours": (("SD", "DS"), lambda x, s, o: conv_update(x, s, weight, bias, "silu", idx, out=o))}
    update_peer = peer(args.peer_update)
    if update_peer:
        impls[args.peer_label] = (("SD", "DS"), lambda x, s, o: update_peer(
            x, s, weight, bias, activation="silu", conv_state_indices=idx, out=o))
    if args.fla:
        from fla.modules.causal_conv1d import causal_conv1d_update as fla_update

        impls["FLA"] = (("dense",), lambda x, s, o: o.copy_(fla_update(x, s, weight=weight, bias=bias,
                                                                        activation="silu")[0]))
    return impls


def close(got, expected) -> float:
    """Max |difference|, after checking the relative error of the whole output against bf16's
    precision (raises on a mismatch). Elementwise bounds do not fit 134M bf16 outputs summed
    in another order: a rounding flip near a bf16 step moves an element by one step."""
    got, expected = got.float(), expected.float()
    error = ((got - expected).norm() / expected.norm()).item()
    assert error < 1e-2, f"relative error {error:.3g}"
    return (got - expected).abs().max().item()


def check_decode(args, batch, gen) -> dict:
    """Before any timing, on fresh data: ours against the pure-torch step (SD and DS, states
    exact, and SD and DS bit-identical), then every peer against ours."""
    idx, xs, weight, bias = decode_case(batch, gen)
    x, result, ours = xs[0], {}, {}
    pools = {layout: make_pools(layout, 1)[0] for layout in ("SD", "DS")}
    for name, (layouts, call) in decode_impls(args, idx, weight, bias).items():
        for layout in layouts:
            out = torch.empty_like(x)
            if layout == "dense":  # FLA: history in columns 1..width-1; the whole window written back
                state = torch.cat([torch.randn_like(pools["DS"][idx][..., :1]), pools["DS"][idx]], -1)
                call(x.clone(), state, out)
                torch.testing.assert_close(state[..., 1:], ours["DS"][1][idx], rtol=0, atol=0)
                result[f"{name} vs ours DS"] = close(out, ours["DS"][0])
                continue
            state = pools[layout].clone()
            call(x.clone(), state, out)
            if name == "ours":
                expected_state = pools[layout].clone()
                expected = torch_update(x.clone(), expected_state, weight, bias, idx)
                torch.testing.assert_close(state, expected_state, rtol=0, atol=0)
                result[f"ours {layout} vs torch"] = close(out, expected)
                ours[layout] = (out, state)
            else:
                torch.testing.assert_close(state, ours[layout][1], rtol=0, atol=0)
                result[f"{name} {layout} vs ours"] = close(out, ours[layout][0])
    outs = []
    for layout in ("SD", "DS"):  # one initial state in both layouts
        pool = make_pools(layout, 1)[0]
        pool.copy_(pools["DS"])
        outs.append(conv_update(x.clone(), pool, weight, bias, "silu", idx, out=torch.empty_like(x)))
    result["ours SD == DS (bits)"] = torch.equal(outs[0], outs[1])
    return result


def time_decode(call, pools, xs, outs, rep: int = 200) -> float:
    """Microseconds per call: one CUDA-graph replay calls every layer's pool once (L2-cold)."""
    def step():
        for layer in range(LAYERS):
            call(xs[layer], pools[layer], outs[layer])
    step()
    torch.cuda.synchronize()
    return do_bench_cudagraph(step, rep=rep, return_mode="median") * 1e3 / LAYERS


def decode_bytes(batch: int, layout: str) -> int:
    cols = STATE_LEN + WIDTH if layout == "dense" else 2 * STATE_LEN
    return batch * (cols * DIM + 2 * DIM) * ELEM + (WIDTH + 1) * DIM * ELEM


def bench_decode(args, bw, rows, checks, gen):
    for batch in BATCHES:
        idx, xs, weight, bias = decode_case(batch, gen)
        outs = [torch.empty_like(x) for x in xs]
        impls = decode_impls(args, idx, weight, bias)
        checks.append(dict(work=f"decode B={batch}", **check_decode(args, batch, gen)))
        pools = {layout: make_pools(layout, LAYERS, batch) for layout in ("SD", "DS", "dense")}
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(ROUNDS):
            for name, (layouts, call) in impls.items():
                for layout in layouts:
                    times.setdefault((name, layout), []).append(time_decode(call, pools[layout], xs, outs))
        for (name, layout), ts in times.items():
            us = statistics.median(ts)
            rows.append(dict(work=f"decode B={batch}", impl=name, layout=layout, us=us,
                             frac_bw=decode_bytes(batch, layout) / (us * 1e-6) / 1e9 / bw, timing="cudagraph"))
        print(f"decode B={batch}: " + ", ".join(f"{n} {l} {statistics.median(t):.2f} us" for (n, l), t in times.items()),
              flush=True)


def prefill_case(batch: int, length: int, gen: random.Random):
    tokens = batch * length
    x = torch.randn(tokens, DIM, device="cuda", dtype=DTYPE).t()  # vLLM's tokens-major buffer
    weight = torch.randn(DIM, WIDTH, device="cuda", dtype=DTYPE)
    bias = torch.randn(DIM, device="cuda", dtype=DTYPE)
    idx = torch.tensor(gen.sample(range(1, SLOTS), batch), device="cuda", dtype=torch.int32)
    has_init = torch.tensor([gen.random() < 0.5 for _ in range(batch)], device="cuda")
    qsl = torch.arange(0, tokens + 1, length, device="cuda", dtype=torch.int32)
    return x, weight, bias, idx, has_init, qsl


def prefill_impls(args, x, weight, bias, idx, has_init, qsl) -> dict:
    impls = {"ours": lambda s: conv_prefill(x, weight, bias, s, qsl, idx, has_init, "silu")}
    prefill_peer = peer(args.peer_prefill)
    if prefill_peer:
        impls[args.peer_label] = lambda s: prefill_peer(x, weight, bias, conv_states=s, query_start_loc=qsl,
                                                        cache_indices=idx, has_initial_state=has_init,
                                                        activation="silu")
    return impls


def check_prefill(args, batch, length, gen) -> dict:
    """Ours against the pure-torch prefill, then the peer against ours, on fresh data."""
    case = prefill_case(batch, length, gen)
    x, weight, bias, idx, has_init, _ = case
    result, ours = {}, {}
    pools = {layout: make_pools(layout, 1)[0] for layout in ("SD", "DS")}
    for name, call in prefill_impls(args, *case).items():
        for layout, pool in pools.items():
            expected_state, state = pool.clone(), pool.clone()
            expected = torch_prefill(x, weight, bias, expected_state, [length] * batch, idx, has_init)
            got = call(state)
            torch.testing.assert_close(state, expected_state, rtol=0, atol=0)
            if name == "ours":
                ours[layout] = got
                result[f"ours {layout} vs torch"] = close(got, expected)
            else:
                result[f"{name} {layout} vs ours"] = close(got, ours[layout])
    result["ours SD == DS (bits)"] = torch.equal(ours["SD"], ours["DS"])
    return result


def bench_prefill(args, bw, rows, checks, gen):
    for batch, length in PREFILLS:
        work = f"prefill {batch} x {length}"
        checks.append(dict(work=work, **check_prefill(args, batch, length, gen)))
        impls = prefill_impls(args, *prefill_case(batch, length, gen))
        pools = {layout: make_pools(layout, 1)[0] for layout in ("SD", "DS")}
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(ROUNDS):
            for name, call in impls.items():
                for layout in ("SD", "DS"):
                    ms = do_bench(lambda: call(pools[layout]), return_mode="median")
                    times.setdefault((name, layout), []).append(ms * 1e3)
        moved = 2 * batch * length * DIM * ELEM + 2 * batch * STATE_LEN * DIM * ELEM
        for (name, layout), ts in times.items():
            us = statistics.median(ts)
            rows.append(dict(work=work, impl=name, layout=layout, us=us, frac_bw=moved / (us * 1e-6) / 1e9 / bw,
                             timing="launches"))
        print(f"{work}: " + ", ".join(f"{n} {l} {statistics.median(t):.1f} us" for (n, l), t in times.items()),
              flush=True)


def sweep(gen, log) -> None:
    """Time the DS decode candidates per batch (the shipped table's entry, and the vec path's
    block shapes, sequences per program and programmatic dependent launch) and the prefill
    tiles, then put the winners in the kernels' tables (the benchmark that follows uses them;
    commit them). The SD table is kept."""
    table, pdl_wins = [], 0
    for batch in BATCHES:
        idx, xs, weight, bias = decode_case(batch, gen)
        outs = [torch.empty_like(x) for x in xs]
        pools = make_pools("DS", LAYERS)
        shipped = triton_conv._update_config(True, batch)
        candidates = [(*shipped, False)] + [
            (block, seqs, warps, "vec", pdl) for block in (256, 512, 1024) for warps in (1, 2, 4)
            for seqs in (1, 2, 4) for pdl in (False, True) if block >= 256 * warps and seqs <= batch]
        results = []
        for block, seqs, warps, path, pdl in candidates:
            triton_conv.UPDATE_BLOCKS[True] = [(1 << 62, block, seqs, warps, path)]
            triton_conv.PDL = pdl
            call = lambda x, s, o: conv_update(x, s, weight, bias, "silu", idx, out=o)
            results.append((time_decode(call, pools, xs, outs, rep=50), block, seqs, warps, path, pdl))
        results.sort()
        log(f"sweep decode DS B={batch}: " + "; ".join(f"{r[0]:.2f} us {r[1:]}" for r in results[:6]) +
            f"; shipped {shipped}: {next(r[0] for r in results if r[1:] == (*shipped, False)):.2f} us")
        us, *config, pdl = results[0]
        pdl_wins += pdl
        table.append((batch, *config))
    table[-1] = (1 << 62, *table[-1][1:])
    triton_conv.UPDATE_BLOCKS[True] = table
    triton_conv.PDL = pdl_wins > len(BATCHES) // 2
    x, weight, bias, idx, has_init, qsl = prefill_case(8, 2048, gen)
    (state,) = make_pools("DS", 1)
    results = []
    for bt, bd, warps in ((64, 64, 8), (32, 128, 4), (64, 128, 8), (128, 64, 8), (16, 256, 4)):
        for tiles in (1, 4, 16):
            triton_conv.PREFILL_BLOCKS[False] = (bt, bd, warps, tiles)
            ms = do_bench(lambda: conv_prefill(x, weight, bias, state, qsl, idx, has_init, "silu"),
                          return_mode="median")
            results.append((ms * 1e3, bt, bd, warps, tiles))
    results.sort()
    us, *best = results[0]
    triton_conv.PREFILL_BLOCKS[False] = tuple(best)
    log("sweep prefill 8x2048 DS: " + "; ".join(f"{r[0]:.1f} us {r[1:]}" for r in results[:6]))
    log(f"UPDATE_BLOCKS[True] = {triton_conv.UPDATE_BLOCKS[True]}\nPDL = {triton_conv.PDL}\n"
        f"PREFILL_BLOCKS = {triton_conv.PREFILL_BLOCKS}")


def check_compiled(gen) -> str:
    """torch.compile(fullgraph=True) of a DS decode step gives eager's bits (smallest and largest batch)
    (inductor launches our kernels itself: the block table's choices, PDL included)."""
    results = []
    for batch in (BATCHES[0], BATCHES[-1]):
        idx, xs, weight, bias = decode_case(batch, gen)
        (pool,) = make_pools("DS", 1)
        step = lambda x, s: conv_update(x, s, weight, bias, "silu", idx, out=torch.empty_like(x))
        try:
            got = torch.compile(step, fullgraph=True)(xs[0].clone(), compiled_pool := pool.clone())
        except Exception as error:  # reported in the results, not raised: the timings still run
            return f"torch.compile failed at B={batch}: {type(error).__name__}: {str(error)[:300]}"
        eager_pool = pool.clone()
        results.append(torch.equal(got, step(xs[0].clone(), eager_pool)) and torch.equal(compiled_pool, eager_pool))
    return f"torch.compile == eager (bits) at B={BATCHES[0]} and B={BATCHES[-1]}" if all(results) else f"torch.compile differs: {results}"


def wide_table(rows: list[dict], peer_label: str) -> list[str]:
    """One line per work, one column per implementation and pool (the issue's table)."""
    columns = [(peer_label, "SD"), (peer_label, "DS"), ("FLA", "dense"), ("ours", "SD"), ("ours", "DS")]
    columns = [c for c in columns if any((r["impl"], r["layout"]) == c for r in rows)]
    names = {"dense": "dense (B, D, 4)"}
    lines = ["| us (of copy bw) | " + " | ".join(f"{i} {names.get(l, l)}" for i, l in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for work in dict.fromkeys(r["work"] for r in rows):
        cells = {(r["impl"], r["layout"]): r for r in rows if r["work"] == work}
        lines.append(f"| {work} | " + " | ".join(
            f"{cells[c]['us']:.1f} ({100 * cells[c]['frac_bw']:.0f}%)" if c in cells else "-" for c in columns) + " |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--peer-update", help="MODULE:FUNC with causal_conv1d_update's signature")
    parser.add_argument("--peer-prefill", help="MODULE:FUNC with causal_conv1d_fn's signature")
    parser.add_argument("--peer-label", default="vLLM", help="the peer's name in the tables")
    parser.add_argument("--fla", action="store_true", help="FLA's causal_conv1d_update (fla-core installed)")
    parser.add_argument("--no-compile-check", action="store_true", help="skip the torch.compile bit check")
    args = parser.parse_args()
    gen = random.Random(0)
    torch.manual_seed(0)
    card = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    args.out.mkdir(parents=True, exist_ok=True)
    log_lines = [f"{card}, torch {torch.__version__}, triton {triton.__version__}: copy bandwidth {bw:.0f} GB/s"]

    def log(line):
        log_lines.append(line)
        print(line, flush=True)

    print(log_lines[0], flush=True)
    if args.sweep:
        sweep(gen, log)
    rows, checks = [], []
    if not args.no_compile_check:
        log(check_compiled(gen))
        checks.append(dict(work="torch.compile", result=log_lines[-1]))
    bench_decode(args, bw, rows, checks, gen)
    bench_prefill(args, bw, rows, checks, gen)
    meta = dict(card=card, torch=torch.__version__, triton=triton.__version__, copy_bw_gbs=round(bw),
                update_blocks={str(k): v for k, v in triton_conv.UPDATE_BLOCKS.items()}, pdl=triton_conv.PDL,
                prefill_blocks={str(k): v for k, v in triton_conv.PREFILL_BLOCKS.items()},
                dim=DIM, width=WIDTH, slots=SLOTS, dtype=str(DTYPE), layers_per_replay=LAYERS, rounds=ROUNDS,
                peers=dict(update=args.peer_update, prefill=args.peer_prefill, label=args.peer_label, fla=args.fla))
    (args.out / "kernels.json").write_text(json.dumps(dict(meta, rows=rows, checks=checks), indent=1))
    lines = [f"Card: {card}; torch {torch.__version__}; triton {triton.__version__}; copy bandwidth {bw:.0f} GB/s "
             f"(bytes read + written). bf16, dim {DIM}, width {WIDTH}, pools of {SLOTS} slots, random slots; "
             f"decode: CUDA-graph replays calling the kernel once per layer over {LAYERS} layers' pools (L2-cold), "
             f"time per call; prefill: plain launches; median of {ROUNDS} interleaved rounds. "
             f"Each implementation checked against ours on the same data before timing (kernels.json: checks).", ""]
    lines += wide_table(rows, args.peer_label)
    if args.fla:
        lines += ["", f"FLA: {FLA_NOTE}."]
    lines += ["", "| checks (max abs difference; states compared exactly) |", "|---|"]
    lines += [f"| {c['work']}: " + ", ".join(f"{k} {v if isinstance(v, (bool, str)) else f'{v:.3g}'}"
                                              for k, v in c.items() if k != "work") + " |" for c in checks]
    (args.out / "kernels.md").write_text("\n".join(lines) + "\n")
    (args.out / "bench.log").write_text("\n".join(log_lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
