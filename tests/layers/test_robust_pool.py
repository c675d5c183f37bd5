"""Robust pooling: forward optimality, closed-form backward, batching, dims, edge cases."""

from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch

from declnet import DeclarativeWarning
from declnet.layers import (
    Huber,
    PseudoHuber,
    Quadratic,
    RobustPool,
    TruncatedQuadratic,
    Welsch,
    as_penalty,
    robust_pool,
)

F64 = torch.float64
B, C, N = 2, 3, 5
ROBUST = ["pseudo_huber", "huber", "welsch", "truncated_quadratic"]
ALL = ["quadratic", *ROBUST]


def rand(*shape, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def make(name, alpha=0.8):
    return Quadratic() if name == "quadratic" else as_penalty(name).__class__(alpha)


def objective(pen, x, u):
    """f(x, u) = Σ_i φ(u − x_i), for u of shape (..., G) against x of shape (..., n)."""
    return pen.phi(u.unsqueeze(-1) - x.unsqueeze(-2)).sum(-1)


def grid_minimum(pen, x, points=801):
    """Dense float64 grid over [min x − α, max x + α], refined around the best point."""
    lo, hi = x.amin(-1, keepdim=True) - 1, x.amax(-1, keepdim=True) + 1
    grid = lo + (hi - lo) * torch.linspace(0, 1, points, dtype=F64)
    f = objective(pen, x, grid)
    best = grid.gather(-1, f.argmin(-1, keepdim=True))
    step = (hi - lo) / (points - 1)
    fine = best + step * torch.linspace(-1, 1, 401, dtype=F64)
    return torch.minimum(f.amin(-1), objective(pen, x, fine).amin(-1))


def brute_force_truncated(x, alpha):
    """Global minimum of the truncated quadratic: min over all contiguous windows of the sorted
    data of the objective evaluated at the window mean (O(n^3), for tests only)."""
    s = x.sort(-1).values
    n = s.shape[-1]
    pen = TruncatedQuadratic(alpha)
    means = [s[..., i:j].mean(-1) for i in range(n) for j in range(i + 1, n + 1)]
    cand = torch.stack(means, -1)
    f = objective(pen, x, cand)
    return f.amin(-1), cand.gather(-1, f.argmin(-1, keepdim=True)).squeeze(-1)


# ---------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", ALL)
def test_gradcheck(name):
    x = rand(B, C, N, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: robust_pool(t, make(name)), (x,))


@pytest.mark.parametrize("name", ALL)
def test_closed_form_matches_table_1(name):
    pen = make(name)
    x = rand(B, C, N, seed=2).requires_grad_()
    y = robust_pool(x, pen)
    v = rand(B, C, seed=3)
    (g,) = torch.autograd.grad(y, x, v)
    w = pen.d2phi(y.detach().unsqueeze(-1) - x.detach())
    expected = v.unsqueeze(-1) * w / w.sum(-1, keepdim=True)
    torch.testing.assert_close(g, expected)


@pytest.mark.parametrize("name", ["pseudo_huber", "welsch"])
def test_closed_form_matches_unrolled_newton(name):
    """Back-propagating through 40 plain Newton steps started at the solution's basin gives
    the same gradient as the closed form."""
    pen = make(name, 1.3)
    x = rand(B, C, N, seed=4).requires_grad_()
    y = robust_pool(x, pen)
    u = y.detach().unsqueeze(-1) + 0.01
    for _ in range(40):
        z = u - x
        u = u - pen.dphi(z).sum(-1, keepdim=True) / pen.d2phi(z).sum(-1, keepdim=True)
    v = rand(B, C, seed=5)
    (g_unrolled,) = torch.autograd.grad(u.squeeze(-1), x, v)
    (g,) = torch.autograd.grad(y, x, v)
    torch.testing.assert_close(u.squeeze(-1).detach(), y.detach())
    torch.testing.assert_close(g, g_unrolled)


@pytest.mark.parametrize("name", ROBUST)
def test_learnable_alpha_against_finite_differences(name):
    x = rand(B, C, N, seed=6)
    alpha = torch.tensor(0.9, dtype=F64, requires_grad=True)

    def f(a):
        return robust_pool(x, as_penalty(name).__class__(a))

    if name == "truncated_quadratic":
        (g,) = torch.autograd.grad(f(alpha).sum(), alpha)
        h = 1e-6
        fd = (f(alpha.detach() + h) - f(alpha.detach() - h)).sum() / (2 * h)
        assert g.item() == 0 and fd.item() == 0
    else:
        assert torch.autograd.gradcheck(f, (alpha,))


@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch"])
def test_per_channel_alpha_gradcheck(name):
    x = rand(B, C, N, seed=7).requires_grad_()
    alpha = 0.6 + torch.rand(C, dtype=F64, generator=torch.Generator().manual_seed(8))
    alpha.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t, a: robust_pool(t, as_penalty(name).__class__(a)), (x, alpha)
    )


