"""Closed-form projection gradients = the generic engine's gradients on the same problem.

Each projection is written once more as a plain declarative node (objective ½‖y − x‖²,
constraint ‖y‖_p − r = 0 or ≤ 0) whose ``solve`` calls the layer, so both sides share
``y``; the engine then differentiates it by Propositions 4.5 / 4.6 through autograd of
the constraint, and the layer by its closed form. For p = 1 and p = ∞ the comparison is
with ``masked=False`` (Table 2's Dy, which is what Prop. 4.5 gives with the subgradients
autograd uses: sign(0) = 0, and ties of max shared evenly).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import declnet
from declnet.layers import project_onto_ball, project_onto_sphere

B, N = 2, 5
DOUBLE = torch.float64
PS = [1.0, 2.0, math.inf, 1.5, 3.0, 7.0]


def constraint(y: torch.Tensor, radius: torch.Tensor, p: float) -> torch.Tensor:
    """‖y‖_p − r, written with the operations a user would write; (B, 1)."""
    if p == 1.0:
        norm = y.abs().sum(-1, keepdim=True)
    elif p == math.inf:
        norm = y.abs().amax(-1, keepdim=True)
    else:
        norm = (y.abs() ** p).sum(-1, keepdim=True) ** (1.0 / p)
    return norm - radius


class SphereNode(declnet.EqualityConstrainedNode):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def objective(self, x, radius, *, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, radius, *, y):
        return constraint(y, radius, self.p)

    def solve(self, x, radius):
        return project_onto_sphere(x, self.p, radius)


class BallNode(declnet.InequalityConstrainedNode):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def objective(self, x, radius, *, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, radius, *, y):
        return constraint(y, radius, self.p)

    def solve(self, x, radius):
        return project_onto_ball(x, self.p, radius)


def gradients(fn, x: torch.Tensor, radius: torch.Tensor, v: torch.Tensor):
    x = x.clone().requires_grad_(True)
    radius = radius.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the engine must not need a fallback here
        y = fn(x, radius)
        gx, gr = torch.autograd.grad(y, (x, radius), v)
    return y.detach(), gx, gr


def inputs(scale: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(B, N, generator=gen, dtype=DOUBLE)
    radius = torch.tensor([[0.8], [1.3]], dtype=DOUBLE)
    v = torch.randn(B, N, generator=gen, dtype=DOUBLE)
    return x, radius, v


@pytest.mark.parametrize("p", PS, ids=str)
@pytest.mark.parametrize("scale", [0.1, 3.0], ids=["inside", "outside"])
def test_sphere_matches_engine(p, scale):
    x, radius, v = inputs(scale, seed=int(10 * min(p, 10)))
    ours = gradients(lambda a, r: project_onto_sphere(a, p, r), x, radius, v)
    engine = gradients(SphereNode(p), x, radius, v)
    for mine, theirs in zip(ours, engine):
        torch.testing.assert_close(mine, theirs, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("p", PS, ids=str)
def test_ball_matches_engine_inside_and_outside(p):
    x, radius, v = inputs(1.0, seed=int(20 * min(p, 10)))
    x[0] *= 0.05  # first sample strictly inside, second outside
    x[1] *= 4.0
    ours = gradients(lambda a, r: project_onto_ball(a, p, r), x, radius, v)
    engine = gradients(BallNode(p), x, radius, v)
    for mine, theirs in zip(ours, engine):
        torch.testing.assert_close(mine, theirs, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(ours[1][0], v[0])  # identity inside


@pytest.mark.parametrize("p", [1.0, math.inf], ids=str)
def test_unmasked_with_plateaus_matches_engine(p):
    # Outside with zeros (L1) or several clipped coordinates (L∞): Dy ≠ D²y, and the
    # unmasked layer still agrees with Prop. 4.5 as the engine computes it.
    x = torch.tensor([[3.0, -0.1, 1.5, 0.05, -2.0], [0.2, 2.5, -2.2, 0.3, 0.1]], dtype=DOUBLE)
    radius = torch.tensor([[1.0], [1.5]], dtype=DOUBLE)
    v = torch.randn(B, N, generator=torch.Generator().manual_seed(5), dtype=DOUBLE)
    ours = gradients(lambda a, r: project_onto_sphere(a, p, r), x, radius, v)
    engine = gradients(SphereNode(p), x, radius, v)
    for mine, theirs in zip(ours, engine):
        torch.testing.assert_close(mine, theirs, rtol=1e-7, atol=1e-9)
