"""Tutorial 3: robust pooling, a mean that ignores outliers (paper §5.1).

``robust_pool(x, penalty)`` replaces ``x.mean(-1)`` by ``argmin_u Σ_i φ(u − x_i; α)``. We pool
samples of a known value ``c`` contaminated by far outliers: the quadratic penalty (the
mean) is dragged away, the robust ones (pseudo-Huber, Huber, Welsch, truncated quadratic)
stay near ``c``. Then we check each penalty's gradient by finite differences and that the
gradient of the Welsch pool gives the outliers (almost) no weight.

Run: ``python examples/tutorials/03_robust_pooling.py [--fast]``.
"""

from __future__ import annotations

import argparse

import torch

from declnet.layers import Huber, PseudoHuber, Quadratic, TruncatedQuadratic, Welsch, robust_pool


def check(ok: bool, what: str) -> None:
    """Raise ``AssertionError`` naming ``what`` unless ``ok``; print it otherwise."""
    if not ok:
        raise AssertionError(f"check failed: {what}")
    print(f"ok: {what}")

def main(fast: bool = False) -> None:
    """Pool contaminated data with every penalty and check values and gradients."""
    torch.manual_seed(0)
    batch, inliers, outliers = (2, 20, 5) if fast else (8, 200, 50)
    centre = torch.randn(batch, 1, dtype=torch.float64)
    clean = centre + 0.1 * torch.randn(batch, inliers, dtype=torch.float64)
    far = centre + 20.0 + torch.rand(batch, outliers, dtype=torch.float64)
    x = torch.cat([clean, far], dim=-1)

    mean = robust_pool(x, Quadratic())
    check(torch.allclose(mean, x.mean(-1)), "the quadratic penalty gives the mean")
    check(bool(((mean - centre[:, 0]).abs() > 1.0).all()), "the mean is dragged by outliers")
    for penalty in (Huber(), PseudoHuber(), Welsch(), TruncatedQuadratic()):
        y = robust_pool(x, penalty)
        error = (y - centre[:, 0]).abs().max()
        print(f"{type(penalty).__name__:>18}: worst distance to the true value {error:.3f}")
        bound = 0.2 if isinstance(penalty, (Welsch, TruncatedQuadratic)) else 1.5
        check(error < bound, f"{type(penalty).__name__} resists the outliers")

    small = x[:, ::5].clone().requires_grad_()
    for penalty in (Quadratic(), PseudoHuber(), Huber(alpha=0.5), Welsch()):
        check(torch.autograd.gradcheck(lambda z, pen=penalty: robust_pool(z, pen), (small,)),
              f"{type(penalty).__name__} gradient vs finite differences")

    x = x.requires_grad_()
    robust_pool(x, Welsch()).sum().backward()
    weight_on_outliers = x.grad[:, inliers:].abs().sum(-1).max()
    check(weight_on_outliers < 1e-6, "Welsch's gradient ignores the outliers")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
