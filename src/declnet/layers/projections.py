"""Euclidean projections onto Lp spheres, Lp balls and the simplex (paper §5.2, Table 2).

Every projection here is a declarative node,

    y(x) = argmin_u ½‖u − x‖²  subject to  ‖u‖_p = r  (sphere)  or  ‖u‖_p ≤ r  (ball),

solved by a specialised batched algorithm and differentiated with a closed-form,
one-pass vector-Jacobian product (Table 2 for p ∈ {1, 2, ∞}; Corollary 4.7 for a
general p ∈ (1, ∞)). No n×n matrix is ever formed.

Conventions shared by all projections (they are repeated where they matter):

* The projection acts along ``dim``; every other dimension is a batch dimension and
  samples are independent.
* ``radius`` (``total`` for the simplex) is a positive float or a tensor that
  broadcasts against the batch shape (``x.shape`` without ``dim``), or against
  ``x.shape`` itself when it keeps ``dim`` with size 1. It may require grad.
* Points exactly on the boundary of a ball are treated as *active*: the output is
  the input, and the gradient is the sphere's (the one-sided gradient from outside,
  which is also what the paper and the generic engine use). Strictly inside the
  ball the output is the input and the Jacobian is the identity.
* ``masked=True`` returns the plateau-free Jacobian D²y of Table 2 for p = 1 and
  p = ∞ (the exact derivative of the solution map wherever it exists); for p = 2 and
  general p, Dy is already exact and ``masked`` changes nothing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from . import _projection_ops as projection_ops
from . import _projection_solvers as solvers
from ._checks import RadiusLike, check_dim, check_kind, check_p, check_radius
from ._functorch import (
    batch_first,
    differentiable_backward,
    forward_from_backward,
    has_tangent,
    save_for_both,
    transforms_active,
)
from ._precision import autocast_off, float32_inside

__all__ = [
    "LpProjection",
    "project_onto_ball",
    "project_onto_simplex",
    "project_onto_sphere",
]

# --------------------------------------------------------------------------------------
# The autograd Function
# --------------------------------------------------------------------------------------


def _vmap_operands(
    size: int, in_dims: tuple[Any, ...], x: Tensor, radius: Any
) -> tuple[Tensor, Any]:
    """``x`` and the radius with the vmapped dimension first (``x`` expanded when only the
    radius is vmapped; an unvmapped tensor radius broadcasts as it is)."""
    xb = batch_first(x, in_dims[0], size)
    if isinstance(radius, Tensor) and in_dims[1] is not None:
        return xb, radius.movedim(in_dims[1], 0)
    return xb, radius


def _l2_backward(
    v: Tensor, x: Tensor, y: Tensor, r: float | Tensor, dim: int, ball: bool
) -> tuple[Tensor, Tensor]:
    """Table 2's p = 2 VJP, ``Dy = (r/‖x‖)(I − ŷŷᵀ)``, without data-dependent branches.

    The same formula as the solvers' fast backward, with ``‖x‖ = m ‖x/m‖`` (``m = max|x|``)
    always, so that it runs under ``torch.func.vmap`` and differentiates twice.
    """
    top = x.abs().amax(dim, keepdim=True)
    norm = top * torch.linalg.vector_norm(x / torch.where(top > 0, top, 1.0), dim=dim, keepdim=True)
    yv = torch.linalg.vecdot(y, v, dim=dim).unsqueeze(dim)
    if ball:
        active = (norm >= r).to(v.dtype)
        factor = r / torch.clamp(norm, min=r)
        radial = active * yv / (r * r)
    else:
        zero = (norm == 0).to(v.dtype)
        factor = r / (norm + zero * r)
        radial = yv / (r * r)
    return v * factor - y * (radial * factor), radial * r


@forward_from_backward(symmetric=True)
class _LpProjectionFunction(torch.autograd.Function):
    """y = Π(x) onto an Lp sphere or ball, with a closed-form one-pass backward.

    Written in the ``forward`` / ``setup_context`` / ``backward`` form. The backward
    recomputes the few per-row facts it needs (‖x‖₂, the inside-the-ball flag) from the
    saved ``x`` with the forward's own expressions, so that decisions agree exactly.
    """

    @staticmethod
    def forward(
        x: Tensor, radius: float | Tensor, p: float, ball: bool, dim: int, masked: bool
    ) -> Tensor:
        if torch.compiler.is_compiling() and projection_ops.is_opaque(p, ball):
            # Iterative, data-dependent solvers: one opaque node of the compiled graph.
            return projection_ops.forward(x, radius, dim, p, ball)
        return solvers.forward(x, radius, dim, p, ball)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, radius, p, ball, dim, masked = inputs
        ctx.p, ctx.ball, ctx.dim, ctx.masked = p, ball, dim, masked
        ctx.radius_is_tensor = isinstance(radius, Tensor)
        ctx.radius_float = None if ctx.radius_is_tensor else radius
        save_for_both(ctx, x, output, *([radius] if ctx.radius_is_tensor else []))

    @staticmethod
    @autocast_off
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:
        p, ball, dim, masked = ctx.p, ctx.ball, ctx.dim, ctx.masked
        x, y, *rest = ctx.saved_tensors
        r = rest[0] if ctx.radius_is_tensor else ctx.radius_float
        if p == 2.0 and differentiable_backward():
            grad_x, grad_r = _l2_backward(v, x, y, r, dim, ball)
        else:
            grad_x, grad_r = solvers.backward(v, x, y, r, dim, p, ball, masked)
        grad_radius = solvers.reduce_to(grad_r, r) if ctx.needs_input_grad[1] else None
        return (grad_x if ctx.needs_input_grad[0] else None), grad_radius, None, None, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], x: Tensor, radius: Any, *rest: Any) -> Any:
        """Every dimension but ``dim`` is a batch dimension: move the vmapped one first."""
        p, ball, dim, masked = rest
        xb, rb = _vmap_operands(info.batch_size, in_dims, x, radius)
        return _LpProjectionFunction.apply(xb, rb, p, ball, dim + 1, masked), 0


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


@float32_inside
def _project(x: Tensor, p: Any, radius: Any, dim: Any, kind: str, masked: bool) -> Tensor:
    p = check_p(p)
    dim = check_dim(x, dim)
    r = check_radius(radius, x, dim)
    ball = kind == "ball"
    needs_grad = x.requires_grad or (isinstance(r, Tensor) and r.requires_grad)
    if (not (needs_grad and torch.is_grad_enabled()) and not transforms_active()
            and not has_tangent(x, r)):
        # Nothing to differentiate: skip the autograd.Function and its bookkeeping.
        return _LpProjectionFunction.forward(x, r, p, ball, dim, bool(masked))
    return _LpProjectionFunction.apply(x, r, p, ball, dim, bool(masked))


def project_onto_sphere(
    x: Tensor, p: float, radius: RadiusLike = 1.0, dim: int = -1, *, masked: bool = False
) -> Tensor:
    """Euclidean projection onto the Lp sphere of the given radius.

    Solves, independently for every slice of ``x`` along ``dim``,

        y = argmin_u ½‖u − x‖²  subject to  ‖u‖_p = radius.

    Solvers: p = 2 closed form; p = 1 the sort-based algorithm of Duchi et al. (and,
    when ‖x‖₁ < r, the nearest facet: every magnitude grows by the same amount);
    p = ∞ clipping (when ‖x‖_∞ < r, the largest magnitude is pushed out to ±r);
    1 < p < ∞ safeguarded Newton on the scalar Lagrange multiplier.

    Non-unique answers are resolved deterministically:

    * x = 0, p = 2: y = r e_1 (the first coordinate along ``dim``); the backward uses
      the tangent projector I − e_1 e_1ᵀ (the Jacobian at x = r e_1), which is finite
      where the true derivative is unbounded.
    * Ties for the largest magnitude (p = ∞, or p > 2 from inside): the first index.
    * Zero coordinates are pushed out with the sign bit of x, so +0 grows positive
      (p = 1 and p < 2 from inside; at x = 0 every coordinate becomes r n^(−1/p)).
    * From inside with general p the problem is not convex; the solver returns the
      stationary point described in ``docs/projections.md`` (the nearest point in tests).

    Backward: the closed-form vector-Jacobian products of Table 2 (p ∈ {1, 2, ∞}) and of
    Corollary 4.7 (general p), in one pass, never forming an n×n matrix. For p = 1 and
    p = ∞ the default is Prop. 4.5's gradient (Table 2's Dy), a valid descent direction;
    ``masked=True`` gives D²y, the exact Jacobian where it exists.

    Args:
        x: Input of shape ``(..., n, ...)`` (floating point); ``n`` is the size along ``dim``.
        p: The norm: 1, 2, ``math.inf`` or any real p > 1.
        radius: A positive float, or a positive tensor broadcastable to the batch shape
            (``x.shape`` without ``dim``) or to ``x.shape`` with size 1 at ``dim``. May
            require grad.
        dim: The dimension to project along.
        masked: Use the plateau-free Jacobian D²y (only changes p = 1 and p = ∞).

    Returns:
        Tensor of the same shape and dtype as ``x`` with ‖y‖_p = radius along ``dim``.

    Raises:
        ValueError: p < 1, a radius that is not finite and > 0, a ``dim`` out of range,
            or a radius whose shape does not broadcast.
        TypeError: a non-floating ``x`` or a ``p`` that is not a number.

    Example:
        >>> x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
        >>> project_onto_sphere(x, p=2)
        tensor([[0.6000, 0.8000],
                [1.0000, 0.0000]])
    """
    return _project(x, p, radius, dim, "sphere", masked)


def project_onto_ball(
    x: Tensor, p: float, radius: RadiusLike = 1.0, dim: int = -1, *, masked: bool = False
) -> Tensor:
    """Euclidean projection onto the Lp ball of the given radius.

    Solves, independently for every slice of ``x`` along ``dim``,

        y = argmin_u ½‖u − x‖²  subject to  ‖u‖_p ≤ radius,

    a convex problem with a unique solution. Strictly inside the ball the output is
    ``x`` and the Jacobian is the identity; on or outside it the output and gradient are
    the sphere's (on the boundary this is the one-sided gradient from outside).
    p = ∞ is exactly ``clamp(x, -r, r)``.

    Args:
        x: Input of shape ``(..., n, ...)`` (floating point); ``n`` is the size along ``dim``.
        p: The norm: 1, 2, ``math.inf`` or any real p > 1.
        radius: A positive float, or a positive tensor broadcastable to the batch shape
            (``x.shape`` without ``dim``) or to ``x.shape`` with size 1 at ``dim``. May
            require grad.
        dim: The dimension to project along.
        masked: Use the plateau-free Jacobian D²y (only changes p = 1 and p = ∞): then
            the p = ∞ gradient equals clamp's (except that coordinates exactly at ±r
            count as clipped) and the p = 1 gradient is zero on the coordinates that
            were projected to zero.

    Returns:
        Tensor of the same shape and dtype as ``x`` with ‖y‖_p ≤ radius along ``dim``.

    Raises:
        ValueError: p < 1, a radius that is not finite and > 0, a ``dim`` out of range,
            or a radius whose shape does not broadcast.
        TypeError: a non-floating ``x`` or a ``p`` that is not a number.

    Example:
        >>> x = torch.tensor([[3.0, -4.0], [0.1, 0.2]])
        >>> project_onto_ball(x, p=1, radius=1.0)
        tensor([[ 0.0000, -1.0000],
                [ 0.1000,  0.2000]])
    """
    return _project(x, p, radius, dim, "ball", masked)


@forward_from_backward(symmetric=True)
class _SimplexFunction(torch.autograd.Function):
    """y = argmin_u ½‖u − x‖² s.t. u ≥ 0, Σ u = total."""

    @staticmethod
    def forward(x: Tensor, total: float | Tensor, dim: int) -> Tensor:
        return solvers.simplex_forward(x, total, dim)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, total, dim = inputs
        ctx.dim = dim
        ctx.total_is_tensor = isinstance(total, Tensor)
        save_for_both(ctx, output, *([total] if ctx.total_is_tensor else []))

    @staticmethod
    @autocast_off
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:
        y, *rest = ctx.saved_tensors
        dim = ctx.dim
        # Dy = diag(s) − s sᵀ / |S| with s the indicator of the support S = {y > 0}.
        grad_x, mean = solvers.simplex_backward(v, y, dim)
        grad_total = mean.sum_to_size(rest[0].shape) if ctx.total_is_tensor else None
        return (grad_x if ctx.needs_input_grad[0] else None), grad_total, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], x: Tensor, total: Any, dim: int) -> Any:
        """Every dimension but ``dim`` is a batch dimension: move the vmapped one first."""
        xb, tb = _vmap_operands(info.batch_size, in_dims, x, total)
        return _SimplexFunction.apply(xb, tb, dim + 1), 0


@float32_inside
def project_onto_simplex(x: Tensor, total: RadiusLike = 1.0, dim: int = -1) -> Tensor:
    """Euclidean projection onto the scaled probability simplex.

    Solves, independently for every slice of ``x`` along ``dim``,

        y = argmin_u ½‖u − x‖²  subject to  u ≥ 0,  Σ_i u_i = total,

    by the sort-based algorithm of Duchi et al.: y = max(x − τ, 0). The backward is the
    closed form Dy = diag(s) − s sᵀ/|S| with S = {i : y_i > 0}; coordinates with
    x_i exactly equal to τ (y_i = 0) are treated as outside the support (one-sided).

    Args:
        x: Input of shape ``(..., n, ...)`` (floating point).
        total: The sum of each output slice: a positive float or tensor, shaped like
            ``radius`` in :func:`project_onto_sphere`. May require grad.
        dim: The dimension to project along.

    Returns:
        Tensor of the same shape as ``x``, non-negative, summing to ``total`` along ``dim``.

    Raises:
        ValueError: a total that is not > 0, a ``dim`` out of range.
        TypeError: a non-floating ``x``.

    Example:
        >>> project_onto_simplex(torch.tensor([0.5, 1.5, -1.0]))
        tensor([0., 1., 0.])
    """
    dim = check_dim(x, dim)
    total = check_radius(total, x, dim, name="total")
    return _SimplexFunction.apply(x, total, dim)


class LpProjection(nn.Module):
    """Euclidean projection onto an Lp sphere or ball as a module.

    ``LpProjection(p, kind)(x)`` is :func:`project_onto_sphere` (``kind="sphere"``) or
    :func:`project_onto_ball` (``kind="ball"``) along ``dim``. A radius given as an
    ``nn.Parameter`` is learned (its gradient is closed form too); any other tensor is
    stored as a buffer.

    Args:
        p: The norm: 1, 2, ``math.inf`` or any real p > 1.
        kind: ``"sphere"`` (‖y‖_p = r) or ``"ball"`` (‖y‖_p ≤ r).
        radius: A positive float or tensor (see :func:`project_onto_sphere`).
        dim: The dimension to project along.
        masked: Use the plateau-free Jacobian D²y of Table 2 (p = 1 and p = ∞).

    Shape:
        - Input: ``(..., n, ...)`` with ``n`` along ``dim``.
        - Output: same shape as the input.

    Raises:
        ValueError: p < 1, an unknown ``kind``, or a radius that is not > 0.

    Example:
        >>> layer = LpProjection(1, kind="ball", radius=nn.Parameter(torch.tensor(2.0)))
        >>> y = layer(torch.randn(8, 16))
        >>> y.abs().sum(-1).max() <= 2.0 + 1e-5
        tensor(True)
    """

    def __init__(
        self,
        p: float,
        kind: str = "sphere",
        radius: RadiusLike = 1.0,
        dim: int = -1,
        masked: bool = False,
    ) -> None:
        super().__init__()
        self.p = check_p(p)
        self.kind = check_kind(kind)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int; got {dim!r}.")
        self.dim = dim
        self.masked = bool(masked)
        if isinstance(radius, nn.Parameter):
            self.radius = radius
        elif isinstance(radius, Tensor):
            self.register_buffer("radius", radius)
        else:
            if isinstance(radius, bool) or not isinstance(radius, (int, float)):
                raise TypeError(f"radius must be a positive float or tensor; got {radius!r}.")
            if not (float(radius) > 0 and math.isfinite(radius)):
                raise ValueError(f"radius must be > 0 and finite; got radius={radius}.")
            self.radius = float(radius)

    def forward(self, x: Tensor) -> Tensor:
        """Project ``x`` (shape ``(..., n, ...)``) along ``self.dim``; same shape out."""
        return _project(x, self.p, self.radius, self.dim, self.kind, self.masked)

    def extra_repr(self) -> str:
        radius = self.radius if not isinstance(self.radius, Tensor) else "tensor"
        return (
            f"p={self.p}, kind={self.kind!r}, radius={radius}, dim={self.dim}, masked={self.masked}"
        )
