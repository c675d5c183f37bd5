"""Point-cloud datasets in one in-memory format, and the loaders that produce it.

Every source — the synthetic generator, the ``modelnet40_ply_hdf5_2048`` release and the
original ModelNet40 OFF meshes — ends up as a :class:`PointCloudSet`: points (n, N, 3)
float32, labels (n,) int64 and the class names. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .shapes import generate_synthetic

__all__ = [
    "H5_LAYOUT",
    "OFF_LAYOUT",
    "PointCloudSet",
    "export_h5",
    "load_dataset",
    "load_modelnet40_h5",
    "load_modelnet40_off",
    "read_off",
    "sample_mesh",
]

H5_LAYOUT = """expected layout of the modelnet40_ply_hdf5_2048 release:
  DATA_ROOT/
    shape_names.txt          one class name per line (40 lines)
    ply_data_train0.h5 ...   datasets 'data' (n, 2048, 3) float32 and 'label' (n, 1) uint8
    ply_data_test0.h5 ...    same datasets"""

OFF_LAYOUT = """expected layout of the ModelNet40 OFF meshes:
  DATA_ROOT/
    airplane/
      train/airplane_0001.off ...
      test/airplane_0627.off ...
    bathtub/
      train/... test/...
    ...                      one folder per class"""


@dataclass
class PointCloudSet:
    """A labelled set of point clouds held in memory.

    Attributes:
        points: (n, N, 3) float32 tensor of n clouds with N points each.
        labels: (n,) int64 tensor of class indices into ``class_names``.
        class_names: The K class names.
    """

    points: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        if self.points.ndim != 3 or self.points.shape[-1] != 3:
            raise ValueError(f"points must have shape (n, N, 3), got {tuple(self.points.shape)}")
        if self.labels.shape != self.points.shape[:1]:
            raise ValueError(
                f"labels must have shape ({self.points.shape[0]},), got {tuple(self.labels.shape)}"
            )
        self.points = self.points.to(torch.float32)
        self.labels = self.labels.to(torch.int64)
        if len(self.labels) and (
            self.labels.min() < 0 or self.labels.max() >= len(self.class_names)
        ):
            raise ValueError(
                f"labels must lie in [0, {len(self.class_names)}), "
                f"got range [{int(self.labels.min())}, {int(self.labels.max())}]"
            )

    def __len__(self) -> int:
        return int(self.points.shape[0])

    @property
    def num_points(self) -> int:
        """Points per cloud, N."""
        return int(self.points.shape[1])

    @property
    def num_classes(self) -> int:
        """Number of classes, K."""
        return len(self.class_names)


# --------------------------------------------------------------------------------------
# HDF5 (modelnet40_ply_hdf5_2048)


def _import_h5py():
    try:
        import h5py
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading HDF5 files needs h5py: pip install 'declnet[apps]'") from err
    return h5py


def _read_h5_split(files: list[Path], num_points: int) -> tuple[np.ndarray, np.ndarray]:
    h5py = _import_h5py()
    points, labels = [], []
    for path in files:
        try:
            with h5py.File(path, "r") as f:
                if "data" not in f or "label" not in f:
                    raise ValueError(
                        f"{path} lacks the datasets 'data' and 'label' (found {sorted(f)})\n"
                        f"{H5_LAYOUT}"
                    )
                data = np.asarray(f["data"])
                label = np.asarray(f["label"])
        except OSError as err:  # h5py's error for truncated or damaged files
            raise ValueError(
                f"{path} is not a readable HDF5 file ({err}); it is truncated or damaged: "
                "replace it with a fresh copy of the release"
            ) from err
        if data.ndim != 3 or data.shape[2] != 3:
            raise ValueError(f"{path}: 'data' must be (n, P, 3), got {data.shape}\n{H5_LAYOUT}")
        if label.reshape(-1).shape[0] != data.shape[0]:
            raise ValueError(
                f"{path}: 'label' has {label.size} entries for {data.shape[0]} clouds\n{H5_LAYOUT}"
            )
        if data.shape[1] < num_points:
            raise ValueError(
                f"{path} has {data.shape[1]} points per cloud, "
                f"fewer than the {num_points} asked for"
            )
        kept = data[:, :num_points].astype(np.float32)
        bad = ~np.isfinite(kept).all(axis=(1, 2))
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{path}: {int(bad.sum())} cloud(s) hold NaN or infinite coordinates (the first "
                f"is cloud {first}); the file is damaged: replace it with a fresh copy"
            )
        points.append(kept)
        labels.append(label.reshape(-1).astype(np.int64))
    return np.concatenate(points), np.concatenate(labels)


def load_modelnet40_h5(
    root: str | Path, num_points: int = 2048
) -> tuple[PointCloudSet, PointCloudSet]:
    """Load the ``modelnet40_ply_hdf5_2048`` release.

    Args:
        root: Folder holding ``shape_names.txt``, ``ply_data_train*.h5`` and
            ``ply_data_test*.h5`` (see :data:`H5_LAYOUT`).
        num_points: Keep the first N points of every cloud (N ≤ 2048).

    Returns:
        ``(train, test)`` sets with points (n, N, 3).

    Raises:
        ValueError: If the folder is missing or does not have the expected layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data root {root} does not exist\n{H5_LAYOUT}")
    names_file = root / "shape_names.txt"
    train_files = sorted(root.glob("ply_data_train*.h5"))
    test_files = sorted(root.glob("ply_data_test*.h5"))
    if not names_file.is_file() or not train_files or not test_files:
        raise ValueError(f"{root} is not a modelnet40_ply_hdf5_2048 folder\n{H5_LAYOUT}")
    names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    sets = []
    for files in (train_files, test_files):
        pts, lab = _read_h5_split(files, num_points)
        sets.append(PointCloudSet(torch.from_numpy(pts), torch.from_numpy(lab), names))
    return sets[0], sets[1]


