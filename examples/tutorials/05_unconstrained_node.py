"""Tutorial 5: writing an unconstrained declarative node, with and without ``solve()``.

A node is an objective ``f(x, y)`` returning one value per sample, plus either a
``solve()`` you write or an ``initial_guess()`` for the built-in solver. The example is
pseudo-Huber regression, ``y(A, b) = argmin_u Σ_i φ(a_iᵀu − b_i)`` with
``φ(z) = √(1 + z²) − 1``. We write it twice (our own Newton iteration, and no solver at
all), check that both agree, check the gradients with respect to ``A`` and ``b`` with
``declnet.testing.check_gradients``, and declare the Hessian to skip the engine's
Hessian-vector products.

Run: ``python examples/tutorials/05_unconstrained_node.py [--fast]``.
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

class PseudoHuberFit(declnet.DeclarativeNode):
    """y = argmin_u Σ_i √(1 + (a_iᵀu − b_i)²) for A (B, N, n), b (B, N); no solve()."""

    def objective(self, A: torch.Tensor, b: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        r = torch.einsum("bij,bj->bi", A, y) - b
        return (torch.sqrt(1 + r**2) - 1).sum(-1)

    def initial_guess(self, A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1)


class PseudoHuberFitNewton(PseudoHuberFit):
    """The same node with its own solver, which also declares the Hessian it computed."""

    def solve(self, A: torch.Tensor, b: torch.Tensor) -> declnet.Solution:
        y = self.initial_guess(A, b)
        for _ in range(50):
            r = torch.einsum("bij,bj->bi", A, y) - b
            grad = torch.einsum("bij,bi->bj", A, r / torch.sqrt(1 + r**2))
            hess = torch.einsum("bij,bi,bik->bjk", A, (1 + r**2) ** -1.5, A)
            y = y - torch.linalg.solve(hess, grad)
            if grad.abs().max() < 1e-13:
                break
        r = torch.einsum("bij,bj->bi", A, y) - b
        hess = torch.einsum("bij,bi,bik->bjk", A, (1 + r**2) ** -1.5, A)
        return declnet.Solution(y, hessian=declnet.DenseOperator(hess))


def main(fast: bool = False) -> None:
    """Solve both ways and check the gradients."""
    torch.manual_seed(0)
    batch, N, n = (2, 8, 3) if fast else (8, 40, 5)
    A = torch.randn(batch, N, n, dtype=torch.float64)
    b = torch.randn(batch, N, dtype=torch.float64)
    y_builtin = PseudoHuberFit()(A, b)
    y_own = PseudoHuberFitNewton()(A, b)
    check(torch.allclose(y_builtin, y_own, atol=1e-8), "built-in solver = our Newton")
    residual = declnet.optimality_residual(PseudoHuberFit(), A, b)
    print(f"worst optimality residual of the built-in solve: {residual.worst():.1e}")
    for node in (PseudoHuberFit(), PseudoHuberFitNewton()):
        report = declnet.testing.check_gradients(node, A, b)
        print(type(node).__name__, report)
        check(report.passed,
              f"{type(node).__name__}: gradients for A and b vs finite differences")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
