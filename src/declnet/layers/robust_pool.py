"""Robust pooling (paper §5.1, Table 1): the M-estimate of location as a layer.

``robust_pool`` replaces mean or max pooling by

    y = argmin_u Σ_i φ(u − x_i; α)

over the pooled elements ``x_i``, for the penalties of :mod:`declnet.layers.penalties`.
The forward solvers are exact and vectorised over every non-pooled element; the backward
is the closed form of Table 1, ``∂y/∂x_i = φ''(y − x_i) / Σ_j φ''(y − x_j)``, computed as
a vector-Jacobian product in one pass (Proposition 4.4).

``robust_vector_pool`` is the vector version: ``y ∈ R^C`` minimises ``Σ_i φ(‖y − x_i‖; α)``
over a set of C-dimensional points.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._kernels import kernel
from .penalties import Penalty, PenaltyLike, as_penalty

__all__ = ["RobustPool", "robust_pool"]

DimLike = Union[int, Sequence[int]]

# Welsch multi-start: the mean plus these quantiles of the data (the median among them).
_WELSCH_QUANTILES = (0.5, 0.1, 0.25, 0.75, 0.9)
_WELSCH_START_STEPS = 3


# --------------------------------------------------------------------------------------------
# Input handling


def _normalise_dims(x: Tensor, dim: DimLike, name: str = "dim") -> tuple[int, ...]:
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if len(dims) == 0:
        raise ValueError(f"{name} must name at least one dimension, got {dim!r}.")
    nd = x.dim()
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"{name} must be an int or a tuple of ints, got {dim!r}.")
        if not -nd <= d < nd:
            raise ValueError(
                f"{name}={d} is out of range for an input of shape {tuple(x.shape)} "
                f"({nd} dimensions): allowed values are {-nd}..{nd - 1}."
            )
        out.append(d % nd)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={dim!r} names the same dimension twice.")
    return tuple(sorted(out))


def _check_input(x: object, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: x must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"{what}: x must be a floating-point tensor (float32 or float64), got {x.dtype}."
        )
    return x


def _alpha_rows(penalty: Penalty, out_shape: tuple[int, ...], rows: int, x: Tensor) -> Tensor:
    """The penalty's α as a 0-d tensor or as ``(rows, 1)``, differentiable, in x's dtype."""
    alpha = penalty.alpha
    if not isinstance(alpha, Tensor):
        return torch.tensor(float(alpha), dtype=x.dtype, device=x.device)
    if bool((~(alpha.detach() > 0)).any()) or not bool(torch.isfinite(alpha.detach()).all()):
        raise ValueError(
            f"{type(penalty).__name__}: alpha must be positive and finite everywhere, got "
            f"min {alpha.detach().min().item():.3g} (a learnable alpha may have left the "
            "allowed range: parametrise it, e.g. alpha = softplus(raw)."
        )
    alpha = alpha.to(device=x.device, dtype=x.dtype)
    if alpha.numel() == 1:
        return alpha.reshape(())
    try:
        expanded = alpha.expand(out_shape) if alpha.dim() <= len(out_shape) else None
    except RuntimeError:
        expanded = None
    if expanded is None:
        raise ValueError(
            f"alpha of shape {tuple(alpha.shape)} does not broadcast to the pooled output "
            f"shape {out_shape}; use a scalar or a tensor broadcastable to it."
        )
    return expanded.reshape(rows, 1)


def _flatten(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, tuple[int, ...]]:
    """Move the pooled dims last and flatten: ``(M, n)`` and the output shape (no keepdim)."""
    k = len(dims)
    moved = x.movedim(dims, tuple(range(x.dim() - k, x.dim())))
    out_shape = tuple(moved.shape[: x.dim() - k])
    n = math.prod(moved.shape[x.dim() - k :])
    return moved.reshape(-1, n).contiguous(), out_shape


def _restore(y: Tensor, out_shape: tuple[int, ...], dims: tuple[int, ...], keepdim: bool) -> Tensor:
    y = y.reshape(out_shape)
    if keepdim:
        for d in dims:
            y = y.unsqueeze(d)
    return y


def _finfo(x: Tensor) -> torch.finfo:
    return torch.finfo(x.dtype)


def _sorted_rows(x: Tensor) -> Tensor:
    """Rows of ``x (M, n)`` sorted ascending (NaN last)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        # numpy's vectorised sort is several times faster than torch.sort on CPU.
        return torch.from_numpy(np.sort(x.detach().numpy(), axis=-1))
    return torch.sort(x, dim=-1).values


