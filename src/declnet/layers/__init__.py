"""Ready-made declarative layers: functional forms and ``nn.Module`` pairs."""

# Robust pooling (paper §5.1, Table 1).
from ._kernels import compile_mode, set_compile_mode
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
from .robust_pool import RobustPool, RobustVectorPool, robust_pool, robust_vector_pool

__all__: list[str] = []

# Robust pooling (paper §5.1, Table 1).
__all__ += [
    "Huber",
    "Penalty",
    "PseudoHuber",
    "Quadratic",
    "RobustPool",
    "RobustVectorPool",
    "TruncatedQuadratic",
    "Welsch",
    "as_penalty",
    "compile_mode",
    "penalty_names",
    "robust_pool",
    "robust_vector_pool",
    "set_compile_mode",
]
