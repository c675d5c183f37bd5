"""Weighted, ridge-regularised linear least squares as a declarative layer.

    y(A, b, w, ρ) = argmin_u Σ_i w_i (a_iᵀu − b_i)² + ρ ‖u‖²

with ``a_iᵀ`` the rows of ``A`` (``fit_intercept=True`` appends a column of ones whose
coefficient, the intercept, is not penalised). The optimality condition is
``H u = Aᵀ W b`` with ``H = Aᵀ W A + ρ D`` (``D`` the identity, without the intercept's
entry), so by implicit differentiation (paper §4, Prop. 4.4) an incoming gradient ``v``
gives, with ``g = H⁻¹ v`` and the residual ``r = A y − b``,

    dL/dA = −(w ⊙ r) gᵀ − (w ⊙ A g) yᵀ,   dL/db = w ⊙ A g,
    dL/dw = −(A g) ⊙ r,                    dL/dρ = −gᵀ D y.

``g`` reuses the forward's factorisation ``H = RᵀR``: a Cholesky factor of the normal
equations when they are well conditioned, otherwise the ``R`` of a QR factorisation of
the stacked matrix ``[√W A; √ρ D]``, which does not square the condition number.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ._checks import as_param, check_tensor
from ._functorch import (
    batch_first,
    differentiable_backward,
    forward_from_backward,
    plain,
    save_for_both,
)
from ._precision import autocast_off, float32_inside

__all__ = ["LeastSquares", "least_squares"]

RidgeLike = Union[float, Tensor]


def _cond_limit(dtype: torch.dtype) -> float:
    """Largest condition number of ``H`` for which Cholesky of the normal equations is
    as accurate as QR needs to be: 1/√eps (about 7e7 in float64, 3e3 in float32)."""
    return 1.0 / math.sqrt(torch.finfo(dtype).eps)


def _factor(a: Tensor, b: Tensor, w: Tensor, ridge: Tensor, pen: Tensor) -> tuple[Tensor, Tensor]:
    """Solve the problem; returns ``(y, R)`` with ``H = RᵀR``, ``R`` upper triangular.

    Args:
        a: ``(B, m, p)`` design (with the intercept column if any), ``b``: ``(B, m)``,
        w: ``(B, m)`` weights, ridge: ``(B,)``, pen: ``(p,)`` 1 for penalised entries.
    """
    aw = a * w.unsqueeze(-1)
    hess = aw.mT @ a + torch.diag_embed(ridge.unsqueeze(-1) * pen)
    rhs = (aw.mT @ b.unsqueeze(-1)).squeeze(-1)
    chol, info = torch.linalg.cholesky_ex(hess)
    if not bool(info.any()):
        diag = torch.diagonal(chol, dim1=-2, dim2=-1)
        # (max/min diag L)² is a cheap lower bound on cond(H).
        cond = (diag.amax(-1) / diag.amin(-1)).square()
        if bool((cond < _cond_limit(a.dtype)).all()):
            y = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
            return y, chol.mT
    # Ill-conditioned (or singular) normal equations: QR of the stacked system.
    p = a.shape[-1]
    sw = w.sqrt().unsqueeze(-1)
    reg = torch.diag_embed((ridge.unsqueeze(-1) * pen).sqrt())
    stacked = torch.cat([sw * a, reg], dim=-2)
    target = torch.cat([sw.squeeze(-1) * b, b.new_zeros((*b.shape[:-1], p))], dim=-1)
    q, r = torch.linalg.qr(stacked, mode="reduced")
    rdiag = torch.diagonal(r, dim1=-2, dim2=-1).abs()
    tiny = rdiag.amax(-1, keepdim=True) * (p * torch.finfo(a.dtype).eps)
    if bool((rdiag <= tiny).any()):
        raise ValueError(
            "least_squares: the problem has no unique solution: the weighted design matrix "
            "has rank below its number of columns (fewer effective rows than unknowns, "
            "zero weights, or collinear columns). Add ridge > 0, or drop columns."
        )
    y = torch.linalg.solve_triangular(r, (q.mT @ target.unsqueeze(-1)), upper=True)
    return y.squeeze(-1), r


@forward_from_backward(outputs=1)
class _LeastSquaresFunction(torch.autograd.Function):
    """Returns ``(y, R)``; ``R`` (non-differentiable) is kept for the backward.

    The ordinary backward reuses ``R``. When the backward is itself differentiated
    (``create_graph=True``) or transformed, ``g = H⁻¹ v`` is instead recomputed from
    ``H = Aᵀ W A + ρ D`` built from the saved inputs, so that it carries its dependence on
    them (with the saved output ``y``, this gives the exact second derivatives).
    """

    @staticmethod
    def forward(
        a: Tensor, b: Tensor, w: Tensor, ridge: Tensor, pen: Tensor
    ) -> tuple[Tensor, Tensor]:
        return _factor(a, b, w, ridge, pen)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        y, factor = output
        ctx.mark_non_differentiable(factor)
        save_for_both(ctx, *inputs, y, factor)

    @staticmethod
    @autocast_off
    def backward(ctx: Any, v: Tensor, _: Any) -> tuple[Tensor | None, ...]:
        a, b, w, ridge, pen, y, factor = ctx.saved_tensors
        if differentiable_backward():
            hess = (a * w.unsqueeze(-1)).mT @ a + torch.diag_embed(ridge.unsqueeze(-1) * pen)
            g = torch.linalg.solve(hess, v)  # H⁻¹ v, connected to A, w and ρ
        else:
            z = torch.linalg.solve_triangular(factor.mT, v.unsqueeze(-1), upper=False)
            g = torch.linalg.solve_triangular(factor, z, upper=True).squeeze(-1)  # H⁻¹ v
        ag = (a @ g.unsqueeze(-1)).squeeze(-1)
        res = (a @ y.unsqueeze(-1)).squeeze(-1) - b
        need = ctx.needs_input_grad
        grad_a = grad_b = grad_w = grad_ridge = None
        if need[0]:
            grad_a = -(w * res).unsqueeze(-1) * g.unsqueeze(-2)
            grad_a = grad_a - (w * ag).unsqueeze(-1) * y.unsqueeze(-2)
        if need[1]:
            grad_b = w * ag
        if need[2]:
            grad_w = -ag * res
        if need[3]:
            grad_ridge = -(g * pen * y).sum(-1)
        return grad_a, grad_b, grad_w, grad_ridge, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], *args: Tensor) -> tuple[Any, Any]:
        """Fold the vmapped dimension into the batch: one call on ``V·B`` problems."""
        size = info.batch_size
        a, b, w, ridge = (batch_first(t, d, size) for t, d in zip(args[:4], in_dims[:4]))
        if in_dims[4] is not None:
            raise ValueError("least_squares: the penalty mask cannot be vmapped.")
        batch = a.shape[1]
        a = a.expand(size, batch, *a.shape[2:])
        y, factor = _LeastSquaresFunction.apply(
            a.reshape(size * batch, *a.shape[2:]),
            b.expand(size, batch, -1).reshape(size * batch, -1),
            w.expand(size, batch, -1).reshape(size * batch, -1),
            ridge.expand(size, batch).reshape(size * batch),
            args[4],
        )
        return (y.reshape(size, batch, -1), factor.reshape(size, batch, *factor.shape[1:])), (0, 0)


@float32_inside
def least_squares(
    A: Tensor,
    b: Tensor,
    weights: Optional[Tensor] = None,
    ridge: RidgeLike = 0.0,
    fit_intercept: bool = False,
) -> Tensor:
    """Batched weighted ridge least squares ``argmin_y Σ wᵢ(aᵢᵀy − bᵢ)² + ρ‖y‖²``.

    Solved through a Cholesky factorisation of the normal equations, or a QR
    factorisation when those are ill-conditioned; the backward reuses the factor
    (module docstring for the formulas). Gradients flow to ``A``, ``b``, ``weights``
    and ``ridge``.

    Args:
        A: ``(..., m, n)`` design matrices, float32 or float64 (``b``, ``weights`` of the
            same dtype). float16 and bfloat16 are solved and differentiated in float32 and
            the result returned in their dtype; autocast is off inside.
        b: ``(..., m)`` targets.
        weights: ``(..., m)`` non-negative observation weights (all ones if None).
        ridge: ``ρ >= 0``, a float or a tensor broadcastable to the batch shape ``...``.
        fit_intercept: also fit an unpenalised intercept (a column of ones in ``A``).

    Returns:
        ``(..., n)`` the solution, or ``(..., n + 1)`` with the intercept last when
        ``fit_intercept`` is set.

    Raises:
        TypeError / ValueError: for bad shapes, dtypes or devices, negative weights or
            ridge, and for problems without a unique solution (rank-deficient with
            ``ridge = 0``).

    Example:
        >>> A = torch.randn(8, 20, 3); b = torch.randn(8, 20)
        >>> y = least_squares(A, b, ridge=0.1)                 # (8, 3)
        >>> y1 = least_squares(A, b, fit_intercept=True)       # (8, 4), intercept last
    """
    A = check_tensor(A, "A", min_dim=2)
    b = check_tensor(b, "b")
    m, n = A.shape[-2:]
    if b.shape[-1] != m:
        raise ValueError(
            f"b must have shape (..., m) with m = {m} rows of A (A is {tuple(A.shape)}); "
            f"got b of shape {tuple(b.shape)}."
        )
    if b.dtype != A.dtype or b.device != A.device:
        raise ValueError(f"b is {b.dtype} on {b.device} but A is {A.dtype} on {A.device}.")
    if weights is None:
        weights = torch.ones_like(b)
    else:
        weights = check_tensor(weights, "weights")
        if weights.dtype != A.dtype or weights.device != A.device:
            raise ValueError(
                f"weights is {weights.dtype} on {weights.device} but A is {A.dtype} on "
                f"{A.device}."
            )
        bad = plain(~torch.isfinite(weights) | (weights < 0))
        if bool(bad.any()):
            raise ValueError(
                "every weight must be finite and >= 0; got "
                f"{plain(weights.detach()).reshape(-1)[bad.reshape(-1)][0].item()}."
            )
    rho = as_param(ridge, A, "ridge")
    if not isinstance(fit_intercept, bool):
        raise TypeError(f"fit_intercept must be a bool; got {fit_intercept!r}.")
    try:
        batch = torch.broadcast_shapes(A.shape[:-2], b.shape[:-1], weights.shape[:-1], rho.shape)
        weights = weights.expand(*batch, m) if weights.shape[-1] in (1, m) else None
    except RuntimeError:
        weights = None
    if weights is None:
        raise ValueError(
            f"the batch shapes of A {tuple(A.shape)}, b {tuple(b.shape)}, weights and "
            f"ridge {tuple(rho.shape)} do not broadcast (weights must be (..., m))."
        )
    A = A.expand(*batch, m, n)
    b = b.expand(*batch, m)
    rho = rho.expand(batch)
    pen = torch.ones(n + int(fit_intercept), dtype=A.dtype, device=A.device)
    if fit_intercept:
        A = torch.cat([A, torch.ones_like(A[..., :1])], dim=-1)
        pen[-1] = 0.0
    p = A.shape[-1]
    flat = (
        A.reshape(-1, m, p),
        b.reshape(-1, m),
        weights.reshape(-1, m),
        rho.reshape(-1),
    )
    y, _ = _LeastSquaresFunction.apply(*flat, pen)
    return y.reshape(*batch, p)


class LeastSquares(nn.Module):
    """Module form of :func:`least_squares`: ``forward(A, b, weights=None)``.

    Args:
        ridge: ``ρ >= 0``; with ``learnable=True`` it is an ``nn.Parameter`` (kept
            non-negative by the caller, a negative value raises).
        fit_intercept: also fit an unpenalised intercept.
        learnable: make the ridge weight learnable.
    """

    def __init__(
        self, ridge: float = 0.0, fit_intercept: bool = False, learnable: bool = False
    ) -> None:
        super().__init__()
        if not float(ridge) >= 0.0:
            raise ValueError(f"ridge must be >= 0; got ridge={ridge}.")
        value = torch.tensor(float(ridge))
        if learnable:
            self.ridge = nn.Parameter(value)
        else:
            self.register_buffer("ridge", value)
        self.fit_intercept = fit_intercept

    def forward(self, A: Tensor, b: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        return least_squares(A, b, weights, self.ridge.to(A.dtype), self.fit_intercept)

    def extra_repr(self) -> str:
        return f"ridge={float(self.ridge.detach()):g}, fit_intercept={self.fit_intercept}"
