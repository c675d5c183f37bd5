"""The iterative Lp projection solvers as one opaque custom operator, for ``torch.compile``.

The general-p solver (1 < p < ∞) iterates until every row has converged and solves the rows
outside and inside the sphere separately, and the L∞ sphere pushes out rows that lie
inside it only when there are any: data-dependent control flow that
``torch.compile(fullgraph=True)`` cannot trace. Wrapped as the custom operator
``declnet::lp_project`` (``torch.library.custom_op``) they are a single node of the
compiled graph, run eagerly when the graph runs; the registered fake implementation gives
the output's shape to the tracer. The closed-form backward stays traceable.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _projection_solvers as solvers

__all__ = ["forward", "is_opaque"]


def is_opaque(p: float, ball: bool) -> bool:
    """Whether the projection's solver runs as the opaque operator under ``torch.compile``
    (p = 1 and p = 2, and the L∞ ball, are traced as they are)."""
    return p not in (1.0, 2.0, math.inf) or (p == math.inf and not ball)


@torch.library.custom_op("declnet::lp_project", mutates_args=())
def _project_op(
    x: Tensor, radius: Tensor | None, radius_float: float, dim: int, p: float, ball: bool
) -> Tensor:
    """The projection of ``x`` (contiguous output); ``radius`` when a tensor, else
    ``radius_float``."""
    r = radius_float if radius is None else radius
    return solvers.forward(x, r, dim, p, ball).contiguous()


@_project_op.register_fake
def _(
    x: Tensor, radius: Tensor | None, radius_float: float, dim: int, p: float, ball: bool
) -> Tensor:
    return x.new_empty(x.shape)


def forward(x: Tensor, r: float | Tensor, dim: int, p: float, ball: bool) -> Tensor:
    """The projection of ``x`` along ``dim``, by the operator ``declnet::lp_project``."""
    if isinstance(r, Tensor):
        return _project_op(x, r, 0.0, dim, p, ball)
    return _project_op(x, None, float(r), dim, p, ball)
