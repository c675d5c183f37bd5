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
from typing import Any, Union

import torch
from torch import Tensor, nn

__all__ = [
    "LpProjection",
    "project_onto_ball",
    "project_onto_simplex",
    "project_onto_sphere",
]

RadiusLike = Union[float, int, Tensor]

_KINDS = ("sphere", "ball")

# General-p solver settings: iteration caps of the outer (multiplier) and inner
# (per-coordinate) Newton loops; both are far from binding on well-scaled inputs.
_OUTER_ITERS = 100
_INNER_ITERS = 60


# --------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------


def _check_p(p: Any) -> float:
    """Return p as a float after checking that it names an Lp norm."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(
            f"p must be a real number (1, 2, math.inf or any p > 1); got {p!r} "
            f"of type {type(p).__name__}."
        )
    p = float(p)
    if math.isnan(p) or p < 1.0:
        raise ValueError(
            f"p must be >= 1 so that ‖·‖_p is a norm and the ball is convex; got p={p}. "
            "Allowed: 1, 2, math.inf, or any real p in (1, inf)."
        )
    return p


def _check_x(x: Any, dim: Any) -> int:
    """Check the input tensor and return ``dim`` as a non-negative index."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"x must have a floating-point dtype; got {x.dtype}. Convert it with x.float()."
        )
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int; got {dim!r} of type {type(dim).__name__}.")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension to project along; got a 0-d tensor.")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"dim={dim} is out of range for x of shape {tuple(x.shape)}; "
            f"allowed: {-x.dim()} <= dim <= {x.dim() - 1}."
        )
    dim = dim % x.dim()
    if x.shape[dim] == 0:
        raise ValueError(
            f"x has size 0 along dim={dim} (shape {tuple(x.shape)}); nothing to project."
        )
    return dim


def _check_kind(kind: Any) -> str:
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'sphere' or 'ball'; got {kind!r}.")
    return kind


def _prepare_radius(radius: Any, x: Tensor, dim: int, name: str = "radius") -> float | Tensor:
    """Return the radius as a float or as a tensor broadcastable to ``x`` with size 1 at ``dim``."""
    if isinstance(radius, bool):
        raise TypeError(f"{name} must be a positive float or tensor; got {radius!r}.")
    if isinstance(radius, (int, float)):
        radius = float(radius)
        if not (radius > 0.0 and math.isfinite(radius)):  # also rejects NaN
            raise ValueError(f"{name} must be > 0 and finite; got {name}={radius}.")
        return radius
    if not isinstance(radius, Tensor):
        raise TypeError(f"{name} must be a positive float or tensor; got {type(radius).__name__}.")
    if not radius.is_floating_point():
        radius = radius.to(x.dtype)
    if radius.device != x.device:
        raise ValueError(f"{name} is on {radius.device} but x is on {x.device}; move one of them.")
    radius = radius.to(x.dtype)
    batch_shape = x.shape[:dim] + x.shape[dim + 1 :]
    if radius.dim() == x.dim():
        if radius.shape[dim] != 1:
            raise ValueError(
                f"{name} of shape {tuple(radius.shape)} has as many dimensions as x "
                f"{tuple(x.shape)}, so it must have size 1 along dim={dim}."
            )
        keepdim = radius
    else:
        try:
            ok = torch.broadcast_shapes(radius.shape, batch_shape) == batch_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} of shape {tuple(radius.shape)} does not broadcast to the batch shape "
                f"{tuple(batch_shape)} (x.shape {tuple(x.shape)} without dim={dim}). "
                "Use a float, a tensor of the batch shape, or one with size 1 at dim."
            )
        lead = (1,) * (len(batch_shape) - radius.dim())
        keepdim = radius.reshape(lead + tuple(radius.shape)).unsqueeze(dim)
    try:
        ok = torch.broadcast_shapes(keepdim.shape, x.shape) == x.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} of shape {tuple(radius.shape)} does not broadcast to x of shape "
            f"{tuple(x.shape)} with size 1 along dim={dim}."
        )
    bad = ~((keepdim > 0) & torch.isfinite(keepdim))  # also catches NaN
    if bool(bad.any()):
        raise ValueError(
            f"every entry of {name} must be > 0 and finite; got "
            f"{name} = {keepdim.detach().flatten()[bad.flatten()][0].item()}."
        )
    return keepdim


