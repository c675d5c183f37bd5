"""Tutorial 11: entropic optimal transport as a layer.

``optimal_transport(M, r, c, gamma)`` returns the plan
``P = argmin_P ⟨P, M⟩ + (1/γ) Σ P log P`` subject to ``P1 = r``, ``Pᵀ1 = c``, solved by
log-domain Sinkhorn. We check the marginals, the optimality condition (``P_ij ∝
exp(−γM_ij)`` up to row and column scalings), that large γ approaches the unregularised
plan of a problem whose answer is a known permutation, and the gradients with respect to the
cost and both marginals by finite differences (the marginals moved so that their masses stay
equal, as the problem requires).

Run: ``python examples/tutorials/11_optimal_transport.py [--fast]``.
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

def main(fast: bool = False) -> None:
    """Check the transport plan and its gradients."""
    torch.manual_seed(0)
    batch, n, m = (2, 3, 4) if fast else (8, 10, 12)
    M = torch.rand(batch, n, m, dtype=torch.float64, requires_grad=True)
    r = torch.softmax(torch.randn(batch, n, dtype=torch.float64), -1)
    c = torch.softmax(torch.randn(batch, m, dtype=torch.float64), -1)
    P = optimal_transport(M, r, c, gamma=5.0)
    check(torch.allclose(P.sum(-1), r, atol=1e-9) and torch.allclose(P.sum(-2), c, atol=1e-9),
          "the plan has the requested marginals")
    # log P + γM = α_i + β_j: its double-centred version vanishes.
    logk = P.detach().log() + 5.0 * M.detach()
    centred = logk - logk.mean(-1, keepdim=True) - logk.mean(-2, keepdim=True)
    centred = centred + logk.mean((-1, -2), keepdim=True)
    check(centred.abs().max() < 1e-7, "log P + γM is a sum of row and column terms")

    k = n
    perm = torch.randperm(k)
    cost = torch.ones(1, k, k, dtype=torch.float64)
    cost[0, torch.arange(k), perm] = 0.0
    sharp = optimal_transport(cost, gamma=50.0)
    target = torch.zeros(1, k, k, dtype=torch.float64)
    target[0, torch.arange(k), perm] = 1.0 / k
    check(torch.allclose(sharp, target, atol=1e-6), "large γ recovers the optimal permutation")

    # The marginal gradients are defined up to a shift (a change of r must keep the total
    # mass of c), so perturb the marginals through softmax, which keeps Σ r = Σ c = 1.
    logits_r = torch.randn(batch, n, dtype=torch.float64, requires_grad=True)
    logits_c = torch.randn(batch, m, dtype=torch.float64, requires_grad=True)

    def plan(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return optimal_transport(cost, torch.softmax(a, -1), torch.softmax(b, -1), gamma=5.0)

    check(torch.autograd.gradcheck(plan, (M, logits_r, logits_c)),
          "gradients for the cost and both marginals vs finite differences")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
