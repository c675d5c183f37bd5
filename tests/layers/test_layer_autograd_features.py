"""Every ready-made layer with the rest of PyTorch: double backward (gradgradcheck, a
gradient-penalty step), ``torch.func`` (vmap, grad, jacrev) and ``torch.compile``."""

from __future__ import annotations

import warnings

import pytest
import torch
from _layer_cases import CASES, F64, _gen, _spd, randn
from torch.autograd import gradgradcheck

import declnet
import declnet.layers as L


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


# ------------------------------------------------------------------------- an empty batch


@pytest.mark.parametrize("name", sorted(CASES))
def test_empty_batch_gives_empty_result(name):
    # Every layer takes a batch of zero problems: an empty result and empty gradients
    # (scalar parameters such as a penalty's alpha stay unbatched and get a zero gradient).
    fn, args = CASES[name]
    single = fn(*args).shape
    if name == "quadratic_program":  # the case picks y[0] of an unbatched problem's (1, n)
        fn, single = L.quadratic_program, L.quadratic_program(*args)[0].shape
    xs = [(a.unsqueeze(0)[:0] if a.dim() else a).clone().requires_grad_() for a in args]
    y = fn(*xs)
    assert y.shape == (0, *single)
    grads = torch.autograd.grad(y.sum(), xs, allow_unused=True)
    for x, g in zip(xs, grads):
        assert g is None or (g.shape == x.shape and not bool(g.any()))
