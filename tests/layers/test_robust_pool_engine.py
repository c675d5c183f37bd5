"""Closed-form robust pooling backward = the generic implicit-differentiation engine.

Each penalty's objective is written as a ``declnet.DeclarativeNode`` whose ``solve`` is
``robust_pool`` itself; the engine then differentiates the objective (Prop. 4.4) with
autograd Hessians, and must agree with the closed forms of Table 1.
"""

from __future__ import annotations

import pytest
import torch

import declnet
from declnet.layers import Penalty, as_penalty, robust_pool, robust_vector_pool

F64 = torch.float64
B, N = 2, 5


def rand(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64)


class ScalarPool(declnet.DeclarativeNode):
    """y = argmin_u Σ_i φ(u − x_i; α) for x (B, n), y (B, 1)."""

    def __init__(self, penalty: Penalty) -> None:
        super().__init__()
        self.penalty = penalty

    def objective(self, x, *, y):
        return self.penalty.phi(y - x).sum(-1)

    def solve(self, x):
        return robust_pool(x, self.penalty, dim=-1, keepdim=True)


class LearnableAlphaPool(declnet.DeclarativeNode):
    """Same with α an input of the node: x (B, n), alpha (B, 1)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def objective(self, x, alpha, *, y):
        return as_penalty(self.name).phi(y - x, alpha).sum(-1)

    def solve(self, x, alpha):
        return robust_pool(x, as_penalty(self.name).__class__(alpha), dim=-1, keepdim=True)


class VectorPool(declnet.DeclarativeNode):
    """y = argmin_u Σ_i φ(‖u − x_i‖; α) for x (B, n, C), y (B, C)."""

    def __init__(self, penalty: Penalty) -> None:
        super().__init__()
        self.penalty = penalty

    def objective(self, x, *, y):
        r = torch.sqrt(((y.unsqueeze(1) - x) ** 2).sum(-1))
        return self.penalty.phi(r).sum(-1)

    def solve(self, x):
        return robust_vector_pool(x, self.penalty, dim=1, vector_dim=2)


NAMES = ["quadratic", "pseudo_huber", "huber", "welsch", "truncated_quadratic"]


def make(name: str, alpha: float = 1.1) -> Penalty:
    return as_penalty(name) if name == "quadratic" else as_penalty(name).__class__(alpha)


@pytest.mark.parametrize("name", NAMES)
def test_closed_form_equals_engine(name):
    pen = make(name)
    x = rand(B, N, seed=1)
    v = rand(B, 1, seed=2)
    xe = x.clone().requires_grad_()
    (g_engine,) = torch.autograd.grad(ScalarPool(pen)(xe), xe, v)
    xc = x.clone().requires_grad_()
    (g_closed,) = torch.autograd.grad(robust_pool(xc, pen, keepdim=True), xc, v)
    torch.testing.assert_close(g_closed, g_engine)


@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch"])
def test_alpha_gradient_equals_engine(name):
    x = rand(B, N, seed=3)
    alpha = torch.tensor([[0.9], [1.4]], dtype=F64)
    v = rand(B, 1, seed=4)
    ae = alpha.clone().requires_grad_()
    (g_engine,) = torch.autograd.grad(LearnableAlphaPool(name)(x, ae), ae, v)
    ac = alpha.clone().requires_grad_()
    y = robust_pool(x, as_penalty(name).__class__(ac.squeeze(-1)), keepdim=True)
    (g_closed,) = torch.autograd.grad(y, ac, v)
    torch.testing.assert_close(g_closed, g_engine)


@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch"])
def test_vector_pool_equals_engine(name):
    pen = make(name)
    x = rand(B, N, 3, seed=5)
    v = rand(B, 3, seed=6)
    xe = x.clone().requires_grad_()
    (g_engine,) = torch.autograd.grad(VectorPool(pen)(xe), xe, v)
    xc = x.clone().requires_grad_()
    (g_closed,) = torch.autograd.grad(robust_vector_pool(xc, pen, dim=1, vector_dim=2), xc, v)
    torch.testing.assert_close(g_closed, g_engine)
