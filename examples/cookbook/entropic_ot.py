"""Cookbook: entropic optimal transport with gradients with respect to the cost.

A common use (e.g. learning a matching): the cost is a learned function of features, the
transport plan ``P(M)`` matches two sets, and the loss compares ``P`` with a known
matching. We check the implicit gradient ``dL/dM`` three ways — finite differences,
autograd through an unrolled Sinkhorn run to convergence, and its known structure (its rows
and columns sum to zero, because ``P`` is unchanged by adding a constant to a row or column
of ``M``) — and then descend on the cost until the plan puts its mass on a target
permutation.

Run: ``python examples/cookbook/entropic_ot.py [--fast]``.
"""

from __future__ import annotations

import argparse

import torch

from declnet.layers import optimal_transport


def check(ok: bool, what: str) -> None:
    """Raise ``AssertionError`` naming ``what`` unless ``ok``; print it otherwise."""
    if not ok:
        raise AssertionError(f"check failed: {what}")
    print(f"ok: {what}")

def unrolled_sinkhorn(M: torch.Tensor, gamma: float, iters: int) -> torch.Tensor:
    """Log-domain Sinkhorn with uniform marginals, differentiated by autograd."""
    n, m = M.shape[-2:]
    log_r = torch.full((n,), -torch.log(torch.tensor(float(n))), dtype=M.dtype)
    log_c = torch.full((m,), -torch.log(torch.tensor(float(m))), dtype=M.dtype)
    f = torch.zeros(*M.shape[:-1], dtype=M.dtype)
    g = torch.zeros(*M.shape[:-2], m, dtype=M.dtype)
    for _ in range(iters):
        f = log_r - torch.logsumexp(-gamma * M + g.unsqueeze(-2), -1)
        g = log_c - torch.logsumexp(-gamma * M + f.unsqueeze(-1), -2)
    return torch.exp(-gamma * M + f.unsqueeze(-1) + g.unsqueeze(-2))


def main(fast: bool = False) -> None:
    """Check dL/dM and learn a matching."""
    torch.manual_seed(0)
    batch, n = (2, 4) if fast else (8, 10)
    M = torch.rand(batch, n, n, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(batch, n, n, dtype=torch.float64)

    def loss_of(cost: torch.Tensor) -> torch.Tensor:
        return (optimal_transport(cost, gamma=2.0) * weights).sum()

    check(torch.autograd.gradcheck(loss_of, (M,)), "dL/dM vs finite differences")
    (g_implicit,) = torch.autograd.grad(loss_of(M), M)
    unrolled = (unrolled_sinkhorn(M, 2.0, 200) * weights).sum()
    (g_unrolled,) = torch.autograd.grad(unrolled, M)
    check(torch.allclose(g_implicit, g_unrolled, atol=1e-8), "= autograd through Sinkhorn")
    check(g_implicit.sum(-1).abs().max() < 1e-9 and g_implicit.sum(-2).abs().max() < 1e-9,
          "rows and columns of dL/dM sum to zero (P ignores row/column shifts of M)")

    perm = torch.randperm(n)
    target = torch.zeros(n, n, dtype=torch.float64)
    target[torch.arange(n), perm] = 1.0 / n
    cost = torch.rand(1, n, n, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.SGD([cost], lr=0.5)
    loss = torch.tensor(float("nan"))
    for _ in range(100):
        P = optimal_transport(cost, gamma=1.0)
        matched = (P.detach()[0].argmax(-1) == perm).double().mean()
        if matched == 1.0:
            break
        loss = -(target * torch.log(P)).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    print(f"cross-entropy {float(loss.detach()):.3f}, correct matches {matched:.0%}")
    check(matched == 1.0, "descending on the cost recovers the target matching")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
