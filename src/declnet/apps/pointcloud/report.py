"""Tables (markdown) and plots (PNG) of a sweep folder, in the style of the paper's
Tables 3–5 and Fig. 5."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._common import read_json, write_text_atomic
from .model import POOLS

__all__ = ["POOL_LABELS", "accuracy_table", "collect", "plot", "timing_table", "write_report"]

#: Short column labels, as in the paper ("max" is PointNet's max pooling).
POOL_LABELS: dict[str, str] = {
    "max": "max",
    "quadratic": "Q",
    "pseudo_huber": "PH",
    "huber": "H",
    "welsch": "W",
    "truncated_quadratic": "TQ",
}

PROTOCOL_TITLES = {
    "same": "Same outlier rate in training and testing (Table 3 protocol)",
    "clean": "Trained without outliers, tested with outliers (Table 4 protocol)",
    "mixed": "Trained with outliers, tested at several outlier rates",
}

RESULTS_FILE = "results.md"

#: Column label of the authors' mAP (interpolated AP over the first six classes).
AUTHORS_LABEL = "authors' mAP"

#: What the metric columns mean, printed above every accuracy table.
METRICS_NOTE = (
    "Top-1 accuracy %; mAP: mean average precision × 100 over every class (softmax "
    "probabilities, the standard definition); "
    + AUTHORS_LABEL
    + ": the authors' definition, VOC-interpolated AP averaged over the first six classes "
    "only, the quantity of the paper's Tables 3 and 4 (compare with those)."
)


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Read the ``result.json`` of every finished run below ``sweep_dir``.

    Raises:
        ValueError: If the folder does not exist or holds no finished run.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ValueError(f"{sweep_dir} is not a folder")
    finals = []
    for run in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        # ``final.json`` is the name older versions gave the result.
        path = next((run / n for n in ("result.json", "final.json") if (run / n).is_file()), None)
        if path is not None:
            finals.append(read_json(path))
    if not finals:
        raise ValueError(f"{sweep_dir} has no finished runs (no */result.json)")
    return finals


def _pools(finals: list[dict[str, Any]]) -> list[str]:
    present = {f["pool"] for f in finals}
    return [p for p in POOLS if p in present]


def _grid(finals: list[dict[str, Any]], protocol: str) -> dict[tuple[str, float], dict[str, float]]:
    """The results of one protocol by (pool, test rate).

    The Table 3 grid ("same") also takes the clean row from the runs trained without outliers
    and tested at several rates (those of Table 4), when the folder holds Table 3 runs.
    """
    grid = {}
    has_same = any(f["protocol"] == "same" for f in finals)
    for f in finals:
        train = float(f["train_outlier_rate"])
        for r in f["results"]:
            rate = float(r["outlier_rate"])
            if f["protocol"] == protocol or (
                protocol == "same" and has_same and f["protocol"] == "clean" and rate == train
            ):
                grid[(f["pool"], rate)] = r
    return grid


def accuracy_table(finals: list[dict[str, Any]], protocol: str) -> str:
    """Markdown table: one row per outlier rate; per pool top-1 accuracy %, the standard mAP
    × 100 over every class, then the authors' mAP × 100 (interpolated AP over the first six
    classes, the quantity of the paper's tables; "authors' mAP" in the header).

    The best value of each row and metric is bold. Empty string when no run of the protocol
    exists. Results written before the authors' mAP existed show "–" in its columns.
    """
    grid = _grid(finals, protocol)
    if not grid:
        return ""
    pools = [p for p in _pools(finals) if any(k[0] == p for k in grid)]
    rates = sorted({k[1] for k in grid})
    head = (
        ["O %"]
        + [f"top-1 {POOL_LABELS[p]}" for p in pools]
        + [f"mAP {POOL_LABELS[p]}" for p in pools]
        + [f"{AUTHORS_LABEL} {POOL_LABELS[p]}" for p in pools]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for rate in rates:
        cells = [f"{100 * rate:g}"]
        for metric in ("top1", "map", "map_authors"):
            values = [
                grid[(p, rate)][metric] * 100
                if (p, rate) in grid and metric in grid[(p, rate)]
                else None
                for p in pools
            ]
            best = max((v for v in values if v is not None), default=None)
            for v in values:
                if v is None:
                    cells.append("–")
                else:
                    text = f"{v:.1f}"
                    cells.append(f"**{text}**" if f"{v:.1f}" == f"{best:.1f}" else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing_table(finals: list[dict[str, Any]]) -> str:
    """Markdown table of training time per point cloud (ms): data, forward, backward, per pool
    and training outlier rate (Table 5 style)."""
    pools = _pools(finals)
    train_rates = sorted({float(f["train_outlier_rate"]) for f in finals})
    head = ["O %", "ms / cloud"] + [POOL_LABELS[p] for p in pools]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    by_key = {(f["pool"], float(f["train_outlier_rate"])): f["timing_ms_per_cloud"] for f in finals}
    for rate in train_rates:
        for part, label in (("data", "Data"), ("forward", "Fwd"), ("backward", "Bwd")):
            cells = [f"{100 * rate:g}", label]
            for p in pools:
                t = by_key.get((p, rate))
                cells.append("–" if t is None else f"{t[part]:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(finals: list[dict[str, Any]], metric: str, path: str | Path) -> Path:
    """Plot ``metric`` ("top1" or "map") against the outlier rate, one line per pool, one
    panel per protocol (the paper's Fig. 5), into a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = [p for p in PROTOCOL_TITLES if _grid(finals, p)]
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.2 * len(protocols), 3.3), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        grid = _grid(finals, protocol)
        for pool in _pools(finals):
            pts = sorted((rate, r[metric] * 100) for (p, rate), r in grid.items() if p == pool)
            if pts:
                ax.plot(
                    [100 * x for x, _ in pts],
                    [y for _, y in pts],
                    marker="o",
                    ms=3,
                    label=POOL_LABELS[pool],
                )
        titles = {"same": "same rate in training", "clean": "trained clean", "mixed": "mixed"}
        ax.set_title(titles[protocol], fontsize=9)
        ax.set_xlabel("outliers %")
        ax.set_ylabel("top-1 accuracy %" if metric == "top1" else "mAP × 100")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(sweep_dir: str | Path, *, plots: bool = True) -> str:
    """Write ``results.md`` (accuracy and timing tables) and the two plots into ``sweep_dir``.

    Args:
        sweep_dir: A folder of run folders (what ``sweep`` writes).
        plots: Also write ``accuracy_vs_outliers.png`` and ``map_vs_outliers.png``.

    Returns:
        The markdown text written to ``results.md``.

    Raises:
        ValueError: If the folder holds no finished run.
    """
    sweep_dir = Path(sweep_dir)
    finals = collect(sweep_dir)
    parts = []
    for protocol, title in PROTOCOL_TITLES.items():
        table = accuracy_table(finals, protocol)
        if table:
            parts.append(
                f"### {title}\n\n{METRICS_NOTE} On the test set.\n\n{table}\n"
            )
    devices = ", ".join(sorted({f"{f['device']} × {f['world_size']}" for f in finals}))
    parts.append(
        "### Training time per point cloud (ms)\n\n"
        f"Data loading, forward and backward pass; median over epochs; device: {devices}.\n\n"
        + timing_table(finals)
        + "\n"
    )
    text = "\n".join(parts)
    write_text_atomic(sweep_dir / RESULTS_FILE, text)
    if plots:
        plot(finals, "top1", sweep_dir / "accuracy_vs_outliers.png")
        plot(finals, "map", sweep_dir / "map_vs_outliers.png")
    return text
