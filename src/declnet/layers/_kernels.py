"""Fused per-row reductions used by the robust pooling solvers, compiled when worthwhile.

Every kernel here is a pure function of tensors ``x (M, n)``, ``u (M, 1)`` and ``a`` (a 0-d
tensor or ``(M, 1)``) that reduces over the last dimension. Written as eager PyTorch each op
allocates and re-reads an ``(M, n)`` temporary; ``torch.compile`` fuses a kernel into one pass
over ``x``. The eager and compiled versions compute the same formulas; their sums may differ
in the last bits because the summation order differs.

Compilation policy (see :func:`set_compile_mode`):

- ``"auto"`` (default; environment variable ``DECLNET_COMPILE``): compile for inputs with at
  least 2**20 elements, on CPU and CUDA, unless already inside ``torch.compile``;
- ``"always"`` / ``"never"``.

If compiling fails (no C++ compiler, no Triton, an unsupported platform) declnet warns once
and uses the eager kernels from then on; compilation is never required.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .._diagnostics import DeclarativeWarning

__all__ = ["compile_mode", "kernel", "register", "set_compile_mode"]

_MODES = ("auto", "always", "never")
_AUTO_MIN_NUMEL = 1 << 20
_state: dict[str, object] = {"mode": None, "broken": False}
_compiled: dict[str, Callable[..., object]] = {}


def set_compile_mode(mode: str) -> None:
    """Choose when robust pooling compiles its fused kernels with ``torch.compile``.

    Args:
        mode: ``"auto"`` (compile for inputs of at least 2**20 elements), ``"always"`` or
            ``"never"`` (eager PyTorch only).

    Raises:
        ValueError: for any other value.

    Example:
        >>> set_compile_mode("never")   # e.g. in a test suite, to avoid compile time
    """
    if mode not in _MODES:
        raise ValueError(f"compile mode must be one of {_MODES}, got {mode!r}.")
    _state["mode"] = mode


def compile_mode() -> str:
    """The current compile mode (``"auto"``, ``"always"`` or ``"never"``)."""
    mode = _state["mode"]
    if mode is None:
        env = os.environ.get("DECLNET_COMPILE", "auto").strip().lower()
        mode = {"0": "never", "off": "never", "1": "always", "on": "always"}.get(env, env)
        if mode not in _MODES:
            warnings.warn(
                f"DECLNET_COMPILE={env!r} is not one of {_MODES} (or 0/1); using 'auto'.",
                DeclarativeWarning,
                stacklevel=3,
            )
            mode = "auto"
        _state["mode"] = mode
    return str(mode)


def _want_compiled(x: Tensor) -> bool:
    if _state["broken"]:
        return False
    mode = compile_mode()
    if mode == "never" or x.device.type not in ("cpu", "cuda"):
        return False
    if torch.compiler.is_compiling():
        return False
    return mode == "always" or x.numel() >= _AUTO_MIN_NUMEL


# --------------------------------------------------------------------------------------------
# The kernels. t = (u - x) / α throughout. Kernels with an ``inv`` flag take ``a = 1 / α``
# when it is true (see _RECIPROCAL): a product is several times cheaper than a quotient.


def _scaled(d: Tensor, a: Tensor, inv: bool) -> Tensor:
    """``d / α`` in place (``d`` is a temporary): ``d * a`` when ``inv`` (``a`` is ``1 / α``),
    ``d / a`` otherwise."""
    return d.mul_(a) if inv else d.div_(a)

# |t| beyond which exp(−t²/2) is 0 in float64 (and float32): clamping t there changes no
# Welsch term and keeps t² and (1 − t²)·e finite for far outliers (−inf · 0 would be NaN).
WELSCH_T_MAX = 64.0
# Pseudo-Huber: t is clamped at sqrt(max)/2 of its dtype, where t / sqrt(1 + t²) is ±1 to
# the dtype's precision, t² is still finite and (1 + t²)^(-3/2) underflows to 0 as it should.
PSEUDO_HUBER_T_MAX = 1e18  # a bound valid in both float32 and float64 (for rescaled rows)


def _rsqrt_one_plus_square(t: Tensor) -> Tensor:
    """``(1 + t²)^(-1/2)`` in one new tensor."""
    return torch.addcmul(torch.ones((), dtype=t.dtype, device=t.device), t, t).rsqrt_()


def _pseudo_huber_terms(t: Tensor) -> tuple[Tensor, Tensor]:
    """``t / sqrt(1 + t²)`` and ``(1 + t²)^(-1/2)``, with t clamped where ``t²`` would
    overflow. ``t`` (a temporary) is overwritten: the kernels work in place where they can,
    which saves a third of the eager time (fewer temporaries as large as the input)."""
    bound = math.sqrt(torch.finfo(t.dtype).max) / 2
    t = t.clamp_(-bound, bound)
    r = _rsqrt_one_plus_square(t)
    return t.mul_(r), r


def row_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row minimum, maximum and sum in one pass; each ``(M, 1)``."""
    return (
        x.amin(-1, keepdim=True),
        x.amax(-1, keepdim=True),
        x.sum(-1, keepdim=True),
    )


