"""Batched linear solvers for the implicit backward pass.

Every function here works on a batch of independent systems: matrices are
``(B, M, M)``, right-hand sides ``(B, M, K)`` (K columns solved at once) or, for the
matrix-free solvers, vectors ``(B, M)`` with an operator ``matvec: (B, M) -> (B, M)``.
Nothing loops over the batch in Python. Each dense solver returns, besides the
solution, a per-sample boolean saying whether it can be trusted, so that the
caller can re-solve only the samples that failed with a more robust method.

A factorisation is never trusted blindly: besides the ``info`` flags, the caller
checks the residual with :func:`residual_ok` (batched LU is known to return wrong
answers silently in some BLAS builds, while Cholesky and symmetric eigensolvers
are unaffected).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Factor",
    "IterativeInfo",
    "cholesky_factor",
    "cholesky_of_scaled",
    "compute_dtype",
    "conjugate_gradient",
    "default_rcond",
    "equilibrate",
    "finite_samples",
    "lu_factor",
    "minres",
    "residual_ok",
    "singular_tol",
    "solve_cholesky",
    "solve_lu",
    "solve_symmetric_pinv",
    "working_eps",
]


def working_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the dtype the problem's data carry (float32 for half types)."""
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return torch.finfo(dtype).eps


def singular_tol(dtype: torch.dtype) -> float:
    """Relative size, on an equilibrated matrix, below which an eigenvalue (or squared
    pivot) counts as zero for data of ``dtype``: ``1e3 eps``, but at most ``1e-12`` and at
    least ``4 eps``.

    In float64 that is ``2.2e-13``, far above the rounding noise of a singular matrix
    formed by automatic differentiation (``~10 eps``), so condition numbers up to ``4e12``
    are solved and singular matrices are recognised; in float32, ``4.8e-7``, so condition
    numbers up to ``2e6`` are solved — a float32 matrix closer to singular than that cannot
    be told from a singular one.
    """
    eps = working_eps(dtype)
    return max(4.0 * eps, min(1e3 * eps, 1e-12))


