"""A user's Penalty subclass in robust_pool: generic solver, closed-form or engine backward."""

from __future__ import annotations

import pytest
import torch

import declnet
from declnet.layers import Huber, Penalty, PseudoHuber, RobustPool, Welsch, as_penalty, robust_pool
from declnet.layers import _pool_solvers as pool_solvers

F64 = torch.float64


class LogCosh(Penalty):
    """φ(z) = α² log cosh(z/α): convex and smooth; only phi is given (engine backward)."""

    is_convex = True
    is_smooth = True

    def phi(self, z, alpha=None):
        a = self._a(alpha)
        t = (z / a).abs()
        return a * a * (t + torch.log1p(torch.exp(-2 * t)) - torch.log(torch.tensor(2.0)))


class LogCoshClosed(LogCosh):
    """The same penalty with its derivatives: Table 1's closed-form backward."""

    def dphi(self, z, alpha=None):
        a = self._a(alpha)
        return a * torch.tanh(z / a)

    def d2phi(self, z, alpha=None):
        return 1 / torch.cosh(z / self._a(alpha)) ** 2

    def dphi_dalpha(self, z, alpha=None):
        a = self._a(alpha)
        t = z / a
        return torch.tanh(t) - t / torch.cosh(t) ** 2


class Geman(Penalty):
    """Geman-McClure φ(z) = z²/2 / (1 + (z/α)²): non-convex, phi only."""

    is_smooth = True

    def phi(self, z, alpha=None):
        a = self._a(alpha)
        return 0.5 * z * z / (1 + (z / a) ** 2)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def grid_argmin(pen, x, points=20001):
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    grid = lo + (hi - lo) * torch.linspace(0, 1, points, dtype=F64)
    f = pen.phi(grid.unsqueeze(-1) - x.unsqueeze(-2)).sum(-1)
    return f.amin(-1), pen


def objective(pen, x, y):
    return pen.phi(y.unsqueeze(-1) - x).sum(-1)


def test_as_penalty_accepts_user_subclasses():
    pen = LogCosh(0.5)
    assert as_penalty(pen) is pen
    assert isinstance(RobustPool(pen).penalty, LogCosh)


@pytest.mark.parametrize("cls", [LogCosh, LogCoshClosed, Geman])
def test_user_penalty_reaches_the_minimum(cls):
    x = rand(6, 30, seed=1)
    x[:3, :8] += 5.0
    pen = cls(0.8)
    y = robust_pool(x, pen)
    f_star, _ = grid_argmin(pen, x)
    assert (objective(pen, x, y) <= f_star + 1e-9).all()


def test_closed_form_and_engine_backward_agree():
    x = rand(5, 20, seed=2)
    alpha = torch.tensor(0.7, dtype=F64, requires_grad=True)
    xe = x.clone().requires_grad_()
    xc = x.clone().requires_grad_()
    assert not pool_solvers.has_closed_form_backward(LogCosh(0.7), False)
    assert pool_solvers.has_closed_form_backward(LogCoshClosed(0.7), True)
    v = rand(5, seed=3)
    ge = torch.autograd.grad(robust_pool(xe, LogCosh(alpha)), (xe, alpha), v)
    gc = torch.autograd.grad(robust_pool(xc, LogCoshClosed(alpha)), (xc, alpha), v)
    torch.testing.assert_close(ge[0], gc[0])
    torch.testing.assert_close(ge[1], gc[1])


def test_learnable_alpha_through_the_engine():
    raw = torch.nn.Parameter(torch.tensor(0.3, dtype=F64))
    x = rand(4, 16, seed=4).requires_grad_()
    y = robust_pool(x, Geman(torch.nn.functional.softplus(raw)))
    y.sum().backward()
    assert raw.grad is not None and torch.isfinite(raw.grad)
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.sum(-1), torch.ones(4, dtype=F64))


def test_gradient_equals_finite_differences():
    x = rand(3, 12, seed=5)
    pen = Geman(1.0)
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(robust_pool(xg, pen).sum(), xg)
    u = rand(3, 12, seed=6)
    h = 1e-6
    fd = (robust_pool(x + h * u, pen) - robust_pool(x - h * u, pen)).sum() / (2 * h)
    assert float((g * u).sum()) == pytest.approx(float(fd), rel=1e-6)


@pytest.mark.parametrize("base", [PseudoHuber, Huber, Welsch])
def test_subclass_of_a_builtin_uses_the_generic_solver(base):
    class Mine(base):
        pass

    x = rand(4, 25, seed=7)
    y_mine, y_base = robust_pool(x, Mine(1.0)), robust_pool(x, base(1.0))
    assert pool_solvers.rule_for(Mine(1.0)) is pool_solvers.generic_rule()
    # Same objective value (the minimiser may differ on a flat Huber interval).
    torch.testing.assert_close(objective(base(1.0), x, y_mine), objective(base(1.0), x, y_base))


class Bump(Penalty):
    """Welsch's φ written by a user, with d2phi (closed-form backward)."""

    is_smooth = True

    def phi(self, z, alpha=None):
        t = z / self._a(alpha)
        return -torch.expm1(-0.5 * t * t)

    def d2phi(self, z, alpha=None):
        a = self._a(alpha)
        t = z / a
        return (1 - t * t) * torch.exp(-0.5 * t * t) / (a * a)


def test_closed_form_without_curvature_warns_and_gives_nan():
    # x = (−α, α): y = 0 with Σφ'' = 0 exactly, where Table 1 gives no derivative. The
    # generic solver stops within its tolerance of 0, so the closed form (the rule's
    # backward) is evaluated at the exact minimiser.
    x = torch.tensor([[-1.0, 1.0], [0.0, 0.3]], dtype=F64)
    y = robust_pool(x, Bump(1.0))
    assert abs(y[0].item()) < 1e-5
    pen, a = Bump(1.0), torch.ones(2, 1, dtype=F64)
    y_exact = torch.stack([torch.zeros((), dtype=F64), y[1].detach()]).unsqueeze(-1)
    rule = pool_solvers.rule_for(pen)
    with pytest.warns(declnet.DeclarativeWarning, match="Σφ''"):
        grad, _ = rule.backward(pen, x, y_exact, a, torch.ones(2, 1, dtype=F64), ())
    assert torch.isnan(grad[0]).all() and torch.isfinite(grad[1]).all()
