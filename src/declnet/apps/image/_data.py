"""Data for the image experiment: IDX files (Fashion-MNIST), scikit-learn's digits, image folders.

Nothing is ever downloaded. Every loader returns a pair of ``torch.utils.data.Dataset`` objects
(train, validation) whose items are ``(image (C, H, W) float32, label int64)``.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_SYSTEM_DIR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetInfo",
    "ImageFolderDataset",
    "TensorImageDataset",
    "find_fashion_mnist",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_image_folders",
    "read_idx",
]

#: Datasets accepted by ``--dataset``.
DATASETS: tuple[str, ...] = ("fashion_mnist", "digits", "imagefolder")

#: Where Debian's ``dataset-fashion-mnist`` package installs the four gzipped IDX files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}

# Channel statistics used by the standard ImageNet transforms.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

# IDX element types: code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

PathLike = Union[str, "os.PathLike[str]"]


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), plain or gzip-compressed.

    The format is a 4-byte magic number (two zero bytes, an element-type code, the number
    of dimensions ``k``), ``k`` big-endian 32-bit sizes, then the elements in C order, big
    endian. Compression is recognised from the file's first bytes, not its name.

    Args:
        path: The file, e.g. ``train-images-idx3-ubyte`` or ``train-images-idx3-ubyte.gz``.

    Returns:
        An array of shape ``(n_1, ..., n_k)`` in native byte order (``uint8`` for images
        and labels).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a valid IDX file (bad magic, unknown type code,
            size mismatch).

    Example:
        >>> images = read_idx("train-images-idx3-ubyte.gz")  # doctest: +SKIP
        >>> images.shape
        (60000, 28, 28)
    """
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: cannot read the file ({error})") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file (expected the magic bytes 00 00 <type> <ndim>, "
            f"got {data[:4].hex(' ') or 'an empty file'})"
        )
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: unknown IDX element type 0x{type_code:02x}; expected one of "
            + ", ".join(f"0x{code:02x}" for code in _IDX_DTYPES)
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated header ({len(data)} bytes for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: header says shape {shape} of {dtype.name} ({expected} bytes) but the "
            f"file holds {len(data) - header} bytes of data"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


@dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about a dataset.

    Attributes:
        name: The ``--dataset`` name.
        num_classes: Number of classes ``K``.
        in_channels: Channels of the images.
        image_size: Height and width of the (square) images.
        small_input: Whether the small-image ResNet stem suits the images.
        classes: Class names, in label order.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    small_input: bool
    classes: tuple[str, ...]


class TensorImageDataset(Dataset):
    """Images held in memory as one tensor, standardised with fixed statistics.

    Args:
        images: ``(N, C, H, W)`` uint8 or float tensor (uint8 are scaled to ``[0, 1]``).
        labels: ``(N,)`` integer labels.
        mean: Per-channel mean subtracted from the scaled images.
        std: Per-channel standard deviation the images are divided by.

    Raises:
        ValueError: If the shapes do not match.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                "expected images (N, C, H, W) and labels (N,), got shapes "
                f"{tuple(images.shape)} and {tuple(labels.shape)}"
            )
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(
                f"mean and std need {images.shape[1]} entries, got {len(mean)} and {len(std)}"
            )
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.images = ((images - mean_t) / std_t).contiguous()
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def _subset(dataset: Dataset, size: Optional[int], seed: int) -> Dataset:
    """A seeded random subset of ``size`` items (the whole dataset for ``None``)."""
    n = len(dataset)  # type: ignore[arg-type]
    if size is None or size >= n:
        return dataset
    if size < 1:
        raise ValueError(f"subset size must be positive, got {size}")
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(n, generator=generator)[:size].sort().values
    return torch.utils.data.Subset(dataset, indices.tolist())


def find_fashion_mnist(data_root: Optional[PathLike] = None) -> dict[str, Path]:
    """Locate the four Fashion-MNIST IDX files.

    Each file may be plain or gzipped (``.gz``). Without ``data_root`` the system location
    :data:`FASHION_MNIST_SYSTEM_DIR` (Debian's ``dataset-fashion-mnist`` package) is used.

    Args:
        data_root: Folder holding ``train-images-idx3-ubyte[.gz]``,
            ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]`` and
            ``t10k-labels-idx1-ubyte[.gz]``.

    Returns:
        ``{"train_images": path, "train_labels": ..., "val_images": ..., "val_labels": ...}``.

    Raises:
        FileNotFoundError: Naming the folder searched, the missing files and how to get them.
    """
    root = Path(data_root) if data_root is not None else FASHION_MNIST_SYSTEM_DIR
    found: dict[str, Path] = {}
    missing = []
    for key, name in _FASHION_MNIST_FILES.items():
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(f"{name}[.gz]")
    if missing:
        where = "--data-root" if data_root is not None else "the system location"
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} ({where}): missing {', '.join(missing)}. "
            f"Install Debian's package (apt-get install dataset-fashion-mnist, which puts the "
            f"files in {FASHION_MNIST_SYSTEM_DIR}), or download the four IDX files from the "
            "zalandoresearch/fashion-mnist repository into a folder and pass it as "
            "--data-root. Or use --dataset digits, which needs no files."
        )
    return found


def load_fashion_mnist(
    data_root: Optional[PathLike] = None,
    *,
    train_subset: Optional[int] = None,
    val_subset: Optional[int] = None,
    seed: int = 0,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Fashion-MNIST (60,000 training and 10,000 test images, 28×28 grey, 10 classes).

    Args:
        data_root: Folder with the IDX files; ``None`` for the system location.
        train_subset: Use a seeded random subset of this many training images.
        val_subset: Use a seeded random subset of this many test images.
        seed: Seed of the subsets.

    Returns:
        ``(train, val, info)``; items are ``((1, 28, 28) float32, label)``.

    Raises:
        FileNotFoundError: If the files are missing (see :func:`find_fashion_mnist`).
        ValueError: If the files are malformed or inconsistent.
    """
    files = find_fashion_mnist(data_root)
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "val"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Fashion-MNIST {split} files disagree: images {images.shape}, "
                f"labels {labels.shape} (from {files[f'{split}_images'].parent})"
            )
    train_images = torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1)
    # Statistics of the training images, so that the inputs are standardised.
    mean = float(train_images.float().mean() / 255.0)
    std = float(train_images.float().std() / 255.0)
    datasets = []
    for split in ("train", "val"):
        images = torch.from_numpy(arrays[f"{split}_images"].copy()).unsqueeze(1)
        labels = torch.from_numpy(arrays[f"{split}_labels"].astype(np.int64))
        datasets.append(TensorImageDataset(images, labels, (mean,), (std,)))
    info = DatasetInfo(
        "fashion_mnist", 10, 1, int(train_images.shape[-1]), True, FASHION_MNIST_CLASSES
    )
    train = _subset(datasets[0], train_subset, seed)
    val = _subset(datasets[1], val_subset, seed + 1)
    return train, val, info


