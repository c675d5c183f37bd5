"""A node's problem evaluated at ``(x, y)``: objective, constraints, their derivatives,
the active set, the multipliers and the Hessian of the Lagrangian.

This is what the backward pass (``_kkt``, ``_implicit``) and the optimality checks work
on. Everything is batched: ``y`` is flattened to ``(B, m)``, constraints are ``(B, c)``
with ``c = p + q`` (equalities first), and ``A = D_Y h̃`` is ``(B, c, m)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _linalg
from ._diagnostics import OptimalityResidual, check_batched, node_name
from ._operators import LinearOperator, as_operator
from ._sparse_jacobian import SparsePattern, pattern_of

__all__ = ["Problem"]


def _has_linear_constraints(node: Any) -> bool:
    """True only for nodes whose class declares fixed linear constraints ``A y = d``."""
    return getattr(type(node), "_linear_constraints", False) is True


class Problem:
    """The objective, constraints and their first derivatives at ``(x, y)`` for a batch.

    Holds leaves ``xs_d`` (detached copies of the inputs; those that need gradients
    require grad) and ``y_flat`` ``(B, m)`` requiring grad, and evaluates

    - ``f`` ``(B,)``, ``h̃ = [h; g]`` ``(B, c)`` with graphs,
    - ``gf = D_Y f`` ``(B, m)`` and ``A = D_Y h̃`` ``(B, c, m)`` (no graph kept),
    - the active mask ``(B, c)`` and multipliers λ ``(B, c)`` (masked to the active set).

    Args:
        node: the declarative node.
        xs: its inputs.
        y: ``(B, ...)`` the solution.
        options: an :class:`~declnet.ImplicitBackward` (tolerances, damping).
        solution: the :class:`~declnet.Solution` from ``solve`` (multipliers, active set,
            Hessian), if any.
        need_grad: which inputs are differentiated (default: those requiring grad).
    """

    def __init__(
        self,
        node: Any,
        xs: Sequence[Any],
        y: Tensor,
        options: Any,
        solution: Any = None,
        need_grad: Sequence[bool] | None = None,
        attach: bool = False,
        params: Sequence[Tensor] = (),
    ) -> None:
        self.node = node
        # attach: y is attached to x through the node (double backward); every derivative
        # then keeps its graph, and inputs and parameters are aliased so that derivatives
        # "with y fixed" stay partial ones.
        self.graph = bool(attach)
        self.options = options
        self.solution = solution
        self.batch = y.shape[0]
        self.y_shape = y.shape
        self.m = math.prod(y.shape[1:])
        self.dtype = y.dtype
        self.device = y.device
        if need_grad is None:
            need_grad = [isinstance(x, Tensor) and x.requires_grad for x in xs]
        if self.graph:
            with torch.enable_grad():
                self.xs_d = [
                    (x.clone() if ng else x.detach()) if isinstance(x, Tensor) else x
                    for x, ng in zip(xs, need_grad)
                ]
                self.params = [p.clone() for p in params]
                self.y_flat = y.reshape(self.batch, self.m).clone()
        else:
            self.xs_d = [
                x.detach().requires_grad_(bool(ng)) if isinstance(x, Tensor) else x
                for x, ng in zip(xs, need_grad)
            ]
            self.params = list(params)
            self.y_flat = y.detach().reshape(self.batch, self.m).clone().requires_grad_(True)
        self._param_names = self._names_of(params) if self.graph else {}
        with torch.enable_grad():
            self.y_in = self.y_flat.view(self.y_shape)
        self.linear = _has_linear_constraints(node)

        with torch.enable_grad(), self._evaluating():
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
        # With them, D_Y f is formed on first use (multipliers from the solver, the common
        # case, do not need it).
        self._grad_l: Tensor | None = None
        self._gf: Tensor | None = None
        self._given_multipliers = self._check_given_multipliers(solution)
        # One nonlinear constraint and multipliers by eq. 25 (which needs D_Y f and A): both
        # are formed with their graphs, and D_Y L = D_Y f − λ A is composed from them
        # instead of by one more backward pass.
        self._compose = (self.c == 1 and not self.linear and not self.graph
                         and self._given_multipliers is None and node.has_objective)
        self._gf_graph: Tensor | None = None
        self._A_graph: Tensor | None = None
        if self.c == 0 or self.linear:
            with torch.enable_grad():
                self._grad_l = self._grad_y(self.f.sum(), create_graph=True)
            self._gf = self._grad_l if self.graph else self._grad_l.detach()
        # A = D_Y h̃ is formed on first use: the matrix-free Schur path never needs it.
        self._A_full: Tensor | None = None
        self._A_sparse: Tensor | None = None  # a declared sparse A (COO; repeats add up)
        self._sparse_pattern: SparsePattern | None = None
        if self.linear:
            self._A_full = node.constraint_matrix(self.batch, self.m).to(self.dtype)
        else:
            declared = self._declared_constraint_jacobian()
            if declared is not None and declared.is_sparse:
                self._A_sparse = declared
            else:
                self._A_full = declared
        self.active = self._active_set(solution)
        self.dropped = torch.zeros_like(self.active)
        self._apply_mask()
        self._multipliers: Tensor | None = None
        self._jvp_graph: tuple[Tensor, Tensor] | None = None

    @property
    def gf(self) -> Tensor:
        """``D_Y f`` ``(B, m)`` (with its graph in graph mode; formed on first use)."""
        if self._gf is None:
            with torch.enable_grad():
                if self._compose:
                    self._gf_graph = self._grad_y(self.f.sum(), create_graph=True)
                    self._gf = self._gf_graph.detach()
                else:
                    self._gf = self._grad_y(self.f.sum(), create_graph=self.graph)
        return self._gf

    # -- evaluation helpers ------------------------------------------------------------------
    def _names_of(self, params: Sequence[Tensor]) -> dict[str, Tensor]:
        """Map the node's parameter names to the aliases used while evaluating."""
        lookup = {id(p): name for name, p in self.node.named_parameters()}
        return {lookup[id(p)]: alias for p, alias in zip(params, self.params)
                if id(p) in lookup}

    def _evaluating(self) -> Any:
        """Evaluate the node with its parameters replaced by their aliases (graph mode)."""
        if not self._param_names:
            return contextlib.nullcontext()
        from torch.nn.utils.stateless import _reparametrize_module

        return _reparametrize_module(self.node, self._param_names)

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
        if self.c == 1:  # one row: a plain backward, no batching over rows
            with torch.enable_grad():
                (jac,) = torch.autograd.grad(
                    self.htil, self.y_flat, torch.ones_like(self.htil), retain_graph=True,
                    allow_unused=True, create_graph=self.graph or self._compose,
                )
                if jac is None:
                    return self.y_flat.new_zeros(self.batch, 1, self.m)
                jac = jac.unsqueeze(1)  # (under enable_grad: keeps its graph)
            if self._compose:
                self._A_graph = jac
                return jac.detach()
            return jac
        eye = torch.eye(self.c, dtype=self.dtype, device=self.device)
        basis = eye.unsqueeze(1).expand(self.c, self.batch, self.c)
        (jac,) = torch.autograd.grad(
            self.htil, self.y_flat, basis, retain_graph=True, is_grads_batched=True,
            allow_unused=True, create_graph=self.graph,
        )
        if jac is None:
            return self.y_flat.new_zeros(self.batch, self.c, self.m)
        return jac.transpose(0, 1)

    def _declared_constraint_jacobian(self) -> Tensor | None:
        """``A`` from the node's optional ``constraint_jacobian(*xs, y)`` (``(B, p + q, m)``,
        equalities first), which saves ``p + q`` vectorised backward passes; None when the
        node declares none (or in graph mode, where ``A`` must be differentiable)."""
        method = getattr(self.node, "constraint_jacobian", None)
        if self.c == 0 or self.graph or method is None or not callable(method):
            return None
        xs = [x.detach() if isinstance(x, Tensor) else x for x in self.xs_d]
        with torch.no_grad():
            value = method(*xs, y=self.y_in.detach())
        if value is None:
            return None
        expected = (self.batch, self.c, self.m)
        if not isinstance(value, Tensor) or tuple(value.shape) != expected:
            raise ValueError(
                f"{node_name(self.node)}.constraint_jacobian must return a tensor of shape "
                f"{expected} (B, p + q, m: equality rows first, then inequality rows, y "
                f"flattened), dense or sparse, got "
                f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}."
            )
        if value.layout != torch.strided:
            if value.layout != torch.sparse_coo:
                raise ValueError(
                    f"{node_name(self.node)}.constraint_jacobian returned a {value.layout} "
                    "tensor; a sparse constraint Jacobian must be a sparse COO tensor "
                    "(torch.sparse_coo_tensor, or .to_sparse() of a dense one)."
                )
            if value.sparse_dim() != 3:
                raise ValueError(
                    f"{node_name(self.node)}.constraint_jacobian: a sparse constraint "
                    f"Jacobian must be sparse in all 3 dimensions (B, p + q, m), got "
                    f"sparse_dim() = {value.sparse_dim()}."
                )
            # Not coalesced: repeated entries add up in every product used below.
            return value.to(device=self.device, dtype=self.dtype)
        return value.to(device=self.device, dtype=self.dtype)

    def _active_set(self, solution: Any) -> Tensor:
        """``(B, c)`` mask: equalities always, inequalities where ``g ≥ −tol``."""
        active_eq = torch.ones(self.batch, self.p, dtype=torch.bool, device=self.device)
        if self.q == 0:
            return active_eq
        given = getattr(solution, "active", None)
        if given is not None:
            if not isinstance(given, Tensor) or given.shape != (self.batch, self.q):
                raise ValueError(
                    f"{node_name(self.node)}: Solution.active must be a ({self.batch}, "
                    f"{self.q}) boolean tensor, got "
                    f"{tuple(given.shape) if isinstance(given, Tensor) else type(given).__name__}."
                )
            active_ineq = given.to(device=self.device, dtype=torch.bool)
        else:
            tol = self.options.active_tol
            tol = _linalg.working_eps(self.dtype) ** 0.5 if tol is None else tol
            scale = self.y_flat.detach().abs().amax(-1, keepdim=True)
            grad_scale = self.A_full[:, self.p:].abs().amax(-1)
            active_ineq = self.g.detach() >= -tol * (1.0 + scale * grad_scale)
        return torch.cat([active_eq, active_ineq], 1)

    def _apply_mask(self) -> None:
        """Rows that are inactive (or dropped as dependent) are zeroed, so that every sample
        keeps the same shape; the KKT matrix has a 1 on their diagonal instead."""
        self.used = self.active & ~self.dropped
        self.all_used = bool(self.used.all())
        self._A: Tensor | None = None
        self._inactive = (~self.used).to(self.dtype)

    @property
    def A_full(self) -> Tensor:
        """``A = D_Y h̃`` ``(B, c, m)`` of every constraint row (formed on first use)."""
        if self._A_full is None:
            self._A_full = (self._constraint_jacobian() if self._A_sparse is None
                            else self._A_sparse.to_dense())
        return self._A_full

    @property
    def sparse_A(self) -> bool:
        """Whether the node declared a sparse ``A`` (and it is not formed densely)."""
        return self._A_sparse is not None and self._A_full is None

    @property
    def sparse_pattern(self) -> SparsePattern:
        """The index arithmetic of the declared sparse ``A`` (reused across calls)."""
        if self._sparse_pattern is None:
            self._sparse_pattern = pattern_of(self.node, self._A_sparse)
        return self._sparse_pattern

    def _sparse_values(self) -> Tensor:
        """The declared sparse ``A``'s entries ``(nnz,)``, those of unused rows 0."""
        a = self._A_sparse._values()
        if not self.all_used:
            a = a * self.used.reshape(-1)[self.sparse_pattern.row].to(a.dtype)
        return a

    def sparse_schur(self, d: Tensor) -> Tensor | None:
        """``S = A diag(d)⁻¹ Aᵀ`` ``(B, c, c)`` from a declared sparse ``A`` in
        ``O(nnz · k)`` (``k``: the most entries in one column of ``A``), ``d`` ``(B, m)``;
        None when a column holds too many entries (then S is formed otherwise)."""
        return self.sparse_pattern.schur(self._sparse_values(), d)

    def sparse_scaled_schur(self, d: Tensor) -> tuple[Tensor, Tensor] | None:
        """:meth:`sparse_schur` equilibrated: ``(diag(s) S diag(s), s)`` (see
        :meth:`~declnet._sparse_jacobian.SparsePattern.scaled_schur`)."""
        return self.sparse_pattern.scaled_schur(self._sparse_values(), d)

    @property
    def A_formed(self) -> bool:
        """Whether ``A`` is at hand (declared, fixed, or already formed)."""
        return self._A_full is not None

    @property
    def A(self) -> Tensor:
        """``A`` with the rows of unused constraints zeroed ``(B, c, m)``."""
        if self._A is None:
            A = self.A_full
            self._A = A if self.all_used else A * self.used.unsqueeze(-1).to(self.dtype)
        return self._A

    def _check_given_multipliers(self, solution: Any) -> Tensor | None:
        given = getattr(solution, "multipliers", None)
        if given is None or self.c == 0:
            return None
        if not isinstance(given, Tensor) or given.shape != (self.batch, self.c):
            raise ValueError(
                f"{node_name(self.node)}: Solution.multipliers must have shape "
                f"({self.batch}, {self.c}) (equalities then inequalities), got "
                f"{tuple(given.shape) if isinstance(given, Tensor) else type(given).__name__}."
            )
        return given.detach().to(device=self.device, dtype=self.dtype)

    # -- multipliers ------------------------------------------------------------------------
    @property
    def inactive_diagonal(self) -> Tensor:
        """``(B, c)`` 1 where a row is not used (inactive or dropped), else 0."""
        return self._inactive

    @property
    def multipliers(self) -> Tensor:
        """λ ``(B, c)`` from the solver, or least squares ``λᵀA = D_Y f`` (eq. 25).

        Zero for rows that are not used. Computed on first use: fixed linear constraints
        need them only for optimality checks.
        """
        if self._multipliers is None:
            self._multipliers = self._compute_multipliers()
        return self._multipliers

    def _compute_multipliers(self) -> Tensor:
        if self.c == 0:
            return self.y_flat.new_zeros(self.batch, 0)
        used = self.used.to(self.dtype)
        if (self._given_multipliers is not None and not bool(self.dropped.any())
                and not self.graph):
            return self._given_multipliers * used
        if not self.node.has_objective:
            return self.y_flat.new_zeros(self.batch, self.c)  # feasibility problems: f ≡ 0
        cd = _linalg.compute_dtype(self.dtype)
        # In graph mode λ(x) = eq. 25 is differentiated too (the solver's λ is a constant).
        A = (self.A if self.graph else self.A.detach()).to(cd)
        gf = self.gf if self.graph else self.gf.detach()
        gram = A @ A.transpose(1, 2) + torch.diag_embed(self.inactive_diagonal.to(cd))
        rhs = A @ gf.to(cd).unsqueeze(-1)
        lam, ok = _linalg.solve_cholesky(gram, rhs, _linalg.singular_tol(self.dtype))
        if not bool(ok.all()):
            bad = ~ok
            pinv, _ = _linalg.solve_symmetric_pinv(gram[bad], rhs[bad],
                                                   self.options.rcond_for(self.dtype))
            lam = lam.clone()
            lam[bad] = pinv
        return lam.squeeze(-1).to(self.dtype) * used

    # -- the Lagrangian ---------------------------------------------------------------------
    def lagrangian_gradient(self) -> Tensor:
        """``D_Y L(x, y, λ)`` ``(B, m)`` with a graph for second derivatives (λ fixed)."""
        if self._grad_l is not None:
            return self._grad_l
        if self._compose:
            _ = (self.gf, self.A_full)  # formed with their graphs
            if self._gf_graph is not None and self._A_graph is not None:
                with torch.enable_grad():
                    self._grad_l = self._gf_graph - self.multipliers * self._A_graph[:, 0]
                return self._grad_l
        with torch.enable_grad(), self._evaluating():
            if not self.htil.requires_grad:
                total = self.f.sum()
            else:
                total = self.f.sum() - (self.multipliers * self.htil).sum()
            self._grad_l = self._grad_y(total, create_graph=True)
        return self._grad_l

    def declared_hessian(self) -> LinearOperator | None:
        """The Hessian of the Lagrangian the node or its solver declared, if any.

        ``Solution.hessian`` wins over the node's ``hessian(*xs, y, multipliers)`` method
        (which may return None to declare nothing);
        the multipliers passed are the ones the backward uses (Solution's convention).
        After dependent constraints were dropped, a Hessian from the solver (computed with
        its own multipliers) no longer applies and the node's method, if any, is asked.
        """
        if self.graph:
            return None  # double backward: H must be differentiable, so autograd forms it
        given = getattr(self.solution, "hessian", None)
        if given is not None and not bool(self.dropped.any()):
            return as_operator(given, self.batch, self.m,
                               f"{node_name(self.node)}: Solution.hessian")
        method = getattr(self.node, "hessian", None)
        if method is None or not callable(method):
            return None
        xs = [x.detach() if isinstance(x, Tensor) else x for x in self.xs_d]
        with torch.no_grad():
            value = method(*xs, y=self.y_in.detach(), multipliers=self.multipliers)
        if value is None:  # the node declines: nothing is declared for these inputs
            return None
        return as_operator(value, self.batch, self.m, f"{node_name(self.node)}.hessian")

    def hvp(self, u: Tensor) -> Tensor:
        """``H u`` by automatic differentiation, ``u`` ``(B, m)``."""
        grad_l = self.lagrangian_gradient()
        if not grad_l.requires_grad:
            return torch.zeros_like(u)
        (out,) = torch.autograd.grad(grad_l, self.y_flat, u, retain_graph=True,
                                     allow_unused=True, create_graph=self.graph)
        return torch.zeros_like(u) if out is None else out

    def hessian_columns(self, columns: Tensor) -> Tensor | None:
        """``H E`` for a batch of directions ``columns`` ``(K, B, m)`` -> ``(K, B, m)``, by one
        vectorised backward; None where the objective has an op without a batching rule."""
        grad_l = self.lagrangian_gradient()
        if not grad_l.requires_grad:
            return torch.zeros_like(columns)
        try:
            (rows,) = torch.autograd.grad(grad_l, self.y_flat, columns, retain_graph=True,
                                          is_grads_batched=True, allow_unused=True,
                                          create_graph=self.graph)
        except RuntimeError:  # an op without a batching rule: no batched HVPs
            return None
        return torch.zeros_like(columns) if rows is None else rows

    def sparse_product(self, X: Tensor, transpose: bool = False) -> Tensor:
        """``A X`` (``X`` ``(B, m, K)`` -> ``(B, c, K)``) or, with ``transpose``, ``Aᵀ X``
        (``(B, c, K)`` -> ``(B, m, K)``) with the declared sparse ``A``: ``O(K nnz)``."""
        return self.sparse_pattern.product(self._sparse_values(), X, transpose)

    def _sparse_product(self, X: Tensor, transpose: bool) -> Tensor:
        """:meth:`sparse_product` for ``K`` directions first: ``(K, B, ·)``."""
        return self.sparse_product(X.permute(1, 2, 0), transpose).permute(2, 0, 1)

    def constraint_jvp(self, Z: Tensor) -> Tensor:
        """``A zₖ`` for ``K`` directions ``Z`` ``(K, B, m)`` -> ``(K, B, c)`` (used rows only).

        By Jacobian-vector products through the constraints (the double-backward trick),
        so the cost is ``K`` passes through ``h̃`` rather than a dense ``c × m`` product:
        for constraints such as a transport plan's marginals that is ``O(K m)`` instead of
        ``O(K c m)``. Fixed linear constraints use their matrix.
        """
        if self.sparse_A:
            return self._sparse_product(Z, transpose=False)
        if self.linear or not self.htil.requires_grad:
            return (self.A.unsqueeze(0) @ Z.unsqueeze(-1)).squeeze(-1)
        if self._jvp_graph is None:  # g(u) = Aᵀu with its graph, built once
            with torch.enable_grad():
                u = torch.zeros(self.batch, self.c, dtype=self.dtype, device=self.device,
                                requires_grad=True)
                (g,) = torch.autograd.grad(self.htil, self.y_flat, u, retain_graph=True,
                                           create_graph=True)
            self._jvp_graph = (u, g)
        u, g = self._jvp_graph
        (out,) = torch.autograd.grad(g, u, Z, is_grads_batched=True, allow_unused=True,
                                     retain_graph=True)
        if out is None:
            return Z.new_zeros(Z.shape[0], self.batch, self.c)
        return out if self.all_used else out * self.used.to(self.dtype)

    def constraint_vjp(self, W: Tensor) -> Tensor:
        """``Aᵀ wₖ`` for ``K`` row weights ``W`` ``(K, B, c)`` -> ``(K, B, m)`` (used rows only).

        One vectorised backward through the constraints when ``A`` has not been formed,
        else a product with it.
        """
        if self.sparse_A:
            return self._sparse_product(W, transpose=True)
        if self.A_formed or not self.htil.requires_grad:
            return (W.unsqueeze(-2) @ self.A_solve.unsqueeze(0)).squeeze(-2)
        if not self.all_used:
            W = W * self.used.to(W.dtype)
        (out,) = torch.autograd.grad(self.htil, self.y_flat, W.to(self.dtype),
                                     retain_graph=True, is_grads_batched=True,
                                     allow_unused=True)
        return W.new_zeros(W.shape[0], self.batch, self.m) if out is None else out

    def constraint_second_difference(self, direction: Tensor) -> Tensor:
        """``d²/ds² h̃(x, y + s t)`` at ``s = 0`` by a central second difference, ``(B, c)``.

        Only used to rank dependent constraints by their curvature along the direction
        the solution moves (§4.7.3), where a few digits suffice.
        """
        step = _linalg.working_eps(self.dtype) ** 0.25
        scale = 1.0 + self.y_flat.detach().abs().amax(-1, keepdim=True)
        t = direction * step * scale
        xs = [x.detach() if isinstance(x, Tensor) else x for x in self.xs_d]
        with torch.no_grad(), self._evaluating():
            vals = []
            for sign in (1.0, -1.0):
                y = (self.y_flat.detach() + sign * t).view(self.y_shape)
                parts = []
                if self.h is not None:
                    parts.append(self.node.equality_constraints(*xs, y=y))
                if self.g is not None:
                    parts.append(self.node.inequality_constraints(*xs, y=y))
                vals.append(torch.cat(parts, 1))
            return (vals[0] - 2 * self.htil.detach() + vals[1]) / (step * scale) ** 2

    def drop_rows(self, drop: Tensor) -> None:
        """Remove dependent active constraints ``drop`` ``(B, c)`` (§4.7.3): their rows are
        masked and their multipliers fixed to zero; the others' are recomputed."""
        self.dropped = self.dropped | drop
        self._apply_mask()
        self._multipliers = None
        if not self.linear:
            self._grad_l = None

    @property
    def A_solve(self) -> Tensor:
        """``A`` as the linear solves use it: with its graph in graph mode, else detached."""
        return self.A if self.graph else self.A.detach()

    # -- checks -----------------------------------------------------------------------------
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