def export_h5(
    train: PointCloudSet, test: PointCloudSet, root: str | Path, chunk: int = 2048
) -> list[Path]:
    """Write two sets in the ``modelnet40_ply_hdf5_2048`` layout (uint8 labels of shape (n, 1)).

    Args:
        train: The training set.
        test: The test set.
        root: Output folder (created).
        chunk: Clouds per file, as in the release.

    Returns:
        The paths written.

    Raises:
        ValueError: With more than 256 classes (labels are stored as uint8).
    """
    if train.num_classes > 256:
        raise ValueError(f"uint8 labels allow at most 256 classes, got {train.num_classes}")
    h5py = _import_h5py()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "shape_names.txt").write_text("\n".join(train.class_names) + "\n")
    written = [root / "shape_names.txt"]
    for split, ds in (("train", train), ("test", test)):
        for i, start in enumerate(range(0, len(ds), chunk)):
            path = root / f"ply_data_{split}{i}.h5"
            with h5py.File(path, "w") as f:
                f.create_dataset("data", data=ds.points[start : start + chunk].numpy())
                f.create_dataset(
                    "label", data=ds.labels[start : start + chunk].numpy().astype(np.uint8)[:, None]
                )
            written.append(path)
    return written


# --------------------------------------------------------------------------------------
# OFF meshes


#: The OFF keyword, with the optional prefixes of its variants: ``C`` (vertex colours), ``N``
#: (normals), ``ST`` (texture coordinates), ``4`` (homogeneous coordinates; not supported).
_OFF_HEADER = re.compile(r"^\s*(ST)?(C)?(N)?(4)?OFF(.*)$")


