"""Every ready-made layer with the rest of PyTorch: double backward (gradgradcheck, a
gradient-penalty step), ``torch.func`` (vmap, grad, jacrev) and ``torch.compile``."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.autograd import gradgradcheck

import declnet
import declnet.layers as L
from declnet.layers import Penalty

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=_gen(seed))


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, dtype=F64, generator=_gen(seed))


class Cauchy(Penalty):
    """A user's penalty with closed-form derivatives (Table 1 backward)."""

    is_smooth = True

    def phi(self, z, alpha=None):
        a = self._a(alpha)
        return 0.5 * a * a * torch.log1p((z / a) ** 2)

    def dphi(self, z, alpha=None):
        a = self._a(alpha)
        return z / (1 + (z / a) ** 2)

    def d2phi(self, z, alpha=None):
        t2 = (z / self._a(alpha)) ** 2
        return (1 - t2) / (1 + t2) ** 2

    def dphi_dalpha(self, z, alpha=None):
        a = self._a(alpha)
        t2 = (z / a) ** 2
        return 2 * z * t2 / (a * (1 + t2) ** 2)


class PlainCauchy(Penalty):
    """A user's penalty with ``phi`` only (differentiated by the generic engine)."""

    is_smooth = True

    def phi(self, z, alpha=None):
        a = self._a(alpha)
        return 0.5 * a * a * torch.log1p((z / a) ** 2)


