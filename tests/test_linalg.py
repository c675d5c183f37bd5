"""Dense kernels of the engine: finiteness per sample and the one-row Cholesky."""

import math

import torch

from declnet import _linalg


def test_finite_samples_flags_nan_and_inf_per_sample():
    x = torch.ones(4, 3, 2, dtype=torch.float64)
    x[1, 2, 0] = math.nan
    x[2, 0, 1] = -math.inf
    x[3] = 1e308  # large but finite
    assert _linalg.finite_samples(x).tolist() == [True, False, False, True]
    assert _linalg.finite_samples(torch.ones(3, 0, 1)).tolist() == [True] * 3
    assert _linalg.finite_samples(torch.ones(0, 5)).shape == (0,)


def test_one_row_cholesky_solves_at_every_scale_and_flags_non_positive():
    d = torch.tensor([1e-300, 1.0, 1e300, 0.0, -2.0, math.nan, math.inf],
                     dtype=torch.float64)
    f = _linalg.cholesky_factor(d[:, None, None], _linalg.singular_tol(torch.float64))
    assert f.ok.tolist() == [True, True, True, False, False, False, False]
    rhs = torch.tensor([1e-300, 3.0, 1e300, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    x = f.solve(rhs[:, None, None])[:, 0, 0]
    expected = torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(x[:3], expected, rtol=1e-15, atol=0)
    assert torch.isfinite(x).all()  # finite garbage where not ok
