"""The point-cloud experiment of the paper (§7, Tables 3–5, Fig. 5).

A PointNet classifier whose global max pooling is replaced by robust pooling
(:func:`declnet.layers.robust_pool`), trained and tested on point clouds in which a fraction
of the points are replaced by outliers. Run it with ``python -m declnet.apps.pointcloud``;
``--help`` lists the sub-commands (train, sweep, report, export).
"""

from .._metrics import mean_average_precision, top1_accuracy
from .config import PRESETS, RunConfig, SweepConfig
from .data import PointCloudSet, load_dataset
from .model import POOLS, PointNet
from .outliers import inject_outliers
from .report import write_report
from .shapes import SYNTHETIC_CLASSES, generate_synthetic
from .sweep import run_sweep
from .train import evaluate, run_training

__all__ = [
    "POOLS",
    "PRESETS",
    "SYNTHETIC_CLASSES",
    "PointCloudSet",
    "PointNet",
    "RunConfig",
    "SweepConfig",
    "evaluate",
    "generate_synthetic",
    "inject_outliers",
    "load_dataset",
    "mean_average_precision",
    "run_sweep",
    "run_training",
    "top1_accuracy",
    "write_report",
]
