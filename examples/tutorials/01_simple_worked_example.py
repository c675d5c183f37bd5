"""Tutorial 1: a simple worked example of a declarative node.

The node is ``y(x) = argmin_u Σ_i (x_i − u)² + u⁴``, a scalar per sample: the mean pulled
towards zero by a quartic. Its optimality condition ``f'(u) = 2 Σ (u − x_i) + 4u³ = 0`` has
one root, and the implicit function theorem gives ``dy/dx_i = 2 / (2n + 12 y²)``. We write
the node, let the built-in Newton solver find ``y`` and compare the implicit gradient with
that closed form and with finite differences.

Run: ``python examples/tutorials/01_simple_worked_example.py [--fast]``.
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


class QuarticMean(declnet.DeclarativeNode):
    """y = argmin_u Σ_i (x_i − u)² + u⁴ for x of shape (B, n); y has shape (B, 1)."""

    def objective(self, x: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return ((x - y) ** 2).sum(-1) + (y**4).sum(-1)

    def initial_guess(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(-1, keepdim=True)


def main(fast: bool = False) -> None:
    """Solve, differentiate and check the quartic mean."""
    torch.manual_seed(0)
    batch, n = (3, 4) if fast else (16, 10)
    x = torch.randn(batch, n, dtype=torch.float64, requires_grad=True)
    node = QuarticMean()
    y = node(x)  # forward: declnet.solvers.Newton, as the node has no solve()

    stationarity = 2 * (y - x).sum(-1, keepdim=True) + 4 * y**3
    check(stationarity.abs().max() < 1e-8, "y satisfies the optimality condition")

    (grad,) = torch.autograd.grad(y.sum(), x)
    closed_form = (2 / (2 * n + 12 * y**2)).expand(batch, n)
    check(torch.allclose(grad, closed_form, atol=1e-10), "implicit gradient = closed form")

    report = declnet.testing.check_gradients(node, x.detach())
    print(report)
    check(torch.autograd.gradcheck(node, (x,)), "gradcheck against finite differences")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
