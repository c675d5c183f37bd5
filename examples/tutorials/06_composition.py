"""Tutorial 6: composing declarative nodes with each other and with ordinary layers.

Nodes are ``nn.Module``s, so they chain like any layer and autograd strings their implicit
gradients together. The model here is ``x → Linear → robust (pseudo-Huber) mean over a set
→ projection onto the unit sphere (a node we write)``. We check the whole chain's gradient
with respect to the input against finite differences, check the gradient of the linear
layer's weight, and train the weight so that the output matches a target direction.

Run: ``python examples/tutorials/06_composition.py [--fast]``.
"""

from __future__ import annotations

import argparse

import torch

import declnet
from declnet.layers import PseudoHuber, robust_pool


def check(ok: bool, what: str) -> None:
    """Raise ``AssertionError`` naming ``what`` unless ``ok``; print it otherwise."""
    if not ok:
        raise AssertionError(f"check failed: {what}")
    print(f"ok: {what}")

class UnitSphere(declnet.EqualityConstrainedNode):
    """y = argmin_u ½‖u − z‖² subject to ‖u‖² = 1, with the closed-form solve."""

    def objective(self, z: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((y - z) ** 2).sum(-1)

    def equality_constraints(self, z: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return (y**2).sum(-1, keepdim=True) - 1.0

    def solve(self, z: torch.Tensor) -> torch.Tensor:
        return z / z.norm(dim=-1, keepdim=True)


class Model(torch.nn.Module):
    """(B, N, d) sets of points → (B, k) unit vectors."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(d, k, dtype=torch.float64)
        self.sphere = UnitSphere()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.linear(x)  # (B, N, k)
        pooled = robust_pool(features, PseudoHuber(alpha=1.0), dim=1)  # (B, k)
        return self.sphere(pooled)


def main(fast: bool = False) -> None:
    """Check and train the composed model."""
    torch.manual_seed(0)
    batch, N, d, k = (2, 6, 3, 2) if fast else (8, 30, 5, 3)
    model = Model(d, k)
    x = torch.randn(batch, N, d, dtype=torch.float64, requires_grad=True)
    check(torch.autograd.gradcheck(model, (x,)), "d output / d input through both nodes vs FD")

    weight = model.linear.weight

    def of_weight(w: torch.Tensor) -> torch.Tensor:
        feats = torch.nn.functional.linear(x.detach(), w, model.linear.bias)
        return model.sphere(robust_pool(feats, PseudoHuber(alpha=1.0), dim=1))

    check(torch.autograd.gradcheck(of_weight, (weight.detach().clone().requires_grad_(),)),
          "d output / d weight vs FD")

    target = torch.nn.functional.normalize(torch.randn(1, k, dtype=torch.float64), dim=-1)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60 if fast else 200):
        loss = (1 - (model(x.detach()) * target).sum(-1)).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    print(f"final loss 1 − cos = {float(loss.detach()):.2e}")
    check(float(loss.detach()) < 1e-3, "training through the composition aligns the outputs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
