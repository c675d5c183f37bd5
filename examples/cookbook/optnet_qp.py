"""Cookbook: an OptNet-style quadratic-programming layer, and learning its parameters.

``quadratic_program(Q, p, G, h, A, b)`` solves ``argmin ½yᵀQy + pᵀy`` s.t. ``Gy ≤ h``,
``Ay = b`` for a batch, differentiably in every argument (Amos & Kolter, 2017). We check the
KKT conditions of the solution, the gradients for all six arguments by finite differences,
and learn the constraint offsets ``h`` of a layer so that it reproduces a hidden QP's outputs.

Run: ``python examples/cookbook/optnet_qp.py [--fast]``.
"""

from __future__ import annotations

import argparse

import torch

from declnet.layers import quadratic_program


def check(ok: bool, what: str) -> None:
    """Raise ``AssertionError`` naming ``what`` unless ``ok``; print it otherwise."""
    if not ok:
        raise AssertionError(f"check failed: {what}")
    print(f"ok: {what}")

def random_qp(batch: int, n: int, q: int, p: int) -> tuple[torch.Tensor, ...]:
    """A random strictly convex QP with a feasible point at 0."""
    L = torch.randn(batch, n, n, dtype=torch.float64)
    Q = L @ L.transpose(-1, -2) + 0.5 * torch.eye(n, dtype=torch.float64)
    lin = torch.randn(batch, n, dtype=torch.float64)
    G = torch.randn(batch, q, n, dtype=torch.float64)
    h = torch.rand(batch, q, dtype=torch.float64) + 0.1
    A = torch.randn(batch, p, n, dtype=torch.float64)
    b = torch.zeros(batch, p, dtype=torch.float64)
    return Q, lin, G, h, A, b


def main(fast: bool = False) -> None:
    """Check the QP layer and learn a constraint offset."""
    torch.manual_seed(0)
    batch, n, q, p = (2, 4, 5, 1) if fast else (4, 6, 8, 2)
    args = [t.requires_grad_() for t in random_qp(batch, n, q, p)]
    _, _, G, h, A, b = args
    y = quadratic_program(*args)
    slack = h - torch.einsum("bij,bj->bi", G, y)
    check(bool((slack > -1e-9).all()), "Gy ≤ h")
    check(torch.allclose(torch.einsum("bij,bj->bi", A, y), b, atol=1e-9), "Ay = b")
    active = slack < 1e-7
    print(f"{int(active.sum())} of {active.numel()} inequalities active")
    check(torch.autograd.gradcheck(quadratic_program, tuple(args), atol=1e-5),
          "gradients for Q, p, G, h, A, b vs finite differences")

    # Learn h: a layer with the right Q, p, G but unknown offsets fits a hidden layer's outputs.
    n_train = 16 if fast else 32
    Q0, _, G0, h_true, _, _ = (t[0].detach() for t in random_qp(1, n, q, p))
    x = 2 * torch.randn(n_train, n, dtype=torch.float64)  # the inputs are the linear terms
    target = quadratic_program(Q0, x, G0, h_true)
    log_h = torch.full((q,), -0.5, dtype=torch.float64, requires_grad=True)  # h = exp(θ) > 0
    optimiser = torch.optim.LBFGS([log_h], max_iter=25 if fast else 50,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = ((quadratic_program(Q0, x, G0, log_h.exp()) - target) ** 2).mean()
        loss.backward()
        return loss

    start = float(closure().detach())
    optimiser.step(closure)
    fitted = float(closure().detach())
    print(f"fit loss {start:.2e} → {fitted:.2e}")
    check(fitted < 1e-3 * start, "the learned offsets reproduce the hidden layer's outputs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
