"""eigenvectors: forward against numpy, the closed-form backward against finite
differences, eigh autograd and the generic engine (k = 1 as an equality-constrained node);
the sign convention and repeated eigenvalues (finite, exact for rotation-invariant losses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import declnet
from declnet.layers import EigenDecomposition, eigenvectors

DOUBLE = torch.float64


def sym(batch=(3,), n=5, seed=0, dtype=DOUBLE):
    s = torch.randn(*batch, n, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return 0.5 * (s + s.mT)


@pytest.mark.parametrize("largest", [True, False])
def test_forward_matches_numpy_up_to_sign(largest):
    x = sym(seed=1)
    y = eigenvectors(x, k=3, largest=largest)
    _, v = np.linalg.eigh(x.numpy())
    if largest:
        v = v[..., ::-1]
    v = v[..., :3]
    dots = np.abs((y.numpy() * v).sum(-2))
    np.testing.assert_allclose(dots, np.ones_like(dots), atol=1e-12)
    torch.testing.assert_close(y.mT @ y, torch.eye(3, dtype=DOUBLE).expand(3, 3, 3))


def test_sign_convention_is_stable():
    x = sym(seed=2)
    y = eigenvectors(x, k=2)
    big = y.abs().argmax(-2, keepdim=True)
    assert bool((y.gather(-2, big) > 0).all())
    q = torch.linalg.qr(torch.randn(5, 5, dtype=DOUBLE))[0]
    y2 = eigenvectors(q @ x @ q.mT, k=2)  # a rotated problem: then rotated back
    torch.testing.assert_close(eigenvectors(x, 2), y)  # deterministic
    dots = (q.mT @ y2 * y).sum(-2).abs()
    torch.testing.assert_close(dots, torch.ones_like(dots))


@pytest.mark.parametrize("largest", [True, False])
def test_gradcheck(largest):
    s = torch.randn(2, 4, 4, dtype=DOUBLE, generator=torch.Generator().manual_seed(3))
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: eigenvectors(0.5 * (t + t.mT), k=2, largest=largest), (s,)
    )


def test_gradients_match_eigh_autograd():
    x = sym(seed=4)
    v = torch.randn(3, 5, 2, dtype=DOUBLE)
    mine = x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(eigenvectors(mine, k=2), mine, v)
    theirs = x.clone().requires_grad_(True)
    _, u = torch.linalg.eigh(theirs)
    u = u.flip(-1)[..., :2]
    big = u.detach().abs().argmax(-2, keepdim=True)
    u = u * torch.sign(u.detach().gather(-2, big))
    (g2,) = torch.autograd.grad(u, theirs, v)
    torch.testing.assert_close(g1, 0.5 * (g2 + g2.mT))


class TopEigenvectorNode(declnet.EqualityConstrainedNode):
    def objective(self, x, *, y):
        return -(y * (x @ y.unsqueeze(-1)).squeeze(-1)).sum(-1)

    def equality_constraints(self, x, *, y):
        return (y * y).sum(-1, keepdim=True) - 1.0

    def solve(self, x):
        return eigenvectors(x, k=1)[..., 0]


def test_top_eigenvector_matches_generic_engine():
    x = sym(seed=5)
    v = torch.randn(3, 5, dtype=DOUBLE)
    mine = x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(eigenvectors(mine, k=1)[..., 0], mine, v)
    theirs = x.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(TopEigenvectorNode()(theirs), theirs, v)
    torch.testing.assert_close(g1, 0.5 * (g2 + g2.mT), rtol=1e-7, atol=1e-9)


def test_repeated_eigenvalues_finite_and_exact_for_the_projector():
    gen = torch.Generator().manual_seed(6)
    q = torch.linalg.qr(torch.randn(4, 4, dtype=DOUBLE, generator=gen))[0]
    x = q @ torch.diag(torch.tensor([3.0, 3.0, 1.0, -2.0], dtype=DOUBLE)) @ q.mT
    x.requires_grad_(True)
    y = eigenvectors(x, k=2)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert bool(torch.isfinite(g).all())
    w = torch.randn(4, 4, dtype=DOUBLE)

    def loss(t):  # rotation-invariant within the repeated eigenspace
        yy = eigenvectors(t, k=2)
        return ((yy @ yy.mT) * w).sum()

    (g,) = torch.autograd.grad(loss(x), x)
    d = torch.randn(4, 4, dtype=DOUBLE)
    d = 0.5 * (d + d.mT)
    eps = 1e-6
    with torch.no_grad():
        fd = (loss(x + eps * d) - loss(x - eps * d)) / (2 * eps)
    torch.testing.assert_close((g * d).sum(), fd, rtol=1e-6, atol=1e-8)


def test_module_and_float32():
    x = sym(seed=7, dtype=torch.float32)
    layer = EigenDecomposition(k=2, largest=False)
    torch.testing.assert_close(layer(x), eigenvectors(x, 2, largest=False))
    assert layer(x).dtype == torch.float32 and "k=2" in repr(layer)


def test_bad_inputs():
    with pytest.raises(ValueError, match="symmetric"):
        eigenvectors(torch.randn(2, 3, 3, dtype=DOUBLE) + torch.eye(3, dtype=DOUBLE))
    with pytest.raises(ValueError, match="square"):
        eigenvectors(torch.randn(3, 4))
    with pytest.raises(ValueError, match="1 <= k <= n"):
        eigenvectors(sym(), k=6)
    with pytest.raises(TypeError, match="floating-point"):
        eigenvectors(torch.eye(3, dtype=torch.long))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x = sym(seed=8)
    torch.testing.assert_close(eigenvectors(x.cuda(), 2).cpu(), eigenvectors(x, 2))
