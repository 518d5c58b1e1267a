"""Time optimize() on a 64-layer hybrid model (tiny widths: the pass's cost is in the graph,
not the tensors) on the CPU, capturing a prefill and a decode entry eagerly.

    python benchmarks/optimize_time.py [--layers 64]"""

import argparse
import platform
import statistics
import time

import torch

from layoutpass import optimize
from layoutpass.examples.lm import LM, ModelConfig
from layoutpass.examples.scenario import make_scenario


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    pattern = ("mamba2", "attention", "gdn", "mamba2")
    cfg = ModelConfig(layers=tuple(pattern[i % 4] for i in range(args.layers)))
    torch.manual_seed(0)
    model = LM(cfg).eval()
    steps = make_scenario(cfg)
    calls = [next(s.inputs for s in steps if s.kind == kind) for kind in ("prefill", "decode")]
    times, stages = [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        fast = optimize(model, "DS", example_inputs=calls)
        times.append(time.perf_counter() - start)
        stages.append({k: sum(e.seconds[k] for e in fast._entries) for k in ("capture", "pass")})
    counts = fast.report.counts
    print(f"optimize() on a {args.layers}-layer hybrid ({len(fast.report.pools)} pools, 2 entries: "
          f"{counts['permutation folded']} permutations folded, {counts['lowered']} kernel uses): "
          f"median {statistics.median(times):.2f} s of {args.repeat}, of which torch.export capture "
          f"{statistics.median(s['capture'] for s in stages):.2f} s and the pass (discover, rewrite, report) "
          f"{statistics.median(s['pass'] for s in stages):.2f} s "
          f"(CPU: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})")


if __name__ == "__main__":
    main()
