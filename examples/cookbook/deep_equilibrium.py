"""Cookbook: a deep equilibrium (DEQ) layer, ``z* = tanh(W z* + U x + b)``.

A ``FixedPointNode`` states the map; the forward solves for its fixed point (Anderson
acceleration) and the backward solves one linear system by the implicit function theorem,
with no unrolling. We check that the output is a fixed point, compare the gradient with
autograd through a long naive iteration and with finite differences (inputs and the
layer's own weights), and train a DEQ classifier on a small task.

Run: ``python examples/cookbook/deep_equilibrium.py [--fast]``.
"""

from __future__ import annotations

import argparse

import torch

import declnet


def check(ok: bool, what: str) -> None:
    """Raise ``AssertionError`` naming ``what`` unless ``ok``; print it otherwise."""
    if not ok:
        raise AssertionError(f"check failed: {what}")
    print(f"ok: {what}")

class DEQ(declnet.FixedPointNode):
    """z* = tanh(W z* + U x); W is scaled so that the map is a contraction."""

    def __init__(self, n: int, m: int) -> None:
        super().__init__()
        self.W = torch.nn.Linear(m, m, bias=False, dtype=torch.float64)
        self.U = torch.nn.Linear(n, m, dtype=torch.float64)
        with torch.no_grad():
            self.W.weight.mul_(0.5 / torch.linalg.matrix_norm(self.W.weight, 2))

    def fixed_point_map(self, x: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.W(y) + self.U(x))

    def initial_guess(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.W.in_features)


def main(fast: bool = False) -> None:
    """Check the DEQ layer and train it."""
    torch.manual_seed(0)
    batch, n, m = (3, 4, 5) if fast else (16, 8, 32)
    deq = DEQ(n, m)
    x = torch.randn(batch, n, dtype=torch.float64, requires_grad=True)
    z = deq(x)
    check((z - deq.fixed_point_map(x, y=z)).abs().max() < 1e-8, "z* = f(z*, x)")

    v = torch.randn_like(z)
    grads = torch.autograd.grad(z, (x, deq.W.weight), v)
    naive = deq.initial_guess(x)
    for _ in range(200):
        naive = deq.fixed_point_map(x, y=naive)
    grads_naive = torch.autograd.grad(naive, (x, deq.W.weight), v)
    check(all(torch.allclose(a, b, atol=1e-8) for a, b in zip(grads, grads_naive)),
          "implicit gradients = autograd through 200 unrolled iterations")
    check(torch.autograd.gradcheck(deq, (x,)), "gradient for x vs finite differences")
    direction, eps = torch.randn_like(deq.W.weight), 1e-6
    with torch.no_grad():
        deq.W.weight += eps * direction
        plus = (deq(x) * v).sum()
        deq.W.weight -= 2 * eps * direction
        minus = (deq(x) * v).sum()
        deq.W.weight += eps * direction
    numerical = (plus - minus) / (2 * eps)
    analytic = (grads[1] * direction).sum()
    check(abs(float(numerical - analytic)) < 1e-6 * max(1.0, abs(float(analytic))),
          "gradient for W along a random direction vs finite differences")

    samples, classes = (128, 3) if fast else (512, 4)
    centres = 2 * torch.randn(classes, n, dtype=torch.float64)
    labels = torch.randint(classes, (samples,))
    data = centres[labels] + 0.5 * torch.randn(samples, n, dtype=torch.float64)
    model = torch.nn.Sequential(DEQ(n, m), torch.nn.Linear(m, classes, dtype=torch.float64))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(40 if fast else 150):
        loss = torch.nn.functional.cross_entropy(model(data), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        accuracy = float((model(data).argmax(-1) == labels).double().mean())
    print(f"training accuracy {accuracy:.1%}")
    check(accuracy > 0.9, "the DEQ classifier learns the task")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
