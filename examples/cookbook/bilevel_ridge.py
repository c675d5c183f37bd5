"""Cookbook: learning a ridge-regression hyper-parameter by bi-level optimisation.

Inner problem: ``w(ρ) = argmin_w ‖X_train w − y_train‖² + ρ‖w‖²`` (the least-squares layer).
Outer problem: minimise the validation error ``‖X_val w(ρ) − y_val‖²`` over ``ρ = exp(θ)``.
The hyper-gradient ``dL/dρ`` comes from implicit differentiation of the inner problem; we
check it against finite differences of the whole pipeline, descend on ``θ``, and check
that we reach the minimum found by a fine grid search.

Run: ``python examples/cookbook/bilevel_ridge.py [--fast]``.
"""

from __future__ import annotations

import argparse

import torch

from declnet.layers import least_squares


def check(ok: bool, what: str) -> None:
    """Raise ``AssertionError`` naming ``what`` unless ``ok``; print it otherwise."""
    if not ok:
        raise AssertionError(f"check failed: {what}")
    print(f"ok: {what}")

def main(fast: bool = False) -> None:
    """Learn the ridge penalty and compare with a grid search."""
    torch.manual_seed(0)
    n_train, n_val, dim = (30, 30, 20) if fast else (60, 200, 40)
    truth = torch.randn(dim, dtype=torch.float64)
    X_train = torch.randn(1, n_train, dim, dtype=torch.float64)
    X_val = torch.randn(n_val, dim, dtype=torch.float64)
    y_train = X_train @ truth + 2.0 * torch.randn(1, n_train, dtype=torch.float64)
    y_val = X_val @ truth + 2.0 * torch.randn(n_val, dtype=torch.float64)

    def validation_loss(theta: torch.Tensor) -> torch.Tensor:
        w = least_squares(X_train, y_train, ridge=theta.exp())[0]
        return ((X_val @ w - y_val) ** 2).mean()

    theta = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    check(torch.autograd.gradcheck(validation_loss, (theta,)), "hyper-gradient vs FD")

    optimiser = torch.optim.Adam([theta], lr=0.1)
    for _ in range(150 if fast else 300):
        loss = validation_loss(theta)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    grid = torch.linspace(-6, 8, 701, dtype=torch.float64)
    losses = torch.stack([validation_loss(t) for t in grid])
    best = float(grid[losses.argmin()])
    print(f"learned ρ = {theta.exp():.3f}, grid search ρ = {torch.exp(torch.tensor(best)):.3f}")
    check(abs(float(theta.detach()) - best) < 0.05, "the learned log ρ matches the grid search")
    check(float(validation_loss(theta).detach()) <= float(losses.min()) + 1e-6,
          "and its validation loss is the grid's minimum")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
