"""The ``torch.autograd.Function`` that joins a node's solve to its implicit backward."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from ._diagnostics import node_name
from ._running import solve_node

__all__ = ["DeclarativeFunction"]


class _Holder:
    """Carries the solution from ``forward`` to ``setup_context`` (and, when set before the
    call, re-attaches a known solution to the inputs without solving again)."""

    __slots__ = ("low", "mode", "solution")

    def __init__(self) -> None:
        self.solution: Any = None
        self.mode: Any = None
        self.low: torch.dtype | None = None


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
        if xs and isinstance(xs[0], _Holder):  # already prepared (torch.func re-dispatch)
            return super().apply(node, *xs)
        _implicit_mode(node)
        params = ()
        if torch.is_grad_enabled() and isinstance(node, torch.nn.Module):
            params = tuple(p for p in node.parameters() if p.requires_grad)
        if params:
            return super().apply(node, _Holder(), *xs, _PARAMS, *params)
        return super().apply(node, _Holder(), *xs)

    @staticmethod
    def forward(node: Any, holder: Any, *args: Any) -> Tensor:  # type: ignore[override]
        """Solve (autograd is off here) and return ``y``; ``args`` = inputs [, marker,
        parameters]. What the backward needs is left in ``holder``."""
        xs, _ = _split(args)
        mode = _implicit_mode(node)
        low = _low_precision(xs)
        if holder.solution is not None:  # re-attached: the solution is known
            sol = holder.solution
            y = sol.y.detach().clone()
            low = None
        else:
            work = _upcast(xs)
            with _no_autocast(work):
                sol = solve_node(node, work)
                if getattr(node, "check_optimality", False):
                    mode.check(node, work, sol)
            y = sol.y if low is None else sol.y.to(low)
        holder.solution, holder.mode, holder.low = sol, mode, low
        return y

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        node, holder, *args = inputs
        xs, params = _split(tuple(args))
        ctx.low = holder.low
        ctx.node = node
        ctx.mode = holder.mode
        ctx.solution = holder.solution
        ctx.n_xs = len(xs)
        ctx.has_marker = len(args) > len(xs)
        ctx.non_tensors = {i: x for i, x in enumerate(xs) if not isinstance(x, Tensor)}
        ctx.need = [isinstance(x, Tensor) and x.requires_grad for x in xs]
        tensors = [x for x in xs if isinstance(x, Tensor)]
        ctx.save_for_backward(output, *tensors, *params)
        ctx.n_params = len(params)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], node: Any, holder: Any,
             *args: Any) -> tuple[Tensor, int]:
        """``torch.func.vmap`` over a node: samples are independent, so the mapped dimension
        is folded into the batch dimension and the node runs once on ``V·B`` samples."""
        size = info.batch_size
        xs, _ = _split(args)
        dims = in_dims[2:2 + len(xs)]
        if any(d is not None for d in in_dims[2 + len(xs) + 1:]):
            raise ValueError(
                f"{node_name(node)}: vmap over a node's parameters is not supported; map over "
                "its inputs (per-sample gradients of parameters work with torch.func.grad "
                "inside vmap over the inputs)."
            )
        batch = None
        for x, d in zip(xs, dims):
            if isinstance(x, Tensor):
                b_dim = 1 if d == 0 else 0
                if d is not None and x.dim() >= 2:
                    batch = x.shape[b_dim]
                elif d is None and x.dim() >= 1:
                    batch = x.shape[0]
        if batch is None:
            raise ValueError(
                f"{node_name(node)}: vmap needs batched tensor inputs (B, ...) under the "
                "mapped dimension; 0-d inputs cannot be mapped over."
            )
        folded = []
        for x, d in zip(xs, dims):
            if not isinstance(x, Tensor) or (d is None and x.dim() == 0):
                folded.append(x)
                continue
            if d is None:
                x = x.unsqueeze(0).expand(size, *x.shape)
            else:
                x = x.movedim(d, 0)
            if x.dim() < 2:
                raise ValueError(
                    f"{node_name(node)}: vmap over a 0-d input is not supported; give it a "
                    "batch dimension."
                )
            folded.append(x.reshape(size * x.shape[1], *x.shape[2:]))
        y = DeclarativeFunction.apply(node, *folded)
        return y.reshape(size, batch, *y.shape[1:]), 0

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        """Implicit differentiation: one batched KKT solve and one double-backward.

        Under ``create_graph=True`` the VJP is computed with differentiable operations
        around ``y`` re-attached to the inputs (implicitly differentiable again), so second
        derivatives are those of implicit differentiation of the first.
        """
        if torch._C._functorch.maybe_current_level() is not None:
            raise RuntimeError(
                f"{node_name(ctx.node)}: the implicit backward cannot run inside torch.func "
                "transforms (grad, jacrev, vjp, jvp, or vmap over the backward): it solves a KKT "
                "system with data-dependent checks. torch.func.vmap over the node's forward is "
                "supported; for gradients use torch.autograd.grad (per-sample gradients: vmap "
                "the forward, then one autograd.grad, since samples are independent)."
            )
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
        return (None, None, *x_grads, *marker, *all_p)

    @staticmethod
    def forward_cached(node: Any, solution: Any, args: list[Any]) -> Tensor:
        """``y`` of ``solution`` attached to ``args`` (inputs [, marker, parameters]) through
        the node's implicit backward, without solving again."""
        holder = _Holder()
        holder.solution = solution
        return torch.autograd.Function.apply.__func__(DeclarativeFunction, node, holder,
                                                       *args)
