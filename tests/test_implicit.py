"""The implicit backward engine on the zoo of problems with known gradients.

Each problem is checked four ways where they exist: the implicit gradient, the paper's
closed form, central finite differences of an accurate solve, and unrolled autograd
through an iterative solver; plus batch consistency and every linear solver.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import declnet
from declnet import testing as dt

B, N, M = 2, 3, 5
F64 = torch.float64


def rand(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64)


def vjp(node, xs, v, index=0):
    """Implicit VJP through the autograd function (the path users take)."""
    xs = [x.detach().clone().requires_grad_(i == index) if isinstance(x, torch.Tensor) else x
          for i, x in enumerate(xs)]
    y = node(*xs)
    (g,) = torch.autograd.grad(y, xs[index], v)
    return g


def closed_form_vjp(node, xs, v):
    J = node.closed_form_jacobian(*xs)
    return torch.einsum("bi,bij->bj", v, J)


# (name, factory, inputs, expect_warning)
CASES = [
    ("quadratic", lambda: dt.QuadraticNode(N, M), lambda: [rand(B, N)], False),
    ("polynomial", lambda: dt.PolynomialNode(N, M), lambda: [rand(B, N)], False),
    ("pseudo_huber_regression", lambda: dt.PseudoHuberRegression(),
     lambda: [rand(B, 7, seed=1), rand(B, 7, M, seed=2), 0.5], False),
    ("sphere", lambda: dt.UnitSphereProjection(), lambda: [rand(B, M)], False),
    ("ball_outside", lambda: dt.L2BallProjection(1.0), lambda: [3 * rand(B, M)], False),
    ("ball_inside", lambda: dt.L2BallProjection(100.0), lambda: [rand(B, M)], False),
    ("circle", lambda: dt.CircleLinearObjective(),
     lambda: [torch.tensor([[0.3, -1.0, 2.0], [1.5, 0.2, 0.7]], dtype=F64)], False),
    ("min_kl_simplex", lambda: dt.MinKLOnSimplex(M), lambda: [rand(B, M)], False),
    ("ball_halfspace", lambda: dt.BallHalfspaceProjection(),
     lambda: [torch.tensor([[-0.5, 2.0, 1.0, 0.3, -0.2], [0.4, 0.1, -0.2, 0.3, 0.1]],
                           dtype=F64)], False),
    ("feasibility", lambda: dt.CubicFeasibility(), lambda: [rand(B, M)], False),
    ("feasibility_redundant", lambda: dt.CubicFeasibility(redundant=True),
     lambda: [rand(B, M)], False),
    ("imperative", lambda: dt.ImperativeAsDeclarative(N, M), lambda: [rand(B, N)], False),
    ("singular_hessian", lambda: dt.SingularAlignment(2.0), lambda: [rand(B, 4)], True),
]


def run(case, fn):
    _, _, _, expect_warning = case
    if expect_warning:
        with pytest.warns(declnet.DeclarativeWarning):
            return fn()
    with warnings.catch_warnings():
        warnings.simplefilter("error", declnet.DeclarativeWarning)
        return fn()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_implicit_equals_closed_form(case):
    _, factory, inputs, _ = case
    node, xs = factory(), inputs()
    v = rand(*node.solve(*xs).shape, seed=5)
    g = run(case, lambda: vjp(node, xs, v))
    torch.testing.assert_close(g, closed_form_vjp(node, xs, v), atol=1e-9, rtol=1e-7)


# The singular-Hessian problem has non-isolated solutions: finite differences of its
# solve() measure the solver's choice of y, not Dy, so eq. 38 is checked against the
# closed form only.
ISOLATED = [c for c in CASES if c[0] != "singular_hessian"]


@pytest.mark.parametrize("case", ISOLATED, ids=[c[0] for c in ISOLATED])
def test_implicit_equals_finite_differences(case):
    _, factory, inputs, _ = case
    node, xs = factory(), inputs()
    report = run(case, lambda: dt.check_gradients(node, *xs, raise_exception=False))
    assert report.passed, str(report)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_batched_equals_per_sample(case):
    _, factory, inputs, _ = case
    node, xs = factory(), inputs()
    v = rand(*node.solve(*xs).shape, seed=6)
    batched = run(case, lambda: vjp(node, xs, v))
    for b in range(B):
        xs_b = [x[b:b + 1] if isinstance(x, torch.Tensor) else x for x in xs]
        single = run(case, lambda xs_b=xs_b, b=b: vjp(node, xs_b, v[b:b + 1]))
        torch.testing.assert_close(batched[b:b + 1], single, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("case", [c for c in CASES if not c[3]], ids=[c[0] for c in CASES
                                                                       if not c[3]])
def test_gradcheck(case):
    _, factory, inputs, _ = case
    node, xs = factory(), inputs()
    x = xs[0].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: node(x, *xs[1:]), (x,))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_jacobian_matches_closed_form(case):
    _, factory, inputs, _ = case
    node, xs = factory(), inputs()
    J = run(case, lambda: node.jacobian(*xs))
    J = J[0] if isinstance(J, tuple) else J
    torch.testing.assert_close(J, node.closed_form_jacobian(*xs), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("solver", ["cholesky", "lu", "lstsq", "cg", "minres", "auto"])
@pytest.mark.parametrize("name", ["quadratic", "sphere", "circle", "min_kl_simplex",
                                  "ball_halfspace", "feasibility"])
def test_every_linear_solver_agrees(name, solver):
    case = next(c for c in CASES if c[0] == name)
    _, factory, inputs, _ = case
    node, xs = factory(), inputs()
    node.backward_mode = declnet.ImplicitBackward(linear_solver=solver, rtol=1e-13)
    v = rand(*node.solve(*xs).shape, seed=7)
    g = run(case, lambda: vjp(node, xs, v))
    torch.testing.assert_close(g, closed_form_vjp(node, xs, v), atol=1e-8, rtol=1e-7)


def test_conjugate_gradient_path():
    node = dt.PolynomialNode(N, M, backward=declnet.ImplicitBackward(linear_solver="cg"))
    x, v = rand(B, N), rand(B, M, seed=3)
    torch.testing.assert_close(vjp(node, [x], v), closed_form_vjp(node, [x], v))


def test_matrix_free_chosen_for_large_outputs():
    """m above dense_max_size goes matrix-free and still matches the closed form."""
    node = dt.PolynomialNode(4, 40, backward=declnet.ImplicitBackward(dense_max_size=10))
    x, v = rand(B, 4), rand(B, 40, seed=3)
    torch.testing.assert_close(vjp(node, [x], v), closed_form_vjp(node, [x], v))
    sphere = dt.UnitSphereProjection(backward=declnet.ImplicitBackward(dense_max_size=10))
    x, v = rand(B, 30), rand(B, 30, seed=4)
    torch.testing.assert_close(vjp(sphere, [x], v), closed_form_vjp(sphere, [x], v))


def test_unrolled_equals_implicit():
    x, v = rand(B, N), rand(B, M, seed=8)
    implicit = vjp(dt.PolynomialNode(N, M), [x], v)
    unrolled = vjp(dt.PolynomialNode(N, M, backward=declnet.UnrolledBackward()), [x], v)
    torch.testing.assert_close(implicit, unrolled, atol=1e-10, rtol=1e-8)


def test_pseudo_huber_regression_unrolled_and_inputs_without_grad():
    """Several inputs: only b requires grad; A gets none; alpha is a float."""
    b, A = rand(B, 7, seed=1), rand(B, 7, M, seed=2)
    node = dt.PseudoHuberRegression()
    b1 = b.clone().requires_grad_(True)
    y = node(b1, A, 0.5)
    assert A.grad is None
    v = rand(B, M, seed=9)
    (g,) = torch.autograd.grad(y, b1, v)
    b2 = b.clone().requires_grad_(True)
    unrolled = dt.PseudoHuberRegression(backward=declnet.UnrolledBackward())
    (g_unrolled,) = torch.autograd.grad(unrolled(b2, A, 0.5), b2, v)
    torch.testing.assert_close(g, g_unrolled, atol=1e-9, rtol=1e-7)


def test_gradient_with_respect_to_every_input():
    """Design matrix and targets both differentiated: gradcheck on both."""
    b = rand(B, 4, seed=1).requires_grad_(True)
    A = rand(B, 4, 2, seed=2).requires_grad_(True)
    node = dt.PseudoHuberRegression()
    assert torch.autograd.gradcheck(lambda b, A: node(b, A, 0.7), (b, A))


def test_learnable_parameters_receive_gradients():
    node = dt.QuadraticNode(N, M, learnable=True)
    x = rand(B, N)
    v = rand(B, M, seed=3)
    (node(x) * v).sum().backward()
    W = node.W.detach().clone().requires_grad_(True)
    y_ref = torch.linalg.solve(node.Q, (x @ W.T).T).T
    (g_ref,) = torch.autograd.grad(y_ref, W, v)
    torch.testing.assert_close(node.W.grad, g_ref)


def test_linear_equality_differs_from_unconstrained():
    """The classic bug: a linear-equality node must not return the unconstrained gradient."""
    x, v = rand(B, M), rand(B, M, seed=3)
    g = vjp(dt.MinKLOnSimplex(M), [x], v)
    y = torch.softmax(x, -1)
    unconstrained = v * y
    assert (g - unconstrained).abs().max() > 1e-3
    torch.testing.assert_close(g, y * v - y * (y * v).sum(-1, keepdim=True))


def test_composition_of_two_nodes():
    """Eqs. 28–30: gradients chain through two declarative nodes."""
    inner, outer = dt.PolynomialNode(N, M), dt.QuadraticNode(M, 4, seed=3)
    x = rand(B, N).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: outer(inner(x)), (x,))
    v = rand(B, 4, seed=4)
    (g,) = torch.autograd.grad(outer(inner(x)), x, v)
    J = torch.einsum("bij,bjk->bik", outer.closed_form_jacobian(inner.solve(x.detach())),
                     inner.closed_form_jacobian(x.detach()))
    torch.testing.assert_close(g, torch.einsum("bi,bij->bj", v, J))


def test_singular_hessian_gives_eq38_and_warns():
    node = dt.SingularAlignment(scale=3.0)
    x = rand(B, 4)
    with pytest.warns(declnet.DeclarativeWarning, match="SingularAlignment.*pseudo-inverse"):
        J = node.jacobian(x)
    xh = x / x.norm(dim=-1, keepdim=True)
    expected = 3.0 * (torch.eye(4, dtype=F64) - xh.unsqueeze(-1) * xh.unsqueeze(-2))
    torch.testing.assert_close(J, expected)


def test_damping_regularises_singular_hessian_without_warning():
    node = dt.SingularAlignment(backward=declnet.ImplicitBackward(damping=1e-3))
    x, v = rand(B, 4), rand(B, 4, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", declnet.DeclarativeWarning)
        g = vjp(node, [x], v)
    assert torch.isfinite(g).all()


def test_multipliers_from_solver_are_used():
    """A solver-provided λ (eq. 25's answer) gives the same gradient as recovering it."""

    class SphereWithMultiplier(dt.UnitSphereProjection):
        def solve(self, x):
            n = x.norm(dim=-1, keepdim=True)
            # D_Y f = y − x = λ D_Y h = 2 λ y  ⇒  λ = (1 − ‖x‖) / 2
            return declnet.Solution(x / n, multipliers=(1 - n) / 2)

    x, v = rand(B, M), rand(B, M, seed=3)
    torch.testing.assert_close(vjp(SphereWithMultiplier(), [x], v),
                               vjp(dt.UnitSphereProjection(), [x], v))


def test_active_set_per_sample_mixed():
    """One sample inside the ball, one outside, in the same batch."""
    node = dt.L2BallProjection(1.0)
    x = torch.stack([0.1 * rand(M, seed=1), 4 * rand(M, seed=2)])
    v = rand(B, M, seed=3)
    torch.testing.assert_close(vjp(node, [x], v), closed_form_vjp(node, [x], v))
    torch.testing.assert_close(vjp(node, [x], v)[0], v[0])


def test_optimality_residual_and_check():
    node = dt.UnitSphereProjection()
    x = rand(B, M)
    res = declnet.optimality_residual(node, x)
    assert res.worst() < 1e-12

    class Wrong(dt.UnitSphereProjection):
        def solve(self, x):
            return x / x.norm(dim=-1, keepdim=True) + 0.1

    bad = declnet.optimality_residual(Wrong(), x)
    assert bad.equality.min() > 1e-3
    with pytest.warns(declnet.DeclarativeWarning, match="Wrong.*not optimal"):
        Wrong(check_optimality=True)(x)


def test_dual_residual_flags_wrong_active_set():
    node = dt.L2BallProjection(1.0)
    x = 0.1 * rand(B, M)
    # Claim the ball is active at a point strictly inside: λ would have the wrong sign.
    y = x / x.norm(dim=-1, keepdim=True)
    res = declnet.optimality_residual(node, x, y=y)
    assert res.dual.min() > 0


def test_functional_and_function_apply():
    node = dt.QuadraticNode(N, M)
    x = rand(B, N).requires_grad_(True)
    v = rand(B, M, seed=3)
    g1 = torch.autograd.grad(declnet.declarative(node, x), x, v)[0]
    g2 = torch.autograd.grad(declnet.DeclarativeFunction.apply(node, x), x, v)[0]
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(g1, closed_form_vjp(node, [x.detach()], v))


def test_implicit_vjp_public_function():
    node = dt.UnitSphereProjection()
    x = rand(B, M).requires_grad_(True)
    y = node.solve(x.detach())
    v = rand(B, M, seed=3)
    (g,) = declnet.implicit_vjp(node, x, y=y, grad_y=v)
    torch.testing.assert_close(g, closed_form_vjp(node, [x.detach()], v))
    with pytest.raises(ValueError, match="shape of y"):
        declnet.implicit_vjp(node, x, y=y, grad_y=v[:, :2])
    with pytest.raises(TypeError):
        declnet.implicit_vjp(node, x, y, v)  # y and grad_y are keyword-only


def test_float32_works():
    node = dt.UnitSphereProjection()
    x = rand(B, M).float().requires_grad_(True)
    v = rand(B, M, seed=3).float()
    (g,) = torch.autograd.grad(node(x), x, v)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g.double(), closed_form_vjp(node, [x.detach().double()], v.double()),
                               atol=1e-5, rtol=1e-4)


