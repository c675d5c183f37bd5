"""Unconstrained minimisation: damped Newton with a modified Hessian, and L-BFGS."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._solution import Solution
from ._common import Evaluator, Solver, backtrack, hessian_of, iteration_state, solution

__all__ = ["LBFGS", "Newton", "modified_newton_step"]


def modified_newton_step(H: Tensor, g: Tensor) -> Tensor:
    """``d = −H̃⁻¹ g`` for ``H (B, m, m)``, ``g (B, m)``.

    ``H̃ = H`` where ``H`` is positive definite (a Cholesky factorisation succeeds); elsewhere
    ``H̃ = V |Λ|_δ Vᵀ`` from the eigendecomposition ``H = V Λ Vᵀ``, with eigenvalues replaced by
    ``max(|λ|, δ)``, ``δ = √eps · max(1, max|λ|)``: a descent direction that follows negative
    curvature out of saddles (Nocedal & Wright, §3.4).
    """
    L, info = torch.linalg.cholesky_ex(H)
    d = -torch.cholesky_solve(g.unsqueeze(-1), L).squeeze(-1)
    bad = (info > 0) | ~torch.isfinite(d).all(-1)
    if bool(bad.any()):
        idx = bad.nonzero().flatten()
        lam, V = torch.linalg.eigh(H[idx])
        big = lam.abs().amax(-1, keepdim=True).clamp_min(1.0)
        lam = lam.abs().clamp_min(float(torch.finfo(H.dtype).eps) ** 0.5 * big)
        gv = (V.transpose(1, 2) @ g[idx].unsqueeze(-1)).squeeze(-1)
        d[idx] = -(V @ (gv / lam).unsqueeze(-1)).squeeze(-1)
    return d


@dataclass
class Newton(Solver):
    """Damped Newton's method for unconstrained nodes, batched (dense ``m × m`` Hessians).

    Each iteration forms ``f``, ``D_Y f`` and ``D²_YY f`` of the samples not yet converged by
    automatic differentiation, takes the modified Newton step (:func:`modified_newton_step`;
    the Hessian is made positive definite where it is not) and an Armijo backtracking line
    search on ``f``. Converged samples are frozen. A sample has converged when
    ``‖D_Y f‖_∞ ≤ tol · (1 + ‖D_Y f(y₀)‖_∞)``.

    The :class:`~declnet.Solution` carries the Hessian at the returned ``y`` (``(B, m, m)``,
    reused by the backward pass) and ``info`` with ``converged (B,)``, ``iterations (B,)`` and
    ``residual (B,)`` (the final gradient norm).

    Args:
        tol: see :class:`~declnet.solvers.Solver`.
        max_iter: iteration limit (default 50).
        strict: raise instead of warning on non-convergence.

    On a root-finding node (one with ``equations``) it runs Newton's method on
    ``F(x, y) = 0`` instead, with a dense Jacobian and backtracking on ``‖F‖²``.

    Example:
        >>> sol = declnet.solvers.Newton()(node, x)     # node.initial_guess(x) is the start
    """

    max_iter: int = 50

    def solve(self, node: Any, *xs: Any, y0: Tensor | None = None) -> Solution:
        if callable(getattr(node, "equations", None)):  # a root-finding node
            from ._roots import newton_root

            return newton_root(self, node, xs, y0)
        y0 = self.start(node, xs, y0)
        B, shape = y0.shape[0], tuple(y0.shape[1:])
        y = y0.reshape(B, -1).clone()
        m = y.shape[1]
        ev = Evaluator(node, xs, shape)
        tol = self.tolerance(y.dtype)
        active, converged, iters, res = iteration_state(y)
        H_out = y.new_zeros(B, m, m)
        scale = None
        for it in range(self.max_iter + 1):
            idx = active.nonzero().flatten()
            if idx.numel() == 0:
                break
            sub = ev.sub(idx if idx.numel() < B else None)
            with torch.enable_grad():
                yy = y[idx].requires_grad_(True)
                f = sub.objective(yy)
                (g,) = torch.autograd.grad(f.sum(), yy, create_graph=True, allow_unused=True)
                if g is None:
                    g = torch.zeros_like(yy)
                H = hessian_of(g, yy).detach()
            f, g = f.detach(), g.detach()
            gn = g.abs().amax(-1)
            if scale is None:
                scale = 1.0 + gn
            res[idx] = gn
            H_out[idx] = H
            done = gn <= tol * scale[idx]
            converged[idx[done]] = True
            active[idx[done]] = False
            if it == self.max_iter:
                break
            keep = ~done
            idx, f, g, H = idx[keep], f[keep], g[keep], H[keep]
            if idx.numel() == 0:
                break
            d = modified_newton_step(H, g)
            slope = (g * d).sum(-1)

            def merit(j: Tensor, yt: Tensor, idx: Tensor = idx) -> Tensor:
                return ev.sub(idx[j]).objective(yt)

            t = backtrack(merit, y[idx], d, f, slope)
            y[idx] = y[idx] + t.unsqueeze(-1) * d
            iters[idx] += 1
        info = self.finish(node, y, converged, iters, res)
        return solution(y, shape, hessian=H_out if m * m * B > 0 else None, info=info)


@dataclass
class LBFGS(Solver):
    """Limited-memory BFGS for unconstrained nodes with large outputs (matrix-free).

    Batched two-loop recursion (Nocedal & Wright, Alg. 7.4) with ``memory`` pairs per sample,
    an Armijo backtracking line search, and curvature-guarded updates (a pair with
    ``sᵀy ≤ √eps ‖s‖‖y‖`` is skipped for that sample). Needs only gradients, ``O(memory · m)``
    memory per sample. Converged samples are frozen; stopping test as :class:`Newton`.

    Args:
        tol: default ``√eps`` of the dtype (L-BFGS converges superlinearly, not quadratically).
        max_iter: iteration limit (default 500).
        memory: number of stored pairs (default 10).
        strict: raise instead of warning on non-convergence.
    """

    max_iter: int = 500
    memory: int = 10

    def tolerance(self, dtype: torch.dtype) -> float:
        return float(torch.finfo(dtype).eps) ** 0.5 if self.tol is None else float(self.tol)

    def solve(self, node: Any, *xs: Any, y0: Tensor | None = None) -> Solution:
        y0 = self.start(node, xs, y0)
        B, shape = y0.shape[0], tuple(y0.shape[1:])
        y = y0.reshape(B, -1).clone()
        m, k = y.shape[1], self.memory
        ev = Evaluator(node, xs, shape)
        tol = self.tolerance(y.dtype)
        f, g = ev.value_and_grad(y)
        scale = 1.0 + g.abs().amax(-1)
        S = y.new_zeros(B, k, m)
        Yd = y.new_zeros(B, k, m)
        rho = y.new_zeros(B, k)
        gamma = 1.0 / scale
        active, converged, iters, _ = iteration_state(y, 0)
        res = g.abs().amax(-1)
        eps = float(torch.finfo(y.dtype).eps) ** 0.5
        pos = 0
        for _ in range(self.max_iter):
            done = active & (res <= tol * scale)
            converged |= done
            active &= ~done
            idx = active.nonzero().flatten()
            if idx.numel() == 0:
                break
            gi, Si, Yi, ri = g[idx], S[idx], Yd[idx], rho[idx]
            q = gi.clone()
            alphas = []
            order = [(pos - 1 - j) % k for j in range(k)]
            for j in order:
                a = ri[:, j] * (Si[:, j] * q).sum(-1)
                q = q - a.unsqueeze(-1) * Yi[:, j]
                alphas.append(a)
            r = gamma[idx].unsqueeze(-1) * q
            for j, a in zip(reversed(order), reversed(alphas)):
                b = ri[:, j] * (Yi[:, j] * r).sum(-1)
                r = r + (a - b).unsqueeze(-1) * Si[:, j]
            d = -r
            slope = (gi * d).sum(-1)
            uphill = slope >= 0  # lost descent (should not happen): steepest descent
            if bool(uphill.any()):
                d[uphill] = -gi[uphill] * gamma[idx][uphill].unsqueeze(-1)
                slope = (gi * d).sum(-1)

            def merit(j: Tensor, yt: Tensor, idx: Tensor = idx) -> Tensor:
                return ev.sub(idx[j]).objective(yt)

            t = backtrack(merit, y[idx], d, f[idx], slope)
            s = t.unsqueeze(-1) * d
            y_new = y[idx] + s
            f_new, g_new = ev.sub(idx).value_and_grad(y_new)
            yd = g_new - gi
            sy = (s * yd).sum(-1)
            ok = sy > eps * s.norm(dim=-1) * yd.norm(dim=-1)
            S[idx, pos] = s
            Yd[idx, pos] = yd
            rho[idx, pos] = torch.where(ok, 1.0 / torch.where(ok, sy, 1.0), 0.0)
            gamma[idx] = torch.where(ok, sy / (yd * yd).sum(-1).clamp_min(1e-300), gamma[idx])
            pos = (pos + 1) % k
            y[idx], f[idx], g[idx] = y_new, f_new, g_new
            res[idx] = g_new.abs().amax(-1)
            iters[idx] += 1
        done = active & (res <= tol * scale)
        converged |= done
        info = self.finish(node, y, converged, iters, res)
        return solution(y, shape, info=info)
