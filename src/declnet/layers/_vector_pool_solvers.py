"""Solver and closed-form backward of robust vector pooling (paper §5.1, Prop. 4.4).

``y ∈ R^C`` minimises ``Σ_i φ(‖y − x_i‖; α)`` over sets ``x (M, n, C)``. The autograd
Function, the functional form and the Module are in :mod:`declnet.layers.robust_pool`.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .._diagnostics import DeclarativeWarning
from .penalties import Penalty

__all__ = ["hessian", "solve", "solve_hessian"]


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


def solve_hessian(hess: Tensor, rhs: Tensor, what: str) -> Tensor:
    """Solve H u = rhs per sample (rhs (M, C)); least squares where H is singular."""
    sol, info = torch.linalg.solve_ex(hess, rhs.unsqueeze(-1))
    bad = (info != 0) | ~torch.isfinite(sol).all(dim=(-2, -1))
    bad &= torch.isfinite(hess).all(dim=(-2, -1))  # NaN inputs stay NaN, silently
    if bool(bad.any()):
        warnings.warn(
            f"robust_vector_pool({what}): the Hessian Σ_i ∇²φ(‖y − x_i‖) is singular for "
            f"{int(bad.sum())} output(s); using its least-squares (pseudo-inverse) solution.",
            DeclarativeWarning,
            stacklevel=4,
        )
        idx = bad.nonzero().squeeze(-1)
        sol[idx] = torch.linalg.pinv(hess[idx], hermitian=True) @ rhs[idx].unsqueeze(-1)
    return sol.squeeze(-1)


def solve(pen: Penalty, x: Tensor, a: Tensor) -> Tensor:
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
                hess, d, _, w, _ = hessian(pen, x, y, a)
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
