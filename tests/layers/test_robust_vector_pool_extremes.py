"""Robust vector pooling at extreme magnitudes: right output, finite and right gradient.

Every built-in penalty is swept over inputs scaled from 1e-30 to 1e30 (float32) and 1e-300
to 1e300 (float64):

- ``α`` scaled like ``x``: pooling is scale-equivariant, ``y(s x; s α) = s y(x; α)``, with
  the same ``∂y/∂x`` and ``∂y/∂α``; all three are compared with the unscaled float64 answer.
- ``α = 1`` fixed: the points are all inliers of each other (small s) or all far outliers
  (large s). The output is finite, inside the points' bounding box, has an objective no
  larger than at the mean and at every data point (convex penalties) or at the solver's
  data-point start (Welsch, truncated quadratic: a local minimum), to rounding, and its
  gradient is finite and sums to the identity over the points (translation equivariance).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from declnet import DeclarativeWarning
from declnet.layers import Huber, PseudoHuber, TruncatedQuadratic, Welsch, robust_vector_pool
from declnet.layers import _vector_pool_solvers as vector_solvers

F32, F64 = torch.float32, torch.float64
MAGNITUDES = {
    F32: [10.0**k for k in range(-30, 31, 10)],
    F64: [10.0**k for k in range(-300, 301, 60)],
}
CASES = [(dtype, s) for dtype, values in MAGNITUDES.items() for s in values]
PENALTIES = [PseudoHuber, Huber, Welsch, TruncatedQuadratic]
B, C, N = 3, 4, 40


def ids(case):
    dtype, s = case
    return f"{str(dtype)[6:]}-{s:.0e}"


def points(seed=0):
    """(B, C, N) float64: a main cluster and a smaller one 6 away (outliers)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, N, generator=gen, dtype=F64)
    x[..., :6] += 6.0
    return x


def pool_with_grads(x, pen, v):
    """y, ∂(v·y)/∂x and ∂(v·y)/∂α."""
    x = x.detach().requires_grad_()
    alpha = pen.alpha.detach().requires_grad_()
    y = robust_vector_pool(x, type(pen)(alpha))
    gx, ga = torch.autograd.grad((y * v.to(y.dtype)).sum(), (x, alpha))
    return y.detach(), gx, ga


def objective(pen, x, y):
    """Σ_i φ(‖y − x_i‖) in float64 (x (B, C, N), y (B, C) or (B, C, K) candidates)."""
    x64, y64 = x.double(), y.double()
    if y64.dim() == 2:
        y64 = y64.unsqueeze(-1)
    d = y64.unsqueeze(-1) - x64.unsqueeze(-2)  # (B, C, K, N)
    top = d.abs().amax(1, keepdim=True).clamp_min(1e-300)  # a norm that cannot overflow
    r = top.squeeze(1) * torch.linalg.vector_norm(d / top, dim=1)
    a = torch.as_tensor(pen.alpha, dtype=F64)
    return pen.phi(r, a).sum(-1)  # (B, K)


@pytest.mark.parametrize("cls", PENALTIES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_alpha_scaled_with_the_data(cls, case):
    dtype, s = case
    x0 = points()
    v = torch.randn(B, C, generator=torch.Generator().manual_seed(1), dtype=F64)
    y_ref, gx_ref, ga_ref = pool_with_grads(x0, cls(torch.tensor(1.0, dtype=F64)), v)
    x = (x0 * s).to(dtype)
    alpha = torch.tensor(s, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeclarativeWarning)
        y, gx, ga = pool_with_grads(x, cls(alpha), v)
    assert torch.isfinite(y).all() and torch.isfinite(gx).all() and torch.isfinite(ga).all()
    tol_y, tol_g = (1e-5, 2e-3) if dtype == F32 else (1e-12, 1e-8)
    # Relative to the data's spread (about 10 here) and to the gradients' size.
    assert (y.double() / s - y_ref).abs().max() <= tol_y * 10
    assert (gx.double() - gx_ref).abs().max() <= tol_g * max(1.0, gx_ref.abs().max())
    assert (ga.double() - ga_ref).abs() <= tol_g * max(1.0, ga_ref.abs())


@pytest.mark.parametrize("cls", PENALTIES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_alpha_fixed(cls, case):
    dtype, s = case
    x = (points(seed=2) * s).to(dtype).requires_grad_()
    pen = cls(1.0)
    y = robust_vector_pool(x, pen)
    v = torch.randn(B, C, generator=torch.Generator().manual_seed(3), dtype=dtype)
    (gx,) = torch.autograd.grad((y * v).sum(), x)
    x, y = x.detach(), y.detach()
    assert torch.isfinite(y).all() and torch.isfinite(gx).all()
    assert (y >= x.amin(-1)).all() and (y <= x.amax(-1)).all()
    # Σ_i ∂y/∂x_i = I: the gradient summed over the points is v.
    torch.testing.assert_close(gx.sum(-1), v, rtol=1e-3 if dtype == F32 else 1e-9, atol=0.0)
    # Not above the objective at the mean and (convex penalties: at every data point;
    # others, a local minimum: at the data point nearest to the coordinatewise median, the
    # solver's starts).
    if pen.is_convex:
        others = x.double()
    else:
        median = x.median(-1, keepdim=True).values
        nearest = (x - median).double().square().sum(1).argmin(-1)
        others = x.double()[torch.arange(B), :, nearest].unsqueeze(-1)
    others = torch.cat((x.double().mean(-1, keepdim=True), others), -1)
    f = objective(pen, x, y)  # (B, 1)
    eps = torch.finfo(dtype).eps
    assert (f <= objective(pen, x, others).amin(-1, keepdim=True) * (1 + 64 * eps)).all()


def test_a_set_whose_sum_overflows_is_not_treated_as_infinite():
    x = torch.full((1, 2, 8), 3e38, dtype=F32)
    x[0, :, :4] = 2.9e38
    y = robust_vector_pool(x, PseudoHuber(1e37))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, torch.full((1, 2), 2.95e38), rtol=1e-6, atol=0.0)


def test_a_user_subclass_takes_the_generic_path_with_the_same_answer():
    class MyWelsch(Welsch):
        pass

    x = points(seed=4)
    assert not vector_solvers.has_kernels(MyWelsch(1.0))
    assert vector_solvers.has_kernels(Welsch(1.0))
    torch.testing.assert_close(
        robust_vector_pool(x, MyWelsch(1.0)), robust_vector_pool(x, Welsch(1.0))
    )


def test_an_unconverged_newton_iteration_warns(monkeypatch):
    # Welsch in 16 dimensions with α small against the spacing of the points: from the
    # mean, the reweighted means crawl over a flat objective and the Newton steps are
    # guarded; with one step allowed some sets cannot converge, and that is reported.
    monkeypatch.setattr(vector_solvers, "_MAX_NEWTON", 1)
    monkeypatch.setattr(vector_solvers, "_SMOOTH_REWEIGHT", 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 64, generator=gen, dtype=F64)
    with pytest.warns(DeclarativeWarning, match="did not converge"):
        robust_vector_pool(x, Welsch(1.0))
