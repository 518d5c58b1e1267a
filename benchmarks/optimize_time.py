"""Time optimize() on the CPU: a 64-layer hybrid (tiny widths: the pass's cost is in the graph,
not the tensors), given a prefill and a decode call as `example_inputs` (so every layer kind's
graphs are captured, and its pools moved, inside optimize()); and stacks of N identical
Mamba2 layers, the cost at 64 layers against 4 (one run, a ratio).

The runs of the models compared are interleaved, and a fixed pure-Python loop is timed beside
them: a shared 2-core VM's speed drifts by up to 1.6x within minutes, and the loop shows where
in that range a run was taken.

    python benchmarks/optimize_time.py [--layers 64] [--repeat 5]"""

import argparse
import platform
import statistics
import time

import torch

from layoutpass import optimize
from layoutpass.examples.lm import LM, ModelConfig
from layoutpass.examples.scenario import make_scenario


class Case:
    """One model and its prefill and decode calls, warmed up (torch's first export loads a lot)."""

    def __init__(self, layers: tuple[str, ...]):
        cfg = ModelConfig(layers=layers)
        torch.manual_seed(0)
        self.model = LM(cfg).eval()
        steps = make_scenario(cfg)
        self.calls = [next(s.inputs for s in steps if s.kind == kind) for kind in ("prefill", "decode")]
        self.times: list[float] = []
        self.fast = optimize(self.model, "DS", example_inputs=self.calls)

    def run(self) -> None:
        start = time.perf_counter()
        self.fast = optimize(self.model, "DS", example_inputs=self.calls)
        self.times.append(time.perf_counter() - start)

    def stages(self) -> dict[str, float]:
        """Seconds per pass of the last run, summed over its captured graphs."""
        sums = {}
        for graphs in self.fast.graphs.values():
            for stage, seconds in graphs.seconds.items():
                sums[stage] = sums.get(stage, 0.0) + seconds
        return sums


def python_loop() -> float:
    """Seconds of a fixed pure-Python loop: the machine's speed at the moment."""
    start = time.perf_counter()
    total = 0
    for i in range(10**6):
        total += i
    return time.perf_counter() - start


def interleaved(cases: list[Case], repeat: int) -> list[float]:
    loops = []
    for _ in range(repeat):
        loops.append(python_loop())
        for case in cases:
            case.run()
    return loops


def spread(times: list[float], scale: float = 1.0, unit: str = "s") -> str:
    median, least, most = (scale * x for x in (statistics.median(times), min(times), max(times)))
    return f"median {median:.2f} {unit} (min {least:.2f}, max {most:.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    pattern = ("mamba2", "attention", "gdn", "mamba2")
    hybrid = Case(tuple(pattern[i % 4] for i in range(args.layers)))
    loops = interleaved([hybrid], args.repeat)
    where = f"CPU: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in hybrid.stages().items())
    print(f"optimize() on a {args.layers}-layer hybrid ({len(hybrid.fast.report.pools)} pools, prefill + decode, "
          f"{len(hybrid.fast.graphs)} captured graphs): {spread(hybrid.times)} of {args.repeat}; last run's "
          f"passes summed over graphs: {stages}; the rest is Dynamo's bytecode trace, its guards and the "
          f"runtime's bookkeeping ({where})")
    small, large = Case(("mamba2",) * 4), Case(("mamba2",) * 64)
    loops += interleaved([small, large], args.repeat)
    ratios = [b / a for a, b in zip(small.times, large.times)]
    print(f"identical Mamba2 layers, runs interleaved: 4 layers {spread(small.times)}, 64 layers "
          f"{spread(large.times)}: ratio of medians {statistics.median(large.times) / statistics.median(small.times):.2f}"
          f" (per pair {min(ratios):.2f}-{max(ratios):.2f}) ({where})")
    print(f"machine speed: a fixed 10^6-step Python loop took {spread(loops, 1e3, 'ms')} over the runs")


if __name__ == "__main__":
    main()
