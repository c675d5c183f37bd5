"""A procedural, seeded, ModelNet-like dataset of point clouds.

Every object is a union of parametric surface parts (boxes, ellipsoids, frusta — which
include cylinders and cones — and tori) placed in a local frame whose up axis is ``z``.
Points are sampled uniformly by area over the union of parts, then the object is rotated
about the up axis, jittered, centred and scaled into the unit ball.

The classes deliberately share parts (a stool and a table share legs, a cup and a mug differ
only by the handle, a bottle and a vase are both stacked frusta) so that the task is not
trivially separable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["SYNTHETIC_CLASSES", "generate_synthetic", "sample_object"]

Rng = np.random.Generator


# --------------------------------------------------------------------------------------
# Parts. Each has a surface area and an area-uniform sampler in its own frame.


def _rotation(axis: str) -> np.ndarray:
    """Rotation that maps the local z axis onto ``axis`` ("x", "y" or "z")."""
    if axis == "z":
        return np.eye(3)
    if axis == "x":
        return np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    return np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


@dataclass
class _Part:
    center: np.ndarray
    axis: str = "z"

    def area(self) -> float:
        raise NotImplementedError  # abstract: every subclass overrides it

    def sample_local(self, rng: Rng, n: int) -> np.ndarray:
        raise NotImplementedError  # abstract: every subclass overrides it

    def sample(self, rng: Rng, n: int) -> np.ndarray:
        local = self.sample_local(rng, n)
        return local @ _rotation(self.axis).T + self.center


@dataclass
class _Box(_Part):
    half: np.ndarray = field(default_factory=lambda: np.ones(3))  # (3,) half extents

    def area(self) -> float:
        a, b, c = self.half
        return 8.0 * (b * c + a * c + a * b)

    def sample_local(self, rng: Rng, n: int) -> np.ndarray:
        a, b, c = self.half
        face_area = np.array([b * c, b * c, a * c, a * c, a * b, a * b])
        face = rng.choice(6, size=n, p=face_area / face_area.sum())
        pts = rng.uniform(-1.0, 1.0, size=(n, 3))
        fixed_axis = face // 2
        sign = np.where(face % 2 == 0, -1.0, 1.0)
        pts[np.arange(n), fixed_axis] = sign
        return pts * self.half


@dataclass
class _Ellipsoid(_Part):
    radii: np.ndarray = field(default_factory=lambda: np.ones(3))  # (3,) semi-axes

    def area(self) -> float:
        # Knud Thomsen's approximation (relative error below 1.1%).
        a, b, c = self.radii
        p = 1.6075
        return 4.0 * math.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3.0) ** (1.0 / p)

    def sample_local(self, rng: Rng, n: int) -> np.ndarray:
        # Map the unit sphere onto the ellipsoid; keep a point with probability proportional
        # to the area stretch at that point, which makes the result area-uniform.
        a, b, c = self.radii
        out = []
        count = 0
        bound = max(b * c, a * c, a * b)
        while count < n:
            u = rng.normal(size=(2 * n + 8, 3))
            u /= np.linalg.norm(u, axis=1, keepdims=True)
            stretch = np.sqrt(
                (b * c * u[:, 0]) ** 2 + (a * c * u[:, 1]) ** 2 + (a * b * u[:, 2]) ** 2
            )
            keep = rng.uniform(size=len(u)) * bound < stretch
            out.append(u[keep] * self.radii)
            count += int(keep.sum())
        return np.concatenate(out)[:n]


@dataclass
class _Frustum(_Part):
    """Lateral surface of a truncated cone from z=0 (radius r0) to z=h (radius r1).

    Cylinders (r0 = r1) and cones (r1 = 0) are special cases; ``caps`` adds the bottom and
    top discs.
    """

    r0: float = 1.0
    r1: float = 1.0
    h: float = 1.0
    bottom_cap: bool = True
    top_cap: bool = True

    def _areas(self) -> np.ndarray:
        slant = math.hypot(self.h, self.r0 - self.r1)
        side = math.pi * (self.r0 + self.r1) * slant
        bottom = math.pi * self.r0**2 if self.bottom_cap else 0.0
        top = math.pi * self.r1**2 if self.top_cap else 0.0
        return np.array([side, bottom, top])

    def area(self) -> float:
        return float(self._areas().sum())

    def sample_local(self, rng: Rng, n: int) -> np.ndarray:
        areas = self._areas()
        which = rng.choice(3, size=n, p=areas / areas.sum())
        theta = rng.uniform(0.0, 2.0 * math.pi, size=n)
        # Side: the area density along t in [0, 1] is proportional to r(t) = r0 + (r1 - r0) t.
        r0, r1 = self.r0, self.r1
        u = rng.uniform(size=n)
        if abs(r1 - r0) < 1e-9:
            t = u
        else:  # inverse CDF of a linear density
            t = (np.sqrt(r0**2 + (r1**2 - r0**2) * u) - r0) / (r1 - r0)
        radius = r0 + (r1 - r0) * t
        z = t * self.h
        disc = np.sqrt(rng.uniform(size=n))
        radius = np.where(which == 1, r0 * disc, radius)
        radius = np.where(which == 2, r1 * disc, radius)
        z = np.where(which == 1, 0.0, z)
        z = np.where(which == 2, self.h, z)
        return np.stack([radius * np.cos(theta), radius * np.sin(theta), z], axis=1)


@dataclass
class _Torus(_Part):
    """Torus of major radius R and tube radius r about local z, over an arc of angles."""

    R: float = 1.0
    r: float = 0.2
    arc: float = 2.0 * math.pi
    start: float = 0.0

    def area(self) -> float:
        return 2.0 * math.pi * self.r * self.R * self.arc

    def sample_local(self, rng: Rng, n: int) -> np.ndarray:
        out = []
        count = 0
        while count < n:
            v = rng.uniform(0.0, 2.0 * math.pi, size=2 * n + 8)
            keep = rng.uniform(size=len(v)) * (self.R + self.r) < self.R + self.r * np.cos(v)
            out.append(v[keep])
            count += int(keep.sum())
        v = np.concatenate(out)[:n]
        u = self.start + rng.uniform(0.0, self.arc, size=n)
        ring = self.R + self.r * np.cos(v)
        return np.stack([ring * np.cos(u), ring * np.sin(u), self.r * np.sin(v)], axis=1)


def _c(x: float, y: float, z: float) -> np.ndarray:
    return np.array([x, y, z], dtype=np.float64)


# --------------------------------------------------------------------------------------
# Classes: each builds its parts with random proportions.


def _legs(rng: Rng, half_x: float, half_y: float, height: float, count: int = 4) -> list[_Part]:
    radius = rng.uniform(0.03, 0.07)
    if count == 3:
        angles = np.array([0.0, 2.0, 4.0]) * math.pi / 3.0
        spots = [(half_x * math.cos(a), half_y * math.sin(a)) for a in angles]
    else:
        spots = [(sx * half_x, sy * half_y) for sx in (-1, 1) for sy in (-1, 1)]
    return [
        _Frustum(_c(x, y, 0.0), r0=radius, r1=radius, h=height, bottom_cap=False, top_cap=False)
        for x, y in spots
    ]


def _table(rng: Rng) -> list[_Part]:
    hx, hy = rng.uniform(0.6, 1.1), rng.uniform(0.4, 0.8)
    height = rng.uniform(0.6, 1.0)
    thick = rng.uniform(0.03, 0.07)
    top = _Box(_c(0.0, 0.0, height + thick), half=np.array([hx, hy, thick]))
    return [top, *_legs(rng, hx * 0.85, hy * 0.85, height)]


def _stool(rng: Rng) -> list[_Part]:
    radius = rng.uniform(0.3, 0.5)
    height = rng.uniform(0.6, 1.0)
    seat = _Frustum(_c(0.0, 0.0, height), r0=radius, r1=radius, h=rng.uniform(0.04, 0.1))
    legs = _legs(rng, radius * 0.8, radius * 0.8, height, count=int(rng.choice([3, 4])))
    return [seat, *legs]


def _chair(rng: Rng) -> list[_Part]:
    hx, hy = rng.uniform(0.35, 0.5), rng.uniform(0.35, 0.5)
    height = rng.uniform(0.4, 0.55)
    thick = rng.uniform(0.03, 0.06)
    seat = _Box(_c(0.0, 0.0, height + thick), half=np.array([hx, hy, thick]))
    back_h = rng.uniform(0.35, 0.6)
    back = _Box(
        _c(0.0, -hy + thick, height + 2 * thick + back_h), half=np.array([hx, thick, back_h])
    )
    return [seat, back, *_legs(rng, hx * 0.85, hy * 0.85, height)]


def _bed(rng: Rng) -> list[_Part]:
    hx, hy = rng.uniform(0.5, 0.8), rng.uniform(0.9, 1.2)
    hz = rng.uniform(0.15, 0.25)
    base = _Box(_c(0.0, 0.0, hz), half=np.array([hx, hy, hz]))
    head_h = rng.uniform(0.35, 0.55)
    head = _Box(_c(0.0, -hy, head_h), half=np.array([hx, 0.04, head_h]))
    pillow = _Ellipsoid(_c(0.0, -hy + 0.25, 2 * hz + 0.06), radii=np.array([hx * 0.6, 0.15, 0.07]))
    return [base, head, pillow]


def _cabinet(rng: Rng) -> list[_Part]:
    half = np.array([rng.uniform(0.3, 0.6), rng.uniform(0.25, 0.45), rng.uniform(0.6, 1.1)])
    return [_Box(_c(0.0, 0.0, half[2]), half=half)]


def _bottle(rng: Rng) -> list[_Part]:
    r = rng.uniform(0.2, 0.35)
    body_h = rng.uniform(0.8, 1.3)
    shoulder_h = rng.uniform(0.15, 0.35)
    neck_r = r * rng.uniform(0.25, 0.4)
    neck_h = rng.uniform(0.2, 0.4)
    return [
        _Frustum(_c(0.0, 0.0, 0.0), r0=r, r1=r, h=body_h, top_cap=False),
        _Frustum(
            _c(0.0, 0.0, body_h), r0=r, r1=neck_r, h=shoulder_h, bottom_cap=False, top_cap=False
        ),
        _Frustum(
            _c(0.0, 0.0, body_h + shoulder_h), r0=neck_r, r1=neck_r, h=neck_h, bottom_cap=False
        ),
    ]


def _vase(rng: Rng) -> list[_Part]:
    foot = rng.uniform(0.15, 0.3)
    belly = rng.uniform(0.35, 0.55)
    mouth = rng.uniform(0.15, 0.35)
    h1, h2 = rng.uniform(0.4, 0.8), rng.uniform(0.5, 0.9)
    return [
        _Frustum(_c(0.0, 0.0, 0.0), r0=foot, r1=belly, h=h1, top_cap=False),
        _Frustum(_c(0.0, 0.0, h1), r0=belly, r1=mouth, h=h2, bottom_cap=False, top_cap=False),
    ]


def _cup(rng: Rng) -> list[_Part]:
    r = rng.uniform(0.3, 0.45)
    return [
        _Frustum(
            _c(0.0, 0.0, 0.0),
            r0=r * rng.uniform(0.75, 1.0),
            r1=r,
            h=rng.uniform(0.5, 0.9),
            top_cap=False,
        )
    ]


def _mug(rng: Rng) -> list[_Part]:
    r = rng.uniform(0.3, 0.45)
    h = rng.uniform(0.5, 0.9)
    body = _Frustum(_c(0.0, 0.0, 0.0), r0=r, r1=r, h=h, top_cap=False)
    handle_r = h * rng.uniform(0.25, 0.35)
    handle = _Torus(
        _c(r, 0.0, h / 2),
        axis="y",
        R=handle_r,
        r=rng.uniform(0.03, 0.06),
        arc=math.pi,
        start=-math.pi / 2,
    )
    return [body, handle]


def _lamp(rng: Rng) -> list[_Part]:
    base_r = rng.uniform(0.2, 0.35)
    base_h = rng.uniform(0.04, 0.1)
    pole_h = rng.uniform(0.7, 1.2)
    shade_h = rng.uniform(0.3, 0.5)
    return [
        _Frustum(_c(0.0, 0.0, 0.0), r0=base_r, r1=base_r, h=base_h),
        _Frustum(_c(0.0, 0.0, base_h), r0=0.03, r1=0.03, h=pole_h, bottom_cap=False, top_cap=False),
        _Frustum(
            _c(0.0, 0.0, base_h + pole_h - shade_h * 0.5),
            r0=rng.uniform(0.35, 0.55),
            r1=rng.uniform(0.15, 0.3),
            h=shade_h,
            bottom_cap=False,
            top_cap=False,
        ),
    ]


def _monitor(rng: Rng) -> list[_Part]:
    hx, hz = rng.uniform(0.6, 0.9), rng.uniform(0.35, 0.55)
    stand_h = rng.uniform(0.2, 0.4)
    return [
        _Box(_c(0.0, 0.0, stand_h + hz), half=np.array([hx, rng.uniform(0.02, 0.05), hz])),
        _Frustum(_c(0.0, 0.0, 0.04), r0=0.04, r1=0.04, h=stand_h, bottom_cap=False, top_cap=False),
        _Box(_c(0.0, 0.0, 0.02), half=np.array([hx * 0.4, 0.2, 0.02])),
    ]


def _airplane(rng: Rng) -> list[_Part]:
    length = rng.uniform(1.6, 2.2)
    r = rng.uniform(0.1, 0.18)
    span = rng.uniform(0.8, 1.2)
    return [
        _Frustum(_c(-length / 2, 0.0, 0.0), axis="x", r0=r, r1=r, h=length * 0.85),
        _Frustum(
            _c(-length / 2 + length * 0.85, 0.0, 0.0),
            axis="x",
            r0=r,
            r1=0.02,
            h=length * 0.15,
            bottom_cap=False,
            top_cap=False,
        ),
        _Box(_c(0.0, 0.0, 0.0), half=np.array([rng.uniform(0.15, 0.3), span, 0.02])),
        _Box(_c(-length / 2 + 0.1, 0.0, r + 0.15), half=np.array([0.1, 0.02, 0.15])),
        _Box(_c(-length / 2 + 0.1, 0.0, 0.0), half=np.array([0.08, span * 0.35, 0.02])),
    ]


def _donut(rng: Rng) -> list[_Part]:
    big = rng.uniform(0.5, 0.8)
    return [_Torus(_c(0.0, 0.0, 0.0), R=big, r=big * rng.uniform(0.2, 0.45))]


def _capsule(rng: Rng) -> list[_Part]:
    r = rng.uniform(0.2, 0.35)
    h = rng.uniform(0.6, 1.2)
    cap = np.array([r, r, r * rng.uniform(0.6, 1.0)])
    return [
        _Frustum(_c(0.0, 0.0, 0.0), r0=r, r1=r, h=h, bottom_cap=False, top_cap=False),
        _Ellipsoid(_c(0.0, 0.0, 0.0), radii=cap),
        _Ellipsoid(_c(0.0, 0.0, h), radii=cap),
    ]


_BUILDERS: dict[str, Callable[[Rng], list[_Part]]] = {
    "airplane": _airplane,
    "bed": _bed,
    "bottle": _bottle,
    "cabinet": _cabinet,
    "capsule": _capsule,
    "chair": _chair,
    "cup": _cup,
    "donut": _donut,
    "lamp": _lamp,
    "monitor": _monitor,
    "mug": _mug,
    "stool": _stool,
    "table": _table,
    "vase": _vase,
}

#: The synthetic class names, in label order.
SYNTHETIC_CLASSES: tuple[str, ...] = tuple(_BUILDERS)


def sample_object(name: str, num_points: int, rng: Rng, jitter: float = 0.01) -> np.ndarray:
    """Sample one object of class ``name`` as a point cloud.

    Args:
        name: One of :data:`SYNTHETIC_CLASSES`.
        num_points: Number of points N.
        rng: The numpy random generator that decides everything (proportions, pose, noise).
        jitter: Standard deviation of the Gaussian noise added to every point, relative to
            the object's radius (clipped at five standard deviations).

    Returns:
        Array of shape (N, 3), float32, centred at the origin and scaled so that the farthest
        point lies on the unit sphere.

    Raises:
        ValueError: For an unknown class name or a non-positive number of points.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown synthetic class {name!r}; expected one of {SYNTHETIC_CLASSES}")
    if num_points < 1:
        raise ValueError(f"num_points must be positive, got {num_points}")
    parts = _BUILDERS[name](rng)
    areas = np.array([p.area() for p in parts])
    counts = rng.multinomial(num_points, areas / areas.sum())
    pts = np.concatenate([p.sample(rng, int(k)) for p, k in zip(parts, counts) if k > 0])
    pts = pts[rng.permutation(num_points)]
    angle = rng.uniform(0.0, 2.0 * math.pi)
    c, s = math.cos(angle), math.sin(angle)
    pts = pts @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]).T
    pts -= pts.mean(axis=0)
    scale = np.linalg.norm(pts, axis=1).max()
    if jitter > 0:
        noise = np.clip(rng.normal(scale=jitter, size=pts.shape), -5 * jitter, 5 * jitter)
        pts += noise * scale
    pts -= pts.mean(axis=0)
    pts /= np.linalg.norm(pts, axis=1).max()
    return pts.astype(np.float32)