def _nonfinite_rows(x: Tensor, row_sum: Tensor) -> Tensor:
    """``(M, 1)`` bool: rows holding a NaN or an infinity (``row_sum`` is a cheap pre-filter)."""
    suspect = ~torch.isfinite(row_sum)
    if bool(suspect.any()):
        bad = torch.zeros_like(suspect)
        idx = suspect.squeeze(-1).nonzero().squeeze(-1)
        bad[idx] = ~torch.isfinite(x[idx]).all(-1, keepdim=True)
        return bad
    return suspect


def _rows(a: Tensor, idx: Tensor) -> Tensor:
    """Select rows of a per-row tensor, passing 0-d tensors through."""
    return a if a.dim() == 0 else a[idx]


# --------------------------------------------------------------------------------------------
# Forward solvers. Each takes x (M, n) and a (0-d or (M, 1)) and returns y (M, 1).


def _bracketed_newton(
    sums: object,
    x: Tensor,
    a: Tensor,
    u: Tensor,
    lo: Tensor,
    hi: Tensor,
    rtol: float,
    max_iter: int,
    polish: int,
) -> Tensor:
    """Safeguarded Newton on ``g(u) = Σφ'(u − x_i)``, monotone, with ``g(lo) ≤ 0 ≤ g(hi)``.

    A Newton step that leaves the bracket, or has no curvature, is replaced by bisection.
    Stops when every row's step is at most ``rtol · (|u| + α)`` and then takes ``polish``
    more steps (one extra Newton step after ``rtol = sqrt(eps)`` reaches machine precision).
    """
    for _ in range(max_iter):
        g, h = sums(x, u, a)  # type: ignore[operator]
        hi = torch.where(g > 0, u, hi)
        lo = torch.where(g < 0, u, lo)
        u_new = torch.where(g == 0, u, u - g / h)
        inside = (u_new >= lo) & (u_new <= hi)
        u_new = torch.where(inside, u_new, 0.5 * (lo + hi))
        step = (u_new - u).abs()
        u = u_new
        if not bool((step > rtol * (u.abs() + a)).any()):
            if polish <= 0:
                break
            polish -= 1
    return u


def _solve_pseudo_huber(x: Tensor, a: Tensor) -> Tensor:
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    u = x.mean(-1, keepdim=True).clamp(lo, hi)
    rtol = math.sqrt(_finfo(x).eps)
    return _bracketed_newton(kernel("pseudo_huber_sums", x), x, a, u, lo, hi, rtol, 100, 1)


def _solve_huber(x: Tensor, a: Tensor) -> Tensor:
    """Finite Newton: on each piece between breakpoints ``x_i ± α`` the gradient is linear, so
    a Newton step lands on the root when the root is on the same piece; bisection otherwise.

    When the minimisers form an interval (no inlier within ``α`` of it, Table 1's
    "non-isolated solutions"), the midpoint of the interval is returned: ``(x_j + x_k)/2``
    for the nearest points ``x_j`` below and ``x_k`` above it.
    """
    sums = kernel("huber_sums", x)
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    u = x.mean(-1, keepdim=True).clamp(lo, hi)
    u = _bracketed_newton(sums, x, a, u, lo, hi, 4 * _finfo(x).eps, 200, 0)
    _, inliers = sums(x, u, a)  # type: ignore[misc]
    flat = (inliers == 0) & torch.isfinite(u)
    if bool(flat.any()):
        idx = flat.squeeze(-1).nonzero().squeeze(-1)
        xs, us, ar = x[idx], u[idx], _rows(a, idx)
        below = torch.where(xs <= us - ar, xs, -math.inf).amax(-1, keepdim=True)
        above = torch.where(xs >= us + ar, xs, math.inf).amin(-1, keepdim=True)
        mid = 0.5 * (below + above)
        u[idx] = torch.where(torch.isfinite(mid), mid, us)
    return u