def _simplex_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Marginals of equal mass whatever the (perturbed) parameters."""
    return torch.softmax(a, -1), torch.softmax(b, -1)


def _spd(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x + x.mT)


_Q = randn(3, 3, seed=5) @ randn(3, 3, seed=5).mT + torch.eye(3, dtype=F64)

# (name, function of tensors, per-sample inputs (no batch dimension where the layer allows))
CASES = {
    **{
        f"robust_pool-{name}": (lambda x, n=name: L.robust_pool(x, n), (randn(3, 7, seed=1),))
        for name in ("pseudo_huber", "huber", "welsch", "truncated_quadratic", "quadratic")
    },
    "robust_pool-pseudo_huber-alpha": (
        lambda x, a: L.robust_pool(x, L.PseudoHuber(a)),
        (randn(3, 7, seed=2), torch.tensor(0.7, dtype=F64)),
    ),
    "robust_pool-welsch-alpha": (
        lambda x, a: L.robust_pool(x, L.Welsch(a)),
        (randn(3, 7, seed=3), torch.tensor(1.3, dtype=F64)),
    ),
    "robust_pool-user": (lambda x: L.robust_pool(x, Cauchy(1.0)), (randn(3, 6, seed=4),)),
    "robust_pool-user-alpha": (
        lambda x, a: L.robust_pool(x, Cauchy(a)),
        (randn(3, 6, seed=4), torch.tensor(0.9, dtype=F64)),
    ),
    "robust_pool-user-engine": (
        lambda x: L.robust_pool(x, PlainCauchy(1.0)),
        (randn(2, 6, seed=6),),
    ),
    "robust_vector_pool": (
        lambda x: L.robust_vector_pool(x, L.PseudoHuber(0.7), dim=-1, vector_dim=0),
        (randn(3, 6, seed=7),),
    ),
    **{
        f"project-{kind}-p{p}": (
            lambda x, f=f, p=p: f(x, p, 1.0, masked=True),
            (randn(3, 5, seed=8),),
        )
        for kind, f in (("sphere", L.project_onto_sphere), ("ball", L.project_onto_ball))
        for p in (1, 2, math.inf, 1.5, 3.0)
    },
    "project-simplex": (lambda x: L.project_onto_simplex(x), (randn(3, 5, seed=9),)),
    "least_squares": (
        lambda A, b, w: L.least_squares(A, b, w, ridge=0.1),
        (randn(6, 3, seed=10), randn(6, seed=11), rand(6, seed=12) + 0.5),
    ),
    "optimal_transport": (
        lambda M, a, b: L.optimal_transport(M, *_simplex_pair(a, b), gamma=2.0),
        (rand(4, 3, seed=13), randn(4, seed=14), randn(3, seed=15)),
    ),
    "eigenvectors": (
        lambda X: L.eigenvectors(_spd(X), 2),
        (_spd(randn(4, 4, seed=16)) + torch.diag(torch.arange(4, dtype=F64)),),
    ),
    "total_variation_1d": (lambda x: L.total_variation_1d(x, 0.3), (randn(8, seed=17),)),
    "tridiagonal": (
        lambda lo, d, up, b: L.tridiagonal_solve(lo, d, up, b, method="cyclic"),
        (0.3 * randn(4, seed=18), rand(5, seed=19) + 3, 0.3 * randn(4, seed=20), randn(5)),
    ),
    "tridiagonal-thomas": (
        lambda lo, d, up, b: L.tridiagonal_solve(lo, d, up, b, method="thomas"),
        (0.3 * randn(4, seed=18), rand(5, seed=19) + 3, 0.3 * randn(4, seed=20), randn(5)),
    ),
    "sparsemax": (lambda x: L.sparsemax(x), (randn(5, seed=21),)),
    "entmax-1.5": (lambda x: L.entmax(x, 1.5), (randn(5, seed=22),)),
    "entmax-1.3": (lambda x: L.entmax(x, 1.3), (randn(5, seed=23),)),
    "quadratic_program": (
        lambda Q, p, G, h: L.quadratic_program(Q, p, G, h)[0],
        (_Q, randn(3, seed=24), randn(2, 3, seed=25), 0.3 * rand(2, seed=26)),
    ),
}


def _grad_inputs(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(a.clone().requires_grad_() for a in args)


# ------------------------------------------------------------------------- double backward


# General p runs an iterative solver inside every finite difference: seconds per check.
_SLOW_GGC = {f"project-{k}-p{p}" for k in ("sphere", "ball") for p in (1.5, 3.0)}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_GGC else n for n in sorted(CASES)],
)
def test_gradgradcheck(name):
    fn, args = CASES[name]
    assert gradgradcheck(fn, _grad_inputs(args))


def test_quadratic_program_has_second_derivatives():
    # y depends nonlinearly on Q and G; with an active and an inactive constraint the second
    # derivatives are not zero, so the gradgradcheck above tests a real path.
    fn, args = CASES["quadratic_program"]
    q, p, g, h = _grad_inputs(args)
    (gq,) = torch.autograd.grad(fn(q, p, g, h).square().sum(), q, create_graph=True)
    (second,) = torch.autograd.grad(gq.sum(), p)
    assert second.abs().sum() > 1e-3


def _pool_inputs() -> list[torch.Tensor]:
    """Ordinary rows, far outliers, a row of far-apart points (weights underflow, Huber has
    an interval of minimisers, Welsch has no curvature) and huge magnitudes."""
    base = randn(4, 9, seed=60)
    far = base.clone()
    far[:, 0] = 1e6
    spread = torch.tensor([[-30.0, -10.0, 10.0, 30.0, 50.0, -50.0, 70.0, -70.0, 90.0]], dtype=F64)
    return [base, far, spread.expand(2, 9).clone(), 1e200 * base]


@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch", "truncated_quadratic"])
def test_differentiable_backward_equals_fast_backward(name):
    # The create_graph=True path (differentiable ops) against the fused kernels.
    for x in _pool_inputs():
        for alpha in (0.5, 1e-3):
            pen = type(L.as_penalty(name))(torch.tensor(alpha, dtype=F64, requires_grad=True))
            x = x.clone().requires_grad_()
            v = randn(*x.shape[:-1], seed=61)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", declnet.DeclarativeWarning)
                fast = torch.autograd.grad(L.robust_pool(x, pen), (x, pen.alpha), v)
                slow = torch.autograd.grad(
                    L.robust_pool(x, pen), (x, pen.alpha), v, create_graph=True
                )
            for f, s in zip(fast, slow):
                torch.testing.assert_close(s.detach(), f, rtol=1e-9, atol=1e-12, equal_nan=True)


def _unrolled_pseudo_huber(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Two Newton steps from the detached solution: the exact value and exact first and second
    derivatives (the Newton map has zero derivative in u at the root)."""
    pen = L.PseudoHuber(alpha)
    y = L.robust_pool(x.detach(), pen).unsqueeze(-1)
    for _ in range(2):
        z = y - x
        y = y - pen.dphi(z).sum(-1, keepdim=True) / pen.d2phi(z).sum(-1, keepdim=True)
    return y.squeeze(-1)


def _penalty_step(pool) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on ``loss + λ‖∂loss/∂x‖²`` (a gradient penalty) for a linear layer."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 5).double()
    inputs = randn(3, 11, 4, seed=30)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    feats = layer(inputs).transpose(1, 2)  # (3, 5, 11): pool 11 points per channel
    target = randn(3, 5, seed=31)
    loss = (pool(feats) - target).square().mean()
    (g,) = torch.autograd.grad(loss, feats, create_graph=True)
    total = loss + 10.0 * g.square().sum()
    opt.zero_grad()
    total.backward()
    grads = torch.cat([p.grad.flatten() for p in layer.parameters()])
    opt.step()
    return grads, torch.cat([p.detach().flatten() for p in layer.parameters()])


