"""Every file in examples/ runs as `python examples/<file>.py` (after `pip install -e .`): the
scripts, each in a fresh interpreter, print what they show; the example models' own modules run
as scripts too (they import one another absolutely)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["optimize_model.py", "show_graphs.py", "check_model.py", "transformers_model.py"]
MODULES = ["__init__.py", "attention.py", "common.py", "deltanet.py", "lm.py", "mamba.py", "models.py",
           "recurrence.py", "scenario.py", "short_conv.py"]


def python(*args, cwd):
    """A fresh interpreter in `cwd`, as a user starts one (no tests/ on its path)."""
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() !=
            Path(__file__).parent]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_every_file_is_run_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SCRIPTS + MODULES)


def test_the_model_modules_run_as_scripts(tmp_path):
    """As `python examples/<module>.py` runs them (sys.path[0] the folder, no package): one
    interpreter for all, each run as __main__."""
    code = ("import os, runpy, sys\n"
            "for path in sys.argv[1:]:\n"
            "    sys.path[0] = os.path.dirname(path)\n"
            "    runpy.run_path(path, run_name='__main__')\n"
            "    print('ran', os.path.basename(path))\n")
    out = python("-c", code, *(str(EXAMPLES / m) for m in MODULES), cwd=tmp_path)
    assert out.split("\n")[:-1] == [f"ran {m}" for m in MODULES]


def test_optimize_model(tmp_path):
    out = python(str(EXAMPLES / "optimize_model.py"), cwd=tmp_path)
    assert out.startswith("hybrid: OptimizedLM, logits (3, 1, 64); asked for: conv pools DS\n"), out
    assert "layoutpass report: 3 conv-state pools" in out
    assert sorted(line.split()[1] for line in out.splitlines() if "): SD -> DS (" in line) == [
        "mixers.0.conv_state", "mixers.2.conv_state", "mixers.3.conv_state"], out
    assert "transpose.int [permutation] -> permutation folded" in out and "kernel-direct: DS kernel" in out


def test_show_graphs(tmp_path):
    out = python(str(EXAMPLES / "show_graphs.py"), "graphs.dot", cwd=tmp_path)
    assert "Mamba2Mixer.graph1([19, 32], [4], [3], [3]): captured, proven and rewritten in " in out, out
    assert "before -> after (the lines that changed):\n" in out
    assert "\n-    transpose = torch.ops.aten.transpose.int(conv_state, 1, 2);  conv_state = None\n" in out
    assert "\n+    permute_default = torch.ops.aten.permute.default(conv_state, [0, 2, 1]);  conv_state = None\n" in out
    wrote = [line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("wrote ")]
    assert wrote == ["graphs-0.dot", "graphs-1.dot"], out
    assert all((tmp_path / name).read_text().startswith("digraph layoutpass {") for name in wrote)


def test_check_model(tmp_path):
    out = python(str(EXAMPLES / "check_model.py"), cwd=tmp_path)
    assert out.startswith("hybrid over its serving scenario: equivalent over 22 steps (rtol=0.0, atol=0.0)\n"), out
    assert "\nMyShortConv over 3 calls: equivalent over 3 steps (rtol=0.0, atol=0.0)\n" in out
    assert "pool conv_state (slot, tok, dim) (8, 3, 16): SD -> DS (token axis 1 shifted and written back" in out


def test_transformers_model(tmp_path):
    pytest.importorskip("transformers")
    out = python(str(EXAMPLES / "transformers_model.py"), cwd=tmp_path)
    assert out.startswith("transformers ") and ", Mamba2ForCausalLM, layoutpass DS:\n" in out, out
    assert "  same tokens: True\n" in out and "layoutpass report: 2 conv-state pools" in out


def test_transformers_model_without_transformers(tmp_path):
    script = str(EXAMPLES / "transformers_model.py")
    code = f"import runpy, sys\nsys.modules['transformers'] = None\nrunpy.run_path({script!r}, run_name='__main__')"
    out = python("-c", code, cwd=tmp_path)
    assert out == "skipped: this example needs transformers (pip install transformers)\n"
