"""Tutorial 16: declarative attention — softmax, sparsemax, entmax and optimal transport.

Attention weights are the solution of a problem over the probability simplex:

- softmax: ``argmax_p ⟨p, z⟩ + H(p)`` with the Shannon entropy ``H``;
- sparsemax: ``argmin_p ‖p − z‖²``, the Euclidean projection onto the simplex;
- α-entmax: the Tsallis entropy in between (α = 1 is softmax, α = 2 is sparsemax);
- optimal transport: weights that are also balanced across the keys (both marginals).

We write softmax as a declarative node (an equality-constrained problem; positivity is
implied by the entropy) and check it against ``torch.softmax`` and its gradient; check
sparsemax against ``project_onto_simplex`` and the QP layer; check entmax's limits and its
gradient by finite differences; and build one attention head from each, checking that
every row of weights is a distribution and that OT attention's columns are balanced.

Run: ``python examples/tutorials/16_declarative_attention.py [--fast]``.
"""

from __future__ import annotations

import argparse

import torch

import declnet
from declnet.layers import (
    entmax,
    optimal_transport,
    project_onto_simplex,
    quadratic_program,
    sparsemax,
)


def check(ok: bool, what: str) -> None:
    """Raise ``AssertionError`` naming ``what`` unless ``ok``; print it otherwise."""
    if not ok:
        raise AssertionError(f"check failed: {what}")
    print(f"ok: {what}")

class SoftmaxNode(declnet.EqualityConstrainedNode):
    """y = argmin_p −⟨p, z⟩ + Σ p log p subject to Σ p = 1 (its solution is softmax(z))."""

    def objective(self, z: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return (-z * y + y * torch.log(y)).sum(-1)

    def equality_constraints(self, z: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return y.sum(-1, keepdim=True) - 1.0

    def solve(self, z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(z, dim=-1)


def attend(weights: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One attention head over (B, T, d) queries, keys and values with the named weights."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, T, T)
    if weights == "softmax":
        w = torch.softmax(scores, -1)
    elif weights == "sparsemax":
        w = sparsemax(scores, dim=-1)
    elif weights == "entmax":
        w = entmax(scores, alpha=1.5, dim=-1)
    else:  # transport: rows and columns each carry mass 1/T; rescale rows to sum to 1
        w = optimal_transport(-scores, gamma=1.0) * scores.shape[-1]
    return w @ v, w


def main(fast: bool = False) -> None:
    """Check each attention map and its gradient."""
    torch.manual_seed(0)
    batch, n = (3, 5) if fast else (16, 12)
    z = torch.randn(batch, n, dtype=torch.float64, requires_grad=True)

    node = SoftmaxNode()
    check(torch.allclose(node(z), torch.softmax(z, -1)), "softmax node = torch.softmax")
    v = torch.randn(batch, n, dtype=torch.float64)
    (g_node,) = torch.autograd.grad(node(z), z, v)
    (g_torch,) = torch.autograd.grad(torch.softmax(z, -1), z, v)
    check(torch.allclose(g_node, g_torch, atol=1e-9), "implicit gradient = softmax's own")

    p = sparsemax(z)
    check(torch.allclose(p, project_onto_simplex(z), atol=1e-12), "sparsemax = simplex projection")
    eye = torch.eye(n, dtype=z.dtype)
    qp = quadratic_program(eye, -z.detach(), -eye, torch.zeros(n, dtype=z.dtype),
                           torch.ones(1, n, dtype=z.dtype), torch.ones(1, dtype=z.dtype))
    check(torch.allclose(p, qp, atol=1e-6), "sparsemax = the QP argmin ½‖p − z‖², p ≥ 0, Σp = 1")
    print(f"sparsemax zeroes {(p == 0).double().mean():.0%} of the weights")
    check(torch.autograd.gradcheck(sparsemax, (z,)), "sparsemax gradient vs finite differences")

    check(torch.allclose(entmax(z, alpha=2.0), p, atol=1e-10), "2-entmax = sparsemax")
    near_one = entmax(z, alpha=1.001)
    check(torch.allclose(near_one, torch.softmax(z, -1), atol=1e-2), "entmax → softmax as α → 1")
    for alpha in (1.5, 1.3):
        check(torch.autograd.gradcheck(lambda u, a=alpha: entmax(u, alpha=a), (z,)),
              f"{alpha}-entmax gradient vs finite differences")

    T, d = (4, 3) if fast else (10, 8)
    q, k, vals = (torch.randn(2, T, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for weights in ("softmax", "sparsemax", "entmax", "transport"):
        _, w = attend(weights, q, k, vals)
        check(torch.allclose(w.sum(-1), torch.ones(2, T, dtype=w.dtype), atol=1e-8)
              and bool((w >= 0).all()), f"{weights} attention: every row is a distribution")
        check(torch.autograd.gradcheck(lambda *a, m=weights: attend(m, *a)[0], (q, k, vals)),
              f"{weights} attention: gradients for queries, keys, values vs FD")
    _, w = attend("transport", q, k, vals)
    check(torch.allclose(w.sum(-2), torch.ones(2, T, dtype=w.dtype), atol=1e-8),
          "transport attention: every key is attended to equally in total")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
