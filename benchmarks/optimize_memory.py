"""Peak extra GPU memory of optimize() on a Mamba2-2.7B-shaped model with 4096-slot pools:
the default (the optimized module owns copies of the buffers) against inplace=True (the pools
are relayouted in their own memory). Each run checks a sample of every pool's slots against the
model's contents before the relayout.

    python benchmarks/optimize_memory.py [--layers 4] [--slots 4096] [--out results/optimize_memory.json]"""

import argparse
import gc
import json
import platform

import torch
import triton

from layoutpass import SD, optimize
from layoutpass.examples import build
from layoutpass.examples.scenario import fill_state, make_scenario

GIB = 2**30


def measure(layers: int, slots: int, inplace: bool) -> dict:
    model = build("mamba2", "2.7b", dtype=torch.bfloat16, device="cuda", num_slots=slots,
                  layers=("mamba2",) * layers)
    fill_state(model)
    pools = [name for name, b in model.named_buffers() if name.endswith("conv_state")]
    sample = torch.randperm(slots, device="cuda")[:64]
    before = {name: model.get_buffer(name)[sample].clone() for name in pools}
    decode = next(s.inputs for s in make_scenario(model.cfg, device="cuda") if s.kind == "decode")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fast = optimize(model, "DS", inplace=inplace, example_inputs=[decode])
    torch.cuda.synchronize()
    peak, after = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    ok = all(torch.equal(fast.report.pools[n].target.view(fast.get_buffer(n), SD)[sample], before[n]) for n in pools)
    state = sum(b.numel() * b.element_size() for b in model.buffers())
    del fast, model
    gc.collect()
    torch.cuda.empty_cache()
    return dict(inplace=inplace, layers=layers, slots=slots, model_buffers_gib=state / GIB,
                peak_extra_gib=(peak - base) / GIB, kept_extra_gib=(after - base) / GIB, pools_checked=ok)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=4096)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = [measure(args.layers, args.slots, inplace) for inplace in (False, True)]
    card = torch.cuda.get_device_name()
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    print(f"optimize() peak extra GPU memory, Mamba2-2.7B widths, {args.layers} layers, {args.slots}-slot pools, bf16 "
          f"({card}, {versions}, {platform.node()})")
    print("| mode | model buffers | peak extra during optimize | kept after | pools checked |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {'inplace' if r['inplace'] else 'default'} | {r['model_buffers_gib']:.2f} GiB | "
              f"{r['peak_extra_gib']:.3f} GiB | {r['kept_extra_gib']:.3f} GiB | {r['pools_checked']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(card=card, versions=versions, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