def read_off(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a mesh in OFF format, triangulating polygons as fans.

    Accepts the malformed headers found in ModelNet40 where the counts are glued to the
    keyword (``OFF1234 5678 0``), comment lines starting with ``#`` and blank lines, the
    ``COFF``, ``NOFF``, ``CNOFF`` and ``STOFF`` variants (the extra per-vertex values after
    the coordinates are ignored) and per-face colours after a face's vertex indices.

    Args:
        path: The ``.off`` file.

    Returns:
        ``(vertices, triangles)``: (V, 3) float64 and (T, 3) int64.

    Raises:
        ValueError: If the file is not a valid OFF mesh.
    """
    path = Path(path)
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    match = _OFF_HEADER.match(lines[0]) if lines else None
    if match is None:
        raise ValueError(f"{path}: not an OFF file (the first line must start with 'OFF')")
    if match.group(4):
        raise ValueError(f"{path}: 4OFF (homogeneous coordinates) is not supported")
    rest = match.group(5).split()
    body = lines[1:]
    if not rest:
        if not body:
            raise ValueError(f"{path}: missing the vertex/face counts line")
        rest, body = body[0].split(), body[1:]
    try:
        num_vertices, num_faces = int(rest[0]), int(rest[1])
    except (IndexError, ValueError) as err:
        raise ValueError(f"{path}: bad counts line {' '.join(rest)!r}") from err
    if len(body) < num_vertices + num_faces:
        raise ValueError(
            f"{path}: expected {num_vertices} vertices and {num_faces} faces, "
            f"found {len(body)} lines"
        )
    face_lines = body[num_vertices : num_vertices + num_faces]
    try:
        # Values after the three coordinates (COFF colours, NOFF normals) are ignored.
        vertices = np.array([ln.split()[:3] for ln in body[:num_vertices]], dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: unparsable vertex line (expected 3 coordinates)") from err
    if vertices.shape != (num_vertices, 3):
        raise ValueError(f"{path}: a vertex line has fewer than 3 coordinates")
    try:
        flat: np.ndarray | None = np.array(" ".join(face_lines).split(), dtype=np.int64)
    except ValueError:
        flat = None  # colours given as floats: read the faces one by one
    if flat is not None and flat.size == 4 * num_faces and np.all(flat[::4] == 3):
        triangles = flat.reshape(num_faces, 4)[:, 1:]  # all triangles (ModelNet): vectorised
    else:  # polygons, or faces with colours: triangulate each as a fan
        triangles = []
        for line in face_lines:
            tokens = line.split()
            try:
                k = int(tokens[0])
                idx = [int(t) for t in tokens[1 : 1 + k]]
            except (IndexError, ValueError) as err:
                raise ValueError(f"{path}: bad face line {line!r}") from err
            # Anything after the k indices is the face's colour (3 or 4 values), ignored.
            if k < 3 or len(idx) != k:
                raise ValueError(f"{path}: bad face line {line!r}")
            triangles.extend((idx[0], idx[j], idx[j + 1]) for j in range(1, k - 1))
    tri = np.array(triangles, dtype=np.int64).reshape(-1, 3)
    if len(tri) and (tri.max() >= num_vertices or tri.min() < 0):
        raise ValueError(f"{path}: faces refer to vertices that do not exist")
    return vertices, tri


def sample_mesh(
    vertices: np.ndarray, triangles: np.ndarray, num_points: int, rng: np.random.Generator
) -> np.ndarray:
    """Sample points uniformly by area from a triangle mesh, centred and scaled into the unit ball.

    Args:
        vertices: (V, 3) vertex positions.
        triangles: (T, 3) vertex indices.
        num_points: Number of points N.
        rng: Random generator.

    Returns:
        (N, 3) float32 points.

    Raises:
        ValueError: If the mesh has no area.
    """
    a, b, c = (vertices[triangles[:, i]] for i in range(3))
    areas = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    total = areas.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("the mesh has zero surface area")
    tri = rng.choice(len(areas), size=num_points, p=areas / total)
    u, v = rng.uniform(size=(2, num_points))
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    pts = a[tri] + u[:, None] * (b[tri] - a[tri]) + v[:, None] * (c[tri] - a[tri])
    pts -= pts.mean(axis=0)
    pts /= max(np.linalg.norm(pts, axis=1).max(), 1e-12)
    return pts.astype(np.float32)


def _off_files(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    if not root.is_dir():
        raise ValueError(f"data root {root} does not exist\n{OFF_LAYOUT}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train").is_dir())
    if not classes:
        raise ValueError(f"{root} has no <class>/train folders\n{OFF_LAYOUT}")
    splits: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    for label, name in enumerate(classes):
        for split in splits:
            splits[split].extend((p, label) for p in sorted((root / name / split).glob("*.off")))
    for split, files in splits.items():
        if not files:
            raise ValueError(f"{root} has no {split} meshes\n{OFF_LAYOUT}")
    return classes, splits


def load_modelnet40_off(
    root: str | Path, num_points: int = 2048, *, seed: int = 0, cache_dir: str | Path | None = None
) -> tuple[PointCloudSet, PointCloudSet]:
    """Load the original ModelNet40 OFF meshes, sampling N points from each (cached).

    Sampling every mesh takes a while, so the result is cached in ``cache_dir`` as a
    ``.npz`` file whose name depends on N, the seed and the list of files (names and sizes):
    a changed folder is resampled.

    Args:
        root: Folder with one sub-folder per class, each with ``train`` and ``test`` folders of
            ``.off`` files (see :data:`OFF_LAYOUT`).
        num_points: Points N per cloud.
        seed: Seed of the surface sampling.
        cache_dir: Where to keep the sampled clouds (default: ``root/.declnet_cache``).

    Returns:
        ``(train, test)`` sets with points (n, N, 3).

    Raises:
        ValueError: If the folder does not have the expected layout or a mesh is malformed.
    """
    root = Path(root)
    classes, splits = _off_files(root)
    digest = hashlib.sha1()
    for split in ("train", "test"):
        for path, label in splits[split]:
            digest.update(
                f"{split}/{path.relative_to(root)}/{path.stat().st_size}/{label}".encode()
            )
    cache = Path(cache_dir) if cache_dir is not None else root / ".declnet_cache"
    cache_file = cache / f"modelnet_off_N{num_points}_seed{seed}_{digest.hexdigest()[:12]}.npz"
    if cache_file.is_file():
        with np.load(cache_file) as z:
            arrays = {k: z[k] for k in z.files}
    else:
        arrays = {}
        for split_id, split in enumerate(("train", "test")):
            rng = np.random.default_rng([seed, split_id])
            pts = np.empty((len(splits[split]), num_points, 3), dtype=np.float32)
            for i, (path, _) in enumerate(splits[split]):
                vertices, tri = read_off(path)
                try:
                    pts[i] = sample_mesh(vertices, tri, num_points, rng)
                except ValueError as err:
                    raise ValueError(f"{path}: {err}") from err
            arrays[f"{split}_points"] = pts
            arrays[f"{split}_labels"] = np.array([lab for _, lab in splits[split]], dtype=np.int64)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(cache_file)
    return tuple(  # type: ignore[return-value]
        PointCloudSet(
            torch.from_numpy(arrays[f"{s}_points"]),
            torch.from_numpy(arrays[f"{s}_labels"]),
            classes,
        )
        for s in ("train", "test")
    )


# --------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    *,
    num_points: int,
    data_root: str | Path | None = None,
    num_classes: int | None = None,
    train_per_class: int = 100,
    test_per_class: int = 40,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> tuple[PointCloudSet, PointCloudSet]:
    """Load a dataset by name.

    Args:
        name: "synthetic", "modelnet40_h5" or "modelnet40_off".
        num_points: Points N per cloud.
        data_root: Folder of the real datasets (unused for "synthetic").
        num_classes: Synthetic only: the first K synthetic classes (default: all).
        train_per_class: Synthetic only: training objects per class.
        test_per_class: Synthetic only: test objects per class.
        seed: Seed of the synthetic generator / the OFF surface sampling.
        cache_dir: OFF only: the cache folder.

    Returns:
        ``(train, test)``.

    Raises:
        ValueError: For an unknown name, a missing data root or a malformed dataset.
    """
    if name == "synthetic":
        sets = []
        for split, per_class in (("train", train_per_class), ("test", test_per_class)):
            pts, lab, names = generate_synthetic(
                per_class, num_points, num_classes=num_classes, seed=seed, split=split
            )
            sets.append(PointCloudSet(torch.from_numpy(pts), torch.from_numpy(lab), names))
        return sets[0], sets[1]
    if name in ("modelnet40_h5", "modelnet40_off"):
        layout = H5_LAYOUT if name == "modelnet40_h5" else OFF_LAYOUT
        if data_root is None:
            raise ValueError(f"--dataset {name} needs --data-root DIR\n{layout}")
        if name == "modelnet40_h5":
            return load_modelnet40_h5(data_root, num_points)
        return load_modelnet40_off(data_root, num_points, seed=seed, cache_dir=cache_dir)
    raise ValueError(
        f"unknown dataset {name!r}; expected 'synthetic', 'modelnet40_h5' or 'modelnet40_off'"
    )
