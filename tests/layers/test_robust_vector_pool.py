"""Robust vector pooling: y ∈ R^C minimising Σ_i φ(‖y − x_i‖; α)."""

from __future__ import annotations

import math

import pytest
import torch

from declnet import DeclarativeWarning
from declnet.layers import (
    Huber,
    PseudoHuber,
    RobustVectorPool,
    Welsch,
    as_penalty,
    robust_pool,
    robust_vector_pool,
)

F64 = torch.float64
B, C, N = 2, 3, 5
ALL = ["quadratic", "pseudo_huber", "huber", "welsch", "truncated_quadratic"]


def rand(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64)


def make(name, alpha=1.2):
    return as_penalty(name) if name == "quadratic" else as_penalty(name).__class__(alpha)


@pytest.mark.parametrize("name", ALL)
def test_gradcheck(name):
    x = rand(B, C, N, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: robust_vector_pool(t, make(name)), (x,))


@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch"])
def test_alpha_gradcheck(name):
    x = rand(B, C, N, seed=2)
    alpha = torch.tensor([1.1, 1.4], dtype=F64, requires_grad=True)  # one per sample
    assert torch.autograd.gradcheck(
        lambda a: robust_vector_pool(x, as_penalty(name).__class__(a)), (alpha,)
    )


@pytest.mark.parametrize("name", ALL)
def test_stationary_and_not_worse_than_perturbations(name):
    pen = make(name)
    x = rand(B, C, N, seed=3)
    y = robust_vector_pool(x, pen)
    pts = x.transpose(1, 2)  # (B, N, C)

    def f(u):
        return pen.phi(torch.linalg.vector_norm(u.unsqueeze(1) - pts, dim=-1)).sum(-1)

    if name != "truncated_quadratic":
        d = y.unsqueeze(1) - pts
        r = torch.linalg.vector_norm(d, dim=-1, keepdim=True)
        grad = (pen.weight(r) * d).sum(1)
        assert grad.abs().max() < 1e-9
    for seed in range(5):
        assert (f(y) <= f(y + 1e-3 * rand(B, C, seed=10 + seed)) + 1e-12).all()


def test_quadratic_is_the_mean_and_one_dimension_matches_scalar_pooling():
    x = rand(B, C, N, seed=4)
    torch.testing.assert_close(robust_vector_pool(x, "quadratic"), x.mean(-1))
    x1 = rand(B, 1, N, seed=5)
    for name in ("pseudo_huber", "huber", "welsch"):
        y = robust_vector_pool(x1, make(name)).squeeze(1)
        torch.testing.assert_close(y, robust_pool(x1.squeeze(1), make(name)))


def test_layout_dims_and_vector_dim():
    x = rand(B, C, 2, 3, seed=6)  # (B, C, H, W)
    pen = PseudoHuber(0.9)
    y = robust_vector_pool(x, pen, dim=(-2, -1))
    assert y.shape == (B, C)
    torch.testing.assert_close(y, robust_vector_pool(x.reshape(B, C, 6), pen))
    xt = x.reshape(B, C, 6).transpose(1, 2)  # (B, N, C)
    torch.testing.assert_close(robust_vector_pool(xt, pen, dim=1, vector_dim=-1), y)
    assert robust_vector_pool(x, pen, dim=(-2, -1), keepdim=True).shape == (B, C, 1, 1)
    per_sample = torch.stack(
        [robust_vector_pool(x[b : b + 1], pen, dim=(-2, -1))[0] for b in range(B)]
    )
    torch.testing.assert_close(y, per_sample)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(0, C, N), (B, 0, N), (0, 0, N)])
def test_empty_batch_or_empty_vectors_give_an_empty_result(name, shape):
    # No sets, or points in R^0: an empty (B, C) result and an empty gradient, not a
    # reshape failure.
    x = torch.zeros(*shape, dtype=F64, requires_grad=True)
    y = robust_vector_pool(x, make(name))
    assert y.shape == shape[:2]
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == shape


def test_module_and_learnable_alpha():
    alpha = torch.nn.Parameter(torch.tensor(0.8, dtype=F64))
    pool = RobustVectorPool(Welsch(alpha))
    assert list(pool.parameters()) == [alpha]
    pool(rand(B, C, N)).sum().backward()
    assert alpha.grad is not None and torch.isfinite(alpha.grad)
    assert "vector_dim=1" in repr(pool)


def test_nan_confined_and_errors():
    x = rand(B, C, N, seed=7)
    x[1, 0, 2] = math.nan
    x.requires_grad_()
    y = robust_vector_pool(x, "pseudo_huber")
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()
    y[0].sum().backward()
    assert torch.isfinite(x.grad[0]).all()
    with pytest.raises(ValueError, match="vector_dim=1 is also a pooled dim"):
        robust_vector_pool(rand(B, C, N), "huber", dim=1)
    with pytest.raises(ValueError, match=r"vector_dim=5 is out of range"):
        robust_vector_pool(rand(B, C, N), "huber", vector_dim=5)
    with pytest.raises(ValueError, match="pooled set is empty"):
        robust_vector_pool(torch.zeros(B, C, 0), "huber")


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("generic", [False, True], ids=["builtin", "user"])
def test_a_flat_direction_is_reported_singular_after_scaling(dtype, generic):
    # Two equal clusters farther apart than Huber's α: every point of the segment between
    # them is a minimiser, so H is singular along it. Rounding leaves a pivot of ~1e-16
    # relative (LU "succeeds"); judged after scaling, it is singular: a warning and the
    # pseudo-inverse instead of a gradient of size 1/eps.
    cls = type("UserHuber", (Huber,), {}) if generic else Huber
    x = torch.cat([torch.zeros(1, 3, 4), torch.ones(1, 3, 4)], -1).to(dtype).requires_grad_()
    with pytest.warns(DeclarativeWarning, match="singular for 1 output"):
        y = robust_vector_pool(x, cls(0.5))
        y.sum().backward()
    torch.testing.assert_close(y.detach(), torch.full((1, 3), 0.5, dtype=dtype))
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() <= 1.0


@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch", "truncated_quadratic"])
def test_fused_path_reaches_the_generic_paths_objective(name):
    # The built-in penalty (scaled frame, fused kernels, guarded Newton) against the same
    # class as a user's subclass (the generic solver in the data's coordinates).
    cls = type(as_penalty(name))
    user = type(f"User{cls.__name__}", (cls,), {})
    gen = torch.Generator().manual_seed(11)
    for trial in range(8):
        dtype = (torch.float32, F64)[trial % 2]
        sets, dims, points = 6, 1 + 3 * trial, 20 + 10 * trial
        x = torch.randn(sets, dims, points, generator=gen, dtype=dtype)
        x[..., : points // 3] += 4.0
        alpha = 0.3 + 0.4 * trial
        y_fused = robust_vector_pool(x, cls(alpha))
        y_user = robust_vector_pool(x, user(alpha))
        f_fused = _objective(cls(alpha), x, y_fused)
        f_user = _objective(cls(alpha), x, y_user)
        tol = 1e-5 if dtype == torch.float32 else 1e-11
        assert (f_fused <= f_user + tol * (f_user.abs() + 1)).all()


def _objective(pen, x, y):
    """Σ_i φ(‖y − x_i‖) in float64 for sets ``x (M, C, n)`` and outputs ``y (M, C)``."""
    r = torch.linalg.vector_norm(y.double().unsqueeze(-1) - x.double(), dim=1)
    return pen.phi(r, torch.as_tensor(pen.alpha, dtype=F64)).sum(-1)
