"""Tutorial 9: robust vector pooling, ``y = argmin_u Σ_i φ(‖u − x_i‖; α)``.

Pooling whole feature vectors, rather than each coordinate on its own, is robust to
outliers that corrupt a point in every coordinate at once. With the quadratic penalty it is
the mean; with pseudo-Huber, Huber or Welsch it is a robust centre. We check that the
result satisfies its optimality condition, that the robust centres stay near the true
centre of contaminated data, and that the gradients agree with finite differences.

Run: ``python examples/tutorials/09_robust_vector_pooling.py [--fast]``.
"""

from __future__ import annotations

import argparse

import torch

from declnet.layers import Huber, PseudoHuber, Welsch, robust_vector_pool


def check(ok: bool, what: str) -> None:
    """Raise ``AssertionError`` naming ``what`` unless ``ok``; print it otherwise."""
    if not ok:
        raise AssertionError(f"check failed: {what}")
    print(f"ok: {what}")

def main(fast: bool = False) -> None:
    """Pool contaminated point sets and check values and gradients."""
    torch.manual_seed(0)
    batch, channels, inliers, outliers = (2, 3, 16, 4) if fast else (8, 8, 128, 32)
    centre = torch.randn(batch, channels, 1, dtype=torch.float64)
    clean = centre + 0.2 * torch.randn(batch, channels, inliers, dtype=torch.float64)
    far = centre + 10 * torch.nn.functional.normalize(
        torch.randn(batch, channels, outliers, dtype=torch.float64), dim=1)
    x = torch.cat([clean, far], dim=-1)  # (B, C, N): points along the last dimension

    mean = robust_vector_pool(x, "quadratic")
    check(torch.allclose(mean, x.mean(-1)), "quadratic penalty: the mean of the points")
    for penalty in (PseudoHuber(), Huber(), Welsch()):
        y = robust_vector_pool(x, penalty)
        error = (y - centre[..., 0]).norm(dim=-1).max()
        name = type(penalty).__name__
        print(f"{name:>12}: distance to the true centre {error:.3f} "
              f"(mean: {(mean - centre[..., 0]).norm(dim=-1).max():.3f})")
        check(error < 0.5, f"{name} resists the outliers")
        # Optimality: Σ_i φ'(r_i) (y − x_i)/r_i = 0 with r_i = ‖y − x_i‖.
        u = y.detach().clone().requires_grad_()
        residuals = (u.unsqueeze(-1) - x).norm(dim=1)
        (grad,) = torch.autograd.grad(penalty.phi(residuals).sum(), u)
        check(grad.abs().max() < 1e-6, f"{name}: the gradient of the objective vanishes at y")

    small = x[:2, :3, :: 2 if fast else 10].clone().requires_grad_()  # gradcheck is O(size²)
    for penalty in (PseudoHuber(), Welsch()):
        check(torch.autograd.gradcheck(lambda z, p=penalty: robust_vector_pool(z, p), (small,)),
              f"{type(penalty).__name__}: gradient vs finite differences")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
