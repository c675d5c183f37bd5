"""Forward solvers and closed-form backward of robust pooling (paper §5.1, Table 1).

Each solver works on rows: ``x (M, n)`` (one pooled set per row) and ``a``, the scale
``α`` as a 0-d tensor or ``(M, 1)``; it returns ``y (M, 1)`` and the tensors its backward
needs. The solvers are registered per penalty class in :data:`RULES` (one
:class:`PoolRule` per class), so a new penalty touches one place. A penalty class without a
rule (a user's :class:`~declnet.layers.Penalty` subclass) gets :func:`generic_rule`.

The autograd Function, the functional form and the Module are in
:mod:`declnet.layers.robust_pool`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .._diagnostics import DeclarativeWarning
from . import _kernels as kernels
from ._kernels import kernel
from .penalties import Huber, Penalty, PseudoHuber, TruncatedQuadratic, Welsch

__all__ = [
    "RULES",
    "PoolRule",
    "generic_rule",
    "generic_solve",
    "has_closed_form_backward",
    "keep_lower",
    "overrides",
    "rule_for",
    "solve_rows",
]

# Welsch multi-start: the mean, these quantiles of the data (the median among them), and the
# midpoints of the shortest windows holding these fractions of the data.
_WELSCH_QUANTILES = (0.5, 0.1, 0.25, 0.75, 0.9)
_WELSCH_WINDOWS = (0.5, 0.125, 1 / 32)
_WELSCH_START_STEPS = 2
_WELSCH_SAME_START = 0.25  # starts closer than this many α to an earlier one are skipped
# Histogram starts (see _welsch_histogram_starts): bins of α / _WELSCH_BINS_PER_ALPHA, at
# most _WELSCH_MAX_BINS of them, smoothed over ± _WELSCH_SMOOTH α; the _WELSCH_PEAKS highest
# peaks are tried, those below _WELSCH_PEAK_REL of the highest are not.
_WELSCH_BINS_PER_ALPHA = 4
_WELSCH_MAX_BINS = 512
_WELSCH_SMOOTH = 3.0
_WELSCH_PEAKS = 3
_WELSCH_PEAK_REL = 0.5


def keep_lower(
    best: Tensor | None, best_f: Tensor | None, y: Tensor, f: Tensor
) -> tuple[Tensor, Tensor]:
    """Of two candidate answers per row (``best`` with objective ``best_f``, ``y`` with
    ``f``; ``f`` shaped ``(M, 1)``, broadcasting over ``y``), the one with the lower
    objective (the earlier on ties); ``(y, f)`` when there is no ``best`` yet."""
    if best is None or best_f is None:
        return y, f
    better = f < best_f
    return torch.where(better, y, best), torch.where(better, f, best_f)


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


def _step_tolerance(u: Tensor, a: Tensor, rtol: float, eps: float) -> Tensor:
    """The largest step that counts as small: ``max(rtol √((|u| + α) α), 2 eps |u|)``.

    With ``rtol = √eps``, a Newton step ``s`` this small leaves an error ``K s²`` (``K`` of
    order ``1 / α``) below ``eps (|u| + α)``, however small ``α`` is beside ``|u|`` (a
    tolerance ``rtol (|u| + α)`` would stop rows far from the root when ``α ≪ |u|``). A step
    within two units in the last place of ``u`` is small: ``u`` cannot be resolved further.
    Computed without overflow or underflow for every finite ``u`` and ``α > 0``.
    """
    root = (0.5 * u.abs() + 0.5 * a).sqrt() * a.sqrt()  # √((|u| + α) α) / √2
    return torch.maximum(rtol * math.sqrt(2.0) * root, 2 * eps * u.abs())


def _iterate_rows(
    update: Callable[[Tensor, Tensor, tuple[Tensor, ...]], tuple[Tensor, ...]],
    x: Tensor,
    a: Tensor,
    state: tuple[Tensor, ...],
    rtol: float,
    max_iter: int,
    polish: int,
    pending: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Run ``state, step[, final] = update(x, a, state)`` per row until each row has converged.

    ``state[0]`` is the estimate ``u (M, 1)``. A row has converged once its step has been
    small (:func:`_step_tolerance`) on ``polish + 1`` iterations (NaN rows count as
    converged), or as soon as ``update`` returns a ``final`` mask ``(M, 1)`` true for it (a
    step known to have reached machine precision). ``pending`` ``(M, 1)`` int32, when
    given, is how many more small steps each row needs at the start (0: already converged).
    When at least half of the remaining rows have converged they are set aside, so a few
    slow rows never cost full passes over the input. A converged row's state is never
    changed again. Returns the final state (each entry for all ``M`` rows).
    """
    result = tuple(t.clone() for t in state)
    rows = torch.arange(x.shape[0], device=x.device)
    eps = _finfo(x).eps
    if pending is None:
        pending = torch.full_like(state[0], polish + 1, dtype=torch.int32)
    for it in range(max_iter + 1):
        done = (pending <= 0).squeeze(-1)
        n_done = int(done.sum())
        if n_done == rows.numel() or it == max_iter:
            break
        if n_done and 2 * n_done >= rows.numel():
            for r, t in zip(result, state):
                r[rows[done]] = t[done]
            keep = (~done).nonzero().squeeze(-1)
            rows, x, pending = rows[keep], x[keep], pending[keep]
            a = a if a.dim() == 0 else a[keep]
            state = tuple(t[keep] for t in state)
            n_done = 0
        out = update(x, a, state)
        new_state = out[0]
        if n_done:  # converged rows still in the batch keep their state
            frozen = done.unsqueeze(-1)
            new_state = tuple(torch.where(frozen, t, t_new) for t, t_new in zip(state, new_state))
        state, step = new_state, out[1]
        small = ~(step > _step_tolerance(state[0], a, rtol, eps))
        pending = pending - small.to(torch.int32)
        if len(out) > 2:
            pending = torch.where(out[2], 0, pending)
    for r, t in zip(result, state):
        r[rows] = t
    return result


def _huber_step(
    u: Tensor, lo: Tensor, hi: Tensor, a: Tensor, g: Tensor, h: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One safeguarded Newton step on the Huber gradient ``g(u) = Σφ'(u − x_i)`` (monotone,
    piecewise linear, slope ``h`` = the number of strict inliers) from ``g``, ``h`` at ``u``.

    Returns the new ``u``, the bracket ``lo ≤ root ≤ hi`` and the step's size. A Newton step
    that does not land strictly inside the bracket (one onto an end of it would cycle between
    the two ends), or has no curvature, is replaced by bisection, whose step counts as
    ``inf`` until the bracket is at machine precision: when ``α`` is below the resolution of
    ``x`` the root is found by bisection alone. A step below the resolution of ``u`` leaves
    it unchanged. Without a strict inlier ``g = α k`` for an integer ``k``: ``|g| < α / 2``
    is ``k = 0``, an interval of minimisers, where ``u`` stays (the sum's rounding is far
    below ``α / 2``).
    """
    zero = (g == 0) | ((h == 0) & (g.abs() < 0.5 * a))
    u_new = torch.where(zero, u, u - g / h)
    return _safeguard(u, u_new, g, lo, hi, a, eps)[:4]


def _safeguard(
    u: Tensor, u_new: Tensor, g: Tensor, lo: Tensor, hi: Tensor, a: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The bracket update and bisection safeguard of a step from ``u`` to ``u_new`` on a
    monotone ``g`` (of the sign of ``g(u)``): returns the accepted ``u``, the new bracket
    ``lo, hi``, the step's size (``inf`` for a bisection step until the bracket is at machine
    precision) and whether the step was kept. A step is kept when it lands strictly inside
    the bracket (one onto an end would cycle between the two ends on a piecewise-linear
    ``g``) or leaves ``u`` unchanged (below its resolution)."""
    hi = torch.where(g > 0, u, hi)
    lo = torch.where(g < 0, u, lo)
    inside = (u_new == u) | ((u_new > lo) & (u_new < hi))
    u_new = torch.where(inside, u_new, 0.5 * (lo + hi))
    step = (u_new - u).abs()
    tight = (hi - lo) <= 4 * eps * (u_new.abs() + a)
    return u_new, lo, hi, torch.where(inside | tight, step, math.inf), inside