def test_double_backward_is_supported():
    # Full gradgradchecks for every penalty: tests/layers/test_layer_autograd_features.py.
    x = rand(B, C, N).requires_grad_()
    y = robust_pool(x, "welsch")
    v = torch.ones(B, C, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(y, x, v, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), x)
    assert torch.isfinite(gg).all() and gg.abs().sum() > 0


# ---------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", ALL)
def test_forward_is_optimal_against_dense_grid(name):
    pen = make(name, 0.7)
    x = rand(4, 7, seed=9) * 2
    y = robust_pool(x, pen)
    f_y = objective(pen, x, y.unsqueeze(-1)).squeeze(-1)
    assert (f_y <= grid_minimum(pen, x) + 1e-9).all()
    if pen.is_convex:
        g = pen.dphi(y.unsqueeze(-1) - x).sum(-1)
        assert g.abs().max() < 1e-10


def test_truncated_quadratic_equals_brute_force():
    gen = torch.Generator().manual_seed(10)
    data = [
        torch.randn(300, 9, generator=gen, dtype=F64) * 2,
        torch.randint(0, 6, (300, 8), generator=gen).to(F64),  # many ties, breakpoints tie
        torch.cat(
            [
                torch.randn(300, 5, generator=gen, dtype=F64),
                4 + torch.randn(300, 4, generator=gen, dtype=F64),
            ],
            -1,
        ),
    ]
    for x in data:
        for alpha in (0.5, 1.0, 1.7):
            y = robust_pool(x, TruncatedQuadratic(alpha))
            f_y = objective(TruncatedQuadratic(alpha), x, y.unsqueeze(-1)).squeeze(-1)
            f_star, _ = brute_force_truncated(x, alpha)
            torch.testing.assert_close(f_y, f_star, rtol=0, atol=1e-12)


def test_truncated_quadratic_unique_minimiser_is_exact():
    x = torch.tensor([[0.0, 0.1, 0.2, 5.0, 9.0], [1.0, 1.0, 1.0, 1.0, 1.0]], dtype=F64)
    y = robust_pool(x, TruncatedQuadratic(1.0))
    torch.testing.assert_close(y, torch.tensor([0.1, 1.0], dtype=F64))


def test_welsch_reaches_global_minimum_on_clustered_data():
    gen = torch.Generator().manual_seed(11)
    inliers = torch.randn(200, 12, generator=gen, dtype=F64) * 0.3
    outliers = 3 + 4 * torch.rand(200, 5, generator=gen, dtype=F64)
    x = torch.cat([outliers, inliers], -1)
    pen = Welsch(0.5)
    y = robust_pool(x, pen)
    f_y = objective(pen, x, y.unsqueeze(-1)).squeeze(-1)
    assert (f_y <= grid_minimum(pen, x) + 1e-9).all()
    z = y.unsqueeze(-1) - x
    assert pen.dphi(z).sum(-1).abs().max() < 1e-10
    assert (pen.d2phi(z).sum(-1) > 0).all()


@pytest.mark.parametrize("name", ROBUST)
def test_float32_matches_float64(name):
    x = rand(B, C, 50, seed=12)
    y64 = robust_pool(x, make(name))
    y32 = robust_pool(x.float(), make(name))
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-5)


def test_half_input_keeps_dtype():
    x = rand(B, C, N).half()
    y = robust_pool(x, "pseudo_huber")
    assert y.dtype == torch.float16 and y.shape == (B, C)


# ---------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("name", ALL)
def test_batched_equals_per_sample(name):
    pen = make(name)
    x = rand(B, C, N, seed=13)
    y = robust_pool(x, pen)
    rows = torch.stack(
        [torch.stack([robust_pool(x[b, c], pen) for c in range(C)]) for b in range(B)]
    )
    torch.testing.assert_close(y, rows, rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", ["pseudo_huber", "truncated_quadratic"])
def test_dim_tuples_and_keepdim(name):
    pen = make(name)
    x = rand(B, C, 4, N, seed=14)
    y = robust_pool(x, pen, dim=(-2, -1))
    torch.testing.assert_close(y, robust_pool(x.reshape(B, C, 4 * N), pen))
    y0 = robust_pool(x, pen, dim=(0, 2), keepdim=True)
    assert y0.shape == (1, C, 1, N)
    ref = robust_pool(x.permute(1, 3, 0, 2).reshape(C, N, B * 4), pen)
    torch.testing.assert_close(y0.reshape(C, N), ref)
    y1 = robust_pool(x, pen, dim=1)
    torch.testing.assert_close(y1, robust_pool(x.movedim(1, -1), pen))


def test_gradient_through_a_non_last_dim():
    x = rand(C, N, B, seed=15).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: robust_pool(t, "welsch", dim=1), (x,))


