"""The ``torch.autograd.Function`` that joins a node's solve to its implicit backward."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from ._diagnostics import node_name
from ._running import solve_node
from ._transforms import ImplicitJVP, ImplicitVJP, Spec

__all__ = ["DeclarativeFunction"]


class _Holder:
    """Carries the solution from ``forward`` to ``setup_context`` (and, when set before the
    call, re-attaches a known solution to the inputs without solving again)."""

    __slots__ = ("buffer_names", "low", "mode", "param_names", "solution")

    def __init__(self) -> None:
        self.solution: Any = None
        self.mode: Any = None
        self.low: torch.dtype | None = None
        self.param_names: list[str] = []
        self.buffer_names: frozenset[str] = frozenset()


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


def _has_tangent(t: Tensor) -> bool:
    """Whether ``t`` carries a forward-mode tangent (dual numbers or ``torch.func.jvp``)."""
    return torch.autograd.forward_ad.unpack_dual(t).tangent is not None


def _implicit_mode(node: Any) -> Any:
    mode = getattr(node, "backward_mode", None)
    if not callable(getattr(mode, "vjp", None)):
        raise TypeError(
            f"{node_name(node)}: DeclarativeFunction differentiates implicitly, but the node's "
            f"backward is {type(mode).__name__}; call the node (or declnet.declarative) "
            "instead, which follows the node's backward mode."
        )
    return mode


def _undead(t: Tensor) -> Tensor:
    """``t`` without ``torch.func`` wrappers of transforms that have already returned (the
    tensors saved under ``torch.func.vjp`` when its ``vjp_fn`` runs later): the engine's
    operations would otherwise see them as constants and return zero gradients."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        inner = torch._C._functorch.unwrap_if_dead(t)
        if inner is t:
            break
        t = inner
    return t


def _saved(ctx: Any) -> tuple[Tensor, list[Any], list[Tensor]]:
    """``(y, inputs, parameters)`` saved by ``setup_context``."""
    saved = [_undead(t) for t in ctx.saved_tensors]
    y, rest = saved[0], list(saved[1:])
    params = rest[len(rest) - ctx.n_params:] if ctx.n_params else []
    tensors = iter(rest[: len(rest) - ctx.n_params])
    xs = [ctx.non_tensors[i] if i in ctx.non_tensors else next(tensors)
          for i in range(ctx.n_xs)]
    return y, xs, params


def _need_params(ctx: Any) -> list[bool]:
    """Which saved parameters required grad when the node ran (their saved copies may be
    unwrapped since)."""
    start = 2 + ctx.n_xs + int(ctx.has_marker)
    return [bool(n) for n in ctx.needs_input_grad[start:start + ctx.n_params]]


def _spec(ctx: Any, need: list[bool], param_names: list[str]) -> Spec:
    return Spec(ctx.node, ctx.mode, ctx.solution, ctx.low, ctx.n_xs, dict(ctx.non_tensors),
                need, param_names, len(param_names))


def _transform_backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
    """The backward under ``torch.func`` transforms, through :class:`ImplicitVJP`."""
    y, xs, params = _saved(ctx)
    need_params = _need_params(ctx)
    grad_params = [p for p, n in zip(params, need_params) if n]
    names = [n for n, ng in zip(ctx.param_names, need_params) if ng]
    marker = [None] if ctx.has_marker else []
    if not any(ctx.need) and not grad_params:
        return (None, None, *([None] * ctx.n_xs), *marker, *([None] * len(params)))
    spec = _spec(ctx, list(ctx.need), names)
    x_tensors = [x for x in xs if isinstance(x, Tensor)]
    outs = iter(ImplicitVJP.apply(spec, grad_y.unsqueeze(0), y, *x_tensors, *grad_params))
    x_grads = [next(outs).squeeze(0) if n else None for n in ctx.need]
    p_grads = [next(outs).squeeze(0) if n else None for n in need_params]
    return (None, None, *x_grads, *marker, *p_grads)


