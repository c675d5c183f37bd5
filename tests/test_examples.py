"""Every tutorial and cookbook script runs in fast mode and passes its own checks."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted([*ROOT.glob("tutorials/*.py"), *ROOT.glob("cookbook/*.py")])
# Over about five seconds on one core in fast mode.
SLOW = {"pnp_pose.py", "optnet_qp.py"}


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_script_is_collected():
    assert len(list(ROOT.glob("tutorials/*.py"))) >= 16
    assert len(list(ROOT.glob("cookbook/*.py"))) >= 7


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, id=f"{p.parent.name}/{p.stem}",
                  marks=[pytest.mark.slow] if p.name in SLOW else []) for p in SCRIPTS],
)
def test_example_runs_and_checks_itself(path: Path, capsys: pytest.CaptureFixture[str]):
    module = _load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module.main(fast=True)
    assert "ok:" in capsys.readouterr().out


def test_command_line_fast_flag():
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    script = ROOT / "tutorials" / "01_simple_worked_example.py"
    done = subprocess.run([sys.executable, str(script), "--fast"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ok: gradcheck against finite differences" in done.stdout