def test_module_form():
    alpha = torch.nn.Parameter(torch.tensor(0.8, dtype=F64))
    pool = RobustPool(PseudoHuber(alpha), dim=-1)
    assert list(pool.parameters()) == [alpha]
    x = rand(B, C, N)
    y = pool(x)
    torch.testing.assert_close(y, robust_pool(x, PseudoHuber(0.8)))
    y.sum().backward()
    assert alpha.grad is not None and torch.isfinite(alpha.grad)
    assert "dim=-1" in repr(pool)
    assert RobustPool("huber", dim=(1, 2))(x).shape == (B,)


# ---------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", ALL)
def test_all_equal_inputs(name):
    x = torch.full((B, C, N), 2.5, dtype=F64, requires_grad=True)
    y = robust_pool(x, make(name))
    torch.testing.assert_close(y.detach(), torch.full((B, C), 2.5, dtype=F64))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((B, C, N), 1 / N, dtype=F64))


@pytest.mark.parametrize("name", ALL)
def test_single_element(name):
    x = rand(B, C, 1).requires_grad_()
    y = robust_pool(x, make(name))
    torch.testing.assert_close(y.detach(), x.detach().squeeze(-1))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("name", ROBUST)
def test_ties_share_the_gradient(name):
    x = torch.tensor([[0.1, 0.1, 0.3, 0.3, 0.2]], dtype=F64, requires_grad=True)
    y = robust_pool(x, make(name))
    y.sum().backward()
    assert x.grad[0, 0] == x.grad[0, 1] and x.grad[0, 2] == x.grad[0, 3]
    torch.testing.assert_close(x.grad.sum(), torch.tensor(1.0, dtype=F64))


@pytest.mark.parametrize("name", ROBUST)
def test_huge_outlier_is_ignored(name):
    x = torch.tensor([[0.0, 0.2, -0.1, 0.1, 1e6]], dtype=F64, requires_grad=True)
    y = robust_pool(x, make(name, 0.5))
    assert abs(y.item() - 0.05) < 0.2
    y.sum().backward()
    assert x.grad[0, -1].abs() < 1e-5
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ROBUST)
@pytest.mark.parametrize("scale", [1e-100, 1e100])
def test_scale_equivariance_tiny_and_huge(name, scale):
    x = rand(B, C, N, seed=16)
    y = robust_pool(x, make(name, 0.8))
    xs = (x * scale).requires_grad_()
    ys = robust_pool(xs, as_penalty(name).__class__(0.8 * scale))
    torch.testing.assert_close(ys.detach() / scale, y, rtol=1e-10, atol=1e-12)
    ys.sum().backward()
    xr = x.clone().requires_grad_()
    robust_pool(xr, make(name, 0.8)).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ROBUST)
def test_weights_far_from_every_point_do_not_underflow(name):
    # alpha tiny against the spacing: exp(-(y - x)^2 / 2 alpha^2) underflows for all but
    # the nearest point, or for all points for the pseudo-Huber rescaling path.
    x = torch.tensor([[0.0, 1.0, 2.0, 3.5, 10.0]], dtype=F64, requires_grad=True)
    y = robust_pool(x, make(name, 1e-3))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.sum(), torch.tensor(1.0, dtype=F64))


def test_pseudo_huber_rescaled_weights_when_all_underflow():
    x = torch.tensor([[0.0, 1.0]], dtype=torch.float32, requires_grad=True)
    y = robust_pool(x, PseudoHuber(1e-30))
    assert abs(y.item() - 0.5) < 1e-6
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.5, 0.5]]))


@pytest.mark.parametrize("name", ALL)
def test_nan_confined_to_its_output(name):
    x = rand(B, C, N, seed=17)
    clean = robust_pool(x, make(name))
    x_bad = x.clone()
    x_bad[1, 2, 3] = math.nan
    x_bad[0, 1, 0] = math.inf
    x_bad.requires_grad_()
    y = robust_pool(x_bad, make(name))
    mask = torch.ones(B, C, dtype=torch.bool)
    mask[1, 2] = mask[0, 1] = False
    assert torch.isnan(y[1, 2])
    if name != "quadratic":
        assert torch.isnan(y[0, 1])
    torch.testing.assert_close(y[mask], clean[mask])
    y.sum().backward()
    assert torch.isfinite(x_bad.grad[mask]).all()


def test_huber_interval_of_minimisers_returns_midpoint():
    x = torch.tensor([[-2.0, 2.0], [-3.0, 1.5]], dtype=F64, requires_grad=True)
    y = robust_pool(x, Huber(1.0))
    torch.testing.assert_close(y.detach(), torch.tensor([0.0, -0.75], dtype=F64))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2, 2), 0.5, dtype=F64))
    x4 = torch.tensor([[-5.0, -4.0, 4.0, 6.0]], dtype=F64)
    y4 = robust_pool(x4, Huber(1.0))
    g = Huber(1.0).dphi(y4.unsqueeze(-1) - x4).sum()
    assert g.abs() < 1e-12 and y4.item() == 0.0