def test_gradient_penalty_step_matches_closed_form():
    grads, params = _penalty_step(lambda f: L.robust_pool(f, L.PseudoHuber(0.5)))
    ref_grads, ref_params = _penalty_step(lambda f: _unrolled_pseudo_huber(f, 0.5))
    torch.testing.assert_close(grads, ref_grads, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(params, ref_params, rtol=1e-12, atol=1e-12)
    # The quadratic penalty is the mean.
    grads, _ = _penalty_step(lambda f: L.robust_pool(f, "quadratic"))
    ref_grads, _ = _penalty_step(lambda f: f.mean(-1))
    torch.testing.assert_close(grads, ref_grads)


# ------------------------------------------------------------------------------- torch.func


def _stack(args: tuple[torch.Tensor, ...], size: int = 3) -> tuple[torch.Tensor, ...]:
    """``size`` perturbed copies of each input, stacked first."""
    out = []
    for i, a in enumerate(args):
        noise = 0.05 * randn(size, *a.shape, seed=40 + i)
        out.append(a.unsqueeze(0) + noise if a.is_floating_point() else a.expand(size))
    return tuple(out)


def _fix(name: str, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Keep perturbed inputs valid (symmetric, positive where required)."""
    if name == "eigenvectors":
        return (_spd(batch[0]),)
    if name in ("least_squares",):
        return (batch[0], batch[1], batch[2].abs())
    if name.startswith("robust_pool") and len(batch) == 2:
        return (batch[0], batch[1].abs())
    if name == "quadratic_program":
        return (_spd(batch[0]), *batch[1:3], batch[3].abs())
    return batch


@pytest.mark.parametrize("name", sorted(CASES))
def test_vmap_equals_loop(name):
    fn, args = CASES[name]
    batch = _fix(name, _stack(args))
    out = torch.func.vmap(fn)(*batch)
    loop = torch.stack([fn(*(b[i] for b in batch)) for i in range(batch[0].shape[0])])
    torch.testing.assert_close(out, loop, rtol=1e-9, atol=1e-10)


def _per_sample_grads(fn, batch):
    def loss(*a):
        return fn(*a).square().sum()

    argnums = tuple(range(len(batch)))
    return torch.func.vmap(torch.func.grad(loss, argnums=argnums))(*batch)


# The generic engine's implicit backward refuses torch.func transforms with a clear error.
_NO_FUNC_GRAD: set[str] = set()


def test_func_grad_through_engine_pool_equals_autograd():
    """A user penalty without d2phi goes through the generic engine, which runs under
    torch.func too."""
    fn, args = CASES["robust_pool-user-engine"]
    g = torch.func.grad(lambda x: fn(x).sum())(*args)
    x = args[0].detach().clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(fn(x).sum(), x)
    torch.testing.assert_close(g, ref)


@pytest.mark.parametrize("name", sorted(set(CASES) - _NO_FUNC_GRAD))
def test_per_sample_grad_equals_loop(name):
    fn, args = CASES[name]
    batch = _fix(name, _stack(args))
    grads = _per_sample_grads(fn, batch)
    for i in range(batch[0].shape[0]):
        inputs = _grad_inputs(tuple(b[i] for b in batch))
        ref = torch.autograd.grad(fn(*inputs).square().sum(), inputs, allow_unused=True)
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g[i], torch.zeros_like(g[i]) if r is None else r)


@pytest.mark.parametrize(
    "name", ["robust_pool-welsch", "robust_vector_pool", "least_squares", "eigenvectors"]
)
def test_jacrev_equals_autograd(name):
    fn, args = CASES[name]
    jac = torch.func.jacrev(fn)(*args)
    ref = torch.autograd.functional.jacobian(fn, args)[0]
    torch.testing.assert_close(jac, ref)


def test_vmap_checks_inputs_of_every_sample():
    w = torch.ones(3, 6, dtype=F64)
    w[1, 2] = -1.0
    a, b = randn(3, 6, 2), randn(3, 6)
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        torch.func.vmap(L.least_squares)(a, b, w)


# ---------------------------------------------------------------------------- torch.compile

POOL_PENALTIES = ["pseudo-huber", "huber", "welsch", "truncated_quadratic", "quadratic"]


def _compiled_matches_eager(name: str, backend: str) -> None:
    torch._dynamo.reset()

    def fn(x):
        return L.robust_pool(x, name, dim=-1)

    x = torch.randn(3, 4, 40, generator=_gen(50)).requires_grad_()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    y = compiled(x)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    y_ref = fn(x)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("name", POOL_PENALTIES)
def test_pool_traces_fullgraph(name):
    # Tracing only (forward and backward graphs, no code generation): fast.
    _compiled_matches_eager(name, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("name", POOL_PENALTIES)
def test_pool_compiles_fullgraph(name):
    _compiled_matches_eager(name, "inductor")
