"""Declarative nodes under torch.func transforms: grad, vjp, jacrev, vmap(grad) per-sample
gradients, and forward mode (jvp, jacfwd, forward_ad dual numbers), for every node kind;
second derivatives through nested transforms are clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad as fwAD

import declnet
import declnet._transforms as transforms
from _problems import NODE_KINDS, EntropicTransport, rand
from declnet import testing as dt

F64 = torch.float64


class Shared(declnet.DeclarativeNode):
    """``½‖y − x‖² + ¼ s Σ y⁴`` with a 0-d input ``s`` shared by the batch."""

    def objective(self, x, s, *, y):
        return 0.5 * ((y - x) ** 2).sum(-1) + 0.25 * s * (y**4).sum(-1)

    def initial_guess(self, x, s):
        return torch.zeros_like(x)


NODES = [
    *NODE_KINDS,
    # m = 70 > dense_max_size: the matrix-free (CG) backward and forward solves
    ("matrix_free", lambda: dt.PolynomialNode(3, 70), lambda: rand(2, 3)),
]
IDS = [c[0] for c in NODES]


def _case(case):
    _, make, inputs = case
    return make(), inputs()


def _tol(case):
    """Against the dense Jacobian: the matrix-free solves stop at rtol = sqrt(eps)."""
    return {"rtol": 1e-6, "atol": 1e-7} if case[0] == "matrix_free" else \
        {"rtol": 1e-8, "atol": 1e-10}


def _diagonal(J):
    """``(B, ..., B, ...)`` per-sample blocks of a batched Jacobian, checking that the
    blocks between different samples are exactly zero (samples are independent)."""
    B = J.shape[0]
    k = (J.dim() - 2) // 2 + 1  # dimensions of y
    Jf = J.reshape(B, -1, B, *J.shape[k + 1:]).movedim(2, 1)  # (B, B, m, ...)
    eye = torch.eye(B, dtype=torch.bool)
    assert (Jf[~eye] == 0).all()
    return Jf[eye].reshape(B, *J.shape[1:k], *J.shape[k + 1:])


def _finite_difference(node, xs, dxs, eps=1e-6):
    def solve(scale):
        xp = [x + scale * eps * d if d is not None else x for x, d in zip(xs, dxs)]
        out = node.solve(*xp)
        return out.y if isinstance(out, declnet.Solution) else out

    return (solve(1.0) - solve(-1.0)) / (2 * eps)


def _reference_vjp(node, x, v):
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(node(xr), xr, v)
    return g


# -- reverse mode -------------------------------------------------------------------------


@pytest.mark.parametrize("case", NODES, ids=IDS)
def test_grad_and_vjp_match_autograd(case):
    node, x = _case(case)
    v = rand(*node(x).shape, seed=3)
    expected = _reference_vjp(node, x, v)
    g = torch.func.grad(lambda x: (node(x) * v).sum())(x)
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)
    # vjp_fn runs after torch.func.vjp has returned (its saved tensors are dead wrappers)
    _, vjp_fn = torch.func.vjp(node, x)
    torch.testing.assert_close(vjp_fn(v)[0], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", NODES, ids=IDS)
def test_jacrev_and_jacfwd_match_the_jacobian(case):
    node, x = _case(case)
    J = node.jacobian(x)
    tol = _tol(case)
    torch.testing.assert_close(_diagonal(torch.func.jacrev(node)(x)), J, **tol)
    torch.testing.assert_close(_diagonal(torch.func.jacfwd(node)(x)), J, **tol)


@pytest.mark.parametrize("case", NODES, ids=IDS)
def test_per_sample_gradients_match_a_loop(case):
    node, x = _case(case)
    v = rand(*node(x).shape, seed=4)

    def loss(xi, vi):
        return (node(xi.unsqueeze(0)) * vi).sum()

    g = torch.func.vmap(torch.func.grad(loss))(x, v)
    loop = torch.stack([_reference_vjp(node, x[i:i + 1], v[i:i + 1])[0]
                        for i in range(x.shape[0])])
    torch.testing.assert_close(g, loop, rtol=1e-10, atol=1e-12)


# -- forward mode -------------------------------------------------------------------------


@pytest.mark.parametrize("case", NODES, ids=IDS)
def test_jvp_and_dual_numbers_match_the_jacobian_and_finite_differences(case):
    node, x = _case(case)
    dx = rand(*x.shape, seed=5)
    J = node.jacobian(x)
    expected = (J.reshape(x.shape[0], -1, x[0].numel()) @ dx.reshape(x.shape[0], -1, 1))
    expected = expected.reshape(node(x).shape)
    y, t = torch.func.jvp(node, (x,), (dx,))
    torch.testing.assert_close(t, expected, **_tol(case))
    torch.testing.assert_close(t, _finite_difference(node, [x], [dx]), rtol=1e-6, atol=1e-7)
    with fwAD.dual_level():
        t_dual = fwAD.unpack_dual(node(fwAD.make_dual(x, dx))).tangent
    torch.testing.assert_close(t_dual, t, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(declnet.implicit_jvp(node, x, y=y, tangents=[dx]), t, rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("declare", [False, True], ids=["formed", "declared_diagonal"])
def test_jvp_with_input_dependent_constraints(declare):
    """Entropic transport: the marginals r, c enter the constraints (C ẋ ≠ 0); with the
    declared diagonal Hessian the solve goes through the Schur complement."""
    gamma = 1.0
    M = rand(2, 3, 4).abs()
    r = torch.softmax(rand(2, 3, seed=1), -1)
    c = torch.softmax(rand(2, 4, seed=2), -1)
    node = EntropicTransport(gamma, declare_hessian=declare)
    dM, dr, dc = rand(2, 3, 4, seed=3), rand(2, 3, seed=4), rand(2, 4, seed=5)
    JM, Jr, Jc = node.jacobian(M, r, c)
    expected = (torch.einsum("bijkl,bkl->bij", JM, dM) + torch.einsum("bijk,bk->bij", Jr, dr)
                + torch.einsum("bijk,bk->bij", Jc, dc))
    _, t = torch.func.jvp(node, (M, r, c), (dM, dr, dc))
    torch.testing.assert_close(t, expected, rtol=1e-8, atol=1e-10)


# -- parameters, shared inputs, non-tensor inputs -----------------------------------------


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=F64)
        self.node = dt.QuadraticNode(3, 4, learnable=True)
        self.ball = dt.L2BallProjection(1.0)

    def forward(self, x):
        return self.ball(self.node(torch.tanh(self.lin(x))))


def _model():
    torch.manual_seed(0)
    return Model()


def test_per_sample_parameter_gradients_with_functional_call():
    model = _model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    X, T = 3 * rand(5, 3, seed=1), rand(5, 4, seed=2)

    def loss(p, x, t):
        y = torch.func.functional_call(model, p, (x.unsqueeze(0),))
        return ((y[0] - t) ** 2).sum()

    g = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, X, T)
    for i in range(X.shape[0]):
        model.zero_grad()
        ((model(X[i:i + 1])[0] - T[i]) ** 2).sum().backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(g[k][i], p.grad, rtol=1e-9, atol=1e-12)


def test_parameter_gradients_and_tangents():
    model = _model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    X = 3 * rand(4, 3, seed=1)
    v = rand(4, 4, seed=2)
    model.zero_grad()
    model(X).backward(v)
    expected = {k: p.grad for k, p in model.named_parameters()}

    def run(p):
        return torch.func.functional_call(model, p, (X,))

    g = torch.func.grad(lambda p: (run(p) * v).sum())(params)
    _, vjp_fn = torch.func.vjp(run, params)
    gv = vjp_fn(v)[0]
    for k in expected:
        torch.testing.assert_close(g[k], expected[k], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gv[k], expected[k], rtol=1e-10, atol=1e-12)

    tangents = {k: rand(*p.shape, seed=7) for k, p in params.items()}
    _, t = torch.func.jvp(run, (params,), (tangents,))
    eps = 1e-6
    with torch.no_grad():
        fd = (run({k: p + eps * tangents[k] for k, p in params.items()})
              - run({k: p - eps * tangents[k] for k, p in params.items()})) / (2 * eps)
    torch.testing.assert_close(t, fd, rtol=1e-6, atol=1e-8)
    with fwAD.dual_level():
        dual = {k: fwAD.make_dual(p, tangents[k]) for k, p in params.items()}
        t_dual = fwAD.unpack_dual(run(dual)).tangent
    torch.testing.assert_close(t_dual, t, rtol=1e-12, atol=1e-14)

    # vmap over jvp with per-sample parameter tangents
    def per(x, tg):
        return torch.func.jvp(lambda p: torch.func.functional_call(model, p, (x[None],))[0],
                              (params,), (tg,))[1]

    stacked = {k: rand(4, *p.shape, seed=8) for k, p in params.items()}
    tv = torch.func.vmap(per)(X, stacked)
    loop = torch.stack([per(X[i], {k: s[i] for k, s in stacked.items()}) for i in range(4)])
    torch.testing.assert_close(tv, loop, rtol=1e-10, atol=1e-12)


def test_buffers_passed_to_functional_call_are_differentiated():
    """A buffer given to functional_call under grad/jvp gets its derivative (never a silent
    zero); plain autograd differentiates a buffer that requires grad (first order)."""
    node = dt.QuadraticNode(3, 4)  # W and Q are buffers
    x = rand(3, 3)
    W = node.W.clone()

    def closed_form(W):
        return torch.linalg.solve(node.Q, (x @ W.T).T).T

    def run(W, x=x):
        return torch.func.functional_call(node, {"W": W}, (x,))

    Wr = W.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(closed_form(Wr).pow(2).sum(), Wr)
    torch.testing.assert_close(torch.func.grad(lambda W: run(W).pow(2).sum())(W), expected)
    dW = rand(*W.shape, seed=1)
    _, t = torch.func.jvp(run, (W,), (dW,))
    torch.testing.assert_close(t, torch.func.jvp(closed_form, (W,), (dW,))[1])
    ps = torch.func.vmap(torch.func.grad(lambda W, xi: run(W, xi[None]).pow(2).sum()),
                         in_dims=(None, 0))(W, x)
    loop = torch.stack([torch.autograd.grad(
        torch.linalg.solve(node.Q, (x[i:i + 1] @ Wr.T).T).T.pow(2).sum(), Wr)[0]
        for i in range(3)])
    torch.testing.assert_close(ps, loop)
    node.W.requires_grad_(True)
    (g,) = torch.autograd.grad(node(x).pow(2).sum(), node.W)
    torch.testing.assert_close(g, expected)
    with pytest.raises(RuntimeError, match="buffers"):
        torch.autograd.grad(node(x).pow(2).sum(), node.W, create_graph=True)


def test_shared_0d_input():
    node = Shared()
    x, s = rand(3, 4), torch.tensor(0.7, dtype=F64)
    xr, sr = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
    gx_ref, gs_ref = torch.autograd.grad(node(xr, sr).pow(2).sum(), (xr, sr))
    gx, gs = torch.func.grad(lambda x, s: node(x, s).pow(2).sum(), argnums=(0, 1))(x, s)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gs, gs_ref)
    # per-sample gradients w.r.t. the shared input
    ps = torch.func.vmap(torch.func.grad(lambda xi, s: node(xi[None], s).pow(2).sum(),
                                         argnums=1), in_dims=(0, None))(x, s)
    loop = torch.stack([torch.autograd.grad(node(x[i:i + 1], sr).pow(2).sum(), sr)[0]
                        for i in range(3)])
    torch.testing.assert_close(ps, loop)
    # forward mode w.r.t. s: jvp, jacfwd, jacrev, and vmap(jvp) with per-sample tangents
    fd = _finite_difference(node, [x, s], [None, torch.ones_like(s)])
    tol = {"rtol": 1e-6, "atol": 1e-8}
    _, t = torch.func.jvp(lambda s: node(x, s), (s,), (torch.ones_like(s),))
    torch.testing.assert_close(t, fd, **tol)
    torch.testing.assert_close(torch.func.jacfwd(lambda s: node(x, s))(s), fd, **tol)
    torch.testing.assert_close(torch.func.jacrev(lambda s: node(x, s))(s), fd, **tol)
    ds = torch.tensor([1.0, 2.0, -1.0], dtype=F64)
    tv = torch.func.vmap(lambda xi, d: torch.func.jvp(lambda s: node(xi[None], s), (s,),
                                                      (d,))[1])(x, ds)
    torch.testing.assert_close(tv[:, 0], fd * ds[:, None], **tol)


def test_non_tensor_inputs_and_several_arguments():
    node = dt.PseudoHuberRegression()
    b, A, alpha = rand(3, 6), rand(3, 6, 2, seed=1), 0.5
    Jb, JA = node.jacobian(b, A, alpha)
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        gb, gA = jac(node, argnums=(0, 1))(b, A, alpha)
        torch.testing.assert_close(_diagonal(gb), Jb)
        torch.testing.assert_close(_diagonal(gA), JA)
    # per-sample Jacobians: vmap over jacrev / jacfwd
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        Jv = torch.func.vmap(jac(lambda bi, Ai: node(bi[None], Ai[None], alpha)[0]))(b, A)
        torch.testing.assert_close(Jv, Jb)


def test_vmap_over_a_plain_backward():
    node = dt.L2BallProjection(1.0)
    x = 3 * rand(4, 5)
    xr = x.clone().requires_grad_(True)
    y = node(xr)
    basis = torch.eye(5, dtype=F64).unsqueeze(1).expand(5, 4, 5)
    J = torch.func.vmap(lambda v: torch.autograd.grad(y, xr, v, retain_graph=True)[0])(basis)
    torch.testing.assert_close(J.transpose(0, 1), node.jacobian(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_under_grad_and_jvp(dtype):
    node = dt.UnitSphereProjection()
    x = rand(4, 5).to(dtype)
    g = torch.func.grad(lambda x: node(x).float().pow(3).sum())(x)
    xr = x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(node(xr).float().pow(3).sum(), xr)
    assert g.dtype == dtype
    torch.testing.assert_close(g, g_ref)
    _, t = torch.func.jvp(node, (x,), (torch.ones_like(x),))
    assert t.dtype == dtype


def test_the_forward_solution_reaches_the_transformed_backward(monkeypatch):
    """The solver's Solution (multipliers, active set, Hessian) is used under transforms,
    the vmap-folded batch included."""
    hits = []
    original = transforms.Spec.solution_for

    def spy(self, y):
        sol = original(self, y)
        hits.append(sol is not None)
        return sol

    monkeypatch.setattr(transforms.Spec, "solution_for", spy)
    node = dt.L2BallProjection(1.0)
    x = 3 * rand(3, 4)
    torch.func.grad(lambda x: node(x).sum())(x)
    torch.func.vmap(torch.func.grad(lambda x: node(x[None]).sum()))(x)
    torch.func.jacrev(node)(x)
    torch.func.jacfwd(node)(x)
    assert hits == [True] * 4


# -- what raises ---------------------------------------------------------------------------


def test_second_derivatives_through_nested_transforms_are_clear_errors():
    node = Shared()
    x, s = rand(3, 4), torch.tensor(0.7, dtype=F64)

    def f(x):
        return node(x, s).sum()

    nested = [
        lambda: torch.func.grad(lambda x: torch.func.grad(f)(x).sum())(x),
        lambda: torch.func.hessian(f)(x),
        lambda: torch.func.jacfwd(torch.func.jacrev(f))(x),
        lambda: torch.func.jacrev(torch.func.jacfwd(f))(x),
    ]
    for run in nested:
        with pytest.raises(RuntimeError, match="second derivative"):
            run()
    xr = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(torch.func.grad(f)(xr).sum(), xr)


def test_vmap_over_parameters_is_a_clear_error():
    node = dt.QuadraticNode(3, 4, learnable=True)
    Ws = rand(2, 4, 3)

    def loss(W, x):
        return torch.func.functional_call(node, {"W": W}, (x,)).sum()

    with pytest.raises(ValueError, match="vmap over a node's parameters"):
        torch.func.vmap(torch.func.grad(loss), in_dims=(0, None))(Ws, rand(2, 3))


def test_is_grads_batched_is_a_clear_error():
    node = dt.UnitSphereProjection()
    x = rand(2, 4).requires_grad_(True)
    y = node(x)
    with pytest.raises(RuntimeError, match="is_grads_batched"):
        torch.autograd.grad(y, x, torch.ones(3, 2, 4, dtype=F64), is_grads_batched=True)


def test_implicit_jvp_and_vjp_are_adjoint_and_check_their_arguments():
    node, x = dt.PolynomialNode(3, 4), rand(2, 3)
    y = node(x)
    t, v = rand(2, 3, seed=1), rand(2, 4, seed=2)
    dy = declnet.implicit_jvp(node, x, y=y, tangents=[t])
    (gx,) = declnet.implicit_vjp(node, x, y=y, grad_y=v, wrt=[True])
    torch.testing.assert_close((dy * v).sum(), (gx * t).sum())
    with pytest.raises(ValueError, match=r"tangent of input 0 must have the shape of input 0"):
        declnet.implicit_jvp(node, x, y=y, tangents=[t[:, :2]])
    with pytest.raises(TypeError, match=r"tangent of input 0 must be a tensor"):
        declnet.implicit_jvp(node, x, y=y, tangents=[1.0])
    with pytest.raises(ValueError, match=r"one entry per input \(1\), got 2"):
        declnet.implicit_jvp(node, x, y=y, tangents=[t, t])
    with pytest.raises(ValueError, match=r"grad_y must have the shape of y \(2, 4\), got"):
        declnet.implicit_vjp(node, x, y=y, grad_y=v[:1])
    with pytest.raises(TypeError, match=r"grad_y must be a tensor shaped like y, got list"):
        declnet.implicit_vjp(node, x, y=y, grad_y=[0.0])
    with pytest.raises(TypeError, match=r"y must be a tensor, got float"):
        declnet.implicit_vjp(node, x, y=1.0, grad_y=v)
