"""The KKT solves at hostile scales: equilibration, singularity judged after scaling,
entropic transport with plans spanning 1e-25…1, non-regular points, CG that stalls."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import declnet
from _problems import (
    EntropicTransport,
    ScaledQuadratic,
    marginal_jacobian,
    rand,
    transport_vjp_closed_form,
)
from declnet import _kkt
from declnet import testing as dt

F64 = torch.float64


def grad_of(node, xs, v, index=0):
    xs = [x.detach().clone().requires_grad_(i == index) for i, x in enumerate(xs)]
    y = node(*xs)
    (g,) = torch.autograd.grad(y, xs[index], v)
    return g


def no_warnings():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error", declnet.DeclarativeWarning)
    return ctx


@pytest.mark.parametrize("solver", ["auto", "cholesky", "lu"])
def test_float32_diagonal_condition_1e4_is_not_singular(solver):
    """Regression: H = diag(1, 1e-4, 1) in float32 was called singular (gradient 0)."""
    H = torch.diag(torch.tensor([1.0, 1e-4, 1.0]))
    node = ScaledQuadratic(H, backward=declnet.ImplicitBackward(linear_solver=solver))
    x, v = rand(4, 3).float(), rand(4, 3, seed=1).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error", declnet.DeclarativeWarning)
        g = grad_of(node, [x], v)
    torch.testing.assert_close(g, v, atol=1e-6, rtol=1e-5)


def test_float64_scales_1e_minus7_to_1e7():
    """Regression: a = (1e-7, 1, 1, 1e7) gave Dy[0, 0] = 0 instead of 1."""
    H = torch.diag(torch.tensor([1e-7, 1.0, 1.0, 1e7], dtype=F64))
    node = ScaledQuadratic(H)
    x = rand(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", declnet.DeclarativeWarning)
        J = node.jacobian(x)
    torch.testing.assert_close(J, torch.eye(4, dtype=F64).expand(3, 4, 4), atol=1e-12, rtol=1e-8)


@pytest.mark.parametrize(("dtype", "spread", "tol"), [(F64, 1e6, 1e-8), (torch.float32, 1e3, 1e-3)])
def test_condition_from_scaling_is_solved_exactly(dtype, spread, tol):
    """H = D Q D with D spanning `spread` (condition numbers 1e12 and 1e6) and Q well
    conditioned: equilibration recovers Q, so the gradient is exact to the dtype."""
    m = 8
    G = rand(m, m, seed=3)
    Q = torch.eye(m, dtype=F64) + 0.1 * G @ G.T
    D = torch.logspace(0, torch.log10(torch.tensor(spread)).item(), m, dtype=F64)
    H = D[:, None] * Q * D[None, :]
    assert torch.linalg.cond(H) > spread**2 / 10
    node = ScaledQuadratic(H.to(dtype))
    x, v = rand(2, m).to(dtype), rand(2, m, seed=4).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", declnet.DeclarativeWarning)
        g = grad_of(node, [x], v)
    torch.testing.assert_close(g.double(), v.double(), atol=tol * v.abs().max().item(), rtol=tol)


def test_truly_singular_hessian_still_detected_after_scaling():
    node = dt.SingularAlignment(2.0)
    x = rand(2, 4)
    with pytest.warns(declnet.DeclarativeWarning, match="singular"):
        grad_of(node, [x], rand(2, 4, seed=1))


def transport_inputs(B=2, n=5, k=7, seed=0):
    M = rand(B, n, k, seed=seed).abs() * 3.0
    r = torch.softmax(rand(B, n, seed=seed + 1), -1)  # per-sample marginals
    c = torch.softmax(rand(B, k, seed=seed + 2), -1)
    return M, r, c


@pytest.mark.parametrize(("declare", "solver"), [(False, "auto"), (False, "cholesky"),
                                                 (False, "lu"), (True, "auto")])
def test_entropic_transport_gamma_10(declare, solver):
    """Regression: at γ = 10 the plan spans ~1e-25…0.2 and every solver was ~100% wrong
    (declared diagonal Hessian: the Schur complement path)."""
    gamma = 10.0
    M, r, c = transport_inputs()
    node = EntropicTransport(gamma, declare_hessian=declare,
                             backward=declnet.ImplicitBackward(linear_solver=solver))
    P = node.solve(M, r, c)
    assert P.min() < 1e-20  # the hostile regime
    v = rand(*P.shape, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", declnet.DeclarativeWarning)
        g = grad_of(node, [M, r, c], v)
    expected = transport_vjp_closed_form(P, v, gamma)
    torch.testing.assert_close(g, expected, atol=1e-10 * expected.abs().max().item(), rtol=1e-7)


@pytest.mark.parametrize("all_marginals", [False, True])
def test_large_transport_schur_without_forming_the_constraint_jacobian(all_marginals):
    """A 60 × 60 plan (c = 119 or 120 marginals, m = 3600) with the diagonal Hessian
    declared: the Schur complement is assembled block by block through the constraints,
    A (c × m) is never formed, and the gradient equals the structured closed form (with
    all n + k marginals the dependent row is found on the assembled S and dropped)."""

    class Plan(EntropicTransport):
        def equality_constraints(self, M, r, c, *, y):
            if all_marginals:
                return torch.cat([y.sum(-1) - r, y.sum(-2) - c], -1)
            return super().equality_constraints(M, r, c, y=y)

    gamma = 10.0
    M, r, c = transport_inputs(B=2, n=60, k=60, seed=3)
    node = Plan(gamma, declare_hessian=True, give_multipliers=not all_marginals)
    P = node.solve(M, r, c).y if not all_marginals else node.solve(M, r, c)
    v = rand(*P.shape, seed=9)
    formed = []
    original = _kkt.Problem._constraint_jacobian

    def spy(self):
        formed.append(True)
        return original(self)

    with warnings.catch_warnings():
        warnings.simplefilter("error", declnet.DeclarativeWarning)
        _kkt.Problem._constraint_jacobian = spy
        try:
            g = grad_of(node, [M, r, c], v)
        finally:
            _kkt.Problem._constraint_jacobian = original
    assert formed == [] or all_marginals  # dropping a row ranks rows by A's norms
    expected = transport_vjp_closed_form(P, v, gamma)
    torch.testing.assert_close(g, expected, atol=1e-9 * expected.abs().max().item(), rtol=1e-6)


class _SparsePlan(EntropicTransport):
    """Entropic OT declaring its marginals' Jacobian as a sparse COO tensor."""

    def __init__(self, gamma, all_marginals=False, **kwargs):
        super().__init__(gamma, **kwargs)
        self.all_marginals = all_marginals

    def equality_constraints(self, M, r, c, *, y):
        if self.all_marginals:
            return torch.cat([y.sum(-1) - r, y.sum(-2) - c], -1)
        return super().equality_constraints(M, r, c, y=y)

    def constraint_jacobian(self, M, r, c, *, y):
        B, n, k = y.shape
        return marginal_jacobian(B, n, k, self.all_marginals, y.dtype)


