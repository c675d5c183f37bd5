"""Tests of the Lp sphere / ball / simplex projections (paper §5.2, Table 2)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

import declnet
from declnet.layers import (
    LpProjection,
    project_onto_ball,
    project_onto_simplex,
    project_onto_sphere,
)

B, N = 2, 5  # distinct sizes, to catch transposes
PS = [1.0, 2.0, math.inf, 1.5, 3.0, 7.0]
GENERAL_PS = [1.5, 3.0, 7.0]
KINDS = ["sphere", "ball"]
DOUBLE = torch.float64


def project(kind: str):
    return project_onto_sphere if kind == "sphere" else project_onto_ball


def lp_norm(y: torch.Tensor, p: float, dim: int = -1) -> torch.Tensor:
    return torch.linalg.vector_norm(y, p, dim=dim)


def sample(seed: int, scale: float, shape=(B, N)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=gen, dtype=DOUBLE)


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", PS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale", [0.15, 3.0], ids=["inside", "outside"])
def test_gradcheck_x_and_per_sample_radius(p, kind, scale):
    # masked=True is the exact Jacobian for every p, so finite differences must agree.
    x = sample(1, scale).requires_grad_(True)
    radius = torch.tensor([0.8, 1.3], dtype=DOUBLE, requires_grad=True)
    fn = project(kind)
    assert torch.autograd.gradcheck(
        lambda a, r: fn(a, p, r, masked=True), (x, radius), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("p", [1.0, math.inf], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_unmasked_equals_masked_where_table2_is_exact(p, kind):
    # L1 with full support (sphere from inside) and L∞ with one active coordinate:
    # Dy of Table 2 then equals D²y and the true Jacobian.
    if p == 1.0:
        x = torch.tensor([[0.1, -0.2, 0.05, 0.3, -0.1], [0.2, 0.1, -0.1, 0.02, 0.1]], dtype=DOUBLE)
        if kind == "ball":
            x = 0.3 * torch.tensor([[1.0, -1.1, 0.9, 1.2, -1.05], [1.0, 1.1, -0.95, 1.0, 1.02]])
            x = x.to(DOUBLE)  # outside, and every coordinate survives the threshold
    else:
        x = torch.tensor([[3.0, 0.2, -0.5, 0.1, 0.4], [0.1, -2.0, 0.3, 0.2, 0.5]], dtype=DOUBLE)
    x.requires_grad_(True)
    fn = project(kind)
    assert torch.autograd.gradcheck(lambda a: fn(a, p, 1.0), (x,), eps=1e-6, atol=1e-6)


def dense_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.jacobian(fn, x)


def test_l1_table2_gradients_with_zeros():
    x = torch.tensor([3.0, -0.1, 1.0, 0.05, -2.0], dtype=DOUBLE)
    y = project_onto_ball(x, 1, 2.0)
    a = torch.sign(y)
    k = (a != 0).sum()
    assert k == 2  # τ = 1.5: y = (1.5, 0, 0, 0, -0.5)
    plain = torch.eye(5, dtype=DOUBLE) - torch.outer(a, a) / k
    masked = torch.diag(a.abs()) - torch.outer(a, a) / k
    jac = dense_jacobian(lambda t: project_onto_ball(t, 1, 2.0), x)
    jac_masked = dense_jacobian(lambda t: project_onto_ball(t, 1, 2.0, masked=True), x)
    torch.testing.assert_close(jac, plain)
    torch.testing.assert_close(jac_masked, masked)


def test_linf_table2_gradients_with_several_clipped():
    x = torch.tensor([3.0, -0.1, 1.5, 0.05, -2.0], dtype=DOUBLE)
    y = project_onto_sphere(x, math.inf, 1.0)
    a = torch.where(y.abs() == 1.0, torch.sign(y), torch.zeros_like(y))
    plain = torch.eye(5, dtype=DOUBLE) - torch.outer(a, a) / 3
    masked = torch.eye(5, dtype=DOUBLE) - torch.diag(a.abs())
    jac = dense_jacobian(lambda t: project_onto_sphere(t, math.inf, 1.0), x)
    jac_masked = dense_jacobian(lambda t: project_onto_sphere(t, math.inf, 1.0, masked=True), x)
    torch.testing.assert_close(jac, plain)
    torch.testing.assert_close(jac_masked, masked)


def test_linf_ball_masked_gradient_is_clamps():
    x = sample(2, 2.0).requires_grad_(True)
    v = sample(3, 1.0)
    (g,) = torch.autograd.grad(project_onto_ball(x, math.inf, 1.0, masked=True), x, v)
    (g_ref,) = torch.autograd.grad(x.clamp(-1.0, 1.0), x, v)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("kind", KINDS)
def test_l2_matches_plain_autograd(kind):
    x = sample(4, 2.0).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    v = sample(5, 1.0)
    y = project(kind)(x, 2, 1.7)
    norm = x_ref.norm(dim=-1, keepdim=True)
    y_ref = (
        1.7 * F.normalize(x_ref, dim=-1)
        if kind == "sphere"
        else x_ref * torch.clamp(1.7 / norm, max=1.0)
    )
    torch.testing.assert_close(y, y_ref)
    (g,) = torch.autograd.grad(y, x, v)
    (g_ref,) = torch.autograd.grad(y_ref, x_ref, v)
    torch.testing.assert_close(g, g_ref)


# --------------------------------------------------------------------------------------
# Feasibility and optimality against numerical solutions
# --------------------------------------------------------------------------------------


def scipy_smooth_projection(x: np.ndarray, p: float, r: float, kind: str, starts: int) -> float:
    """Best objective over SLSQP runs for 1 < p < ∞ (multi-start for the non-convex sphere)."""
    rng = np.random.default_rng(0)
    ctype = "eq" if kind == "sphere" else "ineq"
    sign = 1.0 if kind == "sphere" else -1.0

    def con(u):
        return sign * (np.sum(np.abs(u) ** p) ** (1.0 / p) - r)

    best = math.inf
    for k in range(starts):
        u0 = x if k == 0 else rng.standard_normal(x.size)
        u0 = r * u0 / max(np.sum(np.abs(u0) ** p) ** (1.0 / p), 1e-12)
        res = minimize(
            lambda u: 0.5 * np.sum((u - x) ** 2),
            u0,
            jac=lambda u: u - x,
            constraints=[{"type": ctype, "fun": con}],
            method="SLSQP",
            options={"ftol": 1e-14, "maxiter": 300},
        )
        feasible = abs(con(res.x)) < 1e-8 or (kind == "ball" and con(res.x) > -1e-8)
        if res.success and feasible:
            best = min(best, res.fun)
    return best


def brute_l1(x: np.ndarray, r: float, kind: str) -> float:
    """min over sign patterns of the convex QP on one facet/orthant (SLSQP, smooth)."""
    best = math.inf
    for signs in itertools.product([-1.0, 1.0], repeat=x.size):
        s = np.array(signs)
        ctype = "eq" if kind == "sphere" else "ineq"
        res = minimize(
            lambda u, s=s: 0.5 * np.sum((s * u - x) ** 2),  # u ≥ 0 in orthant s
            np.full(x.size, r / x.size),
            jac=lambda u, s=s: s * (s * u - x),
            bounds=[(0.0, None)] * x.size,
            constraints=[{"type": ctype, "fun": lambda u: r - np.sum(u)}],
            method="SLSQP",
            options={"ftol": 1e-14, "maxiter": 300},
        )
        best = min(best, res.fun)
    return best


def brute_linf(x: np.ndarray, r: float, kind: str) -> float:
    clipped = np.clip(x, -r, r)
    if kind == "ball" or np.abs(x).max() >= r:
        return 0.5 * np.sum((clipped - x) ** 2)
    # Inside the cube: the nearest point lies on one of the 2n faces u_i = ±r.
    return min(0.5 * (r - abs(x[i])) ** 2 for i in range(x.size))


@pytest.mark.parametrize("p", PS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale", [0.15, 2.0], ids=["inside", "outside"])
def test_feasible_and_optimal(p, kind, scale):
    r = 1.2
    x = sample(10 + int(p if p < 100 else 99), scale, shape=(4,)) + 0.01
    y = project(kind)(x, p, r)
    norm = lp_norm(y, p).item()
    if kind == "sphere" or lp_norm(x, p) > r:
        assert norm == pytest.approx(r, rel=1e-10)
    else:
        assert norm <= r and torch.equal(y, x)
    ours = 0.5 * ((y - x) ** 2).sum().item()
    xn = x.numpy()
    if p == 1.0:
        best = brute_l1(xn, r, kind)
    elif p == math.inf:
        best = brute_linf(xn, r, kind)
    else:
        best = scipy_smooth_projection(xn, p, r, kind, starts=6 if kind == "sphere" else 1)
    assert ours <= best + 1e-8
    assert ours == pytest.approx(best, rel=1e-6, abs=1e-10)


@pytest.mark.parametrize("p", GENERAL_PS, ids=str)
def test_general_p_satisfies_kkt(p):
    x = sample(20, 2.0)
    y = project_onto_sphere(x, p, 1.0)
    g = torch.sign(y) * y.abs() ** (p - 1)
    lam = ((y - x) * g).sum(-1, keepdim=True) / (g * g).sum(-1, keepdim=True)
    torch.testing.assert_close(y - x, lam * g, atol=1e-10, rtol=0)  # stationarity
    torch.testing.assert_close(lp_norm(y, p), torch.ones(B, dtype=DOUBLE))
    assert (lam < 0).all()  # outside: the constraint pulls inwards


@pytest.mark.parametrize("p", [1.05, 60.0], ids=str)
def test_general_p_extreme_exponents_and_scales(p):
    # Entries from 1e-6 to 1e3: powers like 1e3^60 must not overflow, and the solution
    # must still be feasible and stationary (checked with g scaled by max |y|).
    x = sample(25, 1.0) * torch.logspace(-6, 3, N, dtype=DOUBLE)
    xg = x.clone().requires_grad_(True)
    y = project_onto_sphere(xg, p, 1.0)
    top = y.detach().abs().amax(-1, keepdim=True)
    norm = top.squeeze(-1) * lp_norm(y.detach() / top, p)
    torch.testing.assert_close(norm, torch.ones(B, dtype=DOUBLE))
    g = torch.sign(y.detach()) * (y.detach().abs() / top) ** (p - 1)
    big = g.abs() > 1e-12  # coordinates whose |y|^(p−1) is representable
    lam = ((y.detach() - x) * g).sum(-1, keepdim=True) / (g * g).sum(-1, keepdim=True)
    residual = (y.detach() - x - lam * g)[big]
    assert residual.abs().max() < 1e-9
    (grad,) = torch.autograd.grad(y.sum(), xg)
    assert torch.isfinite(grad).all()


def test_general_p_gradient_with_large_radius_and_exponent():
    # |y|^(p−1) with |y| ~ 1e3 and p = 150 overflows unless the backward rescales.
    x = sample(26, 3e3)[:1].requires_grad_(True)
    radius = torch.tensor([2e3], dtype=DOUBLE, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, r: project_onto_sphere(a, 150.0, r), (x, radius), eps=1e-4, atol=1e-6, rtol=1e-4
    )


@pytest.mark.parametrize("p", PS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_idempotent(p, kind):
    fn = project(kind)
    for scale in (0.2, 3.0):
        y = fn(sample(30, scale), p, 0.9)
        torch.testing.assert_close(fn(y, p, 0.9), y, atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------------------
# Inside / on / outside the ball
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", PS, ids=str)
def test_ball_inside_is_identity(p):
    x = sample(40, 0.05).requires_grad_(True)
    v = sample(41, 1.0)
    r = torch.tensor(1.0, dtype=DOUBLE, requires_grad=True)
    y = project_onto_ball(x, p, r)
    assert torch.equal(y, x.detach())
    gx, gr = torch.autograd.grad(y, (x, r), v)
    assert torch.equal(gx, v)
    assert gr.item() == 0.0


@pytest.mark.parametrize("p", PS, ids=str)
def test_ball_outside_is_sphere(p):
    x = sample(42, 4.0).requires_grad_(True)
    v = sample(43, 1.0)
    ball = project_onto_ball(x, p, 0.7, masked=True)
    sphere = project_onto_sphere(x, p, 0.7, masked=True)
    torch.testing.assert_close(ball, sphere)
    torch.testing.assert_close(
        torch.autograd.grad(ball, x, v)[0], torch.autograd.grad(sphere, x, v)[0]
    )


@pytest.mark.parametrize("p", PS, ids=str)
def test_ball_boundary_returns_input_with_sphere_gradient(p):
    # On the boundary the output is x and the gradient is the one-sided one from outside.
    if p in (1.0, 2.0, math.inf):
        x = sample(44, 1.0)
        x = x / lp_norm(x, p).unsqueeze(-1)
        # The radius is the norm exactly as the layer computes it (for p = 1, a plain sum).
        r = x.abs().sum(-1, keepdim=True) if p == 1.0 else lp_norm(x, p).unsqueeze(-1)
    else:
        # General p: points whose norm is exact in any rounding (one non-zero coordinate).
        x = torch.zeros(B, N, dtype=DOUBLE)
        x[0, 1], x[1, 3] = 1.3, -0.7
        r = torch.tensor([[1.3], [0.7]], dtype=DOUBLE)
    x.requires_grad_(True)
    v = sample(45, 1.0)
    y = project_onto_ball(x, p, r)
    torch.testing.assert_close(y, x.detach(), atol=1e-14, rtol=0)
    g_ball = torch.autograd.grad(y, x, v)[0]
    g_sphere = torch.autograd.grad(project_onto_sphere(x, p, r), x, v)[0]
    torch.testing.assert_close(g_ball, g_sphere)
    assert not torch.allclose(g_ball, v)  # not the interior identity


# --------------------------------------------------------------------------------------
# Degenerate inputs
# --------------------------------------------------------------------------------------


def test_l2_sphere_at_zero_is_deterministic_with_finite_gradient():
    x = torch.zeros(B, N, dtype=DOUBLE, requires_grad=True)
    r = torch.tensor([2.0, 0.5], dtype=DOUBLE, requires_grad=True)
    v = sample(50, 1.0)
    y = project_onto_sphere(x, 2, r)
    expected = torch.zeros(B, N, dtype=DOUBLE)
    expected[:, 0] = r.detach()
    assert torch.equal(y, expected)
    gx, gr = torch.autograd.grad(y, (x, r), v)
    tangent = v.clone()
    tangent[:, 0] = 0.0  # (I − e₁e₁ᵀ) v
    torch.testing.assert_close(gx, tangent)
    torch.testing.assert_close(gr, v[:, 0])


@pytest.mark.parametrize("p", PS, ids=str)
def test_zero_input_every_p(p):
    x = torch.zeros(B, N, dtype=DOUBLE, requires_grad=True)
    y = project_onto_sphere(x, p, 1.5)
    torch.testing.assert_close(lp_norm(y, p), torch.full((B,), 1.5, dtype=DOUBLE))
    assert (y >= 0).all()  # zeros are pushed out with a + sign
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(g).all()
    yb = project_onto_ball(x, p, 1.5)
    assert torch.equal(yb, x.detach())


@pytest.mark.parametrize("p", PS, ids=str)
def test_tiny_nonzero_input_lands_on_the_sphere(p):
    x = torch.tensor([[1e-300, -2e-300, 0.0, 3e-301, 0.0]], dtype=DOUBLE)
    y = project_onto_sphere(x, p, 1.0)
    assert torch.isfinite(y).all()
    assert lp_norm(y, p).item() == pytest.approx(1.0, rel=1e-12)


def test_zero_input_choices_are_documented_points():
    x = torch.zeros(1, 4, dtype=DOUBLE)
    torch.testing.assert_close(
        project_onto_sphere(x, 1, 1.0), torch.full((1, 4), 0.25, dtype=DOUBLE)
    )
    e1 = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=DOUBLE)
    assert torch.equal(project_onto_sphere(x, math.inf, 1.0), e1)
    assert torch.equal(project_onto_sphere(x, 2, 1.0), e1)
    torch.testing.assert_close(project_onto_sphere(x, 7, 1.0), e1)
    torch.testing.assert_close(
        project_onto_sphere(x, 1.5, 1.0), torch.full((1, 4), 4 ** (-1 / 1.5), dtype=DOUBLE)
    )


def test_linf_sphere_inside_ties_push_first_largest():
    x = torch.tensor([[0.2, -0.5, 0.5, 0.1], [0.3, 0.3, -0.3, 0.0]], dtype=DOUBLE)
    y = project_onto_sphere(x, math.inf, 1.0)
    expected = torch.tensor([[0.2, -1.0, 0.5, 0.1], [1.0, 0.3, -0.3, 0.0]], dtype=DOUBLE)
    assert torch.equal(y, expected)
    # The pushed coordinate is frozen; the others pass the gradient through.
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(project_onto_sphere(xg, math.inf, 1.0).sum(), xg)
    assert torch.equal(g, torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]], dtype=DOUBLE))


@pytest.mark.parametrize("radius", ["float", "per row"])
@pytest.mark.parametrize("dim", [-1, 0])
def test_linf_sphere_long_rows_inside_or_not(radius, dim):
    # Rows longer than the prefix the CPU path looks at first: outside, inside, reaching
    # the radius only after the prefix, negative only, exactly on the sphere.
    n = 300
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, n, dtype=DOUBLE, generator=gen)
    x[1] = 0.5 * torch.rand(n, dtype=DOUBLE, generator=gen) - 0.25  # inside
    x[2] = 0.1 * x[2]
    x[2, 250] = -3.0  # outside, but only past the prefix
    x[3] = -2.0 - torch.rand(n, dtype=DOUBLE, generator=gen)  # outside, negative only
    x[4] = 0.3 * torch.tanh(x[4])
    x[4, 200] = 1.0  # on the sphere
    x[5] = 0.01 * x[5]
    x[5, 280] = -0.9  # inside, largest magnitude negative and late
    r = 1.0 if radius == "float" else torch.full((6, 1), 1.0, dtype=DOUBLE)
    expected = x.clamp(-1.0, 1.0)
    for row in (1, 5):  # inside: the largest magnitude goes out to ±r
        k = int(x[row].abs().argmax())
        expected[row, k] = math.copysign(1.0, float(x[row, k]))
    if dim == 0:
        x, expected = x.T.contiguous(), expected.T
        r = r if radius == "float" else r.T
    y = project_onto_sphere(x, math.inf, r, dim=dim)
    assert torch.equal(y, expected)
    far = 3.0 * torch.randn(x.shape, dtype=DOUBLE, generator=gen)  # every row outside
    assert torch.equal(project_onto_sphere(far, math.inf, r, dim=dim), far.clamp(-1.0, 1.0))


def test_linf_ball_coordinate_exactly_at_radius_is_active():
    x = torch.tensor([[1.0, 0.5, -0.2, 0.1, 0.0]], dtype=DOUBLE, requires_grad=True)
    y = project_onto_ball(x, math.inf, 1.0, masked=True)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(y, x.detach())
    assert torch.equal(g, torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]], dtype=DOUBLE))


def test_l1_ties_in_magnitude():
    x = torch.tensor([[2.0, -2.0, 0.5, 0.0, 1.0]], dtype=DOUBLE)
    y = project_onto_ball(x, 1, 1.0)
    torch.testing.assert_close(y, torch.tensor([[0.5, -0.5, 0.0, 0.0, 0.0]], dtype=DOUBLE))
    # A coordinate exactly at the threshold goes to zero and counts as outside the support.
    x = torch.tensor([[3.0, 1.0, 0.5]], dtype=DOUBLE, requires_grad=True)
    y = project_onto_ball(x, 1, 2.0, masked=True)  # τ = 1: y = (2, 0, 0)
    torch.testing.assert_close(y, torch.tensor([[2.0, 0.0, 0.0]], dtype=DOUBLE))
    (g,) = torch.autograd.grad(y[0, 0], x)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("p", PS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("radius", [1e-7, 1e7])
def test_tiny_and_huge_radii_are_scale_equivariant(p, kind, radius):
    # y(x, r) = r y(x / r, 1) and the Jacobian in x is scale-free.
    fn = project(kind)
    x = sample(60, radius * 2.0).requires_grad_(True)
    v = sample(61, 1.0)
    y = fn(x, p, radius, masked=True)
    xs = (x.detach() / radius).requires_grad_(True)
    ys = fn(xs, p, 1.0, masked=True)
    torch.testing.assert_close(y / radius, ys.detach(), rtol=1e-9, atol=1e-12)
    g = torch.autograd.grad(y, x, v)[0]
    gs = torch.autograd.grad(ys, xs, v)[0]
    torch.testing.assert_close(g, gs, rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------------------
# Batches, dims, radii, dtypes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", PS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_batch_equals_stacked_samples(p, kind):
    fn = project(kind)
    x = torch.cat([sample(70, 0.1), sample(71, 3.0)]).requires_grad_(True)  # mixed rows
    radius = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=DOUBLE)
    v = sample(72, 1.0, shape=(4, N))
    y = fn(x, p, radius, masked=True)
    (g,) = torch.autograd.grad(y, x, v)
    for i in range(4):
        xi = x[i : i + 1].detach().requires_grad_(True)
        yi = fn(xi, p, float(radius[i]), masked=True)
        (gi,) = torch.autograd.grad(yi, xi, v[i : i + 1])
        torch.testing.assert_close(y[i : i + 1], yi)
        torch.testing.assert_close(g[i : i + 1], gi)


@pytest.mark.parametrize("p", PS, ids=str)
def test_dim_argument_and_radius_shapes(p):
    x = sample(80, 2.0, shape=(3, N, 2))  # project along dim=1 of a 3-d tensor
    radius = torch.tensor([[0.5, 1.0], [1.5, 2.0], [1.0, 1.0]], dtype=DOUBLE)  # batch shape
    y = project_onto_sphere(x, p, radius, dim=1)
    ref = project_onto_sphere(x.transpose(1, 2), p, radius).transpose(1, 2)
    torch.testing.assert_close(y, ref)
    keepdim = project_onto_sphere(x, p, radius.unsqueeze(1), dim=-2)
    torch.testing.assert_close(keepdim, y)
    torch.testing.assert_close(lp_norm(y, p, dim=1), radius)


@pytest.mark.parametrize("p", PS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_learnable_radius_matches_finite_differences(p, kind):
    layer = LpProjection(p, kind=kind, radius=torch.nn.Parameter(torch.tensor(0.9, dtype=DOUBLE)))
    x = sample(90, 1.0)
    v = sample(91, 1.0)
    (layer(x) * v).sum().backward()
    h = 1e-6
    with torch.no_grad():
        plus = (project(kind)(x, p, 0.9 + h) * v).sum()
        minus = (project(kind)(x, p, 0.9 - h) * v).sum()
    assert layer.radius.grad.item() == pytest.approx(((plus - minus) / (2 * h)).item(), rel=1e-5)


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf, 3.0], ids=str)
def test_float32_keeps_dtype_and_is_feasible(p):
    x = torch.randn(4, 33, generator=torch.Generator().manual_seed(3))
    y = project_onto_sphere(x, p, 2.0)
    assert y.dtype == torch.float32
    torch.testing.assert_close(lp_norm(y, p), torch.full((4,), 2.0), rtol=1e-5, atol=0)


def test_radius_gradient_only_when_asked():
    x = sample(95, 2.0).requires_grad_(True)
    y = project_onto_sphere(x, 1, torch.tensor(1.0, dtype=DOUBLE))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.shape == x.shape
    r = torch.tensor(1.0, dtype=DOUBLE, requires_grad=True)
    (gr,) = torch.autograd.grad(project_onto_sphere(x.detach(), 1, r).sum(), r)
    assert gr.shape == r.shape


# --------------------------------------------------------------------------------------
# Simplex
# --------------------------------------------------------------------------------------


def test_simplex_feasible_optimal_and_gradcheck():
    x = sample(100, 1.0).requires_grad_(True)
    total = torch.tensor([1.0, 2.5], dtype=DOUBLE, requires_grad=True)
    y = project_onto_simplex(x, total)
    assert (y >= 0).all()
    torch.testing.assert_close(y.sum(-1), total.detach())
    for i in range(B):
        xi = x[i].detach().numpy()
        t = float(total[i].detach())
        res = minimize(
            lambda u, xi=xi: 0.5 * np.sum((u - xi) ** 2),
            np.full(N, t / N),
            bounds=[(0.0, None)] * N,
            constraints=[{"type": "eq", "fun": lambda u, t=t: np.sum(u) - t}],
            method="SLSQP",
            options={"ftol": 1e-14},
        )
        assert 0.5 * ((y[i] - x[i]) ** 2).sum().item() == pytest.approx(res.fun, abs=1e-9)
    assert torch.autograd.gradcheck(project_onto_simplex, (x, total), eps=1e-6, atol=1e-6)


def test_simplex_dim_and_validation():
    x = sample(101, 1.0)
    torch.testing.assert_close(project_onto_simplex(x.T, dim=0), project_onto_simplex(x).T)
    with pytest.raises(ValueError, match="total must be > 0"):
        project_onto_simplex(x, total=0.0)


# --------------------------------------------------------------------------------------
# The module and bad input
# --------------------------------------------------------------------------------------


def test_module_registers_radius_and_matches_functional():
    learned = LpProjection(2, kind="ball", radius=torch.nn.Parameter(torch.tensor(1.0)))
    assert [name for name, _ in learned.named_parameters()] == ["radius"]
    fixed = LpProjection(math.inf, kind="sphere", radius=torch.tensor([1.0, 2.0]), masked=True)
    assert "radius" in dict(fixed.named_buffers())
    assert "kind='sphere'" in repr(fixed)
    x = torch.randn(2, 7)
    torch.testing.assert_close(fixed(x), project_onto_sphere(x, math.inf, torch.tensor([1.0, 2.0])))
    assert declnet.LpProjection is LpProjection
    assert declnet.project_onto_ball is project_onto_ball


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda x: project_onto_sphere(x, 0.5),
            r"p must be >= 1.*got p=0.5.*Allowed: 1, 2, math.inf",
        ),
        (lambda x: project_onto_ball(x, float("nan")), r"p must be >= 1"),
        (
            lambda x: project_onto_ball(x, 2, radius=0.0),
            r"radius must be > 0 and finite; got radius=0.0",
        ),
        (lambda x: project_onto_ball(x, 2, radius=-1.0), r"radius must be > 0"),
        (
            lambda x: project_onto_ball(x, 2, radius=torch.tensor([1.0, -2.0])),
            r"every entry of radius must be > 0 and finite; got radius = -2.0",
        ),
        (lambda x: project_onto_sphere(x, 2, radius=math.inf), r"got radius=inf"),
        (
            lambda x: project_onto_sphere(x, 2, radius=torch.ones(3, 1)),
            r"radius of shape \(3, 1\) does not broadcast to x of shape \(2, 5\)",
        ),
        (
            lambda x: project_onto_sphere(x, 2, dim=2),
            r"dim=2 is out of range.*allowed: -2 <= dim <= 1",
        ),
        (
            lambda x: project_onto_sphere(x, 2, radius=torch.ones(3)),
            r"radius of shape \(3,\) does not broadcast to the batch shape \(2,\)",
        ),
        (
            lambda x: project_onto_sphere(x, 2, radius=torch.ones(2, 5)),
            r"must have size 1 along dim=1",
        ),
        (lambda x: LpProjection(2, kind="cube"), r"kind must be 'sphere' or 'ball'; got 'cube'"),
        (lambda x: LpProjection(0, kind="ball"), r"p must be >= 1"),
        (lambda x: LpProjection(2, radius=-3.0), r"radius must be > 0"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.ones(2, 5))


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match=r"floating-point dtype; got torch\.int64"):
        project_onto_sphere(torch.ones(2, 5, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="p must be a real number"):
        project_onto_sphere(torch.ones(2, 5), "inf")
    with pytest.raises(TypeError, match="p must be a real number"):
        project_onto_sphere(torch.ones(2, 5), True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("p", PS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(p, kind):
    x = torch.cat([sample(110, 0.1), sample(111, 3.0), torch.zeros(1, N, dtype=DOUBLE)])
    v = sample(112, 1.0, shape=(5, N))
    r = torch.tensor([0.5, 1.0, 1.5, 2.0, 1.0], dtype=DOUBLE)
    results = []
    for device in ("cpu", "cuda"):
        xd = x.to(device).requires_grad_(True)
        rd = r.to(device).requires_grad_(True)
        y = project(kind)(xd, p, rd, masked=True)
        gx, gr = torch.autograd.grad(y, (xd, rd), v.to(device))
        results.append([t.cpu() for t in (y, gx, gr)])
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda, cpu)


@pytest.mark.parametrize("p", PS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_no_grad_path_gives_the_same_output(p, kind):
    x = torch.cat([sample(120, 0.1), sample(121, 3.0)])
    with torch.no_grad():
        fast = project(kind)(x, p, 1.1)
    slow = project(kind)(x.clone().requires_grad_(True), p, 1.1)
    assert torch.equal(fast, slow.detach())


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf, 3.0], ids=str)
def test_works_under_torch_func_grad(p):
    x = sample(130, 2.0)
    weights = torch.arange(N, dtype=DOUBLE)

    def loss(a):
        return (project_onto_sphere(a, p, 1.0) ** 2 * weights).sum()

    xg = x.clone().requires_grad_(True)
    loss(xg).backward()
    torch.testing.assert_close(torch.func.grad(loss)(x), xg.grad)