def load_digits(
    *,
    train_subset: Optional[int] = None,
    val_subset: Optional[int] = None,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """scikit-learn's bundled handwritten digits (1,797 images, 8×8 grey, 10 classes).

    The data ships with scikit-learn, so nothing is read from disk by the user or fetched.
    A fixed split (``val_fraction`` of each class, chosen with a generator seeded by 0)
    separates training and validation images; ``seed`` only picks the subsets.

    Args:
        train_subset: Use a seeded random subset of this many training images.
        val_subset: Use a seeded random subset of this many validation images.
        seed: Seed of the subsets.
        val_fraction: Fraction of each class held out for validation.

    Returns:
        ``(train, val, info)``; items are ``((1, 8, 8) float32, label)``.

    Raises:
        ImportError: If scikit-learn is not installed (``pip install declnet[apps]``).
        ValueError: If ``val_fraction`` is not in ``(0, 1)``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError(
            "--dataset digits needs scikit-learn: pip install 'declnet[apps]'"
        ) from error
    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    generator = torch.Generator().manual_seed(0)
    val_mask = torch.zeros(labels.shape[0], dtype=torch.bool)
    for label in labels.unique():
        members = (labels == label).nonzero().squeeze(1)
        members = members[torch.randperm(members.numel(), generator=generator)]
        val_mask[members[: round(val_fraction * members.numel())]] = True
    train_images = images[~val_mask]
    mean, std = float(train_images.mean()), float(train_images.std())
    train = TensorImageDataset(train_images, labels[~val_mask], (mean,), (std,))
    val = TensorImageDataset(images[val_mask], labels[val_mask], (mean,), (std,))
    info = DatasetInfo("digits", 10, 1, 8, True, tuple(str(d) for d in range(10)))
    return _subset(train, train_subset, seed), _subset(val, val_subset, seed + 1), info


class ImageFolderDataset(Dataset):
    """Images in class folders: ``root/<class>/<image>``; labels follow sorted class names.

    Args:
        root: The folder whose sub-folders are the classes.
        transform: Maps a PIL image to a ``(C, H, W)`` tensor.
        classes: Class names in label order; ``None`` for the sorted sub-folder names. Pass
            the training set's classes to the validation set so that the labels agree.

    Raises:
        FileNotFoundError: If ``root`` does not exist or holds no images.
        ValueError: If a folder named in ``classes`` is missing.
    """

    def __init__(
        self,
        root: PathLike,
        transform: Callable[[object], torch.Tensor],
        classes: Optional[Sequence[str]] = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if classes is None:
            classes = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        self.classes = tuple(classes)
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            folder = self.root / name
            if not folder.is_dir():
                raise ValueError(f"class folder {folder} is missing (classes: {self.classes})")
            for dirpath, _, filenames in sorted(os.walk(folder, followlinks=True)):
                for filename in sorted(filenames):
                    if filename.lower().endswith(_IMAGE_SUFFIXES):
                        self.samples.append((Path(dirpath) / filename, label))
        if not self.samples:
            raise FileNotFoundError(
                f"no images ({', '.join(_IMAGE_SUFFIXES)}) in class folders under {self.root}"
            )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            tensor = self.transform(image.convert("RGB"))
        return tensor, label


def _to_tensor(image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    mean_t = torch.tensor(mean).view(-1, 1, 1)
    std_t = torch.tensor(std).view(-1, 1, 1)
    return (tensor - mean_t) / std_t


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


class TrainTransform:
    """ImageNet training transform: random resized crop (8–100% of the area, aspect 3/4–4/3),
    random horizontal flip, scaling to ``[0, 1]`` and standardisation.

    Args:
        size: Side of the square output, e.g. 224.

    Shapes:
        PIL image → ``(3, size, size)`` float32.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        width, height = image.size
        area = width * height
        box = (0, 0, width, height)
        # torch's generator, so that DataLoader workers get distinct, seeded streams.
        for _ in range(10):
            target = area * _uniform(0.08, 1.0)
            aspect = math.exp(_uniform(math.log(3 / 4), math.log(4 / 3)))
            w = round((target * aspect) ** 0.5)
            h = round((target / aspect) ** 0.5)
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(0, width - w + 1, ()))
                top = int(torch.randint(0, height - h + 1, ()))
                box = (left, top, left + w, top + h)
                break
        else:  # fall back to a central crop of the whole image at a valid aspect ratio
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            box = (left, top, left + side, top + side)
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        if _uniform(0.0, 1.0) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(image, IMAGENET_MEAN, IMAGENET_STD)


