"""Ready-made declarative layers: functional forms and ``nn.Module`` pairs.

- Robust pooling (paper §5.1, Table 1): penalty objects and ``robust_pool`` /
  ``RobustPool``, ``robust_vector_pool`` / ``RobustVectorPool``.
- Lp projections (paper §5.2, Table 2): ``project_onto_sphere``, ``project_onto_ball``,
  ``project_onto_simplex`` and ``LpProjection``.
- Quadratic programs (OptNet): ``quadratic_program`` / ``QuadraticProgram``.
"""

from ._kernels import compile_mode, set_compile_mode
from .eigen import EigenDecomposition, eigenvectors
from .least_squares import LeastSquares, least_squares
from .optimal_transport import OptimalTransport, optimal_transport
from .penalties import (
    Huber,
    Penalty,
    PseudoHuber,
    Quadratic,
    TruncatedQuadratic,
    Welsch,
    as_penalty,
    penalty_names,
)
from .projections import (
    LpProjection,
    project_onto_ball,
    project_onto_simplex,
    project_onto_sphere,
)
from .quadratic_program import QuadraticProgram, QuadraticProgramError, quadratic_program
from .robust_pool import RobustPool, RobustVectorPool, robust_pool, robust_vector_pool
from .sparse_attention import Entmax, Sparsemax, entmax, sparsemax
from .total_variation import TotalVariation1d, total_variation_1d
from .tridiagonal import tridiagonal_solve

__all__ = [
    "EigenDecomposition",
    "Entmax",
    "Huber",
    "LeastSquares",
    "LpProjection",
    "OptimalTransport",
    "Penalty",
    "PseudoHuber",
    "Quadratic",
    "QuadraticProgram",
    "QuadraticProgramError",
    "RobustPool",
    "RobustVectorPool",
    "Sparsemax",
    "TotalVariation1d",
    "TruncatedQuadratic",
    "Welsch",
    "as_penalty",
    "compile_mode",
    "eigenvectors",
    "entmax",
    "least_squares",
    "optimal_transport",
    "penalty_names",
    "project_onto_ball",
    "project_onto_simplex",
    "project_onto_sphere",
    "quadratic_program",
    "robust_pool",
    "robust_vector_pool",
    "set_compile_mode",
    "sparsemax",
    "total_variation_1d",
    "tridiagonal_solve",
]
