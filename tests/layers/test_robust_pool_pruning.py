"""Truncated-quadratic pooling: the pruned enumeration against the full one and brute force."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from declnet.layers import TruncatedQuadratic, robust_pool

F64 = torch.float64
solvers = sys.modules["declnet.layers._pool_solvers"]


def objective64(x, y, alpha):
    """Σ_i min((y − x_i)², α²) / 2 in float64; ``alpha`` a float or ``(M, 1)``."""
    a = torch.as_tensor(alpha, dtype=F64)
    z = y.double().reshape(-1, 1) - x.double()
    return 0.5 * torch.minimum(z * z, a * a).sum(-1)


def brute_force(x, alpha):
    """min over all windows of the sorted rows of the objective at the window mean."""
    s = x.double().sort(-1).values
    n = s.shape[-1]
    means = torch.stack([s[:, i:j].mean(-1) for i in range(n) for j in range(i + 1, n + 1)], -1)
    z = means.unsqueeze(-1) - x.double().unsqueeze(-2)
    return (0.5 * torch.clamp_max(z * z, alpha * alpha)).sum(-1).amin(-1)


def both(x, a):
    """(ok, pruned result, full result) on rows x (M, n) with α ``a`` (0-d or (M, 1))."""
    s = solvers._sorted_rows(x)
    ok, pruned = solvers._truncated_pruned(x, s, a, x)
    full = solvers._solve_truncated_full(x, s, a, x)
    return ok, pruned, full


def data(kind, rows, n, dtype, gen):
    if kind == "gaussian":
        return torch.randn(rows, n, generator=gen, dtype=dtype)
    if kind == "ties":
        return torch.randint(-3, 4, (rows, n), generator=gen).to(dtype)
    if kind == "quantised":
        return (torch.randn(rows, n, generator=gen, dtype=dtype) * 8).round() / 8
    if kind == "all equal":
        return torch.full((rows, n), 0.3, dtype=dtype)
    if kind == "outliers":
        x = torch.randn(rows, n, generator=gen, dtype=dtype)
        far = torch.rand(rows, n, generator=gen) < 0.2
        sign = torch.where(torch.rand(rows, n, generator=gen) < 0.5, -1.0, 1.0).to(dtype)
        return torch.where(far, sign * 1e30, x)
    if kind == "two clusters":
        k = n // 2
        return torch.cat(
            [
                torch.randn(rows, k, generator=gen, dtype=dtype),
                6 + torch.randn(rows, n - k, generator=gen, dtype=dtype),
            ],
            -1,
        )
    if kind == "offset":
        return 1e4 + torch.randn(rows, n, generator=gen, dtype=dtype)
    if kind == "uniform":
        return 20 * torch.rand(rows, n, generator=gen, dtype=dtype)
    raise ValueError(kind)


KINDS = [
    "gaussian",
    "ties",
    "quantised",
    "all equal",
    "outliers",
    "two clusters",
    "offset",
    "uniform",
]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kind", KINDS)
def test_pruned_reaches_the_minimum_of_the_full_enumeration(kind, dtype):
    gen = torch.Generator().manual_seed(1)
    x = data(kind, 64, 300, dtype, gen)
    for alpha in (0.5, 1.0, 3.0):
        a = torch.tensor(alpha, dtype=dtype)
        ok, pruned, full = both(x, a)
        if kind in ("gaussian", "all equal") and alpha >= 1:
            assert bool(ok.all()), kind  # the bounds certify these rows
        if kind == "outliers" and alpha >= 1:
            assert bool(ok.float().mean() > 0.5), kind
        f_p = objective64(x[ok], pruned[0][ok], alpha)
        f_f = objective64(x[ok], full[0][ok], alpha)
        assert (f_p <= f_f * (1 + 1e-6) + 1e-9 * alpha**2).all()
        # The window is consistent: count = #{lo ≤ x ≤ hi} and y its mean.
        y, lo, hi, count = (t[ok] for t in pruned)
        xs = x[ok]
        inside = (xs >= lo) & (xs <= hi)
        torch.testing.assert_close(count.squeeze(-1), inside.sum(-1).to(dtype))
        mean = torch.where(inside, xs, 0).sum(-1) / inside.sum(-1)
        torch.testing.assert_close(y.squeeze(-1), mean)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pruned_equals_brute_force_on_small_sets(n):
    gen = torch.Generator().manual_seed(2)
    x = torch.cat(
        [
            torch.randn(100, n, generator=gen, dtype=F64),
            torch.randint(0, 3, (100, n), generator=gen).to(F64),
        ]
    )
    for alpha in (0.4, 1.0, 2.5):
        ok, pruned, _ = both(x, torch.tensor(alpha, dtype=F64))
        assert bool(ok.any())
        f_p = objective64(x[ok], pruned[0][ok], alpha)
        torch.testing.assert_close(f_p, brute_force(x[ok], alpha), rtol=0, atol=1e-12)


def test_pruned_rows_with_their_own_alpha():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 500, generator=gen)
    a = torch.linspace(0.2, 4.0, 40).reshape(-1, 1)
    ok, pruned, full = both(x, a)
    assert bool(ok[10:].all())  # α ≥ 1.2: certified
    for i in ok.nonzero().squeeze(-1).tolist():
        f_p = objective64(x[i : i + 1], pruned[0][i], float(a[i]))
        f_f = objective64(x[i : i + 1], full[0][i], float(a[i]))
        assert bool(f_p <= f_f * (1 + 1e-6) + 1e-9)


def test_pool_mixes_pruned_fallback_and_nonfinite_rows(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 256, generator=gen)
    x[1, :128] += 8.0  # two equal clusters: the bounds cannot prune, full enumeration
    x[3, 5] = math.nan
    x[4, 7] = math.inf
    x[5] = 1e30
    x[5, :200] = 2.0
    monkeypatch.setattr(solvers, "_PRUNE_BLOCK", 3 * 256)  # blocks of 3 rows
    xg = x.clone().requires_grad_()
    y = robust_pool(xg, TruncatedQuadratic(1.0))
    assert torch.isnan(y[3]) and torch.isnan(y[4])
    keep = torch.tensor([i for i in range(12) if i not in (3, 4)])
    s = solvers._sorted_rows(x[keep])
    full = solvers._solve_truncated_full(x[keep], s, torch.tensor(1.0), x)
    f_y = objective64(x[keep], y[keep].detach(), 1.0)
    f_full = objective64(x[keep], full[0], 1.0)
    assert (f_y <= f_full * (1 + 1e-6) + 1e-9).all()
    assert y[5] == 2.0
    y[keep].sum().backward()
    torch.testing.assert_close(xg.grad[keep].sum(-1), torch.ones(len(keep)))


def test_pooled_value_is_the_global_minimum_on_the_benchmark_shape():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 32, 1024, generator=gen)
    y = robust_pool(x, TruncatedQuadratic(1.0))
    rows = x.reshape(-1, 1024)
    s = solvers._sorted_rows(rows)
    full = solvers._solve_truncated_full(rows, s, torch.tensor(1.0), rows)
    f_y = objective64(rows, y.reshape(-1), 1.0)
    f_full = objective64(rows, full[0], 1.0)
    assert (f_y <= f_full * (1 + 1e-6) + 1e-9).all()
