"""Data loaders of the image experiment: IDX files, Fashion-MNIST layout, image folders, digits."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from declnet.apps.image import (
    find_fashion_mnist,
    load_dataset,
    load_fashion_mnist,
    load_image_folders,
    read_idx,
)

_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    """Write ``array`` in the IDX format (big-endian), optionally gzipped."""
    header = bytes([0, 0, _TYPE_CODES[array.dtype], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        payload = gzip.compress(payload)
    path.write_bytes(payload)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_read_idx_round_trips_plain_and_gzip(tmp_path, compress, dtype):
    array = (np.arange(2 * 3 * 5).reshape(2, 3, 5) * 7 - 11).astype(dtype)
    if dtype == np.uint8:
        array = np.arange(30, dtype=np.uint8).reshape(2, 3, 5) * 8
    path = tmp_path / ("data.gz" if compress else "data")
    write_idx(path, array, compress)
    result = read_idx(path)
    assert result.dtype == array.dtype
    assert result.shape == (2, 3, 5)
    np.testing.assert_array_equal(result, array)


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    path = tmp_path / "labels-idx1-ubyte"  # gzipped, but without .gz
    write_idx(path, labels, compress=True)
    np.testing.assert_array_equal(read_idx(path), labels)


def test_read_idx_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x07")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad_magic)
    bad_type = tmp_path / "bad_type"
    bad_type.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x07")
    with pytest.raises(ValueError, match="element type"):
        read_idx(bad_type)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(b"\x00\x00\x08\x02\x00\x00\x00\x02\x00\x00\x00\x02\x01\x02\x03")
    with pytest.raises(ValueError, match=r"header says shape \(2, 2\)"):
        read_idx(truncated)


def _write_fashion_mnist(root, n_train=6, n_val=4):
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_val, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_val, dtype=np.uint8)[::-1].copy(),
    }
    for i, (name, array) in enumerate(files.items()):
        compress = i % 2 == 0  # a mix of plain and gzipped files
        write_idx(root / (name + ".gz" if compress else name), array, compress)
    return files


def test_fashion_mnist_from_a_folder_of_mixed_plain_and_gzip_files(tmp_path):
    files = _write_fashion_mnist(tmp_path)
    train, val, info = load_fashion_mnist(tmp_path)
    assert (len(train), len(val)) == (6, 4)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 28)
    image, label = val[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert int(label) == 3
    everything = torch.stack([train[i][0] for i in range(len(train))])
    assert abs(float(everything.mean())) < 1e-5  # standardised with training statistics
    assert abs(float(everything.std()) - 1.0) < 1e-4
    raw = torch.from_numpy(files["t10k-images-idx3-ubyte"][0].astype(np.float32))
    assert torch.corrcoef(torch.stack([raw.flatten(), image.flatten()]))[0, 1] > 0.9999


def test_fashion_mnist_subsets_are_seeded(tmp_path):
    _write_fashion_mnist(tmp_path, n_train=10)
    first, _, _ = load_fashion_mnist(tmp_path, train_subset=4, seed=3)
    second, _, _ = load_fashion_mnist(tmp_path, train_subset=4, seed=3)
    assert len(first) == 4
    assert [int(first[i][1]) for i in range(4)] == [int(second[i][1]) for i in range(4)]


def test_missing_fashion_mnist_says_where_and_how(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError) as error:
        find_fashion_mnist(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "t10k-labels-idx1-ubyte[.gz]" in message
    assert "train-images" not in message.split("missing")[1].split(".")[0]
    assert "apt-get install dataset-fashion-mnist" in message
    assert "/usr/share/datasets/fashion-mnist" in message


def _write_png_tree(root, size=(20, 12)):
    from PIL import Image

    colours = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}
    for split, count in (("train", 2), ("val", 1)):
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", size, colour).save(folder / f"{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


def test_image_folders_load_pngs_with_imagenet_transforms(tmp_path):
    _write_png_tree(tmp_path)
    train, val, info = load_image_folders(tmp_path, image_size=8)
    assert info.classes == ("cat", "dog", "emu")
    assert (info.num_classes, info.in_channels, info.image_size) == (3, 3, 8)
    assert (len(train), len(val)) == (6, 3)
    assert [label for _, label in (val[i] for i in range(3))] == [0, 1, 2]
    image, label = train[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and label == 0
    # A uniform image stays uniform; its values are the standardised colour.
    image, _ = val[1]
    expected = (torch.tensor([30, 200, 30]) / 255 - torch.tensor([0.485, 0.456, 0.406])) / (
        torch.tensor([0.229, 0.224, 0.225])
    )
    torch.testing.assert_close(image, expected.view(3, 1, 1).expand(3, 8, 8), atol=2e-2, rtol=0)


def test_image_folders_missing_root_explains_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/ and val/"):
        load_image_folders(tmp_path / "imagenet")
    with pytest.raises(ValueError, match="--data-root"):
        load_dataset("imagefolder", None)


def test_digits_need_no_files():
    train, val, info = load_dataset("digits", train_subset=50, val_subset=20)
    assert (len(train), len(val)) == (50, 20)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 8)
    assert train[0][0].shape == (1, 8, 8)
    full_train, full_val, _ = load_dataset("digits")
    assert len(full_train) + len(full_val) == 1797


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
