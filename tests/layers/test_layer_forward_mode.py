"""Forward mode through every ready-made layer: ``torch.func.jvp``, ``jacfwd`` and
``torch.autograd.forward_ad`` dual numbers, against finite differences and reverse mode."""

from __future__ import annotations

import pytest
import torch
from _layer_cases import CASES, F64, _gen, randn
from torch.autograd import forward_ad as fwAD

import declnet.layers as L


def _tangents(args: tuple[torch.Tensor, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = _gen(seed)
    return tuple(torch.randn(a.shape, dtype=a.dtype, generator=g) for a in args)


def _central_difference(fn, args, tangents, eps=1e-6):
    plus = fn(*(a + eps * t for a, t in zip(args, tangents)))
    minus = fn(*(a - eps * t for a, t in zip(args, tangents)))
    return (plus - minus) / (2 * eps)


@pytest.mark.parametrize("name", sorted(CASES))
def test_jvp_equals_finite_differences_and_dual_numbers(name):
    fn, args = CASES[name]
    tangents = _tangents(args)
    y, dy = torch.func.jvp(fn, args, tangents)
    torch.testing.assert_close(y, fn(*args))
    torch.testing.assert_close(dy, _central_difference(fn, args, tangents), rtol=1e-5,
                               atol=1e-7)
    with fwAD.dual_level():
        out = fn(*(fwAD.make_dual(a, t) for a, t in zip(args, tangents)))
        dual = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(dual, dy, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
def test_jacfwd_equals_jacrev(name):
    fn, args = CASES[name]
    argnums = tuple(range(len(args)))
    fwd = torch.func.jacfwd(fn, argnums=argnums)(*args)
    rev = torch.func.jacrev(fn, argnums=argnums)(*args)
    for f, r in zip(fwd, rev):
        torch.testing.assert_close(f, r, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("fn", [L.project_onto_sphere, L.project_onto_ball])
def test_projection_with_a_radius_tangent(fn):
    # The symmetric shortcut (J ẋ = Jᵀ ẋ) serves x's tangent alone; with a tangent of the
    # radius too, forward mode goes through the transposed backward.
    x, r = 2 * randn(4, 5, seed=30), torch.tensor([[0.7], [1.1], [0.9], [1.3]], dtype=F64)
    tx, tr = _tangents((x, r), seed=31)

    def f(x, r):
        return fn(x, 2, r)

    _, dy = torch.func.jvp(f, (x, r), (tx, tr))
    torch.testing.assert_close(dy, _central_difference(f, (x, r), (tx, tr)), rtol=1e-6,
                               atol=1e-8)


# Second derivatives by nested transforms: jacfwd over jacrev (torch.func.hessian) needs the
# layer's forward mode through its differentiable backward. The user's penalty without
# d2phi is differentiated by the engine, which refuses nested transforms with a clear error
# (tests/test_func_transforms.py).
_NESTED = sorted(set(CASES) - {"robust_pool-user-engine"})


@pytest.mark.parametrize("name", _NESTED)
def test_hessian_by_nested_transforms_equals_double_backward(name):
    fn, args = CASES[name]

    def loss(x, *rest):
        return fn(x, *rest).square().sum()

    hess = torch.func.hessian(loss)(*args)
    x = args[0].clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(x, *args[1:]), x, create_graph=True)
    rows = [torch.autograd.grad(gi, x, retain_graph=True)[0] for gi in g.reshape(-1)]
    torch.testing.assert_close(hess.reshape(x.numel(), -1), torch.stack(rows).reshape(
        x.numel(), -1), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["project-ball-p2", "robust_pool-welsch", "tridiagonal",
                                  "least_squares"])
def test_forward_over_forward_is_a_clear_error(name):
    # PyTorch would return zeros for a Function's jvp under an outer forward-mode transform.
    fn, args = CASES[name]

    def loss(x):
        return fn(x, *args[1:]).square().sum()

    with pytest.raises(RuntimeError, match="forward mode over forward mode"):
        torch.func.jacfwd(torch.func.jacfwd(loss))(args[0])
