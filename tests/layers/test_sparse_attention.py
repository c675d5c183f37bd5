"""sparsemax / entmax: forward against an independent numpy reference, the closed-form
backward against finite differences and the generic engine, and the α = 1.5 regression
(the backward has no 1/(α − 1) factor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import declnet
from declnet.layers import Entmax, Sparsemax, entmax, sparsemax

DOUBLE = torch.float64
ALPHAS = [1.0, 1.25, 1.5, 2.0, 3.0]


def reference(z: np.ndarray, alpha: float) -> np.ndarray:
    """α-entmax of each row by 200 bisection steps in numpy (independent of the layer)."""
    if alpha == 1.0:
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    u = (alpha - 1.0) * z
    lo = u.max(-1, keepdims=True) - 1.0
    hi = u.max(-1, keepdims=True)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        mass = (np.clip(u - mid, 0.0, None) ** (1.0 / (alpha - 1.0))).sum(-1, keepdims=True)
        lo, hi = np.where(mass >= 1.0, mid, lo), np.where(mass >= 1.0, hi, mid)
    return np.clip(u - 0.5 * (lo + hi), 0.0, None) ** (1.0 / (alpha - 1.0))


def scores(shape=(4, 7), seed=0, dtype=DOUBLE):
    return 2.0 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("alpha", ALPHAS, ids=str)
def test_forward_matches_reference(alpha):
    z = scores(seed=int(alpha * 10))
    p = entmax(z, alpha)
    torch.testing.assert_close(p, torch.from_numpy(reference(z.numpy(), alpha)), atol=1e-9, rtol=0)
    torch.testing.assert_close(p.sum(-1), torch.ones(4, dtype=DOUBLE))
    if alpha > 1.0:
        assert bool((p == 0).any())  # sparse


def test_sparsemax_is_entmax_2_and_the_simplex_projection():
    z = scores((3, 2, 6), seed=1)
    p = sparsemax(z, dim=1)
    torch.testing.assert_close(p, entmax(z, 2.0, dim=1))
    torch.testing.assert_close(p, declnet.project_onto_simplex(z, dim=1))
    torch.testing.assert_close(sparsemax(torch.tensor([1.0, 0.2, -1.0])),
                               torch.tensor([0.9, 0.1, 0.0]))


@pytest.mark.parametrize("alpha", ALPHAS, ids=str)
def test_gradcheck(alpha):
    z = scores((3, 6), seed=2 + int(alpha * 10)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: entmax(t, alpha), (z,))


@pytest.mark.parametrize("alpha", [1.5, 2.0], ids=str)
def test_gradgradcheck(alpha):
    z = scores((2, 5), seed=3).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda t: entmax(t, alpha), (z,))


def test_entmax15_regression_no_inverse_alpha_minus_one_factor():
    # A backward scaled by 1/(α − 1) (= 2 at α = 1.5) fails finite differences by 2×.
    z = (0.3 * scores((1, 6), seed=4)).requires_grad_(True)
    v = torch.randn(1, 6, dtype=DOUBLE)
    (g,) = torch.autograd.grad(entmax(z, 1.5), z, v)
    eps = 1e-6
    d = torch.randn(1, 6, dtype=DOUBLE)
    with torch.no_grad():
        fd = ((entmax(z + eps * d, 1.5) - entmax(z - eps * d, 1.5)) * v).sum() / (2 * eps)
    torch.testing.assert_close((g * d).sum(), fd, rtol=1e-6, atol=1e-9)
    assert bool((entmax(z, 1.5) > 0).sum() > 1)
    assert not torch.isclose((2.0 * g * d).sum(), fd, rtol=1e-2)


class SparsemaxNode(declnet.InequalityConstrainedNode):
    """p = argmin ½‖p − z‖² s.t. p ≥ 0, Σ p = 1, solved by the layer."""

    def objective(self, z, *, y):
        return 0.5 * (y - z).pow(2).sum(-1)

    def inequality_constraints(self, z, *, y):
        return -y

    def equality_constraints(self, z, *, y):
        return y.sum(-1, keepdim=True) - 1.0

    def solve(self, z):
        return sparsemax(z)


def test_sparsemax_gradient_matches_generic_engine():
    z = scores((3, 6), seed=5)
    v = torch.randn(3, 6, dtype=DOUBLE)
    grads = []
    for fn in (sparsemax, SparsemaxNode()):
        zz = z.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(fn(zz), zz, v)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-9)


def test_modules_and_float32():
    z = scores((2, 3, 5), seed=6, dtype=torch.float32)
    torch.testing.assert_close(Entmax(1.5, dim=1)(z), entmax(z, 1.5, dim=1))
    torch.testing.assert_close(Sparsemax(dim=0)(z), sparsemax(z, 0))
    p = entmax(z, 1.7, dim=-1)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3), atol=1e-6, rtol=0)
    assert "alpha=1.5" in repr(Entmax())


def test_bad_inputs():
    with pytest.raises(ValueError, match="alpha must be"):
        entmax(scores(), alpha=0.5)
    with pytest.raises(TypeError, match="floating-point"):
        sparsemax(torch.arange(3))
    with pytest.raises(ValueError, match="out of range"):
        sparsemax(scores(), dim=2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.3], ids=str)
def test_cuda_matches_cpu(alpha):
    z = scores(seed=7)
    torch.testing.assert_close(entmax(z.cuda(), alpha).cpu(), entmax(z, alpha))
