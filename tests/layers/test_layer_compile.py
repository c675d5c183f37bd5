"""The ready-made layers under ``torch.compile(fullgraph=True)``: compiled = eager for the
outputs and the input gradients, the input checks still raise, and a second call with the
same shapes does not recompile."""

from __future__ import annotations

import warnings

import pytest
import torch
from _layer_cases import CASES, F64, PlainCauchy, randn

import declnet
import declnet.layers as L

# Not a fast path: a user's penalty without d2phi is differentiated by the generic engine,
# which runs eagerly between compiled graphs (a graph break; tested below without
# fullgraph).
_ENGINE = {"robust_pool-user-engine"}
# Layers whose iterative solvers choose their path from the data (a Cholesky/QR switch,
# convergence tests of Sinkhorn, interior-point and Condat iterations): they compile with
# graph breaks (tested below without fullgraph).
_NOT_COVERED = {
    "least_squares",
    "optimal_transport",
    "quadratic_program",
    "total_variation_1d",
    # A user's penalty with closed-form derivatives: its generic multi-start solver takes
    # the penalty object, which cannot enter an opaque operator; not yet traceable.
    "robust_pool-user",
    "robust_pool-user-alpha",
}
FAST_PATHS = sorted(set(CASES) - _ENGINE - _NOT_COVERED)
# A few representative cases for the (slow) inductor check: the traced p = 2 projection,
# the opaque general-p solver, a pool with a learnable alpha (value check and opaque solver)
# and the tridiagonal solver.
_INDUCTOR = ["project-ball-p2", "project-sphere-p1.5", "robust_pool-welsch-alpha", "tridiagonal"]