def shortest_window(s: Tensor, k: int) -> Tensor:
    """Index ``j`` of the shortest window ``s[j + k] − s[j]`` of sorted rows; ``(M, 1)``."""
    return (s[:, k:] - s[:, :-k]).argmin(-1, keepdim=True)


def pseudo_huber_sums(
    x: Tensor, u: Tensor, a: Tensor, inv: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """With ``q_i = t_i / sqrt(1 + t_i²)`` and ``r_i = (1 + t_i²)^(-1/2)``: Σ q_i, Σ r_i³ and
    Σ q_i r_i⁴; each ``(M, 1)``.

    For the pseudo-Huber penalty these are ``Σφ'(u − x_i) / α``, ``Σφ''`` and
    ``−α Σφ''' / 3``: what a Halley step needs.
    """
    q, r = _pseudo_huber_terms(_scaled(u - x, a, inv))
    r3 = (r * r).mul_(r)
    s1, s2 = q.sum(-1, keepdim=True), r3.sum(-1, keepdim=True)
    return s1, s2, r3.mul_(r).mul_(q).sum(-1, keepdim=True)


def pseudo_huber_first_sums(
    x: Tensor, u: Tensor, a: Tensor, inv: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`row_stats` of ``x`` and :func:`pseudo_huber_sums` at ``u``, in one pass."""
    return row_stats(x) + pseudo_huber_sums(x, u, a, inv)


# Indicators as sign(·) clamped at 0 (1 where positive, 0 at zero, below zero and for NaN):
# exact, and several times faster in eager mode on CPU than a comparison and a conversion
# of the boolean result (which are not vectorised there); the same under torch.compile.


def _positive(t: Tensor) -> Tensor:
    """``1[t > 0]`` in ``t``'s dtype, in place (``t`` is a temporary)."""
    return t.sign_().clamp_min_(0)


def huber_sums(x: Tensor, u: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """Σ φ'(u − x_i) and the number of strict inliers ``|u − x_i| < α``; each ``(M, 1)``."""
    z = u - x
    h = _positive(a - z.abs()).sum(-1, keepdim=True)
    g = torch.minimum(torch.maximum(z, -a), a).sum(-1, keepdim=True)
    return g, h


def huber_first_sums(
    x: Tensor, u: Tensor, a: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`row_stats` of ``x`` and :func:`huber_sums` at ``u``, in one pass."""
    return row_stats(x) + huber_sums(x, u, a)


def welsch_sums(
    x: Tensor, u: Tensor, a: Tensor, inv: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """For ``e_i = exp(−t_i²/2)``: Σ t_i e_i, Σ (1 − t_i²) e_i and Σ e_i; each ``(M, 1)``.

    These are ``α Σφ'``, ``α² Σφ''`` and ``α² Σ weight`` (so ``n − Σ e_i`` is the objective).
    """
    t = _scaled(u - x, a, inv).clamp_(-WELSCH_T_MAX, WELSCH_T_MAX)
    t2 = t * t
    e = (t2 * -0.5).exp_()
    s_e = e.sum(-1, keepdim=True)
    s_h = t2.neg_().add_(1).mul_(e).sum(-1, keepdim=True)
    return t.mul_(e).sum(-1, keepdim=True), s_h, s_e


def pseudo_huber_backward_sums(
    x: Tensor, y: Tensor, a: Tensor, inv: bool = False
) -> tuple[Tensor, Tensor]:
    """Σ w_i and Σ t_i³ w_i with ``w_i = (1 + t_i²)^(-3/2)``; each ``(M, 1)``."""
    q, r = _pseudo_huber_terms(_scaled(y - x, a, inv))  # t³ w = (t r)³ = q³, bounded by 1
    w = (r * r).mul_(r).sum(-1, keepdim=True)
    return w, (q * q).mul_(q).sum(-1, keepdim=True)


def pseudo_huber_backward_grad(
    x: Tensor, y: Tensor, a: Tensor, scale: Tensor, inv: bool = False
) -> Tensor:
    """``scale · (1 + t_i²)^(-3/2)``, shape ``(M, n)``."""
    t = _scaled(y - x, a, inv)
    r = _rsqrt_one_plus_square(t)
    return (r * r).mul_(r).mul_(scale)


def pseudo_huber_backward_fused(
    x: Tensor, y: Tensor, a: Tensor, v: Tensor, inv: bool = False
) -> tuple[Tensor, Tensor]:
    """``v · w_i / Σ_j w_j`` ``(M, n)`` and ``Σ_j w_j`` ``(M, 1)`` with
    ``w_i = (1 + t_i²)^(-3/2)``: the backward in one kernel when ``α`` needs no gradient (a
    third of the passes of the sums and the gradient kernels in eager mode)."""
    r = _rsqrt_one_plus_square(_scaled(y - x, a, inv))  # 0 where t² overflows
    w = (r * r).mul_(r)
    total = w.sum(-1, keepdim=True)
    return w.mul_(v / total), total


def welsch_backward_sums(
    x: Tensor, y: Tensor, a: Tensor, inv: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """With ``e_i = exp(−t_i²/2)``: Σ(1−t²)e, Σ|1−t²|e, Σ e, Σ t(t²−2)e, Σ t³e; each (M, 1)."""
    t = _scaled(y - x, a, inv).clamp_(-WELSCH_T_MAX, WELSCH_T_MAX)
    t2 = t * t
    e = (t2 * -0.5).exp_()
    c = (1 - t2).mul_(e)
    s_c, s_e = c.sum(-1, keepdim=True), e.sum(-1, keepdim=True)
    s_abs = c.abs_().sum(-1, keepdim=True)
    te = t.mul_(e)
    s_shift = (te * t2).sum(-1, keepdim=True)
    s_newton = t2.sub_(2).mul_(te).sum(-1, keepdim=True)
    return s_c, s_abs, s_e, s_newton, s_shift


def welsch_backward_fused(
    x: Tensor, y: Tensor, a: Tensor, v: Tensor, inv: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``v · (1 − t_i²) e_i / Σ_j (1 − t_j²) e_j`` ``(M, n)`` with ``e_i = exp(−t_i²/2)``,
    and Σ(1−t²)e, Σ|1−t²|e, Σ e ``(M, 1)``: the backward in one kernel when ``α`` needs no
    gradient (rows where Σ(1−t²)e is not positive are the caller's to redo)."""
    t2 = _scaled(y - x, a, inv).clamp_(-WELSCH_T_MAX, WELSCH_T_MAX).square_()
    e = (t2 * -0.5).exp_()
    c = t2.neg_().add_(1).mul_(e)
    s_c, s_e = c.sum(-1, keepdim=True), e.sum(-1, keepdim=True)
    s_abs = c.abs().sum(-1, keepdim=True)
    return c.mul_(v / s_c), s_c, s_abs, s_e


def welsch_backward_grad(
    x: Tensor,
    y: Tensor,
    a: Tensor,
    scale_newton: Tensor,
    scale_shift: Tensor,
    inv: bool = False,
) -> Tensor:
    """``scale_newton · (1 − t²) e + scale_shift · e``, shape ``(M, n)``."""
    t = _scaled(y - x, a, inv).clamp_(-WELSCH_T_MAX, WELSCH_T_MAX)
    t2 = t * t
    e = (t2 * -0.5).exp_()
    return t2.neg_().add_(1).mul_(scale_newton).add_(scale_shift).mul_(e)


def huber_backward_sums(x: Tensor, y: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """Number of inliers ``|y − x_i| ≤ α`` and Σ sign(y − x_i) over outliers; each ``(M, 1)``."""
    z = y - x
    outlier = _positive(z.abs() - a)
    cnt = z.shape[-1] - outlier.sum(-1, keepdim=True)
    return cnt, outlier.mul_(z.sign_()).sum(-1, keepdim=True)


def _window(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``1[lo ≤ x_i ≤ hi]`` in ``x``'s dtype (``lo ≤ hi``; also 1 for a NaN, whose row is
    NaN anyway)."""
    return _positive(lo - x).add_(_positive(x - hi)).neg_().add_(1)


def window_sums(x: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Σ x_i and the count over ``lo ≤ x_i ≤ hi``; each ``(M, 1)``."""
    m = _window(x, lo, hi)
    return (x * m).sum(-1, keepdim=True), m.sum(-1, keepdim=True)


def truncated_prefix_sums(s: Tensor, ref: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """Prefix sums of ``d = (s − ref) / α`` and ``d²`` in float64; each ``(M, n)``."""
    d = (s.to(torch.float64) - ref.to(torch.float64)) / a.to(torch.float64)
    return d.cumsum(-1), (d * d).cumsum(-1)


def truncated_window_costs(
    p1: Tensor, p2: Tensor, bounds: Tensor, exits: bool
) -> tuple[Tensor, Tensor]:
    """Best window cost ``(SSE + α² (n − size)) / α²`` and its index among n windows; ``(M, 1)``.

    ``p1``, ``p2`` are inclusive prefix sums ``(M, n)``; window k is ``[k+1, bounds_k)`` when
    ``exits`` and ``[bounds_k, k+1)`` otherwise (0-based, end exclusive).
    """
    n = p1.shape[-1]
    k1 = torch.arange(1, n + 1, device=p1.device, dtype=bounds.dtype)
    zero = torch.zeros((), dtype=p1.dtype, device=p1.device)
    at1 = torch.where(bounds > 0, p1.gather(1, (bounds - 1).clamp_min(0)), zero)
    at2 = torch.where(bounds > 0, p2.gather(1, (bounds - 1).clamp_min(0)), zero)
    if exits:
        s1, s2, size = at1 - p1, at2 - p2, bounds - k1
    else:
        s1, s2, size = p1 - at1, p2 - at2, k1 - bounds
    size_f = size.to(p1.dtype)
    cost = (s2 - s1 * s1 / size_f).clamp_min(0) + (n - size_f)
    cost = torch.where(size > 0, cost, torch.inf)
    best, index = cost.min(-1, keepdim=True)
    return best, index


def _bins(s: Tensor, o: Tensor, h: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """The bin coordinate ``q = (s − o) / h`` clamped to ``[−1, bins]`` (NaN → −1), its floor
    and the bin index ``floor(q) + 1`` (0: below, ``bins + 1``: at or above ``bins``)."""
    q = torch.nan_to_num((s - o) / h, nan=-1.0, posinf=float(bins), neginf=-1.0)
    q = q.clamp(-1.0, float(bins))
    fl = q.floor()
    return q, fl, (fl + 1).to(torch.int64)


def histogram_counts(s: Tensor, o: Tensor, h: Tensor, bins: int) -> Tensor:
    """Counts of ``q = (s − o) / h`` on ``bins`` unit bins with two overflow bins (as
    :func:`truncated_histogram`, counts only); ``(M, bins + 2)`` in ``s``'s dtype."""
    idx = _bins(s, o, h, bins)[2]
    out = torch.zeros((s.shape[0], bins + 2), dtype=s.dtype, device=s.device)
    return out.scatter_add_(1, idx, torch.ones_like(s))


def truncated_histogram(
    s: Tensor, o: Tensor, h: Tensor, bins: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Histogram of ``q = (s − o) / h`` on ``bins`` unit bins, with two overflow bins.

    Bin ``k + 1`` holds ``k ≤ q < k + 1`` for ``0 ≤ k < bins``; bin 0 holds ``q < 0`` (and
    NaN), bin ``bins + 1`` holds ``q ≥ bins``. Returns the counts and, over the regular bins,
    the sums of the local coordinate ``l = q − k − 1/2`` and of ``l²`` (0 in the overflow
    bins); each ``(M, bins + 2)``.
    """
    q, fl, idx = _bins(s, o, h, bins)
    regular = (fl >= 0) & (fl < bins)
    local = torch.where(regular, q - fl - 0.5, 0.0)
    shape = (s.shape[0], bins + 2)
    cnt = torch.zeros(shape, dtype=s.dtype, device=s.device).scatter_add_(
        1, idx, torch.ones_like(s)
    )
    s1 = torch.zeros(shape, dtype=s.dtype, device=s.device).scatter_add_(1, idx, local)
    s2 = torch.zeros(shape, dtype=s.dtype, device=s.device).scatter_add_(1, idx, local * local)
    return cnt, s1, s2


def truncated_objective(x: Tensor, u: Tensor, a: Tensor) -> Tensor:
    """``Σ_i min(t_i², 1)`` (twice the truncated-quadratic objective over ``α²``), summed in
    float64; ``(M, 1)``."""
    t = (u - x) / a
    return torch.clamp_max(t * t, 1.0).sum(-1, keepdim=True, dtype=torch.float64)


def truncated_bin_bounds(
    cnt: Tensor, s1: Tensor, s2: Tensor, k_bins: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Lower bounds of ``Σ_i min(t_i², 1)`` on every regular bin of a :func:`truncated_histogram`
    with ``k_bins`` bins per α.

    For bin ``kb`` (``u = origin + h v``, ``v ∈ [kb, kb + 1]``): the points at most ``K − 1``
    bins away are inliers (their exact quadratic, in units of ``h²``: ``b0 v² − 2 b1 v + b2``),
    those ``K`` bins away are bounded below by a chord linear in ``v``, farther ones cost 1
    (see ``_truncated_pruned``). The bound is the convex quadratic
    ``(b0 v² − 2 vb v) / K² + const`` in ``v``. Returns, each ``(M, nb)`` in float64, its
    minimum over the bin, ``b0`` and ``vb``, and the minimiser ``v`` of the smallest one
    ``(M, 1)``.
    """
    f64 = torch.float64
    k = k_bins
    nb = cnt.shape[-1] - 2
    c = cnt.to(f64)
    creg, l1, l2 = c[:, 1 : nb + 1], s1[:, 1 : nb + 1].to(f64), s2[:, 1 : nb + 1].to(f64)
    mid = torch.arange(nb, device=cnt.device, dtype=f64) + 0.5
    # Per bin: count, Σ (k + ½ + l) and Σ (k + ½ + l)²; the sums over the window of bins
    # kb − K + 1 … kb + K − 1 (clipped to the regular bins) are differences of their
    # inclusive cumsum C: C[min(kb + K − 1, nb − 1)] − C[kb − K] (0 for kb < K).
    w1 = torch.addcmul(l1, creg, mid)
    w2 = torch.addcmul(l2, torch.addcmul(l1 * 2, creg, mid), mid)
    cum = torch.stack([creg, w1, w2], 1).cumsum(-1)
    last = cum[:, :, nb - 1 :].expand(-1, -1, k - 1)
    zeros = torch.zeros((1, 1, 1), dtype=f64, device=cnt.device).expand(cum.shape[0], 3, k)
    b = torch.cat([cum[:, :, k - 1 :], last], -1) - torch.cat([zeros, cum[:, :, : nb - k]], -1)
    b0, b1, b2 = b[:, 0], b[:, 1], b[:, 2]
    # Bins kb + K and kb − K (empty beyond the regular bins).
    none = zeros[:, 0]
    up_c, up_l = torch.cat([creg[:, k:], none], -1), torch.cat([l1[:, k:], none], -1)
    dn_c, dn_l = torch.cat([none, creg[:, : nb - k]], -1), torch.cat([none, l1[:, : nb - k]], -1)
    up_slope = (up_c - 2 * up_l) / k  # the bound of the upper points is up_c − up_slope w
    dn_slope = (dn_c + 2 * dn_l) / k  # that of the lower ones dn_c − dn_slope (1 − w)
    kb = mid - 0.5
    vb = b1 - (dn_slope - up_slope) * (k * k / 2)  # the vertex of b0 v² − 2 (b1 − lin) v
    v = torch.where(b0 > 0, vb / b0.clamp_min(1), mid)
    v = torch.minimum(torch.maximum(v, kb), kb + 1)
    quad = (b0 * v * v - 2 * b1 * v + b2).clamp_min(0) / (k * k)
    # Far points: the regular ones beyond K bins, and the overflow bins where they are
    # beyond K bins (points below the regular bins are farther than α from u in bin kb ≥ K).
    n_lo, n_hi = c[:, :1], c[:, nb + 1 :]
    far = (creg.sum(-1, keepdim=True) - b0 - up_c - dn_c).addcmul(n_lo, (kb >= k).to(f64))
    far = far.addcmul(n_hi, (kb <= nb - 1 - k).to(f64))
    edge = up_c + dn_c - dn_slope + (dn_slope - up_slope) * (v - kb)
    lower = quad + edge.clamp_min(0) + far
    return lower, b0, vb, v.gather(1, lower.argmin(-1, keepdim=True))


def _feasible_end(
    lower: Tensor, b0: Tensor, vb: Tensor, f_up: Tensor, kb: Tensor, k_bins: int, first: bool
) -> Tensor:
    """The smallest (``first``) or largest ``v`` in bin ``kb`` (``(M, 1)``) where the bound
    ``lower + A ((v − vert)² − (v* − vert)²)`` (``A = b0 / K²``, ``vert = vb / b0``, ``v*``
    the bound's minimiser over the bin) is at most ``f_up``; the bin's end without points
    near it (``b0 = 0``: the bound is not quadratic).

    ``lower`` holds the clamps of :func:`truncated_bin_bounds`, which only act on rounding
    errors (the quadratic is a sum of squares and every chord term is at least
    ``1 − 2/K > 0``); the margin of ``f_up`` covers those."""
    lo, b, c = lower.gather(1, kb), b0.gather(1, kb), vb.gather(1, kb)
    kb_f = kb.to(lower.dtype)
    quadratic = b > 0
    vert = c / torch.where(quadratic, b, 1.0)
    a_q = b / (k_bins * k_bins)
    v_best = torch.minimum(torch.maximum(vert, kb_f), kb_f + 1)
    at_vertex = lo - a_q * (v_best - vert) ** 2  # the quadratic's value at its vertex
    half = ((f_up - at_vertex).clamp_min(0) / torch.where(quadratic, a_q, 1.0)).sqrt()
    end = vert - half if first else vert + half
    whole = kb_f if first else kb_f + 1
    return torch.where(quadratic, torch.minimum(torch.maximum(end, kb_f), kb_f + 1), whole)


def truncated_bands(
    lower: Tensor,
    b0: Tensor,
    vb: Tensor,
    f_up: Tensor,
    cnt: Tensor,
    s: Tensor,
    origin: Tensor,
    h: Tensor,
    a: Tensor,
    k_bins: int,
    cap: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The interval ``U`` of ``u`` where the bounds of :func:`truncated_bin_bounds` allow
    the minimum ``≤ f_up``, and the two bands of sorted points that may switch between inlier
    and outlier for ``u`` in ``U``.

    ``U`` is the hull of the feasible bins ``[kmin, kmax]``, cut inside the end bins where
    their convex bound exceeds ``f_up``, and widened by ``h / 1024``. The lower band holds
    the points of ``s`` in ``U − α``, the upper band those in ``U + α`` (each end moved out
    by 8 units in the last place of ``s``'s dtype, so that rounding the ends to that dtype
    keeps every such point); the points between the bands are inliers and those outside
    them outliers for every ``u`` in ``U``.

    Returns ``ok`` (bool: the bounds certify the row), the sorted indices ``start_l``,
    ``end_l`` of the lower band and ``start_r`` of the upper one, both band sizes (int64),
    each ``(M, 1)``; the points between the bands are those strictly between the two values
    of ``(M, 2)`` (in ``s``'s dtype); the middle of ``U`` (float64, ``(M, 1)``).
    """
    f64 = torch.float64
    k = k_bins
    nb = lower.shape[-1]
    feasible = lower <= f_up
    kmin = feasible.to(torch.int8).argmax(-1, keepdim=True)
    kmax = nb - 1 - feasible.flip(-1).to(torch.int8).argmax(-1, keepdim=True)
    v_lo = _feasible_end(lower, b0, vb, f_up, kmin, k, True)
    v_hi = _feasible_end(lower, b0, vb, f_up, kmax, k, False)
    o64, h64, a64 = origin.to(f64), h.to(f64), a.to(f64)
    u_lo = o64 + h64 * (v_lo - 1 / 1024)
    u_hi = o64 + h64 * (v_hi + 1 / 1024)
    ends = torch.cat([u_lo - a64, u_hi - a64, u_lo + a64, u_hi + a64], -1)
    slack = ends.abs() * (8 * torch.finfo(s.dtype).eps)
    ends = (ends + torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=f64, device=s.device) * slack)
    ends = ends.to(s.dtype).contiguous()
    first = torch.searchsorted(s, ends[:, 0::2].contiguous())  # #{s < lower end}
    last = torch.searchsorted(s, ends[:, 1::2].contiguous(), right=True)  # #{s ≤ upper end}
    start_l, start_r = first[:, :1], first[:, 1:]
    end_l, end_r = last[:, :1], last[:, 1:]
    n_l, n_r = end_l - start_l, end_r - start_r
    # u outside the regular bins: points K bins in are farther than α from it.
    left_out = cnt[:, k + 1 :].to(f64).sum(-1, keepdim=True)  # points in bins ≥ K
    right_out = cnt[:, : nb - k + 1].to(f64).sum(-1, keepdim=True)  # points in bins < nb − K
    ok = (
        feasible.any(-1, keepdim=True)
        & torch.isfinite(f_up)
        & (kmin >= k + 1)
        & (kmax <= nb - k - 2)
        & (kmax - kmin < 2 * k - 2)
        & (left_out > f_up)
        & (right_out > f_up)
        & (n_l <= cap)
        & (n_r <= cap)
        & (end_l <= start_r)
    )
    return ok, start_l, end_l, start_r, n_l, n_r, ends[:, 1:3], (u_lo + u_hi) / 2


def _exclusive(prefix: Tensor, count: Tensor) -> Tensor:
    """``Σ`` of the first ``count`` terms (``(M, c)``, ``0 ≤ count ≤ k``) from the inclusive
    prefix sums ``prefix (M, k)``."""
    at = prefix.gather(1, (count - 1).clamp_min(0))
    return torch.where(count > 0, at, torch.zeros((), dtype=prefix.dtype, device=prefix.device))


def _best_cost(
    sum1: Tensor, sum2: Tensor, size: Tensor, valid: Tensor, n: int
) -> tuple[Tensor, Tensor]:
    """The smallest window cost ``SSE + (n − size)`` (units of α²) of the valid candidates,
    and its column (the first on a tie); each ``(M, 1)``."""
    cost = (sum2 - sum1 * sum1 / size.clamp_min(1)).clamp_min(0) + (n - size)
    return torch.where(valid & (size > 0), cost, math.inf).min(-1, keepdim=True)


def truncated_core_sums(s: Tensor, core: Tensor, ref: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """Σ d and Σ d² over the points of ``s`` strictly between the two values of
    ``core (M, 2)``, with ``d = (s − ref) / α`` in float64 (``ref`` float64); each ``(M, 1)``.
    (A comparison of values vectorises better than one of indices.)"""
    a64 = a.to(torch.float64)
    inside = (s > core[:, :1]) & (s < core[:, 1:])
    d = torch.where(inside, s.to(torch.float64) - ref, 0.0)
    return d.sum(-1, keepdim=True) / a64, (d * d).sum(-1, keepdim=True) / (a64 * a64)


def truncated_band_windows(
    low: Tensor,
    up: Tensor,
    n_l: Tensor,
    n_r: Tensor,
    n_c: Tensor,
    c1: Tensor,
    c2: Tensor,
    ref: Tensor,
    a: Tensor,
    n: int,
) -> tuple[Tensor, Tensor]:
    """The best window ``core ∪ (a suffix of the lower band) ∪ (a prefix of the upper one)``
    as the numbers of lower-band points left out and upper-band points taken; each ``(M, 1)``.

    ``low (M, k_l)`` and ``up (M, k_r)`` are the sorted bands (``n_l``, ``n_r`` points, then
    ``inf``), ``n_c`` the size of the core, ``c1``, ``c2`` its :func:`truncated_core_sums`,
    ``n`` the row length. The candidates are those of the full enumeration inside the
    bands: none switched yet, then after each exit of a lower-band point (at its value + 2α)
    and each entry of an upper-band point, in the order of those events, an entry first on
    a tie; the first of equal costs in that order wins. The costs are in units of α², from
    sums of ``d = (s − ref) / α`` in float64.
    """
    f64 = torch.float64
    k_l, k_r = low.shape[-1], up.shape[-1]
    a64 = a.to(f64)
    col_l = torch.arange(k_l, device=low.device)
    col_r = torch.arange(k_r, device=low.device)
    valid_l, valid_r = col_l < n_l, col_r < n_r
    d_l = torch.where(valid_l, (low.to(f64) - ref) / a64, 0.0)
    d_r = torch.where(valid_r, (up.to(f64) - ref) / a64, 0.0)
    pl1, pl2 = d_l.cumsum(-1), (d_l * d_l).cumsum(-1)
    pr1, pr2 = d_r.cumsum(-1), (d_r * d_r).cumsum(-1)
    # Σ d and Σ d² over the core with the whole lower band (no exit yet).
    c1 = c1 + pl1[:, -1:]
    c2 = c2 + pl2[:, -1:]
    # The merge of the exits (sorted, as the lower band) with the entries (sorted): an entry
    # at a tie comes first, so #{exits before entry j} = #{i : exit_i < entry_j} and
    # #{entries before exit i} = #{j : entry_j ≤ exit_i}.
    exits = (low + 2 * a.to(low.dtype)).contiguous()
    entries_before_exit = torch.searchsorted(up, exits, right=True)
    exits_before_entry = torch.searchsorted(exits, up)
    size0 = (n_c + n_l).to(f64)
    f0, _ = _best_cost(c1, c2, size0, torch.ones_like(valid_l[:, :1]), n)
    # After exit i (i + 1 exits, the entries before it) and after entry j (j + 1 entries).
    f_e, i_e = _best_cost(
        c1 - pl1 + _exclusive(pr1, entries_before_exit),
        c2 - pl2 + _exclusive(pr2, entries_before_exit),
        size0 - (col_l + 1) + entries_before_exit,
        valid_l,
        n,
    )
    f_r, j_r = _best_cost(
        c1 - _exclusive(pl1, exits_before_entry) + pr1,
        c2 - _exclusive(pl2, exits_before_entry) + pr2,
        size0 - exits_before_entry + (col_r + 1),
        valid_r,
        n,
    )
    use_e = f_e < f0
    use_r = f_r < torch.minimum(f0, f_e)
    exits_done = torch.where(use_e, i_e + 1, 0)
    entries_done = torch.where(use_e, entries_before_exit.gather(1, i_e), 0)
    exits_done = torch.where(use_r, exits_before_entry.gather(1, j_r), exits_done)
    return exits_done, torch.where(use_r, j_r + 1, entries_done)


def huber_backward_fused(x: Tensor, y: Tensor, a: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``v · 1[|y − x_i| ≤ α] / count`` ``(M, n)`` and the number of inliers ``count``
    ``(M, 1)``: the backward in one kernel when ``α`` needs no gradient (rows without an
    inlier are the caller's to redo)."""
    inlier = _positive((y - x).abs_().sub_(a)).neg_().add_(1)
    count = inlier.sum(-1, keepdim=True)
    return inlier.mul_(v / count), count


def huber_backward_grad(x: Tensor, y: Tensor, a: Tensor, scale: Tensor) -> Tensor:
    """``scale · 1[|y − x_i| ≤ α]``, shape ``(M, n)``."""
    return _positive((y - x).abs_() - a).neg_().add_(1).mul_(scale)


def window_grad(x: Tensor, lo: Tensor, hi: Tensor, scale: Tensor) -> Tensor:
    """``scale · 1[lo ≤ x_i ≤ hi]``, shape ``(M, n)``."""
    return _window(x, lo, hi).mul_(scale)


_EAGER: dict[str, Callable[..., object]] = {
    f.__name__: f
    for f in (
        row_stats,
        shortest_window,
        pseudo_huber_sums,
        pseudo_huber_first_sums,
        huber_sums,
        huber_first_sums,
        welsch_sums,
        pseudo_huber_backward_sums,
        pseudo_huber_backward_grad,
        pseudo_huber_backward_fused,
        welsch_backward_sums,
        welsch_backward_grad,
        welsch_backward_fused,
        huber_backward_sums,
        huber_backward_grad,
        huber_backward_fused,
        window_sums,
        window_grad,
        truncated_prefix_sums,
        truncated_window_costs,
        truncated_histogram,
        histogram_counts,
        truncated_objective,
        truncated_bin_bounds,
        truncated_bands,
        truncated_core_sums,
        truncated_band_windows,
    )
}


def register(*kernels: Callable[..., object], blocks: bool = True) -> None:
    """Make kernels defined in another module (vector pooling's) available to :func:`kernel`
    under their function names, with the same compilation policy; ``blocks=False``: the
    eager kernel runs on the whole input rather than on blocks of rows."""
    for fn in kernels:
        known = _EAGER.setdefault(fn.__name__, fn)
        if known is not fn:
            raise RuntimeError(f"two robust pooling kernels are named {fn.__name__!r}")
        if not blocks:
            _UNBLOCKED.add(fn.__name__)


_UNBLOCKED: set[str] = set()


_EAGER_BLOCK = 1 << 16  # elements per block of rows for the eager kernels


def _in_blocks(eager: Callable[..., object]) -> Callable[..., object]:
    """Run an eager kernel on blocks of rows, writing each block into the whole outputs.

    Eager PyTorch allocates a temporary as large as its input for every op; on blocks of
    about 2**16 elements those stay in cache and the allocator reuses them, which is several
    times faster on CPU than one op over a large input. The first argument's first dimension
    is the number of rows ``M``; arguments with that first dimension are split, others (0-d
    tensors, ints) are passed whole. The loop is over blocks of many rows, not over rows.
    """

    def run(*args: object) -> object:
        first: Tensor = args[0]  # type: ignore[assignment]  # always the per-row input
        rows = first.shape[0]
        block = max(1, _EAGER_BLOCK // max(1, first[0].numel())) if rows else 1
        if rows <= block:
            return eager(*args)
        outs: list[Tensor] = []
        single = False
        for start in range(0, rows, block):
            sliced = [
                a[start : start + block]
                if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == rows
                else a
                for a in args
            ]
            part = eager(*sliced)
            if not outs:
                single = not isinstance(part, tuple)
            parts = (part,) if single else part
            if not outs:  # the whole outputs, written block by block (no concatenation)
                outs = [p.new_empty((rows, *p.shape[1:])) for p in parts]  # type: ignore[union-attr]
            for out, p in zip(outs, parts):  # type: ignore[arg-type]
                out[start : start + block].copy_(p)
        return outs[0] if single else tuple(outs)

    return run


# Kernels whose third argument is α and whose last one is the ``inv`` flag: :func:`kernel`
# passes them 1 / α (and ``inv=True``) wherever 1 / α is a normal float, so that
# (u − x) · (1 / α) is within one unit in the last place of (u − x) / α.
_RECIPROCAL = frozenset(
    {
        "pseudo_huber_sums",
        "pseudo_huber_first_sums",
        "welsch_sums",
        "pseudo_huber_backward_sums",
        "pseudo_huber_backward_grad",
        "pseudo_huber_backward_fused",
        "welsch_backward_sums",
        "welsch_backward_grad",
        "welsch_backward_fused",
    }
)


def _with_reciprocal(run: Callable[..., object]) -> Callable[..., object]:
    def call(*args: Tensor) -> object:
        a = args[2]
        info = torch.finfo(a.dtype)
        if bool(((a >= 1 / info.max) & (a <= 1 / info.tiny)).all()):
            return run(*args[:2], 1 / a, *args[3:], True)
        return run(*args, False)

    return call


def kernel(name: str, x: Tensor) -> Callable[..., object]:
    """The kernel ``name`` for input ``x`` (M, ...): compiled (with an eager fallback) or
    eager (on blocks of rows, on CPU). Called with α; those in ``_RECIPROCAL`` receive
    ``1 / α`` where that is exact enough."""
    run = _kernel(name, x)
    return _with_reciprocal(run) if name in _RECIPROCAL else run


def _kernel(name: str, x: Tensor) -> Callable[..., object]:
    """:func:`kernel` without the reciprocal of α."""
    eager = _EAGER[name]
    blocked = eager if name in _UNBLOCKED else _in_blocks(eager)
    if not _want_compiled(x):
        return blocked if x.device.type == "cpu" else eager
    compiled = _compiled.get(name)
    if compiled is None:
        # dynamic=None: the first shape is specialised; a second one (a last block of rows,
        # rows set aside after converging) compiles one shape-generic version.
        compiled = torch.compile(eager, fullgraph=True, dynamic=None)
        _compiled[name] = compiled

    def run(*args: Tensor) -> object:
        if _state["broken"]:
            return blocked(*args)
        try:
            return compiled(*args)
        except Exception as err:  # compilation failures come in many types; see below
            # torch.compile raises backend-specific errors (missing compiler, Triton, ...).
            # The eager kernel computes the same formula, so fall back to it for good.
            _state["broken"] = True
            warnings.warn(
                f"declnet: compiling the robust pooling kernel {name!r} failed "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "using eager PyTorch from now on (same results, slower). "
                "Call declnet.layers.set_compile_mode('never') to silence this.",
                DeclarativeWarning,
                stacklevel=2,
            )
            return blocked(*args)

    return run
