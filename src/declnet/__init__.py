"""declnet: deep declarative networks in PyTorch.

A declarative node's output is the solution of an optimisation problem,
``y(x) ∈ argmin_u f(x, u)`` subject to constraints; its gradient comes from
implicit differentiation of the optimality conditions rather than from
back-propagating through the solver.
"""

from ._diagnostics import DeclarativeWarning, OptimalityResidual
from ._function import DeclarativeFunction, declarative
from ._implicit import ImplicitBackward, UnrolledBackward, implicit_vjp, optimality_residual
from ._node import (
    DeclarativeNode,
    EqualityConstrainedNode,
    InequalityConstrainedNode,
    LinearEqualityConstrainedNode,
    Solution,
)

# Lp projections (paper §5.2, Table 2)
from .layers.projections import (
    LpProjection,
    project_onto_ball,
    project_onto_simplex,
    project_onto_sphere,
)

__version__ = "0.1.0"

__all__ = [
    "DeclarativeFunction",
    "DeclarativeNode",
    "DeclarativeWarning",
    "EqualityConstrainedNode",
    "ImplicitBackward",
    "InequalityConstrainedNode",
    "LinearEqualityConstrainedNode",
    "OptimalityResidual",
    "Solution",
    "UnrolledBackward",
    "__version__",
    "declarative",
    "implicit_vjp",
    "optimality_residual",
]

# Lp projections
__all__ += [
    "LpProjection",
    "project_onto_ball",
    "project_onto_simplex",
    "project_onto_sphere",
]