@pytest.mark.parametrize("all_marginals", [False, True])
@pytest.mark.parametrize("n", [3, 60])
def test_transport_with_a_sparse_constraint_jacobian(n, all_marginals):
    """A sparse A (two entries per column) with the diagonal Hessian declared: at 60 × 60,
    with the solver's multipliers, the Schur complement comes from A's entries, O(nnz);
    at 3 × 4, or when the multipliers come from least squares (which needs A), A is used
    densified. A is never formed by autograd passes; every case equals the closed form."""
    gamma, k = 10.0, n + 1
    M, r, c = transport_inputs(B=2, n=n, k=k, seed=4)
    node = _SparsePlan(gamma, all_marginals, declare_hessian=True,
                       give_multipliers=not all_marginals)
    P = node.solve(M, r, c) if all_marginals else node.solve(M, r, c).y
    v = rand(*P.shape, seed=10)
    used, dense = [], []
    schur, full = _kkt.Problem.sparse_scaled_schur, _kkt.Problem._constraint_jacobian

    def spy_schur(self, d, **kwargs):
        used.append(True)
        return schur(self, d, **kwargs)

    def spy_full(self):
        dense.append(True)
        return full(self)

    _kkt.Problem.sparse_scaled_schur, _kkt.Problem._constraint_jacobian = spy_schur, spy_full
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", declnet.DeclarativeWarning)
            g = grad_of(node, [M, r, c], v)
    finally:
        _kkt.Problem.sparse_scaled_schur, _kkt.Problem._constraint_jacobian = schur, full
    assert dense == []  # never by autograd passes
    assert bool(used) == (n == 60 and not all_marginals)
    expected = transport_vjp_closed_form(P, v, gamma)
    torch.testing.assert_close(g, expected, atol=1e-9 * expected.abs().max().item(), rtol=1e-6)


