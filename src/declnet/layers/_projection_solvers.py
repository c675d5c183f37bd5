"""Solvers and closed-form vector-Jacobian products of the Lp projections (paper §5.2).

The forward algorithms and the backward formulas of Table 2 (p ∈ {1, 2, ∞}) and Corollary
4.7 (general p), for one tensor ``x`` projected along ``dim``. The autograd Function, the
functional forms and the Module are in :mod:`declnet.layers.projections`.

Numerical range: every solver works on scaled quantities so that no intermediate
overflows or underflows for finite inputs: the L2 norm is taken of ``x / max|x|``; the
thresholds of the L1 and simplex projections are computed from values shifted by their row
maximum (the threshold is shift-invariant), which removes the cancellation between a large
magnitude and a small radius; the general-p solver works on ``|x| / r`` in float64 with
products formed as products of square roots.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._functorch import surely_none

__all__ = ["backward", "forward", "reduce_to", "simplex_backward", "simplex_forward"]

# General-p solver settings: iteration caps of the outer (multiplier) and inner
# (per-coordinate) Newton loops; both are far from binding on well-scaled inputs.
_OUTER_ITERS = 100
_INNER_ITERS = 60


def reduce_to(grad: Tensor, like: float | Tensor) -> Tensor | None:
    """Sum a broadcast gradient back to the shape of ``like`` (None for a float)."""
    if not isinstance(like, Tensor):
        return None
    return grad.sum_to_size(like.shape)


def _dot(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """⟨a, b⟩ along ``dim``, keeping it (shape of the batch with size 1 at ``dim``)."""
    return torch.linalg.vecdot(a, b, dim=dim).unsqueeze(dim)


# Implementation note: the VJPs below use only arithmetic kernels (sign, division with
# rounding, addcmul, vecdot); full-size boolean masks and torch.where are avoided
# because they are several times slower on CPU.

# --------------------------------------------------------------------------------------
# p = 2: closed form, equation (47)
# --------------------------------------------------------------------------------------


def _l2_norm(x: Tensor, dim: int) -> Tensor:
    """‖x‖₂ along ``dim`` (keepdim), accurate over the whole floating-point range.

    The plain norm overflows once a square does (entries above ~1e19 in float32) and loses
    the squares that underflow (entries below ~1e-19); rows whose plain norm is not finite
    or below ``sqrt(tiny / eps)`` are recomputed as ``max|x| · ‖x / max|x|‖₂``.
    """
    norm = torch.linalg.vector_norm(x, 2, dim=dim, keepdim=True)
    info = torch.finfo(x.dtype)
    bad = ~((norm >= math.sqrt(info.tiny / info.eps)) & (norm <= info.max))
    if surely_none(bad):
        return norm
    top = torch.maximum(x.amax(dim=dim, keepdim=True), x.amin(dim=dim, keepdim=True).neg())
    safe = torch.where(top > 0, top, torch.ones_like(top))
    scaled = top * torch.linalg.vector_norm(x / safe, 2, dim=dim, keepdim=True)
    return torch.where(bad & torch.isfinite(top), scaled, norm)


def _l2_forward(x: Tensor, r: float | Tensor, dim: int, ball: bool) -> Tensor:
    norm = _l2_norm(x, dim)
    if ball:
        # x / max(‖x‖ / r, 1): x inside (and on) the ball, x / (‖x‖ / r) outside.
        return x / torch.clamp(norm / r, min=1.0)
    zero_rows = norm == 0
    # x / (‖x‖ / r) rather than x · (r / ‖x‖): stays finite for subnormal ‖x‖.
    if x.device.type == "cpu" and surely_none(zero_rows):
        return x / (norm / r)  # the common case, without the x = 0 fix-up below
    zero = zero_rows.to(x.dtype)
    y = x / ((norm + zero) / r)
    # x = 0: every point of the sphere is a solution; return r e_1 (the first
    # coordinate along dim). This touches one column only.
    y.narrow(dim, 0, 1).add_(zero * (r / (norm + zero)))
    return y


def _l2_backward(
    v: Tensor, x: Tensor, y: Tensor, r: float | Tensor, dim: int, ball: bool
) -> tuple[Tensor, Tensor]:
    # Table 2: Dy = (r / ‖x‖)(I − ŷŷᵀ) with ŷ = y / r, applied as a VJP without forming it.
    # At x = 0 (sphere) the factor r / ‖x‖ is replaced by 1: the tangent projector at y.
    norm = _l2_norm(x, dim)
    yv = _dot(y, v, dim)
    if ball:
        # Active on and outside the boundary (the one-sided gradient from outside).
        active = (norm >= r).to(v.dtype)
        factor = r / torch.clamp(norm, min=r)
        radial = active * yv / (r * r)
    else:
        zero = (norm == 0).to(v.dtype)
        factor = r / (norm + zero * r)
        radial = yv / (r * r)
    grad_x = torch.addcmul(v * factor, y, radial * factor, value=-1.0)
    return grad_x, radial * r  # v · dy/dr = ⟨v, ŷ⟩ on active rows, 0 strictly inside


# --------------------------------------------------------------------------------------
# p = ∞: clipping
# --------------------------------------------------------------------------------------


# Entries of each row looked at first by the L∞ sphere's inside test (see _linf_forward).
_LINF_HEAD = 64


def _linf_forward(x: Tensor, r: float | Tensor, dim: int, ball: bool) -> Tensor:
    y = torch.clamp(x, -r, r)
    if ball:
        return y
    # Sphere from inside: push the largest magnitude (the first one on ties) out to ±r,
    # with sign(0) = +1. On CPU the rows are checked first so that the common case
    # (every row on or outside the sphere) costs little: a row one of whose first
    # _LINF_HEAD entries reaches r is not inside (for signed data a pass over that prefix
    # usually decides every row); else a row whose maximum reaches r is not inside, and
    # only when some row's maximum is below r is the minimum taken too
    # (max |x| = max(max x, −min x): read-only passes, no |x| written).
    if x.device.type == "cpu" and x.shape[dim] > _LINF_HEAD:
        head = x.narrow(dim, 0, _LINF_HEAD).amax(dim=dim, keepdim=True)
        if isinstance(r, Tensor):
            outside = not bool((head < r).any())
        else:  # one radius: the smallest row maximum decides (one synchronisation)
            outside = float(head.amin()) >= r
        if outside:
            return y
    top = x.amax(dim=dim, keepdim=True)
    if x.device.type == "cpu" and not bool((top < r).any()):
        return y
    inside = torch.maximum(top, x.amin(dim=dim, keepdim=True).neg()) < r
    if x.device.type == "cpu" and not bool(inside.any()):
        return y
    index = x.abs().argmax(dim=dim, keepdim=True)
    x_peak = x.gather(dim, index)
    pushed = torch.copysign(r if isinstance(r, Tensor) else torch.full_like(x_peak, r), x_peak)
    y.scatter_(dim, index, torch.where(inside, pushed, y.gather(dim, index)))
    return y


def _linf_backward(
    v: Tensor, y: Tensor, r: float | Tensor, dim: int, masked: bool
) -> tuple[Tensor, Tensor]:
    # a = D_Y h = sign(y) on I* = {i : |y_i| = r}, 0 elsewhere. Truncating y / r gives
    # exactly that (|y_i| < r truncates to 0); coordinates of the ball's input lying
    # exactly at ±r are therefore active, as are any within one rounding of ±r.
    signs = y.div(r, rounding_mode="trunc")
    sv = _dot(signs, v, dim)
    if masked:
        # D²y = I − diag(|a|): the clipped coordinates are frozen (clamp's gradient).
        grad_x = torch.addcmul(v, v, signs.abs(), value=-1.0)
    else:
        # Dy = I − aaᵀ/(aᵀa); rows with no active coordinate get the identity.
        count = _dot(signs, signs, dim).clamp_min(1.0)
        grad_x = torch.addcmul(v, signs, sv / count, value=-1.0)
    # v · dy/dr = ⟨v, a⟩: Prop. 4.5 with C = −1 and the subgradient of max|u| that
    # averages over ties (a / |I*|), which is also the exact derivative.
    return grad_x, sv


# --------------------------------------------------------------------------------------
# p = 1: sort-based algorithm of Duchi et al.
# --------------------------------------------------------------------------------------


def _threshold_project(values: Tensor, total: float | Tensor, dim: int) -> Tensor:
    """``max(values − τ, 0)`` with τ such that it sums to ``total`` along ``dim``.

    This is the projection onto the simplex ``{u ≥ 0, Σ u = total}`` (Duchi et al.), and,
    applied to magnitudes, the L1 sphere's. When ``Σ values ≤ total`` (values ≥ 0) τ ≤ 0:
    every value grows by the same amount. τ is shift-invariant, so it is computed from the
    values shifted by their row maximum, and the output as ``(v − max) − (τ − max)``: the
    threshold never cancels against a large value (a radius of 1 at magnitudes of 1e8 in
    float32 keeps its sum).
    """
    top = values.amax(dim, keepdim=True)
    shifted = values - top
    mu, _ = torch.sort(shifted, dim=dim, descending=True)
    excess = mu.cumsum(dim) - total
    n = values.shape[dim]
    shape = [1] * values.dim()
    shape[dim] = n
    j = torch.arange(1, n + 1, dtype=values.dtype, device=values.device).reshape(shape)
    # The condition holds on a prefix of the sorted order (Duchi et al.), so counting it
    # gives the number of coordinates that stay positive.
    rho = (mu * j > excess).sum(dim, keepdim=True).clamp_min(1)
    tau = excess.gather(dim, rho - 1) / rho.to(values.dtype)
    return torch.relu(shifted - tau)


def _l1_forward(x: Tensor, r: float | Tensor, dim: int, ball: bool) -> Tensor:
    magnitude = x.abs()
    # Sphere with ‖x‖₁ < r: every magnitude grows by the same amount (the projection onto
    # the nearest facet), with the sign of +0 taken as +1. Ball: x strictly inside stays,
    # decided by the same expression as in the backward so that both agree exactly.
    z = _threshold_project(magnitude, r, dim)
    if ball:
        inside = magnitude.sum(dim, keepdim=True) < r
        z = torch.where(inside, magnitude, z)
    return torch.copysign(z, x)


def _l1_backward(
    v: Tensor, x: Tensor, y: Tensor, r: float | Tensor, dim: int, ball: bool, masked: bool
) -> tuple[Tensor, Tensor]:
    # Table 2: a = D_Y h = sign(y) (0 at zeros) and aᵀa = |support|.
    signs = torch.sign(y)
    count = _dot(signs, signs, dim).clamp_min(1.0)
    coef = _dot(signs, v, dim) / count  # = v · dy/dr
    inside = None
    if ball:
        # Strictly inside: identity. On the boundary: the sphere's gradient.
        inside = (x.abs().sum(dim, keepdim=True) < r).to(v.dtype)
        coef = coef * (1.0 - inside)
    # Dy = I − aaᵀ/k; masked: D²y = diag(|a|) − aaᵀ/k (zeroed coordinates are frozen).
    base = v
    if masked:
        keep = signs.abs() if inside is None else torch.maximum(signs.abs(), inside)
        base = v * keep
    return torch.addcmul(base, signs, coef, value=-1.0), coef


# --------------------------------------------------------------------------------------
# General p ∈ (1, ∞): safeguarded Newton on the multiplier, Corollary 4.7 backward
# --------------------------------------------------------------------------------------


def _linear_plus_power_root(a: Tensor, alpha: Tensor, beta: Tensor, k: float) -> Tensor:
    """s ≥ 0 with α s + β s^k = a (a ≥ 0, α, β ≥ 0 not both 0, k > 1), elementwise.

    The root lies in [L, U] with U = min(a/α, (a/β)^(1/k)) and L = min(a/(2α), (a/(2β))^(1/k))
    (one of the two terms is at least a/2 at the root), so U/L ≤ 2. A few bisections in
    log scale shrink the ratio to 2^(1/k), after which Newton's method from the right end
    (the function is convex and increasing) converges quadratically without overshooting.
    Every power evaluated is at most a, so nothing overflows.
    """
    inv_k = 1.0 / k
    with torch.no_grad():
        zero = a == 0  # the root is 0 (and a / 0 would give NaN below)
        linear = (beta == 0).expand_as(a)  # the root is a / α (and β s^k may overflow)
        beta = torch.where(beta == 0, torch.ones_like(beta), beta)
        upper = torch.minimum(a / alpha, (a / beta) ** inv_k).masked_fill(zero, 0.0)
        lower = torch.minimum(0.5 * a / alpha, (0.5 * a / beta) ** inv_k).masked_fill(zero, 0.0)
        for _ in range(max(1, math.ceil(math.log2(k))) + 1):
            mid = torch.sqrt(lower) * torch.sqrt(upper)  # lower · upper may overflow
            above = alpha * mid + beta * mid**k > a
            upper = torch.where(above, mid, upper)
            lower = torch.where(above, lower, mid)
        s = upper
        for _ in range(_INNER_ITERS):
            power = s ** (k - 1.0)
            value = alpha * s + beta * power * s - a
            slope = alpha + k * beta * power
            step = torch.where(slope > 0, value / slope, torch.zeros_like(value))
            s = torch.clamp(s - step, min=lower)
            if bool((step.abs() <= 1e-15 * s + 1e-300).all()):
                break
        s = torch.where(linear, a / alpha, s)
    return s


def _shrink_coordinates(a: Tensor, nu: Tensor, p: float) -> Tensor:
    """z ∈ [0, a] solving z + ν p z^(p−1) = a (ν ≥ 0), elementwise.

    For p ≥ 2 this is linear-plus-power in z; for p < 2 it is in w = z^(p−1)
    (w^(1/(p−1)) + ν p w = a), so the power always has an exponent above 1.
    """
    small = (nu * p).expand_as(a)
    one = torch.ones_like(a)
    if p >= 2.0:
        return _linear_plus_power_root(a, one, small, p - 1.0)
    w = _linear_plus_power_root(a, small, one, 1.0 / (p - 1.0))
    return w ** (1.0 / (p - 1.0))


def _shrink_derivative(z: Tensor, nu: Tensor, p: float) -> Tensor:
    """dz/dν for z + ν p z^(p−1) = a, as −p z / (z^(2−p) + ν p (p−1)) (no overflow)."""
    den = z ** (2.0 - p) + nu * p * (p - 1.0)
    safe = torch.where(den == 0, torch.ones_like(den), den)
    return torch.where(den == 0, torch.zeros_like(z), -p * z / safe)


def _grow_coordinates(a: Tensor, c: Tensor, p: float) -> Tensor:
    """For 1 < p < 2: the root z ≥ a of z − c p z^(p−1) = a on the increasing branch."""
    q = 1.0 / (p - 1.0)
    cp = c * p
    # ψ(w) = w^q − cp w − a is convex in w = z^(p−1); start right of its largest root.
    w = torch.maximum((2.0 * a) ** (1.0 / q), (2.0 * cp) ** (1.0 / (q - 1.0)))
    for _ in range(_INNER_ITERS):
        psi = w**q - cp * w - a
        slope = q * w ** (q - 1.0) - cp
        step = torch.where(slope > 0, psi / slope.clamp_min(1e-300), torch.zeros_like(psi))
        w = w - step
        if bool((step.abs() <= 1e-14 * (w.abs() + 1e-300)).all()):
            break
    return w**q


def _rising_root(a: Tensor, c: Tensor, p: float, start: Tensor | None = None) -> Tensor:
    """For p > 2: the root z ∈ [a, z*] of z − c p z^(p−1) = a on the increasing branch.

    g(z) = z − c p z^(p−1) − a is concave, so Newton's method is monotone from the left
    and lands on the left after one step from the right (``start``, a root for another
    c, always lies on the rising branch of this one).
    """
    cp = c * p
    z = a.clone() if start is None else start
    for _ in range(_INNER_ITERS):
        zp2 = z ** (p - 2.0)
        g = z - cp * zp2 * z - a
        slope = (1.0 - cp * (p - 1.0) * zp2).clamp_min(1e-12)
        step = g / slope
        z = z - step
        if bool((step.abs() <= 1e-14 * (z + 1e-300)).all()):
            break
    return z


def _safeguarded_newton(fn: Any, lo: Tensor, hi: Tensor, start: Tensor, increasing: bool) -> Tensor:
    """Root of a monotone scalar function per row inside the bracket [lo, hi].

    ``fn(t)`` returns (value, derivative). Newton steps that leave the current bracket
    are replaced by bisection, and so is the step after one that did not halve the
    bracket (Newton creeps on the steep ends of the multiplier equations, e.g. for inputs
    far smaller than the radius); the bracket shrinks on every iteration.
    """
    t = start
    width = hi - lo
    for _ in range(_OUTER_ITERS):
        value, slope = fn(t)
        below = value < 0 if increasing else value > 0
        lo = torch.where(below, t, lo)
        hi = torch.where(below, hi, t)
        slow = (hi - lo) > 0.5 * width
        width = hi - lo
        newton = t - value / torch.where(slope == 0, torch.ones_like(slope), slope)
        ok = (newton > lo) & (newton < hi) & (slope != 0) & ~slow
        t_next = torch.where(ok, newton, 0.5 * (lo + hi))
        done = (value.abs() <= 1e-13) | ((hi - lo) <= 1e-15 * hi.abs())
        t = torch.where(done, t, t_next)
        if bool(done.all()):
            break
    return t


def _scaled_norm(a: Tensor, p: float) -> Tensor:
    """‖a‖_p along the last dim (keepdim) for a ≥ 0, as max · ‖a / max‖_p (no overflow)."""
    top = a.amax(-1, keepdim=True)
    safe = torch.where(top > 0, top, torch.ones_like(top))
    return top * ((a / safe) ** p).sum(-1, keepdim=True) ** (1.0 / p)


def _unit(z: Tensor, p: float) -> Tensor:
    """Rows of z ≥ 0 divided by their Lp norm: the solvers stop at a relative residual of
    about 1e-13, this puts the output on the sphere to rounding (a second-order change)."""
    norm = _scaled_norm(z, p)
    return z / torch.where(norm > 0, norm, torch.ones_like(norm))


def _general_prepare(
    x: Tensor, r: float | Tensor, dim: int, p: float
) -> tuple[Tensor, Tensor, float | Tensor]:
    """|x| / r in float64 as rows (N, n), its Lp norms (N, 1), and r moved likewise.

    Forward and backward both call this, so the inside/outside decision is identical.
    """
    work = x.detach().movedim(dim, -1)
    if isinstance(r, Tensor):
        rr: float | Tensor = r.detach().movedim(dim, -1)
        scaled = work.abs().to(torch.float64) / rr.to(torch.float64)
    else:
        rr = r
        scaled = work.abs().to(torch.float64) / r
    scaled = scaled.reshape(-1, work.shape[-1])
    return scaled, _scaled_norm(scaled, p), rr


def _general_p_unit(a: Tensor, norm_p: Tensor, p: float, ball: bool) -> tuple[Tensor, Tensor]:
    """Project rows of a ≥ 0 (shape (N, n), Lp norms norm_p) onto the unit sphere/ball.

    Returns the projected rows and a (N, 1) flag of the rows that moved.
    """
    outside = norm_p > 1.0
    inside = norm_p < 1.0
    z = a.clone()
    if bool(outside.any()):
        rows = outside.squeeze(-1)
        ao = a[rows]
        # The multiplier equation, written as G(ν) = 1 / ‖z(ν)‖_p − 1 = 0: G increases from
        # G(0) < 0 and G(hi) ≥ 0 at hi = ‖a‖_{p*} / p (p* the dual exponent). This form
        # is exactly linear in ν for p = 2 and needs about half the Newton steps of
        # Σ z^p − 1 for other p. Norms are computed as max · ‖·/max‖ to avoid overflow.
        dual = p / (p - 1.0)
        hi = _scaled_norm(ao, dual) / p

        def multiplier_equation(nu: Tensor) -> tuple[Tensor, Tensor]:
            zz = _shrink_coordinates(ao, nu, p)
            top = zz.amax(-1, keepdim=True).clamp_min(1e-300)
            u = zz / top
            up1 = u ** (p - 1.0)
            total = (up1 * u).sum(-1, keepdim=True)  # Σ (z / top)^p ∈ [1, n]
            norm = top * total ** (1.0 / p)
            # d‖z‖/dν = Σ (z/‖z‖)^(p−1) dz/dν
            d_norm = (up1 * _shrink_derivative(zz, nu, p)).sum(-1, keepdim=True) * total ** (
                (1.0 - p) / p
            )
            return 1.0 / norm - 1.0, -d_norm / norm**2

        lo = torch.zeros_like(hi)
        nu = _safeguarded_newton(multiplier_equation, lo, hi, lo.clone(), increasing=True)
        z[rows] = _unit(_shrink_coordinates(ao, nu, p), p)
    if not ball and bool(inside.any()):
        rows = inside.squeeze(-1)
        z[rows] = _unit(_general_p_push_out(a[rows], p), p)
    return z, outside if ball else outside | inside


def _general_p_push_out(a: Tensor, p: float) -> Tensor:
    """Nearest point of the unit Lp sphere for rows of a ≥ 0 strictly inside it.

    The problem is not convex here. For p < 2 every coordinate grows (the Lagrangian
    is minimised coordinatewise, like the L1 rule); for p > 2 the largest coordinate is
    pushed out the most and the others stay on the branch connected to x (like the
    L∞ rule). Zeros are treated as +0.
    """
    n = a.shape[-1]
    if p < 2.0:
        # G(c) = 1 − 1 / ‖z(c)‖_p increases from G(0) < 0 (linear in c for p = 2), and
        # G(hi) ≥ 0 at hi = n^(−(2−p)/p) / p, where every z_i ≥ (cp)^(1/(2−p)) = n^(−1/p).
        hi = torch.full_like(a[..., :1], n ** (-(2.0 - p) / p) / p)

        def phi(c: Tensor) -> tuple[Tensor, Tensor]:
            zz = _grow_coordinates(a, c, p)
            zp1 = zz ** (p - 1.0)
            total = (zp1 * zz).sum(-1, keepdim=True)
            norm = total ** (1.0 / p)
            den = zz ** (2.0 - p) - c * p * (p - 1.0)
            safe = torch.where(den == 0, torch.ones_like(den), den)
            dz = torch.where(den == 0, torch.zeros_like(zz), p * zz / safe)
            d_norm = (zp1 * dz).sum(-1, keepdim=True) * norm ** (1.0 - p)
            return 1.0 - 1.0 / norm, d_norm / norm**2

        lo = torch.zeros_like(hi)
        c = _safeguarded_newton(phi, lo, hi, lo.clone(), increasing=True)
        return _grow_coordinates(a, c, p)
    # p > 2: parametrise by t = z_1 ∈ [a_1, 1] of the largest coordinate (first on ties);
    # c(t) = (t − a_1) / (p t^(p−1)); the others solve z − c p z^(p−1) = a_i on the
    # rising branch. F(t) = Σ z^p − 1 goes from < 0 at t = a_1 to ≥ 0 at t = 1: bisect.
    top, index = a.max(dim=-1, keepdim=True)
    others = a.scatter(-1, index, torch.zeros_like(top))
    lo, hi = top.clone(), torch.ones_like(top)
    rest = others
    for _ in range(200):
        t = 0.5 * (lo + hi)
        c = (t - top) / (p * t ** (p - 1.0))
        rest = _rising_root(others, c, p, start=rest)
        zz = rest.scatter(-1, index, t)
        value = (zz**p).sum(-1, keepdim=True) - 1.0
        lo = torch.where(value < 0, t, lo)
        hi = torch.where(value < 0, hi, t)
        if bool(((hi - lo) <= 4 * torch.finfo(a.dtype).eps * hi).all()):
            break
    t = 0.5 * (lo + hi)
    c = (t - top) / (p * t ** (p - 1.0))
    return _rising_root(others, c, p, start=rest).scatter(-1, index, t)


def _general_forward(x: Tensor, r: float | Tensor, dim: int, p: float, ball: bool) -> Tensor:
    scaled, norm_p, rr = _general_prepare(x, r, dim, p)  # solved in float64, unit radius
    work = x.movedim(dim, -1)
    z, moved = _general_p_unit(scaled, norm_p, p, ball)
    z = z.reshape(work.shape).to(x.dtype)
    y = torch.copysign(z * (rr.to(x.dtype) if isinstance(rr, Tensor) else rr), work)
    # Rows left in place return x itself (not |x| / r · r, which may round differently).
    y = torch.where(moved.reshape((*work.shape[:-1], 1)), y, work)
    return y.movedim(-1, dim).contiguous()


def _general_backward(
    v: Tensor, x: Tensor, y: Tensor, r: float | Tensor, dim: int, p: float, ball: bool
) -> tuple[Tensor, Tensor]:
    # h(u) = Σ|u_i|^p − r^p, ∇h ∝ g = sign(y) (|y|/m)^(p−1) with m = max|y| (scaled so
    # that no power overflows; the formulas below are invariant to the scale of g except
    # where it is put back explicitly). λ from eq. (25): y − x = lam · g.
    magnitude = y.abs()
    top = magnitude.amax(dim, keepdim=True)
    top = torch.where(top > 0, top, torch.ones_like(top))
    unit = magnitude / top
    g = torch.sign(y) * unit ** (p - 1.0)
    lam = _dot(y - x, g, dim) / _dot(g, g, dim)
    # H = I − λ ∇²h = diag(1 − lam (p−1) (|y|/m)^(p−2) / m); d = 1 / H_ii, finite at y_i = 0.
    curvature = lam * (p - 1.0) / top
    if p >= 2.0:
        d = 1.0 / (1.0 - curvature * unit ** (p - 2.0))
    else:
        t = unit ** (2.0 - p)
        den = t - curvature
        d = torch.where(den == 0, torch.ones_like(t), t / torch.where(den == 0, 1.0, den))
    dg = d * g
    # Corollary 4.7 with B = −I: Dy = H⁻¹ − H⁻¹aaᵀH⁻¹ / (aᵀH⁻¹a), symmetric.
    coef = _dot(dg, v, dim) / _dot(g, dg, dim)
    grad_x = d * v - dg * coef
    # dy/dr = H⁻¹∇h (p r^(p−1)) / (∇hᵀH⁻¹∇h) (Prop. 4.5 with C = D_r h = −p r^(p−1)),
    # which with the scaled g is H⁻¹g (r/m)^(p−1) / (gᵀH⁻¹g); r/m ∈ [1, n^(1/p)].
    grad_r = coef * (r / top) ** (p - 1.0)
    if ball:
        # Strictly inside: y = x and Dy = I (same decision as the forward).
        _, norm_p, _ = _general_prepare(x, r, dim, p)
        shape = list(x.movedim(dim, -1).shape)
        shape[-1] = 1
        inside = (norm_p < 1.0).reshape(shape).movedim(-1, dim)
        grad_x = torch.where(inside, v, grad_x)
        grad_r = torch.where(inside, torch.zeros_like(grad_r), grad_r)
    return grad_x, grad_r


def forward(x: Tensor, r: float | Tensor, dim: int, p: float, ball: bool) -> Tensor:
    """The projection of ``x`` onto the Lp sphere (or ball) of radius ``r`` along ``dim``."""
    if p == 2.0:
        return _l2_forward(x, r, dim, ball)
    if p == math.inf:
        return _linf_forward(x, r, dim, ball)
    if p == 1.0:
        return _l1_forward(x, r, dim, ball)
    return _general_forward(x, r, dim, p, ball)


def backward(
    v: Tensor,
    x: Tensor,
    y: Tensor,
    r: float | Tensor,
    dim: int,
    p: float,
    ball: bool,
    masked: bool,
) -> tuple[Tensor, Tensor]:
    """``(vᵀ Dy(x), vᵀ dy/dr)`` of the projection, the latter not yet summed to r's shape."""
    if p == 2.0:
        return _l2_backward(v, x, y, r, dim, ball)
    if p == math.inf:
        return _linf_backward(v, y, r, dim, masked)
    if p == 1.0:
        return _l1_backward(v, x, y, r, dim, ball, masked)
    return _general_backward(v, x, y, r, dim, p, ball)


def simplex_forward(x: Tensor, total: float | Tensor, dim: int) -> Tensor:
    """The projection onto ``{u ≥ 0, Σ u = total}`` along ``dim``: ``max(x − τ, 0)``."""
    return _threshold_project(x, total, dim)


def simplex_backward(v: Tensor, y: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``(vᵀ Dy, vᵀ dy/d total)`` with ``Dy = diag(s) − s sᵀ / |S|``, S = {y > 0}."""
    support = torch.sign(y)
    mean = _dot(support, v, dim) / _dot(support, support, dim).clamp_min(1.0)
    return support * (v - mean), mean
