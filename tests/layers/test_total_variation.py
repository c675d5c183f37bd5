"""total_variation_1d: forward against an independent reference (the dual bounded least
squares by scipy), the group-averaging backward against finite differences, and the
fused-pieces regression (the backward is not the identity)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import lsq_linear

from declnet.layers import TotalVariation1d, total_variation_1d

DOUBLE = torch.float64


def reference(x: np.ndarray, lam: float) -> np.ndarray:
    """y = x − Dᵀz with z = argmin ½‖x − Dᵀz‖² s.t. |z| <= λ (the dual problem)."""
    n = x.shape[0]
    if lam == 0.0 or n == 1:
        return x.copy()
    d = np.diff(np.eye(n), axis=0)
    z = lsq_linear(d.T, x, bounds=(-lam, lam), method="bvls", tol=1e-14).x
    return x - d.T @ z


@pytest.mark.parametrize("seed", range(6))
def test_forward_matches_dual_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    n = [1, 2, 3, 8, 15, 30][seed]
    x = torch.randn(4, n, generator=gen, dtype=DOUBLE) * [0.3, 1.0, 3.0][seed % 3]
    lam = torch.tensor([0.0, 0.05, 0.5, 4.0], dtype=DOUBLE)
    y = total_variation_1d(x, lam)
    ref = np.stack([reference(x[b].numpy(), float(lam[b])) for b in range(4)])
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-10)


def test_large_weight_gives_the_mean_and_float32():
    x = torch.randn(3, 9, 2, dtype=torch.float32)
    y = total_variation_1d(x, 100.0, dim=1)
    torch.testing.assert_close(y, x.mean(1, keepdim=True).expand_as(x))
    assert y.dtype == torch.float32


def test_gradcheck_x_and_weight():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 10, generator=gen, dtype=DOUBLE).requires_grad_(True)
    lam = torch.tensor([0.2, 0.5, 1.0], dtype=DOUBLE, requires_grad=True)
    assert torch.autograd.gradcheck(total_variation_1d, (x, lam))
    assert torch.autograd.gradgradcheck(lambda a: total_variation_1d(a, lam.detach()), (x,))


def test_regression_fused_pieces_backward_is_not_identity():
    x = torch.tensor([[0.0, 0.1, 0.05, 2.0, 2.1]], dtype=DOUBLE, requires_grad=True)
    y = total_variation_1d(x, 0.3)
    assert torch.unique(y.detach()).numel() == 2  # two fused pieces
    v = torch.tensor([[1.0, 0.0, 0.0, 0.0, 3.0]], dtype=DOUBLE)
    (g,) = torch.autograd.grad(y, x, v)
    torch.testing.assert_close(g, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 1.5, 1.5]], dtype=DOUBLE))
    eps = 1e-6
    with torch.no_grad():
        for i in range(5):
            e = torch.zeros_like(x)
            e[0, i] = eps
            fd = ((total_variation_1d(x + e, 0.3) - total_variation_1d(x - e, 0.3)) * v).sum()
            assert abs(fd.item() / (2 * eps) - g[0, i].item()) < 1e-7


def test_weight_gradient_per_batch_shape_and_module():
    x = torch.randn(2, 3, 6, dtype=DOUBLE)
    lam = torch.full((2, 3), 0.4, dtype=DOUBLE, requires_grad=True)
    total_variation_1d(x, lam).pow(2).sum().backward()
    assert lam.grad.shape == (2, 3)
    layer = TotalVariation1d(0.4).double()
    layer(x).pow(2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, lam.grad.sum())
    assert "weight=0.4" in repr(layer)


def test_bad_inputs():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match=">= 0"):
        total_variation_1d(x, -0.1)
    with pytest.raises(ValueError, match=">= 0"):
        total_variation_1d(x, torch.tensor([0.1, -1.0]))
    with pytest.raises(ValueError, match="does not broadcast"):
        total_variation_1d(x, torch.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        total_variation_1d(torch.arange(5), 0.1)
    with pytest.raises(ValueError, match=">= 0"):
        TotalVariation1d(-1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x = torch.randn(8, 40, dtype=DOUBLE)
    lam = torch.rand(8, dtype=DOUBLE)
    torch.testing.assert_close(total_variation_1d(x.cuda(), lam.cuda()).cpu(),
                               total_variation_1d(x, lam))


def test_torch_scan_matches_numpy_scan():
    # The scan that runs on non-CPU devices, exercised here on CPU tensors.
    from declnet.layers._condat import _NumpyOps, _scan, _TorchOps

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, 25, generator=gen, dtype=DOUBLE)
    lam = torch.tensor([0.0, 0.1, 0.3, 1.0, 3.0], dtype=DOUBLE)
    start_t, value_t = _scan(x, lam, _TorchOps(5, x.device))
    start_n, value_n = _scan(x.numpy(), lam.numpy(), _NumpyOps(5, x.device))
    np.testing.assert_array_equal(start_t.numpy(), start_n)
    np.testing.assert_allclose(value_t.numpy(), value_n, rtol=0, atol=1e-14)
