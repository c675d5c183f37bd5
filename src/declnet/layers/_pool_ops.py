"""The robust pooling solvers as one opaque custom operator, for ``torch.compile``.

The solvers of :mod:`declnet.layers._pool_solvers` iterate until each row has converged,
set converged rows aside and fix up rare rows: data-dependent control flow that
``torch.compile(fullgraph=True)`` cannot trace. Wrapped as the custom operator
``declnet::robust_pool_solve`` (``torch.library.custom_op``) they are a single node of the
compiled graph, run eagerly (with every check of the eager path) when the graph runs; the
registered fake implementation gives the output shapes to the tracer. The closed-form
backward stays traceable (:mod:`declnet.layers._pool_backward`). The vector pooling solver
of a built-in penalty is wrapped likewise, as ``declnet::robust_vector_pool_solve``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _pool_solvers as pool_solvers
from . import _vector_pool_solvers as vector_solvers
from .penalties import Huber, Penalty, PseudoHuber, TruncatedQuadratic, Welsch

__all__ = ["has_op", "solve", "vector_solve"]

_CLASSES: dict[str, type[Penalty]] = {
    cls.__name__: cls for cls in (PseudoHuber, Huber, Welsch, TruncatedQuadratic)
}
# Number of (M, 1) tensors each solver saves for its backward.
_SAVED = {"TruncatedQuadratic": 3}


def has_op(pen: Penalty) -> bool:
    """Whether ``pen`` is a built-in penalty (not a subclass) whose solvers have an operator."""
    return type(pen) in _CLASSES.values()


@torch.library.custom_op("declnet::robust_pool_solve", mutates_args=())
def _solve_op(x: Tensor, alpha: Tensor, penalty: str) -> tuple[Tensor, Tensor]:
    """``y (M, 1)`` and the solver's saved tensors packed as ``(M, k)``."""
    pen = _CLASSES[penalty]()  # the solvers read α from ``alpha``, not from the penalty
    y, saved = pool_solvers.solve_rows(pool_solvers.rule_for(pen), pen, x, alpha)
    packed = torch.cat(saved, -1) if saved else x.new_empty(x.shape[0], 0)
    return y, packed


@_solve_op.register_fake
def _(x: Tensor, alpha: Tensor, penalty: str) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape[0], 1), x.new_empty(x.shape[0], _SAVED.get(penalty, 0))


def solve(x: Tensor, alpha: Tensor, penalty: str) -> tuple[Tensor, ...]:
    """``(y, *saved)`` of the built-in penalty class named ``penalty`` on rows ``x (M, n)``,
    as :func:`declnet.layers._pool_solvers.solve_rows` returns them.

    Raises:
        KeyError: ``penalty`` is not a built-in penalty class with a solver rule.
    """
    y, packed = _solve_op(x, alpha, penalty)
    if packed.shape[-1] == 0:
        return (y,)
    return (y, *packed.split(1, -1))


@torch.library.custom_op("declnet::robust_vector_pool_solve", mutates_args=())
def _vector_solve_op(x: Tensor, alpha: Tensor, penalty: str) -> Tensor:
    """``y (M, C)`` for the sets ``x (M, C, n)``."""
    return vector_solvers.solve(_CLASSES[penalty](), x, alpha)


@_vector_solve_op.register_fake
def _(x: Tensor, alpha: Tensor, penalty: str) -> Tensor:
    return x.new_empty(x.shape[0], x.shape[1])  # x (M, C, n)


def vector_solve(x: Tensor, alpha: Tensor, penalty: str) -> Tensor:
    """:func:`declnet.layers._vector_pool_solvers.solve` of the built-in penalty class named
    ``penalty`` on the sets ``x (M, C, n)``: ``y (M, C)``.

    Raises:
        KeyError: ``penalty`` is not a built-in penalty class with a solver.
    """
    return _vector_solve_op(x, alpha, penalty)