class EvalTransform:
    """ImageNet evaluation transform: resize the short side to ``size * 256 / 224``, take the
    central ``size × size`` crop, scale to ``[0, 1]`` and standardise.

    Args:
        size: Side of the square output, e.g. 224 (after a resize to 256).

    Shapes:
        PIL image → ``(3, size, size)`` float32.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.resize = round(size * 256 / 224)

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        width, height = image.size
        scale = self.resize / min(width, height)
        new_w, new_h = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        return _to_tensor(image, IMAGENET_MEAN, IMAGENET_STD)


def load_image_folders(
    data_root: Optional[PathLike],
    *,
    image_size: int = 224,
    train_subset: Optional[int] = None,
    val_subset: Optional[int] = None,
    seed: int = 0,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """ImageNet or any ``train/`` + ``val/`` tree of class folders, with ImageNet transforms.

    Args:
        data_root: Folder holding ``train/<class>/*`` and ``val/<class>/*``.
        image_size: Side of the crops (224 for ImageNet).
        train_subset: Use a seeded random subset of this many training images.
        val_subset: Use a seeded random subset of this many validation images.
        seed: Seed of the subsets.

    Returns:
        ``(train, val, info)``; items are ``((3, image_size, image_size) float32, label)``.

    Raises:
        ValueError: If ``data_root`` is ``None``.
        FileNotFoundError: If ``train/`` or ``val/`` is missing or empty, with how to lay it out.
        ImportError: If Pillow is not installed.
    """
    if data_root is None:
        raise ValueError(
            "--dataset imagefolder needs --data-root DIR, a folder with train/<class>/*.JPEG "
            "and val/<class>/*.JPEG"
        )
    root = Path(data_root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"{root / split} does not exist: --data-root must hold train/ and val/, each "
                "with one sub-folder of images per class. For ImageNet 2012, get the "
                "ILSVRC2012 training and validation archives from image-net.org (a free "
                "account is needed), unpack them and sort the validation images into class "
                "folders with the devkit's labels."
            )
    try:
        import PIL  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "--dataset imagefolder needs Pillow: pip install 'declnet[apps]'"
        ) from error
    train = ImageFolderDataset(root / "train", TrainTransform(image_size))
    val = ImageFolderDataset(root / "val", EvalTransform(image_size), classes=train.classes)
    info = DatasetInfo(
        "imagefolder", len(train.classes), 3, image_size, image_size < 64, train.classes
    )
    return _subset(train, train_subset, seed), _subset(val, val_subset, seed + 1), info


def load_dataset(
    name: str,
    data_root: Optional[PathLike] = None,
    *,
    image_size: int = 224,
    train_subset: Optional[int] = None,
    val_subset: Optional[int] = None,
    seed: int = 0,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Load a dataset by its ``--dataset`` name.

    Args:
        name: One of :data:`DATASETS`.
        data_root: Folder of the files (Fashion-MNIST: optional; image folders: required;
            digits: ignored).
        image_size: Crop size for image folders.
        train_subset: Size of a seeded random training subset, ``None`` for all.
        val_subset: Size of a seeded random validation subset, ``None`` for all.
        seed: Seed of the subsets.

    Returns:
        ``(train, val, info)``.

    Raises:
        ValueError: For an unknown name.
    """
    subsets = {"train_subset": train_subset, "val_subset": val_subset, "seed": seed}
    if name == "fashion_mnist":
        return load_fashion_mnist(data_root, **subsets)
    if name == "digits":
        return load_digits(**subsets)
    if name == "imagefolder":
        return load_image_folders(data_root, image_size=image_size, **subsets)
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
