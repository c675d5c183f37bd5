"""The image experiment of the paper (§7, Table 6): ResNet-18 with an Lp projection head.

A projection onto an Lp sphere or ball (p = 1, 2, ∞), preceded by a BatchNorm without
learnable parameters, is inserted before ResNet-18's final fully connected layer; the program
trains each variant and reports top-1, top-5, mAP and time per image. Run it as
``python -m declnet.apps.image {train,sweep,report} ...`` (see ``docs/image.md``), or use the
pieces below from Python.

Example:
    >>> from declnet.apps.image import preset_config, sweep
    >>> results = sweep(preset_config("smoke"), ["none", "l2_ball"], "runs/smoke")  # doctest: +SKIP
"""

from .._metrics import average_precision, mean_average_precision, topk_accuracy
from ._config import PRESETS, ImageConfig, preset_config
from ._data import (
    DATASETS,
    FASHION_MNIST_SYSTEM_DIR,
    DatasetInfo,
    ImageFolderDataset,
    TensorImageDataset,
    find_fashion_mnist,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_image_folders,
    read_idx,
)
from ._model import (
    PROJECTIONS,
    BasicBlock,
    ResNet,
    default_radius,
    make_projection,
    parse_projection,
    resnet18,
)
from ._sweep import format_report, load_results, sweep, write_report
from ._train import Distributed, build_model, distributed_context, evaluate, train

__all__ = [
    "DATASETS",
    "FASHION_MNIST_SYSTEM_DIR",
    "PRESETS",
    "PROJECTIONS",
    "BasicBlock",
    "DatasetInfo",
    "Distributed",
    "ImageConfig",
    "ImageFolderDataset",
    "ResNet",
    "TensorImageDataset",
    "average_precision",
    "build_model",
    "default_radius",
    "distributed_context",
    "evaluate",
    "find_fashion_mnist",
    "format_report",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_image_folders",
    "load_results",
    "make_projection",
    "mean_average_precision",
    "parse_projection",
    "preset_config",
    "read_idx",
    "resnet18",
    "sweep",
    "topk_accuracy",
    "train",
    "write_report",
]
