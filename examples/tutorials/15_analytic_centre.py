"""Tutorial 15: the analytic centre of a polytope as a declarative node.

``y(A, b) = argmin_u −Σ_i log(b_i − a_iᵀu)``: the point deepest inside ``{u : Au < b}`` in the
log-barrier sense. There are no constraints to declare (the barrier keeps ``u`` inside), so
it is an unconstrained node; its ``solve()`` is a damped Newton method that stays feasible,
and it declares the Hessian it has already computed. We check the centre of a box (known:
its middle), the optimality condition, and the gradients with respect to ``A`` and ``b``.

Run: ``python examples/tutorials/15_analytic_centre.py [--fast]``.
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

class AnalyticCentre(declnet.DeclarativeNode):
    """y = argmin_u −Σ_i log(b_i − a_iᵀu) for A (B, p, n), b (B, p).

    The start u = 0 must be strictly inside, and the set bounded.
    """

    def objective(self, A: torch.Tensor, b: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return -torch.log(b - torch.einsum("bij,bj->bi", A, y)).sum(-1)

    @staticmethod
    def _derivatives(A: torch.Tensor, b: torch.Tensor, y: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = b - torch.einsum("bij,bj->bi", A, y)  # slacks, > 0
        grad = torch.einsum("bij,bi->bj", A, 1 / s)
        hess = torch.einsum("bij,bi,bik->bjk", A, s**-2, A)
        return s, grad, hess

    def solve(self, A: torch.Tensor, b: torch.Tensor) -> declnet.Solution:
        y = A.new_zeros(A.shape[0], A.shape[-1])
        for _ in range(100):
            _, grad, hess = self._derivatives(A, b, y)
            step = -torch.linalg.solve(hess, grad)
            decrement = (-(grad * step).sum(-1)).sqrt()  # Newton decrement
            if decrement.max() < 1e-12:
                break
            # damped Newton: a step of 1/(1 + decrement) never leaves the domain
            y = y + step / (1 + decrement).unsqueeze(-1)
        _, _, hess = self._derivatives(A, b, y)
        return declnet.Solution(y, hessian=declnet.DenseOperator(hess))


def main(fast: bool = False) -> None:
    """Check the analytic centre and its gradients."""
    torch.manual_seed(0)
    batch, p, n = (2, 6, 2) if fast else (8, 20, 4)
    eye = torch.eye(n, dtype=torch.float64)
    box_A = torch.cat([eye, -eye]).expand(1, -1, -1)
    lo, hi = -torch.rand(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
    box_b = torch.cat([hi, -lo]).unsqueeze(0)
    centre = AnalyticCentre()(box_A, box_b)
    check(torch.allclose(centre[0], (lo + hi) / 2, atol=1e-10), "a box's centre is its middle")

    # random half-spaces with u = 0 strictly inside, plus a box that keeps the set bounded
    A = torch.cat([torch.randn(batch, p, n, dtype=torch.float64), box_A.expand(batch, -1, -1)], 1)
    b = torch.cat([torch.rand(batch, p, dtype=torch.float64) + 0.5,
                   torch.full((batch, 2 * n), 3.0, dtype=torch.float64)], 1)
    node = AnalyticCentre()
    y = node(A, b)
    s = b - torch.einsum("bij,bj->bi", A, y)
    check(bool((s > 0).all()), "the centre is strictly inside")
    stationarity = torch.einsum("bij,bi->bj", A, 1 / s)
    check(stationarity.abs().max() < 1e-9, "Σ a_i / s_i = 0 at the centre")
    report = declnet.testing.check_gradients(node, A, b)
    print(report)
    check(report.passed, "gradients for A and b vs finite differences")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
