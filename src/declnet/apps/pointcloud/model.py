"""PointNet classifier whose global pooling is max pooling or a robust pooling layer."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

__all__ = ["POOLS", "PointNet", "make_penalty"]

#: The pooling choices: PointNet's max pooling and the robust poolings of paper §5.1.
POOLS: tuple[str, ...] = (
    "max",
    "quadratic",
    "pseudo_huber",
    "huber",
    "welsch",
    "truncated_quadratic",
)

_PENALTY_CLASSES = {
    "quadratic": "Quadratic",
    "pseudo_huber": "PseudoHuber",
    "huber": "Huber",
    "welsch": "Welsch",
    "truncated_quadratic": "TruncatedQuadratic",
}


def make_penalty(pool: str, alpha: float) -> Any:
    """The penalty object of a robust pooling choice, from ``declnet.layers``.

    Args:
        pool: One of :data:`POOLS` other than "max".
        alpha: Robustness parameter (loosely, the inlier threshold); unused by "quadratic".

    Returns:
        A penalty object accepted by :func:`declnet.layers.robust_pool`.

    Raises:
        ValueError: For an unknown pool name or a non-positive alpha.
    """
    if pool not in _PENALTY_CLASSES:
        raise ValueError(f"unknown robust pool {pool!r}; expected one of {POOLS[1:]}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    from declnet import layers

    cls = getattr(layers, _PENALTY_CLASSES[pool])
    return cls() if pool == "quadratic" else cls(alpha)


class PointNet(nn.Module):
    """PointNet (without the transformer networks) with a configurable global pooling.

    A shared per-point MLP 3-64-128-W (1x1 convolutions with BatchNorm, ReLU after all but
    the last layer) maps each of the N points to W features; the features are pooled over
    the points into one W-vector per cloud, and a head W-(W/2)-(W/4)-K (Linear, BatchNorm,
    ReLU, dropout before the last layer) classifies it. At W = 1024 and K = 40 this is the
    paper's network with 0.81M parameters; pooling adds none.

    Args:
        num_classes: Number of classes K.
        pool: "max" or a robust pooling: "quadratic", "pseudo_huber", "huber", "welsch",
            "truncated_quadratic" (:func:`declnet.layers.robust_pool` over the points).
        alpha: Robustness parameter of the robust penalties.
        width: Feature width W (at least 4).
        dropout: Dropout probability in the head.

    Shape:
        - Input: (B, N, 3) point clouds.
        - Output: (B, K) class logits.

    Raises:
        ValueError: For an unknown pool, a non-positive alpha or a bad width.

    Example:
        >>> net = PointNet(10, pool="max", width=64)
        >>> net(torch.rand(2, 100, 3)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int,
        pool: str = "max",
        alpha: float = 1.0,
        width: int = 1024,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; expected one of {POOLS}")
        if width < 4:
            raise ValueError(f"width must be at least 4, got {width}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.pool = pool
        self.alpha = float(alpha)
        self.penalty = None if pool == "max" else make_penalty(pool, alpha)
        channels = (3, 64, 128, width)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(itertools.pairwise(channels)):
            layers += [nn.Conv1d(cin, cout, 1), nn.BatchNorm1d(cout)]
            if i < len(channels) - 2:
                layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Linear(width, width // 2),
            nn.BatchNorm1d(width // 2),
            nn.ReLU(),
            nn.Linear(width // 2, width // 4),
            nn.BatchNorm1d(width // 4),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(width // 4, num_classes),
        )

    def pool_features(self, features: torch.Tensor) -> torch.Tensor:
        """Pool per-point features (B, W, N) over the points into (B, W)."""
        if self.penalty is None:
            return features.amax(dim=-1)
        from declnet.layers import robust_pool

        return robust_pool(features, self.penalty, dim=-1)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Classify point clouds (B, N, 3) into logits (B, K)."""
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"points must have shape (B, N, 3), got {tuple(points.shape)}")
        features = self.features(points.transpose(1, 2))
        return self.head(self.pool_features(features))
