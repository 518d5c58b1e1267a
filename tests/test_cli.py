"""The command line, as a user runs it."""

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "layoutpass", *args], capture_output=True, text=True, timeout=300)


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
