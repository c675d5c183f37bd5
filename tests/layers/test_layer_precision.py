"""Every ready-made layer in float16 and bfloat16, and under ``torch.autocast``.

Half-precision inputs are solved and differentiated in float32 inside; outputs and input
gradients come back in the input's dtype. Under ``torch.autocast("cpu", dtype=bfloat16)``
the layers run with autocast off, so float32 inputs give float32 outputs computed in
float32.
"""

from __future__ import annotations

import pytest
import torch
from _layer_cases import CASES, rand, randn

import declnet.layers as L

HALF = (torch.float16, torch.bfloat16)

# Tolerance, in units of the half dtype's eps, relative to the largest entry of the float32
# result. The float32 reference runs on the same rounded inputs, so the layers that solve
# in float32 differ from it by the final rounding of the result (eps / 2) and by the
# rounding of the half-precision operations the cases apply before the layer (softmax
# marginals, symmetrisation); layers with a closed form (entmax, tridiagonal) compute in
# the half dtype and add a few roundings. Every case is small and well conditioned
# (condition numbers below about 10), and the measured worst case is 3 eps (entmax-1.5,
# float16 gradient): 8 eps leaves a margin without hiding a float16 computation inside a
# solver (that would miss by 100 eps or more in these iterative and factorised solves).
_TOL_EPS = 8.0

def _cotangent(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A fixed incoming gradient, rounded to ``dtype`` (the same values for every run)."""
    return randn(*shape, seed=99).to(dtype)


def _run(
    name: str,
    dtype: torch.dtype,
    work: torch.dtype | None = None,
    autocast: bool = False,
    backward_inside: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Case ``name`` on its inputs rounded to ``dtype`` (then cast to ``work``): the output
    and the inputs' gradients for the cotangent rounded to ``dtype``."""
    fn, args = CASES[name]
    xs = [a.to(dtype) for a in args]
    if work is not None:
        xs = [x.to(work) for x in xs]
    xs = [x.requires_grad_() for x in xs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fn(*xs)
        v = _cotangent(y.shape, dtype).to(y.dtype)
        if backward_inside:
            y.backward(v)
    if not backward_inside:
        y.backward(v)
    grads = [x.grad for x in xs]
    assert all(g is not None for g in grads), name
    return y, grads


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def _amax(t: torch.Tensor) -> float:
    return float(t.detach().abs().max())


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_half_precision_matches_float32(name, dtype):
    y, grads = _run(name, dtype)
    assert y.dtype == dtype
    assert [g.dtype for g in grads] == [dtype] * len(grads)
    y32, grads32 = _run(name, dtype, work=torch.float32)
    eps = torch.finfo(dtype).eps
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    assert _max_err(y, y32) <= _TOL_EPS * eps * _amax(y32), name
    # Gradients relative to the largest gradient entry over all inputs: an input whose
    # gradient is tiny (an inactive constraint's h) is only known to that absolute level.
    scale = max(_amax(g) for g in grads32)
    for g, g32 in zip(grads, grads32):
        assert _max_err(g, g32) <= _TOL_EPS * eps * scale, name


@pytest.mark.parametrize("name", sorted(CASES))
def test_autocast_runs_in_float32(name):
    y, grads = _run(name, torch.float32, autocast=True)
    assert y.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.float32] * len(grads)
    y0, grads0 = _run(name, torch.float32)
    # Autocast is off inside the layers: the same float32 computation (a bfloat16 matmul
    # would show at the 1e-3 level).
    assert _max_err(y, y0) <= 1e-6 * _amax(y0), name
    for g, g0 in zip(grads, grads0):
        assert _max_err(g, g0) <= 1e-6 * _amax(g0) + 1e-30, name


@pytest.mark.parametrize("name", sorted(CASES))
def test_backward_inside_autocast(name):
    # Autograd runs a backward under the caller's autocast state; every layer's backward
    # (matmuls, triangular solves, closed forms) still runs in float32.
    _, grads = _run(name, torch.float32, autocast=True, backward_inside=True)
    _, grads0 = _run(name, torch.float32)
    for g, g0 in zip(grads, grads0):
        assert g.dtype == torch.float32
        assert _max_err(g, g0) <= 1e-6 * _amax(g0) + 1e-30, name


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_inputs_under_autocast(dtype):
    # Half inputs inside an autocast region: solved in float32, returned in their dtype.
    A = randn(5, 6, 3, seed=1).to(dtype).requires_grad_()
    b = randn(5, 6, seed=2).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = L.least_squares(A, b, ridge=0.1)
    y.float().square().sum().backward()
    ref = L.least_squares(A.detach().float(), b.float(), ridge=0.1)
    assert y.dtype == dtype and A.grad.dtype == dtype
    assert _max_err(y, ref) <= _TOL_EPS * torch.finfo(dtype).eps * _amax(ref)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_modules_in_half_precision(dtype):
    # The module forms hold float32 parameters: their gradients stay float32.
    x = randn(4, 8, seed=3).to(dtype).requires_grad_()
    tv = L.TotalVariation1d(0.3)
    y = tv(x)
    y.float().sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert tv.weight.grad is not None and tv.weight.grad.dtype == torch.float32
    ls = L.LeastSquares(ridge=0.2, learnable=True)
    out = ls(randn(3, 6, 2, seed=4).to(dtype), randn(3, 6, seed=5).to(dtype))
    out.float().sum().backward()
    assert out.dtype == dtype and ls.ridge.grad.dtype == torch.float32
    qp = L.QuadraticProgram()
    Q = torch.eye(3, dtype=dtype)
    p = randn(2, 3, seed=6).to(dtype)
    y = qp(Q, p, torch.eye(3, dtype=dtype), 0.5 * torch.ones(3, dtype=dtype))
    expected = torch.minimum(-p.float(), torch.tensor(0.5))  # y = min(−p, h) for Q = G = I
    assert y.dtype == dtype
    assert _max_err(y, expected) <= 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_transport_half_marginals(dtype):
    # Marginals normalised in half precision have masses equal only to their rounding:
    # accepted (and rescaled to a common mass); a real mass difference still raises.
    M = rand(5, 7, seed=7).to(dtype)
    r = torch.softmax(randn(5, seed=8), -1).to(dtype)
    c = torch.softmax(randn(7, seed=9), -1).to(dtype)
    P = L.optimal_transport(M, r, c, gamma=3.0)
    assert P.dtype == dtype
    mass = 0.5 * (r.double().sum() + c.double().sum())
    eps = torch.finfo(dtype).eps
    assert _max_err(P.double().sum(), mass) <= 4 * eps * float(mass)
    with pytest.raises(ValueError, match="infeasible marginals"):
        L.optimal_transport(M, r, 1.1 * c, gamma=3.0)
