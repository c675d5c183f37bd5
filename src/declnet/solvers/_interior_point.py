"""Constrained minimisation: Newton on the KKT system (SQP) and a primal-dual interior point.

Both solve, for each sample, ``min_y f(x, y)`` s.t. ``h(x, y) = 0`` (``p``) and
``g(x, y) ≤ 0`` (``q``), with the slack form ``g + s = 0``, ``s ≥ 0``, and the standard
multipliers ``ν`` (equalities) and ``z ≥ 0`` (inequalities) of
``L = f + νᵀh + zᵀg``. Returned multipliers are in the paper's convention
``D_Y f = λᵀ D_Y h̃`` (``L = f − λᵀ h̃``): ``λ = (−ν, −z)``, so active inequality multipliers
are ``≤ 0`` and inactive ones exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._diagnostics import node_name
from .._solution import Solution
from ._common import (
    Evaluator,
    Solver,
    backtrack,
    batched_jacobian,
    hessian_of,
    iteration_state,
    solution,
)

__all__ = ["SQP", "InteriorPoint"]


def _derivatives(ev: Evaluator, y: Tensor, nu: Tensor, z: Tensor, p: int, q: int,
                 second: bool = True) -> tuple[Tensor, ...]:
    """At ``y (B, m)``: ``∇_y L (B, m)``, ``h (B, p)``, ``g (B, q)``, ``J_h (B, p, m)``,
    ``J_g (B, q, m)`` and (``second``) ``∇²_yy L (B, m, m)``."""
    with torch.enable_grad():
        yy = y.detach().requires_grad_(True)
        f = ev.objective(yy)
        h = ev.equalities(yy) if p else yy.new_zeros(yy.shape[0], 0)
        g = ev.inequalities(yy) if q else yy.new_zeros(yy.shape[0], 0)
        if h.shape[1] != p or g.shape[1] != q:
            raise ValueError(
                f"{node_name(ev.node)}: the number of constraints changed during the solve "
                f"(p={p}, q={q} at the start, then p={h.shape[1]}, q={g.shape[1]})."
            )
        Jh = batched_jacobian(h, yy) if p and second else yy.new_zeros(yy.shape[0], p, y.shape[1])
        Jg = batched_jacobian(g, yy) if q and second else yy.new_zeros(yy.shape[0], q, y.shape[1])
        L = f + (nu * h).sum(-1) + (z * g).sum(-1)
        (gL,) = torch.autograd.grad(L.sum(), yy, create_graph=second, allow_unused=True)
        if gL is None:
            gL = torch.zeros_like(yy)
        H = hessian_of(gL, yy).detach() if second else None
    return gL.detach(), h.detach(), g.detach(), Jh.detach(), Jg.detach(), H


def _convexify(M: Tensor, Jh: Tensor) -> Tensor:
    """Add ``δI`` to ``M`` where ``M + JₕᵀJₕ`` is not positive definite (``M`` not positive
    definite on the null space of ``Jₕ``, a non-convex iterate), doubling ``δ`` until it is."""
    m = M.shape[-1]
    eye = torch.eye(m, dtype=M.dtype, device=M.device)
    JtJ = Jh.transpose(1, 2) @ Jh
    _, info = torch.linalg.cholesky_ex(M + JtJ)
    bad = info > 0
    if not bool(bad.any()):
        return M
    delta = 1e-4 * (1.0 + M.abs().amax((1, 2)))
    for _ in range(40):
        if not bool(bad.any()):
            break
        M = torch.where(bad[:, None, None], M + delta[:, None, None] * eye, M)
        _, info = torch.linalg.cholesky_ex(M + JtJ)
        bad = info > 0
        delta = delta * 4
    return M


def _lstsq(K: Tensor, rhs: Tensor) -> Tensor:
    """Least-squares solutions of singular systems; zero where ``K`` is not finite."""
    fine = torch.isfinite(K).all(-1).all(-1) & torch.isfinite(rhs).all(-1)
    out = torch.zeros_like(rhs)
    if bool(fine.any()):
        out[fine] = (torch.linalg.pinv(K[fine]) @ rhs[fine].unsqueeze(-1)).squeeze(-1)
    return out


@dataclass
class _PrimalDual(Solver):
    """The shared Newton iteration on the (perturbed) KKT conditions."""

    max_iter: int = 100
    mu0: float = 0.1
    kappa: float = 10.0
    ls_steps: int = 12

    def _run(self, node: Any, xs: tuple[Any, ...], y0: Tensor | None, inequalities: bool
             ) -> Solution:
        y0 = self.start(node, xs, y0)
        B, shape = y0.shape[0], tuple(y0.shape[1:])
        y = y0.reshape(B, -1).clone()
        m = y.shape[1]
        ev = Evaluator(node, xs, shape)
        p = ev.equalities(y).shape[1] if node.has_equality_constraints else 0
        g0 = ev.inequalities(y) if inequalities else y.new_zeros(B, 0)
        q = g0.shape[1]
        tol = self.tolerance(y.dtype)
        s = (-g0).clamp_min(1.0)
        mu = torch.full((B,), self.mu0, dtype=y.dtype, device=y.device)
        z = mu.unsqueeze(-1) / s
        nu = y.new_zeros(B, p)
        active, converged, iters, res = iteration_state(y)
        H_out = y.new_zeros(B, m, m)
        scale = None
        for it in range(self.max_iter + 1):
            idx = active.nonzero().flatten()
            if idx.numel() == 0:
                break
            sub = ev.sub(idx if idx.numel() < B else None)
            yi, si, zi, nui = y[idx], s[idx], z[idx], nu[idx]
            rd, h, g, Jh, Jg, H = _derivatives(sub, yi, nui, zi, p, q)
            rp = g + si
            if scale is None:
                scale = 1.0 + rd.abs().amax(-1)
            zero = torch.zeros(idx.numel(), dtype=y.dtype, device=y.device)
            feas = torch.stack([
                rd.abs().amax(-1) / scale[idx],
                h.abs().amax(-1) if p else zero,
                rp.abs().amax(-1) if q else zero,
            ]).amax(0)
            comp = (si * zi).amax(-1) if q else zero
            err = torch.maximum(feas, comp)
            res[idx] = err
            H_out[idx] = H
            done = err <= tol
            converged[idx[done]] = True
            active[idx[done]] = False
            if it == self.max_iter:
                break
            keep = ~done
            if not bool(keep.any()):
                break
            idx = idx[keep]
            yi, si, zi, nui, rd, h, rp, Jh, Jg, H, feas = (
                t[keep] for t in (yi, si, zi, nui, rd, h, rp, Jh, Jg, H, feas))
            # barrier subproblem solved well enough: decrease μ (monotone rule of IPOPT)
            mui = mu[idx]
            if q:
                for _ in range(4):
                    err_mu = torch.maximum(feas, (si * zi - mui.unsqueeze(-1)).abs().amax(-1))
                    dec = err_mu <= self.kappa * mui
                    if not bool(dec.any()):
                        break
                    mui = torch.where(dec, torch.clamp(torch.minimum(0.2 * mui, mui ** 1.5),
                                                       min=tol / 10), mui)
                mu[idx] = mui
            # Newton step on the perturbed KKT conditions, slacks and z eliminated.
            target = mui.unsqueeze(-1)
            rc = si * zi - target
            w = zi / si
            M = H + Jg.transpose(1, 2) @ (w.unsqueeze(-1) * Jg)
            M = _convexify(M, Jh)
            rhs_y = -rd - (Jg.transpose(1, 2) @ ((-rc + zi * rp) / si).unsqueeze(-1)).squeeze(-1)
            K = torch.cat([torch.cat([M, Jh.transpose(1, 2)], 2),
                           torch.cat([Jh, Jh.new_zeros(Jh.shape[0], p, p)], 2)], 1)
            rhs = torch.cat([rhs_y, -h], 1)
            sol, info = torch.linalg.solve_ex(K, rhs)
            bad = (info > 0) | ~torch.isfinite(sol).all(-1)
            if bool(bad.any()):
                sol[bad] = _lstsq(K[bad], rhs[bad])
            dy, dnu = sol[:, :m], sol[:, m:]
            ds = -rp - (Jg @ dy.unsqueeze(-1)).squeeze(-1)
            dz = (-rc - zi * ds) / si
            # fraction to the boundary, then backtracking on the residual of the KKT system
            tau = torch.clamp(1.0 - mui, min=0.99).unsqueeze(-1)
            big = torch.full_like(si, float("inf"))
            amax = torch.cat([torch.where(ds < 0, -tau * si / ds, big),
                              torch.where(dz < 0, -tau * zi / dz, big)], 1)
            amax = amax.amin(-1).clamp(max=1.0) if q else torch.ones_like(mui)
            D = torch.cat([dy, dnu, ds, dz], 1) * amax.unsqueeze(-1)
            V = torch.cat([yi, nui, si, zi], 1)

            def kkt_norm(j: Tensor, v: Tensor, idx: Tensor = idx, target: Tensor = target
                         ) -> Tensor:
                yv, nv = v[:, :m], v[:, m:m + p]
                sv, zv = v[:, m + p:m + p + q], v[:, m + p + q:]
                r_d, hv, gv, *_ = _derivatives(ev.sub(idx[j]), yv, nv, zv, p, q, second=False)
                return ((r_d ** 2).sum(-1) + (hv ** 2).sum(-1) + ((gv + sv) ** 2).sum(-1)
                        + ((sv * zv - target[j]) ** 2).sum(-1))

            phi0 = kkt_norm(torch.arange(idx.numel(), device=y.device), V)
            t = backtrack(kkt_norm, V, D, phi0, -2 * phi0, steps=self.ls_steps)
            V = V + t.unsqueeze(-1) * D
            y[idx], nu[idx] = V[:, :m], V[:, m:m + p]
            s[idx], z[idx] = V[:, m + p:m + p + q], V[:, m + p + q:]
            iters[idx] += 1
        act = z > s
        lam = torch.cat([-nu, -torch.where(act, z, torch.zeros_like(z))], 1)
        info = self.finish(node, y, converged, iters, res, slack=s)
        return solution(y, shape, multipliers=lam, active=act if q else None, hessian=H_out,
                        info=info)


@dataclass
class SQP(_PrimalDual):
    """Newton's method on the KKT system of an equality-constrained node (SQP).

    Each iteration solves ``[[H, Jₕᵀ], [Jₕ, 0]] [dy; dν] = −[∇L; h]`` with ``H = ∇²L`` (made
    positive definite on the null space of ``Jₕ`` where it is not) and backtracks on the KKT
    residual ``‖∇L‖² + ‖h‖²``. The start need not be feasible. Returns the multipliers
    (paper convention), the Hessian of the Lagrangian at ``y`` and ``info`` with
    ``converged``, ``iterations`` and ``residual`` (the worst scaled KKT residual).

    Args:
        tol: convergence tolerance (see :class:`~declnet.solvers.Solver`).
        max_iter: iteration limit (default 100).
        strict: raise instead of warning when a sample does not converge.
    """

    def solve(self, node: Any, *xs: Any, y0: Tensor | None = None) -> Solution:
        if node.has_inequality_constraints:
            raise TypeError(
                f"SQP handles equality constraints only, but {node_name(node)} has inequality "
                "constraints; use declnet.solvers.InteriorPoint()."
            )
        return self._run(node, xs, y0, inequalities=False)


@dataclass
class InteriorPoint(_PrimalDual):
    """Primal-dual interior-point method for inequality (and equality) constrained nodes.

    Newton steps on the barrier KKT conditions ``∇f + Jₕᵀν + J_gᵀz = 0``, ``h = 0``,
    ``g + s = 0``, ``s∘z = μ``, with the slacks and ``z`` eliminated so each step solves one
    ``(m + p)`` system ``[[H + J_gᵀ diag(z/s) J_g, Jₕᵀ], [Jₕ, 0]]`` (``H = ∇²L`` made
    positive definite where needed); a fraction-to-the-boundary rule keeps ``s, z > 0`` and
    a backtracking search decreases the residual of those conditions. The barrier
    parameter follows the monotone rule of IPOPT (Wächter & Biegler, 2006): per sample, once
    the barrier problem is solved to ``kappa · μ``, ``μ ← min(0.2μ, μ^1.5)``; this keeps the
    slacks off the boundary until the iterate is feasible. The start need not be
    feasible (only the slacks are). Returns multipliers in the paper's convention
    (``λ_g = −z ≤ 0`` on active constraints, ``0`` on inactive ones), the active set
    ``z > s``, and ``info`` with ``converged``, ``iterations``, ``residual``, ``slack``.

    Why an interior point rather than an augmented Lagrangian: it gives the multipliers and
    the active set directly from the same Newton system (an augmented Lagrangian's are only
    as accurate as its outer loop), converges in tens of Newton iterations without penalty
    tuning or an inner bound-constrained solver, and every sample runs the same batched
    dense linear algebra.

    Args:
        tol: convergence tolerance (see :class:`~declnet.solvers.Solver`).
        max_iter: iteration limit (default 100).
        strict: raise instead of warning when a sample does not converge.
        mu0: initial barrier parameter (default 0.1).
        kappa: barrier-subproblem accuracy factor (default 10).
    """

    def solve(self, node: Any, *xs: Any, y0: Tensor | None = None) -> Solution:
        return self._run(node, xs, y0, inequalities=node.has_inequality_constraints)
