"""The command line, as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = str(Path(__file__).parent)


def run(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "layoutpass", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_demo():
    done = run("demo", "--model", "mamba2")
    assert done.returncode == 0, done.stderr
    assert "SD -> DS" in done.stdout and "equivalent over" in done.stdout
    assert "-    transpose = torch.ops.aten.transpose.int(b_mixers_0_conv_state" in done.stdout


def test_bad_arguments_are_one_line():
    done = run("demo", "--layout", "XY")
    assert done.returncode == 2
    assert done.stderr.strip() == "layoutpass: layout: unknown layout 'XY'; expected one of ['DS', 'SD']"
    assert run("frobnicate").returncode == 2


def test_inspect_shows_report_and_diff():
    done = run("inspect", "cli_factories:one_conv", "--entry", "0")
    assert done.returncode == 0, done.stderr
    assert "pool pool (6, 3, 8): SD -> DS" in done.stdout
    assert "-    m_t = torch.ops.aten.mT.default(b_pool)" in done.stdout
    assert "conv_update.default(x, b_pool" in done.stdout


def test_check_passes_and_fails():
    ok = run("check", "layoutpass.examples.models:mamba1")
    assert ok.returncode == 0 and "equivalent over 22 steps" in ok.stdout, ok.stderr
    bad = run("check", "cli_factories:noisy")
    assert bad.returncode == 1 and "NOT equivalent" in bad.stdout


def test_bad_factory_and_entry():
    done = run("inspect", "nosuch:thing")
    assert done.returncode == 2 and done.stderr.startswith("layoutpass: factory: cannot load 'nosuch:thing'")
    done = run("inspect", "cli_factories:one_conv", "--entry", "7")
    assert done.returncode == 2 and "entry: 7 is not one of the 1 captured entries" in done.stderr  # batch 3 and 2: one entry
