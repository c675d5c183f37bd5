"""Forward-mode implicit differentiation: the Jacobian-vector product ``Dy(x) · ẋ``.

Differentiating the optimality conditions of the node along a direction ``ẋ`` (the
input tangents, and those of the node's parameters) gives, with ``H = D²_YY L``,
``A = D_Y h̃`` (active rows), ``B = D²_XY L`` and ``C = D_X h̃`` (Propositions 4.4–4.6
read from right to left)::

    [ H  Aᵀ ] [ẏ]      [B ẋ]
    [ A  D  ] [μ] = −  [C ẋ]

(``μ`` is minus the multipliers' tangent; ``D = 1`` on unused rows, whose right-hand
side is 0). The engine's KKT solver takes right-hand sides ``[v; 0]``, so ``ẏ`` is split
into ``ẏ₀ = Aᵀ (AAᵀ)⁻¹ (−C ẋ)``, which satisfies the constraint rows, and a correction
``δ`` with ``[H Aᵀ; A D] [δ; μ] = [−B ẋ − H ẏ₀; 0]``. ``B ẋ`` and ``C ẋ`` are
Jacobian-vector products by the double-backward trick; ``K`` directions share one
factorisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _linalg
from ._backward import _dependent_rows, problem
from ._kkt import hessian_operator, solve_kkt
from ._problem import Problem

__all__ = ["jvp"]


def _grad(outputs: list[Tensor], inputs: list[Tensor], grads: list[Tensor], *,
          batched: bool, create_graph: bool = False) -> list[Tensor | None]:
    """``torch.autograd.grad`` with ``K`` batched cotangents, one by one where an op of the
    node has no batching rule."""
    if not batched:
        return list(torch.autograd.grad(outputs, inputs, grads, allow_unused=True,
                                        retain_graph=True, create_graph=create_graph))
    try:
        return list(torch.autograd.grad(outputs, inputs, grads, allow_unused=True,
                                        retain_graph=True, is_grads_batched=True,
                                        create_graph=create_graph))
    except RuntimeError:  # an op without a batching rule: one direction at a time
        cols = [_grad(outputs, inputs, [g[k] for g in grads], batched=False)
                for k in range(grads[0].shape[0])]
        out: list[Tensor | None] = []
        for i, inp in enumerate(inputs):
            parts = [c[i] for c in cols]
            out.append(None if all(p is None for p in parts) else torch.stack(
                [torch.zeros_like(inp) if p is None else p for p in parts]))
        return out


def _directional_derivatives(prob: Problem, targets: list[Tensor], dirs: list[Tensor],
                             K: int) -> tuple[Tensor, Tensor]:
    """``B ẋ`` ``(K, B, m)`` and ``C ẋ`` ``(K, B, c)`` (used rows) for the ``K`` directions
    ``dirs`` (one ``(K, *t.shape)`` tensor per target), with ``y`` and λ fixed."""
    B, m, c = prob.batch, prob.m, prob.c
    bx = torch.zeros(K, B, m, dtype=prob.dtype, device=prob.device)
    cx = torch.zeros(K, B, c, dtype=prob.dtype, device=prob.device)
    grad_l = prob.lagrangian_gradient()
    with torch.enable_grad():
        u1 = torch.zeros(B, m, dtype=prob.dtype, device=prob.device, requires_grad=True)
        outputs, cots = [grad_l], [u1]
        if c and not prob.linear and prob.htil.requires_grad:
            u2 = torch.zeros(B, c, dtype=prob.dtype, device=prob.device, requires_grad=True)
            outputs.append(prob.htil)
            cots.append(u2)
        keep = [i for i, o in enumerate(outputs) if o.requires_grad]
        if not keep:
            return bx, cx
        gx = torch.autograd.grad([outputs[i] for i in keep], targets,
                                 [cots[i] for i in keep], allow_unused=True,
                                 retain_graph=True, create_graph=True)
    pairs = [(g, d) for g, d in zip(gx, dirs) if g is not None and g.requires_grad]
    if not pairs:
        return bx, cx
    used = [cots[i] for i in keep]
    grads = [d.to(g.dtype) for g, d in pairs]
    if K == 1:
        jv = [None if j is None else j.unsqueeze(0) for j in
              _grad([g for g, _ in pairs], used, [d[0] for d in grads], batched=False)]
    else:
        jv = _grad([g for g, _ in pairs], used, grads, batched=True)
    for i, j in zip(keep, jv):
        if j is None:
            continue
        if i == 0:
            bx = j.detach()
        else:
            cx = j.detach()
    if c and not prob.all_used:
        cx = cx * prob.used.to(prob.dtype)
    return bx, cx


def _hessian_times(prob: Problem, Z: Tensor) -> Tensor:
    """``H zₖ`` for ``Z`` ``(K, B, m)``, the (damped) Hessian the KKT solve uses."""
    op = hessian_operator(prob)
    if op is not None:
        return torch.stack([op.matvec(z.to(op.dtype)).to(Z.dtype) for z in Z])
    rows = prob.hessian_columns(Z)
    if rows is None:
        rows = torch.stack([prob.hvp(z) for z in Z])
    damping = prob.options.damping
    return rows + damping * Z if damping else rows


def _right_hand_side(prob: Problem, targets: list[Tensor], dirs: list[Tensor],
                     K: int) -> tuple[Tensor, Tensor]:
    """``v`` ``(B, m, K)`` for the KKT solve and the particular part ``ẏ₀`` ``(B, m, K)``."""
    bx, cx = _directional_derivatives(prob, targets, dirs, K)
    v = -bx
    y0 = torch.zeros_like(bx)
    if prob.c and bool((cx != 0).any()):
        cd = _linalg.compute_dtype(prob.dtype)
        A = prob.A_solve.detach().to(cd)
        gram = A @ A.transpose(1, 2) + torch.diag_embed(prob.inactive_diagonal.to(cd))
        z = -cx.permute(1, 2, 0).to(cd)  # (B, c, K)
        coef, ok = _linalg.solve_cholesky(gram, z, _linalg.singular_tol(prob.dtype))
        if not bool(ok.all()):
            bad = ~ok
            pinv, _ = _linalg.solve_symmetric_pinv(gram[bad], z[bad],
                                                   prob.options.rcond_for(prob.dtype))
            coef = coef.clone()
            coef[bad] = pinv
        y0 = (A.transpose(1, 2) @ coef).to(prob.dtype).permute(2, 0, 1)  # (K, B, m)
        v = v - _hessian_times(prob, y0)
    return v.permute(1, 2, 0), y0.permute(1, 2, 0)


def jvp(
    node: Any,
    xs: Sequence[Any],
    y: Tensor,
    tangents: Sequence[Tensor | None],
    *,
    options: Any,
    solution: Any = None,
    params: Sequence[Tensor] = (),
    param_tangents: Sequence[Tensor | None] = (),
) -> Tensor:
    """``Dy(x) · ẋ`` for ``K`` directions at once, by one batched KKT solve.

    Args:
        node: the declarative node.
        xs: its inputs.
        y: ``(B, ...)`` the solution.
        tangents: per input, None or ``(K, *x.shape)`` its tangents.
        options: an :class:`~declnet.ImplicitBackward` (solver, tolerances, damping).
        solution: the :class:`~declnet.Solution` from ``solve``, if any.
        params: tensors the node's objective or constraints use (its parameters), which
            must be leaves requiring grad for the node as it is evaluated.
        param_tangents: per entry of ``params``, None or ``(K, *p.shape)``.

    Returns:
        ``ẏ`` ``(K, *y.shape)``.
    """
    present = [t for t in (*tangents, *param_tangents) if t is not None]
    if not present:
        raise ValueError("jvp: at least one tangent is needed.")
    K = present[0].shape[0]
    if y.shape[0] == 0:
        return y.new_zeros(K, *y.shape)
    need = [t is not None and isinstance(x, Tensor) and x.is_floating_point()
            for x, t in zip(xs, tangents)]
    used = [(p, t) for p, t in zip(params, param_tangents) if t is not None]
    prob = problem(node, xs, y, options, solution, need, params=[p for p, _ in used])
    targets = [x for x, n in zip(prob.xs_d, need) if n] + list(prob.params)
    dirs = [t for x, t, n in zip(xs, tangents, need) if n] + [t for _, t in used]
    dirs = [d.to(prob.dtype) for d in dirs]
    if not targets:
        return y.new_zeros(K, *y.shape)
    v, y0 = _right_hand_side(prob, targets, dirs, K)
    res = solve_kkt(prob, v)
    if bool(res.dependent.any()):
        prob.drop_rows(_dependent_rows(prob, res, v))
        v, y0 = _right_hand_side(prob, targets, dirs, K)
        res = solve_kkt(prob, v, allow_drop=False)
    dy = y0 + res.w[:, :prob.m]
    return dy.permute(2, 0, 1).reshape(K, *y.shape).to(y.dtype)
