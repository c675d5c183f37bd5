"""tridiagonal_solve: forward against a dense solve, gradients against finite differences,
dense autograd and the generic engine on the same problem."""

from __future__ import annotations

import pytest
import torch

import declnet
from declnet.layers import tridiagonal_solve

DOUBLE = torch.float64


METHODS = ["thomas", "cyclic", "dense"]


@pytest.fixture(autouse=True, params=METHODS)
def path(request, monkeypatch):
    """Run every test with each forward method (set as the default of "auto")."""
    from declnet.layers import tridiagonal

    real = tridiagonal._resolve

    def forced(method, numel, n):
        return request.param if method == "auto" else real(method, numel, n)

    monkeypatch.setattr(tridiagonal, "_resolve", forced)
    return request.param


def system(batch=(3,), n=6, seed=0, dtype=DOUBLE):
    gen = torch.Generator().manual_seed(seed)
    lower = torch.randn(*batch, n - 1, generator=gen, dtype=dtype)
    upper = torch.randn(*batch, n - 1, generator=gen, dtype=dtype)
    diag = 4.0 + torch.rand(*batch, n, generator=gen, dtype=dtype)
    rhs = torch.randn(*batch, n, generator=gen, dtype=dtype)
    return lower, diag, upper, rhs


def dense(lower, diag, upper):
    return torch.diag_embed(diag) + torch.diag_embed(upper, 1) + torch.diag_embed(lower, -1)


@pytest.mark.parametrize("dtype", [torch.float32, DOUBLE], ids=str)
def test_forward_matches_dense_solve(dtype):
    lower, diag, upper, rhs = system(batch=(2, 3), n=7, dtype=dtype)
    x = tridiagonal_solve(lower, diag, upper, rhs)
    ref = torch.linalg.solve(dense(lower, diag, upper), rhs)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(x, ref, rtol=tol, atol=tol)
    assert x.dtype == dtype


def test_n_equals_one_and_two():
    for n in (1, 2):
        lower, diag, upper, rhs = system(n=n, seed=n)
        x = tridiagonal_solve(lower, diag, upper, rhs)
        torch.testing.assert_close(x, torch.linalg.solve(dense(lower, diag, upper), rhs))


def test_gradcheck_all_four():
    args = [t.requires_grad_(True) for t in system(batch=(2,), n=5)]
    assert torch.autograd.gradcheck(tridiagonal_solve, args)


def test_gradgradcheck():
    args = [t.requires_grad_(True) for t in system(batch=(2,), n=4, seed=3)]
    assert torch.autograd.gradgradcheck(tridiagonal_solve, args)


def test_gradients_match_dense_autograd_with_broadcasting():
    lower, diag, upper, rhs = system(batch=(3,), n=6, seed=1)
    diag = diag[:1].clone()  # one matrix shared by three right-hand sides
    ours = [t.clone().requires_grad_(True) for t in (lower, diag, upper, rhs)]
    theirs = [t.clone().requires_grad_(True) for t in (lower, diag, upper, rhs)]
    v = torch.randn(3, 6, dtype=DOUBLE)
    (tridiagonal_solve(*ours) * v).sum().backward()
    ref = torch.linalg.solve(dense(theirs[0], theirs[1].expand(3, 6), theirs[2]), theirs[3])
    (ref * v).sum().backward()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad)
    assert ours[1].grad.shape == (1, 6)


class TridiagonalNode(declnet.DeclarativeNode):
    """x = argmin ½‖T x − r‖², solved by the layer."""

    def objective(self, lower, diag, upper, rhs, *, y):
        t = dense(lower, diag, upper)
        return 0.5 * ((t @ y.unsqueeze(-1)).squeeze(-1) - rhs).pow(2).sum(-1)

    def solve(self, lower, diag, upper, rhs):
        return tridiagonal_solve(lower, diag, upper, rhs)


def test_gradients_match_generic_engine():
    lower, diag, upper, rhs = system(batch=(2,), n=5, seed=4)
    v = torch.randn(2, 5, dtype=DOUBLE)
    grads = []
    for fn in (tridiagonal_solve, TridiagonalNode()):
        args = [t.clone().requires_grad_(True) for t in (lower, diag, upper, rhs)]
        y = fn(*args)
        grads.append(torch.autograd.grad(y, args, v))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_bad_inputs_have_clear_errors():
    lower, diag, upper, rhs = system()
    with pytest.raises(ValueError, match="lower must have length 5"):
        tridiagonal_solve(lower[..., :-1], diag, upper, rhs)
    with pytest.raises(ValueError, match="rhs must have length 6"):
        tridiagonal_solve(lower, diag, upper, rhs[..., :-1])
    with pytest.raises(TypeError, match="floating-point"):
        tridiagonal_solve(lower, diag, upper, rhs.long())
    with pytest.raises(ValueError, match="do not broadcast"):
        tridiagonal_solve(lower, diag, upper, torch.randn(2, 6, dtype=DOUBLE))
    with pytest.raises(ValueError, match="convert them"):
        tridiagonal_solve(lower, diag, upper, rhs.float())


def test_zero_pivot_warns():
    diag = torch.zeros(1, 3, dtype=DOUBLE)
    off = torch.ones(1, 2, dtype=DOUBLE)
    with pytest.warns(declnet.DeclarativeWarning, match="singular|zero pivot"):
        tridiagonal_solve(off, diag, off, torch.ones(1, 3, dtype=DOUBLE))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(path):
    args = system(batch=(4,), n=8, seed=5)
    x = tridiagonal_solve(*[t.cuda() for t in args])
    torch.testing.assert_close(x.cpu(), tridiagonal_solve(*args))


@pytest.mark.parametrize("n", [1, 2, 3, 200])
def test_methods_agree_and_auto_dispatch(monkeypatch, n):
    monkeypatch.undo()
    lower, diag, upper, rhs = system(batch=(8,), n=n, seed=6)
    ref = torch.linalg.solve(dense(lower, diag, upper), rhs)
    for method in ["auto", *METHODS]:
        x = tridiagonal_solve(lower, diag, upper, rhs, method=method)
        torch.testing.assert_close(x, ref)
    with pytest.raises(ValueError, match="method must be one of"):
        tridiagonal_solve(lower, diag, upper, rhs, method="lu")


def test_symmetric_positive_definite_not_dominant(monkeypatch):
    # The 1-D Laplacian (plus a tiny shift): SPD, only weakly dominant, cond ~ 1e4.
    n = 100
    off = -torch.ones(2, n - 1, dtype=DOUBLE)
    diag = torch.full((2, n), 2.0 + 1e-6, dtype=DOUBLE)
    rhs = torch.randn(2, n, dtype=DOUBLE)
    ref = torch.linalg.solve(dense(off, diag, off), rhs)
    x = tridiagonal_solve(off, diag, off, rhs)
    assert float((x - ref).norm() / ref.norm()) < 1e-10
