"""Newton, Broyden and Anderson on square systems and fixed points, against scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import fsolve

import declnet.solvers as solvers
from declnet._diagnostics import DeclarativeWarning
from declnet._root import FixedPointNode, RootNode

DT = torch.float64


class Coupled(RootNode):
    """``F(y) = A y + 0.3 tanh(y) + 0.1 y³ − x`` with a fixed, well-conditioned ``A``."""

    def __init__(self, m=6, **kwargs):
        super().__init__(**kwargs)
        gen = torch.Generator().manual_seed(0)
        M = torch.randn(m, m, dtype=DT, generator=gen) / m**0.5
        self.register_buffer("A", torch.eye(m, dtype=DT) * 2 + M)

    def equations(self, x, *, y):
        return y @ self.A.T + 0.3 * torch.tanh(y) + 0.1 * y**3 - x

    def initial_guess(self, x):
        return torch.zeros_like(x)


@pytest.mark.parametrize("solver", [solvers.Newton(), solvers.Broyden()],
                         ids=["newton", "broyden"])
def test_root_solvers_against_scipy(solver):
    node = Coupled()
    x = torch.randn(5, 6, dtype=DT, generator=torch.Generator().manual_seed(1))
    sol = solver(node, x)
    assert bool(sol.info["converged"].all())
    A = node.A.numpy()
    for i in range(5):
        xi = x[i].numpy()
        ref = fsolve(lambda u, xi=xi: A @ u + 0.3 * np.tanh(u) + 0.1 * u**3 - xi, np.zeros(6),
                     xtol=1e-13)
        np.testing.assert_allclose(sol.y[i].numpy(), ref, atol=1e-9)


class Contraction(FixedPointNode):
    def __init__(self, m=8, scale=0.8, **kwargs):
        super().__init__(**kwargs)
        gen = torch.Generator().manual_seed(3)
        W = torch.randn(m, m, dtype=DT, generator=gen)
        self.register_buffer("W", scale * W / torch.linalg.matrix_norm(W, 2))

    def fixed_point_map(self, x, *, y):
        return torch.tanh(y @ self.W.T + x)

    def initial_guess(self, x):
        return torch.zeros_like(x)


def test_anderson_fixed_point_and_fewer_iterations_than_picard():
    node = Contraction(scale=0.95)
    x = torch.randn(4, 8, dtype=DT, generator=torch.Generator().manual_seed(2))
    sol = solvers.Anderson()(node, x)
    assert bool(sol.info["converged"].all())
    torch.testing.assert_close(node.fixed_point_map(x, y=sol.y), sol.y, atol=1e-10, rtol=0)
    y = torch.zeros_like(x)
    picard = 0
    while float((node.fixed_point_map(x, y=y) - y).abs().max()) > 1e-10:
        y, picard = node.fixed_point_map(x, y=y), picard + 1
    assert int(sol.info["iterations"].max()) < picard


def test_root_non_convergence_is_reported():
    class NoRoot(RootNode):  # y² + 1 = 0 has no real root
        def equations(self, x, *, y):
            return y**2 + 1 + 0 * x

        def initial_guess(self, x):
            return torch.ones_like(x)

    x = torch.zeros(3, 2, dtype=DT)
    with pytest.warns(DeclarativeWarning, match="Broyden did not converge on 3 of 3"):
        solvers.Broyden(max_iter=20)(NoRoot(), x)
    with pytest.raises(solvers.ConvergenceError, match="Newton did not converge"):
        solvers.Newton(max_iter=20, strict=True)(NoRoot(), x)


def test_non_square_system_is_a_clear_error():
    class Rect(RootNode):
        def equations(self, x, *, y):
            return torch.cat([y, y], -1) - x

        def initial_guess(self, x):
            return x.new_zeros(x.shape[0], 2)

    with pytest.raises(ValueError, match="square"):
        solvers.Newton()(Rect(), torch.zeros(2, 4, dtype=DT))


def test_default_solver_for_root_and_fixed_point_nodes():
    x = torch.zeros(2, 6, dtype=DT)
    assert type(solvers.default_solver(Coupled(), x)) is solvers.Newton
    assert type(solvers.default_solver(Contraction(m=6), x)) is solvers.Anderson
    big = torch.zeros(1, 300, dtype=DT)
    assert type(solvers.default_solver(Coupled(m=300), big)) is solvers.Broyden