def generate_synthetic(
    num_per_class: int,
    num_points: int,
    *,
    num_classes: int | None = None,
    seed: int = 0,
    split: str = "train",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Generate a class-balanced synthetic split.

    The result depends only on the arguments: the same call always returns the same arrays,
    and the train and test splits use independent random streams.

    Args:
        num_per_class: Objects per class.
        num_points: Points N per object.
        num_classes: Use the first K classes of :data:`SYNTHETIC_CLASSES` (default: all).
        seed: Random seed.
        split: "train" or "test" (selects an independent random stream).

    Returns:
        ``(points, labels, class_names)`` with points (n, N, 3) float32, labels (n,) int64
        where n = K * num_per_class, ordered class by class.

    Raises:
        ValueError: For a bad split name or sizes.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    k = len(SYNTHETIC_CLASSES) if num_classes is None else num_classes
    if not 2 <= k <= len(SYNTHETIC_CLASSES):
        raise ValueError(
            f"num_classes must be between 2 and {len(SYNTHETIC_CLASSES)}, got {num_classes}"
        )
    if num_per_class < 1:
        raise ValueError(f"num_per_class must be positive, got {num_per_class}")
    names = list(SYNTHETIC_CLASSES[:k])
    points = np.empty((k * num_per_class, num_points, 3), dtype=np.float32)
    labels = np.repeat(np.arange(k, dtype=np.int64), num_per_class)
    split_id = 0 if split == "train" else 1
    for label, name in enumerate(names):
        rng = np.random.default_rng([seed, split_id, label])
        for i in range(num_per_class):
            points[label * num_per_class + i] = sample_object(name, num_points, rng)
    return points, labels, names
