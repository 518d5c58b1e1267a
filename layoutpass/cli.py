"""layoutpass's command line (also `python -m layoutpass`):

  layoutpass demo [--model NAME]                  optimize an example model, show the rewrite, check it
  layoutpass inspect MODULE:FACTORY [--draw F]    report, before/after diff and pictures of any model
  layoutpass check MODULE:FACTORY                 equivalence over the factory's calls; exit 1 on a mismatch

MODULE is looked up as `python -m` does (the current directory first): `layoutpass inspect
mymodel:build` finds mymodel.py here. FACTORY takes no arguments and returns a model with a
scenario() method, or (model, [dict of keyword arguments per call]). -v logs each graph
captured (name, time, why); -vv more. Every mistake is one line on stderr and exit code 2."""

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

from .errors import ArgumentError, LayoutPassError

# Nothing here imports torch at module level: `layoutpass --help` answers at once. The example
# models' names are listed here for --help, so that help need not import them (a test keeps
# them equal to layoutpass.examples.ZOO).
MODELS = ("gdn", "hybrid", "kda", "mamba1", "mamba2", "short_conv")
LOGGER = "layoutpass"
LOWER = {"auto": "auto", "yes": True, "no": False}
HELP = {"inspect": "report, before/after diff of one captured graph, pictures of every graph",
        "check": "equivalence over the factory's calls; exit 1 on a mismatch"}


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


