"""The examples of docs/pytorch-features.md run as written, in order, in one scope."""

from __future__ import annotations

import re
from pathlib import Path

import torch

PAGE = Path(__file__).resolve().parents[1] / "docs" / "pytorch-features.md"


def test_feature_page_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 6
    scope: dict = {}
    torch._dynamo.reset()
    for i, code in enumerate(blocks):
        exec(compile(code, f"{PAGE.name} example {i}", "exec"), scope)
    assert scope["yh"].dtype == torch.bfloat16
