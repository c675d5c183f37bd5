"""declnet: deep declarative networks in PyTorch.

A declarative node's output is the solution of an optimisation problem,
``y(x) ∈ argmin_u f(x, u)`` subject to constraints; its gradient comes from
implicit differentiation of the optimality conditions rather than from
back-propagating through the solver.
"""

__version__ = "0.1.0"

# Lp projections (paper §5.2, Table 2)
from .layers.projections import (
    LpProjection,
    project_onto_ball,
    project_onto_simplex,
    project_onto_sphere,
)

__all__ = [  # noqa: RUF022 (grouped by topic)
    "__version__",
    # Lp projections
    "LpProjection",
    "project_onto_ball",
    "project_onto_simplex",
    "project_onto_sphere",
]
