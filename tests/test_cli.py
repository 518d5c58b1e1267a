"""The command line, as a user runs it, and every mistake a user makes answered in one line."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import layoutpass
from layoutpass.cli import main
from layoutpass.examples import ZOO

TESTS = str(Path(__file__).parent)


def run(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "layoutpass", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_demo():
    done = run("demo", "--model", "mamba2")
    assert done.returncode == 0, done.stderr
    assert "SD -> DS" in done.stdout and "equivalent over" in done.stdout
    assert "-    transpose = torch.ops.aten.transpose.int(conv_state, 1, 2)" in done.stdout
    assert "+    permute_default = torch.ops.aten.permute.default(conv_state, [0, 2, 1])" in done.stdout


def test_inspect_shows_report_and_diff():
    done = run("inspect", "cli_factories:one_conv", "--entry", "0")
    assert done.returncode == 0, done.stderr
    assert "pool pool (slot, tok, dim) (6, 3, 8): SD -> DS" in done.stdout
    assert "mT.default [permutation] -> permutation folded" in done.stdout
    assert "conv_update.default [kernel] -> kernel-direct: DS kernel" in done.stdout


def test_check_passes_and_fails():
    ok = run("check", "layoutpass.examples.models:mamba1")
    assert ok.returncode == 0 and "equivalent over 22 steps" in ok.stdout, ok.stderr
    bad = run("check", "cli_factories:noisy")
    assert bad.returncode == 1 and "NOT equivalent" in bad.stdout


def test_a_mistake_through_python_dash_m():
    done = run("inspect", "nosuch:thing")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"layoutpass: factory: no module named 'nosuch' in the current directory ({os.getcwd()}) " \
                          f"or on sys.path\n"


def mistake(capsys, *argv) -> str:
    """The one line a mistake prints: on stderr, nothing on stdout, exit code 2."""
    try:
        code = main(list(argv))
    except SystemExit as done:  # argparse's own errors
        code = done.code
    out, err = capsys.readouterr()
    assert (code, out) == (2, ""), (code, out, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err.rstrip("\n")


@pytest.mark.parametrize("command, factory, line", [
    ("inspect", "broken", "factory: cli_factories:broken raised RuntimeError: checkpoint not found"),
    ("inspect", "needs_size",
     "factory: cli_factories:needs_size must take no arguments (missing a required argument: 'size')"),
    ("inspect", "NOT_CALLABLE",
     "factory: cli_factories:NOT_CALLABLE is not a function returning a model (it is of type int)"),
    ("check", "triple", "factory: cli_factories:triple returned a tuple of 3; expected a model or (model, calls)"),
    ("check", "swapped", "factory: cli_factories:swapped returned a list as the model, not an nn.Module"),
    ("check", "calls_not_list", "factory: cli_factories:calls_not_list returned a dict as the calls; "
                                "expected a list of dicts of keyword arguments"),
    ("inspect", "call_not_dict", "call 1: expected a dict of keyword arguments, got a list"),
    ("check", "wrong_keyword", "call 0: OneConv.forward(x, slots) takes no keyword 'slot'"),
    ("inspect", "raises_in_forward", "call 1: RaisesOnPairs.forward raised ValueError: pairs are not supported"),
])
def test_factory_and_call_mistakes(capsys, command, factory, line):
    assert mistake(capsys, command, f"cli_factories:{factory}") == f"layoutpass: {line}"


def test_check_with_no_calls_is_an_error_not_equivalent(capsys):
    line = mistake(capsys, "check", "cli_factories:no_calls")
    assert line == "layoutpass: factory: cli_factories:no_calls gave no calls: nothing to capture or compare"


def test_a_call_that_does_not_capture_is_said_so(capsys):
    """Dynamo cannot capture a forward that branches on its data: it runs as written, nothing
    is found, and the refusal says why in one line (not blamed on example_inputs)."""
    for command in ("check", "inspect"):  # captured on first use by check, up front by inspect
        line = mistake(capsys, command, "cli_factories:not_capturable")
        assert "not captured" in line and "Data-dependent branching" in line and "example_inputs" not in line, line


def test_entry_out_of_range(capsys):
    for entry in ("99", "-1"):
        line = mistake(capsys, "inspect", "cli_factories:one_conv", "--entry", entry)
        assert re.fullmatch(f"layoutpass: entry: {entry} is not one of the [12] captured graphs", line), line


def test_bad_layout_before_anything_runs(capsys, monkeypatch):
    monkeypatch.setattr(layoutpass, "optimize", None)  # loading or capturing would fail otherwise
    for argv in (("demo",), ("check", "cli_factories:one_conv"), ("inspect", "nosuch:thing")):
        line = mistake(capsys, *argv, "--layout", "XY")
        assert line == ("layoutpass: layout: unknown layout 'XY'; expected one of ['SD', 'DS', 'KV', 'VK', 'auto'], "
                        "or a mapping {kind: layout}")


def test_demo_models_listed_and_checked(capsys):
    with pytest.raises(SystemExit) as done:
        main(["demo", "--help"])
    help_text = capsys.readouterr().out
    assert done.value.code == 0 and all(name in help_text for name in ZOO)
    line = mistake(capsys, "demo", "--model", "mamba3")
    assert line.startswith("layoutpass demo: argument --model: invalid choice: 'mamba3'")
    assert all(repr(name) in line for name in ZOO)


def test_argparse_mistakes_are_one_line(capsys):
    assert mistake(capsys, "demo", "--seed", "x").startswith("layoutpass demo: argument --seed: invalid int value")
    assert mistake(capsys, "frobnicate").startswith("layoutpass: argument command: invalid choice: 'frobnicate'")


def test_internal_errors_keep_their_traceback(monkeypatch):
    def bug(*args, **kwargs):
        raise KeyError("a layoutpass bug")

    monkeypatch.setattr(layoutpass, "optimize", bug)
    with pytest.raises(KeyError, match="a layoutpass bug"):
        main(["inspect", "cli_factories:one_conv", "--entry", "0"])


def test_inspect_of_one_call_needs_no_entry(capsys):
    """One call captures one graph: the default diff is of a graph that exists."""
    assert main(["inspect", "cli_factories:one_call"]) == 0
    out = capsys.readouterr().out
    assert "model.graph" in out and "(graph 0 of 0-0: --entry N shows another), before -> after:" in out


def test_the_example_model_names_in_help_are_the_zoo():
    from layoutpass.cli import MODELS

    assert sorted(MODELS) == sorted(ZOO)


def test_version():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert layoutpass.__version__ == pyproject["project"]["version"]
    done = run("--version")
    assert (done.returncode, done.stdout) == (0, f"layoutpass {layoutpass.__version__}\n")


def test_every_option_has_help():
    import argparse

    from layoutpass.cli import _parser

    [commands] = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, (name, action.option_strings or action.dest)
    demo_help = subprocess.run([sys.executable, "-m", "layoutpass", "demo", "--help"], capture_output=True, text=True)
    assert re.search(r"--seed SEED +seed of the serving scenario", demo_help.stdout)


# -- finding the user's module (issue 22, item 2) ----------------------------------------------------

MYFAC = '''
import torch
from torch import nn

from layoutpass.kernels import conv_update


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 4))
        self.register_buffer("pool", torch.randn(6, 3, 8))

    def forward(self, x, slots):
        return conv_update(x, self.pool.transpose(1, 2), self.weight, None, "silu", slots, out=torch.empty_like(x))


def good():
    return Conv(), [dict(x=torch.randn(3, 8), slots=torch.tensor([1, 3, 4], dtype=torch.int32))]
'''


def test_the_command_finds_a_module_in_the_current_directory(tmp_path):
    """As `python -m` does: the console script too (its sys.path[0] is its own folder)."""
    (tmp_path / "myfac.py").write_text(MYFAC)
    script = Path(sys.executable).with_name("layoutpass")
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != TESTS and p != os.curdir]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(kept))  # nothing on it finds the current directory
    for command in ([str(script)] if script.exists() else []) + [sys.executable + " -m layoutpass"]:
        done = subprocess.run(command.split() + ["check", "myfac:good"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0 and done.stdout.startswith("equivalent over 1 step ("), (command, done.stderr)


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A fresh current directory for factories written by the test; sys.path as it was after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("userfac")]:
        del sys.modules[name]


@pytest.mark.parametrize("source, line", [
    ("import torch\nimport nosuch_dependency_xyz\n",
     " at userfac_dep.py:2: ModuleNotFoundError: No module named 'nosuch_dependency_xyz'"),
    ("from torch import no_such_name\n", " at userfac_dep.py:1: ImportError: cannot import name 'no_such_name'"),
    ("x = 1\nraise RuntimeError('no GPU here')\n", " at userfac_dep.py:2: RuntimeError: no GPU here"),
    ("def good(:\n", ": SyntaxError: invalid syntax (userfac_dep.py, line 1)"),
])
def test_a_module_that_fails_to_import_says_why(capsys, here, source, line):
    (here / "userfac_dep.py").write_text(source)
    got = mistake(capsys, "inspect", "userfac_dep:good")
    assert got.startswith(f"layoutpass: factory: importing 'userfac_dep' failed{line}"), got


EXPECTED = "expected MODULE:FACTORY (e.g. mymodel:build, layoutpass.examples.models:hybrid), got "


@pytest.mark.parametrize("spec, line", [
    ("userfac_ok", EXPECTED + "'userfac_ok'"),
    ("userfac_ok:", EXPECTED + "'userfac_ok:'"),
    ("userfac_ok.py:good", "'userfac_ok.py' is a file name: give the module, userfac_ok:good"),
    ("userfac_ok:godo", "module 'userfac_ok' ({}) has no 'godo'; did you mean 'good'?"),
])
def test_a_misspelt_factory_is_named(capsys, here, spec, line):
    (here / "userfac_ok.py").write_text("def good():\n    pass\n")
    assert mistake(capsys, "check", spec) == "layoutpass: factory: " + line.format(here / "userfac_ok.py")


# -- logging and progress (issue 22, item 3) ----------------------------------------------------------

@pytest.mark.parametrize("where", ["after", "before"])
def test_verbose_logs_each_captured_graph(capsys, where):
    import logging

    logger = logging.getLogger("layoutpass")
    handlers, level = list(logger.handlers), logger.level
    argv = ["check", "cli_factories:one_conv"]
    assert main(argv + ["-v"] if where == "after" else ["--verbose"] + argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("equivalent over 2 steps")
    captured = re.findall(r"^\d\d:\d\d:\d\d layoutpass: captured (model\.graph\d+\(\[.*?\]\)) \((.+?)\) in \d+\.\d+ s", err, re.M)
    assert len(captured) >= 2, err  # one line per graph: its name, why it was captured, its time
    assert captured[0][1] == "first call", err
    assert (logger.handlers, logger.level) == (handlers, level)  # the handler goes with the command


def test_quiet_without_verbose(capsys):
    assert main(["check", "cli_factories:one_conv"]) == 0
    assert capsys.readouterr().err == ""


class FakeBar:
    made = []

    def __init__(self, total, desc, **options):
        self.total, self.desc, self.n, self.closed = total, desc, 0, False
        FakeBar.made.append(self)

    def update(self, n=1):
        self.n += n

    def close(self):
        self.closed = True


def test_check_shows_progress_where_tqdm_is_installed(capsys, monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=FakeBar))
    FakeBar.made.clear()
    assert main(["check", "cli_factories:one_conv"]) == 0
    [bar] = FakeBar.made
    assert (bar.total, bar.n, bar.closed, bar.desc) == (2, 2, True, "equivalence")
    monkeypatch.setitem(sys.modules, "tqdm", None)  # not installed: no bar, same result
    assert main(["check", "cli_factories:one_conv"]) == 0
    assert capsys.readouterr().out.count("equivalent over 2 steps") == 2


HELP_IMPORTS = """
import sys, types
package = types.ModuleType("layoutpass")  # the package without its __init__: what the CLI itself imports
package.__path__, package.__version__ = [{folder!r}], "0"
sys.modules["layoutpass"] = package
from layoutpass.cli import main
for argv in (["--help"], ["demo", "--help"], ["inspect", "--help"], ["check", "--help"], ["--version"]):
    try:
        main(argv)
    except SystemExit:
        pass