@contextmanager
def _progress(model, total: int, what: str):
    """A progress bar on stderr counting `model`'s calls: tqdm's, where tqdm is installed and
    stderr is a terminal; nothing otherwise."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield
        return
    bar = tqdm(total=total, desc=what, unit="step", disable=None, leave=False)
    hook = model.register_forward_hook(lambda *_: bar.update())
    try:
        yield
    finally:
        hook.remove()
        bar.close()


def _diff(before: str, after: str, width: int | None = None) -> str:
    import difflib

    lines = difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
    return "\n".join(line[:width] for line in lines if not line.startswith(("---", "+++", "@@")))


def demo(args: argparse.Namespace) -> int:
    """Optimize an example model written in vLLM's SD idiom to DS, show what changed, and
    check that it computes the same outputs and states over a serving scenario. (lower=True:
    the graphs are also rewritten onto each conv's kernel-order view, which shows in the diff.)"""
    import time

    from . import check_equivalence, optimize
    from .examples import build
    from .layout import requested

    model = build(args.model, num_spec=1)
    steps = model.scenario(seed=args.seed)
    target = ", ".join(f"{kind} pools {layout}" for kind, layout in requested(args.layout).items())
    print(f"model {args.model!r}: layers {', '.join(model.cfg.layers)}; optimizing to {target} ...", flush=True)
    start = time.perf_counter()
    decode = next(s.inputs for s in steps if s.kind == "decode")
    fast = optimize(model, args.layout, lower=True, example_inputs=[next(s.inputs for s in steps if s.kind == kind)
                                                                    for kind in ("prefill", "decode", "spec")])
    print(f"captured {len(fast.graphs)} graphs in {time.perf_counter() - start:.1f} s\n")
    print(fast.report, "\n")
    shape = f"({list(decode['input_ids'].shape) + [model.cfg.hidden]}"
    name, graphs = next((n, g) for n, g in fast.graphs.items() if shape in n)  # a layer's decode call
    print(f"{name}, the decode call, before -> after (changed lines):")
    print(_diff(graphs.before, graphs.after, 160), "\n")
    print(f"equivalence over {len(steps)} steps (prefill, decode, spec decode, slot reuse) ...", flush=True)
    with _progress(model, len(steps), "equivalence"):
        result = check_equivalence(model, fast, steps)
    print(result)
    return 0 if result.ok else 1


def _import(module: str):
    """The module, looked up as `python -m` looks it up: the current directory first."""
    import importlib
    import traceback

    here = os.getcwd()
    if not any(os.path.abspath(p or os.curdir) == here for p in sys.path):
        sys.path.insert(0, here)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and (module == err.name or module.startswith(err.name + ".")):
            raise ArgumentError("factory", f"no module named {err.name!r} in the current directory ({here}) or on "
                                           f"sys.path") from err
        failed = err
    except Exception as err:  # the module (or one it imports) fails as it is imported
        failed = err
    ours = (importlib.__file__, __file__)  # the import machinery: the user's frames are the ones below it
    frames = [f for f in traceback.extract_tb(failed.__traceback__)
              if not f.filename.startswith("<frozen") and f.filename not in ours]
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    raise ArgumentError("factory", f"importing {module!r} failed{where}: {_one_line(failed)}") from failed


def _factory(spec: str):
    module, colon, name = spec.partition(":")
    if not colon or not module or not name.isidentifier():
        raise ArgumentError("factory", f"expected MODULE:FACTORY (e.g. mymodel:build, "
                                       f"layoutpass.examples.models:hybrid), got {spec!r}")
    if module.endswith(".py"):
        raise ArgumentError("factory", f"{module!r} is a file name: give the module, "
                                       f"{module.removesuffix('.py').replace(os.sep, '.')}:{name}")
    loaded = _import(module)
    if not hasattr(loaded, name):
        import difflib

        close = difflib.get_close_matches(name, [n for n in dir(loaded) if not n.startswith("_")], 1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ArgumentError("factory", f"module {module!r} ({getattr(loaded, '__file__', '?')}) has no {name!r}{hint}")
    return getattr(loaded, name)


def _load(spec: str):
    """MODULE:FACTORY -> (model, steps): the factory takes no arguments and returns a model with
    a scenario() method (a layoutpass.examples LM, a layoutpass.hf.CacheAsBuffers) or (model,
    [dict of keyword arguments per call])."""
    import inspect as pyinspect

    factory = _factory(spec)
    from torch import nn

    from .examples.scenario import Step

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
    import inspect as pyinspect

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


def _default_entry(fast) -> int:
    """The first graph whose code the pass changed, else the first that uses a pool, else 0."""
    names = list(fast.graphs)
    changed = [i for i, g in enumerate(fast.graphs.values()) if g.before != g.after]
    used = [i for i, n in enumerate(names) if fast.report.entry_uses.get(n)]
    return (changed or used or [0])[0]


def inspect(args: argparse.Namespace) -> int:
    """Report, before/after diff of one captured graph, and pictures of every graph."""
    from . import optimize

    model, steps = _load(args.factory)
    _run_calls(model, steps)
    try:
        fast = optimize(model, args.layout, example_inputs=[s.inputs for s in steps], lower=LOWER[args.lower])
    except ArgumentError as err:  # the user gave calls, not example_inputs: name them so
        if err.argument != "example_inputs":
            raise
        raise ArgumentError("calls", str(err).removeprefix("example_inputs: ")) from err
    names = list(fast.graphs)
    entry = _default_entry(fast) if args.entry is None else args.entry
    if not 0 <= entry < len(names):
        raise ArgumentError("entry", f"{entry} is not one of the {len(names)} captured graphs")
    graphs = fast.graphs[names[entry]]
    print(fast.report, "\n")
    print(f"{names[entry]} (graph {entry} of 0-{len(names) - 1}: --entry N shows another), before -> after:")
    print(_diff(graphs.before, graphs.after) or "  no line changed (the pass changed no node of this graph; the "
                                                "pools it reads may still be stored in a new order, see the report)")
    if args.draw:
        from .drawing import draw

        written = draw(fast, args.draw)
        for path, name in written:
            print(f"wrote {path}: {name}")
        if not written:
            print("drew nothing: no captured graph reads a pool or was changed")
    return 0


def check(args: argparse.Namespace) -> int:
    """Equivalence over the factory's calls; exit 1 on a mismatch."""
    from . import check_equivalence, optimize

    model, steps = _load(args.factory)
    _run_calls(model, steps)
    fast = optimize(model, args.layout, lower=LOWER[args.lower])
    with _progress(model, len(steps), "equivalence"):
        result = check_equivalence(model, fast, steps, rtol=args.rtol, atol=args.atol)
    print(result)
    return 0 if result.ok else 1


def _tolerance(text: str) -> float:
    value = float(text)  # argparse turns a ValueError into "invalid _tolerance value"
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                         help="log each graph captured, with its time and why (-vv: more)")
    parser = _Parser(prog="layoutpass", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                     parents=[verbose])
    parser.add_argument("--version", action="version", version=f"layoutpass {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", parents=[verbose], help="optimize an example model, show the rewrite, "
                                                              "check equivalence", description=demo.__doc__)
    run.add_argument("--model", default="hybrid", choices=MODELS, help="example model (default: hybrid)")
    run.add_argument("--layout", default="DS", help="target pool layout: DS, SD, KV, VK or auto (default: DS)")
    run.add_argument("--seed", type=int, default=0,
                     help="seed of the serving scenario: prompt tokens and lengths, slots, accepted draft tokens "
                          "(default: 0)")
    run.set_defaults(func=demo)
    for name, func in (("inspect", inspect), ("check", check)):
        sub = commands.add_parser(name, parents=[verbose], help=HELP[name], description=func.__doc__)
        sub.add_argument("factory", help="MODULE:FACTORY, e.g. mymodel:build (mymodel.py in the current directory) "
                                         "or layoutpass.examples.models:hybrid")
        sub.add_argument("--layout", default="DS", help="target pool layout: DS, SD, KV, VK or auto (default: DS)")
        sub.add_argument("--lower", choices=("auto", "yes", "no"), default="auto",
                         help="put pure-torch conv updates and the conv ops' pool views on the conv kernels: auto "
                              "(on CUDA inputs), yes, no (default: auto)")
        sub.set_defaults(func=func)
        if name == "inspect":
            sub.add_argument("--entry", type=int, default=None,
                             help="which captured graph to diff, by its place in the report's list (default: the "
                                  "first the pass changed)")
            sub.add_argument("--draw", "--svg", "--png", metavar="FILE", dest="draw",
                             help="draw every captured graph that reads a pool: the nodes around each pool, before "
                                  "and after side by side, changed nodes and folded permutations in colour; one "
                                  "picture per graph, FILE with the graph's number added (pic.svg -> pic-0.svg, "
                                  "pic-1.svg, ...). The format is FILE's suffix: .svg or .png (needs graphviz's "
                                  "`dot` program) or .dot (Graphviz source, needs nothing)")
        else:
            sub.add_argument("--rtol", type=_tolerance, default=None, help="relative tolerance (default: exact)")
            sub.add_argument("--atol", type=_tolerance, default=None, help="absolute tolerance (default: exact)")
    return parser


def _logging(verbose: int) -> logging.Handler | None:
    """-v: the layoutpass logger's INFO lines on stderr (-vv: DEBUG too)."""
    if not verbose:
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s layoutpass: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    handler.previous_level = logger.level
    logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    return handler


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = _logging(getattr(args, "verbose", 0))
    try:
        from .layout import requested

        requested(args.layout)  # checked before anything is loaded, captured or printed
        if getattr(args, "draw", None):
            from .drawing import check_target

            check_target(args.draw)  # a format, a `dot` program and a folder, before anything is optimized
        return args.func(args)
    except LayoutPassError as err:
        print(f"layoutpass: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layoutpass: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `layoutpass inspect ... | head`: the reader has gone
        sys.stdout = open(os.devnull, "w")
        return 141
    finally:
        if handler is not None:
            logger = logging.getLogger(LOGGER)
            logger.removeHandler(handler)
            logger.setLevel(handler.previous_level)
