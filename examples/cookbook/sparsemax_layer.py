"""Cookbook: sparsemax (Martins & Astudillo, 2016) as a declarative layer and a classifier.

``sparsemax(z) = argmin_p ‖p − z‖²`` over the simplex: like softmax, but with exact zeros.
We check the closed-form solution (a threshold ``τ`` with ``p = max(z − τ, 0)``), the
Jacobian's known form ``diag(s) − ssᵀ/|S|`` on the support ``S``, the same layer written as a
generic ``InequalityConstrainedNode``, and train a linear classifier with the sparsemax
loss on separable data until it is accurate and its predictions are sparse.

Run: ``python examples/cookbook/sparsemax_layer.py [--fast]``.
"""

from __future__ import annotations

import argparse

import torch

import declnet
from declnet.layers import sparsemax


def check(ok: bool, what: str) -> None:
    """Raise ``AssertionError`` naming ``what`` unless ``ok``; print it otherwise."""
    if not ok:
        raise AssertionError(f"check failed: {what}")
    print(f"ok: {what}")

class SimplexProjection(declnet.InequalityConstrainedNode):
    """y = argmin_p ½‖p − z‖² s.t. Σp = 1 and p ≥ 0, solved by the built-in interior point."""

    def objective(self, z: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((y - z) ** 2).sum(-1)

    def equality_constraints(self, z: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return y.sum(-1, keepdim=True) - 1.0

    def inequality_constraints(self, z: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return -y

    def initial_guess(self, z: torch.Tensor) -> torch.Tensor:
        return torch.full_like(z, 1.0 / z.shape[-1])


def main(fast: bool = False) -> None:
    """Check sparsemax and train a sparse classifier."""
    torch.manual_seed(0)
    batch, n = (3, 5) if fast else (16, 10)
    z = 2 * torch.randn(batch, n, dtype=torch.float64)
    p = sparsemax(z)
    support = p > 0
    tau = ((z * support).sum(-1) - 1) / support.sum(-1)
    check(torch.allclose(p, (z - tau.unsqueeze(-1)).clamp(min=0)), "p = max(z − τ, 0)")
    jac = torch.autograd.functional.jacobian(lambda u: sparsemax(u).sum(0), z).transpose(0, 1)
    s = support.double()
    expected = torch.diag_embed(s) - s.unsqueeze(-1) * s.unsqueeze(-2) / s.sum(-1)[:, None, None]
    check(torch.allclose(jac, expected), "Jacobian = diag(s) − ssᵀ/|S|")
    generic = SimplexProjection()
    check(torch.allclose(generic(z), p, atol=1e-6), "the generic constrained node agrees")
    check(torch.allclose(generic.jacobian(z), expected, atol=1e-5),
          "and so does its implicit Jacobian")

    classes, dim, samples = (4, 6, 200) if fast else (6, 20, 1000)
    means = 3 * torch.randn(classes, dim)
    labels = torch.randint(classes, (samples,))
    x = means[labels] + torch.randn(samples, dim)
    model = torch.nn.Linear(dim, classes)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100 if fast else 300):
        probs = sparsemax(model(x))
        loss = ((probs - torch.nn.functional.one_hot(labels, classes)) ** 2).sum(-1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        probs = sparsemax(model(x))
    accuracy = float((probs.argmax(-1) == labels).float().mean())
    nonzero = float((probs > 0).float().sum(-1).mean())
    print(f"accuracy {accuracy:.1%}, {nonzero:.2f} non-zero probabilities per sample")
    check(accuracy > 0.9, "the sparsemax classifier is accurate")
    check(nonzero < 1.5, "and its predictions are sparse")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
