"""Bad input gets a clear error that names the node, what was expected and what came."""

from __future__ import annotations

import pytest
import torch

import declnet
from declnet import testing as dt

F64 = torch.float64


class ScalarObjective(dt.UnitSphereProjection):
    def objective(self, x, *, y):
        return 0.5 * ((y - x) ** 2).sum()


class MatrixObjective(dt.UnitSphereProjection):
    def objective(self, x, *, y):
        return 0.5 * (y - x) ** 2


class FlatConstraint(dt.UnitSphereProjection):
    def equality_constraints(self, x, *, y):
        return (y**2).sum(-1) - 1.0


class NanSolve(dt.UnitSphereProjection):
    def solve(self, x):
        y = x / x.norm(dim=-1, keepdim=True)
        y[1, 0] = float("nan")
        return y


class WrongBatchSolve(dt.UnitSphereProjection):
    def solve(self, x):
        return x[:1]


class NoSolve(declnet.DeclarativeNode):
    def objective(self, x, *, y):
        return (y**2).sum(-1)


class NoObjective(declnet.DeclarativeNode):
    def solve(self, x):
        return x


class TupleSolve(dt.UnitSphereProjection):
    def solve(self, x):
        return (x,)


def backward(node, x):
    x = x.clone().requires_grad_(True)
    node(x).sum().backward()


x = torch.randn(2, 5, dtype=F64)


def test_objective_not_per_sample():
    with pytest.raises(ValueError, match=r"ScalarObjective\.objective.*\(B,\).*shape \(\)"):
        backward(ScalarObjective(), x)


def test_objective_with_extra_dims():
    with pytest.raises(ValueError, match=r"MatrixObjective\.objective.*\(2, 5\).*sum"):
        backward(MatrixObjective(), x)


def test_constraints_wrong_shape():
    with pytest.raises(ValueError, match=r"FlatConstraint\.equality_constraints.*keepdim"):
        backward(FlatConstraint(), x)


def test_batch_size_mismatch_between_inputs():
    node = dt.PseudoHuberRegression()
    with pytest.raises(ValueError, match=r"PseudoHuberRegression: inputs must share the batch"):
        node(torch.randn(2, 7, dtype=F64), torch.randn(3, 7, 5, dtype=F64), 1.0)


def test_nan_from_solve():
    with pytest.raises(ValueError, match=r"NanSolve\.solve returned y with NaN or Inf in 1 of 2"):
        NanSolve()(x)


def test_wrong_batch_from_solve():
    with pytest.raises(ValueError, match=r"WrongBatchSolve\.solve returned y of shape \(1, 5\)"):
        WrongBatchSolve()(x)


def test_solve_returns_non_tensor():
    with pytest.raises(TypeError, match=r"TupleSolve\.solve must return a tensor"):
        TupleSolve()(x)


def test_node_without_solve():
    with pytest.raises(TypeError, match=r"NoSolve has no `solve` method"):
        NoSolve()(x)


def test_node_without_objective():
    with pytest.raises(NotImplementedError, match=r"NoObjective must implement `objective"):
        backward(NoObjective(), x)


def test_unknown_linear_solver():
    with pytest.raises(ValueError, match=r"unknown linear_solver 'qr'"):
        declnet.ImplicitBackward(linear_solver="qr")


def test_negative_damping():
    with pytest.raises(ValueError, match=r"damping must be >= 0"):
        declnet.ImplicitBackward(damping=-1.0)


def test_bad_backward_mode():
    with pytest.raises(TypeError, match=r"backward must be declnet.ImplicitBackward"):
        dt.UnitSphereProjection(backward="implicit")
    node = dt.UnitSphereProjection()
    node.backward_mode = "implicit"  # set after construction
    with pytest.raises(TypeError, match=r"backward must be declnet.ImplicitBackward"):
        node(torch.randn(2, 3, dtype=F64))


def test_linear_constraint_shapes():
    with pytest.raises(ValueError, match=r"expected A of shape \(p, m\)"):
        dt.MinKLOnSimplex.__bases__[0](torch.ones(2, 5), torch.ones(3))

    node = dt.MinKLOnSimplex(4)  # A is (1, 4) but y has 5 elements
    with pytest.raises(ValueError, match=r"A has shape \(1, 4\).*m=5"):
        backward(node, x)


def test_wrong_multiplier_shape():
    class BadMultipliers(dt.UnitSphereProjection):
        def solve(self, x):
            return declnet.Solution(x / x.norm(dim=-1, keepdim=True), multipliers=torch.zeros(2))

    with pytest.raises(ValueError, match=r"Solution\.multipliers must have shape \(2, 1\)"):
        backward(BadMultipliers(), x)


def test_declarative_needs_a_node():
    with pytest.raises(TypeError, match=r"expects a declnet\.DeclarativeNode"):
        declnet.declarative(lambda x: x, x)
