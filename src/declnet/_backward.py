"""The implicit vector-Jacobian product: the one place where the implicit function theorem
is applied.

Given ``v = dJ/dy`` it returns ``dJ/dx`` for every input without forming ``Dy`` or the
``m × n`` matrix ``B`` (§6.1 of the paper): one KKT solve per sample (``_kkt``), then
``dJ/dx = −∇ₓ [⟨w₁, D_Y L(x, y, λ)⟩ + ⟨w₂, h̃(x, y)⟩]`` with ``y, λ, w`` fixed, in one
double-backward — ``v · Dy(x)`` of Propositions 4.4–4.6 evaluated left to right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _linalg
from ._diagnostics import warn
from ._kkt import KKTResult, solve_kkt
from ._problem import Problem

__all__ = ["check_solution", "problem", "vjp"]


def problem(node: Any, xs: Sequence[Any], y: Tensor, options: Any, solution: Any = None,
            need_grad: Sequence[bool] | None = None, attach: bool = False,
            params: Sequence[Tensor] = ()) -> Problem:
    """Evaluate the node's problem at ``(x, y)`` (see :class:`~declnet._problem.Problem`)."""
    return Problem(node, xs, y, options, solution, need_grad, attach, params)


def _dependent_rows(prob: Problem, res: KKTResult, v: Tensor) -> Tensor:
    """Choose the active constraints to drop where they are linearly dependent (§4.7.3).

    Rows are taken greedily in order of priority and a row is dropped when it depends on
    those already taken (an ordered Cholesky of the scaled Gram or Schur matrix). Among
    constraints whose gradients are parallel, the one that binds is the one most curved
    along the direction the solution moves (for tangent circle and ellipse, the ellipse):
    priority is the constraint's second derivative along that direction over its gradient
    norm (its absolute value for equalities, whose sign is arbitrary).
    """
    rows = res.dependent.nonzero().flatten()
    used = prob.used[rows]
    G = res.metric[rows]
    cd = G.dtype
    # Direction: v, projected onto the null space of the used rows when curvature matters
    # (of several right-hand sides, the one with the largest tangent part).
    vs = (v if v.dim() == 3 else v.unsqueeze(-1))[rows]
    A = prob.A.detach()[rows]
    norms = A.norm(dim=-1).clamp_min(torch.finfo(A.dtype).tiny)

    def scores(direction: Tensor) -> Tensor:
        full = torch.zeros(prob.batch, prob.m, dtype=prob.dtype, device=prob.device)
        full[rows] = direction.to(prob.dtype)
        curv = prob.constraint_second_difference(full)[rows] / norms
        curv[:, :prob.p] = curv[:, :prob.p].abs()
        return curv

    score = scores(vs[..., 0])
    if bool((score.abs() > 0).any()):
        Ac = A.to(cd)
        gram = Ac @ Ac.transpose(1, 2)
        d = gram.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(cd).tiny)
        reg = gram + torch.diag_embed(1e-8 * d + (~used).to(cd))
        tangent = vs.to(cd) - Ac.transpose(1, 2) @ torch.linalg.solve(reg, Ac @ vs.to(cd))
        best = tangent.norm(dim=1).argmax(-1)
        t = tangent[torch.arange(len(rows), device=tangent.device), :, best]
        t = t / t.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(cd).tiny)
        score = scores(t)
    score = torch.where(used, score, torch.full_like(score, -float("inf")))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    Gp = torch.gather(torch.gather(G, 1, order.unsqueeze(-1).expand_as(G)), 2,
                      order.unsqueeze(1).expand_as(G))
    diag = Gp.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(cd).tiny)
    Gs = Gp / (diag.sqrt().unsqueeze(-1) * diag.sqrt().unsqueeze(-2))
    delta = _linalg.singular_tol(prob.dtype)
    eye = torch.eye(Gs.shape[-1], dtype=cd, device=Gs.device)
    L, info = torch.linalg.cholesky_ex(Gs + delta * eye)
    pivots = L.diagonal(dim1=-2, dim2=-1) ** 2
    # The KKT matrix was found singular already: here only which rows to drop is decided,
    # so a row counts as dependent below sqrt(eps) (an angle of ~1e-4 in float64).
    threshold = max(3 * delta, _linalg.working_eps(prob.dtype) ** 0.5)
    dep_sorted = (pivots < threshold) | ~torch.isfinite(pivots)
    dep_sorted = dep_sorted | (info > 0).unsqueeze(-1) & (
        torch.arange(Gs.shape[-1], device=Gs.device) >= (info - 1).clamp_min(0).unsqueeze(-1))
    dep = torch.zeros_like(dep_sorted)
    dep.scatter_(1, order, dep_sorted)
    dep = dep & used
    drop = torch.zeros_like(prob.used)
    drop[rows] = dep
    return drop