def test_broken_lu_is_caught_by_the_residual_check(monkeypatch):
    """Regression: batched LU has been seen to return wrong answers silently (some BLAS
    builds, m ≥ 200, 2 threads). The engine checks every dense solve's residual."""
    from declnet import _linalg

    def broken_lu(matrix, rhs, tol=None, scale=None):
        x, ok = torch.linalg.solve(matrix, rhs), torch.ones(matrix.shape[0], dtype=torch.bool)
        x[0] += 1.0  # a silently wrong answer for sample 0
        return x, ok

    monkeypatch.setattr(_linalg, "solve_lu", broken_lu)
    node = dt.CircleLinearObjective(backward=declnet.ImplicitBackward(linear_solver="lu"))
    x = torch.tensor([[0.3, -1.0, 2.0], [1.5, 0.2, 0.7]], dtype=F64)
    v = rand(B, 2, seed=3)
    with pytest.warns(declnet.DeclarativeWarning, match="residual check"):
        g = vjp(node, [x], v)
    torch.testing.assert_close(g, closed_form_vjp(node, [x], v))


@pytest.mark.slow
def test_large_dense_systems_are_correct():
    """m = 300 dense KKT solves (where batched LU has misbehaved) stay correct."""
    node = dt.UnitSphereProjection(backward=declnet.ImplicitBackward(linear_solver="lu",
                                                                     dense_max_size=1000))
    x, v = rand(4, 300), rand(4, 300, seed=3)
    torch.testing.assert_close(vjp(node, [x], v), closed_form_vjp(node, [x], v))


def test_degenerate_active_constraint_is_kept_tight():
    """x exactly on the sphere: the ball constraint is active with λ = 0. Documented
    choice: the constraint is held tight, so the gradient is the sphere's (one-sided)."""
    node = dt.L2BallProjection(1.0)
    x = rand(B, M)
    x = x / x.norm(dim=-1, keepdim=True)
    v = rand(B, M, seed=3)
    g = vjp(node, [x], v)
    torch.testing.assert_close(g, v - x * (x * v).sum(-1, keepdim=True))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solver", ["cholesky", "lu", "lstsq", "cg", "minres"])
def test_cuda_matches_cpu(solver):
    node = dt.UnitSphereProjection(backward=declnet.ImplicitBackward(linear_solver=solver))
    x, v = rand(B, M), rand(B, M, seed=3)
    cpu = vjp(node, [x], v)
    gpu = vjp(node.cuda(), [x.cuda()], v.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu)