def default_rcond(dtype: torch.dtype) -> float:
    """Relative eigenvalue cut-off of the pseudo-inverse (see :func:`singular_tol`)."""
    return singular_tol(dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dense factorisations run in float64 (complex128) whatever the data's precision:
    ill-conditioned float32 systems are then solved as well as their data allow."""
    return torch.complex128 if dtype.is_complex else torch.float64


def _residual_tol(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps ** 0.5


def equilibrate(matrix: Tensor, iterations: int = 6) -> Tensor:
    """Symmetric diagonal scaling ``s`` that makes ``diag(s) M diag(s)`` well scaled.

    Ruiz's iteration: divide each row and column by the square root of its largest
    magnitude until every row of the scaled matrix has largest entry ≈ 1. A matrix whose
    entries span many orders of magnitude only because of the scale of its variables (a
    Hessian ``diag(1, 1e-4, 1)``, a transport plan's ``1/P``) becomes well conditioned, so
    singularity is judged on the scaled matrix, relative to the dtype. Zero rows keep
    ``s = 1``.

    Args:
        matrix: ``(B, n, n)``.
        iterations: number of sweeps (each halves the log-spread of the row maxima).

    Returns:
        ``s`` of shape ``(B, n)``, positive, powers of two (so scaling is exact).
    """
    B, n = matrix.shape[0], matrix.shape[-1]
    s = torch.ones(B, n, dtype=matrix.real.dtype if matrix.is_complex() else matrix.dtype,
                   device=matrix.device)
    if n == 0:
        return s
    mag = matrix.abs()
    for _ in range(iterations):
        rows = (mag * s.unsqueeze(-2)).amax(-1) * s
        rows = torch.where((rows > 0) & torch.isfinite(rows), rows, torch.ones_like(rows))
        # Powers of two: the scaling itself introduces no rounding error.
        step = torch.exp2(torch.round(-0.5 * torch.log2(rows)))
        if not bool((step != 1).any()):
            break  # every row's largest entry is within a factor 2 of 1
        s = s * step
    return s


def finite_samples(x: Tensor) -> Tensor:
    """``(B,)`` True where every entry of sample ``x[b]`` is finite (``x`` ``(B, ...)``).

    ``max |x| < inf`` (NaN compares False): three small kernels, where ``isfinite`` and a
    reduction over a boolean tensor cost several times more on CPU.
    """
    if x.shape[0] == 0 or x[0].numel() == 0:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return x.abs().amax(dim=tuple(range(1, x.dim()))) < math.inf


def _all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite, for ``x`` whose entries are bounded well
    below the overflow threshold when finite (logarithms): their sum is then finite
    exactly when all are; one reduction and one synchronisation."""
    return math.isfinite(float(x.sum()))


def _jacobi_scale(matrix: Tensor) -> Tensor:
    """Scaling for a (hoped) positive definite matrix: ``1/sqrt(diag)`` rounded to powers of
    two, near-optimal for SPD matrices (van der Sluis) and one pass; Ruiz's iteration
    (:func:`equilibrate`) where a diagonal entry is not positive."""
    d = matrix.diagonal(dim1=-2, dim2=-1)
    if d.is_complex():
        d = d.real
    log_d = torch.log2(d)  # NaN or ±inf where an entry is not positive and finite
    if not _all_finite(log_d):  # (finite ones are within ±1100: no overflow in the sum)
        return equilibrate(matrix)
    return torch.exp2(torch.round(-0.5 * log_d))


def diagonal_scale(d: Tensor) -> Tensor:
    """The scaling of :func:`_jacobi_scale` from the diagonal ``d`` alone: ``1/sqrt(d)``
    rounded to powers of two, and 1 where an entry is not positive and finite (an empty
    or unused row, which the caller then handles)."""
    log_d = torch.log2(d)
    return torch.where(torch.isfinite(log_d), torch.exp2(torch.round(-0.5 * log_d)), 1.0)


class Factor:
    """A batch of factorised (scaled) matrices: ``solve`` applies the inverse.

    Attributes:
        ok: ``(B,)`` True where the factorisation succeeded and the scaled matrix is not
            numerically singular.
        scale: ``(B, n)`` the symmetric scaling ``s`` (powers of two).
        scaled: ``diag(s) M diag(s)``, the matrix that was factorised.
    """

    def __init__(self, kind: str, data: tuple[Tensor, ...], scale: Tensor, ok: Tensor,
                 scaled: Tensor | None = None) -> None:
        self.kind = kind
        self.data = data
        self.scale = scale
        self.ok = ok
        self.scaled = scaled

    def solve(self, rhs: Tensor) -> Tensor:
        """``M⁻¹ rhs`` for ``rhs`` ``(B, n, K)`` (garbage, but finite, where not ``ok``)."""
        s = self.scale.unsqueeze(-1).to(rhs.dtype)
        if self.kind == "cholesky" and self.data[0].shape[-1] == 1:
            z = s * rhs / self.data[0].square()
        elif self.kind == "cholesky":
            z = torch.cholesky_solve(s * rhs, self.data[0])
        else:
            z = torch.linalg.lu_solve(self.data[0], self.data[1], s * rhs)
        return s * z


def _identity_where_bad(factor: Tensor, ok: Tensor) -> Tensor:
    if bool(ok.all()):
        return factor
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    return torch.where(ok[:, None, None], factor, eye)


def _pivots_ok(diag: Tensor, info: Tensor, tol: float, power: int) -> Tensor:
    """``(B,)``: factorisation succeeded and ``(min/max |pivot|)^power > tol``."""
    if not diag.shape[-1]:
        return info == 0
    lo, hi = torch.aminmax(diag, dim=-1)
    # A NaN pivot makes the comparison False, an infinite one the ratio 0 or NaN; hi = 0
    # (all pivots zero) gives NaN.
    ratio = lo / hi
    return (info == 0) & ((ratio * ratio if power == 2 else ratio) > tol)


def cholesky_factor(matrix: Tensor, tol: float, scale: Tensor | None = None) -> Factor:
    """Equilibrated Cholesky of symmetric positive definite matrices.

    Args:
        matrix: ``(B, n, n)`` symmetric.
        tol: a sample whose scaled factor has ``(min diag / max diag)² ≤ tol`` is reported
            as numerically singular (not positive definite).
        scale: the equilibration ``s`` ``(B, n)``; computed when None.

    Returns:
        A :class:`Factor`; ``ok`` False where the matrix is not (numerically) positive
        definite after scaling.
    """
    if matrix.shape[-1] == 1 and scale is None:  # one row (a single constraint's Schur
        # complement): its own scale, no scaling and no LAPACK call
        d = matrix[..., 0, 0]
        ok = (d > 0) & (d < math.inf)
        factor = torch.where(ok, d, 1.0).sqrt()[..., None, None]
        return Factor("cholesky", (factor,), torch.ones_like(d).unsqueeze(-1), ok, matrix)
    s = _jacobi_scale(matrix) if scale is None else scale
    return cholesky_of_scaled(s.unsqueeze(-1) * matrix * s.unsqueeze(-2), s, tol)


def cholesky_of_scaled(scaled: Tensor, scale: Tensor, tol: float) -> Factor:
    """:func:`cholesky_factor` of a matrix given already scaled: ``scaled`` is
    ``diag(s) M diag(s)`` ``(B, n, n)`` (lower triangle read) and ``scale`` is ``s``."""
    if scaled.shape[-1] == 1:  # one row (a single constraint): no LAPACK call
        d = scaled[..., 0, 0]
        ok = torch.isfinite(d) & (d > 0)
        factor = torch.where(ok, d, 1.0).sqrt()[..., None, None]
        return Factor("cholesky", (factor,), scale, ok, scaled)
    factor, info = torch.linalg.cholesky_ex(scaled)
    diag = factor.diagonal(dim1=-2, dim2=-1).abs()
    ok = _pivots_ok(diag, info, tol, 2)
    return Factor("cholesky", (_identity_where_bad(factor, ok),), scale, ok, scaled)


def lu_factor(matrix: Tensor, tol: float, scale: Tensor | None = None) -> Factor:
    """Equilibrated LU with partial pivoting (for symmetric indefinite KKT matrices).

    Args:
        matrix: ``(B, n, n)``.
        tol: a sample whose scaled pivots have ``min |U_ii| / max |U_ii| ≤ tol`` is
            reported as numerically singular.
        scale: the symmetric equilibration ``s``; computed when None.
    """
    s = equilibrate(matrix) if scale is None else scale
    scaled = s.unsqueeze(-1) * matrix * s.unsqueeze(-2)
    lu, pivots, info = torch.linalg.lu_factor_ex(scaled)
    ok = _pivots_ok(lu.diagonal(dim1=-2, dim2=-1).abs(), info, tol, 1)
    return Factor("lu", (_identity_where_bad(lu, ok), pivots), s, ok, scaled)


def solve_cholesky(matrix: Tensor, rhs: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """Solve SPD systems ``matrix @ x = rhs`` (equilibrated Cholesky); ``(x, ok)``."""
    f = cholesky_factor(matrix, tol)
    x = f.solve(rhs)
    return x, f.ok & finite_samples(x)


def solve_lu(matrix: Tensor, rhs: Tensor, tol: float,
             scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Solve square systems ``matrix @ x = rhs`` (equilibrated LU); ``(x, ok)``.

    The caller must still check the residual (batched LU has returned wrong answers
    silently in some BLAS builds); ``scale`` is the equilibration, if already known.
    """
    f = lu_factor(matrix, tol, scale)
    x = f.solve(rhs)
    return x, f.ok & finite_samples(x)


def solve_symmetric_pinv(
    matrix: Tensor, rhs: Tensor, rcond: float
) -> tuple[Tensor, Tensor]:
    """Minimum-norm least-squares solution of symmetric systems (eq. 35 with ``Z = 0``).

    The rank is decided on the equilibrated matrix (eigenvalues ``|λ| ≤ rcond max|λ|`` of
    ``diag(s) M diag(s)`` count as zero), so a well-posed but badly scaled matrix is never
    truncated; the solution is the Moore–Penrose one of the matrix as given (its ``r``
    largest eigenvalues in magnitude are inverted, ``r`` the rank).

    Args:
        matrix: ``(B, M, M)`` symmetric (only the lower triangle is read).
        rhs: ``(B, M, K)``.
        rcond: relative cut-off on the scaled matrix (see :func:`default_rcond`).

    Returns:
        ``(x, truncated)``: ``x`` of shape ``(B, M, K)``, and ``truncated`` ``(B,)`` True
        where the matrix was singular (at least one eigenvalue discarded).
    """
    n = matrix.shape[-1]
    if n == 0:
        return rhs.clone(), torch.zeros(matrix.shape[0], dtype=torch.bool, device=matrix.device)
    s = equilibrate(matrix)
    scaled_evals = torch.linalg.eigvalsh(s.unsqueeze(-1) * matrix * s.unsqueeze(-2))
    big = scaled_evals.abs().amax(-1, keepdim=True)
    rank = (scaled_evals.abs() > rcond * big).sum(-1)
    evals, evecs = torch.linalg.eigh(matrix)
    order = evals.abs().argsort(-1, descending=True)
    position = torch.empty_like(order)
    position.scatter_(-1, order, torch.arange(n, device=order.device).expand_as(order))
    keep = (position < rank.unsqueeze(-1)) & (evals != 0)
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), 0.0)
    x = evecs @ (inv.unsqueeze(-1) * (evecs.transpose(-2, -1) @ rhs))
    return x, rank < n


def residual_ok(matrix: Tensor, x: Tensor, rhs: Tensor, tol: float | None = None,
                scale: Tensor | None = None) -> Tensor:
    """Per-sample test ``‖S(A x − b)‖ ≤ tol (‖S A S‖ ‖S⁻¹x‖ + ‖S b‖)`` (Frobenius norms).

    With ``S = diag(scale)`` the test is invariant to the scaling of the variables.

    Args:
        matrix: ``(B, M, M)``; x, rhs: ``(B, M, K)``.
        tol: relative tolerance; defaults to ``sqrt(eps)`` of the dtype.
        scale: ``(B, M)`` an equilibration of ``matrix`` (identity when None).

    Returns:
        ``(B,)`` boolean, False where the residual is too large or not finite.
    """
    tol = _residual_tol(matrix.dtype) if tol is None else tol
    if scale is None:
        scale = torch.ones(matrix.shape[:2], dtype=x.dtype, device=x.device)
    s = scale.unsqueeze(-1).to(x.dtype)
    res = torch.linalg.matrix_norm(s * (matrix @ x - rhs))
    scaled = s * matrix * s.transpose(-2, -1)
    bound = tol * (torch.linalg.matrix_norm(scaled) * torch.linalg.matrix_norm(x / s)
                   + torch.linalg.matrix_norm(s * rhs))
    return torch.isfinite(res) & (res <= bound)


@dataclass
class IterativeInfo:
    """What a batched iterative solve reports.

    Attributes:
        converged: ``(B,)`` True where the relative residual reached ``rtol``.
        iterations: number of iterations run (the batch iterates together).
        residual: ``(B,)`` final relative residual estimate.
        negative_curvature: ``(B,)`` True where CG met ``pᵀAp ≤ 0`` (the operator is not
            positive definite); always False for MINRES.
    """

    converged: Tensor
    iterations: int
    residual: Tensor
    negative_curvature: Tensor


def _bdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1, keepdim=True)


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    rhs: Tensor,
    rtol: float,
    maxiter: int,
    scale: Tensor | None = None,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, IterativeInfo]:
    """Batched (preconditioned) conjugate gradients for symmetric positive definite
    operators.

    Each sample has its own step sizes; samples that have converged stop changing
    while the rest iterate. One ``matvec`` per iteration for the whole batch.

    Args:
        matvec: applies the operator to ``(B, M)`` vectors.
        rhs: ``(B, M)``.
        rtol: stop when ``‖r‖ ≤ rtol ‖b‖`` for every sample.
        maxiter: iteration limit.
        scale: ``(B,)`` norms that ``rtol`` is relative to (default ``‖b‖``); a projected
            solve passes the norm of the unprojected right-hand side.
        preconditioner: applies ``M⁻¹`` (symmetric positive definite, e.g. the inverse
            of the diagonal: Jacobi) to ``(B, M)`` vectors; the residual tested is still
            the unpreconditioned one.

    Returns:
        ``(x, info)`` with ``x`` of shape ``(B, M)``.
    """
    def precond(u: Tensor) -> Tensor:
        return u if preconditioner is None else preconditioner(u)

    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = precond(r)
    p = z.clone()
    rz = _bdot(r, z)
    rr = _bdot(r, r)
    bnorm = rr.sqrt().squeeze(-1) if scale is None else scale
    target = (rtol * bnorm) ** 2
    active = rr.squeeze(-1) > target
    negative = torch.zeros_like(active)
    tiny = torch.finfo(rhs.dtype).tiny
    iterations = 0
    for iterations in range(1, maxiter + 1):
        if not bool(active.any()):
            iterations -= 1
            break
        ap = matvec(p)
        pap = _bdot(p, ap)
        negative = negative | (active & (pap.squeeze(-1) <= 0))
        step_ok = (active & (pap.squeeze(-1) > 0)).unsqueeze(-1)
        alpha = torch.where(step_ok, rz / pap.where(step_ok, torch.ones_like(pap)), 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        z = precond(r)
        rz_new = _bdot(r, z)
        beta = torch.where(step_ok, rz_new / rz.where(rz.abs() > tiny, torch.ones_like(rz)),
                           0.0)
        p = torch.where(step_ok, z + beta * p, p)
        rz = torch.where(step_ok, rz_new, rz)
        rr = torch.where(step_ok, _bdot(r, r), rr)
        active = step_ok.squeeze(-1) & (rr.squeeze(-1) > target)
    residual = rr.squeeze(-1).sqrt() / bnorm.clamp_min(tiny)
    converged = (rr.squeeze(-1) <= target) & ~negative
    return x, IterativeInfo(converged, iterations, residual, negative)


def minres(
    matvec: Callable[[Tensor], Tensor],
    rhs: Tensor,
    rtol: float,
    maxiter: int,
) -> tuple[Tensor, IterativeInfo]:
    """Batched MINRES for symmetric (possibly indefinite) operators.

    The Lanczos process with Givens rotations of Paige and Saunders, run for the whole
    batch at once with per-sample scalars; a sample stops updating once its residual
    estimate drops below ``rtol ‖b‖``. Suitable for the KKT systems of constrained
    nodes, which are symmetric but indefinite.

    Args:
        matvec: applies the operator to ``(B, M)`` vectors.
        rhs: ``(B, M)``.
        rtol: relative residual target.
        maxiter: iteration limit.

    Returns:
        ``(x, info)`` with ``x`` of shape ``(B, M)``.
    """
    dtype = rhs.dtype
    tiny = torch.finfo(dtype).tiny
    eps = torch.finfo(dtype).eps

    def safe(t: Tensor) -> Tensor:
        return torch.where(t.abs() > tiny, t, torch.ones_like(t))

    x = torch.zeros_like(rhs)
    r1 = rhs.clone()
    r2 = rhs.clone()
    yv = rhs.clone()
    beta1 = _bdot(rhs, rhs).sqrt()
    beta = beta1.clone()
    oldb = torch.zeros_like(beta)
    dbar = torch.zeros_like(beta)
    epsln = torch.zeros_like(beta)
    phibar = beta1.clone()
    cs = -torch.ones_like(beta)
    sn = torch.zeros_like(beta)
    w = torch.zeros_like(rhs)
    w2 = torch.zeros_like(rhs)
    target = rtol * beta1
    active = (phibar > target).squeeze(-1) & (beta1.squeeze(-1) > 0)
    iterations = 0
    for iterations in range(1, maxiter + 1):
        if not bool(active.any()):
            iterations -= 1
            break
        v = yv / safe(beta)
        yv = matvec(v)
        if iterations >= 2:
            yv = yv - (beta / safe(oldb)) * r1
        alfa = _bdot(v, yv)
        yv = yv - (alfa / safe(beta)) * r2
        r1 = r2
        r2 = yv
        oldb = beta
        beta = _bdot(r2, r2).sqrt()
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.sqrt(gbar**2 + beta**2).clamp_min(eps)
        cs = gbar / gamma
        sn = beta / gamma
        phi = cs * phibar
        phibar_new = sn * phibar
        w1 = w2
        w2 = w
        w = (v - oldeps * w1 - delta * w2) / gamma
        upd = active.unsqueeze(-1)
        x = torch.where(upd, x + phi * w, x)
        phibar = torch.where(upd, phibar_new, phibar)
        # A Lanczos breakdown (beta = 0) means the Krylov space is exhausted: the
        # current iterate is the exact solution in that space.
        active = active & (phibar > target).squeeze(-1) & (beta.squeeze(-1) > tiny)
    residual = (phibar / beta1.clamp_min(tiny)).squeeze(-1)
    converged = (phibar <= target).squeeze(-1) | (beta1.squeeze(-1) == 0)
    return x, IterativeInfo(converged, iterations, residual, torch.zeros_like(converged))
