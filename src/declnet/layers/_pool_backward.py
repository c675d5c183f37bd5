"""Differentiable closed-form backward of robust pooling (paper §5.1, Table 1).

The fast backward of :mod:`declnet.layers._pool_solvers` (fused kernels, in-place fix-ups of
rare rows) is not itself differentiable. This module computes the same vector-Jacobian
products

    vᵀ ∂y/∂x_i = v φ''(y − x_i) / Σ_j φ''(y − x_j),
    vᵀ ∂y/∂α   = −v Σ_i ∂²φ/∂z∂α (y − x_i) / Σ_j φ''(y − x_j),

with plain differentiable torch operations and no data-dependent Python control flow, so
that

- differentiating them again (``create_graph=True``: gradient penalties, Hessian-vector
  products) gives the second derivatives of implicit differentiation, provided ``y`` is
  the *output* of the pooling Function (saved outputs carry their ``grad_fn``, so the
  dependence of ``y`` on ``x`` and ``α`` is differentiated too);
- ``torch.compile(fullgraph=True)`` can trace them;
- ``torch.func`` transforms can batch them.

Where a penalty has a kink (Huber, truncated quadratic) the second derivative is the one
that exists almost everywhere: the indicators of the inlier sets are locally constant.
Rows whose weights all underflow are handled by rescaling the weights with a constant
(detached) factor, which cancels exactly in the ratio.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from .._diagnostics import DeclarativeWarning
from ._checks import run_value_check, value_check
from ._pool_solvers import overrides
from .penalties import Huber, Penalty, PseudoHuber, TruncatedQuadratic, Welsch

__all__ = ["pool_vjp"]

# |t|² − min |t|² beyond which a rescaled Welsch weight exp(−(t² − t_min²)/2) is 0 in every
# floating dtype (the same bound as the fused kernels: 4 · 64²).
_WELSCH_FAR = 4.0 * 64.0**2


def _warn_if(bad: Tensor, message: str) -> None:
    """Warn with ``message`` (formatted with the count) when ``bad`` has a True entry; under
    ``torch.compile`` the compiled graphs warn likewise when they run (a value check; the
    partitioner may move it into the forward graph, as it needs forward values only)."""
    run_value_check("pool_backward_warning", message, bad)


@value_check("pool_backward_warning")
def _warn_count(tensors: Sequence[Tensor], message: str) -> None:
    (bad,) = tensors
    count = int(bad.sum())
    if count:
        warnings.warn(message.format(count=count), DeclarativeWarning, stacklevel=7)


def _pseudo_huber(x: Tensor, y: Tensor, a: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``φ'' = (1 + t²)^(-3/2)`` and ``∂²φ/∂z∂α = t³ φ''`` with ``t = (y − x)/α``.

    The weights are taken relative to the largest one of the row (in log space, so nothing
    underflows); ``t³ φ'' = τ³`` with ``τ = t / sqrt(1 + t²)`` is bounded by 1.
    """
    bound = math.sqrt(torch.finfo(x.dtype).max) / 2
    t = ((y - x) / a).clamp(-bound, bound)
    log1p_t2 = torch.log1p(t * t)
    log_w = -1.5 * log1p_t2
    top = log_w.amax(-1, keepdim=True).detach()
    w = torch.exp(log_w - top)
    total = w.sum(-1, keepdim=True)
    grad = w * (v / total)
    tau = t * torch.exp(-0.5 * log1p_t2)
    dyda = -(tau * tau * tau).sum(-1, keepdim=True) * torch.exp(-top) / total
    return grad, dyda


