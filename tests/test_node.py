"""The node contract: what the engine may and may not assume about a user's node."""

from __future__ import annotations

import warnings

import pytest
import torch

import declnet
from _problems import rand
from declnet import testing as dt

F64 = torch.float64


def test_linear_equality_node_residual_uses_least_squares_multipliers():
    """Regression: softmax as min-KL on the simplex was reported 'not optimal'."""
    node = dt.MinKLOnSimplex(5)
    x = rand(3, 5)
    res = declnet.optimality_residual(node, x)
    assert float(res.stationarity.max()) < 1e-10
    node.check_optimality = True
    with warnings.catch_warnings():
        warnings.simplefilter("error", declnet.DeclarativeWarning)
        node(x)


def test_a_helper_named_constraint_matrix_does_not_make_a_node_linear():
    """Regression: any node with a `constraint_matrix` method was treated as linear."""

    class Sphere(dt.UnitSphereProjection):
        def constraint_matrix(self, batch, m):  # an unrelated helper
            return torch.ones(batch, 1, m, dtype=F64)

    x = rand(2, 5).requires_grad_(True)
    v = rand(2, 5, seed=1)
    (g,) = torch.autograd.grad(Sphere()(x), x, v)
    expected = torch.einsum("bi,bij->bj", v, dt.UnitSphereProjection().closed_form_jacobian(x))
    torch.testing.assert_close(g, expected)


def test_solve_returning_its_input_does_not_alias_it():
    class Identity(declnet.DeclarativeNode):
        def objective(self, x, *, y):
            return 0.5 * ((y - x) ** 2).sum(-1)

        def solve(self, x):
            return x

    x = rand(2, 3)
    y = Identity()(x)
    assert y.data_ptr() != x.data_ptr()
    y.add_(1.0)
    assert torch.equal(x, rand(2, 3))


def test_declarative_function_apply_keeps_parameter_gradients():
    node = dt.QuadraticNode(3, 4, learnable=True)
    x = rand(2, 3)
    y = declnet.DeclarativeFunction.apply(node, x)
    y.sum().backward()
    assert node.W.grad is not None and float(node.W.grad.abs().sum()) > 0


def test_check_optimality_under_unrolled_backward():
    class Wrong(dt.UnitSphereProjection):
        def solve(self, x):
            return x / x.norm(dim=-1, keepdim=True) * 1.1

    node = Wrong(backward=declnet.UnrolledBackward(), check_optimality=True)
    with pytest.warns(declnet.DeclarativeWarning, match="not optimal"):
        node(rand(2, 3))


@pytest.mark.parametrize("name", ["equality_constraints", "inequality_constraints"])
def test_constraints_on_a_plain_node_are_an_error(name):
    """Regression: they were silently ignored (identity gradient)."""
    with pytest.raises(TypeError, match="Derive from declnet"):
        type("Bad", (declnet.DeclarativeNode,), {name: lambda self, x, *, y: y})


def test_inequalities_on_an_equality_node_are_an_error():
    with pytest.raises(TypeError, match="InequalityConstrainedNode"):
        type("Bad", (declnet.EqualityConstrainedNode,),
             {"inequality_constraints": lambda self, x, *, y: y})


@pytest.mark.parametrize("node", [dt.QuadraticNode(3, 4), dt.UnitSphereProjection(),
                                  dt.L2BallProjection(1.0), dt.MinKLOnSimplex(4)])
def test_batch_size_zero(node):
    n = 3 if isinstance(node, dt.QuadraticNode) else 4
    x = torch.zeros(0, n, dtype=F64, requires_grad=True)
    y = node(x)
    assert y.shape[0] == 0
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_nan_multipliers_are_a_clear_error():
    class NanMultipliers(dt.UnitSphereProjection):
        def solve(self, x):
            y = x / x.norm(dim=-1, keepdim=True)
            return declnet.Solution(y, multipliers=torch.full((x.shape[0], 1), float("nan")))

    with pytest.raises(ValueError, match="multipliers with NaN"):
        NanMultipliers()(rand(2, 3))


def test_meta_tensor_from_solve_is_a_clear_error():
    class Meta(dt.UnitSphereProjection):
        def solve(self, x):
            return torch.empty_like(x, device="meta")

    with pytest.raises(ValueError, match="meta device"):
        Meta()(rand(2, 3))


def test_warnings_point_at_the_users_line():
    node = dt.SingularAlignment(2.0)
    x = rand(2, 4).requires_grad_(True)
    with pytest.warns(declnet.DeclarativeWarning) as record:
        node(x).sum().backward()
    assert record[0].filename == __file__


def test_rtol_default_matches_its_docstring():
    opts = declnet.ImplicitBackward()
    assert opts.rtol_for(F64) == pytest.approx(torch.finfo(F64).eps ** 0.5)
    assert "1.5e-8" in declnet.ImplicitBackward.__doc__


class HalfspaceProjection(declnet.InequalityConstrainedNode):
    """``y = argmin ½‖u − x‖²`` s.t. ``aᵀu ≤ b``; optionally declares ``A = aᵀ``."""

    def __init__(self, declare=None, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("a", torch.tensor([1.0, -2.0, 0.5], dtype=F64))
        self.declare = declare

    def objective(self, x, *, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, *, y):
        return (y @ self.a).unsqueeze(-1) - 0.3

    def solve(self, x):
        excess = (x @ self.a - 0.3).clamp_min(0)
        return x - (excess / self.a.square().sum()).unsqueeze(-1) * self.a

    def constraint_jacobian(self, x, *, y):
        if self.declare == "wrong":
            return self.a.expand(y.shape[0], 3)
        return None if self.declare is None else self.a.expand(y.shape[0], 1, 3)


def test_declared_constraint_jacobian_is_used_and_checked():
    x = 2 * rand(4, 3)
    v = rand(4, 3, seed=1)
    grads = []
    for declare in (None, "yes"):
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(HalfspaceProjection(declare)(xg), xg, v)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1])
    with pytest.raises(ValueError, match="constraint_jacobian must return a tensor of shape"):
        HalfspaceProjection("wrong")(x.clone().requires_grad_(True)).sum().backward()
