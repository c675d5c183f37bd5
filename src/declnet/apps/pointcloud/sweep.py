"""Run a grid of trainings (pools × outlier rates), resuming where an earlier sweep stopped."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from .._common import distributed_info
from .config import SweepConfig
from .train import CHECKPOINT_FILE, RESULT_FILE, load_data, run_training

__all__ = ["run_sweep"]


def run_sweep(sweep: SweepConfig, out: str | Path, *, verbose: bool = True) -> list[dict[str, Any]]:
    """Run every run of ``sweep`` in ``out/<run name>``.

    Finished runs (with ``result.json``) are skipped and interrupted ones continue from their
    checkpoint, so running the same sweep again completes it. The dataset is loaded once.

    Args:
        sweep: The grid.
        out: The sweep folder.
        verbose: Print one line per run to stderr.

    Returns:
        The ``result.json`` contents of every run, in grid order.
    """
    out = Path(out)
    info = distributed_info()
    runs = sweep.runs()
    data = None
    finals = []
    for i, (name, config) in enumerate(runs, 1):
        run_dir = out / name
        if not (run_dir / RESULT_FILE).is_file() and data is None:
            data = load_data(sweep.base)
        state = "resuming" if (run_dir / CHECKPOINT_FILE).is_file() else "training"
        if (run_dir / RESULT_FILE).is_file():
            state = "done"
        start = time.perf_counter()
        final = run_training(config, run_dir, resume=True, data=data, name=name)
        if verbose and info.is_main and final is not None:
            summary = ", ".join(
                f"O={100 * r['outlier_rate']:g}%: {100 * r['top1']:.1f}" for r in final["results"]
            )
            took = "already finished" if state == "done" else f"{time.perf_counter() - start:.0f} s"
            print(
                f"[{i}/{len(runs)}] {name}: top-1 {summary} ({took})", file=sys.stderr, flush=True
            )
        finals.append(final)
    return finals
