"""The ``torch.autograd.Function`` that joins a node's solve to the implicit backward."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._diagnostics import node_name, nonfinite_samples, warn
from ._implicit import ImplicitBackward, UnrolledBackward, _Problem, _vjp
from ._node import Solution

__all__ = ["DeclarativeFunction", "declarative", "solve_node"]


class _Params:
    """Marks where a node's learnable parameters start in ``DeclarativeFunction``'s inputs."""

    __slots__ = ()


_PARAMS = _Params()


def batch_size(node: Any, xs: tuple[Any, ...]) -> int | None:
    """The common first dimension of the batched tensor inputs (None if there are none).

    Raises:
        ValueError: two batched inputs disagree.
    """
    batch: int | None = None
    first = -1
    for i, x in enumerate(xs):
        if isinstance(x, Tensor) and x.dim() >= 1:
            if batch is None:
                batch, first = x.shape[0], i
            elif x.shape[0] != batch:
                raise ValueError(
                    f"{node_name(node)}: inputs must share the batch size (first dimension); "
                    f"input {first} has shape {tuple(xs[first].shape)} but input {i} has shape "
                    f"{tuple(x.shape)}. Inputs shared by the whole batch should be 0-d tensors "
                    "or parameters/buffers of the node."
                )
    return batch


def _as_solution(node: Any, result: Any, batch: int | None) -> Solution:
    sol = result if isinstance(result, Solution) else Solution(result)
    y = sol.y
    name = node_name(node)
    if not isinstance(y, Tensor):
        raise TypeError(
            f"{name}.solve must return a tensor y of shape (B, ...) or a declnet.Solution, but "
            f"returned {type(y).__name__}."
        )
    if y.dim() == 0 or (batch is not None and y.shape[0] != batch):
        raise ValueError(
            f"{name}.solve returned y of shape {tuple(y.shape)}, but the inputs have batch size "
            f"B={batch}; y must have shape (B, ...)."
        )
    if not y.is_floating_point():
        raise TypeError(f"{name}.solve returned y of dtype {y.dtype}; expected a floating dtype.")
    bad = nonfinite_samples(y)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"{name}.solve returned y with NaN or Inf in {len(idx)} of {y.shape[0]} samples "
            f"(samples {idx[:8]}{'...' if len(idx) > 8 else ''}). Check the solver and its "
            "inputs; the implicit gradient is only defined at a solution."
        )
    return sol


def solve_node(node: Any, xs: tuple[Any, ...] | list[Any]) -> Solution:
    """Run ``node.solve`` without gradients on detached inputs and validate its output.

    Args:
        node: a declarative node.
        xs: its inputs.

    Returns:
        A :class:`~declnet.Solution` whose ``y`` has been checked (shape, finiteness).
    """
    xs = tuple(xs)
    batch = batch_size(node, xs)
    detached = tuple(x.detach() if isinstance(x, Tensor) else x for x in xs)
    with torch.no_grad():
        result = node.solve(*detached)
    return _as_solution(node, result, batch)


def _check_optimality(node: Any, xs: tuple[Any, ...], sol: Solution) -> None:
    config = node.backward_mode if isinstance(node.backward_mode, ImplicitBackward) \
        else ImplicitBackward()
    prob = _Problem(node, xs, sol.y, config, sol, [False] * len(xs))
    res = prob.residual()
    tol = node.optimality_tol
    if tol is None:
        tol = 10 * torch.finfo(sol.y.dtype).eps ** 0.5
    scale = 1.0 + prob.gf.detach().norm(dim=-1)
    worst = torch.stack([res.stationarity / scale, res.equality, res.inequality, res.dual])
    bad = (worst > tol).any(0)
    if bool(bad.any()):
        warn(node, f"the solution from solve() is not optimal for {int(bad.sum())} of "
             f"{sol.y.shape[0]} samples (worst: stationarity {float(res.stationarity.max()):.2e}, "
             f"equality {float(res.equality.max()):.2e}, inequality "
             f"{float(res.inequality.max()):.2e}, multiplier sign {float(res.dual.max()):.2e}; "
             f"tolerance {tol:.1e}). The implicit gradient assumes y is a minimiser.",
             stacklevel=5)


class DeclarativeFunction(torch.autograd.Function):
    """Autograd function of a declarative node: solve forward, implicit VJP backward.

    ``DeclarativeFunction.apply(node, *xs)`` returns the node's solution ``y`` for inputs
    ``xs``; the backward pass calls :func:`~declnet.implicit_vjp`. Calling the node (or
    :func:`declarative`) is the usual way in; it also passes the node's learnable
    parameters so that they receive gradients.
    """

    @staticmethod
    def forward(ctx: Any, node: Any, *args: Any) -> Tensor:  # type: ignore[override]
        """Solve (autograd is off here) and return ``y``; ``args`` = inputs [, marker,
        parameters]."""
        xs, params = _split(args)
        sol = solve_node(node, xs)
        if node.check_optimality:
            _check_optimality(node, xs, sol)
        y = sol.y.clone() if any(sol.y is x for x in xs) else sol.y
        ctx.node = node
        ctx.solution = sol
        ctx.n_xs = len(xs)
        ctx.has_marker = len(args) > len(xs)
        ctx.non_tensors = {i: x for i, x in enumerate(xs) if not isinstance(x, Tensor)}
        ctx.need = [isinstance(x, Tensor) and x.requires_grad for x in xs]
        tensors = [x for x in xs if isinstance(x, Tensor)]
        ctx.save_for_backward(y, *tensors, *params)
        ctx.n_params = len(params)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        """Implicit differentiation: one batched KKT solve and one double-backward."""
        saved = ctx.saved_tensors
        y = saved[0]
        rest = list(saved[1:])
        params = rest[len(rest) - ctx.n_params:] if ctx.n_params else []
        tensors = iter(rest[: len(rest) - ctx.n_params])
        xs = [ctx.non_tensors[i] if i in ctx.non_tensors else next(tensors)
              for i in range(ctx.n_xs)]
        need_params = [p.requires_grad for p in params]
        grad_params = [p for p, ng in zip(params, need_params) if ng]
        sol = ctx.solution
        x_grads, p_grads = _vjp(ctx.node, xs, y, grad_y, sol, grad_params, None, ctx.need)
        it = iter(p_grads)
        all_p = [next(it) if ng else None for ng in need_params]
        marker = [None] if ctx.has_marker else []
        return (None, *x_grads, *marker, *all_p)


def _split(args: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[Tensor, ...]]:
    for i, a in enumerate(args):
        if a is _PARAMS:
            return args[:i], args[i + 1:]
    return args, ()


def declarative(node: Any, *xs: Any) -> Tensor:
    """Evaluate a declarative node functionally: ``y = argmin`` for inputs ``xs``.

    Equivalent to ``node(*xs)``. With :class:`~declnet.ImplicitBackward` (the default) the
    result is differentiated implicitly; with :class:`~declnet.UnrolledBackward` the
    node's ``solve`` runs with autograd enabled and is back-propagated through.

    Args:
        node: a :class:`~declnet.DeclarativeNode`.
        *xs: its inputs, batched along the first dimension.

    Returns:
        ``y`` ``(B, ...)``.

    Raises:
        TypeError: ``node`` is not a declarative node, or ``solve`` returned no tensor.
        ValueError: inputs disagree on the batch size, ``y`` has the wrong batch size or is
            not finite.
    """
    from ._node import DeclarativeNode

    if not isinstance(node, DeclarativeNode):
        raise TypeError(
            f"declarative() expects a declnet.DeclarativeNode, got {type(node).__name__}."
        )
    mode = node.backward_mode
    if isinstance(mode, UnrolledBackward):
        batch = batch_size(node, xs)
        with torch.enable_grad():
            sol = _as_solution(node, node.solve(*xs), batch)
        return sol.y
    if not isinstance(mode, ImplicitBackward):
        raise TypeError(
            f"{node_name(node)}: backward must be declnet.ImplicitBackward(...) or "
            f"declnet.UnrolledBackward(), got {type(mode).__name__}."
        )
    params = tuple(p for p in node.parameters() if p.requires_grad)
    if params and torch.is_grad_enabled():
        y = DeclarativeFunction.apply(node, *xs, _PARAMS, *params)
    else:
        y = DeclarativeFunction.apply(node, *xs)
    return y
