"""Configuration of one training run, and the presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from .._loop import check_options
from ._data import DATASETS
from ._model import PROJECTIONS

__all__ = ["PRESETS", "ImageConfig", "preset_config"]


@dataclass(frozen=True)
class ImageConfig:
    """Everything that defines one training run (one row of the table).

    The defaults train a full-width ResNet-18 on Fashion-MNIST. The paper's ImageNet setting
    is the ``paper`` preset (:data:`PRESETS`).

    Attributes:
        dataset: One of ``fashion_mnist``, ``digits``, ``imagefolder``.
        data_root: Folder of the data files (see ``load_dataset``).
        train_subset: Train on a seeded random subset of this many images (``None``: all).
        val_subset: Evaluate on a seeded random subset of this many images (``None``: all).
        image_size: Crop size for ``imagefolder`` (224 for ImageNet).
        width: Channels of ResNet-18's first stage (64 is the standard network); the
            projected features have ``8 * width`` entries.
        small_input: Small-image stem (3×3 stride-1 convolution, no max-pool); ``None``
            picks it for images smaller than 64 pixels.
        projection: One of ``none``, ``l1_sphere``, ``l1_ball``, ``l2_sphere``, ``l2_ball``,
            ``linf_sphere``, ``linf_ball``.
        radius: Radius of the sphere or ball; ``None`` scales the paper's radii to the
            feature width (``default_radius``) and multiplies them by ``radius_scale``.
        radius_scale: Factor on the default radius (used when ``radius`` is ``None``); a
            sweep over several norms varies the radii with it.
        masked: Plateau-free gradient (Table 2's D²y) for the L1 and L∞ projections.
        epochs: Training epochs.
        batch_size: Global batch size (divided among the processes under ``torchrun``).
        lr: Initial learning rate of SGD.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        lr_step: Multiply the learning rate by ``lr_gamma`` every ``lr_step`` epochs.
        lr_gamma: Learning-rate decay factor.
        workers: Data-loading worker processes per training process.
        seed: Seed of the initialisation, the shuffling and the subsets.
        sync_bn: Synchronise BatchNorm statistics across processes under ``torchrun``.
    """

    dataset: str = "fashion_mnist"
    data_root: Optional[str] = None
    train_subset: Optional[int] = None
    val_subset: Optional[int] = None
    image_size: int = 224
    width: int = 64
    small_input: Optional[bool] = None
    projection: str = "none"
    radius: Optional[float] = None
    radius_scale: float = 1.0
    masked: bool = False
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int = 10
    lr_gamma: float = 0.1
    workers: int = 0
    seed: int = 0
    sync_bn: bool = False

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(
                f"unknown dataset {self.dataset!r}; expected one of {', '.join(DATASETS)}"
            )
        if self.projection not in PROJECTIONS:
            raise ValueError(
                f"unknown projection {self.projection!r}; expected one of "
                f"{', '.join(PROJECTIONS)}"
            )
        positive = {
            "image_size": self.image_size,
            "width": self.width,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr_step": self.lr_step,
            "radius_scale": self.radius_scale,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        for name in ("train_subset", "val_subset", "radius"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive (or unset), got {value}")
        if self.workers < 0:
            raise ValueError(f"workers must be non-negative, got {self.workers}")
        check_options(
            lr=self.lr, momentum=self.momentum, seed=self.seed, weight_decay=self.weight_decay
        )
        if not (math.isfinite(self.lr_gamma) and self.lr_gamma > 0):
            raise ValueError(f"--lr-gamma must be a finite positive number, got {self.lr_gamma}")

    def replace(self, **changes: Any) -> ImageConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


#: Named settings: ``demo`` (a few minutes on 2 CPU cores, every projection, scikit-learn's
#: digits), ``smoke`` (seconds, for tests) and ``paper`` (ImageNet, ResNet-18, 90 epochs,
#: batch 256, as in §7 of the paper).
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "dataset": "digits",
        "width": 8,
        "epochs": 12,
        "batch_size": 64,
        "lr": 0.05,
        "lr_step": 8,
        "lr_gamma": 0.1,
        "weight_decay": 5e-4,
    },
    "smoke": {
        "dataset": "digits",
        "train_subset": 96,
        "val_subset": 48,
        "width": 2,
        "epochs": 1,
        "batch_size": 32,
        "lr": 0.05,
        "lr_step": 1,
    },
    "paper": {
        "dataset": "imagefolder",
        "image_size": 224,
        "width": 64,
        "small_input": False,
        "epochs": 90,
        "batch_size": 256,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "lr_step": 30,
        "lr_gamma": 0.1,
        "workers": 8,
    },
}


def preset_config(name: Optional[str] = None, **overrides: Any) -> ImageConfig:
    """A configuration from a preset and explicit overrides.

    Args:
        name: A key of :data:`PRESETS`, or ``None`` for the defaults of :class:`ImageConfig`.
        **overrides: Fields to set; ``None`` values are ignored (so unset command-line
            options keep the preset's value).

    Returns:
        The validated configuration.

    Raises:
        ValueError: For an unknown preset or field, or invalid values.

    Example:
        >>> preset_config("smoke", projection="l2_ball").epochs
        1
    """
    if name is not None and name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    fields = {field.name for field in dataclasses.fields(ImageConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown configuration fields: {', '.join(sorted(unknown))}")
    values = dict(PRESETS[name]) if name is not None else {}
    values.update({key: value for key, value in overrides.items() if value is not None})
    return ImageConfig(**values)
