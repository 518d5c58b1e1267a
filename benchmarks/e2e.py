"""End-to-end decode on a CUDA card against its byte floor: the example models at 2.7B-class widths
(Mamba2: 64 layers; the hybrid: 16), one decode step timed in CUDA graphs, in the pool layouts of
both kinds side by side:

  as written                  the model itself (conv pools SD, recurrent pools in the order its ops use)
  DS + VK                     optimize(model, {"conv": "DS", "recurrent": "VK"})
  SD + KV                     optimize(model, {"conv": "SD", "recurrent": "KV"})

Every row runs the same ops: the conv and recurrence decode kernels update their pools in place by
slot (kernels/triton_conv.py, kernels/triton_recurrent.py), attention runs on
scaled_dot_product_attention. The byte floor of a step: every parameter read once (the embedding:
the batch's rows), every touched slot's pool rows (conv and recurrent states, attention keys and
values up to its context) read once and written once, the logits written once, at the copy
bandwidth measured in the same run. Before timing, each optimized row is checked against the model
as written from one random state (logits and every state tensor; exact, or the largest difference).

    python benchmarks/e2e.py --out DIR          # table + e2e.json + e2e.md
    python benchmarks/e2e.py --smoke            # tiny models on the CPU: the checks only
    python benchmarks/e2e.py --profile          # where each decode step's GPU time goes, by kernel
"""

import argparse
import json
import random
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from layoutpass import optimize
from layoutpass.equivalence import logical_buffers
from layoutpass.examples import ZOO
from layoutpass.examples.lm import LM, SIZES, ModelConfig
from layoutpass.examples.scenario import Step, fill_state

MODELS = {"mamba2": ZOO["mamba2"] * 32, "hybrid": ZOO["hybrid"] * 4}
BATCHES = (1, 64, 256)
ROUNDS = 3
LAYOUTS = {"as written": None, "DS + VK": {"conv": "DS", "recurrent": "VK"},
           "SD + KV": {"conv": "SD", "recurrent": "KV"}}


def build(layers, size: str, device, dtype, **overrides) -> LM:
    torch.manual_seed(0)
    cfg = replace(ModelConfig(layers=layers), **{**SIZES[size], **overrides})
    with torch.device(device):  # initialized where it runs
        return LM(cfg).to(dtype=dtype).eval()


