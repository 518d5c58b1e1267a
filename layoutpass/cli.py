"""Command line: `layoutpass demo | inspect MODULE:FACTORY | check MODULE:FACTORY` (also
`python -m layoutpass ...`). Every mistake is one line on stderr and exit code 2."""

import argparse
import difflib
import importlib
import inspect as pyinspect
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

from .errors import ArgumentError, LayoutPassError
from .layout import parse_layout


class _Parser(argparse.ArgumentParser):
    """argparse's own mistakes in one line too (by default it prints the usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


@contextmanager
def _user_code(argument: str, what: str):
    """Where the user's own code runs (factory, scenario, forward): what it raises is their
    mistake, said in one line naming `argument`. Our own errors pass through unchanged."""
    try:
        yield
    except LayoutPassError:
        raise
    except Exception as err:
        raise ArgumentError(argument, f"{what} raised {_one_line(err)}") from err


def demo(args: argparse.Namespace) -> int:
    """Optimize an example model written in vLLM's SD idiom to DS, show what changed, and
    check that it computes the same outputs and states over a serving scenario. (lower=True:
    the graphs are also rewritten onto each conv's kernel-order view, which shows in the diff.)"""
    from . import check_equivalence, optimize
    from .examples import build

    model = build(args.model, num_spec=1)
    steps = model.scenario(seed=args.seed)
    print(f"model {args.model!r}: layers {', '.join(model.cfg.layers)}; optimizing to {args.layout} ...", flush=True)
    start = time.perf_counter()
    decode = next(s.inputs for s in steps if s.kind == "decode")
    fast = optimize(model, args.layout, lower=True, example_inputs=[next(s.inputs for s in steps if s.kind == kind)
                                                                    for kind in ("prefill", "decode", "spec")])
    print(f"captured {len(fast.graphs)} graphs in {time.perf_counter() - start:.1f} s\n")
    print(fast.report, "\n")
    shape = f"({list(decode['input_ids'].shape) + [model.cfg.hidden]}"
    name, graphs = next((n, g) for n, g in fast.graphs.items() if shape in n)  # a layer's decode call
    print(f"{name}, the decode call, before -> after (changed lines):")
    diff = difflib.unified_diff(graphs.before.splitlines(), graphs.after.splitlines(), lineterm="", n=0)
    print("\n".join(line[:160] for line in diff if not line.startswith(("---", "+++"))), "\n")
    print(f"equivalence over {len(steps)} steps (prefill, decode, spec decode, slot reuse) ...", flush=True)
    result = check_equivalence(model, fast, steps)
    print(result)
    return 0 if result.ok else 1


def _load(spec: str):
    """MODULE:FACTORY -> (model, steps): the factory takes no arguments and returns a model with
    a scenario() method (a layoutpass.examples LM, a layoutpass.hf.CacheAsBuffers) or (model,
    [dict of keyword arguments per call])."""
    from torch import nn

    from .examples.scenario import Step

    module, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ArgumentError("factory", f"cannot load {spec!r} (expected MODULE:FACTORY): {err}") from err
    except Exception as err:  # the user's module fails as it is imported
        raise ArgumentError("factory", f"importing {module!r} raised {_one_line(err)}") from err
    if not callable(factory):
        raise ArgumentError("factory", f"{spec} is not a function returning a model "
                                       f"(it is of type {type(factory).__name__})")
    try:
        pyinspect.signature(factory).bind()
    except TypeError as err:
        raise ArgumentError("factory", f"{spec} must take no arguments ({err})") from err
    except ValueError:  # no signature to read (a builtin): just call it
        pass
    with _user_code("factory", spec):
        made = factory()
    if isinstance(made, tuple) and len(made) != 2:
        raise ArgumentError("factory", f"{spec} returned a tuple of {len(made)}; expected a model or (model, calls)")
    model, calls = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, nn.Module):
        raise ArgumentError("factory", f"{spec} returned a {type(model).__name__} as the model, not an nn.Module")
    if calls is None:
        if not callable(getattr(model, "scenario", None)):
            raise ArgumentError("factory", f"{spec} returned a model without example calls; return (model, calls)")
        with _user_code("factory", f"{spec}: {type(model).__name__}.scenario()"):
            steps = list(model.scenario())
    elif isinstance(calls, (str, Mapping)) or not isinstance(calls, Sequence):
        raise ArgumentError("factory", f"{spec} returned a {type(calls).__name__} as the calls; "
                                       f"expected a list of dicts of keyword arguments")
    else:
        steps = [Step("call", call) for call in calls]
    if not steps:
        raise ArgumentError("factory", f"{spec} gave no calls: nothing to capture or compare")
    _check_calls(model, [step.inputs for step in steps])
    return model, steps


