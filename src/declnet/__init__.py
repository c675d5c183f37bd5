"""declnet: deep declarative networks in PyTorch.

A declarative node's output is the solution of an optimisation problem,
``y(x) ∈ argmin_u f(x, u)`` subject to constraints; its gradient comes from
implicit differentiation of the optimality conditions rather than from
back-propagating through the solver.
"""

from . import testing
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

# Robust pooling layers (paper §5.1).
from .layers import (
    Huber,
    Penalty,
    PseudoHuber,
    Quadratic,
    RobustPool,
    RobustVectorPool,
    TruncatedQuadratic,
    Welsch,
    robust_pool,
    robust_vector_pool,
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
    "testing",
]

# Robust pooling layers (paper §5.1).
__all__ += [
    "Huber",
    "Penalty",
    "PseudoHuber",
    "Quadratic",
    "RobustPool",
    "RobustVectorPool",
    "TruncatedQuadratic",
    "Welsch",
    "robust_pool",
    "robust_vector_pool",
]
