"""The command line, as a user runs it, and every mistake a user makes answered in one line."""

import os
import re
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
    assert done.stderr.startswith("layoutpass: factory: cannot load 'nosuch:thing'") and done.stderr.count("\n") == 1


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


def test_svg_without_pydot(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydot", None)  # torch's drawer then raises RuntimeError, not ImportError
    line = mistake(capsys, "inspect", "cli_factories:one_conv", "--entry", "0", "--svg", "out.svg")
    assert line == "layoutpass: svg: drawing needs pydot (pip install pydot)"


def test_entry_out_of_range(capsys):
    for entry in ("99", "-1"):
        line = mistake(capsys, "inspect", "cli_factories:one_conv", "--entry", entry)
        assert re.fullmatch(f"layoutpass: entry: {entry} is not one of the [12] captured graphs", line), line


def test_bad_layout_before_anything_runs(capsys, monkeypatch):
    monkeypatch.setattr(layoutpass, "optimize", None)  # loading or capturing would fail otherwise
    for argv in (("demo",), ("check", "cli_factories:one_conv"), ("inspect", "nosuch:thing")):
        line = mistake(capsys, *argv, "--layout", "XY")
        assert line == "layoutpass: layout: unknown layout 'XY'; expected one of ['SD', 'DS', 'KV', 'VK']"


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