def test_sparse_constraint_jacobian_pattern_serves_later_calls():
    """The second backward of a node reuses the index arithmetic of the first (the same
    pattern, other values of M and another batch size after it): each equals the closed
    form."""
    gamma = 10.0
    node = _SparsePlan(gamma, declare_hessian=True, give_multipliers=True)
    for B, seed in ((2, 4), (2, 5), (3, 6)):
        M, r, c = transport_inputs(B=B, n=60, k=61, seed=seed)
        P = node.solve(M, r, c).y
        v = rand(*P.shape, seed=seed + 10)
        g = grad_of(node, [M, r, c], v)
        expected = transport_vjp_closed_form(P, v, gamma)
        torch.testing.assert_close(g, expected, atol=1e-9 * expected.abs().max().item(),
                                   rtol=1e-6)


def test_sparse_constraint_jacobian_in_float32():
    """A float32 plan spanning many orders of magnitude: the Schur complement and the
    sparse products are taken in float64, the gradient agrees with the float64 closed
    form to float32's precision."""
    gamma = 10.0
    M, r, c = transport_inputs(B=2, n=60, k=61, seed=7)
    node = _SparsePlan(gamma, declare_hessian=True, give_multipliers=True)
    sol = node.solve(M, r, c)
    v = rand(*sol.y.shape, seed=17)
    expected = transport_vjp_closed_form(sol.y, v, gamma)
    f32 = [t.float() for t in (M, r, c)]
    sol32 = declnet.Solution(sol.y.float(), multipliers=sol.multipliers.float())
    g = declnet.implicit_vjp(node, *f32, y=sol32.y, grad_y=v.float(), solution=sol32,
                             wrt=[True, False, False])[0]
    assert g.dtype == torch.float32
    err = (g.double() - expected).abs().max() / expected.abs().max()
    assert err < 1e-6  # (float32 sums of S and of the products: 2e-6)


def test_sparse_constraint_jacobian_must_be_coo_in_all_dimensions():
    M, r, c = transport_inputs(B=1, n=3, k=4)
    node = _SparsePlan(10.0, give_multipliers=True)
    P = node.solve(M, r, c).y
    A = marginal_jacobian(1, 3, 4)
    A = A.coalesce()
    cases = [(A.to_dense().to_sparse(2), "sparse in all 3 dimensions"),
             (A.to_dense().to_sparse_csr(), "must be a sparse COO tensor"),
             (torch.sparse_coo_tensor(A.indices()[1:], A.values(), A.shape[1:]), "shape")]
    for bad, match in cases:
        node.constraint_jacobian = lambda *xs, y, bad=bad: bad
        with pytest.raises(ValueError, match=match):
            grad_of(node, [M, r, c], torch.ones_like(P))


def test_entropic_transport_matches_finite_differences():
    gamma = 10.0
    M, r, c = transport_inputs(B=1, n=3, k=4)
    node = EntropicTransport(gamma, give_multipliers=True)
    dt.check_gradients(node, M, r, c, wrt=[0], eps=1e-6, atol=1e-6, rtol=1e-5)


