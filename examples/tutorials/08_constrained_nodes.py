"""Tutorial 8: equality- and inequality-constrained nodes in PyTorch (Props. 4.5 and 4.6).

Three nodes, each checked against its closed form and finite differences:

- an **equality-constrained** node, the projection onto the hyperplane ``1ᵀu = x₀``
  (solved by the built-in SQP), and a fixed ``A y = d`` as a
  ``LinearEqualityConstrainedNode``, which needs no multipliers;
- an **inequality-constrained** node, the projection onto the unit L2 ball with a
  non-quadratic objective, solved by the built-in interior point without any ``solve()``;
- a node whose ``solve()`` returns the **multipliers** with ``declnet.Solution``, so the
  backward pass does not have to estimate them.

The samples of one batch may have different active sets: some points start inside the
ball and some outside.

Run: ``python examples/tutorials/08_constrained_nodes.py [--fast]``.
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

class Hyperplane(declnet.EqualityConstrainedNode):
    """y = argmin_u ½‖u − z‖² subject to Σ u = s, for inputs z (B, n) and s (B, 1)."""

    def objective(self, z: torch.Tensor, s: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((y - z) ** 2).sum(-1)

    def equality_constraints(self, z: torch.Tensor, s: torch.Tensor, *, y: torch.Tensor
                             ) -> torch.Tensor:
        return y.sum(-1, keepdim=True) - s

    def initial_guess(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(z)


class ZeroSum(declnet.LinearEqualityConstrainedNode):
    """y = argmin_u ½‖u − z‖² subject to the fixed constraint A u = d (here Σ u = 0)."""

    def objective(self, z: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((y - z) ** 2).sum(-1)

    def solve(self, z: torch.Tensor) -> torch.Tensor:
        return z - z.mean(-1, keepdim=True)


class Ball(declnet.InequalityConstrainedNode):
    """y = argmin_u ½‖u − x‖² subject to ‖u‖² ≤ 1 — no solve(): the interior point runs."""

    def objective(self, x: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return (y**2).sum(-1, keepdim=True) - 1.0

    def initial_guess(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class BallWithMultipliers(Ball):
    """The same ball with a closed-form solve that also reports λ (paper sign: λ ≤ 0)."""

    def solve(self, x: torch.Tensor) -> declnet.Solution:
        norm = x.norm(dim=-1, keepdim=True)
        y = x / norm.clamp(min=1.0)
        # D_Y f = λ D_Y g: (y − x) = λ · 2y, so λ = (1 − ‖x‖)/2 where active, else 0.
        lam = ((1 - norm) / 2).clamp(max=0.0)
        return declnet.Solution(y, multipliers=lam)


def ball_jacobian(x: torch.Tensor) -> torch.Tensor:
    """The closed-form Jacobian of the projection onto the unit ball."""
    norm = x.norm(dim=-1, keepdim=True)
    eye = torch.eye(x.shape[-1], dtype=x.dtype).expand(x.shape[0], -1, -1)
    u = x / norm
    outside = eye - u.unsqueeze(-1) * u.unsqueeze(-2)
    jac = torch.where((norm > 1).unsqueeze(-1), outside / norm.unsqueeze(-1), eye)
    return jac


def main(fast: bool = False) -> None:
    """Check the three nodes."""
    torch.manual_seed(0)
    batch, n = (4, 3) if fast else (16, 8)
    z = torch.randn(batch, n, dtype=torch.float64)
    s = torch.randn(batch, 1, dtype=torch.float64)
    y = Hyperplane()(z, s)
    closed = z + (s - z.sum(-1, keepdim=True)) / n
    check(torch.allclose(y, closed, atol=1e-9), "hyperplane: SQP solution = closed form")
    print(declnet.testing.check_gradients(Hyperplane(), z, s))

    centred = ZeroSum(torch.ones(1, n, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    jac = centred.jacobian(z)
    expected = torch.eye(n, dtype=z.dtype) - 1.0 / n
    check(torch.allclose(jac, expected.expand_as(jac), atol=1e-10),
          "fixed A y = d (Cor. 4.9): Jacobian = I − 11ᵀ/n")

    x = 1.5 * torch.randn(batch, n, dtype=torch.float64)
    x[0] *= 0.1 / x[0].norm()  # one sample strictly inside the ball
    x[1] *= 3.0 / x[1].norm()  # one outside
    for node in (Ball(), BallWithMultipliers()):
        name = type(node).__name__
        y = node(x)
        check(torch.allclose(y, x / x.norm(dim=-1, keepdim=True).clamp(min=1), atol=1e-7),
              f"{name}: solution = closed form")
        jac = node.jacobian(x)
        check(torch.allclose(jac, ball_jacobian(x), atol=1e-6), f"{name}: Jacobian = closed form")
    report = declnet.testing.check_gradients(BallWithMultipliers(), x)
    print(report)
    check(report.passed, "gradients vs finite differences with mixed active sets")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
