"""The README's Python blocks run as written."""

import re
from pathlib import Path

import pytest

README = (Path(__file__).parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.mark.parametrize("block", range(len(BLOCKS)))
def test_readme_block_runs(block, capsys):
    code = BLOCKS[block]
    if "transformers" in code:
        pytest.importorskip("transformers")
    exec(compile(code, f"README.md block {block}", "exec"), {})
    out = capsys.readouterr().out
    assert out and "NOT equivalent" not in out  # every block shows something, and nothing differs


def test_the_readme_stands_alone():
    assert "../" not in README and "shared/" not in README