def _welsch(x: Tensor, y: Tensor, a: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``φ'' = (1 − t²) e / α²``, ``∂²φ/∂z∂α = t (t² − 2) e / α²``, ``e = exp(−t²/2)``.

    Where ``Σ φ'' ≤ 0`` (to rounding) Table 1 gives no derivative; as in the fast backward,
    the derivative of one mean-shift step from ``y`` is used there, ``e_i / Σ_j e_j``, with
    a :class:`~declnet.DeclarativeWarning`.
    """
    t = (y - x) / a
    t2 = t * t
    rel = t2 - t2.amin(-1, keepdim=True).detach()
    far = rel > _WELSCH_FAR
    e = torch.exp(-0.5 * torch.where(far, _WELSCH_FAR, rel))  # 0 where far
    t = torch.where(far, 0.0, t)
    t2 = torch.where(far, 0.0, t2)
    c = (1 - t2) * e
    curv = c.sum(-1, keepdim=True)
    e_sum = e.sum(-1, keepdim=True)
    degenerate = ~(curv > 64 * torch.finfo(x.dtype).eps * c.abs().sum(-1, keepdim=True))
    degenerate = degenerate & torch.isfinite(y)
    _warn_if(
        degenerate,
        "robust_pool(welsch): Σφ''(y − x_i) ≤ 0 at {count} output(s), so dy/dx is undefined "
        "there (Table 1); the derivative of one mean-shift step from y, e_i / Σ_j e_j with "
        "e_i = exp(−(y − x_i)²/(2α²)), is used instead.",
    )
    safe_curv = torch.where(degenerate, 1.0, curv)
    weight = torch.where(degenerate, e / e_sum, c / safe_curv)
    a_newton = (t * (t2 - 2) * e).sum(-1, keepdim=True)
    a_shift = (t * t2 * e).sum(-1, keepdim=True)
    dyda = torch.where(degenerate, -a_shift / e_sum, -a_newton / safe_curv)
    return weight * v, dyda


def _huber(x: Tensor, y: Tensor, a: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``φ'' = 1[|z| ≤ α]``, ``∂²φ/∂z∂α = sign(z) 1[|z| > α]``; on an interval of minimisers
    (no inlier) the derivative of its midpoint, ``1/2`` on each of the two bounding points."""
    z = y - x
    inlier = (z.abs() <= a).to(x.dtype)
    count = inlier.sum(-1, keepdim=True)
    flat = (count == 0) & torch.isfinite(y)
    safe = torch.where(flat, 1.0, count)
    outer = (torch.sign(z) * (1 - inlier)).sum(-1, keepdim=True)
    below = x <= y - a
    above = x >= y + a
    xj = torch.where(below, x, -math.inf).amax(-1, keepdim=True)
    xk = torch.where(above, x, math.inf).amin(-1, keepdim=True)
    mj = (below & (x == xj)).to(x.dtype)
    mk = (above & (x == xk)).to(x.dtype)
    mid = 0.5 * (
        mj / mj.sum(-1, keepdim=True).clamp_min(1) + mk / mk.sum(-1, keepdim=True).clamp_min(1)
    )
    weight = torch.where(flat, mid, inlier / safe)
    dyda = torch.where(flat, 0.0, -outer / safe)
    return weight * v, dyda


def _truncated(
    x: Tensor, v: Tensor, saved: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    """``1/|W|`` on the chosen inlier window ``W = [lo, hi]`` (saved by the solver, locally
    constant), ``∂y/∂α = 0``."""
    lo, hi, count = saved
    inside = ((x >= lo) & (x <= hi)).to(x.dtype)
    return inside * (v / count), torch.zeros_like(v)


def _generic(pen: Penalty, x: Tensor, y: Tensor, a: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """A user's penalty: its own ``d2phi`` (and ``dphi_dalpha`` when implemented); NaN where
    ``Σ_j φ'' ≤ 0`` (no derivative there), with a :class:`~declnet.DeclarativeWarning`."""
    z = y - x
    h = pen.d2phi(z, a)
    total = h.sum(-1, keepdim=True)
    bad = ~(total > 0) & torch.isfinite(y)
    _warn_if(
        bad,
        f"robust_pool({type(pen).__name__}): Σφ''(y − x_i) ≤ 0 at {{count}} output(s), so "
        "dy/dx is undefined there (Table 1); their gradient is NaN.",
    )
    total = torch.where(bad, math.nan, total)
    grad = h * (v / total)
    if overrides(pen, "dphi_dalpha"):
        dyda = -pen.dphi_dalpha(z, a).sum(-1, keepdim=True) / total
    else:
        dyda = torch.zeros_like(v)
    return grad, dyda


def pool_vjp(
    pen: Penalty, x: Tensor, y: Tensor, a: Tensor, v: Tensor, saved: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    """Differentiable ``(vᵀ ∂y/∂x (M, n), ∂y/∂α (M, 1))`` of robust pooling.

    Args:
        pen: the penalty (its class selects the formula; a user's class uses its
            ``d2phi`` and ``dphi_dalpha``).
        x: ``(M, n)`` pooled rows; y: ``(M, 1)`` the pooled values (the Function's output,
            so that it carries its dependence on ``x``); a: ``α``, 0-d or ``(M, 1)``;
            v: ``(M, 1)`` the incoming gradient; saved: the solver's extra tensors
            (the truncated quadratic's window ``lo``, ``hi``, ``count``).

    Returns:
        The same values as the fast backward, from differentiable operations.
    """
    kind = type(pen)
    if kind is PseudoHuber:
        return _pseudo_huber(x, y, a, v)
    if kind is Welsch:
        return _welsch(x, y, a, v)
    if kind is Huber:
        return _huber(x, y, a, v)
    if kind is TruncatedQuadratic:
        return _truncated(x, v, saved)
    return _generic(pen, x, y, a, v)
