"""Time optimize() on the CPU: a 64-layer hybrid (tiny widths: the pass's cost is in the graph,
not the tensors), capturing a prefill and a decode entry eagerly; and stacks of N identical
Mamba2 layers, the cost at 64 layers against 4 (one run, a ratio).

    python benchmarks/optimize_time.py [--layers 64] [--repeat 3]"""

import argparse
import platform
import statistics
import time

import torch

from layoutpass import optimize
from layoutpass.examples.lm import LM, ModelConfig
from layoutpass.examples.scenario import make_scenario


def timed(layers: tuple[str, ...], repeat: int) -> tuple[float, dict, object]:
    """Median seconds of optimize() over `repeat` runs (after one warm-up), the stage sums of
    the last run, and that run's optimized model."""
    cfg = ModelConfig(layers=layers)
    torch.manual_seed(0)
    model = LM(cfg).eval()
    steps = make_scenario(cfg)
    calls = [next(s.inputs for s in steps if s.kind == kind) for kind in ("prefill", "decode")]
    optimize(model, "DS", example_inputs=calls)  # warm-up: torch's first export loads a lot
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fast = optimize(model, "DS", example_inputs=calls)
        times.append(time.perf_counter() - start)
    stages = {}
    for graphs in fast.graphs.values():
        for stage, seconds in graphs.seconds.items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    return statistics.median(times), stages, fast


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    pattern = ("mamba2", "attention", "gdn", "mamba2")
    hybrid = tuple(pattern[i % 4] for i in range(args.layers))
    seconds, stages, fast = timed(hybrid, args.repeat)
    where = f"CPU: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"optimize() on a {args.layers}-layer hybrid ({len(fast.report.pools)} pools, prefill + decode, "
          f"{len(fast.graphs)} captured entries): median {seconds:.2f} s of {args.repeat}; stages summed over "
          f"entries: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()) + f" ({where})")
    small, _, _ = timed(("mamba2",) * 4, args.repeat)
    large, _, _ = timed(("mamba2",) * 64, args.repeat)
    print(f"identical Mamba2 layers: 4 layers {small:.2f} s, 64 layers {large:.2f} s: ratio {large / small:.2f} ({where})")


if __name__ == "__main__":
    main()
