"""Backward modes: how a node is differentiated. Each mode carries its own ``apply``.

- :class:`ImplicitBackward` (the default): implicit differentiation of the optimality
  conditions, configured by the linear solver and its tolerances;
- :class:`UnrolledBackward`: back-propagation through the node's own ``solve``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _linalg
from ._backward import check_solution, vjp
from ._diagnostics import node_name
from ._function import DeclarativeFunction
from ._running import as_solution, batch_size

__all__ = ["ImplicitBackward", "UnrolledBackward"]

_LINEAR_SOLVERS = ("auto", "cholesky", "lu", "lstsq", "cg", "minres")


@dataclass(frozen=True)
class ImplicitBackward:
    """Implicit differentiation (Propositions 4.4–4.6) and its configuration.

    Args:
        linear_solver: how to solve the KKT system.

            - ``"auto"`` (default): chosen from the structure the node declares (see
              ``docs/concepts.md``): a declared Hessian with a cheap solve (diagonal, or a
              Cholesky factor from the forward pass) → the Schur complement ``A H⁻¹ Aᵀ``;
              a declared dense Hessian, or ``m + p + q ≤ dense_max_size`` → dense
              (``"cholesky"``); otherwise matrix-free ``"cg"``, which falls back to the
              dense solve if it does not converge and the dense system fits
              ``memory_budget``.
            - ``"cholesky"``: dense; equilibrated Cholesky of ``H`` and of the Schur
              complement; equilibrated LU of the whole KKT matrix where ``H`` is not
              positive definite.
            - ``"lu"``: dense equilibrated LU of the whole KKT matrix.
            - ``"lstsq"``: dense minimum-norm least squares (pseudo-inverse, eq. 35).
            - ``"cg"``: matrix-free conjugate gradients (Jacobi-preconditioned when the
              declared Hessian knows its diagonal); for constrained nodes projected onto
              the null space of the active constraint gradients (needs a positive definite
              reduced Hessian; falls back to MINRES on negative curvature).
            - ``"minres"``: matrix-free MINRES on the KKT system (any node).

            Dense solves run in float64 whatever the data's precision. Singularity is
            judged on equilibrated matrices, relative to the data's dtype; every dense solve
            is checked by its scaled residual. Dependent active constraints (§4.7.3) are
            dropped (multipliers fixed to 0); a system still singular after that is solved
            by the pseudo-inverse with a :class:`~declnet.DeclarativeWarning`.
        damping: ``γ ≥ 0`` added to the Hessian, ``H + γI`` (the proximal term of §4.7.4).
        dense_max_size: size limit ``m + p + q`` of the dense path under ``"auto"`` when no
            Hessian is declared (forming ``H`` costs ``m`` Hessian-vector products).
        rtol: relative residual target of the matrix-free solvers (default ``sqrt(eps)`` of
            the dtype, but at least ``1e-10``: ``1.5e-8`` in float64, ``3.5e-4`` in float32).
        maxiter: iteration limit of the matrix-free solvers (default ``2 (m + p + q) + 10``).
        rcond: relative eigenvalue cut-off of the pseudo-inverse, applied to the
            equilibrated matrix (default: ``2.2e-13`` for float64 data, ``4.8e-7`` for
            float32 and half precision; the same tolerance judges Cholesky and LU pivots).
        active_tol: an inequality is active where ``g_i ≥ −active_tol (1 + ‖y‖∞ ‖∇g_i‖∞)``
            (default ``sqrt(eps)`` of the dtype).
        memory_budget: bytes that forming a dense Hessian (in chunks of Hessian-vector
            products) and the dense fallback of the matrix-free path may use (default
            256 MiB).
    """

    linear_solver: str = "auto"
    damping: float = 0.0
    dense_max_size: int = 64
    rtol: float | None = None
    maxiter: int | None = None
    rcond: float | None = None
    active_tol: float | None = None
    memory_budget: int = 256 * 2**20

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
        if self.memory_budget <= 0:
            raise ValueError(
                f"ImplicitBackward: memory_budget must be a positive number of bytes, got "
                f"{self.memory_budget!r}."
            )
        for name in ("rtol", "rcond", "active_tol"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"ImplicitBackward: {name} must be > 0 or None, got {value!r}.")

    def rtol_for(self, dtype: torch.dtype) -> float:
        """The matrix-free residual target for data of ``dtype``."""
        if self.rtol is not None:
            return self.rtol
        return max(_linalg.working_eps(dtype) ** 0.5, 1e-10)

    def rcond_for(self, dtype: torch.dtype) -> float:
        """The pseudo-inverse cut-off for data of ``dtype``."""
        return self.rcond if self.rcond is not None else _linalg.default_rcond(dtype)

    def apply(self, node: Any, xs: Sequence[Any]) -> Tensor:
        """Solve and return ``y``, differentiable by implicit differentiation."""
        return DeclarativeFunction.apply(node, *xs)

    def vjp(self, node: Any, xs: Sequence[Any], y: Tensor, grad_y: Tensor, *,
            solution: Any = None, params: Sequence[Tensor] = (),
            need_grad: Sequence[bool] | None = None, force_dense: bool = False,
            create_graph: bool = False) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """``grad_y · Dy`` for the inputs and ``params`` (see :func:`~declnet.implicit_vjp`)."""
        return vjp(node, xs, y, grad_y, options=self, solution=solution, params=params,
                   need_grad=need_grad, force_dense=force_dense, create_graph=create_graph)

    def check(self, node: Any, xs: Sequence[Any], solution: Any) -> None:
        """Warn when ``solution`` is not optimal (``check_optimality=True``)."""
        check_solution(node, xs, solution, self)


@dataclass(frozen=True)
class UnrolledBackward:
    """Back-propagate through the node's own ``solve`` with autograd.

    ``solve`` is then run with gradients enabled, so it must be written with
    differentiable PyTorch operations (and it costs the memory of every iteration).
    Useful to compare against the implicit gradient, and for solvers that stop early on
    purpose. ``check_optimality`` applies as with the implicit backward.
    """

    def apply(self, node: Any, xs: Sequence[Any]) -> Tensor:
        """Run ``solve`` with autograd enabled and return its (differentiable) ``y``."""
        batch = batch_size(node, xs)
        with torch.enable_grad():
            sol = as_solution(node, node.solve(*xs), batch)
        if getattr(node, "check_optimality", False):
            detached = sol.__class__(sol.y.detach(), sol.multipliers, sol.active, sol.hessian,
                                     sol.info)
            ImplicitBackward().check(node, xs, detached)
        return sol.y


def check_mode(node: Any) -> Any:
    """The node's backward mode, checked."""
    mode = getattr(node, "backward_mode", None)
    if not isinstance(mode, (ImplicitBackward, UnrolledBackward)):
        raise TypeError(
            f"{node_name(node)}: backward must be declnet.ImplicitBackward(...) or "
            f"declnet.UnrolledBackward(), got {type(mode).__name__}."
        )
    return mode