def test_transport_with_both_marginal_sets_drops_the_dependent_row():
    """All n + k marginal constraints (one is dependent: Σr = Σc): the engine drops it."""

    class AllMarginals(EntropicTransport):
        def equality_constraints(self, M, r, c, *, y):
            return torch.cat([y.sum(-1) - r, y.sum(-2) - c], -1)

        def solve(self, M, r, c):
            return super().solve(M, r, c)

    gamma = 10.0
    M, r, c = transport_inputs()
    node = AllMarginals(gamma, declare_hessian=True)
    v = rand(*M.shape, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", declnet.DeclarativeWarning)
        g = grad_of(node, [M, r, c], v)
    P = node.solve(M, r, c)
    expected = transport_vjp_closed_form(P, v, gamma)
    torch.testing.assert_close(g, expected, atol=1e-10 * expected.abs().max().item(), rtol=1e-7)


class TangentCircleEllipse(declnet.InequalityConstrainedNode):
    """Projection onto {‖u‖² ≤ 4} ∩ {u₁²/4 + 4u₂² ≤ 1}: at x = (3, 0) both are active and
    tangent at y = (2, 0) (dependent gradients), and the ellipse binds: dy₂/dx₂ = 1/9."""

    def objective(self, x, *, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, *, y):
        circle = (y**2).sum(-1) - 4.0
        ellipse = y[:, 0] ** 2 / 4.0 + 4.0 * y[:, 1] ** 2 - 1.0
        return torch.stack([circle, ellipse], -1)

    def solve(self, x):
        # The ellipse lies inside the circle: project onto it (bisection on μ ≥ 0).
        a2 = torch.tensor([4.0, 0.25], dtype=x.dtype)
        lo = torch.zeros(x.shape[0], 1, dtype=x.dtype)
        hi = torch.full_like(lo, 1e3)
        for _ in range(200):
            mu = 0.5 * (lo + hi)
            y = x * a2 / (a2 + mu)
            outside = (y**2 / a2).sum(-1, keepdim=True) > 1
            lo, hi = torch.where(outside, mu, lo), torch.where(outside, hi, mu)
        return x * a2 / (a2 + 0.5 * (lo + hi))


def test_non_regular_point_drops_the_dependent_constraint():
    """Regression: two tangent active constraints gave dy₂/dx₂ = 0.294; FD give 1/9."""
    node = TangentCircleEllipse()
    x = torch.tensor([[3.0, 0.0]], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", declnet.DeclarativeWarning)
        J = node.jacobian(x)
    torch.testing.assert_close(J[0], torch.diag(torch.tensor([0.0, 1.0 / 9.0], dtype=F64)),
                               atol=1e-7, rtol=1e-6)
    # Finite differences of the solver agree.
    eps = 1e-6
    dy = (node.solve(x + torch.tensor([[0.0, eps]], dtype=F64))
          - node.solve(x - torch.tensor([[0.0, eps]], dtype=F64))) / (2 * eps)
    torch.testing.assert_close(dy[0, 1], torch.tensor(1.0 / 9.0, dtype=F64), atol=1e-6, rtol=1e-5)


def test_non_regular_point_either_order_of_constraints():
    class Swapped(TangentCircleEllipse):
        def inequality_constraints(self, x, *, y):
            return super().inequality_constraints(x, y=y).flip(-1)

    J = Swapped().jacobian(torch.tensor([[3.0, 0.0]], dtype=F64))
    torch.testing.assert_close(J[0, 1, 1], torch.tensor(1.0 / 9.0, dtype=F64), atol=1e-7,
                               rtol=1e-6)


class IllConditionedSmooth(declnet.DeclarativeNode):
    """``½ Σ aᵢ (uᵢ − xᵢ)² + ¼ Σ uᵢ⁴`` with ``a`` spanning 1e-4…1e4: CG stalls."""

    def __init__(self, m, declare=False, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("a", torch.logspace(-4, 4, m, dtype=F64))
        self.declare = declare

    def objective(self, x, *, y):
        return 0.5 * (self.a * (y - x) ** 2).sum(-1) + 0.25 * (y**4).sum(-1)

    def solve(self, x):
        y = x.clone()
        for _ in range(60):
            y = y - (self.a * (y - x) + y**3) / (self.a + 3 * y**2)
        return y

    def hessian(self, x, *, y, multipliers):
        if not self.declare:
            return None
        d = self.a + 3 * y**2
        return declnet.MatrixFreeOperator(lambda u: d * u, y.shape[0], y.shape[1],
                                          dtype=y.dtype, diagonal=d)

    def closed_form_vjp(self, x, v):
        y = self.solve(x)
        return v * self.a / (self.a + 3 * y**2)


def test_stalled_cg_falls_back_to_the_dense_solve():
    """Regression: 'auto' returned a CG gradient 2–7% wrong after maxiter."""
    node = IllConditionedSmooth(100, backward=declnet.ImplicitBackward(maxiter=20))
    x, v = rand(3, 100), rand(3, 100, seed=1)
    with pytest.warns(declnet.DeclarativeWarning, match="falling back to the dense solve"):
        g = grad_of(node, [x], v)
    torch.testing.assert_close(g, node.closed_form_vjp(x, v), atol=1e-10, rtol=1e-8)


def test_jacobi_preconditioned_cg_converges_with_a_declared_diagonal():
    node = IllConditionedSmooth(100, declare=True,
                                backward=declnet.ImplicitBackward(linear_solver="cg",
                                                                  maxiter=20))
    x, v = rand(3, 100), rand(3, 100, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", declnet.DeclarativeWarning)
        g = grad_of(node, [x], v)
    torch.testing.assert_close(g, node.closed_form_vjp(x, v), atol=1e-10, rtol=1e-7)


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("declare", [False, True])
@pytest.mark.parametrize("solver", ["auto", "cholesky", "lu"])
def test_regular_kkt_around_a_singular_hessian(declare, solver, given):
    """Regression: the top eigenvector (H = 2(λ₁I − X) singular along y, KKT regular) was
    2.2% wrong by the Schur complement; the KKT residual check now hands it to LU."""
    from _problems import TopEigenvector

    B, n = 64, 10  # the failure depended on the rounding of λ: many samples catch it
    q, _ = torch.linalg.qr(rand(B, n, n, seed=11))
    values = torch.linspace(1.0, float(n), n, dtype=F64)
    X = q @ torch.diag_embed(values.expand(B, n)) @ q.transpose(1, 2)
    v = rand(B, n, seed=12)
    Xg = X.clone().requires_grad_(True)
    top = torch.linalg.eigh(Xg)[1][..., -1]
    (ref,) = torch.autograd.grad(top * torch.sign(top[:, :1].detach()), Xg, v)
    node = TopEigenvector(declare, given,
                          backward=declnet.ImplicitBackward(linear_solver=solver))
    with warnings.catch_warnings():
        warnings.simplefilter("error", declnet.DeclarativeWarning)
        g = grad_of(node, [X], v)
    sym = lambda t: 0.5 * (t + t.transpose(1, 2))  # noqa: E731  (X is symmetric)
    torch.testing.assert_close(sym(g), sym(ref), atol=1e-10, rtol=1e-8)


class SharedHessianQP(declnet.InequalityConstrainedNode):
    """``argmin ½ yᵀQy + pᵀy`` s.t. ``G y ≤ h`` at a solution built with known multipliers;
    ``Q`` ``(n, n)`` is declared once for the batch (a shared Hessian)."""

    def __init__(self, Q, y_star, mu, declare, **kwargs):
        super().__init__(**kwargs)
        self.Q, self.y_star, self.mu, self.declare = Q, y_star, mu, declare

    def objective(self, p, G, h, *, y):
        return 0.5 * (y * (y @ self.Q.T)).sum(-1) + (p * y).sum(-1)

    def inequality_constraints(self, p, G, h, *, y):
        return (G @ y.unsqueeze(-1)).squeeze(-1) - h

    def solve(self, p, G, h):
        return declnet.Solution(self.y_star, multipliers=-self.mu,
                                hessian=self.Q if self.declare else None)


def shared_qp(Q, B=6, q=4, seed=20):
    n = Q.shape[0]
    G = rand(B, q, n, seed=seed)
    y_star = rand(B, n, seed=seed + 1)
    active = torch.arange(q) < q // 2
    mu = torch.where(active, rand(B, q, seed=seed + 2).abs() + 0.1, 0.0)
    h = (G @ y_star.unsqueeze(-1)).squeeze(-1) + torch.where(active, 0.0, 1.0)
    p = -(y_star @ Q.T) - (G.transpose(1, 2) @ mu.unsqueeze(-1)).squeeze(-1)
    return (p, G, h), y_star, mu, active


def kkt_reference(Q, xs, active, v):
    """``v · Dy`` for ``(p, G, h)`` by autograd through a dense solve of the active KKT."""
    p, G, h = (x.clone().requires_grad_(True) for x in xs)
    B, q, n = G.shape
    Ga = G * active.to(F64).unsqueeze(-1)
    K = torch.cat([torch.cat([Q.expand(B, n, n), Ga.transpose(1, 2)], 2),
                   torch.cat([Ga, torch.diag_embed((~active).to(F64).expand(B, q))], 2)], 1)
    rhs = torch.cat([-p, h * active.to(F64)], 1).unsqueeze(-1)
    y = torch.linalg.solve(K, rhs).squeeze(-1)[:, :n]
    return torch.autograd.grad(y, (p, G, h), v)


@pytest.mark.parametrize("kappa", [1e1, 1e10])
def test_shared_hessian_skips_the_residual_check_only_when_well_conditioned(kappa):
    """A shared positive definite Hessian certified well conditioned (an upper bound on
    κ from its factor) is solved without the residual check; an ill-conditioned one (not
    diagonal: scaling cannot help) is checked. Both match a dense KKT solve."""
    n = 6
    U, _ = torch.linalg.qr(rand(n, n, seed=30))
    Q = U @ torch.diag(torch.logspace(0, -math.log10(kappa), n, dtype=F64)) @ U.T
    Q = 0.5 * (Q + Q.T)
    xs, y_star, mu, active = shared_qp(Q, seed=31)
    v = rand(6, n, seed=32)
    ref = kkt_reference(Q, xs, active, v)
    calls = []
    check = _kkt._kkt_residual_ok

    def spy(*args):
        calls.append(True)
        return check(*args)

    node = SharedHessianQP(Q, y_star, mu, True)
    xg = [x.clone().requires_grad_(True) for x in xs]
    _kkt._kkt_residual_ok = spy
    try:
        got = torch.autograd.grad(node(*xg), xg, v)
    finally:
        _kkt._kkt_residual_ok = check
    assert bool(calls) == (kappa > 1e3)
    scale = max(float(r.abs().max()) for r in ref)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-8 * scale, rtol=1e-6)


@pytest.mark.parametrize("singular", [False, True])
def test_hessian_shared_by_the_batch(singular):
    """A declared ``(n, n)`` Hessian is factorised once for the batch when it is positive
    definite; a singular one (positive definite on the null space of the active rows only)
    falls back to the augmented Hessian. Both match a dense KKT solve."""
    n = 5
    L = rand(n, n, seed=21)
    Q = L @ L.T + 0.1 * torch.eye(n, dtype=F64)
    if singular:  # PSD with Q e₀ = 0: the active rows must cover e₀
        Q[0, :] = 0.0
        Q[:, 0] = 0.0
    xs, y_star, mu, active = shared_qp(Q)
    v = rand(6, n, seed=22)
    ref = kkt_reference(Q, xs, active, v)
    grads = {}
    for declare in (True, False):
        node = SharedHessianQP(Q, y_star, mu, declare)
        xg = [x.clone().requires_grad_(True) for x in xs]
        with warnings.catch_warnings():
            warnings.simplefilter("error", declnet.DeclarativeWarning)
            y = node(*xg)
            grads[declare] = torch.autograd.grad(y, xg, v)
    for declare, got in grads.items():
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8, msg=f"declare={declare}")
    if not singular:
        H = Q.unsqueeze(0).expand(6, n, n)
        assert _kkt._shared(H)
        assert _kkt._shared_cholesky(H, xs[1], 1e-12) is not None
    else:
        assert _kkt._shared_cholesky(Q.unsqueeze(0).expand(6, n, n), xs[1], 1e-12) is None
