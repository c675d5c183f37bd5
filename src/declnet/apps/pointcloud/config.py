"""Run configuration and the presets (smoke, demo, paper)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .._loop import check_options
from .model import POOLS

__all__ = ["PAPER_OUTLIER_RATES", "PRESETS", "RunConfig", "SweepConfig", "apply_preset"]

#: The outlier rates of the paper's Tables 3 and 4.
PAPER_OUTLIER_RATES: tuple[float, ...] = (0.0, 0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class RunConfig:
    """Everything that determines one training run (and so its results).

    Attributes:
        dataset: "synthetic", "modelnet40_h5" or "modelnet40_off".
        data_root: Folder of the real datasets.
        cache_dir: Cache folder of the sampled OFF meshes.
        num_classes: Synthetic: use the first K classes (None: all 14).
        train_per_class: Synthetic: training objects per class.
        test_per_class: Synthetic: test objects per class.
        num_points: Points N per cloud.
        width: Feature width W of PointNet (1024 in the paper).
        pool: "max" or a robust pooling (see :data:`~declnet.apps.pointcloud.model.POOLS`).
        alpha: Robustness parameter of the robust penalties (1 in the paper).
        train_outlier_rate: Outlier fraction of the training clouds.
        test_outlier_rates: Outlier fractions at which the final model is evaluated; the
            per-epoch evaluation uses ``train_outlier_rate``.
        epochs: Training epochs; the learning rate halves after each third of them.
        batch_size: Clouds per step (per process under torchrun).
        lr: Initial SGD learning rate.
        momentum: SGD momentum.
        seed: Seed of data generation, outliers, initialisation, shuffling and dropout.
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:I".
        threads: CPU threads for torch (None: torch's default).
        progress: Show progress bars.
    """

    dataset: str = "synthetic"
    data_root: str | None = None
    cache_dir: str | None = None
    num_classes: int | None = None
    train_per_class: int = 100
    test_per_class: int = 40
    num_points: int = 1024
    width: int = 1024
    pool: str = "max"
    alpha: float = 1.0
    train_outlier_rate: float = 0.0
    test_outlier_rates: list[float] = field(default_factory=lambda: [0.0])
    epochs: int = 60
    batch_size: int = 24
    lr: float = 0.01
    momentum: float = 0.9
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    progress: bool = True

    #: Fields that do not change results and may differ when resuming.
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("device", "threads", "progress", "cache_dir")

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; expected one of {POOLS}")
        rates = [self.train_outlier_rate, *self.test_outlier_rates]
        if any(not 0.0 <= r <= 1.0 for r in rates):
            raise ValueError(f"outlier rates must lie in [0, 1], got {rates}")
        for name in (
            "num_points",
            "width",
            "epochs",
            "batch_size",
            "train_per_class",
            "test_per_class",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (BatchNorm needs two samples)")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        check_options(lr=self.lr, momentum=self.momentum, seed=self.seed)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-serialisable data."""
        return dataclasses.asdict(self)

    def result_fields(self) -> dict[str, Any]:
        """The fields that determine the results (everything but the runtime fields)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build a configuration from :meth:`to_dict` output (unknown keys are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown configuration keys {sorted(unknown)}")
        return cls(**data)


@dataclass
class SweepConfig:
    """A grid of runs: pools × outlier rates under one protocol.

    Attributes:
        base: The shared run configuration (its pool and rates are replaced per run).
        pools: The pooling choices.
        outlier_rates: The outlier rates.
        train_clean: Table 4 protocol only (train without outliers, evaluate at every rate:
            one run per pool). Otherwise Table 3 (the same rate in training and testing: one
            run per pool and rate), whose clean run of each pool is also evaluated at every
            rate, so that one sweep gives both tables, as the paper's Table 4 evaluates the
            clean models of Table 3.
    """

    base: RunConfig
    pools: list[str]
    outlier_rates: list[float]
    train_clean: bool = False

    def runs(self) -> list[tuple[str, RunConfig]]:
        """The runs of the grid as (name, configuration) pairs, in execution order."""
        out = []
        for pool in self.pools:
            if self.train_clean:
                cfg = dataclasses.replace(
                    self.base,
                    pool=pool,
                    train_outlier_rate=0.0,
                    test_outlier_rates=sorted(set(self.outlier_rates)),
                )
                out.append((f"{pool}_clean", cfg))
            else:
                for rate in self.outlier_rates:
                    # Table 4's models are Table 3's clean ones: the run trained without
                    # outliers is also tested at every rate, instead of training it again.
                    tests = sorted(set(self.outlier_rates)) if rate == 0.0 else [rate]
                    cfg = dataclasses.replace(
                        self.base, pool=pool, train_outlier_rate=rate, test_outlier_rates=tests
                    )
                    out.append((f"{pool}_o{rate:g}", cfg))
        return out


#: Preset values; explicit command-line options override them.
PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU: for tests and for trying the program out.
    "smoke": dict(
        dataset="synthetic",
        num_classes=4,
        train_per_class=6,
        test_per_class=3,
        num_points=32,
        width=16,
        epochs=2,
        batch_size=8,
        pools=["max", "quadratic"],
        outlier_rates=[0.0, 0.5],
        train_clean=True,
        threads=1,
    ),
    # `make demo`: the paper's finding on synthetic data in minutes on two CPU cores.
    "demo": dict(
        dataset="synthetic",
        num_classes=None,
        train_per_class=40,
        test_per_class=40,
        num_points=128,
        width=64,
        epochs=12,
        batch_size=24,
        pools=list(POOLS),
        outlier_rates=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        train_clean=True,
        threads=2,
    ),
    # The paper's setting: ModelNet40 (HDF5 release), 2048 points, width 1024, 60 epochs.
    "paper": dict(
        dataset="modelnet40_h5",
        num_points=2048,
        width=1024,
        epochs=60,
        batch_size=24,
        pools=list(POOLS),
        outlier_rates=list(PAPER_OUTLIER_RATES),
        train_clean=False,
    ),
}


def apply_preset(name: str | None, explicit: dict[str, Any]) -> dict[str, Any]:
    """Merge a preset with explicitly given options (explicit ones win; None means unset).

    Args:
        name: Preset name or None.
        explicit: Options given on the command line.

    Returns:
        The merged options.

    Raises:
        ValueError: For an unknown preset.
    """
    merged: dict[str, Any] = {}
    if name is not None:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        merged.update(PRESETS[name])
    merged.update({k: v for k, v in explicit.items() if v is not None})
    return merged
