"""Tutorial 7: non-regular solutions — dependent constraints and singular Hessians (§4.7).

1. **Dependent active constraints.** Projecting onto ``{u : u₁ ≤ 0, 2u₁ ≤ 0}`` (the same
   half-space twice) gives active constraint gradients that are linearly dependent, so the
   KKT matrix is singular. The engine drops the dependent row and solves the reduced
   system; we compare with the closed-form Jacobian of the projection onto ``u₁ ≤ 0``.
2. **A singular Hessian.** ``y = argmin_u (u₁ + u₂ − x)²`` has a line of minimisers; the
   solver returns one (the minimum-norm point ``u₁ = u₂ = x/2``) and the engine falls
   back to the pseudo-inverse, with a ``DeclarativeWarning``, which gives the derivative
   of the minimum-norm solution, ``dy/dx = (½, ½)``.
3. **Damping** (``ImplicitBackward(damping=γ)``) regularises ``H`` instead, and the
   gradient approaches the same answer as ``γ → 0``.

Run: ``python examples/tutorials/07_non_regular_points.py [--fast]``.
"""

from __future__ import annotations

import argparse
import warnings

import torch

import declnet


def check(ok: bool, what: str) -> None:
    """Raise ``AssertionError`` naming ``what`` unless ``ok``; print it otherwise."""
    if not ok:
        raise AssertionError(f"check failed: {what}")
    print(f"ok: {what}")

class DoubledHalfspace(declnet.InequalityConstrainedNode):
    """y = argmin_u ½‖u − x‖² subject to u₁ ≤ 0 and 2u₁ ≤ 0 (the same constraint twice)."""

    def objective(self, x: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([y[:, 0], 2 * y[:, 0]], dim=-1)

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[:, 0] = y[:, 0].clamp(max=0)
        return y


class LineOfMinima(declnet.DeclarativeNode):
    """y = argmin_u (u₁ + u₂ − x)² for x of shape (B, 1); the minimisers form a line."""

    def objective(self, x: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return (y.sum(-1) - x[:, 0]) ** 2

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        return (x / 2).expand(-1, 2).clone()


def main(fast: bool = False) -> None:
    """Differentiate at non-regular points and compare with the known derivatives."""
    torch.manual_seed(0)
    batch, n = (3, 3) if fast else (8, 6)
    x = torch.randn(batch, n, dtype=torch.float64)
    x[:, 0] = x[:, 0].abs() + 0.5  # outside the half-space: both constraints active
    x.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", declnet.DeclarativeWarning)  # this case is exact
        jac = DoubledHalfspace().jacobian(x.detach())  # (B, n, n)
    expected = torch.eye(n, dtype=x.dtype).repeat(batch, 1, 1)
    expected[:, 0, 0] = 0
    check(torch.allclose(jac, expected, atol=1e-10), "dependent constraints: exact Jacobian")

    x1 = torch.randn(batch, 1, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = LineOfMinima()(x1)
        (grad,) = torch.autograd.grad(y[:, 0].sum(), x1)
    named = [w for w in caught if issubclass(w.category, declnet.DeclarativeWarning)]
    print(f"warning: {named[0].message}" if named else "no warning")
    check(len(named) > 0, "a singular Hessian is reported with a DeclarativeWarning")
    check(torch.allclose(grad, torch.full_like(grad, 0.5)), "pseudo-inverse: dy₁/dx = ½")

    for gamma in (1e-2, 1e-4, 1e-6):
        node = LineOfMinima(backward=declnet.ImplicitBackward(damping=gamma))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", declnet.DeclarativeWarning)
            (g,) = torch.autograd.grad(node(x1)[:, 0].sum(), x1)
        print(f"damping {gamma:.0e}: dy₁/dx = {g[0, 0]:.6f}")
    check(torch.allclose(g, torch.full_like(g, 0.5), atol=1e-4), "damping → 0 gives ½ too")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
