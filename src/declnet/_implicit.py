"""The implicit backward pass: the one place where the implicit function theorem is applied.

Given ``v = dJ/dy`` the engine returns ``dJ/dx`` for every input without forming ``Dy``
or the ``m × n`` matrix ``B`` (§6.1 of the paper). With ``L = f − λᵀ h̃``,
``h̃ = [h; active g]``, ``A = D_Y h̃`` and ``H = D²_YY L``, it solves one KKT system per
sample (batched)::

    [ H  Aᵀ ] [w₁]   [v]
    [ A  D  ] [w₂] = [0]          (D = 1 on the diagonal for inactive inequalities, else 0)

and returns ``dJ/dx = −∇ₓ [⟨w₁, D_Y L(x, y, λ)⟩ + ⟨w₂, h̃(x, y)⟩]`` with ``y, λ, w`` fixed:
``v·Dy(x)`` of Propositions 4.4–4.6 evaluated left to right, in one double-backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _linalg
from ._diagnostics import OptimalityResidual, check_batched, node_name, warn

__all__ = [
    "ImplicitBackward",
    "UnrolledBackward",
    "implicit_vjp",
    "jacobian",
    "optimality_residual",
]

_LINEAR_SOLVERS = ("auto", "cholesky", "lu", "lstsq", "cg", "minres")


@dataclass(frozen=True)
class ImplicitBackward:
    """Configuration of the implicit backward pass.

    Args:
        linear_solver: how to solve the KKT system.

            - ``"auto"`` (default): dense (``"cholesky"``) when ``m + p + q ≤ dense_max_size``,
              else matrix-free (``"cg"``). Forming ``H`` costs ``m`` Hessian-vector
              products, so beyond small sizes the iterative solvers are much faster.
            - ``"cholesky"``: dense; Cholesky of ``H`` (and of the Schur complement
              ``A H⁻¹ Aᵀ`` for constrained nodes). Where ``H`` is not positive definite it
              falls back to ``"lu"``.
            - ``"lu"``: dense LU on the whole KKT matrix.
            - ``"lstsq"``: dense minimum-norm least squares (pseudo-inverse from an
              eigendecomposition of the symmetric KKT matrix, eq. 35).
            - ``"cg"``: matrix-free conjugate gradients with Hessian-vector products; for
              constrained nodes, projected onto the null space of the active constraint
              gradients (needs a positive definite reduced Hessian, as at a strict local
              minimum; falls back to MINRES on negative curvature).
            - ``"minres"``: matrix-free MINRES on the KKT system (any node).

            Every dense solve is checked by its residual; samples that fail it, or whose
            system is singular, are re-solved by the pseudo-inverse with a
            :class:`~declnet.DeclarativeWarning` that names the node (§4.7.3–§4.7.4).
        damping: ``γ ≥ 0`` added to the Hessian, ``H + γI`` (the proximal term of §4.7.4).
        dense_max_size: size limit of the dense path under ``"auto"``.
        rtol: relative residual target of the matrix-free solvers (default ``sqrt(eps)``
            of the dtype, ``1e-10`` in float64).
        maxiter: iteration limit of the matrix-free solvers (default ``2 (m + p + q) + 10``).
        rcond: relative eigenvalue cut-off of the pseudo-inverse (default ``1e3 eps``).
        active_tol: an inequality is active where ``g_i ≥ −active_tol (1 + ‖y‖∞ ‖∇g_i‖∞)``
            (default ``sqrt(eps)`` of the dtype).
    """

    linear_solver: str = "auto"
    damping: float = 0.0
    dense_max_size: int = 64
    rtol: float | None = None
    maxiter: int | None = None
    rcond: float | None = None
    active_tol: float | None = None

    def __post_init__(self) -> None:
        if self.linear_solver not in _LINEAR_SOLVERS:
            raise ValueError(
                f"ImplicitBackward: unknown linear_solver {self.linear_solver!r}; expected one "
                f"of {', '.join(map(repr, _LINEAR_SOLVERS))}."
            )
        if not self.damping >= 0:
            raise ValueError(f"ImplicitBackward: damping must be >= 0, got {self.damping!r}.")
        if self.dense_max_size < 0:
            raise ValueError(
                f"ImplicitBackward: dense_max_size must be >= 0, got {self.dense_max_size!r}."
            )


@dataclass(frozen=True)
class UnrolledBackward:
    """Back-propagate through the node's own ``solve`` with autograd.

    ``solve`` is then run with gradients enabled, so it must be written with
    differentiable PyTorch operations (and it costs the memory of every iteration).
    Useful to compare against the implicit gradient, and for solvers that stop early on
    purpose.
    """


# ---------------------------------------------------------------------------------------
# Evaluating the problem
# ---------------------------------------------------------------------------------------


class _Problem:
    """The objective, constraints and their first derivatives at ``(x, y)`` for a batch.

    Holds leaves ``xs_d`` (detached copies of the inputs; those that need gradients
    require grad) and ``y_flat`` ``(B, m)`` requiring grad, and evaluates

    - ``f`` ``(B,)``, ``h̃ = [h; g]`` ``(B, c)``,
    - ``gf = D_Y f`` ``(B, m)`` and ``A = D_Y h̃`` ``(B, c, m)`` (no graph kept),
    - the active mask and multipliers λ ``(B, c)``.
    """

    def __init__(
        self,
        node: Any,
        xs: Sequence[Any],
        y: Tensor,
        config: ImplicitBackward,
        solution: Any = None,
        need_grad: Sequence[bool] | None = None,
    ) -> None:
        self.node = node
        self.config = config
        self.batch = y.shape[0]
        self.y_shape = y.shape
        self.m = y[0].numel() if y.dim() > 1 else 1
        self.dtype = y.dtype
        if need_grad is None:
            need_grad = [isinstance(x, Tensor) and x.requires_grad for x in xs]
        self.xs_d = [
            x.detach().requires_grad_(bool(ng)) if isinstance(x, Tensor) else x
            for x, ng in zip(xs, need_grad)
        ]
        self.y_flat = y.detach().reshape(self.batch, self.m).clone().requires_grad_(True)
        with torch.enable_grad():
            self.y_in = self.y_flat.view(self.y_shape)
        self.linear = hasattr(node, "constraint_matrix")

        with torch.enable_grad():
            self.f = self._objective()
            self.h = self._constraints("equality_constraints") if node.has_equality_constraints \
                else None
            self.g = self._constraints("inequality_constraints") \
                if node.has_inequality_constraints else None
            parts = [t for t in (self.h, self.g) if t is not None]
            self.htil = torch.cat(parts, 1) if parts else self.y_flat.new_zeros(self.batch, 0)
        self.p = 0 if self.h is None else self.h.shape[1]
        self.q = 0 if self.g is None else self.g.shape[1]
        self.c = self.p + self.q

        # Without (nonlinear) constraints D_Y L = D_Y f: one backward with a graph serves both.
        self._grad_l: Tensor | None = None
        with torch.enable_grad():
            if self.c == 0 or self.linear:
                self._grad_l = self._grad_y(self.f.sum(), create_graph=True)
                self.gf = self._grad_l.detach()
            else:
                self.gf = self._grad_y(self.f.sum())
        if self.linear:
            self.A = node.constraint_matrix(self.batch, self.m).to(self.dtype)
        else:
            self.A = self._constraint_jacobian()
        self.active = self._active_set(solution)
        # Inactive rows are masked so that every sample keeps the same shape.
        self.A = self.A * self.active.unsqueeze(-1).to(self.dtype)
        self.multipliers = self._multipliers(solution)

    # -- evaluation helpers ------------------------------------------------------------------
    def _objective(self) -> Tensor:
        f = self.node.objective(*self.xs_d, y=self.y_in)
        return check_batched(self.node, "objective", f, self.batch, 1)

    def _constraints(self, name: str) -> Tensor:
        value = getattr(self.node, name)(*self.xs_d, y=self.y_in)
        return check_batched(self.node, name, value, self.batch, 2)

    def _grad_y(self, scalar: Tensor, create_graph: bool = False) -> Tensor:
        if not scalar.requires_grad:
            return torch.zeros_like(self.y_flat)
        (grad,) = torch.autograd.grad(
            scalar, self.y_flat, retain_graph=True, create_graph=create_graph, allow_unused=True
        )
        return torch.zeros_like(self.y_flat) if grad is None else grad

    def _constraint_jacobian(self) -> Tensor:
        """``A = D_Y h̃`` ``(B, c, m)`` by one vectorised backward over the ``c`` rows."""
        if self.c == 0 or not self.htil.requires_grad:
            return self.y_flat.new_zeros(self.batch, self.c, self.m)
        eye = torch.eye(self.c, dtype=self.dtype, device=self.y_flat.device)
        basis = eye.unsqueeze(1).expand(self.c, self.batch, self.c)
        (jac,) = torch.autograd.grad(
            self.htil, self.y_flat, basis, retain_graph=True, is_grads_batched=True,
            allow_unused=True,
        )
        if jac is None:
            return self.y_flat.new_zeros(self.batch, self.c, self.m)
        return jac.transpose(0, 1)

    def _active_set(self, solution: Any) -> Tensor:
        """``(B, c)`` mask: equalities always, inequalities where ``g ≥ −tol``."""
        active_eq = torch.ones(self.batch, self.p, dtype=torch.bool, device=self.y_flat.device)
        if self.q == 0:
            return active_eq
        given = getattr(solution, "active", None)
        if given is not None:
            if given.shape != (self.batch, self.q):
                raise ValueError(
                    f"{node_name(self.node)}: Solution.active must have shape "
                    f"({self.batch}, {self.q}), got {tuple(given.shape)}."
                )
            active_ineq = given.to(torch.bool)
        else:
            tol = self.config.active_tol
            tol = torch.finfo(self.dtype).eps ** 0.5 if tol is None else tol
            scale = self.y_flat.detach().abs().amax(-1, keepdim=True)
            grad_scale = self.A[:, self.p:].abs().amax(-1)
            active_ineq = self.g.detach() >= -tol * (1.0 + scale * grad_scale)
        return torch.cat([active_eq, active_ineq], 1)

    def _multipliers(self, solution: Any) -> Tensor:
        """λ ``(B, c)`` from the solver, or least squares ``λᵀA = D_Y f`` (eq. 25)."""
        if self.c == 0:
            return self.y_flat.new_zeros(self.batch, 0)
        given = getattr(solution, "multipliers", None)
        if given is not None:
            if given.shape != (self.batch, self.c):
                raise ValueError(
                    f"{node_name(self.node)}: Solution.multipliers must have shape "
                    f"({self.batch}, {self.c}) (equalities then inequalities), got "
                    f"{tuple(given.shape)}."
                )
            return given.detach().to(self.dtype) * self.active.to(self.dtype)
        if self.linear or not self.node.has_objective:
            # Linear constraints: λ enters neither H nor B. Feasibility problems: f ≡ 0.
            return self.y_flat.new_zeros(self.batch, self.c)
        A = self.A.detach()
        gram = A @ A.transpose(1, 2)
        gram = gram + torch.diag_embed((~self.active).to(self.dtype))
        rhs = A @ self.gf.detach().unsqueeze(-1)
        lam, _ = _linalg.solve_symmetric_pinv(gram, rhs, self.config.rcond)
        return lam.squeeze(-1) * self.active.to(self.dtype)

    # -- the Lagrangian ---------------------------------------------------------------------
    def lagrangian_gradient(self) -> Tensor:
        """``D_Y L(x, y, λ)`` ``(B, m)`` with a graph for second derivatives (λ fixed)."""
        if self._grad_l is not None:
            return self._grad_l
        with torch.enable_grad():
            if not self.htil.requires_grad:
                total = self.f.sum()
            else:
                total = self.f.sum() - (self.multipliers * self.htil).sum()
            return self._grad_y(total, create_graph=True)

    def residual(self) -> OptimalityResidual:
        """First-order optimality residuals at ``(x, y)``."""
        lam = self.multipliers
        stat = self.gf.detach() - (lam.unsqueeze(-1) * self.A.detach()).sum(1)
        zeros = self.y_flat.new_zeros(self.batch)
        eq = self.h.detach().norm(dim=-1) if self.p else zeros
        if self.q:
            ineq = self.g.detach().clamp_min(0).amax(-1)
            dual = (lam[:, self.p:] * self.active[:, self.p:]).clamp_min(0).amax(-1)
        else:
            ineq = dual = zeros
        return OptimalityResidual(stat.norm(dim=-1), eq, ineq, dual, lam)


# ---------------------------------------------------------------------------------------
# Solving the KKT system
# ---------------------------------------------------------------------------------------


def _hessian_dense(prob: _Problem, grad_l: Tensor) -> Tensor | None:
    """``H = D²_YY L`` ``(B, m, m)`` by one vectorised backward; None if vmap is unsupported."""
    if not grad_l.requires_grad:
        return grad_l.new_zeros(prob.batch, prob.m, prob.m)
    eye = torch.eye(prob.m, dtype=prob.dtype, device=grad_l.device)
    basis = eye.unsqueeze(1).expand(prob.m, prob.batch, prob.m)
    try:
        (rows,) = torch.autograd.grad(
            grad_l, prob.y_flat, basis, retain_graph=True, is_grads_batched=True,
            allow_unused=True,
        )
    except RuntimeError as err:  # an op without a batching rule
        warn(prob.node, f"batched Hessian-vector products are not supported by the objective "
             f"({err}); using the matrix-free solver instead.", stacklevel=5)
        return None
    if rows is None:
        return grad_l.new_zeros(prob.batch, prob.m, prob.m)
    H = rows.transpose(0, 1)
    return 0.5 * (H + H.transpose(1, 2))


def _kkt_matrix(prob: _Problem, H: Tensor) -> Tensor:
    A = prob.A.detach()
    D = torch.diag_embed((~prob.active).to(prob.dtype))
    top = torch.cat([H, A.transpose(1, 2)], 2)
    bottom = torch.cat([A, D], 2)
    return torch.cat([top, bottom], 1)


def _replace(x: Tensor, mask: Tensor, values: Tensor) -> Tensor:
    out = x.clone()
    out[mask] = values
    return out


def _pinv_fallback(prob: _Problem, K: Tensor, rhs: Tensor, x: Tensor, bad: Tensor,
                   reason: str) -> Tensor:
    """Re-solve the samples flagged ``bad`` by the pseudo-inverse, and say so."""
    if not bool(bad.any()):
        return x
    sol, truncated = _linalg.solve_symmetric_pinv(K[bad], rhs[bad], prob.config.rcond)
    n_sing = int(truncated.sum())
    if n_sing:
        what = ("the Hessian is singular (§4.7.4)" if prob.c == 0 else
                "the KKT matrix is singular: a singular Hessian or a non-regular point "
                "(dependent active constraints, §4.7.3)")
        warn(prob.node, f"{what} for {n_sing} of {prob.batch} samples; the gradient uses the "
             "pseudo-inverse (eq. 35), a descent direction rather than a unique derivative. "
             "Consider ImplicitBackward(damping=...) or a reformulation with a unique "
             "solution.", stacklevel=6)
    elif reason:
        warn(prob.node, f"{reason} for {int(bad.sum())} of {prob.batch} samples; re-solved "
             "them with a symmetric eigendecomposition.", stacklevel=6)
    return _replace(x, bad, sol)


def _solve_dense(prob: _Problem, H: Tensor, rhs: Tensor, method: str) -> Tensor:
    """Solve the KKT system densely; ``rhs`` ``(B, m + c, K)``. Returns ``w`` like ``rhs``."""
    cfg = prob.config
    if cfg.damping:
        H = H + cfg.damping * torch.eye(prob.m, dtype=prob.dtype, device=H.device)
    K = _kkt_matrix(prob, H) if prob.c else H
    if method == "lstsq":
        return _warn_truncated(prob, K, rhs)
    if method in ("cholesky", "auto"):
        w, ok = _solve_schur_cholesky(prob, H, rhs)
        if bool(ok.all()):
            ok = ok & _linalg.residual_ok(K, w, rhs)
            if bool(ok.all()):
                return w
        # Not positive definite (or failed the residual check): LU on the KKT matrix.
        bad = ~ok
        w_lu, ok_lu = _linalg.solve_lu(K[bad], rhs[bad], cfg.rcond)
        w = _replace(w, bad, w_lu)
        ok = ok.clone()
        ok[bad] = ok_lu
    else:  # "lu"
        w, ok = _linalg.solve_lu(K, rhs, cfg.rcond)
    ok = ok & _linalg.residual_ok(K, w, rhs)
    # A failure with a non-singular matrix is a broken LU, not a non-regular point; the
    # pseudo-inverse tells the two apart and warns about singular ones.
    return _pinv_fallback(prob, K, rhs, w, ~ok, "the LU solve failed its residual check")


def _warn_truncated(prob: _Problem, K: Tensor, rhs: Tensor) -> Tensor:
    sol, truncated = _linalg.solve_symmetric_pinv(K, rhs, prob.config.rcond)
    if bool(truncated.any()):
        warn(prob.node, f"the KKT matrix is singular for {int(truncated.sum())} of "
             f"{prob.batch} samples; the gradient uses the pseudo-inverse (eq. 35).",
             stacklevel=6)
    return sol


def _solve_schur_cholesky(prob: _Problem, H: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
    """Cholesky of ``H``, then of the Schur complement ``S = A H⁻¹ Aᵀ + D`` (constrained)."""
    m = prob.m
    if prob.c == 0:
        return _linalg.solve_cholesky(H, rhs, prob.config.rcond)
    A = prob.A.detach()
    D = torch.diag_embed((~prob.active).to(prob.dtype))
    v, z = rhs[:, :m], rhs[:, m:]
    # H⁻¹ [v, Aᵀ] in one factorisation.
    both, ok_h = _linalg.solve_cholesky(H, torch.cat([v, A.transpose(1, 2)], 2), prob.config.rcond)
    hv, hat = both[:, :, : v.shape[2]], both[:, :, v.shape[2]:]
    S = A @ hat + D
    S = 0.5 * (S + S.transpose(1, 2))
    # [H Aᵀ; A D] [w1; w2] = [v; z]:  S w2 = A H⁻¹ v − z,  w1 = H⁻¹ (v − Aᵀ w2).
    w2, ok_s = _linalg.solve_cholesky(S, A @ hv - z, prob.config.rcond)
    w1 = hv - hat @ w2
    return torch.cat([w1, w2], 1), ok_h & ok_s


def _solve_matrix_free(prob: _Problem, grad_l: Tensor, v: Tensor, method: str) -> Tensor:
    """Matrix-free CG / MINRES with Hessian-vector products; ``v`` ``(B, m)``."""
    cfg = prob.config
    m, c = prob.m, prob.c
    rtol = cfg.rtol if cfg.rtol is not None else max(torch.finfo(prob.dtype).eps ** 0.5, 1e-10)
    maxiter = cfg.maxiter if cfg.maxiter is not None else 2 * (m + c) + 10
    A = prob.A.detach()
    dvec = (~prob.active).to(prob.dtype)

    def hvp(u: Tensor) -> Tensor:
        if not grad_l.requires_grad:
            out = torch.zeros_like(u)
        else:
            (out,) = torch.autograd.grad(grad_l, prob.y_flat, u, retain_graph=True,
                                         allow_unused=True)
            out = torch.zeros_like(u) if out is None else out
        return out + cfg.damping * u if cfg.damping else out

    def kkt(u: Tensor) -> Tensor:
        u1, u2 = u[:, :m], u[:, m:]
        top = hvp(u1) + (A.transpose(1, 2) @ u2.unsqueeze(-1)).squeeze(-1)
        bottom = (A @ u1.unsqueeze(-1)).squeeze(-1) + dvec * u2
        return torch.cat([top, bottom], 1)

    if method == "cg":
        if c == 0:
            w, info = _linalg.conjugate_gradient(hvp, v, rtol, maxiter)
        else:
            w, info = _projected_cg(prob, hvp, v, rtol, maxiter)
        if not bool(info.negative_curvature.any()):
            _report_iterative(prob, "CG", info, rtol)
            return w
        warn(prob.node, "the (reduced) Hessian is not positive definite (CG met negative "
             "curvature); switching to MINRES.", stacklevel=5)
    rhs = torch.cat([v, v.new_zeros(prob.batch, c)], 1)
    w, info = _linalg.minres(kkt if c else hvp, rhs, rtol, maxiter)
    _report_iterative(prob, "MINRES", info, rtol)
    return w


def _projected_cg(prob: _Problem, hvp: Any, v: Tensor, rtol: float,
                  maxiter: int) -> tuple[Tensor, _linalg.IterativeInfo]:
    """CG on the null space of ``A`` for the KKT system (constrained, matrix-free).

    ``w₁ ∈ null(A)`` solves ``P H w₁ = P v`` with ``P = I − Aᵀ (AAᵀ)⁻¹ A``; then
    ``w₂ = (AAᵀ)⁻¹ A (v − H w₁)``. Converges where the reduced Hessian is positive
    definite, i.e. at a strict local minimum (second-order sufficient condition).
    """
    A = prob.A.detach()
    gram = A @ A.transpose(1, 2) + torch.diag_embed((~prob.active).to(prob.dtype))
    eye = torch.eye(prob.c, dtype=prob.dtype, device=A.device).expand_as(gram)
    gram_inv, ok = _linalg.solve_cholesky(gram, eye, prob.config.rcond)
    if not bool(ok.all()):
        gram_inv, _ = _linalg.solve_symmetric_pinv(gram, eye, prob.config.rcond)
        warn(prob.node, "the active constraint gradients are linearly dependent (a non-regular "
             "point, §4.7.3); using their pseudo-inverse.", stacklevel=6)

    def coefficients(u: Tensor) -> Tensor:  # (AAᵀ)⁻¹ A u, (B, c)
        return (gram_inv @ (A @ u.unsqueeze(-1))).squeeze(-1)

    def project(u: Tensor) -> Tensor:
        return u - (A.transpose(1, 2) @ coefficients(u).unsqueeze(-1)).squeeze(-1)

    w1, info = _linalg.conjugate_gradient(lambda u: project(hvp(project(u))), project(v),
                                          rtol, maxiter, scale=v.norm(dim=-1))
    w1 = project(w1)
    w2 = coefficients(v - hvp(w1))
    return torch.cat([w1, w2], 1), info


def _report_iterative(prob: _Problem, name: str, info: _linalg.IterativeInfo, rtol: float) -> None:
    bad = ~info.converged
    if bool(bad.any()):
        warn(prob.node, f"{name} did not reach rtol={rtol:.1e} within {info.iterations} "
             f"iterations for {int(bad.sum())} of {prob.batch} samples (worst relative residual "
             f"{float(info.residual.max()):.2e}); the gradient is approximate. Raise "
             "ImplicitBackward(maxiter=...), add damping, or use a dense solver.", stacklevel=6)


def _choose_method(prob: _Problem) -> str:
    method = prob.config.linear_solver
    if method == "auto":
        return "cholesky" if prob.m + prob.c <= prob.config.dense_max_size else "cg"
    return method


def _solve_kkt(prob: _Problem, grad_l: Tensor, v: Tensor, force_dense: bool = False) -> Tensor:
    """Solve for ``w = [w₁; w₂]``; ``v`` is ``(B, m)`` or ``(B, m, K)``."""
    method = _choose_method(prob)
    multi = v.dim() == 3
    if force_dense and method in ("cg", "minres"):
        method = "cholesky"
    if method in ("cholesky", "lu", "lstsq"):
        H = _hessian_dense(prob, grad_l)
        if H is not None:
            rhs = v if multi else v.unsqueeze(-1)
            rhs = torch.cat([rhs, rhs.new_zeros(prob.batch, prob.c, rhs.shape[2])], 1)
            w = _solve_dense(prob, H, rhs, method)
            return w if multi else w.squeeze(-1)
        method = "minres"
    if multi:
        cols = [_solve_matrix_free(prob, grad_l, v[..., k], method) for k in range(v.shape[2])]
        return torch.stack(cols, -1)
    return _solve_matrix_free(prob, grad_l, v, method)


# ---------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------


def _vjp(
    node: Any,
    xs: Sequence[Any],
    y: Tensor,
    grad_y: Tensor,
    solution: Any = None,
    params: Sequence[Tensor] = (),
    config: ImplicitBackward | None = None,
    need_grad: Sequence[bool] | None = None,
    force_dense: bool = False,
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Shared implementation of :func:`implicit_vjp` and :func:`jacobian`.

    ``grad_y`` is ``y``-shaped, or ``(K, *y.shape)`` for K right-hand sides at once.
    """
    config = config or getattr(node, "backward_mode", None) or ImplicitBackward()
    if not isinstance(config, ImplicitBackward):
        config = ImplicitBackward()
    prob = _Problem(node, xs, y, config, solution, need_grad)
    multi = grad_y.dim() == y.dim() + 1
    B, m = prob.batch, prob.m
    if multi:
        v = grad_y.detach().reshape(grad_y.shape[0], B, m).permute(1, 2, 0).to(prob.dtype)
    else:
        v = grad_y.detach().reshape(B, m).to(prob.dtype)

    targets = [x for x in prob.xs_d if isinstance(x, Tensor) and x.requires_grad]
    targets += list(params)
    x_grads: list[Tensor | None] = []
    if not targets:
        return [None] * len(xs), [None] * len(params)

    grad_l = prob.lagrangian_gradient()
    w = _solve_kkt(prob, grad_l, v, force_dense)
    w1, w2 = w[:, :m], w[:, m:]

    with torch.enable_grad():
        outputs, grads_out = [grad_l], [w1]
        if prob.c and not prob.linear and prob.htil.requires_grad:
            outputs.append(prob.htil)
            grads_out.append(w2)
        if multi:
            grads_out = [g.permute(2, 0, 1).contiguous() for g in grads_out]
        keep = [i for i, o in enumerate(outputs) if o.requires_grad]
        if keep:
            raw = torch.autograd.grad(
                [outputs[i] for i in keep], targets, [grads_out[i] for i in keep],
                allow_unused=True, is_grads_batched=multi,
            )
        else:
            raw = [None] * len(targets)
    raw = [None if g is None else -g for g in raw]
    it = iter(raw)
    for x in prob.xs_d:
        x_grads.append(next(it) if isinstance(x, Tensor) and x.requires_grad else None)
    p_grads = [next(it) for _ in params]
    return x_grads, p_grads


