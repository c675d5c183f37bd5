"""least_squares: forward against numpy, gradients against finite differences, autograd
through torch.linalg.lstsq and the generic engine on the same problem; the QR path on
ill-conditioned problems."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import declnet
from declnet.layers import LeastSquares, least_squares

DOUBLE = torch.float64


def problem(batch=(3,), m=7, n=3, seed=0, dtype=DOUBLE):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, m, n, generator=gen, dtype=dtype)
    b = torch.randn(*batch, m, generator=gen, dtype=dtype)
    w = 0.5 + torch.rand(*batch, m, generator=gen, dtype=dtype)
    return a, b, w


def numpy_reference(a, b, w, ridge, intercept):
    out = []
    for ai, bi, wi, ri in zip(a.numpy(), b.numpy(), w.numpy(), np.broadcast_to(ridge, len(a))):
        if intercept:
            ai = np.hstack([ai, np.ones((ai.shape[0], 1))])
        pen = np.ones(ai.shape[1])
        if intercept:
            pen[-1] = 0.0
        sw = np.sqrt(wi)[:, None]
        big = np.vstack([sw * ai, np.diag(np.sqrt(ri * pen))])
        tgt = np.concatenate([sw[:, 0] * bi, np.zeros(ai.shape[1])])
        out.append(np.linalg.lstsq(big, tgt, rcond=None)[0])
    return np.stack(out)


@pytest.mark.parametrize("intercept", [False, True])
@pytest.mark.parametrize("ridge", [0.0, 0.7])
def test_forward_matches_numpy(intercept, ridge):
    a, b, w = problem(seed=1)
    y = least_squares(a, b, w, ridge, fit_intercept=intercept)
    np.testing.assert_allclose(y.numpy(), numpy_reference(a, b, w, ridge, intercept), atol=1e-12)


def test_float32_batch_dims_and_default_weights():
    a, b, _ = problem(batch=(2, 3), seed=2, dtype=torch.float32)
    y = least_squares(a, b)
    torch.testing.assert_close(y, torch.linalg.lstsq(a, b.unsqueeze(-1)).solution.squeeze(-1),
                               rtol=1e-4, atol=1e-5)
    assert y.shape == (2, 3, 3) and y.dtype == torch.float32


def test_gradcheck_all_inputs():
    a, b, w = problem(batch=(2,), m=6, n=3, seed=3)
    ridge = torch.tensor([0.3, 1.2], dtype=DOUBLE)
    args = [t.requires_grad_(True) for t in (a, b, w, ridge)]
    assert torch.autograd.gradcheck(lambda *t: least_squares(*t, fit_intercept=True), args)
    assert torch.autograd.gradcheck(lambda *t: least_squares(*t), args)


def test_gradients_match_lstsq_autograd():
    a, b, _ = problem(seed=4)
    ours = [t.clone().requires_grad_(True) for t in (a, b)]
    theirs = [t.clone().requires_grad_(True) for t in (a, b)]
    v = torch.randn(3, 3, dtype=DOUBLE)
    (least_squares(*ours) * v).sum().backward()
    sol = torch.linalg.lstsq(theirs[0], theirs[1].unsqueeze(-1)).solution.squeeze(-1)
    (sol * v).sum().backward()
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x.grad, y.grad)


class LeastSquaresNode(declnet.DeclarativeNode):
    def objective(self, a, b, w, ridge, *, y):
        res = (a @ y.unsqueeze(-1)).squeeze(-1) - b
        return (w * res * res).sum(-1) + ridge * (y * y).sum(-1)

    def solve(self, a, b, w, ridge):
        return least_squares(a, b, w, ridge)


def test_gradients_match_generic_engine():
    a, b, w = problem(batch=(2,), seed=5)
    ridge = torch.tensor([0.1, 0.9], dtype=DOUBLE)
    v = torch.randn(2, 3, dtype=DOUBLE)
    grads = []
    for fn in (least_squares, LeastSquaresNode()):
        args = [t.clone().requires_grad_(True) for t in (a, b, w, ridge)]
        grads.append(torch.autograd.grad(fn(*args), args, v))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-9)


def test_ill_conditioned_uses_qr_and_stays_accurate():
    # cond(A) ~ 1e7: the normal equations (cond 1e14) would lose about 14 digits.
    gen = torch.Generator().manual_seed(6)
    u, _ = torch.linalg.qr(torch.randn(30, 4, generator=gen, dtype=DOUBLE))
    vt, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=DOUBLE))
    a = (u * torch.tensor([1.0, 1e-2, 1e-5, 1e-7], dtype=DOUBLE)) @ vt
    y_true = torch.randn(4, generator=gen, dtype=DOUBLE)
    b = a @ y_true
    y = least_squares(a.unsqueeze(0), b.unsqueeze(0))[0]
    assert torch.linalg.vector_norm(y - y_true) < 1e-7
    # Directional derivative against central differences (gradcheck's per-entry
    # differences are too coarse for cond 1e7).
    aa = a.unsqueeze(0).requires_grad_(True)
    bb = b.unsqueeze(0).requires_grad_(True)
    v = torch.randn(1, 4, generator=gen, dtype=DOUBLE)
    da = torch.randn(1, 30, 4, generator=gen, dtype=DOUBLE)
    db = torch.randn(1, 30, generator=gen, dtype=DOUBLE)
    ga, gb = torch.autograd.grad(least_squares(aa, bb), (aa, bb), v)
    eps = 1e-12
    with torch.no_grad():
        plus = least_squares(aa + eps * da, bb + eps * db)
        minus = least_squares(aa - eps * da, bb - eps * db)
        fd = ((plus - minus) * v).sum() / (2 * eps)
    torch.testing.assert_close((ga * da).sum() + (gb * db).sum(), fd, rtol=1e-3, atol=0)


def test_module_with_learnable_ridge():
    a, b, w = problem(seed=7)
    layer = LeastSquares(ridge=0.5, learnable=True).double()
    y = layer(a, b, w)
    torch.testing.assert_close(y, least_squares(a, b, w, 0.5))
    y.sum().backward()
    assert layer.ridge.grad is not None and "ridge=0.5" in repr(layer)


def test_bad_inputs():
    a, b, w = problem()
    with pytest.raises(ValueError, match="m = 7"):
        least_squares(a, b[..., :-1])
    with pytest.raises(ValueError, match=">= 0"):
        least_squares(a, b, -w)
    with pytest.raises(ValueError, match=">= 0"):
        least_squares(a, b, ridge=-1.0)
    with pytest.raises(ValueError, match="no unique solution"):
        least_squares(a[..., :2, :], b[..., :2])  # 2 rows, 3 unknowns, no ridge
    with pytest.raises(ValueError, match="do not broadcast"):
        least_squares(a, b, torch.ones(2, 7, dtype=DOUBLE))
    with pytest.raises(TypeError, match="floating-point"):
        least_squares(a.long(), b)
    # underdetermined, but ridge makes it unique
    assert least_squares(a[..., :2, :], b[..., :2], ridge=0.1).shape == (3, 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    a, b, w = problem(seed=8)
    torch.testing.assert_close(least_squares(a.cuda(), b.cuda(), w.cuda(), 0.2).cpu(),
                               least_squares(a, b, w, 0.2))
