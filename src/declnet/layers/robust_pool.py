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

__all__ = ["RobustPool", "RobustVectorPool", "robust_pool", "robust_vector_pool"]

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


def _alpha_rows(
    penalty: Penalty,
    out_shape: tuple[int, ...],
    rows: int,
    x: Tensor,
    kept_dims: tuple[int, ...] = (),
) -> Tensor:
    """The penalty's α as a 0-d tensor or as ``(rows, 1)``, differentiable, in x's dtype.

    A tensor α must broadcast to ``out_shape``, or (with ``keepdim``) to ``out_shape`` with
    size-1 dimensions inserted at ``kept_dims``.
    """
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
    kept_shape = list(out_shape)
    for d in kept_dims:
        kept_shape.insert(d, 1)
    for target, squeeze in ((out_shape, False), (tuple(kept_shape), bool(kept_dims))):
        if alpha.dim() > len(target):
            continue
        try:
            expanded = alpha.expand(target)
        except RuntimeError:
            continue
        if squeeze:
            expanded = expanded.squeeze(kept_dims)
        return expanded.reshape(rows, 1)
    raise ValueError(
        f"alpha of shape {tuple(alpha.shape)} does not broadcast to the pooled output "
        f"shape {out_shape}; use a scalar or a tensor broadcastable to it."
    )


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
    centre = s[:, (n - 1) // 2 : (n - 1) // 2 + 1]
    p1, p2 = kernel("truncated_prefix_sums", x)(s, centre)  # type: ignore[misc]
    # r_k = #{s_i ≤ s_k + 2α}, and l_k = #{j : r_j ≤ k} by counting (int32 halves the memory).
    exit_end = torch.searchsorted(s, s + 2 * a, right=True, out_int32=True)
    counts = torch.zeros(m, n + 1, dtype=torch.int32, device=x.device)
    counts.scatter_add_(1, exit_end, torch.ones_like(exit_end))
    entry_begin = counts.cumsum(-1, dtype=torch.int32)[:, :n]
    del counts
    a2 = (a.to(torch.float64) ** 2).reshape(-1, 1) if a.dim() else a.to(torch.float64) ** 2
    costs = kernel("truncated_window_costs", x)
    best_exit, k_exit = costs(p1, p2, exit_end, a2, True)  # type: ignore[misc]
    best_entry, k_entry = costs(p1, p2, entry_begin, a2, False)  # type: ignore[misc]
    use_exit = best_exit < best_entry
    # Window [begin, end) of the best candidate, end exclusive.
    begin = torch.where(use_exit, k_exit + 1, entry_begin.gather(1, k_entry))
    end = torch.where(use_exit, exit_end.gather(1, k_exit), k_entry + 1)
    # (The clamps only matter for rows holding NaN, whose output is set to NaN later.)
    lo = s.gather(1, begin.clamp(0, n - 1))
    hi = s.gather(1, (end - 1).clamp(0, n - 1))
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
            broadcastable to the output shape, with or without the ``keepdim`` dimensions
            (learnable when it requires grad).
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
    alpha = _alpha_rows(pen, out_shape, flat.shape[0], work, dims if keepdim else ())
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


# --------------------------------------------------------------------------------------------
# Vector pooling: y ∈ R^C minimises Σ_i φ(‖y − x_i‖; α).


def _vector_objective(pen: Penalty, x: Tensor, y: Tensor, a: Tensor) -> Tensor:
    """Σ_i φ(‖y − x_i‖) for x (M, n, C), y (M, C); returns (M,)."""
    r = torch.linalg.vector_norm(y.unsqueeze(1) - x, dim=-1)
    return pen.phi(r, a.reshape(-1, 1) if a.dim() else a).sum(-1)


def _vector_irls(pen: Penalty, x: Tensor, y: Tensor, a: Tensor, max_iter: int) -> Tensor:
    """Iteratively reweighted means ``y ← Σ w_i x_i / Σ w_i`` with ``w_i = φ'(r_i)/r_i``.

    For these penalties each step minimises a quadratic majoriser of the objective, so the
    objective never increases (Weiszfeld-type iteration; mean shift for Welsch).
    """
    ar = a.reshape(-1, 1) if a.dim() else a
    rtol = 8 * _finfo(x).eps
    for _ in range(max_iter):
        r = torch.linalg.vector_norm(y.unsqueeze(1) - x, dim=-1)  # (M, n)
        w = pen.weight(r, ar)
        wsum = w.sum(-1, keepdim=True)
        y_new = torch.where(wsum > 0, (w.unsqueeze(-1) * x).sum(1) / wsum, y)
        step = torch.linalg.vector_norm(y_new - y, dim=-1)
        y = y_new
        scale = torch.linalg.vector_norm(y, dim=-1) + (a.reshape(-1) if a.dim() else a)
        if not bool((step > rtol * scale).any()):
            break
    return y


def _vector_hessian(
    pen: Penalty, x: Tensor, y: Tensor, a: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """H = Σ_i (w_i I + c_i d_i d_iᵀ) (M, C, C), with d (M, n, C), w, c, r (M, n)."""
    ar = a.reshape(-1, 1) if a.dim() else a
    d = y.unsqueeze(1) - x
    r = torch.linalg.vector_norm(d, dim=-1)
    w = pen.weight(r, ar)
    c = pen.radial_excess(r, ar)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    hess = w.sum(-1)[:, None, None] * eye + torch.einsum("mn,mni,mnj->mij", c, d, d)
    return hess, d, r, w, c


def _vector_solve(hess: Tensor, rhs: Tensor, what: str) -> Tensor:
    """Solve H u = rhs per sample (rhs (M, C)); least squares where H is singular."""
    sol, info = torch.linalg.solve_ex(hess, rhs.unsqueeze(-1))
    bad = (info != 0) | ~torch.isfinite(sol).all(dim=(-2, -1))
    bad &= torch.isfinite(hess).all(dim=(-2, -1))  # NaN inputs stay NaN, silently
    if bool(bad.any()):
        warnings.warn(
            f"robust_vector_pool({what}): the Hessian Σ_i ∇²φ(‖y − x_i‖) is singular for "
            f"{int(bad.sum())} output(s); using its least-squares (pseudo-inverse) solution.",
            RuntimeWarning,
            stacklevel=4,
        )
        idx = bad.nonzero().squeeze(-1)
        sol[idx] = torch.linalg.pinv(hess[idx], hermitian=True) @ rhs[idx].unsqueeze(-1)
    return sol.squeeze(-1)


def _solve_vector(pen: Penalty, x: Tensor, a: Tensor) -> Tensor:
    """Minimise Σ_i φ(‖y − x_i‖) for each of M sets x (M, n, C); returns y (M, C)."""
    starts = [x.mean(1)]
    if not pen.is_convex:
        median = x.median(1).values
        nearest = torch.linalg.vector_norm(x - median.unsqueeze(1), dim=-1).argmin(-1)
        starts += [median, x[torch.arange(x.shape[0], device=x.device), nearest]]
    best, best_f = None, None
    for y in starts:
        y = _vector_irls(pen, x, y, a, 1000)
        if pen.is_smooth:
            # Two Newton steps make the answer accurate to machine precision.
            for _ in range(2):
                hess, d, _, w, _ = _vector_hessian(pen, x, y, a)
                grad = (w.unsqueeze(-1) * d).sum(1)
                # Only where H is positive definite (Cholesky succeeds): a descent step.
                chol, info = torch.linalg.cholesky_ex(hess)
                sol = torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)
                ok = (info == 0).unsqueeze(-1) & torch.isfinite(sol)
                y = torch.where(ok, y - sol, y)
        f = _vector_objective(pen, x, y, a)
        if best is None:
            best, best_f = y, f
        else:
            better = (f < best_f).unsqueeze(-1)
            best = torch.where(better, y, best)
            best_f = torch.where(better.squeeze(-1), f, best_f)
    return best  # type: ignore[return-value]


class _RobustVectorPoolFunction(torch.autograd.Function):
    """y (M, C) = argmin_u Σ_i φ(‖u − x_i‖; α) for x (M, n, C); implicit backward."""

    @staticmethod
    def forward(x: Tensor, alpha: Tensor, pen: Penalty) -> Tensor:  # type: ignore[override]
        y = _solve_vector(pen, x, alpha)
        bad = ~torch.isfinite(x.sum(dim=(1, 2)))
        if bool(bad.any()):
            y = torch.where(bad.unsqueeze(-1), math.nan, y)
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def, override]
        x, alpha, pen = inputs
        ctx.pen = pen
        ctx.save_for_backward(x, alpha, output)

    @staticmethod
    @once_differentiable
    def backward(ctx, v):  # type: ignore[no-untyped-def, override]
        x, alpha, y = ctx.saved_tensors
        pen = ctx.pen
        hess, d, r, w, c = _vector_hessian(pen, x, y, alpha)
        u = _vector_solve(hess, v, pen.name)  # H⁻¹ v, (M, C)
        # dJ/dx_i = H_i H⁻¹ v with H_i = w_i I + c_i d_i d_iᵀ (Prop. 4.4, left to right).
        grad = (
            w.unsqueeze(-1) * u.unsqueeze(1)
            + (c * (d @ u.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1) * d
        )
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            ar = alpha.reshape(-1, 1) if alpha.dim() else alpha
            factor = torch.where(r > 0, pen.dphi_dalpha(r, ar) / r, torch.zeros_like(r))
            mixed = (factor.unsqueeze(-1) * d).sum(1)  # D_α ∇_y f, (M, C)
            per_row = -(u * mixed).sum(-1)
            grad_alpha = per_row.sum() if alpha.dim() == 0 else per_row.reshape(alpha.shape)
        return (grad if ctx.needs_input_grad[0] else None), grad_alpha, None


def robust_vector_pool(
    x: Tensor,
    penalty: PenaltyLike,
    dim: DimLike = -1,
    vector_dim: int = 1,
    keepdim: bool = False,
) -> Tensor:
    """Robust pooling of vectors: ``y = argmin_{u ∈ R^C} Σ_i φ(‖u − x_i‖; α)``.

    The points ``x_i ∈ R^C`` run over the pooled dimension(s) ``dim``; their coordinates
    lie along ``vector_dim`` (default 1, the channel dimension of ``(B, C, N)`` or
    ``(B, C, H, W)``). With the quadratic penalty this is the mean of the points.

    Solver: iteratively reweighted means (Weiszfeld / mean-shift; the objective never
    increases), then two Newton steps for the smooth penalties. For the non-convex
    penalties (Welsch, truncated quadratic) it starts from the mean, the coordinatewise
    median and the data point nearest to that median, and keeps the lowest objective: a
    local minimum, not a certified global one (there is no sorting trick in more than one
    dimension). Not compiled; intended for
    moderate ``C`` (the backward factorises one ``C × C`` Hessian per output).

    Backward (Prop. 4.4): ``dJ/dx_i = H_i H⁻¹ v`` with ``H_i = w_i I + c_i d_i d_iᵀ``,
    ``d_i = y − x_i``, ``w_i = φ'(r_i)/r_i``, ``c_i = (φ''(r_i) − w_i)/r_i²`` and
    ``H = Σ_i H_i``; where ``H`` is singular its pseudo-inverse is used, with a warning.
    Sets containing NaN or ±inf give NaN.

    Args:
        x: input, e.g. ``(B, C, N)``; float32 or float64.
        penalty: a :class:`~declnet.layers.Penalty` or its name; a tensor ``α`` must
            broadcast to the output shape without ``vector_dim`` (e.g. ``(B,)``).
        dim: the pooled dimension(s) (the index of the points).
        vector_dim: the dimension holding each point's coordinates; not among ``dim``.
        keepdim: keep the pooled dimensions with size 1.

    Returns:
        ``x`` without the pooled dimensions, e.g. ``(B, C)``.

    Raises:
        ValueError: bad ``dim`` / ``vector_dim``, an empty set, a bad penalty or ``α``.
        TypeError: a non-tensor or non-floating ``x``.

    Example:
        >>> x = torch.randn(4, 3, 100, requires_grad=True)       # 4 sets of 100 points in R^3
        >>> y = robust_vector_pool(x, PseudoHuber(0.5))          # (4, 3)
    """
    pen = as_penalty(penalty)
    x = _check_input(x, "robust_vector_pool")
    dims = _normalise_dims(x, dim)
    (vdim,) = _normalise_dims(x, vector_dim, "vector_dim")
    if vdim in dims:
        raise ValueError(
            f"vector_dim={vector_dim} is also a pooled dim ({dim!r}); the coordinates of the "
            f"points must lie along another dimension of the input of shape {tuple(x.shape)}."
        )
    n = math.prod(x.shape[d] for d in dims)
    if n == 0:
        raise ValueError(
            f"robust_vector_pool: the pooled set is empty: dim={dim!r} of an input of shape "
            f"{tuple(x.shape)} has size 0."
        )
    rest = [d for d in range(x.dim()) if d not in dims and d != vdim]
    rest_shape = tuple(x.shape[d] for d in rest)
    size_c = x.shape[vdim]
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    flat = work.permute(*rest, *dims, vdim).reshape(-1, n, size_c).contiguous()
    if pen.name == "quadratic":
        y = flat.mean(1)
    else:
        alpha = _alpha_rows(pen, rest_shape, flat.shape[0], work)
        if alpha.dim():
            alpha = alpha.reshape(-1)
        y = _RobustVectorPoolFunction.apply(flat, alpha, pen)
    position = sum(1 for d in rest if d < vdim)
    y = y.reshape(*rest_shape, size_c).movedim(-1, position)
    if keepdim:
        for d in dims:
            y = y.unsqueeze(d)
    return y.to(x.dtype)


class RobustVectorPool(torch.nn.Module):
    """Module form of :func:`robust_vector_pool`.

    Args:
        penalty: a :class:`~declnet.layers.Penalty` or its name.
        dim: the pooled dimension(s) (the index of the points).
        vector_dim: the dimension holding the coordinates (default 1, channels).
        keepdim: keep the pooled dimensions with size 1.

    Shapes:
        input ``(B, C, N)`` → output ``(B, C)`` with the defaults.

    Example:
        >>> pool = RobustVectorPool("welsch", dim=(-2, -1))     # (B, C, H, W) -> (B, C)
        >>> y = pool(torch.randn(2, 8, 5, 5))
    """

    def __init__(
        self,
        penalty: PenaltyLike,
        dim: DimLike = -1,
        vector_dim: int = 1,
        keepdim: bool = False,
    ) -> None:
        super().__init__()
        self.penalty = as_penalty(penalty)
        self.dim = dim if isinstance(dim, int) else tuple(dim)
        self.vector_dim = vector_dim
        self.keepdim = keepdim

    def forward(self, x: Tensor) -> Tensor:
        """Pool ``x``; see :func:`robust_vector_pool`."""
        return robust_vector_pool(x, self.penalty, self.dim, self.vector_dim, self.keepdim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, vector_dim={self.vector_dim}, keepdim={self.keepdim}"