def _welsch_update(sums: object, x: Tensor, u: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """One safeguarded step for the Welsch objective; returns (new u, |step|).

    Newton's step when the curvature is positive and the step is at most α; otherwise the
    mean-shift step ``Σ e_i x_i / Σ e_i − u`` (a majorise-minimise step, which never
    increases the objective).
    """
    g, h, w = sums(x, u, a)  # type: ignore[operator]
    newton = -a * g / h
    shift = -a * g / w
    use_newton = (h > 0) & (newton.abs() <= a)
    step = torch.where(use_newton, newton, shift)
    step = torch.where(w > 0, step, torch.zeros_like(step))
    return u + step, step.abs()


def _solve_welsch(x: Tensor, a: Tensor) -> Tensor:
    """Multi-start local minimisation, keeping the lowest objective.

    Starts: the mean and the 10, 25, 50, 75 and 90 % quantiles of the data. Each start takes
    a few safeguarded Newton / mean-shift steps; the start with the lowest objective is then
    iterated to convergence. This finds a local minimum that is usually, not always, the
    global one (the benchmark measures how often against a dense grid).
    """
    sums = kernel("welsch_sums", x)
    n = x.shape[-1]
    s = _sorted_rows(x)
    picks = sorted({round(q * (n - 1)) for q in _WELSCH_QUANTILES})
    starts = [x.mean(-1, keepdim=True)] + [s[:, i : i + 1].contiguous() for i in picks]
    del s
    for _ in range(_WELSCH_START_STEPS):
        starts = [_welsch_update(sums, x, u, a)[0] for u in starts]
    best, best_w = starts[0], None
    for u in starts:
        w = sums(x, u, a)[2]  # type: ignore[index, operator]
        if best_w is None:
            best, best_w = u, w
        else:
            better = w > best_w
            best = torch.where(better, u, best)
            best_w = torch.where(better, w, best_w)
    u = best
    rtol = math.sqrt(_finfo(x).eps)
    polish = 1
    for _ in range(100):
        u, step = _welsch_update(sums, x, u, a)
        if not bool((step > rtol * (u.abs() + a)).any()):
            if polish <= 0:
                break
            polish -= 1
    return u


def _solve_truncated(x: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Exact global minimum of ``Σ_i min((u − x_i)², α²)/2`` by enumerating inlier windows.

    Between consecutive breakpoints ``x_i ± α`` the inlier set is a fixed window of the
    sorted data and the objective is the quadratic ``½ SSE(W) + ½ α² (n − |W|)`` (minimised
    at the window's mean). Since the objective is the pointwise minimum of these quadratics
    over all windows, its global minimum is the smallest window cost. With the sorted data
    ``s``: after the exit of ``s_k`` the window is ``[k+1, r_k)`` with
    ``r_k = #{s_i ≤ s_k + 2α}``; after the entry of ``s_k`` it is ``[l_k, k+1)`` with
    ``l_k = #{j : r_j ≤ k}``. Prefix sums give all 2n costs at once.

    Returns y, and the chosen window as a value range ``[lo, hi]`` with its size, all
    ``(M, 1)``. When several windows tie, which one is returned is unspecified.
    """
    m, n = x.shape
    s = _sorted_rows(x)
    acc = torch.float64
    centre = s[:, (n - 1) // 2 : (n - 1) // 2 + 1]
    d = s.to(acc) - centre.to(acc)
    zero = torch.zeros(m, 1, dtype=acc, device=x.device)
    p1 = torch.cat([zero, d.cumsum(-1)], -1)  # (M, n+1)
    p2 = torch.cat([zero, (d * d).cumsum(-1)], -1)
    del d
    r = torch.searchsorted(s, s + 2 * a, right=True)  # (M, n): #{s_i ≤ s_k + 2α}
    counts = torch.zeros(m, n + 1, dtype=torch.int64, device=x.device)
    counts.scatter_add_(1, r, torch.ones_like(r))
    left = counts.cumsum(-1)[:, :n]  # l_k = #{j : r_j ≤ k}
    del counts
    ar = torch.arange(1, n + 1, device=x.device).expand(m, n)
    begin = torch.cat([left, ar], -1)  # entry windows, then exit windows: (M, 2n)
    end = torch.cat([ar, r], -1)
    del left, r
    size = (end - begin).to(acc)
    s1 = p1.gather(1, end) - p1.gather(1, begin)
    sse = (p2.gather(1, end) - p2.gather(1, begin)) - s1 * s1 / size
    a2 = (a.to(acc) ** 2).reshape(-1, 1) if a.dim() else a.to(acc) ** 2
    cost = sse.clamp_min(0) + a2 * (n - size)
    cost = torch.where(size > 0, cost, math.inf)
    best = cost.argmin(-1, keepdim=True)
    lo = s.gather(1, begin.gather(1, best))
    hi = s.gather(1, end.gather(1, best) - 1)
    total, count = kernel("window_sums", x)(x, lo, hi)  # type: ignore[misc]
    return total / count, lo, hi, count


def _solve(kind: str, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    empty = x.new_empty(0)
    if kind == "truncated_quadratic":
        y, lo, hi, count = _solve_truncated(x, a)
    else:
        solver = {
            "pseudo_huber": _solve_pseudo_huber,
            "huber": _solve_huber,
            "welsch": _solve_welsch,
        }[kind]
        y, lo, hi, count = solver(x, a), empty, empty, empty
    bad = _nonfinite_rows(x, x.sum(-1, keepdim=True))
    if bool(bad.any()):
        y = torch.where(bad, math.nan, y)
    return y, lo, hi, count


# --------------------------------------------------------------------------------------------
# Backward: the closed forms of Table 1 as vector-Jacobian products.


def _warn_degenerate(count: int, kind: str) -> None:
    warnings.warn(
        f"robust_pool({kind}): Σφ''(y − x_i) ≤ 0 at {count} output(s), so dy/dx is undefined "
        "there (Table 1); the derivative of one mean-shift step from y, "
        "e_i / Σ_j e_j with e_i = exp(−(y − x_i)²/(2α²)), is used instead.",
        RuntimeWarning,
        stacklevel=4,
    )


def _rescale_rows(x: Tensor, y: Tensor, a: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """For rows ``idx``: ``t = (y − x)/α`` and ``t_min² = min_i t_i²`` (for rescaled weights)."""
    t = (y[idx] - x[idx]) / _rows(a, idx)
    return t, (t * t).amin(-1, keepdim=True)


def _backward_pseudo_huber(x: Tensor, y: Tensor, a: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    total, tcubed = kernel("pseudo_huber_backward_sums", x)(x, y, a)  # type: ignore[misc]
    grad = kernel("pseudo_huber_backward_grad", x)(x, y, a, v / total)
    dyda = -tcubed / total
    # Rows whose weights all underflow (every |y − x_i| ≫ α): rescale by the largest weight,
    # in float64 (a rare path).
    small = ~(total >= math.sqrt(_finfo(x).tiny)) & torch.isfinite(y)
    if bool(small.any()):
        idx = small.squeeze(-1).nonzero().squeeze(-1)
        t = (y[idx].double() - x[idx].double()) / _rows(a, idx).double()
        tmin = t.abs().amin(-1, keepdim=True)
        big = tmin.clamp_min(1)
        tau, mu, rho = t / big, tmin / big, 1 / (big * big)
        w = ((rho + mu * mu) / (rho + tau * tau)) ** 1.5  # (1 + t²)^(-3/2), times a constant
        wsum = w.sum(-1, keepdim=True)
        grad[idx] = (v[idx].double() * w / wsum).to(x.dtype)
        dyda[idx] = (-(t**3 * w).sum(-1, keepdim=True) / wsum).to(x.dtype)
    return grad, dyda


def _backward_welsch(x: Tensor, y: Tensor, a: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    sums = kernel("welsch_backward_sums", x)(x, y, a)
    curv, curv_abs, e_sum, a_newton, a_shift = sums  # type: ignore[misc]
    # Rows whose weights all underflow: recompute with e_i scaled by exp(t_min²/2).
    small = ~(e_sum >= math.sqrt(_finfo(x).tiny)) & torch.isfinite(y)
    if bool(small.any()):
        idx = small.squeeze(-1).nonzero().squeeze(-1)
        t, tmin2 = _rescale_rows(x, y, a, idx)
        t2 = t * t
        e = torch.exp(-0.5 * (t2 - tmin2))
        c = (1 - t2) * e
        curv[idx] = c.sum(-1, keepdim=True)
        curv_abs[idx] = c.abs().sum(-1, keepdim=True)
        e_sum[idx] = e.sum(-1, keepdim=True)
        a_newton[idx] = (t * (t2 - 2) * e).sum(-1, keepdim=True)
        a_shift[idx] = (t * t2 * e).sum(-1, keepdim=True)
    else:
        idx, tmin2 = None, None
    degenerate = ~(curv > 64 * _finfo(x).eps * curv_abs) & torch.isfinite(y)
    n_degenerate = int(degenerate.sum())
    if n_degenerate:
        _warn_degenerate(n_degenerate, "welsch")
    zero = torch.zeros_like(v)
    scale_newton = torch.where(degenerate, zero, v / curv)
    scale_shift = torch.where(degenerate, v / e_sum, zero)
    dyda = torch.where(degenerate, -a_shift / e_sum, -a_newton / curv)
    grad = kernel("welsch_backward_grad", x)(x, y, a, scale_newton, scale_shift)
    if idx is not None:
        t, _ = _rescale_rows(x, y, a, idx)
        t2 = t * t
        e = torch.exp(-0.5 * (t2 - tmin2))
        grad[idx] = (scale_newton[idx] * (1 - t2) + scale_shift[idx]) * e
    return grad, dyda


def _backward_huber(x: Tensor, y: Tensor, a: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    count, outer_sign = kernel("huber_backward_sums", x)(x, y, a)  # type: ignore[misc]
    flat = (count == 0) & torch.isfinite(y)
    scale = torch.where(flat, torch.zeros_like(v), v / count)
    grad = kernel("huber_backward_grad", x)(x, y, a, scale)
    dyda = torch.where(flat, torch.zeros_like(v), -outer_sign / count)
    if bool(flat.any()):
        # y is the midpoint (x_j + x_k)/2 of the interval of minimisers (see _solve_huber).
        idx = flat.squeeze(-1).nonzero().squeeze(-1)
        xs, ys, ar = x[idx], y[idx], _rows(a, idx)
        below = xs <= ys - ar
        above = xs >= ys + ar
        xj = torch.where(below, xs, -math.inf).amax(-1, keepdim=True)
        xk = torch.where(above, xs, math.inf).amin(-1, keepdim=True)
        mj = (below & (xs == xj)).to(x.dtype)
        mk = (above & (xs == xk)).to(x.dtype)
        grad[idx] = 0.5 * v[idx] * (mj / mj.sum(-1, keepdim=True) + mk / mk.sum(-1, keepdim=True))
    return grad, dyda


class _RobustPoolFunction(torch.autograd.Function):
    """y (M, 1) = argmin_u Σ_i φ(u − x_i; α) for x (M, n); closed-form backward (Table 1)."""

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor, alpha: Tensor, kind: str
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _solve(kind, x, alpha)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def, override]
        x, alpha, kind = inputs
        y, lo, hi, count = output
        ctx.kind = kind
        ctx.mark_non_differentiable(lo, hi, count)
        ctx.save_for_backward(x, alpha, y, lo, hi, count)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, *unused):  # type: ignore[no-untyped-def, override]
        x, alpha, y, lo, hi, count = ctx.saved_tensors
        kind = ctx.kind
        v = grad_y
        if kind == "truncated_quadratic":
            grad = kernel("window_grad", x)(x, lo, hi, v / count)
            # The window is locally constant in α, so dy/dα = 0 wherever it exists.
            dyda = torch.zeros_like(v)
        elif kind == "pseudo_huber":
            grad, dyda = _backward_pseudo_huber(x, y, alpha, v)
        elif kind == "huber":
            grad, dyda = _backward_huber(x, y, alpha, v)
        else:
            grad, dyda = _backward_welsch(x, y, alpha, v)
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad_alpha = (v * dyda).sum_to_size(alpha.shape) if alpha.dim() else (v * dyda).sum()
        return (grad if ctx.needs_input_grad[0] else None), grad_alpha, None


# --------------------------------------------------------------------------------------------
# Public API


def robust_pool(
    x: Tensor, penalty: PenaltyLike, dim: DimLike = -1, keepdim: bool = False
) -> Tensor:
    """Robust pooling: ``y = argmin_u Σ_i φ(u − x_i; α)`` over the elements of ``dim``.

    Solvers (exact, vectorised over all non-pooled elements):

    - ``Quadratic``: the mean.
    - ``PseudoHuber``: safeguarded Newton from the mean, bracketed by ``[min x, max x]``,
      to machine precision.
    - ``Huber``: finite Newton (exact on the piece holding the root); when the minimisers
      form an interval its midpoint is returned.
    - ``TruncatedQuadratic``: the exact global minimum by enumerating the inlier windows of
      the sorted data with prefix sums (O(n log n)); ties between windows are broken
      arbitrarily.
    - ``Welsch``: multi-start (mean and data quantiles) safeguarded Newton / mean-shift;
      the lowest objective found, usually but not always the global minimum.

    Backward (Table 1): ``∂y/∂x_i = φ''(y − x_i) / Σ_j φ''(y − x_j)``, one pass, and, when
    ``α`` is a tensor that requires grad, ``∂y/∂α = −Σ_i ∂²φ/∂z∂α / Σ_j φ''``. Where Table 1
    gives no derivative:

    - Huber on an interval of minimisers (no inliers): the derivative of the returned
      midpoint, ``1/2`` for each of the two points bounding the interval, ``∂y/∂α = 0``.
    - Welsch with ``Σ_j φ'' ≤ 0`` (to rounding): the derivative of one mean-shift step from
      y, ``e_i / Σ_j e_j`` with ``e_i = exp(−(y − x_i)²/2α²)``, a convex combination like a
      weighted mean; a ``RuntimeWarning`` says how many outputs were affected.
    - Truncated quadratic: ``1/|W|`` on the chosen inlier window ``W`` (one-sided where a
      point sits exactly at distance α), and ``∂y/∂α = 0``.

    Welsch weights are rescaled before dividing so that nothing underflows. Pooled sets that
    contain NaN or ±inf give NaN (the quadratic penalty follows ``torch.mean``); other outputs
    are unaffected. Double backward is not supported.

    Args:
        x: input of any shape ``(*, n_1, ..., n_k, *)``, float32 or float64 (float16 and
            bfloat16 are computed in float32), on any device.
        penalty: a :class:`~declnet.layers.Penalty` (e.g. ``Welsch(alpha=0.5)``) or its name
            (``"quadratic"``, ``"pseudo_huber"``, ``"huber"``, ``"welsch"``,
            ``"truncated_quadratic"``, with ``α = 1``). ``α`` may be a float or a tensor
            broadcastable to the output shape (learnable when it requires grad).
        dim: the dimension(s) to pool over, e.g. ``-1`` or ``(-2, -1)`` for global 2-D pooling.
        keepdim: keep the pooled dimensions with size 1.

    Returns:
        ``x`` with the pooled dimensions removed (or of size 1 when ``keepdim``).

    Raises:
        ValueError: ``dim`` out of range or repeated, an empty pooled set, an unknown
            penalty name, ``α ≤ 0`` or an ``α`` that does not broadcast.
        TypeError: a non-tensor or non-floating ``x``, or a penalty of the wrong type.

    Example:
        >>> x = torch.randn(8, 64, 1024, requires_grad=True)     # (B, C, N)
        >>> y = robust_pool(x, Welsch(alpha=0.5), dim=-1)        # (B, C)
        >>> y.sum().backward()
    """
    pen = as_penalty(penalty)
    x = _check_input(x, "robust_pool")
    dims = _normalise_dims(x, dim)
    n = math.prod(x.shape[d] for d in dims)
    if n == 0:
        raise ValueError(
            f"robust_pool: the pooled set is empty: dim={dim!r} of an input of shape "
            f"{tuple(x.shape)} has size 0; pool over a non-empty dimension."
        )
    if pen.name == "quadratic":
        return x.mean(dim=dims, keepdim=keepdim)
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    flat, out_shape = _flatten(work, dims)
    alpha = _alpha_rows(pen, out_shape, flat.shape[0], work)
    y = _RobustPoolFunction.apply(flat, alpha, pen.name)[0]
    return _restore(y, out_shape, dims, keepdim).to(x.dtype)


class RobustPool(torch.nn.Module):
    """Module form of :func:`robust_pool`.

    The penalty is a submodule, so a learnable ``α`` (an ``nn.Parameter`` given to the
    penalty) appears in :meth:`parameters`.

    Args:
        penalty: a :class:`~declnet.layers.Penalty` or its name.
        dim: the dimension(s) to pool over.
        keepdim: keep the pooled dimensions with size 1.

    Shapes:
        input ``(*, n, *)``; output the input without the pooled dimensions.

    Example:
        >>> pool = RobustPool(PseudoHuber(alpha=torch.nn.Parameter(torch.tensor(1.0))))
        >>> y = pool(torch.randn(8, 64, 1024))                   # (8, 64)
    """

    def __init__(self, penalty: PenaltyLike, dim: DimLike = -1, keepdim: bool = False) -> None:
        super().__init__()
        self.penalty = as_penalty(penalty)
        self.dim = dim if isinstance(dim, int) else tuple(dim)
        self.keepdim = keepdim

    def forward(self, x: Tensor) -> Tensor:
        """Pool ``x``; see :func:`robust_pool`."""
        return robust_pool(x, self.penalty, self.dim, self.keepdim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, keepdim={self.keepdim}"
