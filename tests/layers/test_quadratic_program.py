"""The quadratic-programming layer: forward against scipy, gradients against finite
differences, shared arguments, degenerate and infeasible problems."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from declnet.layers import QuadraticProgram, QuadraticProgramError, quadratic_program

DT = torch.float64


def random_qp(B=4, m=8, q=12, r=2, seed=0, shared_A=True):
    gen = torch.Generator().manual_seed(seed)
    L = torch.randn(B, m, m, dtype=DT, generator=gen)
    Q = L @ L.transpose(1, 2) / m + 0.1 * torch.eye(m, dtype=DT)
    p = torch.randn(B, m, dtype=DT, generator=gen)
    G = torch.randn(B, q, m, dtype=DT, generator=gen)
    h = torch.rand(B, q, dtype=DT, generator=gen)  # y = 0 is strictly feasible
    A = torch.randn(r, m, dtype=DT, generator=gen)
    b = 0.1 * torch.randn(r, dtype=DT, generator=gen)
    if not shared_A:
        A, b = A.expand(B, r, m).clone(), b.expand(B, r).clone()
    return Q, p, G, h, A, b


def scipy_qp(Q, p, G=None, h=None, A=None, b=None):
    Q, p = Q.numpy(), p.numpy()
    cons = []
    if G is not None:
        G, h = G.numpy(), h.numpy()
        cons.append({"type": "ineq", "fun": lambda u: h - G @ u, "jac": lambda u: -G})
    if A is not None:
        A, b = A.numpy(), b.numpy()
        cons.append({"type": "eq", "fun": lambda u: A @ u - b, "jac": lambda u: A})
    res = minimize(lambda u: 0.5 * u @ Q @ u + p @ u, np.zeros(p.shape[0]),
                   jac=lambda u: Q @ u + p, constraints=cons, method="SLSQP",
                   options={"ftol": 1e-15, "maxiter": 1000})
    assert res.success, res.message
    return res.x


def test_forward_against_scipy_and_active_sets():
    Q, p, G, h, A, b = random_qp()
    layer = QuadraticProgram()
    y = layer(Q, p, G, h, A, b)
    info = layer.info
    assert bool(info["converged"].all()) and info["status"] == ["solved"] * 4
    for i in range(4):
        np.testing.assert_allclose(y[i].numpy(), scipy_qp(Q[i], p[i], G[i], h[i], A, b),
                                   atol=1e-7)
    # KKT: Qy + p + Gᵀz + Aᵀν = 0, z ≥ 0, complementarity
    z, nu = info["z"], info["nu"]
    Gz = (G.transpose(1, 2) @ z.unsqueeze(-1)).squeeze(-1)
    stat = (Q @ y.unsqueeze(-1)).squeeze(-1) + p + Gz + nu @ A
    assert float(stat.abs().max()) < 1e-9
    slack = h - (G @ y.unsqueeze(-1)).squeeze(-1)
    assert float((z * slack).abs().max()) < 1e-9 and bool((z >= 0).all())
    assert bool(((z > 1e-6) == (slack < 1e-6)).all())  # strict complementarity here
    assert int((z > 1e-6).sum()) > 0  # some constraints are active


def test_box_constrained_closed_form_and_shared_arguments():
    p = torch.randn(6, 3, dtype=DT) * 2
    box = torch.cat([torch.eye(3), -torch.eye(3)]).to(DT)
    y = quadratic_program(torch.eye(3, dtype=DT), p, box, torch.ones(6, dtype=DT))
    torch.testing.assert_close(y, (-p).clamp(-1, 1), atol=1e-9, rtol=0)
    # nothing batched: B = 1
    y1 = quadratic_program(torch.eye(2, dtype=DT), torch.tensor([3.0, 0.0], dtype=DT),
                           torch.eye(2, dtype=DT), torch.ones(2, dtype=DT))
    assert y1.shape == (1, 2)


def test_equality_only_and_unconstrained():
    Q, p, _, _, A, b = random_qp()
    y = quadratic_program(Q, p, A=A, b=b)
    K = torch.cat([torch.cat([Q, A.expand(4, -1, -1).transpose(1, 2)], 2),
                   torch.cat([A.expand(4, -1, -1), torch.zeros(4, 2, 2, dtype=DT)], 2)], 1)
    ref = torch.linalg.solve(K, torch.cat([-p, b.expand(4, -1)], 1))[:, :8]
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(quadratic_program(Q, p), torch.linalg.solve(Q, -p))


def _tight_qp(*args):
    # Central differences of an interior-point solution carry its error / eps: solve
    # far below the default tolerance so that they measure the gradient, not the solver.
    return quadratic_program(*args, tol=1e-13, max_iter=200)


def _fd_check(args, eps=1e-5, tol=1e-6):
    args = [t.clone().requires_grad_(True) for t in args]
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(args[1].shape[0] if args[1].dim() == 2 else 1, args[1].shape[-1], dtype=DT,
                    generator=gen)
    (w * _tight_qp(*args)).sum().backward()
    for k, name in enumerate("QpGhAb"):
        t = args[k].detach()
        d = torch.randn(t.shape, dtype=DT, generator=gen)
        if name == "Q":
            d = d + d.transpose(-1, -2)
        plus = [a.detach() for a in args]
        minus = [a.detach() for a in args]
        plus[k], minus[k] = t + eps * d, t - eps * d
        fp, fm = (w * _tight_qp(*plus)).sum(), (w * _tight_qp(*minus)).sum()
        fd = (fp - fm) / (2 * eps)
        an = (args[k].grad * d).sum()
        assert abs(float(fd - an)) <= tol * (1 + abs(float(fd))), (name, float(fd), float(an))


@pytest.mark.parametrize("shared_A", [True, False])
def test_gradients_of_every_argument_against_finite_differences(shared_A):
    _fd_check(random_qp(shared_A=shared_A))


def test_gradients_with_all_arguments_shared():
    Q, p, G, h, A, b = random_qp(B=1)
    _fd_check([Q[0], p, G[0], h[0], A, b])


def test_degenerate_active_constraint_gives_a_finite_one_sided_gradient():
    # the unconstrained minimiser y = (1, 0) lies exactly on y₀ ≤ 1: active with z = 0
    Q = torch.eye(2, dtype=DT)
    p = torch.tensor([[-1.0, 0.0]], dtype=DT, requires_grad=True)
    G = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=DT)
    h = torch.tensor([1.0, 1.0], dtype=DT)  # the second is also weakly active
    y = quadratic_program(Q, p, G, h)
    # degenerate: s and z both tend to 0 like √μ, so y is only √tol accurate
    torch.testing.assert_close(y.detach(), torch.tensor([[1.0, 0.0]], dtype=DT), atol=1e-5,
                               rtol=0)
    y.sum().backward()
    assert bool(torch.isfinite(p.grad).all())


def test_linear_program():
    # min y₀ + y₁ s.t. y ≥ 0, y₀ + 2y₁ ≥ 1 (Q = 0)
    G = torch.tensor([[-1.0, 0.0], [0.0, -1.0], [-1.0, -2.0]], dtype=DT)
    h = torch.tensor([0.0, 0.0, -1.0], dtype=DT)
    y = quadratic_program(torch.zeros(2, 2, dtype=DT), torch.tensor([[1.0, 1.0]], dtype=DT), G, h)
    torch.testing.assert_close(y, torch.tensor([[0.0, 0.5]], dtype=DT), atol=1e-8, rtol=0)


def test_infeasible_and_unbounded_samples_raise_naming_them():
    Q = torch.eye(2, dtype=DT)
    p = torch.zeros(3, 2, dtype=DT)
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=DT)
    h = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0]], dtype=DT)  # sample 1: y₀≤−1, y₀≥1
    with pytest.raises(QuadraticProgramError, match="sample 1: infeasible") as err:
        quadratic_program(Q, p, G, h)
    assert err.value.status == ["solved", "infeasible", "solved"]
    with pytest.raises(QuadraticProgramError, match="infeasible"):  # inconsistent equalities
        quadratic_program(Q, p[:1], A=torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=DT),
                          b=torch.tensor([0.0, 1.0], dtype=DT))
    with pytest.raises(QuadraticProgramError, match="sample 0: unbounded"):
        quadratic_program(torch.zeros(2, 2, dtype=DT), torch.tensor([[-1.0, 0.0]], dtype=DT),
                          -torch.eye(2, dtype=DT), torch.zeros(2, dtype=DT))


def test_bad_shapes_are_clear_errors():
    Q, p, G, h, _, _ = random_qp()
    with pytest.raises(ValueError, match="G, h"):
        quadratic_program(Q, p, G, h[:, :3])
    with pytest.raises(ValueError, match="batch size"):
        quadratic_program(Q, p[:2], G, h)
    with pytest.raises(ValueError, match="together"):
        quadratic_program(Q, p, G)


def test_float32():
    Q, p, G, h, A, b = (t.float() for t in random_qp())
    y = quadratic_program(Q, p, G, h, A, b)
    y64 = quadratic_program(*random_qp())
    # float32 stops at μ ≈ 3e-6: an active constraint with a small multiplier z keeps a
    # slack of about μ/z, so y agrees with float64 to a few 1e-3 only
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y64, atol=5e-3, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_cuda():
    args = [t.cuda() for t in random_qp()]
    y = quadratic_program(*args)
    torch.testing.assert_close(y.cpu(), quadratic_program(*random_qp()))
