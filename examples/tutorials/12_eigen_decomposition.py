"""Tutorial 12: eigenvectors as a declarative layer.

The top eigenvector of a symmetric ``X`` solves ``argmax_u uᵀXu`` subject to ``‖u‖ = 1``,
an equality-constrained problem. We compare ``declnet.layers.eigenvectors`` with
``torch.linalg.eigh``, check that its gradient (closed form) agrees with finite
differences and with a declarative node that states the problem and lets the engine
differentiate it (a problem whose Lagrangian Hessian is singular while its KKT system is
not, so the whole KKT system is factorised), and check the sign convention that keeps the
output stable.

Run: ``python examples/tutorials/12_eigen_decomposition.py [--fast]``.
"""

from __future__ import annotations

import argparse

import torch

import declnet
from declnet.layers import eigenvectors


def check(ok: bool, what: str) -> None:
    """Raise ``AssertionError`` naming ``what`` unless ``ok``; print it otherwise."""
    if not ok:
        raise AssertionError(f"check failed: {what}")
    print(f"ok: {what}")

class TopEigenvector(declnet.EqualityConstrainedNode):
    """y = argmin_u −uᵀXu subject to ‖u‖² = 1, solved by eigh; X is (B, n, n)."""

    def objective(self, X: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return -torch.einsum("bi,bij,bj->b", y, X, y)

    def equality_constraints(self, X: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return (y**2).sum(-1, keepdim=True) - 1.0

    def solve(self, X: torch.Tensor) -> torch.Tensor:
        return eigenvectors(X, k=1, largest=True)[..., 0]


def random_symmetric(batch: int, n: int) -> torch.Tensor:
    """Random symmetric matrices with well-separated eigenvalues."""
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, dtype=torch.float64))
    values = torch.linspace(1.0, float(n), n, dtype=torch.float64)
    return q @ torch.diag_embed(values.expand(batch, n)) @ q.transpose(-1, -2)


def main(fast: bool = False) -> None:
    """Check the eigenvector layer."""
    torch.manual_seed(0)
    batch, n = (2, 4) if fast else (8, 10)
    X = random_symmetric(batch, n).requires_grad_()
    top = eigenvectors(X, k=2)  # (B, n, 2), largest first
    _, vecs = torch.linalg.eigh(X.detach())
    overlap = (top[..., 0] * vecs[..., -1]).sum(-1).abs()
    check(torch.allclose(overlap, torch.ones_like(overlap)), "top eigenvector = eigh's")
    Xu = X.detach() @ top.detach()
    residual = Xu - top.detach() * (top.detach() * Xu).sum(-2, keepdim=True)
    check(residual.abs().max() < 1e-10, "X u = λ u for both vectors")
    largest = top.detach().gather(-2, top.detach().abs().argmax(-2, keepdim=True))
    check(bool((largest > 0).all()), "sign convention: each vector's largest entry is positive")

    def sym(fn: object) -> object:
        return lambda A: fn(0.5 * (A + A.transpose(-1, -2)))  # perturb symmetrically

    check(torch.autograd.gradcheck(sym(lambda A: eigenvectors(A, k=2)), (X,)),
          "layer gradient vs finite differences")
    check(torch.autograd.gradcheck(sym(eigenvectors), (X,)) and torch.autograd.gradcheck(
        sym(lambda A: eigenvectors(A, k=1, largest=False)), (X,)), "k = 1, largest and smallest")
    v = torch.randn(batch, n, dtype=torch.float64)
    (g_layer,) = torch.autograd.grad(eigenvectors(X)[..., 0], X, v)
    # At the solution the Lagrangian's Hessian 2(λ_max I − X) is singular along y itself;
    # only the whole KKT matrix is regular. The engine's default checks its Schur-complement
    # solve against the whole system and factorises that instead.
    node = TopEigenvector()
    (g_node,) = torch.autograd.grad(node(X), X, v)
    g_layer, g_node = (0.5 * (g + g.transpose(-1, -2)) for g in (g_layer, g_node))
    check(torch.allclose(g_layer, g_node, atol=1e-8),
          "closed-form gradient = the generic engine's on the declared problem")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
