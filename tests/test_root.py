"""RootNode and FixedPointNode: forward by the built-in solvers, one adjoint solve backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import declnet.solvers as solvers
from declnet._root import FixedPointNode, RootNode, gmres

DT = torch.float64


class Cubic(RootNode):
    """``y³ + a y = x`` elementwise, with a learnable ``a``: ``Dy = 1 / (3y² + a)``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.a = nn.Parameter(torch.tensor(1.5, dtype=DT))

    def equations(self, x, *, y):
        return y**3 + self.a * y - x

    def initial_guess(self, x):
        return torch.zeros_like(x)


@pytest.mark.parametrize("solver", [None, solvers.Broyden()], ids=["default", "broyden"])
@pytest.mark.parametrize("linear_solver", ["lu", "gmres"])
def test_root_node_closed_form_gradients(solver, linear_solver):
    node = Cubic(solver=solver, linear_solver=linear_solver)
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    y = node(x)
    assert bool(node.solver_info["converged"].all())
    w = torch.randn_like(y)
    gx, ga = torch.autograd.grad((w * y).sum(), [x, node.a])
    d = 1 / (3 * y.detach() ** 2 + node.a.detach())
    torch.testing.assert_close(gx, w * d)
    torch.testing.assert_close(ga, (w * d * -y.detach()).sum())


def test_user_solve_wins_and_shared_input():
    class Scaled(RootNode):
        calls = 0

        def equations(self, x, s, *, y):
            return y * s - x

        def solve(self, x, s):
            Scaled.calls += 1
            return x / s

    x = torch.randn(3, 2, dtype=DT, requires_grad=True)
    s = torch.tensor(2.0, dtype=DT, requires_grad=True)
    y = Scaled()(x, s)
    gx, gs = torch.autograd.grad(y.sum(), [x, s])
    assert Scaled.calls == 1
    torch.testing.assert_close(gx, torch.full_like(x, 0.5))
    torch.testing.assert_close(gs, -(x.detach() / 4).sum())


class DEQ(FixedPointNode):
    """The deep equilibrium layer of Bai et al.: ``y = tanh(W y + U x + b)``."""

    def __init__(self, n, m, **kwargs):
        super().__init__(**kwargs)
        gen = torch.Generator().manual_seed(0)
        W = torch.randn(m, m, dtype=DT, generator=gen)
        self.W = nn.Parameter(0.8 * W / torch.linalg.matrix_norm(W, 2))
        self.U = nn.Parameter(torch.randn(m, n, dtype=DT, generator=gen) / n**0.5)
        self.b = nn.Parameter(torch.zeros(m, dtype=DT))

    def fixed_point_map(self, x, *, y):
        return torch.tanh(y @ self.W.T + x @ self.U.T + self.b)

    def initial_guess(self, x):
        return x.new_zeros(x.shape[0], self.W.shape[0])


@pytest.mark.parametrize("linear_solver", ["lu", "gmres", "auto"])
def test_deq_gradient_against_unrolled_iteration_and_finite_differences(linear_solver):
    # "auto" with m = 12 > dense_limit = 4: the adjoint fixed-point iteration
    node = DEQ(5, 12, linear_solver=linear_solver, dense_limit=4)
    x = torch.randn(3, 5, dtype=DT, requires_grad=True)
    y = node(x)
    assert bool(node.solver_info["converged"].all())
    w = torch.randn_like(y)
    params = [x, node.W, node.U, node.b]
    grads = torch.autograd.grad((w * y).sum(), params)
    # unrolled to convergence
    yu = node.initial_guess(x)
    for _ in range(200):
        yu = node.fixed_point_map(x, y=yu)
    unrolled = torch.autograd.grad((w * yu).sum(), params)
    for g, u in zip(grads, unrolled):
        torch.testing.assert_close(g, u, atol=1e-9, rtol=1e-8)
    # central finite differences of the forward, in a random direction for each input
    eps = 1e-6
    for k, (t, g) in enumerate(zip(params, grads)):
        d = torch.randn_like(t)
        with torch.no_grad():
            t += eps * d
            fp = (w * node(x)).sum()
            t -= 2 * eps * d
            fm = (w * node(x)).sum()
            t += eps * d
        torch.testing.assert_close((fp - fm) / (2 * eps), (g * d).sum(), atol=1e-7, rtol=1e-6,
                                   msg=f"input {k}")


def test_adjoint_iteration_falls_back_to_gmres_when_it_diverges():
    node = DEQ(4, 6, dense_limit=2)
    with torch.no_grad():
        node.W.mul_(3.0)  # D_Y G may have spectral radius > 1 now: Picard on u diverges
    node.solver = solvers.Newton()
    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    y = node(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    lu = DEQ(4, 6, linear_solver="lu", solver=solvers.Newton())
    lu.load_state_dict(node.state_dict())
    (g_lu,) = torch.autograd.grad(lu(x).sum(), x)
    torch.testing.assert_close(g, g_lu)


def test_fixed_point_with_another_solver():
    node = DEQ(4, 6, solver=solvers.Broyden())
    x = torch.randn(2, 4, dtype=DT)
    y = node(x)
    torch.testing.assert_close(node.fixed_point_map(x, y=y), y, atol=1e-9, rtol=0)


def test_gmres_solves_a_batch():
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(3, 20, 20, dtype=DT, generator=gen) / 20**0.5 + 2 * torch.eye(20, dtype=DT)
    b = torch.randn(3, 20, dtype=DT, generator=gen)
    x, rel, it = gmres(lambda v: (M @ v.unsqueeze(-1)).squeeze(-1), b, 1e-12, 20)
    torch.testing.assert_close(x, torch.linalg.solve(M, b))
    assert float(rel.max()) <= 1e-12 and it <= 20


def test_clear_errors():
    class NoGuess(RootNode):
        def equations(self, x, *, y):
            return y - x

    with pytest.raises(NotImplementedError, match="initial_guess"):
        NoGuess()(torch.zeros(2, 2, dtype=DT))
    with pytest.raises(ValueError, match="linear_solver"):
        Cubic(linear_solver="qr")
