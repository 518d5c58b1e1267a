"""Command line: `layoutpass demo` (also `python -m layoutpass demo`)."""

import argparse
import difflib
import sys
import time

from .errors import LayoutPassError


def demo(args: argparse.Namespace) -> int:
    """Optimize an example model written in vLLM's SD idiom to DS, show what changed, and
    check that it computes the same outputs and states over a serving scenario."""
    from . import check_equivalence, optimize
    from .examples import build
    from .examples.scenario import make_scenario

    model = build(args.model, num_spec=1)
    steps = make_scenario(model.cfg, seed=args.seed)
    print(f"model {args.model!r}: layers {', '.join(model.cfg.layers)}; optimizing to {args.layout} ...", flush=True)
    start = time.perf_counter()
    fast = optimize(model, args.layout, example_inputs=[next(s.inputs for s in steps if s.kind == kind)
                                                        for kind in ("prefill", "decode", "spec")])
    print(f"captured and rewrote {len(fast.graphs)} entries in {time.perf_counter() - start:.1f} s\n")
    print(fast.report, "\n")
    graphs = list(fast.graphs.values())[1]
    print(f"decode graph, before -> after (changed lines):")
    diff = difflib.unified_diff(graphs.before.splitlines(), graphs.after.splitlines(), lineterm="", n=0)
    print("\n".join(line[:160] for line in diff if not line.startswith(("---", "+++"))), "\n")
    print(f"equivalence over {len(steps)} steps (prefill, decode, spec decode, slot reuse) ...", flush=True)
    result = check_equivalence(model, fast, steps)
    print(result)
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layoutpass", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="optimize an example model, show the rewrite, check equivalence")
    run.add_argument("--model", default="hybrid", help="example model (default: hybrid)")
    run.add_argument("--layout", default="DS", help="target pool layout: DS or SD (default: DS)")
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(func=demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LayoutPassError as err:
        print(f"layoutpass: {err}", file=sys.stderr)
        return 2
