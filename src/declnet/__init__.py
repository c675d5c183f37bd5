"""declnet: deep declarative networks in PyTorch.

A declarative node's output is the solution of an optimisation problem,
``y(x) ∈ argmin_u f(x, u)`` subject to constraints; its gradient comes from
implicit differentiation of the optimality conditions rather than from
back-propagating through the solver.
"""

from . import layers, solvers, testing
from ._diagnostics import DeclarativeWarning, OptimalityResidual
from ._function import DeclarativeFunction
from ._implicit import implicit_jvp, implicit_vjp, optimality_residual
from ._modes import ImplicitBackward, UnrolledBackward
from ._node import (
    DeclarativeNode,
    EqualityConstrainedNode,
    InequalityConstrainedNode,
    LinearEqualityConstrainedNode,
    declarative,
)
from ._operators import DenseOperator, DiagonalOperator, LinearOperator, MatrixFreeOperator
from ._root import FixedPointNode, RootNode
from ._solution import Solution
from .layers import (
    EigenDecomposition,
    Entmax,
    Huber,
    LeastSquares,
    LpProjection,
    OptimalTransport,
    Penalty,
    PseudoHuber,
    Quadratic,
    RobustPool,
    RobustVectorPool,
    Sparsemax,
    TotalVariation1d,
    TruncatedQuadratic,
    Welsch,
    eigenvectors,
    entmax,
    least_squares,
    optimal_transport,
    project_onto_ball,
    project_onto_simplex,
    project_onto_sphere,
    robust_pool,
    robust_vector_pool,
    sparsemax,
    total_variation_1d,
    tridiagonal_solve,
)

__version__ = "0.1.0"

__all__ = [
    "DeclarativeFunction",
    "DeclarativeNode",
    "DeclarativeWarning",
    "DenseOperator",
    "DiagonalOperator",
    "EigenDecomposition",
    "Entmax",
    "EqualityConstrainedNode",
    "FixedPointNode",
    "Huber",
    "ImplicitBackward",
    "InequalityConstrainedNode",
    "LeastSquares",
    "LinearEqualityConstrainedNode",
    "LinearOperator",
    "LpProjection",
    "MatrixFreeOperator",
    "OptimalTransport",
    "OptimalityResidual",
    "Penalty",
    "PseudoHuber",
    "Quadratic",
    "RobustPool",
    "RobustVectorPool",
    "RootNode",
    "Solution",
    "Sparsemax",
    "TotalVariation1d",
    "TruncatedQuadratic",
    "UnrolledBackward",
    "Welsch",
    "__version__",
    "declarative",
    "eigenvectors",
    "entmax",
    "implicit_jvp",
    "implicit_vjp",
    "layers",
    "least_squares",
    "optimal_transport",
    "optimality_residual",
    "project_onto_ball",
    "project_onto_simplex",
    "project_onto_sphere",
    "robust_pool",
    "robust_vector_pool",
    "solvers",
    "sparsemax",
    "testing",
    "total_variation_1d",
    "tridiagonal_solve",
]