def _reduce_to(grad: Tensor, like: float | Tensor) -> Tensor | None:
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


def _l2_forward(x: Tensor, r: float | Tensor, dim: int, ball: bool) -> Tensor:
    norm = torch.linalg.vector_norm(x, 2, dim=dim, keepdim=True)
    if ball:
        # r / max(‖x‖, r): 1 inside (and on) the ball, r / ‖x‖ outside.
        return x * (r / torch.clamp(norm, min=r))
    zero_rows = norm == 0
    # x / (‖x‖ / r) rather than x · (r / ‖x‖): stays finite for subnormal ‖x‖.
    if x.device.type == "cpu" and not bool(zero_rows.any()):
        return x / (norm / r)  # the common case, without the x = 0 fix-up below
    zero = zero_rows.to(x.dtype)
    scale = r / (norm + zero)
    y = x / ((norm + zero) / r)
    # x = 0: every point of the sphere is a solution; return r e_1 (the first
    # coordinate along dim). This touches one column only.
    y.narrow(dim, 0, 1).add_(zero * scale)
    return y


def _l2_backward(
    v: Tensor, x: Tensor, y: Tensor, r: float | Tensor, dim: int, ball: bool
) -> tuple[Tensor, Tensor]:
    # Table 2: Dy = (r / ‖x‖)(I − ŷŷᵀ) with ŷ = y / r, applied as a VJP without forming it.
    # At x = 0 (sphere) the factor r / ‖x‖ is replaced by 1: the tangent projector at y.
    norm = torch.linalg.vector_norm(x, 2, dim=dim, keepdim=True)
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


def _linf_forward(x: Tensor, r: float | Tensor, dim: int, ball: bool) -> Tensor:
    y = torch.clamp(x, -r, r)
    if ball:
        return y
    # Sphere from inside: push the largest magnitude (the first one on ties) out to ±r,
    # with sign(0) = +1. On CPU the rows are checked first so that the common case
    # (every row on or outside the sphere) costs one extra reduction only.
    # max |x| as max(max x, −min x): two read-only passes, cheaper than writing |x|.
    peak = torch.maximum(x.amax(dim=dim, keepdim=True), x.amin(dim=dim, keepdim=True).neg())
    inside = peak < r
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


def _sorted_threshold(values: Tensor, total: float | Tensor, dim: int) -> Tensor:
    """τ with Σ_i max(values_i − τ, 0) = total, for values ≥ 0 (or any values, simplex).

    When Σ values ≤ total (and values ≥ 0) this returns (Σ values − total) / n ≤ 0,
    the uniform shift that reaches the total; callers clamp it where needed.
    """
    mu, _ = torch.sort(values, dim=dim, descending=True)
    excess = mu.cumsum(dim) - total
    n = values.shape[dim]
    shape = [1] * values.dim()
    shape[dim] = n
    j = torch.arange(1, n + 1, dtype=values.dtype, device=values.device).reshape(shape)
    # The condition holds on a prefix of the sorted order (Duchi et al.), so counting it
    # gives the number of coordinates that stay positive.
    rho = (mu * j > excess).sum(dim, keepdim=True).clamp_min(1)
    return excess.gather(dim, rho - 1) / rho.to(values.dtype)