# Pseudo-Huber and Huber start at the mean of the first _PREFIX elements of each row (a
# small fraction of one pass); the first full pass computes the row statistics together with
# the sums at the start.
_PREFIX = 128


def _prefix_mean(x: Tensor) -> Tensor:
    """The mean of the first :data:`_PREFIX` values of each row ``(M, 1)``; the first value
    where that mean is not finite."""
    u = x[:, :_PREFIX].mean(-1, keepdim=True)
    return torch.where(torch.isfinite(u), u, x[:, :1])


# Halley's error after a step s is K s³ + O(s⁴) with |K| ≤ (|c2|² + |c3|) ≤ 1.0625 / α²
# (|φ'''/φ''| ≤ 1.5 / α, |φ''''/φ''| ≤ 3 / α²); a step with K s³ ≤ eps (|u| + α) / 8 is final.
_HALLEY_K = 1.0625 * 8


def _pseudo_huber_step(
    u: Tensor, lo: Tensor, hi: Tensor, a: Tensor, sums: tuple[Tensor, ...], eps: float
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor, Tensor]:
    """One safeguarded Halley step on ``g(u) = Σφ'(u − x_i)`` from the sums at ``u``.

    Returns the new state ``(u, lo, hi)``, the step's size (``inf`` for a bisection step,
    unless the bracket is at machine precision) and the rows whose step is final: a Halley
    step inside the bracket with ``|s| ≤ 0.1 α`` and ``K |s|³ ≤ eps (|u| + α)`` (see
    ``_HALLEY_K``), or ``g(u) = 0``. Halley's step ``−2 g g' / (2 g'² − g g'')`` is used
    where it is within a factor of two of Newton's (near the root); Newton's elsewhere (far
    from the root a small Halley step does not mean a small error); bisection where the
    step leaves the bracket or there is no curvature.
    """
    q, h, w = sums  # g = α q, g' = h, g'' = −3 w / α
    h2, qw = h * h, 3 * q * w
    halley = (h2 > 0) & (qw >= -h2) & (qw <= 2 * h2)
    den = 2 * h2 + qw
    aq = a * q  # first: 2 α alone overflows for α near the largest float
    s = torch.where(halley, -aq * (2 * h / den), -aq / h)
    s = torch.where(q == 0, 0.0, s)
    u_new, lo, hi, step, inside = _safeguard(u, u + s, q, lo, hi, a, eps)
    # K s³ ≤ eps (|u| + α) as |s| ≤ cbrt(2 eps / K) · cbrt((|u| + α) / 2) · cbrt(α)², which
    # neither overflows nor underflows for any finite u and α.
    third = 1.0 / 3.0
    bound = (2 * eps / _HALLEY_K) ** third * (0.5 * u_new.abs() + 0.5 * a).pow(third)
    bound = torch.minimum(bound * a.pow(third).square(), 0.1 * a)
    final = (q == 0) | (halley & inside & (s.abs() <= bound))
    return (u_new, lo, hi), step, final


