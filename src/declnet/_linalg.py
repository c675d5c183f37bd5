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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "IterativeInfo",
    "conjugate_gradient",
    "default_rcond",
    "minres",
    "residual_ok",
    "solve_cholesky",
    "solve_lu",
    "solve_symmetric_pinv",
]


def default_rcond(dtype: torch.dtype) -> float:
    """Relative eigenvalue cut-off below which a symmetric matrix counts as singular."""
    return 1e3 * torch.finfo(dtype).eps


def _residual_tol(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps ** 0.5


def solve_cholesky(
    matrix: Tensor, rhs: Tensor, rcond: float | None = None
) -> tuple[Tensor, Tensor]:
    """Solve ``matrix @ x = rhs`` for symmetric positive definite matrices.

    Args:
        matrix: ``(B, M, M)`` symmetric matrices.
        rhs: ``(B, M, K)`` right-hand sides.
        rcond: a sample whose Cholesky factor has ``(min diag / max diag)**2 < rcond``
            is reported as not positive definite (numerically singular).

    Returns:
        ``(x, ok)``: ``x`` of shape ``(B, M, K)`` and ``ok`` of shape ``(B,)``, True where
        the factorisation succeeded, is well conditioned and the solution is finite.
    """
    rcond = default_rcond(matrix.dtype) if rcond is None else rcond
    factor, info = torch.linalg.cholesky_ex(matrix)
    diag = factor.diagonal(dim1=-2, dim2=-1).abs()
    ratio = (diag.amin(-1) / diag.amax(-1).clamp_min(torch.finfo(matrix.dtype).tiny)) ** 2
    ok = (info == 0) & (ratio > rcond)
    # Samples whose factorisation failed get an identity factor so that the batched
    # triangular solves below stay finite; their results are flagged and discarded.
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    factor = torch.where(ok[:, None, None], factor, eye)
    x = torch.cholesky_solve(rhs, factor)
    ok = ok & torch.isfinite(x).flatten(1).all(-1)
    return x, ok


def solve_lu(
    matrix: Tensor, rhs: Tensor, rcond: float | None = None
) -> tuple[Tensor, Tensor]:
    """Solve general square systems ``matrix @ x = rhs`` by LU with partial pivoting.

    Args:
        matrix: ``(B, M, M)``.
        rhs: ``(B, M, K)``.
        rcond: a sample whose pivots have ``min |U_ii| / max |U_ii| < rcond`` is reported as
            numerically singular.

    Returns:
        ``(x, ok)`` with ``ok`` False where the matrix is (numerically) singular or ``x`` is
        not finite. The caller must still check the residual.
    """
    rcond = default_rcond(matrix.dtype) if rcond is None else rcond
    lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
    diag = lu.diagonal(dim1=-2, dim2=-1).abs()
    ratio = diag.amin(-1) / diag.amax(-1).clamp_min(torch.finfo(matrix.dtype).tiny)
    ok = (info == 0) & (ratio > rcond)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    lu = torch.where(ok[:, None, None], lu, eye)
    x = torch.linalg.lu_solve(lu, pivots, rhs)
    ok = ok & torch.isfinite(x).flatten(1).all(-1)
    return x, ok


def solve_symmetric_pinv(
    matrix: Tensor, rhs: Tensor, rcond: float | None = None
) -> tuple[Tensor, Tensor]:
    """Minimum-norm least-squares solution of symmetric systems via an eigendecomposition.

    Computes ``x = pinv(matrix) @ rhs`` (eq. 35 of the paper with ``Z = 0``), discarding
    eigenvalues with ``|λ| <= rcond * max|λ|``. This is the fallback for singular
    Hessians (§4.7.4) and non-regular points (§4.7.3), where the KKT matrix is
    singular, and it is robust where a batched LU is not.

    Args:
        matrix: ``(B, M, M)`` symmetric (only the lower triangle is read).
        rhs: ``(B, M, K)``.
        rcond: relative cut-off; defaults to :func:`default_rcond`.

    Returns:
        ``(x, truncated)``: ``x`` of shape ``(B, M, K)``, and ``truncated`` ``(B,)`` True
        where at least one eigenvalue was discarded (the system was singular).
    """
    rcond = default_rcond(matrix.dtype) if rcond is None else rcond
    evals, evecs = torch.linalg.eigh(matrix)
    scale = evals.abs().amax(-1, keepdim=True)
    keep = evals.abs() > rcond * scale
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), 0.0)
    x = evecs @ (inv.unsqueeze(-1) * (evecs.transpose(-2, -1) @ rhs))
    truncated = (~keep).any(-1)
    return x, truncated


def residual_ok(matrix: Tensor, x: Tensor, rhs: Tensor, tol: float | None = None) -> Tensor:
    """Per-sample test ``‖A x − b‖ ≤ tol (‖A‖ ‖x‖ + ‖b‖)`` (Frobenius norms).

    Args:
        matrix: ``(B, M, M)``; x, rhs: ``(B, M, K)``.
        tol: relative tolerance; defaults to ``sqrt(eps)`` of the dtype.

    Returns:
        ``(B,)`` boolean, False where the residual is too large or not finite.
    """
    tol = _residual_tol(matrix.dtype) if tol is None else tol
    res = torch.linalg.matrix_norm(matrix @ x - rhs)
    bound = tol * (torch.linalg.matrix_norm(matrix) * torch.linalg.matrix_norm(x)
                   + torch.linalg.matrix_norm(rhs))
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
) -> tuple[Tensor, IterativeInfo]:
    """Batched conjugate gradients for symmetric positive definite operators.

    Each sample has its own step sizes; samples that have converged stop changing
    while the rest iterate. One ``matvec`` per iteration for the whole batch.

    Args:
        matvec: applies the operator to ``(B, M)`` vectors.
        rhs: ``(B, M)``.
        rtol: stop when ``‖r‖ ≤ rtol ‖b‖`` for every sample.
        maxiter: iteration limit.
        scale: ``(B,)`` norms that ``rtol`` is relative to (default ``‖b‖``); a projected
            solve passes the norm of the unprojected right-hand side.

    Returns:
        ``(x, info)`` with ``x`` of shape ``(B, M)``.
    """
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
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
        alpha = torch.where(step_ok, rr / pap.where(step_ok, torch.ones_like(pap)), 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = _bdot(r, r)
        beta = torch.where(step_ok, rr_new / rr.clamp_min(tiny), 0.0)
        p = torch.where(step_ok, r + beta * p, p)
        rr = torch.where(step_ok, rr_new, rr)
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
