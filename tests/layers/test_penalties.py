"""Penalty objects: derivatives against autograd, names, validation."""

from __future__ import annotations

import pytest
import torch

from declnet.layers import (
    Huber,
    Penalty,
    PseudoHuber,
    Quadratic,
    TruncatedQuadratic,
    Welsch,
    as_penalty,
    penalty_names,
)

F64 = torch.float64
ALL = [Quadratic(), PseudoHuber(0.7), Huber(0.7), Welsch(0.7), TruncatedQuadratic(0.7)]
IDS = [p.name for p in ALL]


def residuals():
    # Away from the kinks |z| = 0.7 of Huber and the truncated quadratic.
    return torch.tensor([-3.1, -1.3, -0.69, -0.2, 0.0, 0.15, 0.5, 0.71, 2.4], dtype=F64)


@pytest.mark.parametrize("pen", ALL, ids=IDS)
def test_derivatives_match_autograd(pen):
    z = residuals().requires_grad_()
    (d1,) = torch.autograd.grad(pen.phi(z).sum(), z, create_graph=True)
    torch.testing.assert_close(d1, pen.dphi(z))
    if pen.name in ("huber", "truncated_quadratic"):
        # Piecewise: the second derivative is the indicator of |z| <= alpha.
        expected = (z.detach().abs() <= 0.7).to(F64)
    else:
        (expected,) = torch.autograd.grad(d1.sum(), z)
    torch.testing.assert_close(pen.d2phi(z.detach()), expected)


@pytest.mark.parametrize("pen", ALL, ids=IDS)
def test_weight_and_radial_excess(pen):
    z = residuals()
    nz = z != 0
    torch.testing.assert_close(pen.weight(z)[nz], pen.dphi(z)[nz] / z[nz])
    r = z.abs()[nz]
    expected = (pen.d2phi(r) - pen.weight(r)) / r**2
    torch.testing.assert_close(pen.radial_excess(r), expected)
    # The limit at 0 is finite.
    assert torch.isfinite(pen.radial_excess(torch.zeros(1, dtype=F64))).all()
    assert torch.isfinite(pen.weight(torch.zeros(1, dtype=F64))).all()


@pytest.mark.parametrize("pen", ALL[1:], ids=IDS[1:])
def test_mixed_derivative_matches_autograd(pen):
    z = residuals()
    alpha = torch.tensor(0.7, dtype=F64, requires_grad=True)
    if pen.name == "truncated_quadratic":
        # phi' = z 1[|z| <= alpha] does not depend on alpha away from the kinks.
        assert (pen.dphi_dalpha(z) == 0).all()
        return
    (expected,) = torch.autograd.grad(pen.dphi(z, alpha).sum(), alpha)
    torch.testing.assert_close(pen.dphi_dalpha(z).sum(), expected)


@pytest.mark.parametrize("pen", ALL, ids=IDS)
def test_shape_of_penalty(pen):
    z = residuals()
    assert pen.phi(torch.zeros(1, dtype=F64)).item() == 0
    torch.testing.assert_close(pen.phi(z), pen.phi(-z))
    assert (pen.phi(z) >= 0).all()
    if pen.is_convex:
        assert (pen.d2phi(z) >= 0).all()
    else:
        assert pen.name in ("welsch", "truncated_quadratic")


def test_names_and_lookup():
    assert set(penalty_names()) == {
        "quadratic",
        "pseudo_huber",
        "huber",
        "welsch",
        "truncated_quadratic",
    }
    for name in penalty_names():
        pen = as_penalty(name)
        assert isinstance(pen, Penalty) and pen.name == name
    assert isinstance(as_penalty("Pseudo-Huber"), PseudoHuber)
    assert isinstance(as_penalty("truncated quadratic"), TruncatedQuadratic)
    w = Welsch(0.3)
    assert as_penalty(w) is w
    assert as_penalty("welsch").alpha == 1.0


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match=r"unknown penalty 'tukey'.*welsch"):
        as_penalty("tukey")
    with pytest.raises(TypeError, match="Penalty object or a string"):
        as_penalty(3)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_alpha_float(bad):
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        Welsch(bad)


def test_bad_alpha_tensor_and_types():
    with pytest.raises(ValueError, match="positive and finite"):
        Huber(torch.tensor([1.0, -2.0]))
    with pytest.raises(TypeError, match="floating-point tensor"):
        Huber(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="positive float"):
        Huber(True)
    with pytest.raises(TypeError, match="positive float"):
        Huber("1")


def test_learnable_alpha_is_registered():
    alpha = torch.nn.Parameter(torch.tensor(0.5))
    pen = PseudoHuber(alpha)
    assert list(pen.parameters()) == [alpha]
    assert "alpha" in repr(pen)
    assert Quadratic().alpha is None
