"""Public entry points of the implicit engine: the vector-Jacobian product, the full
Jacobian of small nodes, and optimality residuals.

The maths lives in ``_problem`` (the problem at ``(x, y)``), ``_kkt`` (the linear
solves) and ``_backward`` (the VJP); the configuration in
:class:`~declnet.ImplicitBackward`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._backward import problem
from ._diagnostics import OptimalityResidual
from ._forward_mode import jvp as _jvp
from ._modes import ImplicitBackward
from ._running import solve_node

__all__ = ["implicit_jvp", "implicit_vjp", "jacobian", "optimality_residual"]


def _options(node: Any, backward: ImplicitBackward | None) -> ImplicitBackward:
    if backward is not None:
        if not isinstance(backward, ImplicitBackward):
            raise TypeError(
                f"backward must be a declnet.ImplicitBackward, got {type(backward).__name__}."
            )
        return backward
    mode = getattr(node, "backward_mode", None)
    return mode if isinstance(mode, ImplicitBackward) else ImplicitBackward()



def _check_like(fn: str, name: str, value: Any, of: str, like: Tensor) -> None:
    """Raise a clear error unless ``value`` is a tensor shaped like ``like``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor shaped like {of}, got "
                        f"{type(value).__name__}.")
    if value.shape != like.shape:
        raise ValueError(f"{fn}: {name} must have the shape of {of} {tuple(like.shape)}, "
                         f"got {tuple(value.shape)}.")

def implicit_vjp(
    node: Any,
    *xs: Any,
    y: Tensor,
    grad_y: Tensor,
    solution: Any = None,
    params: Sequence[Tensor] = (),
    backward: ImplicitBackward | None = None,
    wrt: Sequence[bool] | None = None,
) -> tuple[Tensor | None, ...]:
    """Vector-Jacobian product ``grad_y · Dy(x)`` of a declarative node, by implicit
    differentiation (Propositions 4.4–4.6, evaluated left to right as in §6.1).

    Solves one KKT system per sample (batched) and makes one double-backward through the
    node's objective and constraints; never forms ``Dy`` or ``D²_XY f``.

    Args:
        node: a :class:`~declnet.DeclarativeNode`.
        *xs: the node's inputs.
        y: ``(B, ...)`` the solution for these inputs (keyword-only).
        grad_y: ``dJ/dy``, the shape of ``y``.
        solution: the :class:`~declnet.Solution` returned by ``solve`` (multipliers, active
            set, Hessian), if any.
        params: extra tensors (e.g. the node's parameters) to differentiate as well.
        backward: solver configuration; defaults to the node's ``backward_mode``.
        wrt: which inputs to differentiate (default: the tensors that require grad).

    Returns:
        One gradient per input (``None`` for inputs not differentiated), followed by one per
        entry of ``params``.

    Raises:
        TypeError: ``y`` or ``grad_y`` is not a tensor.
        ValueError: ``grad_y`` does not have the shape of ``y``; the objective or
            constraints return tensors of the wrong shape.

    Example:
        >>> y = node(x)
        >>> (gx,) = declnet.implicit_vjp(node, x, y=y, grad_y=torch.ones_like(y))
    """
    if not isinstance(y, Tensor):
        raise TypeError(f"implicit_vjp: y must be a tensor, got {type(y).__name__}.")
    _check_like("implicit_vjp", "grad_y", grad_y, "y", y)
    need = None
    if wrt is not None:
        if len(wrt) != len(xs):
            raise ValueError(
                f"implicit_vjp: wrt must have one entry per input ({len(xs)}), got {len(wrt)}."
            )
        need = [bool(w) and isinstance(x, Tensor) and x.is_floating_point()
                for w, x in zip(wrt, xs)]
    options = _options(node, backward)
    x_grads, p_grads = options.vjp(node, xs, y.detach(), grad_y, solution=solution,
                                   params=params, need_grad=need)
    return (*x_grads, *p_grads)