def test_welsch_degenerate_curvature_uses_mean_shift_derivative():
    # x = (-α, α): y = 0 is a minimum where Σφ'' = 0 exactly.
    x = torch.tensor([[-1.0, 1.0, 0.3, 0.5]], dtype=F64)[:, :2].clone().requires_grad_()
    y = robust_pool(x, Welsch(1.0))
    assert y.item() == 0.0
    with pytest.warns(DeclarativeWarning, match="mean-shift"):
        y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.5, 0.5]], dtype=F64))


# ---------------------------------------------------------------------------------- bad input


def test_bad_inputs_say_what_came_and_what_is_allowed():
    x = rand(B, C, N)
    with pytest.raises(ValueError, match=r"dim=3 is out of range.*-3\.\.2"):
        robust_pool(x, "huber", dim=3)
    with pytest.raises(ValueError, match="same dimension twice"):
        robust_pool(x, "huber", dim=(2, -1))
    with pytest.raises(ValueError, match="pooled set is empty"):
        robust_pool(torch.zeros(2, 0), "huber")
    with pytest.raises(ValueError, match="unknown penalty 'median'"):
        robust_pool(x, "median")
    with pytest.raises(ValueError, match="positive finite number, got 0"):
        robust_pool(x, Welsch(0))
    with pytest.raises(TypeError, match="floating-point"):
        robust_pool(torch.ones(2, 3, dtype=torch.int64), "huber")
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        robust_pool([1.0, 2.0], "huber")
    with pytest.raises(ValueError, match="does not broadcast"):
        robust_pool(x, Welsch(torch.ones(4, dtype=F64)))
    alpha = torch.nn.Parameter(torch.tensor(1.0, dtype=F64))
    pen = Welsch(alpha)
    with torch.no_grad():
        alpha.fill_(-1.0)
    with pytest.raises(ValueError, match="positive and finite"):
        robust_pool(x, pen)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(0, 4), (0, 1024), (2, 0, 100)])
def test_empty_batch_is_fine(name, shape):
    # The truncated quadratic's enumeration (both its full and its pruned form, n ≥ 64)
    # reduced over the rows and failed on an empty batch.
    x = torch.zeros(*shape, dtype=F64, requires_grad=True)
    y = robust_pool(x, make(name))
    assert y.shape == shape[:-1]
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == shape


@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 30.0, 1e20])
def test_backward_without_alpha_gradient_equals_the_full_one(name, dtype, scale):
    # With a constant α the backward runs one fused kernel (no ∂y/∂α); it must give the
    # gradient of the full backward (α requiring grad), rare rows included: two equal
    # clusters, x = ±α (Welsch's Σφ'' = 0), x = ±3α (Huber: no inlier), one far
    # outlier, weights that underflow.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 34, generator=gen, dtype=F64).to(dtype) * scale
    x[0] = torch.tensor([0.0, 1.0] * 17, dtype=dtype) * scale
    x[1] = 0.0
    x[1, 0] = 3.0 * scale
    x[2, :17], x[2, 17:] = -0.7, 0.7  # y = 0 with Σφ'' = 0 for Welsch (x = ±α)
    x[3, :17], x[3, 17:] = -2.1, 2.1  # Huber: an interval of minimisers, no inlier
    grads = []
    for alpha in (0.7, torch.tensor(0.7, dtype=dtype, requires_grad=True)):
        xg = x.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeclarativeWarning)
            y = robust_pool(xg, make(name, alpha))
            (g,) = torch.autograd.grad(y.sum(), xg)
        grads.append(g)
    fused, full = grads
    assert torch.equal(fused.isnan(), full.isnan())
    torch.testing.assert_close(fused.nan_to_num(), full.nan_to_num(), rtol=1e-5, atol=1e-6)


def test_no_warnings_in_the_regular_case():
    x = rand(B, C, N).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ALL:
            robust_pool(x, make(name)).sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ROBUST)
def test_cuda_matches_cpu(name):
    x = rand(B, C, 64, seed=18)
    xc = x.cuda().requires_grad_()
    y = robust_pool(xc, make(name))
    torch.testing.assert_close(y.cpu(), robust_pool(x, make(name)))
    y.sum().backward()
    xr = x.clone().requires_grad_()
    robust_pool(xr, make(name)).sum().backward()
    torch.testing.assert_close(xc.grad.cpu(), xr.grad)


