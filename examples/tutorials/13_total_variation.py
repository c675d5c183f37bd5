"""Tutorial 13: 1-D total-variation denoising as a layer, with a learnable weight.

``total_variation_1d(x, λ)`` returns ``argmin_y ½‖y − x‖² + λ Σ_i |y_{i+1} − y_i|``, a
piecewise-constant signal. We check it against a generic solver (the problem's dual, a box
constrained QP, by projected gradient), check its gradient with respect to ``x`` and ``λ`` by
finite differences, and learn ``λ`` so that denoising a noisy step signal recovers the clean
one as well as possible, comparing with a grid search.

Run: ``python examples/tutorials/13_total_variation.py [--fast]``.
"""

from __future__ import annotations

import argparse

import torch

from declnet.layers import TotalVariation1d, total_variation_1d


def check(ok: bool, what: str) -> None:
    """Raise ``AssertionError`` naming ``what`` unless ``ok``; print it otherwise."""
    if not ok:
        raise AssertionError(f"check failed: {what}")
    print(f"ok: {what}")

def tv_by_dual(x: torch.Tensor, lam: float, iters: int = 20000) -> torch.Tensor:
    """Reference solver: y = x − Dᵀz with z = argmin ½‖Dᵀz − x‖², |z| ≤ λ (projected gradient)."""
    n = x.shape[-1]
    D = torch.diff(torch.eye(n, dtype=x.dtype), dim=0)  # (n−1, n)
    z = torch.zeros(*x.shape[:-1], n - 1, dtype=x.dtype)
    step = 1.0 / 4.0  # ‖D Dᵀ‖ ≤ 4
    for _ in range(iters):
        z = (z - step * ((z @ D - x) @ D.T)).clamp(-lam, lam)
    return x - z @ D


def main(fast: bool = False) -> None:
    """Check the TV layer and learn its weight."""
    torch.manual_seed(0)
    batch, n = (2, 12) if fast else (8, 40)
    x = torch.randn(batch, n, dtype=torch.float64, requires_grad=True)
    y = total_variation_1d(x, 0.5)
    reference = tv_by_dual(x.detach(), 0.5, iters=3000 if fast else 20000)
    check(torch.allclose(y, reference, atol=1e-6), "Condat's exact solver = a generic dual solver")
    lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    check(torch.autograd.gradcheck(total_variation_1d, (x, lam)), "gradients for x and λ vs FD")

    clean = torch.zeros(batch, 4 * n, dtype=torch.float64)
    clean[:, n:2 * n] = 1.0
    clean[:, 3 * n:] = -0.5
    noisy = clean + 0.3 * torch.randn_like(clean)
    layer = TotalVariation1d(weight=0.05).double()
    optimiser = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(80 if fast else 200):
        loss = ((layer(noisy) - clean) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    learned = float(next(layer.parameters()).detach())
    grid = torch.linspace(0.01, 2.0, 200, dtype=torch.float64)
    errors = torch.stack([((total_variation_1d(noisy, float(g)) - clean) ** 2).mean()
                          for g in grid])
    best = float(grid[errors.argmin()])
    print(f"learned λ = {learned:.3f}, best on a grid {best:.3f}")
    learned_error = float(((layer(noisy) - clean) ** 2).mean().detach())
    check(learned_error <= float(errors.min()) * 1.02, "the learned λ is as good as the grid's")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
