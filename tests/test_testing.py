"""declnet.testing.check_gradients: probes, wrt=, parameters, and what a failure names."""

from __future__ import annotations

import pytest
import torch

import declnet
from _problems import rand
from declnet import testing as dt

F64 = torch.float64


def test_default_probe_is_not_a_seeded_random_draw():
    """Regression: after torch.manual_seed(0) the probe equalled the user's x."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, dtype=F64)
    report = dt.check_gradients(dt.UnitSphereProjection(), x)
    assert report.passed
    node = dt.UnitSphereProjection()
    y = node.solve(x)
    torch.manual_seed(0)
    assert not torch.allclose(dt._probe(y.shape, y.dtype, y.device), torch.randn(2, 5,
                                                                                dtype=F64))


class WrongInSecondInput(declnet.DeclarativeNode):
    """y = x + 2 s, but the objective says y = x + s: wrong in the second input only."""

    def objective(self, x, s, *, y):
        return 0.5 * ((y - x - s) ** 2).sum(-1)

    def solve(self, x, s):
        return x + 2 * s


def test_failure_names_the_input_and_wrt_restricts():
    x, s = rand(2, 3), rand(2, 3, seed=1)
    report = dt.check_gradients(WrongInSecondInput(), x, s, raise_exception=False)
    assert not report.passed and report.failed == ("input 1",)
    assert "input 1" in str(report)
    assert dt.check_gradients(WrongInSecondInput(), x, s, wrt=[0]).passed
    with pytest.raises(ValueError, match="wrt"):
        dt.check_gradients(WrongInSecondInput(), x, 3.0, wrt=[1])


def test_parameters_are_checked():
    node = dt.QuadraticNode(3, 4, learnable=True)
    assert dt.check_gradients(node, rand(2, 3)).passed

    class IgnoresW(dt.QuadraticNode):
        def solve(self, x):  # does not use the learnable W: its FD gradient is 0
            return torch.linalg.solve(self.Q, (x @ self.W.detach().T * 0 + x @ torch.ones(
                3, 4, dtype=F64)).T).T

    report = dt.check_gradients(IgnoresW(3, 4, learnable=True), rand(2, 3),
                                raise_exception=False)
    assert "parameter W" in report.failed