@pytest.mark.parametrize("name", ROBUST)
def test_per_channel_alpha_equals_per_channel_calls(name):
    x = rand(B, C, N, seed=19)
    alpha = torch.tensor([0.4, 0.9, 2.0], dtype=F64)
    y = robust_pool(x, as_penalty(name).__class__(alpha))
    cols = torch.stack(
        [robust_pool(x[:, c], as_penalty(name).__class__(float(alpha[c]))) for c in range(C)], -1
    )
    torch.testing.assert_close(y, cols, rtol=0, atol=1e-13)
    y_keep = robust_pool(x, as_penalty(name).__class__(alpha[:, None]), keepdim=True)
    torch.testing.assert_close(y_keep.squeeze(-1), y)


def test_truncated_quadratic_blocks_equal_one_pass(monkeypatch):
    module = sys.modules["declnet.layers._pool_solvers"]
    x = rand(13, 7, seed=20)
    alpha = torch.linspace(0.3, 2.0, 13, dtype=F64)
    one_pass = robust_pool(x, TruncatedQuadratic(alpha))
    monkeypatch.setattr(module, "_TRUNCATED_BLOCK", 20)  # blocks of 2 rows
    xg = x.clone().requires_grad_()
    blocked = robust_pool(xg, TruncatedQuadratic(alpha))
    torch.testing.assert_close(blocked, one_pass, rtol=0, atol=0)
    blocked.sum().backward()
    torch.testing.assert_close(xg.grad.sum(-1), torch.ones(13, dtype=F64))


@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch"])
def test_slow_rows_finish_after_fast_rows_are_set_aside(name):
    # Row 0 needs many bracketing steps (mean far from the solution); the others converge
    # at once and are set aside, which must not change anyone's answer.
    x = rand(9, 6, seed=21)
    x[0] = torch.tensor([0.0, 0.1, -0.1, 0.05, 3e5, 7e5], dtype=F64)
    pen = make(name, 0.5)
    y = robust_pool(x, pen)
    one_by_one = torch.stack([robust_pool(x[i : i + 1], pen)[0] for i in range(9)])
    torch.testing.assert_close(y, one_by_one, rtol=0, atol=1e-12)
    g = pen.dphi(y.unsqueeze(-1) - x).sum(-1)
    assert g.abs().max() < 1e-9


@pytest.mark.parametrize("name", ROBUST)
def test_eager_kernels_in_blocks_of_rows_give_the_same_answers(name, monkeypatch):
    kernels = sys.modules["declnet.layers._kernels"]
    x = rand(B, 7, 6, seed=22)
    alpha = torch.linspace(0.5, 1.5, 7, dtype=F64)
    v = rand(B, 7, seed=23)
    results = []
    for block in (1 << 16, 12):  # one block; blocks of 2 rows
        monkeypatch.setattr(kernels, "_EAGER_BLOCK", block)
        xg = x.clone().requires_grad_()
        ag = alpha.clone().requires_grad_()
        y = robust_pool(xg, as_penalty(name).__class__(ag))
        gx, ga = torch.autograd.grad(y, (xg, ag), v, allow_unused=True)
        results.append((y, gx, ga))
    (y1, gx1, ga1), (y2, gx2, ga2) = results
    torch.testing.assert_close(y2, y1, rtol=0, atol=1e-14)
    torch.testing.assert_close(gx2, gx1, rtol=0, atol=1e-14)
    torch.testing.assert_close(ga2, ga1, rtol=0, atol=1e-14)


def _pseudo_huber_bisection(x, alpha, steps=2200):
    """float64 bisection on g(u) = Σ φ'(u − x_i) over [min x, max x] (any scale)."""
    x = x.to(F64)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    for _ in range(steps):
        mid = lo + 0.5 * (hi - lo)
        g = PseudoHuber(alpha).dphi(mid - x).sum(-1, keepdim=True)
        hi, lo = torch.where(g > 0, mid, hi), torch.where(g > 0, lo, mid)
    return (0.5 * (lo + hi)).squeeze(-1)


def _hostile_rows(n=300, seed=31):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(6, n, generator=gen, dtype=F64)
    z[0] = z[0].sort().values  # the prefix used as the start lies in the lower tail
    z[1, :128] = -50.0  # a start far from the bulk of the data
    z[2, ::7] = 1e6  # far outliers
    z[3] = torch.exp(3 * z[3])  # skewed, spanning orders of magnitude
    z[4, :] = z[4, :1]  # all equal
    z[5, 200:] = 40.0  # a prefix that holds none of the outlying mass
    return z


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("alpha", [1e-3, 1.0, 100.0])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_pseudo_huber_hostile_starts_match_a_bisection_reference(dtype, alpha, scale):
    x = (_hostile_rows() * scale).to(dtype)
    a = alpha * scale
    y = robust_pool(x, PseudoHuber(a))
    ref = _pseudo_huber_bisection(x, a)
    # The root is determined to eps · (|y| + α n / Σφ'') (rounding in g over its slope).
    t = (ref.unsqueeze(-1) - x.to(F64)) / a
    curvature = (1 + t * t).pow(-1.5).sum(-1)
    eps = torch.finfo(dtype).eps
    tol = 8 * eps * (ref.abs() + a * x.shape[-1] / curvature)
    err = (y.to(F64) - ref).abs()
    assert (err <= tol).all(), (err / tol).max()


