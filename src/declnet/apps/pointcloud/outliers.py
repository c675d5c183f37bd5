"""Outlier injection: replace some points of each cloud by points uniform in the unit ball."""

from __future__ import annotations

import torch

__all__ = ["inject_outliers", "num_outliers", "uniform_in_ball"]


def num_outliers(num_points: int, rate: float) -> int:
    """Number of points replaced in a cloud of N points at outlier rate ``rate`` (rounded)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"outlier rate must lie in [0, 1], got {rate}")
    return round(rate * num_points)


def uniform_in_ball(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Points uniformly distributed in the unit ball.

    Args:
        shape: Leading shape S; the result is (*S, 3).
        generator: Random generator.

    Returns:
        (*S, 3) float32 tensor.
    """
    direction = torch.randn((*shape, 3), generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    radius = torch.rand((*shape, 1), generator=generator) ** (1.0 / 3.0)
    return direction * radius


def inject_outliers(points: torch.Tensor, rate: float, seed: int) -> torch.Tensor:
    """Replace a fraction of each cloud's points by outliers uniform in the unit ball.

    Every cloud gets exactly ``round(rate * N)`` outliers at randomly chosen positions. The
    result depends only on the arguments, so the corrupted set is fixed for a run.

    Args:
        points: (n, N, 3) clouds (not modified).
        rate: Outlier fraction in [0, 1].
        seed: Seed of the positions and outlier points.

    Returns:
        (n, N, 3) corrupted copy of ``points`` (``points`` itself when the rate gives no outliers).

    Raises:
        ValueError: For a rate outside [0, 1] or points not of shape (n, N, 3).
    """
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (n, N, 3), got {tuple(points.shape)}")
    n, N, _ = points.shape
    k = num_outliers(N, rate)
    if k == 0 or n == 0:
        return points
    generator = torch.Generator().manual_seed(int(seed))
    positions = torch.rand((n, N), generator=generator).argsort(dim=1)[:, :k]
    out = points.clone()
    replacement = uniform_in_ball((n, k), generator).to(points.dtype)
    out.scatter_(1, positions[..., None].expand(n, k, 3), replacement)
    return out
