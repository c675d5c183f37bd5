"""Newton and L-BFGS against the zoo's closed forms, scipy, non-convex starts and failures."""

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


def _with_start(node, start):
    node.initial_guess = start
    return node


def _zeros(m):
    return lambda x, *rest: x.new_zeros(x.shape[0], m)


@pytest.mark.parametrize("solver", [solvers.Newton(), solvers.LBFGS(tol=1e-12)],
                         ids=["newton", "lbfgs"])
@pytest.mark.parametrize("make", [testing.QuadraticNode, testing.PolynomialNode,
                                  testing.ImperativeAsDeclarative])
def test_zoo_closed_forms(solver, make):
    node = _with_start(make(), _zeros(5))
    x = torch.randn(7, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    sol = solver(node, x)
    assert bool(sol.info["converged"].all())
    torch.testing.assert_close(sol.y, node.solve(x), atol=1e-8, rtol=1e-8)
    assert sol.info["iterations"].shape == (7,)


def test_pseudo_huber_regression_matches_its_solve():
    node = testing.PseudoHuberRegression()
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(5, 20, 3, dtype=DT, generator=gen)
    b = torch.randn(5, 20, dtype=DT, generator=gen)
    sol = solvers.Newton()(node, b, A, 1.0, y0=torch.zeros(5, 3, dtype=DT))
    torch.testing.assert_close(sol.y, node.solve(b, A, 1.0), atol=1e-9, rtol=1e-9)
    # the Hessian returned is the one at the solution
    r = (A @ sol.y.unsqueeze(-1)).squeeze(-1) - b
    H = A.transpose(1, 2) @ ((1 + r**2) ** -1.5).unsqueeze(-1).mul(A)  # Aᵀ diag(w) A
    torch.testing.assert_close(sol.hessian, H, atol=1e-8, rtol=1e-8)


class Rosenbrock(declnet.DeclarativeNode):
    """Batched Rosenbrock ``Σ (a − y₁)² + b (y₂ − y₁²)²`` with per-sample ``a, b``: non-convex."""

    def objective(self, a, b, *, y):
        return (a - y[:, 0]) ** 2 + b * (y[:, 1] - y[:, 0] ** 2) ** 2

    def initial_guess(self, a, b):
        return torch.stack([-1.2 * torch.ones_like(a), torch.ones_like(a)], -1)


@pytest.mark.parametrize("solver", [solvers.Newton(), solvers.LBFGS(tol=1e-11, max_iter=2000)],
                         ids=["newton", "lbfgs"])
def test_rosenbrock_against_scipy(solver):
    gen = torch.Generator().manual_seed(2)
    a = 0.5 + torch.rand(6, dtype=DT, generator=gen)
    b = 1.0 + 20 * torch.rand(6, dtype=DT, generator=gen)
    sol = solver(Rosenbrock(), a, b)
    assert bool(sol.info["converged"].all())
    for i in range(6):
        ref = minimize(lambda u, i=i: (a[i].item() - u[0]) ** 2
                       + b[i].item() * (u[1] - u[0] ** 2) ** 2,
                       np.array([-1.2, 1.0]), method="BFGS", options={"gtol": 1e-10})
        np.testing.assert_allclose(sol.y[i].numpy(), ref.x, atol=1e-5)
        np.testing.assert_allclose(sol.y[i].numpy(), [a[i].item(), a[i].item() ** 2], atol=1e-7)


class DoubleWell(declnet.DeclarativeNode):
    """``Σ (y² − 1)² + x·y`` per coordinate; started at the local maximum ``y = 0``."""

    def objective(self, x, *, y):
        return ((y**2 - 1) ** 2 + x * y).sum(-1)

    def initial_guess(self, x):
        return torch.zeros_like(x)


def test_newton_escapes_a_maximum_and_ends_at_a_minimum():
    x = torch.tensor([[0.3, -0.2, 1e-3], [0.1, 0.5, -0.5]], dtype=DT)
    sol = solvers.Newton()(DoubleWell(), x)
    assert bool(sol.info["converged"].all())
    y = sol.y
    torch.testing.assert_close(4 * y**3 - 4 * y + x, torch.zeros_like(x), atol=1e-9, rtol=0)
    assert bool((12 * y**2 - 4 > 0).all())  # minima, although H < 0 at the start


class Unbounded(declnet.DeclarativeNode):
    def objective(self, x, *, y):
        return -(x * y).sum(-1) + 1e-3 * (y**3).sum(-1)

    def initial_guess(self, x):
        return torch.zeros_like(x)


@pytest.mark.parametrize("solver", [solvers.Newton(max_iter=20), solvers.LBFGS(max_iter=30)],
                         ids=["newton", "lbfgs"])
def test_non_convergence_warns_and_strict_raises(solver):
    x = torch.ones(3, 2, dtype=DT)
    x[0] = -1.0  # y → −∞ decreases the objective without bound for these two entries
    with pytest.warns(DeclarativeWarning, match=r"did not converge on 1 of 3 samples.*worst"):
        sol = solver(Unbounded(), x)
    assert sol.info["converged"].tolist() == [False, True, True]
    solver.strict = True
    with pytest.raises(solvers.ConvergenceError, match="1 of 3"):
        solver(Unbounded(), x)


def test_missing_start_is_a_clear_error():
    with pytest.raises(TypeError, match="initial_guess"):
        solvers.Newton()(testing.QuadraticNode(), torch.zeros(2, 3, dtype=DT))


def test_frozen_samples_keep_their_solution():
    node = _with_start(testing.PolynomialNode(), _zeros(5))
    x = torch.randn(4, 3, dtype=DT)
    x[0] = 0.0  # y = 0 is the solution from the start: converged at iteration 0
    sol = solvers.Newton()(node, x)
    assert sol.info["iterations"][0] == 0
    assert bool(sol.info["iterations"][1:].gt(0).all())


class NewtonQuadratic(testing.QuadraticNode):
    """A full layer: the node's `solve` calls the built-in solver."""

    def initial_guess(self, x):
        return x.new_zeros(x.shape[0], 5)

    def solve(self, x):
        return solvers.Newton()(self, x)


def test_a_layer_whose_solve_is_a_builtin_solver():
    node = NewtonQuadratic()
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    node(x).sum().backward()
    expected = node.closed_form_jacobian(x.detach()).sum(1)
    torch.testing.assert_close(x.grad, expected)
    testing.check_gradients(node, x.detach())


def test_default_solver_by_kind_and_size():
    big = _with_start(testing.QuadraticNode(), _zeros(300))
    small = _with_start(testing.QuadraticNode(), _zeros(5))
    x = torch.zeros(2, 3, dtype=DT)
    assert type(solvers.default_solver(small, x)) is solvers.Newton
    assert type(solvers.default_solver(big, x)) is solvers.LBFGS
    assert type(solvers.default_solver(testing.UnitSphereProjection(), x)) is solvers.SQP
    assert type(solvers.default_solver(testing.L2BallProjection(), x)) is solvers.InteriorPoint
    assert solvers.default_solver(small, x, strict=True).strict


def test_lbfgs_large_output():
    class Big(declnet.DeclarativeNode):
        def objective(self, x, *, y):  # separable, strictly convex; m = 2000
            return (0.5 * y**2 + torch.log(torch.cosh(y - x))).sum(-1)

        def initial_guess(self, x):
            return torch.zeros_like(x)

    x = torch.randn(3, 2000, dtype=DT)
    sol = solvers.LBFGS(tol=1e-10)(Big(), x)
    assert bool(sol.info["converged"].all())
    g = sol.y + torch.tanh(sol.y - x)
    assert float(g.abs().max()) < 1e-8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_newton_on_cuda():
    node = _with_start(testing.PolynomialNode().cuda(), _zeros(5))
    x = torch.randn(4, 3, dtype=DT, device="cuda")
    sol = solvers.Newton()(node, x)
    torch.testing.assert_close(sol.y, node.solve(x))
