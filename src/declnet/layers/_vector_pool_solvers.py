"""Solver and closed-form backward of robust vector pooling (paper §5.1, Prop. 4.4).

``y ∈ R^C`` minimises ``Σ_i φ(‖y − x_i‖; α)`` over sets ``x (M, C, n)`` (n points in
``R^C`` each; :func:`solve_generic` and :func:`hessian` take ``(M, n, C)``). The autograd
Function, the functional form and the Module are in :mod:`declnet.layers.robust_pool`.

The built-in penalties are solved and differentiated in each set's *scaled frame*
(:func:`frame`): the points centred on their bounding box and divided by its half-width,
``α`` divided likewise. Pooling is translation- and scale-equivariant,
``y(s x + t; s α) = s y(x; α) + t``, so this changes no answer, and it keeps every
distance, weight and Hessian entry representable for inputs from the smallest to the
largest floats (see :mod:`declnet.layers._vector_kernels`). The same equivariance gives the
``α``-gradient from the ``x``-gradient: ``∂y/∂α = (1/α) Σ_i (∂y/∂x_i)(y − x_i)``.
A user's penalty is solved with its own ``weight`` and ``radial_excess`` in the data's
coordinates (:func:`solve_generic`).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .._diagnostics import DeclarativeWarning
from ._kernels import kernel
from ._pool_solvers import keep_lower
from ._vector_kernels import KERNELS
from .penalties import Penalty

__all__ = [
    "backward",
    "backward_generic",
    "frame",
    "has_kernels",
    "hessian",
    "singular_hessian",
    "solve",
    "solve_hessian",
]


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
    # Smooth penalties are finished by Newton steps, so sqrt(eps) is enough here.
    rtol = math.sqrt(torch.finfo(x.dtype).eps) if pen.is_smooth else 8 * torch.finfo(x.dtype).eps
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


def hessian(
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


def _jacobi_scaled(hess: Tensor) -> tuple[Tensor, Tensor]:
    """``D H D`` and ``diag(D)`` with ``D = diag(H)^(-1/2)`` (unit diagonal where ``H``'s is
    positive; a non-finite ``H`` is replaced by the identity, so that what follows never
    fails on it)."""
    finite = torch.isfinite(hess).all(dim=(-2, -1), keepdim=True)
    eye = torch.eye(hess.shape[-1], dtype=hess.dtype, device=hess.device)
    h = torch.where(finite, hess, eye)
    d = h.diagonal(dim1=-2, dim2=-1)
    s = torch.where(d > 0, d, torch.ones_like(d)).rsqrt()
    return s.unsqueeze(-1) * h * s.unsqueeze(-2), s


def _singular_tol(hess: Tensor) -> float:
    return 8 * hess.shape[-1] * torch.finfo(hess.dtype).eps


def singular_hessian(hess: Tensor) -> Tensor:
    """``(M,)`` True where ``H`` ``(M, C, C)`` is singular after Jacobi scaling: its
    eigenvalue of smallest magnitude is below ``8 C eps`` times the largest. Branch-free
    (traceable and batchable), not differentiated."""
    with torch.no_grad():
        lam = torch.linalg.eigvalsh(_jacobi_scaled(hess.detach())[0]).abs()
        return lam.amin(-1) <= _singular_tol(hess) * lam.amax(-1)


def solve_hessian(hess: Tensor, rhs: Tensor, what: str) -> Tensor:
    """Solve H u = rhs per sample (rhs (M, C)); least squares where H is singular.

    Cholesky of the Jacobi-scaled ``H`` serves the common case (positive definite, pivots
    well above the dtype's precision); only the other sets get an eigenvalue test
    (:func:`singular_hessian`): singular ones the pseudo-inverse, with a warning, regular
    (indefinite) ones LU. Singularity is judged after scaling, never by an absolute
    threshold, so an exactly flat direction (collinear Huber outliers, a Welsch saddle)
    rounding to a tiny nonzero pivot is still caught."""
    scaled, s = _jacobi_scaled(hess)
    chol, info = torch.linalg.cholesky_ex(scaled)
    pivots = chol.diagonal(dim1=-2, dim2=-1).square().amin(-1)
    sol = s.unsqueeze(-1) * torch.cholesky_solve((s * rhs).unsqueeze(-1), chol)
    finite = torch.isfinite(hess).all(dim=(-2, -1))  # NaN inputs stay NaN, silently
    doubtful = finite & ((info != 0) | ~(pivots > 1e3 * _singular_tol(hess)))
    if bool(doubtful.any()):
        idx = doubtful.nonzero().squeeze(-1)
        singular = singular_hessian(hess[idx])
        lu, lu_info = torch.linalg.solve_ex(hess[idx], rhs[idx].unsqueeze(-1))
        singular |= (lu_info != 0) | ~torch.isfinite(lu).all(dim=(-2, -1))
        sol[idx] = lu
        bad = idx[singular]
        if bad.numel():
            warnings.warn(
                f"robust_vector_pool({what}): the Hessian Σ_i ∇²φ(‖y − x_i‖) is singular for "
                f"{bad.numel()} output(s); using its least-squares (pseudo-inverse) solution.",
                DeclarativeWarning,
                stacklevel=4,
            )
            sol[bad] = torch.linalg.pinv(hess[bad], hermitian=True) @ rhs[bad].unsqueeze(-1)
    return sol.squeeze(-1)


def solve_generic(pen: Penalty, x: Tensor, a: Tensor) -> Tensor:
    """Minimise Σ_i φ(‖y − x_i‖) for each of M sets x (M, n, C), for any penalty with
    ``weight`` and ``radial_excess``, in the data's coordinates; returns y (M, C)."""
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
                hess, d, _, w, _ = hessian(pen, x, y, a)
                grad = (w.unsqueeze(-1) * d).sum(1)
                # Only where H is positive definite (Cholesky succeeds): a descent step.
                chol, info = torch.linalg.cholesky_ex(hess)
                sol = torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)
                ok = (info == 0).unsqueeze(-1) & torch.isfinite(sol)
                y = torch.where(ok, y - sol, y)
        best, best_f = keep_lower(best, best_f, y, _vector_objective(pen, x, y, a).unsqueeze(-1))
    return best  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Built-in penalties: fused kernels in the scaled frame.