def implicit_vjp(
    node: Any,
    xs: Sequence[Any],
    y: Tensor,
    grad_y: Tensor,
    solution: Any = None,
    *,
    params: Sequence[Tensor] = (),
    backward: ImplicitBackward | None = None,
) -> tuple[Tensor | None, ...]:
    """Vector-Jacobian product ``grad_y · Dy(x)`` of a declarative node, by implicit
    differentiation (Propositions 4.4–4.6, evaluated left to right as in §6.1).

    Solves one KKT system per sample (batched) and makes one double-backward through the
    node's objective and constraints; never forms ``Dy`` or ``D²_XY f``.

    Args:
        node: a :class:`~declnet.DeclarativeNode` (or anything with ``objective`` and,
            for constrained problems, the constraint methods and ``has_*`` properties).
        xs: the node's inputs; tensors that require grad are differentiated.
        y: ``(B, ...)`` the solution for these inputs.
        grad_y: ``dJ/dy``, the same shape as ``y``.
        solution: the :class:`~declnet.Solution` returned by ``solve`` (for multipliers and
            active sets), if any.
        params: extra tensors (e.g. the node's parameters) to differentiate as well.
        backward: solver configuration; defaults to the node's ``backward_mode``.

    Returns:
        One gradient per input (``None`` for inputs that need none), followed by one per
        entry of ``params``.

    Raises:
        ValueError: the objective or constraints return tensors of the wrong shape.
    """
    if not isinstance(y, Tensor) or not isinstance(grad_y, Tensor):
        raise TypeError("implicit_vjp: y and grad_y must be tensors.")
    if grad_y.shape != y.shape:
        raise ValueError(
            f"implicit_vjp: grad_y must have the shape of y {tuple(y.shape)}, got "
            f"{tuple(grad_y.shape)}."
        )
    x_grads, p_grads = _vjp(node, xs, y, grad_y, solution, params, backward)
    return (*x_grads, *p_grads)