def _leaves(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(a.clone().requires_grad_() for a in args)


def _output_and_grads(fn, args, v):
    inputs = _leaves(args)
    y = fn(*inputs)
    return y.detach(), torch.autograd.grad(y, inputs, v)


def _check_compiled_matches_eager(name: str, backend: str, **tol: float) -> None:
    torch._dynamo.reset()
    fn, args = CASES[name]
    v = torch.randn(fn(*args).shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    y, grads = _output_and_grads(compiled, args, v)
    y_ref, grads_ref = _output_and_grads(fn, args, v)
    torch.testing.assert_close(y, y_ref, **tol)
    assert len(grads) == len(args)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **tol)


@pytest.mark.parametrize("name", FAST_PATHS)
def test_fast_path_traces_fullgraph(name):
    # Tracing only (forward and backward graphs, no code generation): fast.
    _check_compiled_matches_eager(name, "aot_eager")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from torch's own compile stack
@pytest.mark.parametrize("name", _INDUCTOR)
def test_fast_path_compiles_fullgraph(name):
    # Generated code may sum in another order.
    _check_compiled_matches_eager(name, "inductor", rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["project-sphere-p3.0", "robust_pool-pseudo_huber-alpha"])
def test_second_call_does_not_recompile(name):
    torch._dynamo.reset()
    fn, args = CASES[name]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y, _ = _output_and_grads(compiled, args, torch.ones(fn(*args).shape, dtype=F64))
    # New values of the same shapes (a data-dependent branch would have been specialised).
    other = tuple(1.5 * a for a in args)
    with torch._dynamo.config.patch(error_on_recompile=True):
        y2, grads2 = _output_and_grads(compiled, other, torch.ones_like(y))
    y_ref, grads_ref = _output_and_grads(fn, other, torch.ones_like(y))
    torch.testing.assert_close(y2, y_ref)
    for g, g_ref in zip(grads2, grads_ref):
        torch.testing.assert_close(g, g_ref)


class _EngineModel(torch.nn.Module):
    """A linear map, then a pool with a user's penalty that the generic engine solves."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6, dtype=F64)
        self.pen = PlainCauchy(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return L.robust_pool(torch.tanh(self.lin(x)), self.pen).square().sum()


def test_model_with_a_generic_node_compiles_once():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _EngineModel()
    compiled = torch.compile(model, backend="aot_eager")  # the node breaks the graph
    x = randn(4, 6, seed=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note on the graph break
        compiled(x).backward()
    g_compiled = model.lin.weight.grad.clone()
    model.zero_grad()
    model(x).backward()
    torch.testing.assert_close(g_compiled, model.lin.weight.grad)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(randn(4, 6, seed=31)).backward()


# ------------------------------------------------------------- checks inside compiled code


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def test_compiled_pool_checks_alpha():
    fn = _compiled(lambda x, a: L.robust_pool(x, L.Welsch(a)))
    x = randn(3, 7, seed=32)
    fn(x, torch.tensor(0.5, dtype=F64))
    # The graph traced for a valid alpha still checks every call's values.
    with pytest.raises(ValueError, match="Welsch: alpha must be positive and finite"):
        fn(x, torch.tensor(-0.5, dtype=F64))
    with pytest.raises(ValueError, match="Welsch: alpha must be positive and finite"):
        fn(x, torch.tensor(float("nan"), dtype=F64))


def test_compiled_projection_checks_radius():
    fn = _compiled(lambda x, r: L.project_onto_sphere(x, 1.5, r))
    x = randn(3, 5, seed=33)
    y = fn(x, torch.tensor([1.0, 2.0, 0.5], dtype=F64))
    torch.testing.assert_close(
        y, L.project_onto_sphere(x, 1.5, torch.tensor([1.0, 2.0, 0.5], dtype=F64))
    )
    with pytest.raises(ValueError, match="every entry of radius must be > 0 and finite"):
        fn(x, torch.tensor([1.0, -2.0, 0.5], dtype=F64))


def test_compiled_tridiagonal_warns_on_a_singular_system():
    fn = _compiled(lambda lo, d, up, b: L.tridiagonal_solve(lo, d, up, b, method="thomas"))
    fn(0.3 * randn(4, seed=34), randn(5, seed=35).abs() + 3, 0.3 * randn(4, seed=36), randn(5))
    zeros = torch.zeros(4, dtype=F64)
    with pytest.warns(declnet.DeclarativeWarning, match="zero pivot"):
        fn(zeros, torch.zeros(5, dtype=F64), zeros, torch.ones(5, dtype=F64))


def test_compiled_vector_pool_warns_on_a_singular_hessian():
    # Collinear points, all beyond Huber's α from the output: Σ φ'' = 0 along the line.
    points = torch.tensor([[-5.0, 0.0], [5.0, 0.0], [-6.0, 0.0], [6.0, 0.0]], dtype=F64)
    x = points.T.unsqueeze(0)  # (1, C = 2, n = 4)

    def fn(x):
        return L.robust_vector_pool(x, L.Huber(1.0), dim=-1, vector_dim=1)

    compiled = _compiled(fn)
    grads = []
    for f in (compiled, fn):
        xg = x.clone().requires_grad_()
        with pytest.warns(declnet.DeclarativeWarning, match="singular for 1 output"):
            f(xg).sum().backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_compiled_pool_backward_warns_as_eager():
    # x = (-α, α): y = 0 is a Welsch minimum where Σφ'' = 0 exactly (eager: the same warning).
    compiled = _compiled(lambda x: L.robust_pool(x, L.Welsch(1.0)))
    x = torch.tensor([[-1.0, 1.0]], dtype=F64, requires_grad=True)
    # The check depends on forward values only, so the compiled forward may run it.
    with pytest.warns(declnet.DeclarativeWarning, match="mean-shift step"):
        compiled(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.5, 0.5]], dtype=F64))


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in ("quadratic_program", "optimal_transport")
    else n for n in sorted(_NOT_COVERED | _ENGINE)])
def test_solver_layers_compile_with_graph_breaks(name):
    torch._dynamo.reset()
    fn, args = CASES[name]
    v = torch.randn(fn(*args).shape, dtype=F64, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", declnet.DeclarativeWarning)
        y, grads = _output_and_grads(torch.compile(fn, backend="aot_eager"), args, v)
        y_ref, grads_ref = _output_and_grads(fn, args, v)
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
