"""Ready-made declarative layers: functional forms and ``nn.Module`` pairs."""

# Lp projections (paper §5.2, Table 2)
from .projections import (
    LpProjection,
    project_onto_ball,
    project_onto_simplex,
    project_onto_sphere,
)

__all__ = [
    # Lp projections
    "LpProjection",
    "project_onto_ball",
    "project_onto_simplex",
    "project_onto_sphere",
]