@pytest.mark.parametrize("dtype, passes", [(torch.float32, 2), (F64, 3)])
def test_pseudo_huber_gaussian_rows_take_few_passes(dtype, passes, monkeypatch):
    # The start (a prefix mean) is about 0.1 from the root; the first pass evaluates the
    # sums there, and each Halley step cubes the error: 1e-3, 1e-9 (float32 precision),
    # then 1e-27 (float64 precision).
    kernels = sys.modules["declnet.layers._kernels"]
    calls = []
    for name in ("pseudo_huber_first_sums", "pseudo_huber_sums"):
        fn = kernels._EAGER[name]

        def counted(*args, _fn=fn, _name=name):
            calls.append(_name)
            return _fn(*args)

        monkeypatch.setitem(kernels._EAGER, name, counted)
    x = rand(64, 256, seed=32).to(dtype)
    y = robust_pool(x, PseudoHuber(1.0))
    assert calls == ["pseudo_huber_first_sums"] + ["pseudo_huber_sums"] * (passes - 1)
    ref = _pseudo_huber_bisection(x, 1.0)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.to(F64), ref, rtol=2 * eps, atol=2 * eps)


def _offset_rows(offset, alpha, dtype, seed=33):
    """Gaussian rows shifted by ``offset``, with 128 of 300 values moved 50 α down: for small
    α most values are isolated, the objective has kinks or many local minima near the root."""
    x = rand(64, 300, seed=seed) + offset
    x[:, :128] -= 50 * alpha
    return x.to(dtype)


@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch"])
@pytest.mark.parametrize("offset", [0.0, 100.0, 1e4])
@pytest.mark.parametrize("alpha", [1e-3, 1e-2])
def test_small_alpha_far_from_zero_reaches_a_stationary_point(name, offset, alpha):
    # A step small beside |u| is not small beside α: rows must not stop there. g must change
    # sign (from − to +: a minimum) within a few units in the last place of y.
    x = _offset_rows(offset, alpha, F64)
    pen = make(name, alpha)
    y = robust_pool(x, pen)
    d = 4 * torch.finfo(F64).eps * (y.abs() + alpha)
    g = pen.dphi(torch.stack([y - d, y + d], -1).unsqueeze(-1) - x.unsqueeze(-2)).sum(-1)
    rounding = 8 * x.shape[-1] * alpha * torch.finfo(F64).eps
    assert (g[:, 0] <= rounding).all() and (g[:, 1] >= -rounding).all()


@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_rows_converged_early_are_not_moved_by_later_steps(name, dtype):
    # Rows that converge first stay in the batch while the others iterate; their answers
    # must equal those of the rows pooled alone.
    x = _offset_rows(0.0, 1e-2, dtype, seed=34)
    pen = make(name, 1e-2)
    y = robust_pool(x, pen)
    alone = torch.cat([robust_pool(x[i : i + 1], pen) for i in range(x.shape[0])])
    torch.testing.assert_close(y, alone, rtol=0, atol=0)


def test_pseudo_huber_alpha_below_float_spacing_returns_the_data_point():
    # At 1e200 with α = 0.5 pseudo-Huber is the median to the resolution of floats: the
    # answer is the middle value itself (not a neighbouring float), with all weight on it.
    x = (1e200 * rand(6, 9, seed=35)).requires_grad_()
    y = robust_pool(x, PseudoHuber(0.5))
    median = x.detach().median(-1).values
    torch.testing.assert_close(y.detach(), median, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, (x.detach() == median.unsqueeze(-1)).to(F64))


@pytest.mark.parametrize("name", ["pseudo_huber", "welsch"])
@pytest.mark.parametrize("dtype, huge, tiny", [(F64, 1e308, 1e-310), (torch.float32, 3e38, 1e-40)])
def test_alpha_whose_reciprocal_is_not_a_normal_float(name, dtype, huge, tiny):
    # A huge α: 1/α is subnormal, the kernels divide by α; the penalty is quadratic at the
    # data's scale, so the pooled value is the mean.
    x = rand(4, 9, seed=36).to(dtype)
    y = robust_pool(x, make(name, torch.tensor(huge, dtype=dtype)))
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y, x.mean(-1), rtol=8 * eps, atol=8 * eps)
    if name == "pseudo_huber":
        # A subnormal α: 1/α overflows; pseudo-Huber is the median here.
        y = robust_pool(x, make(name, torch.tensor(tiny, dtype=dtype)))
        torch.testing.assert_close(y, x.median(-1).values, rtol=0, atol=0)


