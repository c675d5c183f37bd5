"""A sweep over projections, and the Table 6-style report of a sweep's folder."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from .._common import read_json, write_text_atomic
from ._config import ImageConfig
from ._model import PROJECTIONS, parse_projection
from ._train import RESULT, Distributed, train

__all__ = ["format_report", "load_results", "sweep", "write_report"]

REPORT = "report.md"

# Table 6's row order: the baseline, the spheres, then the balls.
_ROW_ORDER = ("none", "l1_sphere", "l2_sphere", "linf_sphere", "l1_ball", "l2_ball", "linf_ball")


def _row_name(projection: str) -> str:
    parsed = parse_projection(projection)
    if parsed is None:
        return "ResNet-18"
    p, kind = parsed
    norm = "L∞" if math.isinf(p) else f"L{int(p)}"
    return f"ResNet-18-{norm} {kind.capitalize()}"


def sweep(
    config: ImageConfig,
    projections: Sequence[str] = PROJECTIONS,
    out_dir: Union[str, os.PathLike[str]] = "runs/image",
    *,
    resume: bool = True,
    device: str = "auto",
    progress: Optional[bool] = None,
    dist_info: Optional[Distributed] = None,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Train ``config`` once per projection, each in ``out_dir/<projection>``, then report.

    An interrupted sweep continues where it stopped: finished runs (with ``result.json``)
    are kept and an unfinished one resumes from its checkpoint, unless ``resume=False``.

    Args:
        config: The settings shared by all runs (its ``projection`` is replaced).
        projections: Names from ``PROJECTIONS``.
        out_dir: The sweep's folder.
        resume: Keep finished runs and resume unfinished ones.
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
        progress: Progress bars (``None``: only on a terminal).
        dist_info: From ``distributed_context`` under ``torchrun``.
        log: Called with lines of text to show.

    Returns:
        The results, one per projection, as :func:`train` returns them.

    Raises:
        ValueError: For an unknown or repeated projection name.
    """
    for name in projections:
        parse_projection(name)
    if len(set(projections)) != len(projections):
        raise ValueError(f"projections repeat a name: {list(projections)}")
    out = Path(out_dir)
    results = []
    for name in projections:
        run_config = config.replace(projection=name)
        results.append(
            train(
                run_config, out / name, resume=resume, overwrite=not resume, device=device,
                progress=progress,
                dist_info=dist_info, log=log,
            )
        )
    if dist_info is None or dist_info.is_main:
        write_report(out)
    return results


def load_results(run_dir: Union[str, os.PathLike[str]]) -> list[dict[str, Any]]:
    """The ``result.json`` of every run in a sweep's folder, in Table 6's row order.

    Args:
        run_dir: A folder written by :func:`sweep` (or one run's folder).

    Returns:
        The results; runs without a ``result.json`` (unfinished) are left out.

    Raises:
        FileNotFoundError: If ``run_dir`` does not exist or holds no finished run.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder {root} does not exist")
    paths = [root / RESULT] if (root / RESULT).is_file() else sorted(root.glob(f"*/{RESULT}"))
    if not paths:
        raise FileNotFoundError(
            f"no finished run in {root}: expected {root}/<projection>/{RESULT}, which "
            "`python -m declnet.apps.image sweep --out` writes"
        )
    results = [read_json(path) for path in paths]
    rank = {name: i for i, name in enumerate(_ROW_ORDER)}
    return sorted(results, key=lambda r: (rank.get(r["projection"], len(rank)), r["projection"]))


def format_report(results: Sequence[dict[str, Any]]) -> str:
    """Markdown table of results in the layout of the paper's Table 6.

    Columns: model, radius, top-1 %, top-5 %, mAP ×100 (every class, the standard
    definition), the authors' mAP ×100 (VOC-interpolated AP over the first six classes only,
    the quantity of the paper's Table 6; "–" for results written before it existed), then
    microseconds per training image for data loading, the forward pass (of which the
    projection's solve is shown separately) and the backward pass with the optimiser step.
    The best top-1, top-5 and both mAPs are bold.

    Args:
        results: As returned by :func:`train` / :func:`load_results`.

    Returns:
        The table, preceded by a line describing the setting.
    """
    if not results:
        raise ValueError("format_report needs at least one result")
    best = {
        key: max((r[key] for r in results if key in r), default=None)
        for key in ("top1", "top5", "map", "map_authors")
    }

    def metric(result: dict[str, Any], key: str) -> str:
        if key not in result:
            return "–"
        text = f"{100 * result[key]:.2f}"
        return f"**{text}**" if result[key] == best[key] and len(results) > 1 else text

    first = results[0]
    config = first.get("config", {})
    lines = [
        f"Dataset {first.get('dataset', config.get('dataset'))}: "
        f"{first.get('train_images')} training / {first.get('val_images')} validation images; "
        f"ResNet-18 width {config.get('width')} ({first.get('params'):,} parameters), "
        f"{first.get('epochs')} epoch{'' if first.get('epochs') == 1 else 's'}, "
        f"batch {config.get('batch_size')}, "
        f"device {first.get('device')}"
        + ("; masked (plateau-free) projection gradients" if config.get("masked") else "")
        + ". Times in µs per training image.",
        "",
        "| Model | Radius | Top-1 % | Top-5 % | mAP ×100 | authors' mAP ×100 | Data µs "
        "| Fwd µs | (Proj µs) | Bwd µs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        radius = "–" if result["radius"] is None else f"{result['radius']:.3g}"
        projection_us = "–" if result["projection"] == "none" else f"{result['projection_us']:.1f}"
        lines.append(
            f"| {_row_name(result['projection'])} | {radius} | {metric(result, 'top1')} | "
            f"{metric(result, 'top5')} | {metric(result, 'map')} | "
            f"{metric(result, 'map_authors')} | {result['data_us']:.1f} | "
            f"{result['forward_us']:.1f} | {projection_us} | {result['backward_us']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(run_dir: Union[str, os.PathLike[str]]) -> str:
    """Write ``report.md`` (the Table 6-style table) into a sweep's folder.

    Args:
        run_dir: A folder written by :func:`sweep`.

    Returns:
        The markdown that was written.

    Raises:
        FileNotFoundError: If the folder holds no finished run.
    """
    text = format_report(load_results(run_dir))
    path = Path(run_dir) / REPORT
    write_text_atomic(path, text)
    return text
