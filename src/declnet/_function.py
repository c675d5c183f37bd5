"""The ``torch.autograd.Function`` that joins a node's solve to its implicit backward."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from ._diagnostics import node_name
from ._running import solve_node

__all__ = ["DeclarativeFunction"]


class _Cached:
    """Marks a solution already computed: re-attaches ``y`` to the inputs without solving
    again (the differentiable backward builds on it)."""

    __slots__ = ("solution",)

    def __init__(self, solution: Any) -> None:
        self.solution = solution


class _Params:
    """Marks where a node's learnable parameters start in ``DeclarativeFunction``'s inputs."""

    __slots__ = ()


_PARAMS = _Params()


def _split(args: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[Tensor, ...]]:
    for i, a in enumerate(args):
        if a is _PARAMS:
            return args[:i], args[i + 1:]
    return args, ()


_HALF = (torch.float16, torch.bfloat16)


def _low_precision(xs: tuple[Any, ...]) -> torch.dtype | None:
    """The half-precision dtype of the inputs, if any (then the node works in float32)."""
    for x in xs:
        if isinstance(x, Tensor) and x.dtype in _HALF:
            return x.dtype
    return None


def _upcast(xs: Any) -> list[Any]:
    return [x.float() if isinstance(x, Tensor) and x.dtype in _HALF else x for x in xs]


def _no_autocast(tensors: Any) -> Any:
    """Autocast off while solving and differentiating: solvers and KKT systems need their
    precision (results are returned in the inputs' dtype)."""
    device = next((t.device.type for t in tensors if isinstance(t, Tensor)), "cpu")
    if device not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, enabled=False)


def _implicit_mode(node: Any) -> Any:
    mode = getattr(node, "backward_mode", None)
    if not callable(getattr(mode, "vjp", None)):
        raise TypeError(
            f"{node_name(node)}: DeclarativeFunction differentiates implicitly, but the node's "
            f"backward is {type(mode).__name__}; call the node (or declnet.declarative) "
            "instead, which follows the node's backward mode."
        )
    return mode


class DeclarativeFunction(torch.autograd.Function):
    """Autograd function of a declarative node: solve forward, implicit VJP backward.

    ``DeclarativeFunction.apply(node, *xs)`` returns the node's solution ``y`` for inputs
    ``xs``; the backward pass calls the node's :class:`~declnet.ImplicitBackward`. Inputs in
    float16 or bfloat16 are solved and differentiated in float32 (autocast off inside), and
    ``y`` and the gradients come back in the inputs' dtype. The
    node's learnable parameters are passed along, so they receive gradients too. Calling
    the node (or :func:`~declnet.declarative`) is the usual way in.
    """

    @classmethod
    def apply(cls, node: Any, *xs: Any) -> Tensor:  # type: ignore[override]
        """``y`` for inputs ``xs``, differentiable w.r.t. ``xs`` and the node's parameters."""
        _implicit_mode(node)
        params = ()
        if torch.is_grad_enabled() and isinstance(node, torch.nn.Module):
            params = tuple(p for p in node.parameters() if p.requires_grad)
        if params:
            return super().apply(node, *xs, _PARAMS, *params)
        return super().apply(node, *xs)

    @staticmethod
    def forward(ctx: Any, node: Any, *args: Any) -> Tensor:  # type: ignore[override]
        """Solve (autograd is off here) and return ``y``; ``args`` = inputs [, marker,
        parameters]."""
        cached = bool(args) and isinstance(args[0], _Cached)
        if cached:
            sol = args[0].solution
            args = args[1:]
        xs, params = _split(args)
        mode = _implicit_mode(node)
        low = _low_precision(xs)
        if cached:
            y = sol.y.detach().clone()
        else:
            work = _upcast(xs)
            with _no_autocast(work):
                sol = solve_node(node, work)
                if getattr(node, "check_optimality", False):
                    mode.check(node, work, sol)
            y = sol.y if low is None else sol.y.to(low)
        ctx.low = None if cached else low
        ctx.cached = cached
        ctx.node = node
        ctx.mode = mode
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
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        """Implicit differentiation: one batched KKT solve and one double-backward.

        Under ``create_graph=True`` the VJP is computed with differentiable operations
        around ``y`` re-attached to the inputs (implicitly differentiable again), so second
        derivatives are those of implicit differentiation of the first.
        """
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
        create_graph = torch.is_grad_enabled()
        dtypes = [x.dtype if isinstance(x, Tensor) else None for x in xs]
        if ctx.low is not None:  # half precision: the backward runs in float32 too
            xs = _upcast(xs)
            grad_y = grad_y.float()
            y = sol.y
        if create_graph:
            attach = [*xs, _PARAMS, *params] if params else list(xs)
            y = DeclarativeFunction.forward_cached(ctx.node, sol, attach)
        with _no_autocast([y]):
            x_grads, p_grads = ctx.mode.vjp(ctx.node, xs, y, grad_y, solution=sol,
                                            params=grad_params, need_grad=ctx.need,
                                            create_graph=create_graph)
        if ctx.low is not None:
            x_grads = [g if g is None or d is None else g.to(d) for g, d in zip(x_grads, dtypes)]
        it = iter(p_grads)
        all_p = [next(it) if ng else None for ng in need_params]
        marker = [None] if ctx.has_marker else []
        cached = [None] if ctx.cached else []
        return (None, *cached, *x_grads, *marker, *all_p)

    @staticmethod
    def forward_cached(node: Any, solution: Any, args: list[Any]) -> Tensor:
        """``y`` of ``solution`` attached to ``args`` (inputs [, marker, parameters]) through
        the node's implicit backward, without solving again."""
        return torch.autograd.Function.apply.__func__(DeclarativeFunction, node,
                                                       _Cached(solution), *args)