def _solve_pseudo_huber(pen: Penalty, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Saved]:
    """Safeguarded Halley iteration (:func:`_pseudo_huber_step`) from the mean of a prefix
    of each row: on well-spread rows two passes over ``x`` in float32, three in float64
    (each Halley step cubes the error). Returns ``(y, Σ_i x_i, ())``."""
    eps = _finfo(x).eps
    u = _prefix_mean(x)
    lo, hi, total, *sums = kernel("pseudo_huber_first_sums", x)(x, u, a)  # type: ignore[misc]
    (u, lo, hi), step, final = _pseudo_huber_step(u, lo, hi, a, tuple(sums), eps)
    rtol = math.sqrt(eps)
    small = ~(step > _step_tolerance(u, a, rtol, eps))
    pending = torch.where(final, 0, 2 - small.to(torch.int32))
    sums_at = kernel("pseudo_huber_sums", x)

    def update(
        x: Tensor, a: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
        u, lo, hi = state
        return _pseudo_huber_step(u, lo, hi, a, sums_at(x, u, a), eps)  # type: ignore[arg-type]

    y = _iterate_rows(update, x, a, (u, lo, hi), rtol, 100, 1, pending)[0]
    return _snap_unresolved(x, y, a, eps), total, ()


def _nearest(x: Tensor, u: Tensor) -> Tensor:
    """The value of each row of ``x`` nearest to ``u`` ``(M, 1)``."""
    return x.gather(-1, (x - u).abs().argmin(-1, keepdim=True))


def _snap_unresolved(x: Tensor, y: Tensor, a: Tensor, eps: float) -> Tensor:
    """Where ``α`` is below the spacing of floats at ``y`` (``α < 4 eps |y|``), the root lies
    within ``α`` of a data point but bisection ends on a neighbour of it a few units in the
    last place away; that data point is the answer (and gives the exact gradient, all weight
    on it). Rows with ``α`` resolved are unchanged; the rare others cost one pass over their
    own values."""
    unresolved = (a < 4 * eps * y.abs()) & torch.isfinite(y)
    if not bool(unresolved.any()):
        return y
    idx = unresolved.squeeze(-1).nonzero().squeeze(-1)
    xs, ys = x[idx], y[idx]
    nearest = _nearest(xs, ys)
    close = (nearest - ys).abs() <= 4 * eps * (ys.abs() + _rows(a, idx))
    y = y.clone()
    y[idx] = torch.where(close, nearest, ys)
    return y


def _solve_huber(pen: Penalty, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Saved]:
    """Finite Newton (:func:`_huber_step`) from the mean of a prefix of each row: on each
    piece between breakpoints ``x_i ± α`` the gradient is linear, so a Newton step lands on
    the root when the root is on the same piece; bisection otherwise. The first pass also
    takes the row statistics; each later pass evaluates the sums at the new estimate, and a
    row stops as soon as the step those sums give is small, so the last pass is the one at
    the answer (usually two or three passes in all). Returns ``(y, Σ_i x_i, ())``.

    When the minimisers form an interval (no inlier within ``α`` of it, Table 1's
    "non-isolated solutions"), the midpoint of the interval is returned: ``(x_j + x_k)/2``
    for the nearest points ``x_j`` below and ``x_k`` above it. Without a strict inlier the
    gradient is ``α k`` for an integer ``k``; ``k = 0`` (to rounding) is such an interval.
    When ``k ≠ 0`` the root is within ``α`` of a data point that ``α`` is too small to
    resolve (``α`` below the spacing of floats there): that point is returned.
    """
    eps = _finfo(x).eps
    rtol = 4 * eps
    u = _prefix_mean(x)
    lo, hi, total, g, h = kernel("huber_first_sums", x)(x, u, a)  # type: ignore[misc]
    sums = kernel("huber_sums", x)

    def small_next(u: Tensor, lo: Tensor, hi: Tensor, a: Tensor, g: Tensor, h: Tensor) -> Tensor:
        step = _huber_step(u, lo, hi, a, g, h, eps)[3]
        return ~(step > _step_tolerance(u, a, rtol, eps))

    def update(
        x: Tensor, a: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
        u, lo, hi, step = _huber_step(*state[:3], a, *state[3:], eps)
        g, h = sums(x, u, a)  # type: ignore[misc]
        return (u, lo, hi, g, h), step, small_next(u, lo, hi, a, g, h)

    pending = torch.where(small_next(u, lo, hi, a, g, h), 0, 1).to(torch.int32)
    u, lo, hi, g, inliers = _iterate_rows(
        update, x, a, (u, lo, hi, g, h), rtol, 200, 0, pending
    )
    flat = (inliers == 0) & torch.isfinite(u)
    if bool(flat.any()):
        idx = flat.squeeze(-1).nonzero().squeeze(-1)
        xs, us, ar = x[idx], u[idx], _rows(a, idx)
        below = torch.where(xs <= us - ar, xs, -math.inf).amax(-1, keepdim=True)
        above = torch.where(xs >= us + ar, xs, math.inf).amin(-1, keepdim=True)
        mid = 0.5 * (below + above)
        nearest = _nearest(xs, us)
        # With no strict inlier, g = α k exactly for an integer k (every term is ±α); the
        # rounding of the sum is far below α / 2, so k = 0 is |g| < α / 2.
        interval = (g[idx].abs() < 0.5 * ar) & torch.isfinite(mid)
        u[idx] = torch.where(interval, mid, nearest)
    return u, total, ()


def _welsch_update(
    sums: Callable[..., tuple[Tensor, ...]], x: Tensor, u: Tensor, a: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One safeguarded step for the Welsch objective; returns (new u, |step|, Σ e_i at u).

    Newton's step when the curvature is positive and the step is at most α; otherwise the
    mean-shift step ``Σ e_i x_i / Σ e_i − u`` (a majorise-minimise step, which never
    increases the objective). ``Σ e_i = n − objective``, so larger is better.
    """
    g, h, w = sums(x, u, a)
    newton = -a * g / h
    shift = -a * g / w
    use_newton = (h > 0) & (newton.abs() <= a)
    step = torch.where(use_newton, newton, shift)
    step = torch.where(w > 0, step, torch.zeros_like(step))
    return u + step, step.abs(), w


def _welsch_starts(x: Tensor, mean: Tensor) -> list[Tensor]:
    """Starting points, each ``(M, 1)``: the mean, the 10/25/50/75/90 % quantiles, and the
    midpoints of the shortest windows holding 1/2, 1/8 and 1/32 of the sorted data (dense
    regions, where the Welsch objective has its deep minima)."""
    n = x.shape[-1]
    s = _sorted_rows(x)
    picks = sorted({round(q * (n - 1)) for q in _WELSCH_QUANTILES})
    starts = [mean] + [s[:, i : i + 1].contiguous() for i in picks]
    shortest = kernel("shortest_window", x)
    for k in sorted({min(n - 1, max(1, round(f * n))) for f in _WELSCH_WINDOWS}) if n > 1 else ():
        j = shortest(s, k)
        starts.append(0.5 * (s.gather(1, j) + s.gather(1, j + k)))
    return starts


def _welsch_start_steps(
    sums: Callable[..., tuple[Tensor, ...]], x: Tensor, u: Tensor, a: Tensor
) -> tuple[Tensor, Tensor]:
    """``_WELSCH_START_STEPS`` steps from ``u``: the new ``u`` and ``Σ e_i`` one step behind
    it (``n −`` the objective; good enough to rank the starts)."""
    for _ in range(_WELSCH_START_STEPS):
        u, _, w = _welsch_update(sums, x, u, a)
    return u, w


def _welsch_histogram_starts(
    x: Tensor, a: Tensor, lo: Tensor, hi: Tensor
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Starting points at the densest places of the data, found without sorting.

    Welsch's objective is ``n − Σ_i e_i(u)``, ``e_i(u) = exp(−(u − x_i)²/2α²)``: its minima
    are the modes of the data's Gaussian kernel density of bandwidth ``α``. A histogram of
    bins of width ``h = α / _WELSCH_BINS_PER_ALPHA``, convolved with the same Gaussian
    sampled at the bin spacing, estimates ``Σ_i e_i`` at the bin centres; its highest local
    maxima (refined by a parabola through the neighbours) are the starts. The histogram
    covers at most ``_WELSCH_MAX_BINS`` bins: from the row minimum where the data fit,
    otherwise around the mean of the fullest bin of a coarse histogram of the whole range
    (so far outliers do not matter).

    Returns the starts (each ``(M, 1)``, best first), their smoothed counts ``(M, k)``
    (0 where a row has fewer peaks) and ``bound`` ``(M, 1)``: ``Σ_i e_i(u)`` is below it
    for every ``u`` outside the histogram's range (0 where the histogram covers the data),
    so a row whose starts reach it has its global minimum inside.
    """
    m, n = x.shape
    h = a / _WELSCH_BINS_PER_ALPHA
    # Bins centred on lo + k h (a set symmetric about its midpoint gives symmetric counts).
    need = ((hi - lo) / h + 0.5).floor() + 1  # bins covering [lo, hi] (NaN, inf: wide)
    wide = ~(need <= _WELSCH_MAX_BINS)
    # A power of two, so that compiled kernels see few distinct sizes.
    bins = 1 << max(0, math.ceil(math.log2(float(need.masked_fill(wide, 1).max()) if m else 1.0)))
    bins = min(bins, _WELSCH_MAX_BINS)
    origin = lo - 0.5 * h
    if bool(wide.any()):
        bins = _WELSCH_MAX_BINS
        idx = wide.squeeze(-1).nonzero().squeeze(-1)
        xw, lw = x[idx], lo[idx]
        coarse = (hi[idx] - lw) / (bins - 1)  # [lo, hi] on the regular bins 0 … bins − 1
        cnt, s1, _ = kernel("truncated_histogram", xw)(xw, lw, coarse, bins)  # type: ignore[misc]
        cnt, s1 = cnt[:, 1 : bins + 1], s1[:, 1 : bins + 1]
        j = cnt.argmax(-1, keepdim=True)
        centre = lw + coarse * (j + 0.5 + s1.gather(1, j) / cnt.gather(1, j).clamp_min(1))
        origin = origin.expand_as(lo).clone()
        origin[idx] = centre - (bins // 2) * _rows(h, idx)
    counts = kernel("histogram_counts", x)(x, origin, h, bins)  # type: ignore[misc]
    outside = counts[:, :1] + counts[:, -1:]
    counts = counts[:, 1:-1]
    # Points within 4α inside the ends may add up to 1 each beyond the histogram, farther
    # ones exp(−8) at most (a sure upper bound, in the data's dtype).
    ends = 4 * _WELSCH_BINS_PER_ALPHA
    near = counts[:, :ends].sum(-1, keepdim=True) + counts[:, -ends:].sum(-1, keepdim=True)
    bound = torch.where(wide, outside + near + n * math.exp(-8.0), 0.0)
    reach = math.ceil(_WELSCH_SMOOTH * _WELSCH_BINS_PER_ALPHA)
    # The convolution as a sum of shifted copies (a loop over the few taps, not over rows:
    # conv1d with one channel is many times slower on CPU).
    padded = torch.nn.functional.pad(counts, (reach, reach))
    smooth = padded[:, reach : reach + bins].clone()
    for k in range(1, reach + 1):
        weight = math.exp(-0.5 * (k / _WELSCH_BINS_PER_ALPHA) ** 2)
        pair = padded[:, reach - k : reach - k + bins] + padded[:, reach + k : reach + k + bins]
        smooth.add_(pair, alpha=weight)
    left = torch.nn.functional.pad(smooth, (1, 0), value=-1.0)[:, :-1]
    right = torch.nn.functional.pad(smooth, (0, 1), value=-1.0)[:, 1:]
    peak = (smooth >= left) & (smooth > right) & (smooth > 0)
    score, at = torch.where(peak, smooth, 0.0).topk(min(_WELSCH_PEAKS, bins), -1)
    c0, cl, cr = smooth.gather(1, at), left.gather(1, at), right.gather(1, at)
    curv = cl - 2 * c0 + cr
    shift = torch.where(curv < 0, 0.5 * (cl - cr) / curv.clamp_max(-1e-30), 0.0).clamp(-0.5, 0.5)
    starts = torch.minimum(torch.maximum(origin + (at + 0.5 + shift) * h, lo), hi)
    starts = torch.where(score > 0, starts, starts[:, :1])  # (a row of NaN: any start)
    return [starts[:, k : k + 1].contiguous() for k in range(starts.shape[1])], score, bound


def _welsch_best_start(
    sums: Callable[..., tuple[Tensor, ...]],
    x: Tensor,
    a: Tensor,
    starts: list[Tensor],
    tried: Callable[[int], Tensor],
) -> tuple[Tensor, Tensor]:
    """A few steps from each start (:func:`_welsch_start_steps`) on the rows where
    ``tried(k)`` ``(M, 1)`` is true (every row for the first start); the best ``u`` per row
    and its ``Σ e_i`` (larger is better)."""
    best, best_w = _welsch_start_steps(sums, x, starts[0], a)
    for k in range(1, len(starts)):
        new = tried(k)
        n_new = int(new.sum())
        if n_new == 0:
            continue
        if 4 * n_new >= 3 * x.shape[0]:  # most rows: one pass over all beats a gather
            u, w = _welsch_start_steps(sums, x, starts[k], a)
            better = new & (w > best_w)
            best, best_w = torch.where(better, u, best), torch.where(better, w, best_w)
        else:
            idx = new.squeeze(-1).nonzero().squeeze(-1)
            u, w = _welsch_start_steps(sums, x[idx], starts[k][idx], _rows(a, idx))
            better = w > best_w[idx]
            best[idx] = torch.where(better, u, best[idx])
            best_w[idx] = torch.where(better, w, best_w[idx])
    return best, best_w


def _welsch_sorted_best(
    sums: Callable[..., tuple[Tensor, ...]], x: Tensor, a: Tensor, mean: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`_welsch_best_start` over the quantile and window starts of the sorted data
    (:func:`_welsch_starts`); a start within ``α / 4`` of an earlier one is skipped (the
    objective is smooth at the scale α: it is in the same basin)."""
    starts = _welsch_starts(x, mean)

    def tried(k: int) -> Tensor:
        gap = torch.stack([(starts[k] - v).abs() for v in starts[:k]]).amin(0)
        return ~(gap <= _WELSCH_SAME_START * a)

    return _welsch_best_start(sums, x, a, starts, tried)


def _solve_welsch(x: Tensor, a: Tensor, stats: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Multi-start local minimisation, keeping the lowest objective.

    The starts are the highest peaks of a smoothed histogram (:func:`_welsch_histogram_starts`;
    a peak below ``_WELSCH_PEAK_REL`` of the highest is not tried). Rows whose histogram
    could not cover the region holding the minimum (data spread over more than
    ``_WELSCH_MAX_BINS / _WELSCH_BINS_PER_ALPHA`` α around their densest part, in several
    far clusters) also try the quantiles and shortest windows of the sorted data
    (:func:`_welsch_sorted_best`). Each start takes a few safeguarded Newton / mean-shift
    steps; the best is iterated to convergence. This finds a local minimum that is usually,
    not always, the global one (the benchmark measures how often against a dense grid).
    """
    sums = kernel("welsch_sums", x)
    lo, hi, total = stats
    starts, score, bound = _welsch_histogram_starts(x, a, lo, hi)

    def tried(k: int) -> Tensor:
        s = score[:, k : k + 1]
        return (s > 0) & (s >= _WELSCH_PEAK_REL * score[:, :1])

    best, best_w = _welsch_best_start(sums, x, a, starts, tried)
    unsure = ~(best_w >= bound)
    if bool(unsure.any()):
        idx = unsure.squeeze(-1).nonzero().squeeze(-1)
        u, w = _welsch_sorted_best(sums, x[idx], _rows(a, idx), total[idx] / x.shape[-1])
        better = w > best_w[idx]
        best[idx] = torch.where(better, u, best[idx])

    def update(
        x: Tensor, a: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        u, step, _ = _welsch_update(sums, x, state[0], a)
        return (u,), step

    return _iterate_rows(update, x, a, (best,), math.sqrt(_finfo(x).eps), 100, 1)[0]


_TRUNCATED_BLOCK = 1 << 18  # elements per block of rows in the truncated-quadratic solver
_TRUNCATED_MEDIAN_SPREAD = 1024.0  # (max − min) / α up to which the median is the reference
# Pruning (see _truncated_pruned): bins of width α / _PRUNE_BINS_PER_ALPHA cover the median
# ± _PRUNE_HALF_RANGE α; rows of fewer than _PRUNE_MIN_N elements, or whose bands hold more
# than _PRUNE_MAX_BAND n elements, use the full enumeration.
_PRUNE_BINS_PER_ALPHA = 16
_PRUNE_HALF_RANGE = 4
_PRUNE_MIN_N = 64
_PRUNE_MAX_BAND = 0.25
_PRUNE_BLOCK = 1 << 21  # elements per block of rows of the pruned enumeration
_PRUNE_WIDE = 1.75  # bands wider than this many times the mean are enumerated apart


def _solve_truncated(
    x: Tensor, a: Tensor, finite: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The truncated-quadratic solver: the pruned enumeration (:func:`_truncated_pruned`)
    where it certifies its answer, the full one (:func:`_solve_truncated_block`) elsewhere.

    The pruned enumeration runs on blocks of ``_PRUNE_BLOCK`` elements (its kernels block
    their eager versions themselves, and compiled ones are fastest on many rows at once). The
    full enumeration runs by blocks of rows: it makes about ten temporaries as large as its
    input; in blocks of about 2**18 elements they stay in cache and the allocator reuses
    them, which is 1.5-3x faster on CPU than one pass over a large input. The blocks are
    independent and few (the loop is over blocks of thousands of rows, never over single
    rows). ``finite`` (``(M, 1)`` bool, optional): rows whose sum is finite.
    """
    m, n = x.shape
    if not m:  # an empty batch: nothing to enumerate (the kernels reduce over rows)
        # Four distinct tensors: the autograd Function marks the last three non-differentiable.
        return tuple(x.new_empty(0, 1) for _ in range(4))  # type: ignore[return-value]
    s = _sorted_rows(x)
    if n >= _PRUNE_MIN_N:
        rows = max(1, _PRUNE_BLOCK // n)
        if m <= rows:
            ok, pruned = _truncated_pruned(x, s, a, x, finite)
        else:
            parts = [
                _truncated_pruned(
                    x[i : i + rows],
                    s[i : i + rows],
                    a if a.dim() == 0 else a[i : i + rows],
                    x,
                    None if finite is None else finite[i : i + rows],
                )
                for i in range(0, m, rows)
            ]
            ok = torch.cat([p[0] for p in parts])
            pruned = tuple(torch.cat(t, 0) for t in zip(*(p[1] for p in parts)))
        rest = (~ok).nonzero().squeeze(-1)
        if not len(rest):
            return pruned
        if len(rest) < m:
            full = _solve_truncated_full(x[rest], s[rest], _rows(a, rest), x)
            for o, f in zip(pruned, full):  # fresh tensors, one per output
                o[rest] = f
            return pruned
    return _solve_truncated_full(x, s, a, x)


def _solve_truncated_full(
    x: Tensor, s: Tensor, a: Tensor, whole: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_solve_truncated_block` by blocks of rows (``s``: the rows of ``x`` sorted)."""
    m, n = x.shape
    rows = max(1, _TRUNCATED_BLOCK // max(n, 1))
    if m <= rows:
        return _solve_truncated_block(x, s, a, whole)
    parts = [
        _solve_truncated_block(
            x[i : i + rows], s[i : i + rows], a if a.dim() == 0 else a[i : i + rows], whole
        )
        for i in range(0, m, rows)
    ]
    return tuple(torch.cat(p, 0) for p in zip(*parts))  # type: ignore[return-value]


def _truncated_pruned(
    x: Tensor, s: Tensor, a: Tensor, whole: Tensor, finite: Tensor | None = None
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The truncated-quadratic minimum, enumerating only the windows the minimiser can have.

    With ``K = _PRUNE_BINS_PER_ALPHA`` and bins of width ``h = α/K`` around the median, a
    histogram (counts, and sums of the position inside the bin and of its square) bounds the
    objective below on every bin ``b``: points at most ``K − 1`` bins away are inliers for
    every ``u`` in ``b`` (their exact quadratic, minimised over the bin), points ``K`` bins
    away cost at least ``((K − 1)/K)² α²/2``, farther ones exactly ``α²/2``. The objective
    at the best bin's minimiser, evaluated exactly, bounds the minimum above; the bins whose
    lower bound exceeds it cannot hold the minimiser, nor the parts of the two end bins of
    the remaining ones where their (convex, quadratic) bound exceeds it: the minimiser lies
    in an interval ``U`` (widened by ``h / 1024`` against rounding). For ``u`` in ``U``, a
    point is an inlier for every ``u`` (core), an outlier for every ``u`` (far), or in one
    of the two bands ``U − α`` and ``U + α`` (found by binary search in ``s``, with their
    ends rounded outwards): only the windows
    ``core ∪ (a suffix of the lower band) ∪ (a prefix of the upper band)`` are enumerated,
    with the same exit/entry order as the full enumeration (a merge of the lower band
    shifted by ``2α`` with the upper band). Every enumerated window is a set of points, so
    its cost is at least the minimum, which it attains: the result is the global minimum.

    Every step is a kernel over all rows (compiled, or eager on blocks of rows): the
    arithmetic on the small per-bin arrays costs several times the passes over ``x`` when
    run as separate eager operations on them. ``finite`` (``(M, 1)`` bool, optional): rows
    whose sum is finite, when the caller has it.

    Returns ``ok (M,)`` (rows the bounds certify, all finite) and for those rows what
    :func:`_solve_truncated_block` returns (other rows hold unspecified values).
    """
    m, n = x.shape
    k_bins, nb = _PRUNE_BINS_PER_ALPHA, 2 * _PRUNE_HALF_RANGE * _PRUNE_BINS_PER_ALPHA
    af = a.to(x.dtype)
    h = af / k_bins
    origin = s[:, (n - 1) // 2 : (n - 1) // 2 + 1] - (nb // 2) * h
    cnt, s1, s2 = kernel("truncated_histogram", whole)(s, origin, h, nb)  # type: ignore[misc]
    lower, b0, vb, v = kernel("truncated_bin_bounds", whole)(cnt, s1, s2, k_bins)  # type: ignore[misc]
    u0 = origin + h * v.to(x.dtype)
    if finite is None:
        finite = torch.isfinite(x.sum(-1, keepdim=True))
    # The objective there, summed in float64 (relative error ≤ n eps), and a margin for the
    # rounding of the histogram's coordinates and float32 sums.
    f_up = kernel("truncated_objective", whole)(x, u0, a)  # type: ignore[operator]
    f_up = f_up * (1 + 1e-5) + (1e-3 + 1e-4 * (n * _finfo(x).eps / 1.2e-7))
    cap = max(1, int(_PRUNE_MAX_BAND * n))
    bands = kernel("truncated_bands", whole)(lower, b0, vb, f_up, cnt, s, origin, h, a, k_bins, cap)
    ok, start_l, end_l, start_r, n_l, n_r, core, ref = bands  # type: ignore[misc]
    ok = (ok & finite).squeeze(-1)
    # One synchronisation for the band widths of the certified rows: their largest, and their
    # mean, which sets the width _PRUNE_WIDE times the mean beyond which rows are enumerated
    # apart (the enumeration costs rows × width, and a few wide rows would set the width).
    widths = torch.where(ok.unsqueeze(-1), torch.cat([n_l, n_r], -1), 0)
    n_ok = ok.sum(0, keepdim=True)
    stats = torch.cat([widths.amax(0), widths.sum(0).double() / n_ok.clamp_min(1), n_ok])
    k_l, k_r, mean_l, mean_r, n_ok = stats.tolist() if m else (0, 0, 0, 0, 0)
    if not n_ok:
        y = torch.zeros(m, 1, dtype=x.dtype, device=x.device)
        return ok, (y, y, y, y)
    c1, c2 = kernel("truncated_core_sums", whole)(s, core, ref, a)  # type: ignore[misc]
    windows = kernel("truncated_band_windows", whole)

    def enumerate_bands(rows: Tensor | None, k_l: int, k_r: int) -> tuple[Tensor, Tensor]:
        """The best windows' ``[begin, end)`` in ``s`` of all rows (``rows`` None) or of
        ``rows``, with bands of at most ``k_l`` and ``k_r`` points."""
        pick = (lambda t: t) if rows is None else (lambda t: _rows(t, rows))
        s_r, sl, sr, nl, nr = map(pick, (s, start_l, start_r, n_l, n_r))
        low = _band(s_r, sl, nl, max(1, k_l))
        up = _band(s_r, sr, nr, max(1, k_r))
        args = map(pick, (start_r - end_l, c1, c2, ref, a))
        left_out, taken = windows(low, up, nl, nr, *args, n)  # type: ignore[misc]
        return sl + left_out, sr + taken

    t_l, t_r = (8 * math.ceil(_PRUNE_WIDE * w / 8) for w in (mean_l, mean_r))
    if k_l <= t_l and k_r <= t_r:
        begin, end = enumerate_bands(None, int(k_l), int(k_r))
    else:
        begin, end = enumerate_bands(None, min(t_l, int(k_l)), min(t_r, int(k_r)))
        wide = (ok.unsqueeze(-1) & ((n_l > t_l) | (n_r > t_r))).squeeze(-1).nonzero().squeeze(-1)
        begin[wide], end[wide] = enumerate_bands(wide, int(k_l), int(k_r))
    lo = s.gather(1, begin.clamp(0, n - 1))
    hi = s.gather(1, (end - 1).clamp(0, n - 1))
    total, count = kernel("window_sums", whole)(x, lo, hi)  # type: ignore[misc]
    return ok, (total / count, lo, hi, count)


def _band(s: Tensor, start: Tensor, size: Tensor, k: int) -> Tensor:
    """The ``size`` values of each row of ``s`` from column ``start``, then ``inf``: ``(M, k)``."""
    col = torch.arange(k, device=s.device)
    values = s.gather(1, (start + col).clamp_max(s.shape[-1] - 1))
    return torch.where(col < size, values, math.inf)


def _solve_truncated_block(
    x: Tensor, s: Tensor, a: Tensor, whole: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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
    reach = s + 2 * a
    # The prefix sums are of d = (s − ref) / α in float64. With ref the row's median, their
    # rounding error is about n (range / α)² 2^-52 in units of α², negligible while the
    # range is below 2^10 α (the usual case, one extra reduction to check). Otherwise ref
    # is the first point after the last gap wider than 2α (a window never spans one), so
    # every |d| ≤ 2n whatever the magnitudes of x and α: no cancellation or overflow.
    spread = ((s[:, -1:] - s[:, :1]) / a).amax()
    if bool(spread <= _TRUNCATED_MEDIAN_SPREAD):
        ref = s[:, (n - 1) // 2 : (n - 1) // 2 + 1]
    else:
        index = torch.arange(n, device=x.device).expand(m, n)
        gap = torch.ones_like(s, dtype=torch.bool)
        gap[:, 1:] = s[:, 1:] > reach[:, :-1]
        ref = s.gather(1, torch.where(gap, index, 0).cummax(-1).values)
    p1, p2 = kernel("truncated_prefix_sums", whole)(s, ref, a)  # type: ignore[misc]
    # r_k = #{s_i ≤ s_k + 2α}, and l_k = #{j : r_j ≤ k} by counting (int32 halves the memory).
    exit_end = torch.searchsorted(s, reach, right=True, out_int32=True)
    counts = torch.zeros(m, n + 1, dtype=torch.int32, device=x.device)
    counts.scatter_add_(1, exit_end, torch.ones_like(exit_end))
    entry_begin = counts.cumsum(-1, dtype=torch.int32)[:, :n]
    del counts
    costs = kernel("truncated_window_costs", whole)
    best_exit, k_exit = costs(p1, p2, exit_end, True)  # type: ignore[misc]
    best_entry, k_entry = costs(p1, p2, entry_begin, False)  # type: ignore[misc]
    use_exit = best_exit < best_entry
    # Window [begin, end) of the best candidate, end exclusive.
    begin = torch.where(use_exit, k_exit + 1, entry_begin.gather(1, k_entry))
    end = torch.where(use_exit, exit_end.gather(1, k_exit), k_entry + 1)
    # (The clamps only matter for rows holding NaN, whose output is set to NaN later.)
    lo = s.gather(1, begin.clamp(0, n - 1))
    hi = s.gather(1, (end - 1).clamp(0, n - 1))
    total, count = kernel("window_sums", whole)(x, lo, hi)  # type: ignore[misc]
    return total / count, lo, hi, count



# --------------------------------------------------------------------------------------------
# Backward: the closed forms of Table 1 as vector-Jacobian products.


def _warn_degenerate(count: int, kind: str) -> None:
    warnings.warn(
        f"robust_pool({kind}): Σφ''(y − x_i) ≤ 0 at {count} output(s), so dy/dx is undefined "
        "there (Table 1); the derivative of one mean-shift step from y, "
        "e_i / Σ_j e_j with e_i = exp(−(y − x_i)²/(2α²)), is used instead.",
        DeclarativeWarning,
        stacklevel=4,
    )


def _rescale_rows(x: Tensor, y: Tensor, a: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """For rows ``idx``: ``t = (y − x)/α`` and ``t_min² = min_i t_i²`` (for rescaled weights)."""
    t = (y[idx] - x[idx]) / _rows(a, idx)
    return t, (t * t).amin(-1, keepdim=True)


def _welsch_far(t: Tensor, t2: Tensor, tmin2: Tensor) -> tuple[Tensor, Tensor]:
    """``t`` and ``t²`` with the terms whose rescaled weight ``exp(−(t² − t_min²)/2)`` is 0
    set to 0, so that ``(1 − t²) e`` and ``t³ e`` are 0 there rather than NaN (inf · 0)."""
    far = t2 - tmin2 > 4 * kernels.WELSCH_T_MAX**2
    return torch.where(far, 0.0, t), torch.where(far, 0.0, t2)


def _backward_pseudo_huber(x: Tensor, y: Tensor, a: Tensor, v: Tensor,
                           alpha_grad: bool = True) -> tuple[Tensor, Tensor]:
    if alpha_grad:
        total, tcubed = kernel("pseudo_huber_backward_sums", x)(x, y, a)  # type: ignore[misc]
        grad = kernel("pseudo_huber_backward_grad", x)(x, y, a, v / total)
        dyda = -tcubed / total
    else:  # one kernel; ∂y/∂α is not used (0 stands in for it)
        grad, total = kernel("pseudo_huber_backward_fused", x)(x, y, a, v)  # type: ignore[misc]
        dyda = torch.zeros_like(v)
    # Rows whose weights all underflow (every |y − x_i| ≫ α): rescale by the largest weight,
    # in float64 (a rare path).
    small = ~(total >= math.sqrt(_finfo(x).tiny)) & torch.isfinite(y)
    if bool(small.any()):
        idx = small.squeeze(-1).nonzero().squeeze(-1)
        t = (y[idx].double() - x[idx].double()) / _rows(a, idx).double()
        tmin = t.abs().amin(-1, keepdim=True)
        big = tmin.clamp_min(1)
        # τ = t / big is clamped where τ² would overflow (τ / sqrt(ρ + τ²) is ±1 there).
        tau = (t / big).clamp(-kernels.PSEUDO_HUBER_T_MAX, kernels.PSEUDO_HUBER_T_MAX)
        mu, rho = tmin / big, 1 / (big * big)
        w = ((rho + mu * mu) / (rho + tau * tau)) ** 1.5  # (1 + t²)^(-3/2), times a constant
        wsum = w.sum(-1, keepdim=True)
        grad[idx] = (v[idx].double() * w / wsum).to(x.dtype)
        # t³ w = (big τ / sqrt(ρ + τ²))³ (ρ + μ²)^(3/2): no power of t is formed.
        q = tau * torch.rsqrt(rho + tau * tau) * big * torch.sqrt(rho + mu * mu)
        dyda[idx] = (-(q * q * q).sum(-1, keepdim=True) / wsum).to(x.dtype)
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
        t, t2 = _welsch_far(t, t2, tmin2)
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
        t, t2 = _welsch_far(t, t2, tmin2)
        grad[idx] = (scale_newton[idx] * (1 - t2) + scale_shift[idx]) * e
    return grad, dyda


def _backward_welsch_x(x: Tensor, y: Tensor, a: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_backward_welsch` when ``α`` needs no gradient: one kernel, then the rare rows
    (all weights underflowing, or ``Σφ'' ≤ 0``) redone from rescaled weights."""
    out = kernel("welsch_backward_fused", x)(x, y, a, v)
    grad, curv, curv_abs, e_sum = out  # type: ignore[misc]
    small = ~(e_sum >= math.sqrt(_finfo(x).tiny)) & torch.isfinite(y)
    if bool(small.any()):
        idx = small.squeeze(-1).nonzero().squeeze(-1)
        t, tmin2 = _rescale_rows(x, y, a, idx)
        t2 = t * t
        e = torch.exp(-0.5 * (t2 - tmin2))
        t, t2 = _welsch_far(t, t2, tmin2)
        c = (1 - t2) * e
        curv[idx] = c.sum(-1, keepdim=True)
        curv_abs[idx] = c.abs().sum(-1, keepdim=True)
        grad[idx] = c * (v[idx] / curv[idx])
    degenerate = ~(curv > 64 * _finfo(x).eps * curv_abs) & torch.isfinite(y)
    n_degenerate = int(degenerate.sum())
    if n_degenerate:
        _warn_degenerate(n_degenerate, "welsch")
        idx = degenerate.squeeze(-1).nonzero().squeeze(-1)
        t, tmin2 = _rescale_rows(x, y, a, idx)
        e = torch.exp(-0.5 * (t * t - tmin2))  # e_i / Σ e_j: the rescaling cancels
        grad[idx] = v[idx] * e / e.sum(-1, keepdim=True)
    return grad, torch.zeros_like(v)


def _backward_huber(x: Tensor, y: Tensor, a: Tensor, v: Tensor,
                    alpha_grad: bool = True) -> tuple[Tensor, Tensor]:
    if alpha_grad:
        count, outer_sign = kernel("huber_backward_sums", x)(x, y, a)  # type: ignore[misc]
        flat = (count == 0) & torch.isfinite(y)
        scale = torch.where(flat, torch.zeros_like(v), v / count)
        grad = kernel("huber_backward_grad", x)(x, y, a, scale)
        dyda = torch.where(flat, torch.zeros_like(v), -outer_sign / count)
    else:  # one kernel; ∂y/∂α is not used (0 stands in for it); flat rows redone below
        grad, count = kernel("huber_backward_fused", x)(x, y, a, v)  # type: ignore[misc]
        flat = (count == 0) & torch.isfinite(y)
        dyda = torch.zeros_like(v)
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



# --------------------------------------------------------------------------------------------
# The rules: one per penalty class.

Saved = tuple[Tensor, ...]
Solve = Callable[[Penalty, Tensor, Tensor], tuple[Tensor, Tensor, Saved]]
Backward = Callable[[Penalty, Tensor, Tensor, Tensor, Tensor, Saved], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class PoolRule:
    """How robust pooling solves and differentiates for one penalty class.

    Attributes:
        solve: ``(penalty, x (M, n), a) -> (y (M, 1), row_sum (M, 1), saved)``; ``row_sum``
            is ``Σ_i x_i`` (used to find the rows holding NaN or ±inf, whose ``y`` the
            caller sets to NaN) and ``saved`` the tensors the backward needs.
        backward: ``(penalty, x, y, a, v (M, 1), saved) -> (vᵀ ∂y/∂x (M, n), ∂y/∂α (M, 1))``.
        backward_x: optionally, the same when ``α`` needs no gradient (its ``∂y/∂α`` is
            then not used), where that saves work.
        exact: whether ``solve`` returns the global minimum (else: the best local minimum
            found by a multi-start search).
    """

    solve: Solve
    backward: Backward
    exact: bool = True
    backward_x: Backward | None = None


def _with_stats(solver: Callable[[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]], Tensor]) -> Solve:
    def solve(pen: Penalty, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Saved]:
        stats = kernel("row_stats", x)(x)  # type: ignore[misc]
        return solver(x, a, stats), stats[2], ()  # type: ignore[arg-type]

    return solve


def _plain_backward(
    backward: Callable[..., tuple[Tensor, Tensor]], **options: object
) -> Backward:
    def run(
        pen: Penalty, x: Tensor, y: Tensor, a: Tensor, v: Tensor, saved: Saved
    ) -> tuple[Tensor, Tensor]:
        return backward(x, y, a, v, **options)

    return run


def _truncated_solve(pen: Penalty, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Saved]:
    row_sum = x.sum(-1, keepdim=True)
    y, lo, hi, count = _solve_truncated(x, a, torch.isfinite(row_sum))
    return y, row_sum, (lo, hi, count)


def _truncated_backward(
    pen: Penalty, x: Tensor, y: Tensor, a: Tensor, v: Tensor, saved: Saved
) -> tuple[Tensor, Tensor]:
    lo, hi, count = saved
    grad = kernel("window_grad", x)(x, lo, hi, v / count)
    # The window is locally constant in α, so dy/dα = 0 wherever it exists.
    return grad, torch.zeros_like(v)  # type: ignore[return-value]


RULES: dict[type[Penalty], PoolRule] = {
    PseudoHuber: PoolRule(_solve_pseudo_huber, _plain_backward(_backward_pseudo_huber),
                          backward_x=_plain_backward(_backward_pseudo_huber, alpha_grad=False)),
    Huber: PoolRule(_solve_huber, _plain_backward(_backward_huber),
                    backward_x=_plain_backward(_backward_huber, alpha_grad=False)),
    Welsch: PoolRule(_with_stats(_solve_welsch), _plain_backward(_backward_welsch), exact=False,
                     backward_x=_plain_backward(_backward_welsch_x)),
    TruncatedQuadratic: PoolRule(_truncated_solve, _truncated_backward),
}


def overrides(pen: Penalty, method: str) -> bool:
    """Whether the penalty's class implements ``method`` (rather than inheriting the
    abstract one of :class:`~declnet.layers.Penalty`)."""
    return getattr(type(pen), method) is not getattr(Penalty, method)


def has_closed_form_backward(pen: Penalty, alpha_grad: bool) -> bool:
    """Whether pooling with ``pen`` has Table 1's closed-form backward: the penalty has a
    rule, or implements ``d2phi`` (and ``dphi_dalpha`` when ``α`` needs a gradient)."""
    if type(pen) in RULES:
        return True
    return overrides(pen, "d2phi") and (not alpha_grad or overrides(pen, "dphi_dalpha"))


def rule_for(pen: Penalty) -> PoolRule:
    """The rule of the penalty's class (exactly that class: a subclass may change φ), or
    :func:`generic_rule` for a class without one."""
    return RULES.get(type(pen), _GENERIC)


# --------------------------------------------------------------------------------------------
# The generic rule, for penalty classes without a specialised solver.

_GENERIC_QUANTILES = (0.5, 0.1, 0.25, 0.75, 0.9)
_GENERIC_ITERS = 100
_GENERIC_HALVINGS = 60


def _derivatives(pen: Penalty, z: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """``φ'(z)`` and ``φ''(z)`` elementwise: the penalty's own methods where its class
    implements them, autograd of its ``phi`` otherwise."""
    has1, has2 = overrides(pen, "dphi"), overrides(pen, "d2phi")
    if has1 and has2:
        return pen.dphi(z, a), pen.d2phi(z, a)
    with torch.enable_grad():
        zz = z.detach().requires_grad_()
        if has1:
            g = pen.dphi(zz, a)
        else:
            (g,) = torch.autograd.grad(pen.phi(zz, a).sum(), zz, create_graph=not has2)
        if has2:
            return g.detach(), pen.d2phi(z, a)
        (h,) = torch.autograd.grad(g.sum(), zz, allow_unused=True)
    return g.detach(), (torch.zeros_like(z) if h is None else h.detach())


def _generic_objective(pen: Penalty, x: Tensor, u: Tensor, a: Tensor) -> Tensor:
    return pen.phi(u - x, a).sum(-1, keepdim=True)


def _generic_descent(
    pen: Penalty, x: Tensor, a: Tensor, u: Tensor, lo: Tensor, hi: Tensor
) -> Tensor:
    """Newton steps on ``Σ_i φ(u − x_i)`` with backtracking, inside ``[lo, hi]``.

    The step is Newton's where ``Σφ'' > 0`` and a quarter of the data range against the
    gradient otherwise; it is halved until the objective does not increase. Stops when every
    row's step is below ``4 eps (|u| + α)``. The objective must be finite (for a penalty
    growing like ``α²``, ``α`` below ~1e154 in float64).
    """
    f = _generic_objective(pen, x, u, a)
    tol = 4 * _finfo(x).eps
    local = math.sqrt(_finfo(x).eps)
    for _ in range(_GENERIC_ITERS):
        g, h = _derivatives(pen, u - x, a)
        g, h = g.sum(-1, keepdim=True), h.sum(-1, keepdim=True)
        step = torch.where(h > 0, -g / h, -torch.sign(g) * 0.25 * (hi - lo))
        step = torch.where(torch.isfinite(step), step, torch.zeros_like(step))
        # Newton steps below sqrt(eps) (|u| + α) change the objective by less than its
        # rounding error: they are taken without the objective test (quadratic convergence).
        small = (h > 0) & (step.abs() <= local * (u.abs() + a))
        for _ in range(_GENERIC_HALVINGS):
            u_new = torch.minimum(torch.maximum(u + step, lo), hi)
            f_new = _generic_objective(pen, x, u_new, a)
            ok = ~(f_new > f) | small
            if bool(ok.all()):
                break
            step = torch.where(ok, step, 0.5 * step)
        moved = torch.where(ok, u_new - u, torch.zeros_like(u))
        u = torch.where(ok, u_new, u)
        f = torch.where(ok, f_new, f)
        if not bool((moved.abs() > tol * (u.abs() + a)).any()):
            break
    return u


def _generic_solve(pen: Penalty, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Saved]:
    """Multi-start descent for a penalty without a specialised solver.

    Starts from the mean (only, for a convex penalty) or from the mean and the 10/25/50/75/90 %
    quantiles, each refined by :func:`_generic_descent` inside ``[min x, max x]`` (where the
    minimiser lies for a penalty that is even and non-decreasing in ``|z|``), keeping the
    lowest objective. Exact for convex penalties; a local minimum otherwise.
    """
    a = a.detach()
    n = x.shape[-1]
    total = x.sum(-1, keepdim=True)
    s = _sorted_rows(x)
    lo, hi = s[:, :1], s[:, -1:]
    starts = [(total / n).clamp(lo, hi)]
    if not pen.is_convex:
        picks = sorted({round(q * (n - 1)) for q in _GENERIC_QUANTILES})
        starts += [s[:, i : i + 1].contiguous() for i in picks]
    best, best_f = None, None
    for u in starts:
        u = _generic_descent(pen, x, a, u, lo, hi)
        best, best_f = keep_lower(best, best_f, u, _generic_objective(pen, x, u, a))
    return best, total, ()  # type: ignore[return-value]


def _generic_backward(
    pen: Penalty, x: Tensor, y: Tensor, a: Tensor, v: Tensor, saved: Saved
) -> tuple[Tensor, Tensor]:
    """Table 1: ``∂y/∂x_i = φ''(y − x_i) / Σ_j φ''`` and ``∂y/∂α = −Σ_i ∂²φ/∂z∂α / Σ_j φ''``.

    Where ``Σ_j φ'' ≤ 0`` the derivative does not exist: those outputs get NaN, with a
    :class:`~declnet.DeclarativeWarning`.
    """
    z = y - x
    h = pen.d2phi(z, a)
    total = h.sum(-1, keepdim=True)
    bad = ~(total > 0) & torch.isfinite(y)
    if bool(bad.any()):
        warnings.warn(
            f"robust_pool({type(pen).__name__}): Σφ''(y − x_i) ≤ 0 at {int(bad.sum())} "
            "output(s), so dy/dx is undefined there (Table 1); their gradient is NaN.",
            DeclarativeWarning,
            stacklevel=4,
        )
    total = torch.where(bad, math.nan, total)
    grad = h * (v / total)
    if overrides(pen, "dphi_dalpha"):
        dyda = -pen.dphi_dalpha(z, a).sum(-1, keepdim=True) / total
    else:
        dyda = torch.zeros_like(v)
    return grad, dyda


_GENERIC = PoolRule(_generic_solve, _generic_backward, exact=False)


def generic_rule() -> PoolRule:
    """The rule used for penalty classes that have none of their own."""
    return _GENERIC


def generic_solve(pen: Penalty, x: Tensor, a: Tensor) -> Tensor:
    """``y (M, 1)`` of the generic solver, NaN on rows holding NaN or ±inf."""
    y, total, _ = _generic_solve(pen, x, a)
    bad = _nonfinite_rows(x, total)
    return torch.where(bad, math.nan, y) if bool(bad.any()) else y


def solve_rows(rule: PoolRule, pen: Penalty, x: Tensor, a: Tensor) -> tuple[Tensor, Saved]:
    """Run ``rule.solve`` and set ``y`` to NaN on rows holding NaN or ±inf."""
    y, total, saved = rule.solve(pen, x, a)
    bad = _nonfinite_rows(x, total)
    if bool(bad.any()):
        y = torch.where(bad, math.nan, y)
    return y, saved