def jacobian(node: Any, xs: Sequence[Any]) -> Tensor | tuple[Tensor, ...]:
    """Full Jacobian ``Dy(x)`` of a node for small problems; see ``DeclarativeNode.jacobian``."""
    from ._function import solve_node

    solution = solve_node(node, xs)
    y = solution.y
    B = y.shape[0]
    m = y[0].numel()
    eye = torch.eye(m, dtype=y.dtype, device=y.device)
    grad_y = eye.unsqueeze(1).expand(m, B, m).reshape(m, *y.shape)
    need = [isinstance(x, Tensor) and x.is_floating_point() for x in xs]
    x_grads, _ = _vjp(node, xs, y, grad_y, solution, (), None, need, force_dense=True)
    out = []
    for x, g in zip(xs, x_grads):
        if not (isinstance(x, Tensor) and x.is_floating_point()):
            continue
        if g is None:
            g = torch.zeros(m, *x.shape, dtype=y.dtype, device=y.device)
        if x.dim() == 0:
            out.append(g.reshape(m, 1).expand(m, B).t().reshape(*y.shape))
            continue
        # g[k, b, ...] = ∂y_{b,k}/∂x_{b,...} (samples are independent).
        g = g.movedim(0, 1).reshape(B, *y.shape[1:], *x.shape[1:])
        out.append(g)
    return out[0] if len(out) == 1 else tuple(out)


def optimality_residual(node: Any, *xs: Any, y: Tensor | None = None,
                        solution: Any = None) -> OptimalityResidual:
    """First-order optimality residuals of ``y`` for the node's problem at ``xs``.

    Args:
        node: a declarative node.
        *xs: its inputs.
        y: ``(B, ...)`` a candidate solution; if None, the node's ``solve`` is called.
        solution: optional :class:`~declnet.Solution` (multipliers, active set).

    Returns:
        An :class:`~declnet.OptimalityResidual` of per-sample tensors.
    """
    if y is None:
        from ._function import solve_node

        solution = solve_node(node, xs)
        y = solution.y
    config = getattr(node, "backward_mode", None)
    if not isinstance(config, ImplicitBackward):
        config = ImplicitBackward()
    need = [False] * len(xs)
    return _Problem(node, xs, y, config, solution, need).residual()