class DeclarativeFunction(torch.autograd.Function):
    """Autograd function of a declarative node: solve forward, implicit VJP backward.

    ``DeclarativeFunction.apply(node, *xs)`` returns the node's solution ``y`` for inputs
    ``xs``; the backward pass calls the node's :class:`~declnet.ImplicitBackward`. Inputs in
    float16 or bfloat16 are solved and differentiated in float32 (autocast off inside), and
    ``y`` and the gradients come back in the inputs' dtype. The
    node's learnable parameters are passed along, so they receive gradients (and carry
    forward-mode tangents) too. Calling the node (or :func:`~declnet.declarative`) is the
    usual way in.

    ``torch.func`` transforms compose with it: ``vmap`` folds the mapped dimension into the
    batch; ``grad``, ``vjp``, ``jacrev`` and ``vmap`` over them (per-sample gradients)
    reach the same implicit VJP, and ``jvp``, ``jacfwd`` and ``torch.autograd.forward_ad``
    the implicit JVP (:mod:`declnet._transforms`). Second derivatives by nested
    transforms raise; double backward with ``torch.autograd.grad(..., create_graph=True)``
    is supported.
    """

    @classmethod
    def apply(cls, node: Any, *xs: Any) -> Tensor:  # type: ignore[override]
        """``y`` for inputs ``xs``, differentiable w.r.t. ``xs`` and the node's parameters."""
        if xs and isinstance(xs[0], _Holder):  # already prepared (torch.func re-dispatch)
            return super().apply(node, *xs)
        _implicit_mode(node)
        holder = _Holder()
        named: list[tuple[str, Tensor]] = []
        if isinstance(node, torch.nn.Module):
            # Parameters, and buffers that are differentiated (e.g. passed to
            # torch.func.functional_call under torch.func.grad): without them here their
            # gradient would silently be zero.
            grad = torch.is_grad_enabled()
            buffers = [(n, b) for n, b in node.named_buffers() if b.is_floating_point()]
            named = [(n, p) for n, p in [*node.named_parameters(), *buffers]
                     if (grad and p.requires_grad) or _has_tangent(p)]
            holder.buffer_names = frozenset(n for n, _ in buffers)
        if named:
            holder.param_names = [n for n, _ in named]
            return super().apply(node, holder, *xs, _PARAMS, *(p for _, p in named))
        return super().apply(node, holder, *xs)

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
        ctx.param_names = list(holder.param_names)
        ctx.buffer_names = holder.buffer_names
        ctx.n_xs = len(xs)
        ctx.has_marker = len(args) > len(xs)
        ctx.non_tensors = {i: x for i, x in enumerate(xs) if not isinstance(x, Tensor)}
        ctx.need = [isinstance(x, Tensor) and x.requires_grad for x in xs]
        tensors = [x for x in xs if isinstance(x, Tensor)]
        ctx.save_for_backward(output, *tensors, *params)
        ctx.save_for_forward(output, *tensors, *params)
        ctx.n_params = len(params)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], node: Any, holder: Any,
             *args: Any) -> tuple[Tensor, int]:
        """``torch.func.vmap`` over a node: samples are independent, so the mapped dimension
        is folded into the batch dimension and the node runs once on ``V·B`` samples (the
        solution of the folded batch is kept in ``holder`` for the backward)."""
        size = info.batch_size
        xs, params = _split(args)
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
        # The same holder: the solution of the folded batch reaches the backward.
        tail = [_PARAMS, *params] if params else []
        y = DeclarativeFunction.apply(node, holder, *folded, *tail)
        return y.reshape(size, batch, *y.shape[1:]), 0

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        """Implicit differentiation: one batched KKT solve and one double-backward.

        Under ``create_graph=True`` the VJP is computed with differentiable operations
        around ``y`` re-attached to the inputs (implicitly differentiable again), so second
        derivatives are those of implicit differentiation of the first.

        Under ``torch.func`` transforms (``grad``, ``vjp``, ``jacrev``, ``vmap`` over a
        backward) the VJP goes through :class:`~declnet._transforms.ImplicitVJP`, which
        the transforms unwrap level by level down to the same engine; a second derivative
        through it raises.
        """
        if torch._C._functorch.is_legacy_batchedtensor(grad_y):
            raise RuntimeError(
                f"{node_name(ctx.node)}: torch.autograd.grad(..., is_grads_batched=True) runs "
                "the backward under PyTorch's legacy vmap prototype, which the implicit "
                "backward does not support. For many vector-Jacobian products at once use "
                "torch.func.vmap over the vjp_fn of torch.func.vjp (or torch.func.jacrev), "
                "or node.jacobian(x) for full Jacobians."
            )
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor
        if torch._C._are_functorch_transforms_active() or wrapped(grad_y) or any(
                wrapped(t) for t in ctx.saved_tensors):
            return _transform_backward(ctx, _undead(grad_y))
        y, xs, params = _saved(ctx)
        need_params = _need_params(ctx)
        grad_params = [p for p, ng in zip(params, need_params) if ng]
        sol = ctx.solution
        create_graph = torch.is_grad_enabled()
        dtypes = [x.dtype if isinstance(x, Tensor) else None for x in xs]
        if ctx.low is not None:  # half precision: the backward runs in float32 too
            xs = _upcast(xs)
            grad_y = grad_y.float()
            y = sol.y
        if create_graph:
            buffers = [n for n, ng in zip(ctx.param_names, need_params)
                       if ng and n in ctx.buffer_names]
            if buffers:
                raise RuntimeError(
                    f"{node_name(ctx.node)}: double backward (create_graph=True) with respect "
                    f"to the node's buffers {buffers}, which require grad, is not supported; "
                    "register them as nn.Parameter instead (first derivatives of buffers "
                    "work)."
                )
            attach = [*xs, _PARAMS, *params] if params else list(xs)
            y = DeclarativeFunction.forward_cached(ctx.node, sol, attach, ctx.param_names)
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
    def jvp(ctx: Any, *tangents: Any) -> Tensor:
        """Forward mode (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``):
        ``ẏ = Dy · ẋ`` by one batched KKT solve with the active constraints as equalities,
        ``[H Aᵀ; A 0] [ẏ; ·] = −[B ẋ; C ẋ]`` (Propositions 4.4–4.6)."""
        y, xs, params = _saved(ctx)
        x_tans = list(tangents[2:2 + ctx.n_xs])
        p_tans = list(tangents[2 + ctx.n_xs + int(ctx.has_marker):])
        need = [isinstance(x, Tensor) and x.is_floating_point() and t is not None
                for x, t in zip(xs, x_tans)]
        moving = [(p, n, t) for p, n, t in zip(params, ctx.param_names, p_tans)
                  if t is not None]
        if not any(need) and not moving:
            return torch.zeros_like(y)
        spec = _spec(ctx, need, [n for _, n, _ in moving])
        dirs = [t.unsqueeze(0) for t, n in zip(x_tans, need) if n]
        dirs += [t.unsqueeze(0) for _, _, t in moving]
        x_tensors = [x for x in xs if isinstance(x, Tensor)]
        dy = ImplicitJVP.apply(spec, y, *x_tensors, *(p for p, _, _ in moving), *dirs)
        return dy.squeeze(0)

    @staticmethod
    def forward_cached(node: Any, solution: Any, args: list[Any],
                       param_names: Any = ()) -> Tensor:
        """``y`` of ``solution`` attached to ``args`` (inputs [, marker, parameters named
        ``param_names`` in the node]) through the node's implicit backward, without solving
        again."""
        holder = _Holder()
        holder.solution = solution
        holder.param_names = list(param_names)
        return torch.autograd.Function.apply.__func__(DeclarativeFunction, node, holder,
                                                       *args)