def vjp(
    node: Any,
    xs: Sequence[Any],
    y: Tensor,
    grad_y: Tensor,
    *,
    options: Any,
    solution: Any = None,
    params: Sequence[Tensor] = (),
    need_grad: Sequence[bool] | None = None,
    force_dense: bool = False,
    create_graph: bool = False,
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """``grad_y · Dy`` for the inputs and ``params``.

    ``grad_y`` is ``y``-shaped, or ``(K, *y.shape)`` for ``K`` right-hand sides at once
    (one factorisation serves them all).

    Returns:
        ``(x_grads, p_grads)``: one entry per input (None where no gradient is needed) and
        one per entry of ``params``.
    """
    if y.shape[0] == 0:  # an empty batch: empty gradients, the problem is never evaluated
        if need_grad is None:
            need_grad = [isinstance(x, Tensor) and x.requires_grad for x in xs]
        return ([torch.zeros_like(x) if isinstance(x, Tensor) and ng else None
                 for x, ng in zip(xs, need_grad)], [torch.zeros_like(p) for p in params])
    prob = problem(node, xs, y, options, solution, need_grad, attach=create_graph,
                   params=params)
    multi = grad_y.dim() == y.dim() + 1
    B, m = prob.batch, prob.m
    targets = [x for x in prob.xs_d if isinstance(x, Tensor) and x.requires_grad]
    targets += list(prob.params)
    if not targets:
        return [None] * len(xs), [None] * len(params)
    gy = grad_y if create_graph else grad_y.detach()
    if multi:
        v = gy.reshape(grad_y.shape[0], B, m).permute(1, 2, 0).to(prob.dtype)
    else:
        v = gy.reshape(B, m, 1).to(prob.dtype)

    res = solve_kkt(prob, v, force_dense=force_dense)
    if bool(res.dependent.any()):
        prob.drop_rows(_dependent_rows(prob, res, v))
        res = solve_kkt(prob, v, force_dense=force_dense, allow_drop=False)
    w = res.w
    w1, w2 = w[:, :m], w[:, m:]
    grad_l = prob.lagrangian_gradient()
    with torch.enable_grad():
        outputs, grads_out = [grad_l], [w1]
        if prob.c and not prob.linear and prob.htil.requires_grad:
            outputs.append(prob.htil)
            grads_out.append(w2)
        # dJ/dx = −∇ₓ[...]: the sign goes on the (small) weights, not on the gradients.
        grads_out = [-(g.permute(2, 0, 1).contiguous() if multi else g.squeeze(-1))
                     for g in grads_out]
        if not create_graph:
            grads_out = [g.detach() for g in grads_out]
        keep = [i for i, o in enumerate(outputs) if o.requires_grad]
        if keep:
            raw = list(torch.autograd.grad(
                [outputs[i] for i in keep], targets, [grads_out[i] for i in keep],
                allow_unused=True, is_grads_batched=multi, create_graph=create_graph,
            ))
        else:
            raw = [None] * len(targets)
    it = iter(raw)
    x_grads = [next(it) if isinstance(x, Tensor) and x.requires_grad else None
               for x in prob.xs_d]
    p_grads = [next(it) for _ in params]
    return x_grads, p_grads


def check_solution(node: Any, xs: Sequence[Any], solution: Any, options: Any) -> None:
    """Warn (:class:`~declnet.DeclarativeWarning`) when ``solution`` is not optimal for
    the node's problem at ``xs``: stationarity relative to ``1 + ‖D_Y f‖``, feasibility,
    and the sign of the multipliers, against ``node.optimality_tol``."""
    y = solution.y
    if y.shape[0] == 0:
        return
    prob = problem(node, xs, y, options, solution, [False] * len(xs))
    res = prob.residual()
    tol = getattr(node, "optimality_tol", None)
    if tol is None:
        tol = 10 * _linalg.working_eps(y.dtype) ** 0.5
    scale = 1.0 + prob.gf.detach().norm(dim=-1)
    worst = torch.stack([res.stationarity / scale, res.equality, res.inequality, res.dual])
    bad = (worst > tol).any(0)
    if bool(bad.any()):
        warn(node, f"the solution from solve() is not optimal for {int(bad.sum())} of "
             f"{y.shape[0]} samples (worst: stationarity {float(res.stationarity.max()):.2e}, "
             f"equality {float(res.equality.max()):.2e}, inequality "
             f"{float(res.inequality.max()):.2e}, multiplier sign {float(res.dual.max()):.2e}; "
             f"tolerance {tol:.1e}). The implicit gradient assumes y is a minimiser.")