def _l1_forward(x: Tensor, r: float | Tensor, dim: int, ball: bool) -> Tensor:
    magnitude = x.abs()
    tau = _sorted_threshold(magnitude, r, dim)
    # tau < 0 means ‖x‖₁ < r. Sphere: add |tau| to every magnitude (the projection onto
    # the nearest facet), with the sign of +0 taken as +1. Ball: keep x strictly inside,
    # decided by the same expression as in the backward so that both agree exactly.
    if ball:
        inside = (magnitude.sum(dim, keepdim=True) < r).to(x.dtype)
        tau = tau.clamp_min(0.0) * (1.0 - inside)
    return torch.copysign(torch.relu(magnitude - tau), x)


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
        upper = torch.minimum(a / alpha, (a / beta) ** inv_k).masked_fill(zero, 0.0)
        lower = torch.minimum(0.5 * a / alpha, (0.5 * a / beta) ** inv_k).masked_fill(zero, 0.0)
        for _ in range(max(1, math.ceil(math.log2(k))) + 1):
            mid = torch.sqrt(lower * upper)
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
    are replaced by bisection; the bracket shrinks on every iteration.
    """
    t = start
    for _ in range(_OUTER_ITERS):
        value, slope = fn(t)
        below = value < 0 if increasing else value > 0
        lo = torch.where(below, t, lo)
        hi = torch.where(below, hi, t)
        newton = t - value / torch.where(slope == 0, torch.ones_like(slope), slope)
        ok = (newton > lo) & (newton < hi) & (slope != 0)
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
        z[rows] = _shrink_coordinates(ao, nu, p)
    if not ball and bool(inside.any()):
        rows = inside.squeeze(-1)
        z[rows] = _general_p_push_out(a[rows], p)
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


# --------------------------------------------------------------------------------------
# The autograd Function
# --------------------------------------------------------------------------------------


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
        if p == 2.0:
            return _l2_forward(x, radius, dim, ball)
        if p == math.inf:
            return _linf_forward(x, radius, dim, ball)
        if p == 1.0:
            return _l1_forward(x, radius, dim, ball)
        return _general_forward(x, radius, dim, p, ball)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, radius, p, ball, dim, masked = inputs
        ctx.p, ctx.ball, ctx.dim, ctx.masked = p, ball, dim, masked
        ctx.radius_is_tensor = isinstance(radius, Tensor)
        ctx.radius_float = None if ctx.radius_is_tensor else radius
        ctx.save_for_backward(x, output, *([radius] if ctx.radius_is_tensor else []))

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:
        p, ball, dim, masked = ctx.p, ctx.ball, ctx.dim, ctx.masked
        x, y, *rest = ctx.saved_tensors
        r = rest[0] if ctx.radius_is_tensor else ctx.radius_float
        if p == 2.0:
            grad_x, grad_r = _l2_backward(v, x, y, r, dim, ball)
        elif p == math.inf:
            grad_x, grad_r = _linf_backward(v, y, r, dim, masked)
        elif p == 1.0:
            grad_x, grad_r = _l1_backward(v, x, y, r, dim, ball, masked)
        else:
            grad_x, grad_r = _general_backward(v, x, y, r, dim, p, ball)
        grad_radius = _reduce_to(grad_r, r) if ctx.needs_input_grad[1] else None
        return (grad_x if ctx.needs_input_grad[0] else None), grad_radius, None, None, None, None


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


def _project(x: Tensor, p: Any, radius: Any, dim: Any, kind: str, masked: bool) -> Tensor:
    p = _check_p(p)
    dim = _check_x(x, dim)
    r = _prepare_radius(radius, x, dim)
    ball = kind == "ball"
    needs_grad = x.requires_grad or (isinstance(r, Tensor) and r.requires_grad)
    if not (needs_grad and torch.is_grad_enabled()):
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


class _SimplexFunction(torch.autograd.Function):
    """y = argmin_u ½‖u − x‖² s.t. u ≥ 0, Σ u = total."""

    @staticmethod
    def forward(x: Tensor, total: float | Tensor, dim: int) -> Tensor:
        tau = _sorted_threshold(x, total, dim)
        return torch.relu(x - tau)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, total, dim = inputs
        ctx.dim = dim
        ctx.total_is_tensor = isinstance(total, Tensor)
        ctx.save_for_backward(output, *([total] if ctx.total_is_tensor else []))

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:
        y, *rest = ctx.saved_tensors
        dim = ctx.dim
        # Dy = diag(s) − s sᵀ / |S| with s the indicator of the support S = {y > 0}.
        support = torch.sign(y)
        mean = _dot(support, v, dim) / _dot(support, support, dim).clamp_min(1.0)
        grad_x = support * (v - mean)
        grad_total = mean.sum_to_size(rest[0].shape) if ctx.total_is_tensor else None
        return (grad_x if ctx.needs_input_grad[0] else None), grad_total, None


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
    dim = _check_x(x, dim)
    total = _prepare_radius(total, x, dim, name="total")
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
        self.p = _check_p(p)
        self.kind = _check_kind(kind)
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
