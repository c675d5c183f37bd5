"""Tutorial 4: Euclidean projections onto Lp spheres, balls and the simplex (paper §5.2).

The ready-made projections have closed-form gradients. We check each against finite
differences, check the defining properties of the output (on the sphere, inside the ball,
on the simplex), see what ``masked`` changes for p = 1 and ∞, and show that a declarative
node written in a few lines — the L2 sphere as an equality-constrained problem — gives the
same values and gradients.

Run: ``python examples/tutorials/04_euclidean_projections.py [--fast]``.
"""

from __future__ import annotations

import argparse

import torch

import declnet
from declnet.layers import project_onto_ball, project_onto_simplex, project_onto_sphere


def check(ok: bool, what: str) -> None:
    """Raise ``AssertionError`` naming ``what`` unless ``ok``; print it otherwise."""
    if not ok:
        raise AssertionError(f"check failed: {what}")
    print(f"ok: {what}")

class L2Sphere(declnet.EqualityConstrainedNode):
    """y = argmin_u ½‖u − x‖² subject to ‖u‖₂ = r."""

    def __init__(self, radius: float) -> None:
        super().__init__()
        self.radius = radius

    def objective(self, x: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return (y**2).sum(-1, keepdim=True) - self.radius**2

    def initial_guess(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def main(fast: bool = False) -> None:
    """Check the projections' outputs and gradients."""
    torch.manual_seed(0)
    batch, n = (3, 5) if fast else (16, 12)
    x = (2 * torch.randn(batch, n, dtype=torch.float64)).requires_grad_()
    for p in (1, 2, float("inf"), 3.0):
        y = project_onto_sphere(x, p=p, radius=1.5)
        norms = torch.linalg.vector_norm(y, ord=p, dim=-1)
        check(torch.allclose(norms, torch.full_like(norms, 1.5)), f"L{p} sphere: ‖y‖ = r")
        z = project_onto_ball(x, p=p, radius=1.5)
        check(bool((torch.linalg.vector_norm(z, ord=p, dim=-1) <= 1.5 + 1e-9).all()),
              f"L{p} ball: ‖y‖ ≤ r")
        # For p = 1 and ∞ the default gradient is Table 2's Dy, which lets the gradient flow
        # through coordinates the projection zeroes (or clips); masked=True gives the exact
        # Jacobian (D²y), which is what finite differences measure.
        for name, fn in (("sphere", project_onto_sphere), ("ball", project_onto_ball)):
            check(torch.autograd.gradcheck(
                lambda u, f=fn, q=p: f(u, p=q, radius=1.5, masked=True), (x,)),
                f"L{p} {name}: gradient (masked) vs finite differences")
    s = project_onto_simplex(x)
    check(bool((s >= 0).all()) and torch.allclose(s.sum(-1), torch.ones(batch, dtype=s.dtype)),
          "simplex: y ≥ 0 and Σ y = 1")
    check(torch.autograd.gradcheck(project_onto_simplex, (x,)), "simplex: gradient vs FD")

    node = L2Sphere(1.5)  # solved by the built-in SQP solver
    y_node = node(x)
    y_layer = project_onto_sphere(x, p=2, radius=1.5)
    check(torch.allclose(y_node, y_layer, atol=1e-8), "declarative node = ready-made layer")
    v = torch.randn_like(y_node)
    (g_node,) = torch.autograd.grad(y_node, x, v)
    (g_layer,) = torch.autograd.grad(y_layer, x, v)
    check(torch.allclose(g_node, g_layer, atol=1e-7), "and so are their gradients")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
