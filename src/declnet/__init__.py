"""declnet: deep declarative networks in PyTorch.

A declarative node's output is the solution of an optimisation problem,
``y(x) ∈ argmin_u f(x, u)`` subject to constraints; its gradient comes from
implicit differentiation of the optimality conditions rather than from
back-propagating through the solver.
"""

from . import layers, testing
from ._diagnostics import DeclarativeWarning, OptimalityResidual
from ._function import DeclarativeFunction
from ._implicit import implicit_vjp, optimality_residual
from ._modes import ImplicitBackward, UnrolledBackward
from ._node import (
    DeclarativeNode,
    EqualityConstrainedNode,
    InequalityConstrainedNode,
    LinearEqualityConstrainedNode,
    declarative,
)
from ._operators import DenseOperator, DiagonalOperator, LinearOperator, MatrixFreeOperator
from ._solution import Solution
from .layers import (
    Huber,
    LpProjection,
    Penalty,
    PseudoHuber,
    Quadratic,
    RobustPool,
    RobustVectorPool,
    TruncatedQuadratic,
    Welsch,
    project_onto_ball,
    project_onto_simplex,
    project_onto_sphere,
    robust_pool,
    robust_vector_pool,
)

__version__ = "0.1.0"

__all__ = [
    "DeclarativeFunction",
    "DeclarativeNode",
    "DeclarativeWarning",
    "DenseOperator",
    "DiagonalOperator",
    "EqualityConstrainedNode",
    "Huber",
    "ImplicitBackward",
    "InequalityConstrainedNode",
    "LinearEqualityConstrainedNode",
    "LinearOperator",
    "LpProjection",
    "MatrixFreeOperator",
    "OptimalityResidual",
    "Penalty",
    "PseudoHuber",
    "Quadratic",
    "RobustPool",
    "RobustVectorPool",
    "Solution",
    "TruncatedQuadratic",
    "UnrolledBackward",
    "Welsch",
    "__version__",
    "declarative",
    "implicit_vjp",
    "layers",
    "optimality_residual",
    "project_onto_ball",
    "project_onto_simplex",
    "project_onto_sphere",
    "robust_pool",
    "robust_vector_pool",
    "testing",
]