def has_kernels(pen: Penalty) -> bool:
    """Whether ``pen`` is a built-in penalty with fused vector kernels (not a subclass)."""
    return type(pen).__name__ in KERNELS and type(pen).__module__ == Penalty.__module__


def _box(x: Tensor) -> tuple[Tensor, Tensor]:
    """The middle of each set's bounding box ``(M, C)`` and its largest half-width
    ``(M, 1)`` (1 where the points coincide), without overflow for any finite input."""
    lo, hi = x.amin(-1), x.amax(-1)
    half = (0.5 * hi - 0.5 * lo).amax(-1, keepdim=True)
    half = torch.where(half > 0, half, torch.ones_like(half))  # coincident points (or NaN)
    return 0.5 * lo + 0.5 * hi, half


def _scaled_alpha(alpha: Tensor, half: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """``α / half`` ``(M, 1)`` and the same clamped to ``[0, a_max]``: beyond
    ``a_max = 2√C / eps`` every weight is the same to the dtype's precision (the answer is
    the mean), and ``a_max²`` is finite."""
    a = (alpha.reshape(-1, 1) if alpha.dim() else alpha) / half
    return a, a.clamp(0.0, 2 * math.sqrt(size) / torch.finfo(half.dtype).eps)


def frame(x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Each set's scaled frame: ``z = (x − centre) / half`` with ``|z| ≤ 1``.

    The centre and width are constants (the Jacobian of the answer does not depend on
    them): they are computed without autograd, ``z`` with it where ``x`` requires grad.

    Args:
        x: ``(M, C, n)`` sets of points.
        alpha: ``α``, 0-d or ``(M,)``.

    Returns:
        ``z (M, C, n)``, ``centre (M, C)`` (the middle of the bounding box), ``half (M, 1)``
        (its largest half-width) and the scaled ``α`` ``(M, 1)``, as it is and clamped
        (:func:`_scaled_alpha`).
    """
    with torch.no_grad():
        centre, half = _box(x)
    z = torch.sub(x, centre.unsqueeze(-1)).div_(half.unsqueeze(-1))
    return (z, centre, half, *_scaled_alpha(alpha, half, x.shape[1]))


def _kernels_for(pen: Penalty, z: Tensor, fused: bool) -> dict[str, object]:
    table = KERNELS[type(pen).__name__]
    if not fused:
        return dict(table)
    return {kind: kernel(fn.__name__, z) for kind, fn in table.items()}


def _tolerance(z: Tensor, a: Tensor, rtol: float) -> Tensor:
    """Steps are small below ``rtol·sqrt(min(a, 1))`` (the frame's unit length is the set's
    half-width; for a small ``a`` the steps must also be small against ``a``)."""
    return (rtol * a.clamp_max(1.0).sqrt()).clamp_min(4 * torch.finfo(z.dtype).eps)


def _small(step: Tensor, tol: Tensor) -> bool:
    return not bool((torch.linalg.vector_norm(step, dim=-1, keepdim=True) > tol).any())


def _reweighted(  # type: ignore[no-untyped-def]
    run, z: Tensor, y: Tensor, a: Tensor, tol: Tensor, steps: int
) -> tuple[Tensor, bool]:
    """At most ``steps`` reweighted means ``y ← y − Σ w_i d_i / Σ w_i``, until every step
    is below ``tol`` (then the flag returned is True). Each step minimises a quadratic
    majoriser: the objective never rises."""
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    for _ in range(steps):
        wsum, wd = run(z, y, a)
        step = torch.where(wsum > 0, wd / wsum, zero)
        y = y - step
        if _small(step, tol):
            return y, True
    return y, False


_MAX_REWEIGHT = 1000  # non-smooth penalties: reweighted means only
_SMOOTH_REWEIGHT = 20  # smooth penalties: then safeguarded Newton steps
_MAX_NEWTON = 1000


def _newton(  # type: ignore[no-untyped-def]
    run, z: Tensor, y: Tensor, a: Tensor, tol: Tensor, guarded: bool
) -> Tensor:
    """Newton iteration for the smooth penalties, from the reweighted means.

    Unguarded (the reweighted means have converged to ``tol``, so ``y`` is close to a
    minimum): two steps ``H⁻¹ g`` where ``H`` is positive definite, which make ``y``
    accurate to the dtype's precision. Guarded (they have not: a reweighted mean converges
    linearly, and slowly where a Welsch minimum is flat): each step is ``H⁻¹ g`` where ``H``
    is positive definite and the objective does not rise (beyond its rounding), else the
    reweighted-mean step ``g / Σw`` (which never raises it). A set stops one step after its
    step is below ``tol``; the others go on alone (the sets still moving are gathered).
    """
    eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    if not guarded:
        for _ in range(2):
            wsum, grad, outer, _ = run["curvature"](z, y, a)
            chol, info = torch.linalg.cholesky_ex(wsum.unsqueeze(-1) * eye + outer)
            newton = torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)
            ok = (info == 0).unsqueeze(-1) & torch.isfinite(newton).all(-1, keepdim=True)
            y = torch.where(ok, y - newton, y)
        return y
    slack = 8 * torch.finfo(z.dtype).eps
    y = y.clone()
    rows = torch.arange(z.shape[0], device=z.device)  # the sets still moving
    zs, ys, as_, ts = z, y, a, tol
    last = torch.zeros(z.shape[0], 1, dtype=torch.bool, device=z.device)
    f = run["objective"](zs, ys, as_)
    for _ in range(_MAX_NEWTON):
        wsum, grad, outer, _ = run["curvature"](zs, ys, as_)
        chol, info = torch.linalg.cholesky_ex(wsum.unsqueeze(-1) * eye + outer)
        newton = torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)
        reweight = torch.where(wsum > 0, grad / wsum, zero)
        ok = (info == 0).unsqueeze(-1) & torch.isfinite(newton).all(-1, keepdim=True)
        step = torch.where(ok, newton, reweight)
        f_new = run["objective"](zs, ys - step, as_)
        worse = f_new > f * (1 + slack)
        if bool(worse.any()):
            step = torch.where(worse, reweight, step)
            f_new = torch.where(worse, run["objective"](zs, ys - step, as_), f_new)
        ys, f = ys - step, f_new
        done = last
        last = torch.linalg.vector_norm(step, dim=-1, keepdim=True) <= ts
        if bool(done.any()):  # write back the finished sets, go on with the others
            y[rows] = ys
            keep = ~done.squeeze(-1)
            rows, zs, ys, f, last, ts = (t[keep] for t in (rows, zs, ys, f, last, ts))
            as_ = as_[keep] if as_.dim() else as_
            if rows.numel() == 0:
                return y
    y[rows] = ys
    warnings.warn(
        f"robust_vector_pool: the Newton iteration did not converge for {rows.numel()} "
        f"set(s) in {_MAX_NEWTON} steps; their outputs are the lowest-objective points "
        "reached (the objective never rose).",
        DeclarativeWarning,
        stacklevel=6,
    )
    return y


def solve(pen: Penalty, x: Tensor, alpha: Tensor) -> Tensor:
    """Minimise Σ_i φ(‖y − x_i‖; α) for each of M sets ``x (M, C, n)``; returns ``y (M, C)``.

    Built-in penalties: reweighted means from the mean (and, when ``φ`` is not convex, from
    the coordinatewise median and the data point nearest to it), for the smooth ones a few
    of them followed by safeguarded Newton steps (:func:`_newton`), the start with the
    lowest objective kept; all in the scaled frame, with fused kernels. Other penalties:
    :func:`solve_generic`.
    """
    if not has_kernels(pen):
        return solve_generic(pen, x.transpose(1, 2).contiguous(), alpha)
    z, _, half, _, a = frame(x, alpha)
    run = _kernels_for(pen, z, fused=True)
    starts = [z.mean(-1)]
    if not pen.is_convex:
        median = z.median(-1).values
        nearest = (z - median.unsqueeze(-1)).square().sum(1).argmin(-1)
        starts += [median, z[torch.arange(z.shape[0], device=z.device), :, nearest]]
    eps = torch.finfo(z.dtype).eps
    best, best_f = None, None
    for y in starts:
        if pen.is_smooth:
            tol = _tolerance(z, a, math.sqrt(eps))
            y, done = _reweighted(run["reweight"], z, y, a, tol, _SMOOTH_REWEIGHT)
            y = _newton(run, z, y, a, tol, guarded=not done)
        else:
            tol = _tolerance(z, a, 8 * eps)
            y = _reweighted(run["reweight"], z, y, a, tol, _MAX_REWEIGHT)[0]
        if len(starts) == 1:
            best = y
            break
        best, best_f = keep_lower(best, best_f, y, run["objective"](z, y, a))  # type: ignore[operator]
    # Back to the data's coordinates from the data point nearest to the answer:
    # x_k + half·(y − z_k) is x_k exactly where the answer is that point (Welsch and the
    # truncated quadratic with α below the rounding of centre + half·z, which would move it
    # by more than α), and no less accurate than centre + half·y elsewhere.
    nearest = (z - best.unsqueeze(-1)).square().sum(1).argmin(-1)  # type: ignore[union-attr]
    rows = torch.arange(z.shape[0], device=z.device)
    return x[rows, :, nearest] + half * (best - z[rows, :, nearest])


def backward(
    pen: Penalty,
    x: Tensor,
    y: Tensor,
    alpha: Tensor,
    v: Tensor,
    solve_h,  # type: ignore[no-untyped-def]
    need_alpha: bool,
    differentiable: bool,
) -> tuple[Tensor, Tensor | None]:
    """``vᵀ ∂y/∂x_i`` ``(M, C, n)`` and ``vᵀ ∂y/∂α`` per set ``(M,)`` (or None) for a
    built-in penalty (Prop. 4.4), in the scaled frame.

    ``solve_h(H, v)`` solves the ``(M, C, C)`` systems. With ``differentiable`` the eager
    kernels are used as they are (differentiable, traceable, batchable; the frame's centre
    and width are constants, on which the Jacobian does not depend); otherwise the fused
    ones. ``y`` must be the pooling output.
    """
    z, centre, half, a_true, a = frame(x, alpha)
    yt = (y - centre) / half
    run = _kernels_for(pen, z, fused=not differentiable)
    wsum, _, outer, hd = run["curvature"](z, yt, a)  # type: ignore[operator]
    eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    u = solve_h(wsum.unsqueeze(-1) * eye + outer, v)  # H⁻¹ v, (M, C)
    grad = run["gradient"](z, yt, a, u)  # type: ignore[operator]
    grad_alpha = None
    if need_alpha:
        # vᵀ∂y/∂α = (1/α) Σ_i vᵀ H⁻¹ H_i d_i = (1/α) uᵀ Σ_i h_i d_i (scale equivariance).
        scale = a_true.clamp_min(torch.finfo(z.dtype).tiny).squeeze(-1)
        grad_alpha = (u * hd).sum(-1) / scale
    return grad, grad_alpha


def backward_generic(
    pen: Penalty,
    x: Tensor,
    y: Tensor,
    alpha: Tensor,
    v: Tensor,
    solve_h,  # type: ignore[no-untyped-def]
    need_alpha: bool,
    differentiable: bool,
) -> tuple[Tensor, Tensor | None]:
    """:func:`backward` for a user's penalty, with its own ``weight``, ``radial_excess`` and
    ``dphi_dalpha`` in the data's coordinates (``x (M, C, n)``; the formulas are plain
    differentiable operations, so ``differentiable`` changes nothing here)."""
    xt = x.transpose(1, 2).contiguous()  # (M, n, C)
    hess, d, r, w, c = hessian(pen, xt, y, alpha)
    u = solve_h(hess, v)  # H⁻¹ v, (M, C)
    # dJ/dx_i = H_i H⁻¹ v with H_i = w_i I + c_i d_i d_iᵀ (Prop. 4.4, left to right).
    du = (d @ u.unsqueeze(-1)).squeeze(-1)  # (M, n)
    grad = w.unsqueeze(-1) * u.unsqueeze(1) + (c * du).unsqueeze(-1) * d
    per_set = None
    if need_alpha:
        ar = alpha.reshape(-1, 1) if alpha.dim() else alpha
        factor = torch.where(r > 0, pen.dphi_dalpha(r, ar) / r, torch.zeros_like(r))
        mixed = (factor.unsqueeze(-1) * d).sum(1)  # D_α ∇_y f, (M, C)
        per_set = -(u * mixed).sum(-1)
    return grad.transpose(1, 2), per_set
