"""Tutorial 2: a bi-level problem solved by gradient descent through a declarative node.

Lower level: ``y(x) = argmin_u ½‖u − x‖² + ¼‖u‖⁴`` (a shrinkage of ``x`` towards 0).
Upper level: find ``x`` so that ``y(x)`` equals a target ``t``, i.e. minimise
``J(x) = ½‖y(x) − t‖²``. The exact answer is known: ``y = t`` needs
``x = t + ‖t‖² t`` (the lower level's optimality condition solved for ``x``). We descend on
``J`` with the implicit gradient and check that we arrive there.

Run: ``python examples/tutorials/02_bilevel.py [--fast]``.
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

class Shrink(declnet.DeclarativeNode):
    """y = argmin_u ½‖u − x‖² + ¼‖u‖⁴ for x of shape (B, n)."""

    def objective(self, x: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((y - x) ** 2).sum(-1) + 0.25 * (y**2).sum(-1) ** 2

    def initial_guess(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def main(fast: bool = False) -> None:
    """Learn the input that makes the lower-level solution hit a target."""
    torch.manual_seed(0)
    n, steps = (3, 60) if fast else (5, 200)
    target = 0.5 * torch.randn(1, n, dtype=torch.float64)
    x = torch.zeros(1, n, dtype=torch.float64, requires_grad=True)
    node = Shrink()
    optimiser = torch.optim.LBFGS([x], lr=0.5, max_iter=steps,
                                  tolerance_grad=1e-12, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = 0.5 * ((node(x) - target) ** 2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    loss = float(closure().detach())
    print(f"upper-level loss {loss:.3e}")
    answer = target + (target**2).sum() * target
    check(loss < 1e-12, "the upper-level loss is zero")
    check(torch.allclose(x.detach(), answer, atol=1e-5), "x = t + ‖t‖² t, the known answer")
    check(torch.autograd.gradcheck(node, (x.detach().requires_grad_(),)),
          "the lower level's gradient agrees with finite differences")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (for the tests)")
    main(fast=parser.parse_args().fast)