def decode_step(cfg: ModelConfig, batch: int, device) -> Step:
    gen = random.Random(batch)
    slots = gen.sample(range(1, cfg.num_slots), batch)  # random distinct slots; 0 is the null block
    ints = lambda v: torch.tensor(v, dtype=torch.int32, device=device)
    return Step("decode", dict(input_ids=torch.randint(0, cfg.vocab, (batch, 1), device=device), slots=ints(slots),
                               context_lens=ints([gen.randint(1, cfg.max_len // 2) for _ in slots])))


def byte_floor(model: LM, step: Step) -> int:
    """Bytes a decode step must move at least (see the module's docstring)."""
    batch = step.inputs["slots"].shape[0]
    total = 0
    for name, p in model.named_parameters():
        total += (batch * p.shape[1] if name == "embed.weight" else p.numel()) * p.element_size()
    for name, buf in model.named_buffers():
        per_slot = buf[0].numel() * buf.element_size()
        if name.endswith(("k_cache", "v_cache")):  # (slot, position, heads, head_dim): the positions used
            per_position = per_slot // buf.shape[1]
            positions = int((step.inputs["context_lens"].long() + 1).sum())
            total += positions * per_position + batch * per_position  # read the context, write one position
        elif buf.dim() >= 3:
            total += 2 * batch * per_slot  # a pool's rows, read and written
    return total + batch * model.cfg.vocab * 2  # the logits


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy (read + written)."""
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


@torch.no_grad()
def check(model: LM, fast, step: Step) -> dict:
    """The optimized row against the model as written, from the same random state."""
    for _ in range(3):  # captures, moves the pools, captures again for their new order
        fast(**step.inputs)
    fill_state(model, seed=1)
    start = logical_buffers(model)
    for name, view in logical_buffers(fast).items():
        view.copy_(start[name])
    want, got = model(**step.inputs).float(), fast(**step.inputs).float()
    theirs = logical_buffers(fast)
    state = max((buf.float() - theirs[name].float()).abs().max().item() for name, buf in logical_buffers(model).items())
    logits = (want - got).abs().max().item()
    return dict(exact=logits == 0 and state == 0, logits_diff=logits, state_diff=state,
                logits_max_abs=want.abs().max().item())


def time_step(call) -> float:
    """Milliseconds per decode step, CUDA-graph replays."""
    from triton.testing import do_bench_cudagraph

    with torch.no_grad():
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        return do_bench_cudagraph(call, rep=200, return_mode="median")


def profile(args) -> None:
    """GPU kernel time of one eager decode step of each optimized model, by kernel (top 12)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    for name in args.models:
        model = build(MODELS[name], "2.7b", "cuda", torch.bfloat16, num_slots=max(BATCHES) + 1, max_len=512)
        fast = optimize(model, LAYOUTS["DS + VK"])
        for batch in (1, 256):
            step = decode_step(model.cfg, batch, "cuda")
            with torch.no_grad():
                for _ in range(3):
                    fast(**step.inputs)
                torch.cuda.synchronize()
                with profiler(activities=[ProfilerActivity.CUDA]) as prof:
                    fast(**step.inputs)
                    torch.cuda.synchronize()
            kernels = {}
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    kernels[e.name[:90]] = kernels.get(e.name[:90], 0) + e.device_time_total
            total = sum(kernels.values())
            print(f"{name} B={batch}: {total / 1e3:.2f} ms of kernels")
            for k, us in sorted(kernels.items(), key=lambda t: -t[1])[:12]:
                print(f"  {us / 1e3:8.3f} ms {100 * us / total:5.1f}%  {k}")
        del fast, model
        torch.cuda.empty_cache()


def run(args) -> tuple[list, list]:
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    size = "tiny" if args.smoke else "2.7b"
    bandwidth = None if args.smoke else copy_bandwidth(device)
    rows, checks = [], []
    for name in args.models:
        layers = MODELS[name][:4] if args.smoke else MODELS[name]
        model = build(layers, size, device, dtype, num_slots=max(BATCHES) + 1, max_len=512)
        variants = {row: model if layouts is None else optimize(model, layouts) for row, layouts in LAYOUTS.items()}
        for batch in BATCHES:
            step = decode_step(model.cfg, min(batch, model.cfg.num_slots - 1), device)
            for row, fast in variants.items():
                if fast is not model:
                    checks.append(dict(model=name, batch=batch, impl=row, **check(model, fast, step)))
                    print(f"{name} B={batch} {row}: {checks[-1]}", flush=True)
            if args.smoke:
                continue
            floor = byte_floor(model, step)
            times = {row: [] for row in variants}
            for _ in range(ROUNDS):  # interleaved rounds, median
                for row, fast in variants.items():
                    times[row].append(time_step(lambda f=fast: f(**step.inputs)))
            for row in variants:
                ms = statistics.median(times[row])
                floor_ms = floor / bandwidth * 1e3
                rows.append(dict(model=name, layers=len(layers), batch=batch, impl=row, ms=ms, floor_ms=floor_ms,
                                 over_floor=ms / floor_ms, floor_bytes=floor))
                print(f"{name:7s} B={batch:<4d} {row:12s} {ms:9.3f} ms  floor {floor_ms:8.3f} ms  "
                      f"x{ms / floor_ms:.2f}", flush=True)
        del variants, model
        torch.cuda.empty_cache() if device == "cuda" else None
    return rows, checks, bandwidth


def write(out: Path, rows: list, checks: list, bandwidth: float) -> list[str]:
    import triton

    card = torch.cuda.get_device_name()
    meta = dict(card=card, torch=torch.__version__, triton=triton.__version__, copy_bandwidth=bandwidth,
                dtype="bfloat16", size="2.7b", config=SIZES["2.7b"], models={k: len(v) for k, v in MODELS.items()},
                rounds=ROUNDS, layouts={k: v for k, v in LAYOUTS.items()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps(dict(meta, rows=rows, checks=checks), indent=1))
    lines = [f"Card: {card}; torch {torch.__version__}; triton {triton.__version__}; copy bandwidth "
             f"{bandwidth / 1e9:.0f} GB/s measured in the run. bf16, 2.7B-class widths; mamba2 {len(MODELS['mamba2'])} "
             f"layers, hybrid {len(MODELS['hybrid'])} (mamba2, attention, gdn, mamba2 x {len(MODELS['hybrid']) // 4}); "
             f"one decode step in CUDA graphs, median of {ROUNDS} interleaved rounds; byte floor: parameters read "
             "once, touched slots' pool rows and attention positions read and written once, logits written.", "",
             "| model | batch | pools | step (ms) | byte floor (ms) | x floor |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['impl']} | {r['ms']:.3f} | {r['floor_ms']:.3f} | "
              f"{r['over_floor']:.2f}x |" for r in rows]
    lines += ["", "Checks before timing, from one random state, against the model as written:", "",
              "| model | batch | pools | exact | logits / state max abs diff | logits up to |", "|---|---|---|---|---|---|"]
    lines += [f"| {c['model']} | {c['batch']} | {c['impl']} | {'yes' if c['exact'] else 'no'} | "
              f"{c['logits_diff']:.3g} / {c['state_diff']:.3g} | {c['logits_max_abs']:.3g} |" for c in checks]
    (out / "e2e.md").write_text("\n".join(lines) + "\n")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, checks only")
    parser.add_argument("--profile", action="store_true", help="GPU time of one decode step by kernel")
    args = parser.parse_args()
    if not args.smoke:
        torch.backends.cuda.enable_cudnn_sdp(False)  # not deterministic for the masked decode attention
    if args.profile:
        return profile(args)
    rows, checks, bandwidth = run(args)
    if not args.smoke:
        print("\n".join(write(args.out, rows, checks, bandwidth)))


if __name__ == "__main__":
    main()
