"""Square nonlinear systems ``F(x, y) = 0``: Newton and Broyden; fixed points: Anderson."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._diagnostics import node_name
from .._solution import Solution
from ._common import Evaluator, Solver, backtrack, batched_jacobian, iteration_state, solution

__all__ = ["Anderson", "Broyden", "newton_root"]


def _check_square(node: Any, F: Tensor, y: Tensor) -> None:
    if F.shape[1] != y.shape[1]:
        raise ValueError(
            f"{node_name(node)}.equations returned {F.shape[1]} equations per sample for an "
            f"output of {y.shape[1]} elements; a root-finding node needs a square system "
            "(as many equations as unknowns)."
        )


def _jacobian(ev: Evaluator, y: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        yy = y.detach().requires_grad_(True)
        F = ev.equations(yy)
        J = batched_jacobian(F, yy)
    return F.detach(), J.detach()


def _solve(J: Tensor, rhs: Tensor) -> Tensor:
    d, info = torch.linalg.solve_ex(J, rhs)
    bad = (info > 0) | ~torch.isfinite(d).all(-1)
    if bool(bad.any()):
        d[bad] = torch.linalg.lstsq(J[bad], rhs[bad].unsqueeze(-1)).solution.squeeze(-1)
    return d


def newton_root(solver: Solver, node: Any, xs: tuple[Any, ...], y0: Tensor | None) -> Solution:
    """Newton's method on ``F(x, y) = 0`` with a dense Jacobian ``(B, m, m)`` (``m`` batched
    VJPs) and backtracking on ``‖F‖²``; the run behind ``Newton()(root_node, *xs)``."""
    y0 = solver.start(node, xs, y0)
    B, shape = y0.shape[0], tuple(y0.shape[1:])
    y = y0.reshape(B, -1).clone()
    ev = Evaluator(node, xs, shape)
    tol = solver.tolerance(y.dtype)
    active, converged, iters, res = iteration_state(y)
    scale = None
    for it in range(solver.max_iter + 1):
        idx = active.nonzero().flatten()
        if idx.numel() == 0:
            break
        F, J = _jacobian(ev.sub(idx if idx.numel() < B else None), y[idx])
        _check_square(node, F, y)
        fn = F.abs().amax(-1)
        if scale is None:
            scale = 1.0 + fn
        res[idx] = fn
        done = fn <= tol * scale[idx]
        converged[idx[done]] = True
        active[idx[done]] = False
        if it == solver.max_iter or bool(done.all()):
            break
        keep = ~done
        idx, F, J = idx[keep], F[keep], J[keep]
        d = _solve(J, -F)
        phi0 = (F * F).sum(-1)

        def merit(j: Tensor, yt: Tensor, idx: Tensor = idx) -> Tensor:
            r = ev.sub(idx[j]).equations(yt)
            return (r * r).sum(-1)

        t = backtrack(merit, y[idx], d, phi0, -2 * phi0, steps=20)
        y[idx] = y[idx] + t.unsqueeze(-1) * d
        iters[idx] += 1
    info = solver.finish(node, y, converged, iters, res)
    return solution(y, shape, info=info)


@dataclass
class Broyden(Solver):
    """Broyden's ("good") quasi-Newton method for square systems ``F(x, y) = 0``.

    Starts from the exact Jacobian at ``y₀`` (``m`` batched VJPs, inverted once) and updates
    its inverse by Sherman–Morrison (``J⁻¹ ← J⁻¹ + (s − J⁻¹Δ) sᵀJ⁻¹ / sᵀJ⁻¹Δ``), so each
    iteration costs one evaluation of ``F`` and ``O(m²)`` work per sample; a short
    backtracking on ``‖F‖`` guards the steps. Converged samples are frozen; a sample has
    converged when ``‖F‖_∞ ≤ tol · (1 + ‖F(y₀)‖_∞)``.

    Args:
        tol: convergence tolerance (see :class:`~declnet.solvers.Solver`).
        max_iter: iteration limit (default 100).
        strict: raise instead of warning when a sample does not converge.
    """

    max_iter: int = 100

    def solve(self, node: Any, *xs: Any, y0: Tensor | None = None) -> Solution:
        y0 = self.start(node, xs, y0)
        B, shape = y0.shape[0], tuple(y0.shape[1:])
        y = y0.reshape(B, -1).clone()
        ev = Evaluator(node, xs, shape)
        tol = self.tolerance(y.dtype)
        F, J = _jacobian(ev, y)
        _check_square(node, F, y)
        m = y.shape[1]
        eye = torch.eye(m, dtype=y.dtype, device=y.device).expand(B, m, m)
        Jinv = torch.linalg.solve_ex(J, eye)[0]
        bad = ~torch.isfinite(Jinv).all(-1).all(-1)
        if bool(bad.any()):
            Jinv[bad] = torch.linalg.pinv(J[bad])
        scale = 1.0 + F.abs().amax(-1)
        res = F.abs().amax(-1)
        active, converged, iters, _ = iteration_state(y, 0)
        for _ in range(self.max_iter):
            done = active & (res <= tol * scale)
            converged |= done
            active &= ~done
            idx = active.nonzero().flatten()
            if idx.numel() == 0:
                break
            Fi, Ji, yi = F[idx], Jinv[idx], y[idx]
            d = -(Ji @ Fi.unsqueeze(-1)).squeeze(-1)
            phi0 = (Fi * Fi).sum(-1)

            def merit(j: Tensor, yt: Tensor, idx: Tensor = idx) -> Tensor:
                r = ev.sub(idx[j]).equations(yt)
                return (r * r).sum(-1)

            t = backtrack(merit, yi, d, phi0, -2 * phi0, steps=6)
            s = t.unsqueeze(-1) * d
            y_new = yi + s
            F_new = ev.sub(idx).equations(y_new)
            dF = F_new - Fi
            Jd = (Ji @ dF.unsqueeze(-1)).squeeze(-1)
            denom = (s * Jd).sum(-1)
            ok = denom.abs() > 1e-30
            sJ = (s.unsqueeze(1) @ Ji).squeeze(1)
            upd = ((s - Jd) / torch.where(ok, denom, 1.0).unsqueeze(-1)).unsqueeze(-1) \
                * sJ.unsqueeze(1)
            Jinv[idx] = Ji + torch.where(ok[:, None, None], upd, torch.zeros_like(upd))
            y[idx], F[idx] = y_new, F_new
            res[idx] = F_new.abs().amax(-1)
            iters[idx] += 1
        converged |= active & (res <= tol * scale)
        info = self.finish(node, y, converged, iters, res)
        return solution(y, shape, info=info)


@dataclass
class Anderson(Solver):
    """Anderson acceleration (type II) for fixed points ``y = G(x, y)`` (Walker & Ni, 2011).

    Keeps the last ``memory`` iterates ``yᵢ``, maps ``Gᵢ = G(yᵢ)`` and residuals
    ``rᵢ = Gᵢ − yᵢ``; each step solves, per sample and batched, the bordered system
    ``[[0, 1ᵀ], [1, RRᵀ + λI]] [ν; α] = [1; 0]`` for the weights minimising ``‖Σ αᵢ rᵢ‖``
    with ``Σ αᵢ = 1``, and sets ``y ← β Σ αᵢ Gᵢ + (1 − β) Σ αᵢ yᵢ``. For a node with
    ``fixed_point_map`` that map is ``G``; for a root-finding node ``G(y) = y + F(y)``.
    Converged samples (``‖r‖_∞ ≤ tol · (1 + ‖y‖_∞)``) are frozen.

    Args:
        tol: see :class:`~declnet.solvers.Solver`.
        max_iter: iteration limit (default 200).
        memory: number of past iterates (default 6).
        beta: mixing (default 1).
        lam: Tikhonov regularisation of the least-squares problem (default 1e-10 relative).
        strict: raise instead of warning on non-convergence.
    """

    max_iter: int = 200
    memory: int = 6
    beta: float = 1.0
    lam: float = 1e-10

    def solve(self, node: Any, *xs: Any, y0: Tensor | None = None) -> Solution:
        y0 = self.start(node, xs, y0)
        B, shape = y0.shape[0], tuple(y0.shape[1:])
        y = y0.reshape(B, -1).clone()
        m, k = y.shape[1], self.memory
        ev = Evaluator(node, xs, shape)
        tol = self.tolerance(y.dtype)
        if hasattr(node, "fixed_point_map"):
            def G(e: Evaluator, v: Tensor) -> Tensor:
                out = node.fixed_point_map(*e.xs, y=v.reshape(v.shape[0], *shape))
                return out.reshape(v.shape[0], -1)
        else:
            def G(e: Evaluator, v: Tensor) -> Tensor:
                return v + e.equations(v)
        Ys = y.new_zeros(B, k, m)
        Gs = y.new_zeros(B, k, m)
        g = G(ev, y)
        if g.shape != y.shape:
            raise ValueError(
                f"{node_name(node)}: the fixed-point map returned {tuple(g.shape)} for y of "
                f"shape {tuple(y.shape)}; it must return the shape of y."
            )
        Ys[:, 0], Gs[:, 0] = y, g
        res = (g - y).abs().amax(-1)
        y = g.clone()  # one plain step
        active, converged, iters, _ = iteration_state(y, 1)
        for it in range(1, self.max_iter):
            idx = active.nonzero().flatten()
            if idx.numel() == 0:
                break
            sub = ev.sub(idx if idx.numel() < B else None)
            yi = y[idx]
            gi = G(sub, yi)
            r_now = (gi - yi).abs().amax(-1)
            res[idx] = r_now
            done = r_now <= tol * (1.0 + yi.abs().amax(-1))
            converged[idx[done]] = True
            active[idx[done]] = False
            slot = it % k
            Ys[idx, slot], Gs[idx, slot] = yi, gi
            n = min(it + 1, k)
            keep = ~done
            idx = idx[keep]
            if idx.numel() == 0:
                break
            Yh, Gh = Ys[idx, :n], Gs[idx, :n]
            R = Gh - Yh
            RR = R @ R.transpose(1, 2)
            nb = idx.numel()
            A = y.new_zeros(nb, n + 1, n + 1)
            A[:, 0, 1:] = 1.0
            A[:, 1:, 0] = 1.0
            reg = self.lam * RR.diagonal(dim1=1, dim2=2).amax(-1) + torch.finfo(y.dtype).tiny
            A[:, 1:, 1:] = RR + reg[:, None, None] * torch.eye(n, dtype=y.dtype, device=y.device)
            rhs = y.new_zeros(nb, n + 1)
            rhs[:, 0] = 1.0
            alpha, info = torch.linalg.solve_ex(A, rhs)
            alpha = alpha[:, 1:]
            bad = (info > 0) | ~torch.isfinite(alpha).all(-1)
            if bool(bad.any()):  # fall back to the plain step
                alpha[bad] = 0.0
                alpha[bad, slot if slot < n else n - 1] = 1.0
            a = alpha.unsqueeze(-1)
            y[idx] = self.beta * (a * Gh).sum(1) + (1 - self.beta) * (a * Yh).sum(1)
            iters[idx] += 1
        info = self.finish(node, y, converged, iters, res)
        return solution(y, shape, info=info)
