"""Cookbook: the smallest-eigenvector layer, and fitting a conic (or a plane) with it.

Many geometric estimators (total least squares, the eight-point algorithm, conic fitting)
return the eigenvector of ``XᵀX`` with the smallest eigenvalue. ``eigenvectors(S, k=1,
largest=False)`` gives it with a closed-form backward. We check it against ``eigh``, check
its gradient with respect to the data points by finite differences, and use it for total
least-squares plane fitting: the normal of noisy points on a known plane is recovered, and
a gradient step on per-point weights (through the eigenvector) reduces the error.

Run: ``python examples/cookbook/smallest_eigenvector.py [--fast]``.
"""

from __future__ import annotations

import argparse

import torch

from declnet.layers import eigenvectors


def check(ok: bool, what: str) -> None:
    """Raise ``AssertionError`` naming ``what`` unless ``ok``; print it otherwise."""
    if not ok:
        raise AssertionError(f"check failed: {what}")
    print(f"ok: {what}")

def plane_normal(points: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted total-least-squares normal of (B, N, 3) points through the origin."""
    scatter = torch.einsum("bn,bni,bnj->bij", weights, points, points)
    return eigenvectors(scatter, k=1, largest=False)[..., 0]


def main(fast: bool = False) -> None:
    """Check the layer and fit planes."""
    torch.manual_seed(0)
    batch, N, outliers = (2, 20, 4) if fast else (8, 200, 40)
    normal = torch.nn.functional.normalize(torch.randn(batch, 3, dtype=torch.float64), dim=-1)
    raw = torch.randn(batch, N, 3, dtype=torch.float64)
    on_plane = raw - (raw * normal.unsqueeze(1)).sum(-1, keepdim=True) * normal.unsqueeze(1)
    points = on_plane + 0.01 * torch.randn_like(on_plane)
    points[:, :outliers] += 0.5 * normal.unsqueeze(1)  # outliers off the plane
    uniform = torch.ones(batch, N, dtype=torch.float64)

    scatter = torch.einsum("bni,bnj->bij", points, points)
    _, vecs = torch.linalg.eigh(scatter)
    check(torch.allclose(plane_normal(points, uniform).abs(), vecs[..., 0].abs()),
          "smallest eigenvector = eigh's first")
    small = points[:, :8].clone().requires_grad_()
    check(torch.autograd.gradcheck(lambda p: plane_normal(p, uniform[:, :8]), (small,)),
          "gradient w.r.t. the points vs finite differences")

    def angle(estimate: torch.Tensor) -> torch.Tensor:
        return torch.rad2deg(torch.acos((estimate * normal).sum(-1).abs().clamp(max=1)))

    print(f"uniform weights: worst angle {angle(plane_normal(points, uniform)).max():.2f}°")
    weights = uniform.clone().requires_grad_()
    error = (1 - (plane_normal(points, weights) * normal).sum(-1) ** 2).sum()  # sin² of angle
    (grad,) = torch.autograd.grad(error, weights)
    with torch.no_grad():
        stepped = (uniform - 0.1 * grad / grad.abs().max()).clamp(min=0)
        error_after = (1 - (plane_normal(points, stepped) * normal).sum(-1) ** 2).sum()
    print(f"sin² error {float(error.detach()):.2e} → {float(error_after):.2e} after one step")
    check(float(error_after) < float(error.detach()), "a gradient step on the weights helps")
    clean = uniform.clone()
    clean[:, :outliers] = 0
    final = angle(plane_normal(points, clean))
    print(f"outliers removed: worst angle {final.max():.2f}°")
    check(bool((final < 1.0).all()), "without the outliers the plane's normal is recovered")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
