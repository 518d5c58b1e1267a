"""Command line: `layoutpass demo | inspect MODULE:FACTORY | check MODULE:FACTORY` (also
`python -m layoutpass ...`)."""

import argparse
import difflib
import importlib
import sys
import time

from .errors import ArgumentError, LayoutPassError


def demo(args: argparse.Namespace) -> int:
    """Optimize an example model written in vLLM's SD idiom to DS, show what changed, and
    check that it computes the same outputs and states over a serving scenario."""
    from . import check_equivalence, optimize
    from .examples import build

    model = build(args.model, num_spec=1)
    steps = model.scenario(seed=args.seed)
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


def _load(spec: str):
    """MODULE:FACTORY -> (model, calls): the factory returns a model with a scenario() method
    (a layoutpass.examples LM, a layoutpass.hf.CacheAsBuffers) or (model, [dict of keyword
    arguments per call])."""
    from .examples.scenario import Step

    module, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ArgumentError("factory", f"cannot load {spec!r} (expected MODULE:FACTORY): {err}") from err
    made = factory()
    model, calls = made if isinstance(made, tuple) else (made, None)
    if calls is None:
        if not callable(getattr(model, "scenario", None)):
            raise ArgumentError("factory", f"{spec} returned a model without example calls; return (model, calls)")
        return model, model.scenario()
    return model, [Step("call", dict(c)) for c in calls]


def inspect(args: argparse.Namespace) -> int:
    """Report, before/after diff and (optionally) a drawing of one entry."""
    from . import optimize

    model, steps = _load(args.factory)
    fast = optimize(model, args.layout, example_inputs=[s.inputs for s in steps])
    print(fast.report, "\n")
    names = list(fast.graphs)
    if not 0 <= args.entry < len(names):
        raise ArgumentError("entry", f"{args.entry} is not one of the {len(names)} captured entries")
    graphs = fast.graphs[names[args.entry]]
    print(f"{names[args.entry]}, before -> after:")
    diff = difflib.unified_diff(graphs.before.splitlines(), graphs.after.splitlines(), lineterm="", n=0)
    print("\n".join(line for line in diff if not line.startswith(("---", "+++"))))
    if args.svg:
        graphs.svg(args.svg)
        print(f"wrote {args.svg}")
    return 0


def check(args: argparse.Namespace) -> int:
    """Equivalence over the factory's scenario; exit 1 on a mismatch."""
    from . import check_equivalence, optimize

    model, steps = _load(args.factory)
    result = check_equivalence(model, optimize(model, args.layout), steps, rtol=args.rtol, atol=args.atol)
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
    for name, func in (("inspect", inspect), ("check", check)):
        sub = commands.add_parser(name, help=func.__doc__.splitlines()[0])
        sub.add_argument("factory", help="MODULE:FACTORY, e.g. layoutpass.examples.models:hybrid")
        sub.add_argument("--layout", default="DS", help="target pool layout: DS or SD (default: DS)")
        sub.set_defaults(func=func)
        if name == "inspect":
            sub.add_argument("--entry", type=int, default=1, help="which captured entry to diff (default: 1)")
            sub.add_argument("--svg", help="draw the rewritten entry to this file (needs pydot)")
        else:
            sub.add_argument("--rtol", type=float, default=None, help="relative tolerance (default: exact)")
            sub.add_argument("--atol", type=float, default=None, help="absolute tolerance (default: exact)")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LayoutPassError as err:
        print(f"layoutpass: {err}", file=sys.stderr)
        return 2
