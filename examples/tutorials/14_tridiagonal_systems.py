"""Tutorial 14: tridiagonal systems — a linear solve as a differentiable layer.

``tridiagonal_solve(lower, diag, upper, rhs)`` solves ``T x = r`` for a batch of tridiagonal
``T`` in O(n) (Thomas or cyclic reduction). Declaratively, ``x = argmin_u ½‖Tu − r‖²``, and
the gradients for all four bands follow from one transposed solve. We compare with a dense
solve, check every gradient by finite differences, and use the layer inside a model: a
cubic spline whose knot values are learned so that it fits data.

Run: ``python examples/tutorials/14_tridiagonal_systems.py [--fast]``.
"""

from __future__ import annotations

import argparse

import torch

from declnet.layers import tridiagonal_solve


def check(ok: bool, what: str) -> None:
    """Raise ``AssertionError`` naming ``what`` unless ``ok``; print it otherwise."""
    if not ok:
        raise AssertionError(f"check failed: {what}")
    print(f"ok: {what}")

def dense(lower: torch.Tensor, diag: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """The dense matrix with the given bands."""
    return torch.diag_embed(diag) + torch.diag_embed(upper, 1) + torch.diag_embed(lower, -1)


def spline_second_derivatives(values: torch.Tensor) -> torch.Tensor:
    """Natural cubic spline on unit knots: solve the tridiagonal system for M_1..M_{n−2}."""
    n = values.shape[-1]
    rhs = 6 * (values[..., 2:] - 2 * values[..., 1:-1] + values[..., :-2])
    diag = torch.full((n - 2,), 4.0, dtype=values.dtype).expand_as(rhs)
    off = torch.ones(n - 3, dtype=values.dtype).expand(*rhs.shape[:-1], n - 3)
    inner = tridiagonal_solve(off, diag, off, rhs)
    zero = values.new_zeros(*values.shape[:-1], 1)
    return torch.cat([zero, inner, zero], dim=-1)


def spline(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Evaluate the natural cubic spline through (i, values_i) at the points t."""
    M = spline_second_derivatives(values)
    i = t.floor().long().clamp(0, values.shape[-1] - 2)
    s = t - i
    y0, y1, m0, m1 = values[..., i], values[..., i + 1], M[..., i], M[..., i + 1]
    return (1 - s) * y0 + s * y1 + ((1 - s) ** 3 - (1 - s)) * m0 / 6 + (s**3 - s) * m1 / 6


def main(fast: bool = False) -> None:
    """Check the solve, its gradients and a spline fit."""
    torch.manual_seed(0)
    batch, n = (2, 5) if fast else (8, 30)
    lower = torch.randn(batch, n - 1, dtype=torch.float64, requires_grad=True)
    upper = torch.randn(batch, n - 1, dtype=torch.float64, requires_grad=True)
    diag = (4 + torch.rand(batch, n, dtype=torch.float64)).requires_grad_()
    rhs = torch.randn(batch, n, dtype=torch.float64, requires_grad=True)
    x = tridiagonal_solve(lower, diag, upper, rhs)
    reference = torch.linalg.solve(dense(lower, diag, upper), rhs.unsqueeze(-1)).squeeze(-1)
    check(torch.allclose(x, reference, atol=1e-12), "= a dense solve")
    for method in ("thomas", "cyclic"):
        check(torch.autograd.gradcheck(
            lambda *a, m=method: tridiagonal_solve(*a, method=m), (lower, diag, upper, rhs)),
            f"{method}: gradients for all four inputs vs finite differences")

    knots = 8 if fast else 16
    t = torch.linspace(0, knots - 1, 200, dtype=torch.float64)
    target = torch.sin(t / 2)
    values = torch.zeros(knots, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([values], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = ((spline(values, t) - target) ** 2).mean()
        loss.backward()
        return loss

    optimiser.step(closure)
    error = float(closure().detach())
    print(f"spline fit mean squared error {error:.2e}")
    check(error < 1e-5, "the learned spline fits sin(t/2)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