def _counting_kernels(monkeypatch, module):
    """Record the number of rows of every kernel call of the pooling solvers."""
    rows = []
    make_kernel = module.kernel

    def counting(name, t):
        run = make_kernel(name, t)

        def call(*args):
            rows.append((name, args[0].shape[0]))
            return run(*args)

        return call

    monkeypatch.setattr(module, "kernel", counting)
    return rows


def test_welsch_skipping_low_peaks_keeps_the_minimum(monkeypatch):
    # Histogram peaks below half the highest are not tried: on clustered and uniform data the
    # objective reached equals that of trying every peak, at fewer evaluations.
    module = sys.modules["declnet.layers._pool_solvers"]
    gen = torch.Generator().manual_seed(37)
    centres = torch.tensor([0.0, 2.0, 5.0], dtype=F64)
    weights = torch.tensor([0.75, 0.2, 0.05], dtype=F64)
    pick = torch.multinomial(weights, 300 * 64, replacement=True, generator=gen).view(300, 64)
    clustered = centres[pick] + 0.3 * torch.randn(300, 64, generator=gen, dtype=F64)
    uniform = 8 * torch.rand(100, 64, generator=gen, dtype=F64)
    x = torch.cat([clustered, uniform])
    pen = Welsch(0.5)
    rows = _counting_kernels(monkeypatch, module)
    skipped = robust_pool(x, pen)
    evaluated_skipping = sum(r for name, r in rows if name == "welsch_sums")
    rows.clear()
    monkeypatch.setattr(module, "_WELSCH_PEAK_REL", 0.0)
    every = robust_pool(x, pen)
    f_skip = objective(pen, x, skipped.unsqueeze(-1)).squeeze(-1)
    f_every = objective(pen, x, every.unsqueeze(-1)).squeeze(-1)
    assert (f_skip <= f_every + 1e-9).float().mean() >= 0.99
    assert evaluated_skipping < sum(r for name, r in rows if name == "welsch_sums")


def test_welsch_histogram_starts_find_the_global_minimum_without_sorting(monkeypatch):
    # Uniform data has many local minima of nearly equal depth (the sorted quantile and
    # window starts miss 2 of these 200 rows); the histogram peaks find the global one, and no
    # row is sorted when the data span fewer than 128 α.
    module = sys.modules["declnet.layers._pool_solvers"]
    gen = torch.Generator().manual_seed(5)
    x = torch.cat([10 * torch.rand(150, 128, generator=gen, dtype=F64),
                   torch.randn(50, 128, generator=gen, dtype=F64)])
    pen = Welsch(1.0)
    rows = _counting_kernels(monkeypatch, module)
    sorts = []
    monkeypatch.setattr(module, "_sorted_rows", lambda t: sorts.append(t) or t.sort(-1).values)
    y = robust_pool(x, pen)
    f_y = objective(pen, x, y.unsqueeze(-1)).squeeze(-1)
    assert (f_y <= grid_minimum(pen, x, points=2001) + 1e-9).all()  # sorted starts: 2 misses
    assert not sorts
    assert any(name == "histogram_counts" for name, _ in rows)


