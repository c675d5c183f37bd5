"""The image experiment under ``torchrun`` with two CPU processes (Gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the Gloo backend",
)
def test_two_process_smoke_sweep(tmp_path):
    src = Path(__file__).resolve().parents[2] / "src"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "declnet.apps.image", "sweep", "--preset", "smoke", "--projections", "none",
        "--device", "cpu", "--no-progress", "--out", str(tmp_path),
    ]  # fmt: skip
    finished = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads((tmp_path / "none" / "result.json").read_text())
    assert result["device"] == "cpu x2"
    # Each process evaluates half of the validation images; the gathered scores cover all 48.
    assert result["val_images"] == result["val_evaluated"] == 48
    assert 0 <= result["top1"] <= 1
    assert (tmp_path / "report.md").is_file()