def _check_calls(model, calls: list) -> None:
    """Each call a dict of keyword arguments that the model's forward takes."""
    forward = pyinspect.signature(model.forward)
    named = f"{type(model).__name__}.forward{forward}"
    takes_any = any(p.kind == p.VAR_KEYWORD for p in forward.parameters.values())
    for i, call in enumerate(calls):
        if not isinstance(call, Mapping):
            raise ArgumentError(f"call {i}", f"expected a dict of keyword arguments, got a {type(call).__name__}")
        unknown = [key for key in call if key not in forward.parameters]
        if unknown and not takes_any:  # a misspelt keyword also leaves one missing: name the misspelling
            raise ArgumentError(f"call {i}", f"{named} takes no keyword {unknown[0]!r}")
        try:
            forward.bind(**call)
        except TypeError as err:
            raise ArgumentError(f"call {i}", f"does not fit {named}: {err}") from err


def _run_calls(model, steps) -> None:
    """Run every call on the model itself first: a forward that raises is the user's mistake,
    named by its call index (captured, it would read as a call that does not capture)."""
    import torch

    with torch.no_grad():
        for i, step in enumerate(steps):
            with _user_code(f"call {i}", f"{type(model).__name__}.forward"):
                model(**step.inputs)


def inspect(args: argparse.Namespace) -> int:
    """Report, before/after diff and (optionally) a drawing of one entry."""
    from . import optimize

    if args.svg:
        try:
            import pydot  # noqa: F401  torch's drawer needs it, and says so in a RuntimeError
        except ImportError as err:
            raise ArgumentError("svg", "drawing needs pydot (pip install pydot)") from err
    model, steps = _load(args.factory)
    _run_calls(model, steps)
    try:
        fast = optimize(model, args.layout, example_inputs=[s.inputs for s in steps])
    except ArgumentError as err:  # the user gave calls, not example_inputs: name them so
        if err.argument != "example_inputs":
            raise
        raise ArgumentError("calls", str(err).removeprefix("example_inputs: ")) from err
    names = list(fast.graphs)
    if not 0 <= args.entry < len(names):
        raise ArgumentError("entry", f"{args.entry} is not one of the {len(names)} captured graphs")
    graphs = fast.graphs[names[args.entry]]
    print(fast.report, "\n")
    print(f"{names[args.entry]}, before -> after:")
    diff = difflib.unified_diff(graphs.before.splitlines(), graphs.after.splitlines(), lineterm="", n=0)
    print("\n".join(line for line in diff if not line.startswith(("---", "+++"))))
    if args.svg:
        try:
            graphs.svg(args.svg)
        except OSError as err:  # no such folder, or graphviz's `dot` not installed
            raise ArgumentError("svg", f"cannot draw {args.svg}: {err}") from err
        print(f"wrote {args.svg}")
    return 0


def check(args: argparse.Namespace) -> int:
    """Equivalence over the factory's calls; exit 1 on a mismatch."""
    from . import check_equivalence, optimize

    model, steps = _load(args.factory)
    _run_calls(model, steps)
    result = check_equivalence(model, optimize(model, args.layout), steps, rtol=args.rtol, atol=args.atol)
    print(result)
    return 0 if result.ok else 1


def _parser() -> argparse.ArgumentParser:
    from .examples import ZOO

    parser = _Parser(prog="layoutpass", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="optimize an example model, show the rewrite, check equivalence")
    run.add_argument("--model", default="hybrid", choices=sorted(ZOO), help="example model (default: hybrid)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.layout = parse_layout(args.layout)  # before anything is loaded, captured or printed
        return args.func(args)
    except LayoutPassError as err:
        print(f"layoutpass: {err}", file=sys.stderr)
        return 2
