"""Projections at extreme magnitudes: the constraint holds and the gradient is right.

Every layer is swept over inputs scaled from 1e-30 to 1e30 (float32) and 1e-300 to 1e300
(float64) with the radius fixed: the output satisfies its constraint to the dtype's
precision, the gradient is finite, equals central finite differences (float64), and the
float32 gradient equals the float64 one at the same input.
"""

from __future__ import annotations

import math

import pytest
import torch

from declnet.layers import project_onto_ball, project_onto_simplex, project_onto_sphere

F32, F64 = torch.float32, torch.float64
MAGNITUDES = {
    F32: [10.0**k for k in range(-30, 31, 10)],
    F64: [10.0**k for k in range(-300, 301, 60)],
}
PS = [1.0, 1.5, 2.0, 3.0, math.inf]
CASES = [(dtype, s) for dtype, values in MAGNITUDES.items() for s in values]


def ids(case):
    dtype, s = case
    return f"{str(dtype)[6:]}-{s:.0e}"


def data(s: float, dtype: torch.dtype) -> torch.Tensor:
    """Rows of mixed magnitudes around s: Gaussian, one dominant entry, near-ties (no zeros and
    no exact ties of |x|: the projections have kinks there, and a step of 1e-6 s across a
    zero is not small for the coordinates that stay where they are)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 6, generator=gen, dtype=F64)
    base[1] = torch.tensor([1.0, 0.3, -0.2, 0.05, -0.01, 0.002])
    base[2] = torch.tensor([1.0, 1.0 - 1e-3, -0.5, 0.25, 0.997, -0.998])
    base[1:] *= 1.1  # no |x_i| = r = 1 at s = 1 (the L∞ kink)
    return (s * base).to(dtype)


def lp_norm(y: torch.Tensor, p: float) -> torch.Tensor:
    y = y.double().abs()
    if p == math.inf:
        return y.amax(-1)
    top = y.amax(-1, keepdim=True).clamp_min(1e-300)
    return top.squeeze(-1) * ((y / top) ** p).sum(-1) ** (1 / p)


def tol(dtype: torch.dtype) -> float:
    return 16 * torch.finfo(dtype).eps


def directional_fd(fn, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, h: float) -> float:
    """vᵀ (f(x + h u) − f(x − h u)) / 2h, everything in float64."""
    with torch.no_grad():
        return float((v * (fn(x + h * u) - fn(x - h * u))).sum() / (2 * h))


def check_gradient(fn, x: torch.Tensor, s: float) -> None:
    """Finite gradient; float64: equal to central differences along two directions.

    The step is 1e-6 s (the kinks of the piecewise-linear projections are at distances of
    order s); the tolerance includes the rounding error of the differences, eps |y| / h, so
    the comparison is only as strict as the differences can resolve (for tiny inputs and
    a Jacobian of order 1, not at all: the float32 comparison and the sweeps at moderate
    scales cover those maps).
    """
    xg = x.clone().requires_grad_()
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(x.shape, generator=gen, dtype=F64).to(x.dtype)
    (g,) = torch.autograd.grad(fn(xg), xg, v)
    assert torch.isfinite(g).all(), g
    if x.dtype == F64:
        for seed in (2, 3):
            u = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
            h = 1e-6 * s
            fd = directional_fd(fn, x, u, v, h)
            exact = float((g * u).sum())
            with torch.no_grad():
                y_size = float(fn(x).abs().max())
            rounding = 100 * torch.finfo(F64).eps * float(v.abs().sum()) * y_size / h
            scale = float((g.abs() * u.abs()).sum())
            assert exact == pytest.approx(fd, rel=1e-4, abs=1e-5 * scale + rounding + 1e-300)
    else:
        x64 = x.double().requires_grad_()
        (g64,) = torch.autograd.grad(fn(x64), x64, v.double())
        torch.testing.assert_close(g.double(), g64, rtol=1e-3, atol=1e-3 * float(g64.abs().max()))


@pytest.mark.parametrize("case", CASES, ids=ids)
@pytest.mark.parametrize("p", PS)
def test_sphere_keeps_the_norm(case, p):
    dtype, s = case
    x = data(s, dtype)
    y = project_onto_sphere(x, p)
    assert torch.isfinite(y).all(), y
    torch.testing.assert_close(lp_norm(y, p), torch.ones(3, dtype=F64), rtol=tol(dtype), atol=0)


@pytest.mark.parametrize("case", CASES, ids=ids)
@pytest.mark.parametrize("p", PS)
def test_ball_keeps_the_norm(case, p):
    dtype, s = case
    x = data(s, dtype)
    y = project_onto_ball(x, p)
    assert torch.isfinite(y).all(), y
    norm = lp_norm(y, p)
    inside = lp_norm(x, p) < 1
    assert (norm <= 1 + tol(dtype)).all(), norm
    assert torch.equal(y[inside], x[inside])
    on = norm[~inside]
    torch.testing.assert_close(on, torch.ones_like(on), rtol=tol(dtype), atol=0)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_simplex_keeps_the_sum(case):
    dtype, s = case
    x = data(s, dtype)
    y = project_onto_simplex(x)
    assert torch.isfinite(y).all() and (y >= 0).all(), y
    total = y.double().sum(-1)
    torch.testing.assert_close(total, torch.ones(3, dtype=F64), rtol=tol(dtype), atol=0)


@pytest.mark.parametrize("case", CASES, ids=ids)
@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("kind", ["sphere", "ball"])
def test_projection_gradient(case, p, kind):
    dtype, s = case
    x = data(s, dtype)
    project = project_onto_sphere if kind == "sphere" else project_onto_ball
    # masked: the exact Jacobian of the solution map for p = 1 and p = ∞ (comparable with FD).
    check_gradient(lambda t: project(t, p, masked=True), x, s)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_simplex_gradient(case):
    dtype, s = case
    check_gradient(project_onto_simplex, data(s, dtype), s)


def test_reported_cases():
    y = project_onto_sphere(torch.tensor([1e8, 3e7, -2e7]), 1)
    assert y.abs().sum().item() == pytest.approx(1, rel=1e-6)
    for big in (1e7, 1e8):
        y = project_onto_simplex(torch.tensor([big, big, 0.0]))
        torch.testing.assert_close(y, torch.tensor([0.5, 0.5, 0.0]))
    y = project_onto_sphere(torch.tensor([1e19, 5e19, -1e20]), 2)
    assert y.double().norm().item() == pytest.approx(1, rel=1e-6)
    y = project_onto_sphere(torch.tensor([1e160, 3e160, -2e160], dtype=F64), 3)
    assert torch.isfinite(y).all() and lp_norm(y, 3).item() == pytest.approx(1, rel=1e-14)
