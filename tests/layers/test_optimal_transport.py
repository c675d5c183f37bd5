"""optimal_transport: forward against an independent numpy Sinkhorn, the structured
backward against finite differences, dense autograd through an unrolled solver and the
generic engine (γ = 1); regressions: per-sample marginals with B > 1 (the stopping test
fires) and γ = 10 with P spanning 1e-29…0.2 (against finite differences in float64 only:
the generic engine is inaccurate at that scale)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import declnet
from declnet.layers import OptimalTransport, optimal_transport

DOUBLE = torch.float64


def marginals(bsz, size, gen):
    x = 0.2 + torch.rand(bsz, size, generator=gen, dtype=DOUBLE)
    return x / x.sum(-1, keepdim=True)


def numpy_sinkhorn(m, r, c, gamma, iters=1000):
    k = np.exp(-gamma * m)
    u = np.ones_like(r)
    for _ in range(iters):
        v = c / (k.T @ u)
        u = r / (k @ v)
    return u[:, None] * k * v[None, :]


def test_forward_matches_numpy_sinkhorn_per_sample():
    gen = torch.Generator().manual_seed(0)
    m = torch.rand(3, 5, 4, generator=gen, dtype=DOUBLE)
    r, c = marginals(3, 5, gen), marginals(3, 4, gen)
    p = optimal_transport(m, r, c, gamma=2.0)
    for b in range(3):
        ref = numpy_sinkhorn(m[b].numpy(), r[b].numpy(), c[b].numpy(), 2.0)
        np.testing.assert_allclose(p[b].numpy(), ref, atol=1e-12)


def test_regression_per_sample_marginals_batch_stops_early():
    # The stopping test compares each sample with its own marginals: it fires long
    # before the cap (max_iter is small here; reaching it would warn).
    gen = torch.Generator().manual_seed(1)
    m = torch.rand(4, 6, 7, generator=gen, dtype=DOUBLE)
    r, c = marginals(4, 6, gen), marginals(4, 7, gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = optimal_transport(m, r, c, gamma=1.0, max_iter=200)
    torch.testing.assert_close(p.sum(-1), r, atol=1e-10, rtol=0)
    torch.testing.assert_close(p.sum(-2), c, atol=1e-10, rtol=0)
    with pytest.warns(declnet.DeclarativeWarning, match="max_iter"):
        optimal_transport(m, r, c, gamma=30.0, max_iter=10)


def test_default_marginals_are_uniform_and_float32():
    m = torch.rand(2, 3, 5, 6)
    p = optimal_transport(m, gamma=3.0)
    assert p.shape == (2, 3, 5, 6) and p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.full((2, 3, 5), 1 / 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.sum(-2), torch.full((2, 3, 6), 1 / 6), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(5, 4), (4, 6)], ids=["tall", "wide"])
def test_gradcheck_cost_marginals_gamma(shape):
    gen = torch.Generator().manual_seed(2)
    m = torch.rand(2, *shape, generator=gen, dtype=DOUBLE).requires_grad_(True)
    lr = torch.randn(2, shape[0], generator=gen, dtype=DOUBLE).requires_grad_(True)
    lc = torch.randn(2, shape[1], generator=gen, dtype=DOUBLE).requires_grad_(True)
    gamma = torch.tensor([1.0, 2.5], dtype=DOUBLE, requires_grad=True)

    def fn(m, lr, lc, gamma):  # marginals on the simplex through softmax
        return optimal_transport(m, lr.softmax(-1), lc.softmax(-1), gamma)

    assert torch.autograd.gradcheck(fn, (m, lr, lc, gamma))


def test_regression_gamma_10_plan_spanning_many_decades():
    gen = torch.Generator().manual_seed(3)
    m = (6.0 * torch.rand(2, 5, 4, generator=gen, dtype=DOUBLE)).requires_grad_(True)
    p = optimal_transport(m, gamma=10.0)
    assert p.min() < 1e-25 and p.max() > 0.1  # P spans 2e-29…0.2
    fn = lambda t: optimal_transport(t, gamma=10.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (m,), fast_mode=True)


def test_gradients_match_unrolled_sinkhorn_autograd():
    gen = torch.Generator().manual_seed(4)
    m = torch.rand(2, 5, 6, generator=gen, dtype=DOUBLE)
    v = torch.randn(2, 5, 6, generator=gen, dtype=DOUBLE)
    mine = m.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(optimal_transport(mine, gamma=1.5), mine, v)
    theirs = m.clone().requires_grad_(True)
    log_k = -1.5 * theirs
    a = torch.zeros(2, 5, dtype=DOUBLE)
    b = torch.zeros(2, 6, dtype=DOUBLE)
    for _ in range(300):
        a = np.log(1 / 5) - torch.logsumexp(log_k + b.unsqueeze(1), -1)
        b = np.log(1 / 6) - torch.logsumexp(log_k + a.unsqueeze(2), -2)
    (g2,) = torch.autograd.grad(torch.exp(log_k + a.unsqueeze(2) + b.unsqueeze(1)), theirs, v)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)


class TransportNode(declnet.EqualityConstrainedNode):
    """P (flattened) = argmin ⟨P, M⟩ + (1/γ) Σ P(log P − 1) s.t. P1 = r, (Pᵀ1)[:-1] = c[:-1]
    (one column constraint dropped: it is implied by the others)."""

    def __init__(self, m: int, n: int, gamma: float) -> None:
        super().__init__()
        self.m, self.n, self.gamma = m, n, gamma

    def objective(self, cost, r, c, *, y):
        return (y * cost).sum(-1) + (y * (y.log() - 1.0)).sum(-1) / self.gamma

    def equality_constraints(self, cost, r, c, *, y):
        p = y.reshape(-1, self.m, self.n)
        return torch.cat([p.sum(-1) - r, (p.sum(-2) - c)[:, :-1]], dim=-1)

    def solve(self, cost, r, c):
        p = optimal_transport(cost.reshape(-1, self.m, self.n), r, c, self.gamma)
        return p.reshape(-1, self.m * self.n)


def test_gradients_match_generic_engine():
    gen = torch.Generator().manual_seed(5)
    m, n = 4, 3
    cost = torch.rand(2, m, n, generator=gen, dtype=DOUBLE)
    r, c = marginals(2, m, gen), marginals(2, n, gen)
    v = torch.randn(2, m, n, generator=gen, dtype=DOUBLE)
    ours = [t.clone().requires_grad_(True) for t in (cost, r, c)]
    g_ours = torch.autograd.grad(optimal_transport(*ours, gamma=1.0), ours, v)
    theirs = [t.clone().requires_grad_(True) for t in (cost.reshape(2, -1), r, c)]
    y = TransportNode(m, n, 1.0)(*theirs)
    g_eng = torch.autograd.grad(y, theirs, v.reshape(2, -1))
    torch.testing.assert_close(g_ours[0], g_eng[0].reshape(2, m, n), rtol=1e-7, atol=1e-9)
    # Same marginal gradients up to the gauge (u + t, w − t); the engine's has w_n = 0.
    shift = g_ours[2][:, -1:]
    torch.testing.assert_close(g_ours[1] + shift, g_eng[1], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(g_ours[2] - shift, g_eng[2], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(g_ours[1].sum(-1), g_ours[2].sum(-1))  # balanced gauge


def test_module_with_learnable_gamma():
    layer = OptimalTransport(gamma=2.0, learnable=True).double()
    m = torch.rand(3, 4, 4, dtype=DOUBLE)
    p = layer(m)
    torch.testing.assert_close(p, optimal_transport(m, gamma=2.0))
    (p * m).sum().backward()
    assert layer.gamma.grad is not None and "gamma=2" in repr(layer)


def test_bad_inputs():
    m = torch.rand(2, 3, 4, dtype=DOUBLE)
    r = torch.full((2, 3), 1 / 3, dtype=DOUBLE)
    with pytest.raises(ValueError, match="infeasible marginals"):
        optimal_transport(m, r, torch.full((2, 4), 0.5, dtype=DOUBLE))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\)"):
        optimal_transport(m, r, r)
    with pytest.raises(ValueError, match="> 0"):
        optimal_transport(m, r - 1 / 3)
    with pytest.raises(ValueError, match="> 0"):
        optimal_transport(m, gamma=0.0)
    with pytest.raises(ValueError, match="do not broadcast"):
        optimal_transport(m, torch.full((3, 3), 1 / 3, dtype=DOUBLE))
    with pytest.raises(TypeError, match="floating-point"):
        optimal_transport(torch.ones(3, 3, dtype=torch.long))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    m = torch.rand(3, 6, 5, dtype=DOUBLE, requires_grad=True)
    mc = m.detach().cuda().requires_grad_(True)
    p, pc = optimal_transport(m, gamma=4.0), optimal_transport(mc, gamma=4.0)
    torch.testing.assert_close(pc.cpu(), p)
    v = torch.randn_like(p)
    (g,) = torch.autograd.grad(p, m, v)
    (gc,) = torch.autograd.grad(pc, mc, v.cuda())
    torch.testing.assert_close(gc.cpu(), g)


def test_gamma_10_layer_equals_the_generic_engine():
    """At γ = 10 (plan down to ~1e-25) the structured backward equals the generic engine,
    which equilibrates the KKT system (it was ~100% wrong before)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _problems import EntropicTransport

    gen = torch.Generator().manual_seed(3)
    M = (torch.rand(2, 5, 7, generator=gen, dtype=torch.float64) * 3.0)
    r = torch.softmax(torch.randn(2, 5, generator=gen, dtype=torch.float64), -1)
    c = torch.softmax(torch.randn(2, 7, generator=gen, dtype=torch.float64), -1)
    v = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    Mg = M.clone().requires_grad_(True)
    P = declnet.optimal_transport(Mg, r, c, gamma=10.0, tol=1e-13, max_iter=20000)
    assert P.detach().min() < 1e-17  # entries across ~17 orders of magnitude
    (g_layer,) = torch.autograd.grad(P, Mg, v)
    Me = M.clone().requires_grad_(True)
    (g_engine,) = torch.autograd.grad(EntropicTransport(10.0)(Me, r, c), Me, v)
    torch.testing.assert_close(g_layer, g_engine, atol=1e-8 * g_engine.abs().max().item(),
                               rtol=1e-6)
