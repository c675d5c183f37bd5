"""SQP and the interior-point method: closed forms, scipy, multipliers, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import declnet
import declnet.solvers as solvers
from declnet import testing
from declnet._diagnostics import DeclarativeWarning

DT = torch.float64


def _start(node, fn):
    node.initial_guess = fn
    return node


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("solver", [solvers.SQP(), solvers.InteriorPoint()], ids=["sqp", "ip"])
def test_sphere_projection_and_multiplier_convention(solver):
    node = _start(testing.UnitSphereProjection(), lambda x: x + 0.5)
    x = torch.randn(6, 4, dtype=DT, generator=_gen(0))
    sol = solver(node, x)
    assert bool(sol.info["converged"].all())
    torch.testing.assert_close(sol.y, node.solve(x), atol=1e-9, rtol=0)
    # D_Y f = λ D_Y h with h = ‖y‖² − 1: y − x = λ 2y
    lam = sol.multipliers[:, 0]
    torch.testing.assert_close(sol.y - x, lam.unsqueeze(-1) * 2 * sol.y, atol=1e-9, rtol=0)


def test_sqp_circle_linear_objective_from_an_infeasible_start():
    # start inside the circle, on the side of the minimum (Newton on the KKT system finds
    # the nearest KKT point, and the maximum is one too)
    node = _start(testing.CircleLinearObjective(),
                  lambda x: x[:, :2] - 0.5 * x[:, 2:] * torch.tensor([0.3, -0.8], dtype=DT))
    x = torch.rand(5, 3, dtype=DT, generator=_gen(1)) + 0.5
    sol = solvers.SQP()(node, x)
    assert bool(sol.info["converged"].all())
    torch.testing.assert_close(sol.y, node.solve(x), atol=1e-8, rtol=0)


def test_sqp_refuses_inequalities():
    with pytest.raises(TypeError, match="InteriorPoint"):
        solvers.SQP()(testing.L2BallProjection(), torch.zeros(1, 2, dtype=DT),
                      y0=torch.zeros(1, 2, dtype=DT))


@pytest.mark.parametrize("make", [testing.L2BallProjection, testing.BallHalfspaceProjection])
def test_interior_point_on_projections(make):
    node = _start(make(), lambda x: torch.zeros_like(x))
    x = 2 * torch.randn(8, 2 if make is testing.BallHalfspaceProjection else 5, dtype=DT,
                        generator=_gen(2))
    x[0] = 0.01 * x[0].abs()  # inside: no active constraint
    sol = solvers.InteriorPoint()(node, x)
    assert bool(sol.info["converged"].all())
    torch.testing.assert_close(sol.y, node.solve(x), atol=1e-9, rtol=0)
    g = node.inequality_constraints(x, y=sol.y)
    lam = sol.multipliers
    assert bool((lam <= 0).all())  # the paper's sign: active inequality multipliers ≤ 0
    assert bool((lam[~sol.active] == 0).all())
    assert bool((g[sol.active].abs() < 1e-8).all())
    assert not bool(sol.active[0].any())


class Quartic(declnet.InequalityConstrainedNode):
    """``min ½‖y − x‖² + ¼ Σ y⁴`` s.t. ``‖y‖² ≤ r²``, ``y₀ + y₁ ≤ c`` and ``Σ y = s``."""

    def objective(self, x, *, y):
        return 0.5 * ((y - x) ** 2).sum(-1) + 0.25 * (y**4).sum(-1)

    def inequality_constraints(self, x, *, y):
        return torch.stack([(y**2).sum(-1) - 1.5, y[:, 0] + y[:, 1] - 0.2], -1)

    def equality_constraints(self, x, *, y):
        return y.sum(-1, keepdim=True) - 0.3

    def initial_guess(self, x):
        return torch.zeros_like(x)

    def solve(self, x):
        return solvers.InteriorPoint()(self, x)


def test_interior_point_against_scipy_with_equalities():
    node = Quartic()
    x = 2 * torch.randn(6, 4, dtype=DT, generator=_gen(3))
    sol = solvers.InteriorPoint()(node, x)
    assert bool(sol.info["converged"].all())
    for i in range(6):
        xi = x[i].numpy()
        ref = minimize(
            lambda u, xi=xi: 0.5 * ((u - xi) ** 2).sum() + 0.25 * (u**4).sum(),
            np.zeros(4), method="SLSQP", options={"ftol": 1e-14, "maxiter": 500},
            constraints=[{"type": "ineq", "fun": lambda u: 1.5 - (u**2).sum()},
                         {"type": "ineq", "fun": lambda u: 0.2 - u[0] - u[1]},
                         {"type": "eq", "fun": lambda u: u.sum() - 0.3}])
        np.testing.assert_allclose(sol.y[i].numpy(), ref.x, atol=1e-6)


def test_interior_point_layer_gradients():
    node = Quartic()
    x = 2 * torch.randn(4, 4, dtype=DT, generator=_gen(4))
    testing.check_gradients(node, x, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_interior_point_reports_infeasible_problems():
    class Infeasible(declnet.InequalityConstrainedNode):
        def objective(self, x, *, y):
            return ((y - x) ** 2).sum(-1)

        def inequality_constraints(self, x, *, y):
            return torch.stack([(y**2).sum(-1) - 1.0, 2.0 - y[:, 0]], -1)  # ‖y‖ ≤ 1, y₀ ≥ 2

        def initial_guess(self, x):
            return torch.zeros_like(x)

    x = torch.zeros(2, 2, dtype=DT)
    with pytest.warns(DeclarativeWarning, match="did not converge on 2 of 2"):
        sol = solvers.InteriorPoint(max_iter=40)(Infeasible(), x)
    assert not bool(sol.info["converged"].any())
    with pytest.raises(solvers.ConvergenceError):
        solvers.InteriorPoint(max_iter=40, strict=True)(Infeasible(), x)


def test_sqp_on_a_feasibility_problem_and_a_linear_equality_node():
    cubic = _start(testing.CubicFeasibility(), lambda x: torch.zeros_like(x))
    x = torch.randn(4, 3, dtype=DT, generator=_gen(5))
    torch.testing.assert_close(solvers.SQP()(cubic, x).y, cubic.solve(x), atol=1e-10, rtol=0)
    kl = _start(testing.MinKLOnSimplex(), lambda x: torch.full_like(x, 0.2))
    x = torch.randn(4, 5, dtype=DT, generator=_gen(6))
    sol = solvers.SQP()(kl, x)  # log(y) is NaN off the positive orthant: the search backs off
    assert bool(sol.info["converged"].all())
    torch.testing.assert_close(sol.y, kl.solve(x), atol=1e-9, rtol=0)
