"""Cookbook: a perspective-n-point (PnP) pose-estimation layer.

Given 3-D points ``X_i`` and their image projections ``u_i``, the camera pose ``(ω, t)``
(axis-angle rotation and translation) minimises the reprojection error
``Σ_i ‖π(R(ω) X_i + t) − u_i‖²``, a non-convex problem. As a declarative node the built-in
Newton solver refines it from an initial guess, and the gradient of the pose with respect to
the 2-D and 3-D points comes from implicit differentiation. We check that noise-free
observations give back the true pose and that the gradients agree with finite differences
there. The problem is non-convex: Newton only promises the local minimum its start leads
to, so we also solve from a start rotated by about 172° and check that it does not beat
the near start (here it reaches the same zero error; with fewer points or noise it need
not, which is why the initial guess matters).

Run: ``python examples/cookbook/pnp_pose.py [--fast]``.
"""

from __future__ import annotations

import argparse

import torch

import declnet


def check(ok: bool, what: str) -> None:
    """Raise ``AssertionError`` naming ``what`` unless ``ok``; print it otherwise."""
    if not ok:
        raise AssertionError(f"check failed: {what}")
    print(f"ok: {what}")

def rotate(omega: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Rotate (B, N, 3) points by the (B, 3) axis-angle vectors, R = exp([ω]ₓ)."""
    zero = torch.zeros_like(omega[:, 0])
    wx, wy, wz = omega.unbind(-1)
    skew = torch.stack([torch.stack([zero, -wz, wy], -1),
                        torch.stack([wz, zero, -wx], -1),
                        torch.stack([-wy, wx, zero], -1)], -2)
    return X @ torch.linalg.matrix_exp(skew).transpose(-1, -2)


def project(pose: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Pinhole projection (unit focal length) of X under pose = (ω, t), shape (B, 6)."""
    Y = rotate(pose[:, :3], X) + pose[:, None, 3:]
    return Y[..., :2] / Y[..., 2:]


class PnP(declnet.DeclarativeNode):
    """pose = argmin Σ_i ‖π(R X_i + t) − u_i‖² for X (B, N, 3), u (B, N, 2)."""

    def __init__(self, start: torch.Tensor) -> None:
        super().__init__()
        self.start = start

    def objective(self, X: torch.Tensor, u: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return ((project(y, X) - u) ** 2).sum((-1, -2))

    def initial_guess(self, X: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.start.expand(X.shape[0], 6).clone()


def main(fast: bool = False) -> None:
    """Recover poses and check their gradients."""
    torch.manual_seed(0)
    batch, N = (2, 8) if fast else (8, 30)
    X = torch.rand(batch, N, 3, dtype=torch.float64) * 2 - 1
    truth = torch.cat([0.3 * torch.randn(batch, 3, dtype=torch.float64),
                       torch.tensor([0.1, -0.1, 5.0], dtype=torch.float64).expand(batch, 3)], -1)
    u = project(truth, X)
    near = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 4.0], dtype=torch.float64)
    pose = PnP(near)(X, u)
    check(torch.allclose(pose, truth, atol=1e-6), "noise-free points give the true pose")

    node = PnP(near)
    report = declnet.testing.check_gradients(node, X, u)
    print(report)
    check(report.passed, "d pose / d (3-D points, 2-D points) vs finite differences")

    far = torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0, 4.0], dtype=torch.float64)  # rotated by ~172°
    other = PnP(far)(X, u)
    cost_near = node.objective(X, u, y=pose)
    cost_far = node.objective(X, u, y=other)
    print(f"reprojection error from a near start {cost_near.max():.1e}, "
          f"from a far start {cost_far.max():.1e}")
    check(bool((cost_far >= cost_near - 1e-12).all()) and float(cost_near.max()) < 1e-16,
          "the near start reaches zero reprojection error; the far one does no better")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
