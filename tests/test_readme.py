"""The README's quickstart runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(capsys):
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README quickstart", "exec"), {})
    assert "gradient check passed" in capsys.readouterr().out


def test_node_without_solve_runs():
    """The README's node without solve() works as written, after the quickstart."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    scope: dict = {}
    exec(compile(blocks[0], "README quickstart", "exec"), scope)
    exec(compile(blocks[1], "README without solve", "exec"), scope)
    y = scope["y"]
    assert y.shape == scope["x"].shape
    assert bool(((y.detach() ** 2).sum(-1) <= 1 + 1e-8).all())
    y.sum().backward()
