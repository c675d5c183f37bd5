"""Built-in batched forward solvers for declarative nodes.

Every solver is called as ``solver(node, *xs, y0=None) -> Solution``: it runs all samples at
once under ``torch.no_grad()``, freezes the samples that have converged, starts from ``y0``
or ``node.initial_guess(*xs)``, evaluates the node's objective and constraints (or
equations) with automatic differentiation, and returns a :class:`~declnet.Solution` with
``info["converged"]``, ``info["iterations"]`` and ``info["residual"]`` per sample. Samples
that do not converge produce a :class:`~declnet.DeclarativeWarning` naming the count and the
worst residual, or a :class:`ConvergenceError` with ``strict=True``.

- :class:`Newton` — unconstrained, dense modified Newton with a line search (and Newton's
  method for root-finding nodes);
- :class:`LBFGS` — unconstrained, matrix-free, for large outputs;
- :class:`SQP` — equality constrained, Newton on the KKT system;
- :class:`InteriorPoint` — inequality (and equality) constrained, primal-dual interior point;
- :class:`Broyden` — square nonlinear systems ``F(x, y) = 0``;
- :class:`Anderson` — fixed points ``y = G(x, y)``.

:func:`default_solver` picks one from the node's kind and size.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ._common import ConvergenceError, Solver, default_tol
from ._interior_point import SQP, InteriorPoint
from ._newton import LBFGS, Newton, modified_newton_step
from ._roots import Anderson, Broyden

__all__ = [
    "LBFGS",
    "SQP",
    "Anderson",
    "Broyden",
    "ConvergenceError",
    "InteriorPoint",
    "Newton",
    "Solver",
    "default_solver",
    "default_tol",
    "modified_newton_step",
]

#: Above this many output elements per sample, unconstrained nodes default to L-BFGS and
#: root-finding nodes to Broyden (dense ``m × m`` Hessians or Jacobians get expensive).
DENSE_LIMIT = 256


def default_solver(node: Any, *xs: Any, y0: Tensor | None = None, strict: bool = False
                   ) -> Solver:
    """The built-in solver for a node without ``solve()``, from its kind and size.

    - fixed-point node (``fixed_point_map``): :class:`Anderson`;
    - root-finding node (``equations``): :class:`Newton` for ``m ≤ 256``, else :class:`Broyden`;
    - inequality constraints: :class:`InteriorPoint`;
    - equality constraints only: :class:`SQP`;
    - unconstrained: :class:`Newton` for ``m ≤ 256``, else :class:`LBFGS`.

    Args:
        node: the node.
        *xs: its inputs (used only to find the output size from ``y0`` or
            ``node.initial_guess(*xs)``).
        y0: optional start.
        strict: passed to the solver.

    Returns:
        A solver; call it as ``solver(node, *xs, y0=y0)``.
    """
    if callable(getattr(node, "fixed_point_map", None)):
        return Anderson(strict=strict)
    if getattr(node, "has_inequality_constraints", False):
        return InteriorPoint(strict=strict)
    if getattr(node, "has_equality_constraints", False):
        return SQP(strict=strict)
    start = Newton().start(node, xs, y0)
    m = start[0].numel()
    if callable(getattr(node, "equations", None)):
        return Newton(strict=strict) if m <= DENSE_LIMIT else Broyden(strict=strict)
    return Newton(strict=strict) if m <= DENSE_LIMIT else LBFGS(strict=strict)
