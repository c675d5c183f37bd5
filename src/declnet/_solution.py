"""What a node's ``solve`` returns: the solution and what the solver knows about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["Solution"]


@dataclass
class Solution:
    """What a node's ``solve`` (or a built-in solver) may return instead of a bare tensor.

    Attributes:
        y: ``(B, ...)`` the solution, one per sample.
        multipliers: optional ``(B, p + q)`` Lagrange multipliers, equality constraints
            first, then inequality constraints, in the paper's sign convention
            ``D_Y f(x, y) = λᵀ D_Y h̃(x, y)`` with ``L = f − λᵀ h̃`` (so multipliers of
            active inequalities ``g ≤ 0`` are ``≤ 0``, and those of inactive ones 0).
            When absent the engine recovers them by least squares (eq. 25).
        active: optional ``(B, q)`` boolean mask of active inequality constraints; when
            absent it is detected from ``g(x, y) ≥ −tol``.
        hessian: optional Hessian of the Lagrangian ``D²_YY L`` at ``y`` (with these
            multipliers): a dense ``(B, m, m)`` tensor or a :class:`~declnet.LinearOperator`
            (for example one that reuses a factorisation from the forward pass). When given,
            the backward pass uses it instead of forming ``H`` by automatic differentiation.
        info: free-form solver information (``converged``, ``iterations``, residuals, ...),
            kept for the user.
    """

    y: Tensor
    multipliers: Tensor | None = None
    active: Tensor | None = None
    hessian: Any = None
    info: dict[str, Any] = field(default_factory=dict)
