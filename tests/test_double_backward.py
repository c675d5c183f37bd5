"""Double backward through declarative nodes: second derivatives by implicit
differentiation of the first (gradient penalties are never silently dropped)."""

from __future__ import annotations

import pytest
import torch

from _problems import NODE_KINDS, rand
from declnet import testing as dt

F64 = torch.float64

NODES = NODE_KINDS


@pytest.mark.parametrize("case", NODES, ids=[c[0] for c in NODES])
def test_gradgradcheck(case):
    _, make, inputs = case
    node, x = make(), inputs().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda x: node(x), (x,))


def test_gradient_penalty_matches_the_closed_form():
    """A gradient-penalty step through a node whose y = Q⁻¹ W x has a closed form: the
    penalty's gradient w.r.t. the learnable W equals autograd through the formula."""
    node = dt.QuadraticNode(3, 4, learnable=True)
    x = rand(5, 3).requires_grad_(True)
    (gx,) = torch.autograd.grad(node(x).square().sum(), x, create_graph=True)
    penalty = gx.square().sum()
    assert penalty.requires_grad
    (g_node,) = torch.autograd.grad(penalty, node.W)

    W = node.W.detach().clone().requires_grad_(True)
    y = torch.linalg.solve(node.Q, (x @ W.T).T).T
    (gx_ref,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (g_ref,) = torch.autograd.grad(gx_ref.square().sum(), W)
    torch.testing.assert_close(g_node, g_ref)


def test_single_backward_has_no_graph():
    node = dt.UnitSphereProjection()
    x = rand(2, 4).requires_grad_(True)
    (g,) = torch.autograd.grad(node(x).sum(), x)
    assert not g.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_work_in_float32_inside(dtype):
    node = dt.UnitSphereProjection()
    x32 = rand(4, 5).float()
    v = rand(4, 5, seed=1).float()
    x = x32.to(dtype).requires_grad_(True)
    y = node(x)
    assert y.dtype == dtype
    (g,) = torch.autograd.grad(y, x, v.to(dtype))
    assert g.dtype == dtype
    x_ref = x32.to(dtype).float().requires_grad_(True)  # the same rounded input
    y_ref = node(x_ref)
    (g_ref,) = torch.autograd.grad(y_ref, x_ref, v.to(dtype).float())
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y.float(), y_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(g.float(), g_ref, atol=tol, rtol=tol)


def test_autocast_model_with_a_node():
    node = dt.UnitSphereProjection()
    lin = torch.nn.Linear(5, 5)
    x = rand(4, 5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = node(lin(x))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_vmap_over_a_node_folds_into_the_batch():
    node = dt.UnitSphereProjection()
    x = rand(3, 2, 4).requires_grad_(True)
    y = torch.func.vmap(node)(x)
    torch.testing.assert_close(y, node(x.detach().reshape(6, 4)).reshape(3, 2, 4))
    v = rand(3, 2, 4, seed=1)
    (g,) = torch.autograd.grad(y, x, v)
    xr = x.detach().reshape(6, 4).requires_grad_(True)
    (gr,) = torch.autograd.grad(node(xr), xr, v.reshape(6, 4))
    torch.testing.assert_close(g.reshape(6, 4), gr)
    # in_dims other than 0 and unmapped inputs
    torch.testing.assert_close(torch.func.vmap(node, in_dims=1)(x.detach().transpose(0, 1)), y)


def test_torch_func_second_derivative_is_a_clear_error():
    """First derivatives work under torch.func (tests/test_func_transforms.py); a second
    one by nested transforms raises instead of returning wrong numbers."""
    node = dt.UnitSphereProjection()
    f = torch.func.grad(lambda z: node(z.unsqueeze(0)).sum())
    z = rand(4).requires_grad_(True)
    (expected,) = torch.autograd.grad(node(z.unsqueeze(0)).sum(), z)
    torch.testing.assert_close(f(z.detach()), expected)
    with pytest.raises(RuntimeError, match=r"torch\.func"):
        torch.func.grad(lambda z: f(z).sum())(rand(4))


@pytest.mark.slow
def test_torch_compile_model_with_a_node():
    """A compiled model runs the node eagerly between its graphs: compiled = eager, and a
    second call with the same shapes does not recompile."""
    import torch._dynamo

    torch._dynamo.reset()
    node = dt.UnitSphereProjection()
    lin = torch.nn.Linear(4, 4).double()

    def model(x):
        return node(torch.tanh(lin(x))).square().sum(-1)

    compiled = torch.compile(model, backend="eager")
    x = rand(3, 4)
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    g_compiled = lin.weight.grad.clone()
    lin.weight.grad = None
    model(x).sum().backward()
    torch.testing.assert_close(g_compiled, lin.weight.grad)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(rand(3, 4, seed=1))