print("imported:", sorted(m for m in ("torch", "sympy", "numpy", "layoutpass.examples") if m in sys.modules))
"""


def test_help_imports_nothing_heavy():
    folder = str(Path(layoutpass.__file__).parent)
    done = subprocess.run([sys.executable, "-c", HELP_IMPORTS.format(folder=folder)], capture_output=True, text=True)
    assert done.stdout.endswith("imported: []\n"), done.stdout[-300:] + done.stderr


def test_help_is_fast_through_the_package():
    """`layoutpass --help` imports no torch, once the package's __init__ imports lazily too."""
    probe = "import sys, layoutpass; print('torch' in sys.modules)"
    if subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "True":
        pytest.skip("layoutpass/__init__.py imports torch when the package is imported")
    code = "import runpy, sys; sys.argv = ['layoutpass', '--help']\ntry:\n    runpy.run_module('layoutpass', " \
           "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.endswith("False\n"), done.stdout[-300:] + done.stderr


# -- pictures (issue 22, item 4) ----------------------------------------------------------------------

def test_draw_writes_one_dot_per_graph_without_pydot(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydot", None)
    assert main(["inspect", "cli_factories:one_conv", "--draw", str(tmp_path / "g.dot")]) == 0
    out = capsys.readouterr().out
    written = re.findall(r"^wrote (\S+): (model\.graph\d+\(.*\))$", out, re.M)
    graphs = int(re.search(r"(\d+) captured graphs", out).group(1))  # 1 or 2: Dynamo may take both sizes in one
    assert [Path(f).name for f, _ in written] == [f"g-{i}.dot" for i in range(graphs)], out
    text = Path(written[0][0]).read_text()
    assert text.startswith("digraph layoutpass {") and text.rstrip().endswith("}")
    # the pool in its storage order each side; the model's mT, which the report says was folded
    assert re.search(r'"before_pool" \[label="pool pool\\n\(slot, tok, dim\) \(6, 3, 8\)\\nstored SD"', text), text
    assert re.search(r'"after_pool" \[label="pool pool\\n\(slot, tok, dim\) \(6, 3, 8\)\\nstored DS"', text), text
    assert re.search(r'"before_m_t" \[label="m_t\\nmT\\n\(6, 8, 3\)\\n\[permutation folded\]"', text), text
    assert "REMOVED" not in text and "ADDED" not in text and "CHANGED" not in text  # not lowered: no node changed


def test_what_a_picture_marks_is_what_changed(tmp_path):
    """Lowered, the mT becomes a permute: the marks are the graphs' own difference."""
    import pass_models as pm

    from layoutpass import optimize
    from layoutpass.drawing import changes, dot, parts

    fast = optimize(pm.OneConv("mT"), "DS", lower=True, example_inputs=[pm.inputs(3)])
    [(_, p)] = parts(fast)
    before = {n.name: n for n in p.before.graph.nodes}
    after = {n.name: n for n in p.after.graph.nodes}
    marks = changes(p.before, p.after)
    assert set(marks["before"]) - set(marks["after"]) == before.keys() - after.keys() == {"m_t"}
    assert set(marks["after"]) - set(marks["before"]) == after.keys() - before.keys() and len(after) == len(before)
    assert {n for n, m in marks["after"].items() if m == "changed"} == {"conv_update"}  # reads the new view
    text = dot(p)
    assert re.search(r'"before_m_t" \[label="m_t\\nmT\\n\(6, 8, 3\)\\n\[permutation folded\]\\nREMOVED"', text), text
    assert re.search(r'"before_conv_update" \[label="conv_update\\n\[kernel-direct\]\\nCHANGED"', text), text
    added = next(iter(after.keys() - before.keys()))
    assert re.search(rf'"after_{added}" \[label="{added}\\npermute\\n\(6, 8, 3\)\\nADDED"', text), text


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")
@pytest.mark.parametrize("suffix, magic", [(".svg", b"<?xml"), (".png", b"\x89PNG")])
def test_draw_renders_the_format_of_the_suffix(capsys, tmp_path, suffix, magic):
    for flag in ("--draw", "--svg", "--png"):
        path = tmp_path / f"{flag.strip('-')}{suffix}"
        assert main(["inspect", "cli_factories:one_call", flag, str(path)]) == 0
        assert numbered(path, 0).read_bytes().startswith(magic)


def numbered(path, index):
    return path.with_name(f"{path.stem}-{index}{path.suffix}")


def test_draw_mistakes_before_anything_is_optimized(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(layoutpass, "optimize", None)  # optimizing would fail otherwise
    line = mistake(capsys, "inspect", "cli_factories:one_conv", "--draw", "out.pdf")
    assert line == "layoutpass: draw: out.pdf: cannot tell the picture format from '.pdf'; end the file name in " \
                   ".svg, .png or .dot"
    line = mistake(capsys, "inspect", "cli_factories:one_conv", "--png", "out")
    assert line.endswith("cannot tell the picture format from 'no suffix'; end the file name in .svg, .png or .dot")
    line = mistake(capsys, "inspect", "cli_factories:one_conv", "--draw", str(tmp_path / "no" / "g.dot"))
    assert line == f"layoutpass: draw: {tmp_path / 'no' / 'g.dot'}: no folder '{tmp_path / 'no'}'"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    for suffix in (".svg", ".png"):
        line = mistake(capsys, "inspect", "cli_factories:one_conv", "--svg", f"g{suffix}")
        assert line == f"layoutpass: draw: rendering g{suffix} needs graphviz's `dot` program, which is not on " \
                       f"PATH: install graphviz (apt install graphviz, brew install graphviz or conda install " \
                       f"graphviz), or write .dot"


# -- small mistakes (issue 22, item 7) ----------------------------------------------------------------

def test_tolerances_must_be_numbers_at_least_zero(capsys):
    line = mistake(capsys, "check", "cli_factories:one_conv", "--rtol", "-1")
    assert line == "layoutpass check: argument --rtol: expected a number >= 0, got '-1' (see layoutpass check --help)"
    assert "invalid _tolerance value: 'x'" in mistake(capsys, "check", "cli_factories:one_conv", "--atol", "x")


def test_an_interrupt_is_one_line(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(layoutpass, "optimize", interrupted)
    try:
        code = main(["check", "cli_factories:one_conv"])
    except KeyboardInterrupt:
        code = "a traceback"
    assert code == 130
    assert capsys.readouterr().err == "layoutpass: interrupted\n"


def check_equivalence_call(*args, **kwargs):
    from layoutpass import check_equivalence, optimize
    import pass_models as pm

    model = pm.OneConv("mT")
    return check_equivalence(model, optimize(model, "DS"), *args, **kwargs)


def test_check_equivalence_takes_plain_dicts():
    import pass_models as pm

    result = check_equivalence_call([pm.inputs(3), pm.inputs(2), pm.inputs(3)])
    assert result.ok and [s.kind for s in result.steps] == ["call"] * 3
    assert str(result).startswith("equivalent over 3 steps (rtol=0.0, atol=0.0)")
    one = check_equivalence_call([pm.inputs(3)])
    assert str(one).splitlines()[0] == "equivalent over 1 step (rtol=0.0, atol=0.0)"


@pytest.mark.parametrize("args, kwargs, message", [
    ((), dict(steps=-1), "steps: expected an int >= 0, got -1"),
    ((), dict(steps=2.5), "steps: expected an int >= 0, got 2.5"),
    ((), dict(prefills=0), "prefills: expected an int >= 1, got 0"),
    ((), dict(prefills=-1), "prefills: expected an int >= 1, got -1"),
    ((), dict(seed="0"), "seed: expected an int, got '0'"),
    ((), dict(rtol=-1e-3), "rtol: expected a number >= 0, got -0.001"),
    ((), dict(atol=True), "atol: expected a number >= 0, got True"),
    (({"x": 1},), {}, "scenario: expected a list of steps, got a dict (one call? put it in a list: [{...}])"),
    (("xy",), {}, "scenario: expected a list of steps, got a str"),
    (([],), {}, "scenario: no steps: nothing to compare"),
    (([(1, 2)],), {}, "scenario[0]: expected a dict of keyword arguments or a Step, got a tuple"),
    (([{1: 2}],), {}, "scenario[0]: keyword arguments are named by strings, got 1"),
])
def test_check_equivalence_argument_mistakes(args, kwargs, message):
    with pytest.raises(layoutpass.ArgumentError) as err:
        check_equivalence_call(*args, **kwargs)
    assert str(err.value) == message