def test_welsch_far_clusters_fall_back_to_the_sorted_starts(monkeypatch):
    # Two clusters 1e4 α apart: the histogram (at most 512 bins of α/4) covers one of them,
    # the wide cluster, which holds most points but not the deepest minimum: its bound on the
    # objective outside says the global minimum may lie elsewhere, and the row also tries the
    # sorted starts, which find the tight cluster.
    module = sys.modules["declnet.layers._pool_solvers"]
    gen = torch.Generator().manual_seed(8)
    tight = 0.05 * torch.randn(6, 120, generator=gen, dtype=F64)
    wide = 1e4 + 3.0 * torch.randn(6, 150, generator=gen, dtype=F64)
    x = torch.cat([tight, wide], -1)
    x[3:] = torch.cat([1e4 + tight[3:], wide[3:] - 1e4], -1)  # the other way round
    pen = Welsch(1.0)
    sorts = []
    monkeypatch.setattr(module, "_sorted_rows", lambda t: sorts.append(t) or t.sort(-1).values)
    y = robust_pool(x, pen)
    expected = torch.tensor([0.0] * 3 + [1e4] * 3, dtype=F64)
    torch.testing.assert_close(y, expected, rtol=0, atol=0.05)
    f_y = objective(pen, x, y.unsqueeze(-1)).squeeze(-1)
    assert (f_y <= grid_minimum(pen, x[:, :120], points=2001) + 150 + 1e-9).all()
    assert sum(t.shape[0] for t in sorts) == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huber_kernels_count_inliers_exactly_at_ties_and_with_infinities(dtype):
    # The kernels form their indicators as clamped signs; compare with comparisons.
    _kernels = sys.modules["declnet.layers._kernels"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=gen, dtype=dtype)
    u = torch.zeros(6, 1, dtype=dtype)
    a = torch.tensor(0.5, dtype=dtype)
    x[:, :5] = 0.5  # exactly on the boundary |u − x| = α
    x[:, 5:8] = -0.5
    x[1, 9], x[2, 10] = math.inf, -math.inf
    z = u - x
    g, h = _kernels.huber_sums(x, u, a)
    torch.testing.assert_close(g, z.clamp(-0.5, 0.5).sum(-1, keepdim=True))
    torch.testing.assert_close(h, (z.abs() < a).to(dtype).sum(-1, keepdim=True))
    cnt, sgn = _kernels.huber_backward_sums(x, u, a)
    torch.testing.assert_close(cnt, (z.abs() <= a).to(dtype).sum(-1, keepdim=True))
    outside = (z.abs() > a).to(dtype)
    torch.testing.assert_close(sgn, (torch.sign(z) * outside).sum(-1, keepdim=True))
    scale = torch.rand(6, 1, generator=gen, dtype=dtype)
    torch.testing.assert_close(
        _kernels.huber_backward_grad(x, u, a, scale), scale * (z.abs() <= a).to(dtype)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_window_kernels_include_both_ends(dtype):
    _kernels = sys.modules["declnet.layers._kernels"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 30, generator=gen, dtype=dtype)
    lo, hi = x[:, :1].clone(), x[:, 1:2].clone()  # two data points are the ends
    lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    inside = ((x >= lo) & (x <= hi)).to(dtype)
    total, count = _kernels.window_sums(x, lo, hi)
    torch.testing.assert_close(total, (x * inside).sum(-1, keepdim=True))
    torch.testing.assert_close(count, inside.sum(-1, keepdim=True))
    scale = torch.rand(5, 1, generator=gen, dtype=dtype)
    torch.testing.assert_close(_kernels.window_grad(x, lo, hi, scale), scale * inside)
    assert bool((count >= 2).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_histogram_counts_bins_overflow_and_nan(dtype):
    _kernels = sys.modules["declnet.layers._kernels"]
    gen = torch.Generator().manual_seed(2)
    x = 3 * torch.randn(4, 200, generator=gen, dtype=dtype)
    x[0, :3] = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype)
    origin = torch.full((4, 1), -2.0, dtype=dtype)
    h = torch.tensor(0.5, dtype=dtype)
    counts = _kernels.histogram_counts(x, origin, h, 8)
    q = (x - origin) / h
    below = (q < 0) | torch.isnan(q)
    above = q >= 8
    assert counts.shape == (4, 10)
    torch.testing.assert_close(counts[:, 0], below.to(dtype).sum(-1))
    torch.testing.assert_close(counts[:, -1], above.to(dtype).sum(-1))
    for k in range(8):
        inside = (q >= k) & (q < k + 1)
        torch.testing.assert_close(counts[:, k + 1], inside.to(dtype).sum(-1))
    assert (counts.sum(-1) == 200).all()


@pytest.mark.parametrize("alpha", [0.5, 0.75, 1.0])
def test_truncated_pruned_with_tied_events_equals_brute_force(alpha):
    # Data on a grid of α/4 (or finer): exits (x_i + 2α) and entries (x_j) tie exactly, and
    # feasible intervals end on data points; the merge (an entry first on a tie) and the
    # bands cut inside the end bins must keep the global minimum.
    module = sys.modules["declnet.layers._pool_solvers"]
    gen = torch.Generator().manual_seed(23)
    x = torch.randint(-8, 9, (60, 64), generator=gen).to(F64) / 8
    a = torch.tensor(alpha, dtype=F64)
    ok, pruned = module._truncated_pruned(x, module._sorted_rows(x), a, x)
    assert bool(ok.float().mean() > 0.5)
    f_star, _ = brute_force_truncated(x, alpha)
    pen = TruncatedQuadratic(alpha)
    f_p = objective(pen, x[ok], pruned[0][ok]).squeeze(-1)
    torch.testing.assert_close(f_p, f_star[ok], rtol=0, atol=1e-12)
    y = robust_pool(x, pen)
    f_y = objective(pen, x, y.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(f_y, f_star, rtol=0, atol=1e-12)


def test_truncated_wide_bands_enumerated_apart_give_the_same_windows(monkeypatch):
    # Rows whose bands are wider than _PRUNE_WIDE times the mean are enumerated in a second
    # call with their own width; every split gives the same windows.
    module = sys.modules["declnet.layers._pool_solvers"]
    gen = torch.Generator().manual_seed(24)
    x = torch.randn(96, 256, generator=gen, dtype=F64)
    x[::7] *= 0.3  # denser rows: wider bands
    pen = TruncatedQuadratic(1.0)
    y = robust_pool(x, pen)
    for wide in (0.25, 1.0, 100.0):
        monkeypatch.setattr(module, "_PRUNE_WIDE", wide)
        torch.testing.assert_close(robust_pool(x, pen), y, rtol=0, atol=0)
