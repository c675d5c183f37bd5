"""Tutorial 10: least squares as a layer — basic, weighted, ridge, with an intercept.

``least_squares(A, b, weights, ridge)`` solves ``argmin_y Σ_i w_i (a_iᵀy − b_i)² + ρ‖y‖²``
for a batch and differentiates with respect to every argument. We compare the solutions
with ``torch.linalg.lstsq`` and the normal equations, check all four gradients by finite
differences, and check the declarative view: the same problem written as an unconstrained
node gives the same gradients.

Run: ``python examples/tutorials/10_least_squares.py [--fast]``.
"""

from __future__ import annotations

import argparse

import torch

import declnet
from declnet.layers import least_squares


def check(ok: bool, what: str) -> None:
    """Raise ``AssertionError`` naming ``what`` unless ``ok``; print it otherwise."""
    if not ok:
        raise AssertionError(f"check failed: {what}")
    print(f"ok: {what}")

class WeightedRidge(declnet.DeclarativeNode):
    """The same problem written as a node: objective only, the built-in Newton solves it."""

    def objective(self, A: torch.Tensor, b: torch.Tensor, w: torch.Tensor, *, y: torch.Tensor
                  ) -> torch.Tensor:
        r = torch.einsum("bij,bj->bi", A, y) - b
        return (w * r**2).sum(-1) + 0.1 * (y**2).sum(-1)

    def initial_guess(self, A: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return A.new_zeros(A.shape[0], A.shape[-1])


def main(fast: bool = False) -> None:
    """Check the least-squares layer's values and gradients."""
    torch.manual_seed(0)
    batch, N, n = (2, 6, 3) if fast else (8, 50, 6)
    A = torch.randn(batch, N, n, dtype=torch.float64, requires_grad=True)
    b = torch.randn(batch, N, dtype=torch.float64, requires_grad=True)
    w = torch.rand(batch, N, dtype=torch.float64).add(0.1).requires_grad_()

    y = least_squares(A, b)
    reference = torch.linalg.lstsq(A.detach(), b.detach().unsqueeze(-1)).solution.squeeze(-1)
    check(torch.allclose(y, reference, atol=1e-10), "basic: = torch.linalg.lstsq")

    y = least_squares(A, b, weights=w, ridge=0.1)
    At = A.detach().transpose(-1, -2)
    normal = At @ (w.detach().unsqueeze(-1) * A.detach()) + 0.1 * torch.eye(n, dtype=A.dtype)
    rhs = At @ (w.detach() * b.detach()).unsqueeze(-1)
    check(torch.allclose(y, torch.linalg.solve(normal, rhs).squeeze(-1), atol=1e-10),
          "weighted ridge: = the normal equations")

    y_icpt = least_squares(A, b, fit_intercept=True)
    print(f"with an intercept the output has {y_icpt.shape[-1]} entries for {n} columns")

    rho = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    check(torch.autograd.gradcheck(lambda *a: least_squares(*a), (A, b, w, rho)),
          "gradients for A, b, weights and ridge vs finite differences")

    v = torch.randn(batch, n, dtype=torch.float64)
    grads_layer = torch.autograd.grad(least_squares(A, b, w, 0.1), (A, b, w), v)
    grads_node = torch.autograd.grad(WeightedRidge()(A, b, w), (A, b, w), v)
    check(all(torch.allclose(g1, g2, atol=1e-8) for g1, g2 in zip(grads_layer, grads_node)),
          "layer gradients = the generic declarative node's")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