def implicit_jvp(
    node: Any,
    *xs: Any,
    y: Tensor,
    tangents: Sequence[Tensor | None],
    solution: Any = None,
    params: Sequence[Tensor] = (),
    param_tangents: Sequence[Tensor | None] = (),
    backward: ImplicitBackward | None = None,
) -> Tensor:
    """Jacobian-vector product ``Dy(x) · ẋ`` of a declarative node, by forward-mode
    implicit differentiation (Propositions 4.4–4.6).

    Solves one KKT system per sample (batched), ``[H Aᵀ; A 0] [ẏ; ·] = −[B ẋ; C ẋ]`` with
    ``H = D²_YY L``, ``B = D²_XY L``, ``A = D_Y h̃`` and ``C = D_X h̃`` over the active
    constraints; ``B ẋ`` and ``C ẋ`` are Jacobian-vector products, ``B`` is never formed.
    This is what ``torch.func.jvp`` / ``jacfwd`` and ``torch.autograd.forward_ad`` compute
    through a node.

    Args:
        node: a :class:`~declnet.DeclarativeNode`.
        *xs: the node's inputs.
        y: ``(B, ...)`` the solution for these inputs (keyword-only).
        tangents: one entry per input: a tensor shaped like it, or None (no tangent).
        solution: the :class:`~declnet.Solution` returned by ``solve``, if any.
        params: tensors the node uses that require grad (e.g. its parameters), given
            tangents ``param_tangents`` (one per entry, shaped like it, or None).
        backward: solver configuration; defaults to the node's ``backward_mode``.

    Returns:
        ``ẏ`` shaped like ``y``.

    Raises:
        TypeError: ``y`` is not a tensor, or a tangent is not a tensor.
        ValueError: the number of tangents or their shapes do not match.

    Example:
        >>> y = node(x)
        >>> dy = declnet.implicit_jvp(node, x, y=y, tangents=[torch.ones_like(x)])
    """
    if not isinstance(y, Tensor):
        raise TypeError(f"implicit_jvp: y must be a tensor, got {type(y).__name__}.")
    if len(tangents) != len(xs):
        raise ValueError(
            f"implicit_jvp: tangents must have one entry per input ({len(xs)}), got "
            f"{len(tangents)}."
        )
    param_tangents = list(param_tangents) or [None] * len(params)
    if len(param_tangents) != len(params):
        raise ValueError(
            f"implicit_jvp: param_tangents must have one entry per entry of params "
            f"({len(params)}), got {len(param_tangents)}."
        )
    for what, values, tans in (("input", xs, tangents), ("params entry", params,
                                                           param_tangents)):
        for i, (x, t) in enumerate(zip(values, tans)):
            if t is None:
                continue
            if not isinstance(x, Tensor):
                raise TypeError(
                    f"implicit_jvp: {what} {i} is a {type(x).__name__}, not a tensor: it "
                    "cannot have a tangent; pass None for it."
                )
            _check_like("implicit_jvp", f"the tangent of {what} {i}", t, f"{what} {i}", x)
    for i, (p, t) in enumerate(zip(params, param_tangents)):
        if t is not None and not p.requires_grad:
            raise ValueError(
                f"implicit_jvp: params entry {i} has a tangent but does not require grad; "
                "pass tensors the node uses that require grad (e.g. node.parameters())."
            )
    options = _options(node, backward)
    if all(t is None for t in (*tangents, *param_tangents)):
        return torch.zeros_like(y)

    def lead(ts: Sequence[Tensor | None]) -> list[Tensor | None]:
        return [None if t is None else t.unsqueeze(0) for t in ts]

    return _jvp(node, xs, y.detach(), lead(tangents), options=options, solution=solution,
                params=params, param_tangents=lead(param_tangents))[0]


def jacobian(node: Any, xs: Sequence[Any]) -> Tensor | tuple[Tensor, ...]:
    """Full Jacobian ``Dy(x)`` of a node for small problems; see ``DeclarativeNode.jacobian``."""
    solution = solve_node(node, xs)
    y = solution.y
    B = y.shape[0]
    m = math.prod(y.shape[1:])
    eye = torch.eye(m, dtype=y.dtype, device=y.device)
    grad_y = eye.unsqueeze(1).expand(m, B, m).reshape(m, *y.shape)
    need = [isinstance(x, Tensor) and x.is_floating_point() for x in xs]
    options = _options(node, None)
    x_grads, _ = options.vjp(node, xs, y, grad_y, solution=solution, need_grad=need,
                             force_dense=True)
    out = []
    for x, g in zip(xs, x_grads):
        if not (isinstance(x, Tensor) and x.is_floating_point()):
            continue
        if g is None:
            g = torch.zeros(m, *x.shape, dtype=y.dtype, device=y.device)
        if x.dim() == 0:
            out.append(g.reshape(m, 1).expand(m, B).t().reshape(*y.shape))
            continue
        # g[k, b, ...] = ∂y_{b,k}/∂x_{b,...} (samples are independent).
        g = g.movedim(0, 1).reshape(B, *y.shape[1:], *x.shape[1:])
        out.append(g)
    return out[0] if len(out) == 1 else tuple(out)


def optimality_residual(node: Any, *xs: Any, y: Tensor | None = None,
                        solution: Any = None) -> OptimalityResidual:
    """First-order optimality residuals of ``y`` for the node's problem at ``xs``.

    Multipliers come from ``solution`` when given, else by least squares (eq. 25), for
    every kind of node (fixed linear constraints included).

    Args:
        node: a declarative node.
        *xs: its inputs.
        y: ``(B, ...)`` a candidate solution; if None, the node's ``solve`` is called.
        solution: optional :class:`~declnet.Solution` (multipliers, active set).

    Returns:
        An :class:`~declnet.OptimalityResidual` of per-sample tensors.
    """
    if y is None:
        solution = solve_node(node, xs)
        y = solution.y
    options = _options(node, None)
    return problem(node, xs, y, options, solution, [False] * len(xs)).residual()
