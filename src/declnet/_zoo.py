"""A small zoo of declarative nodes with known gradients (the paper's examples).

Each node has ``closed_form_jacobian(*xs)`` returning ``Dy`` for its first input,
``(B, m, n)``, from the formula in the paper, so that tests (and users learning the
library) can compare the implicit gradient with it. All are written for float64.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._node import (
    DeclarativeNode,
    EqualityConstrainedNode,
    InequalityConstrainedNode,
    LinearEqualityConstrainedNode,
)

__all__ = [
    "BallHalfspaceProjection",
    "CircleLinearObjective",
    "CubicFeasibility",
    "ImperativeAsDeclarative",
    "L2BallProjection",
    "MinKLOnSimplex",
    "PolynomialNode",
    "PseudoHuberRegression",
    "QuadraticNode",
    "SingularAlignment",
    "UnitSphereProjection",
]


def _eye_like(y: Tensor) -> Tensor:
    return torch.eye(y.shape[-1], dtype=y.dtype, device=y.device).expand(y.shape[0], -1, -1)


class QuadraticNode(DeclarativeNode):
    """``y = argmin_u ½ uᵀQu − uᵀWx``, so ``y = Q⁻¹Wx`` and ``Dy = Q⁻¹W`` (Prop. 4.4).

    Args:
        n: input size; m: output size; seed: seed of the random SPD ``Q`` and ``W``.
        learnable: make ``W`` an ``nn.Parameter`` (its gradient is checked in tests).
    """

    def __init__(self, n: int = 3, m: int = 5, seed: int = 0, learnable: bool = False,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        gen = torch.Generator().manual_seed(seed)
        M = torch.randn(m, m, generator=gen, dtype=torch.float64)
        self.register_buffer("Q", M @ M.T + m * torch.eye(m, dtype=torch.float64))
        W = torch.randn(m, n, generator=gen, dtype=torch.float64)
        if learnable:
            self.W = nn.Parameter(W)
        else:
            self.register_buffer("W", W)

    def objective(self, x: Tensor, *, y: Tensor) -> Tensor:  # (B, n), (B, m) -> (B,)
        return 0.5 * (y * (y @ self.Q.T)).sum(-1) - (y * (x @ self.W.T)).sum(-1)

    def solve(self, x: Tensor) -> Tensor:
        return torch.linalg.solve(self.Q, (x @ self.W.T).T).T

    def closed_form_jacobian(self, x: Tensor) -> Tensor:
        return torch.linalg.solve(self.Q, self.W).expand(x.shape[0], -1, -1)


class PolynomialNode(DeclarativeNode):
    """``y = argmin_u Σ_i ¼u_i⁴ + ½u_i² − u_i (Wx)_i`` (strictly convex, separable).

    ``Dy = diag(1 / (3y² + 1)) W``. ``solve`` runs Newton's method with differentiable
    operations, so :class:`~declnet.UnrolledBackward` can back-propagate through it.
    """

    def __init__(self, n: int = 3, m: int = 5, seed: int = 1, iterations: int = 30,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("W", torch.randn(m, n, generator=gen, dtype=torch.float64))
        self.iterations = iterations

    def objective(self, x: Tensor, *, y: Tensor) -> Tensor:
        return (0.25 * y**4 + 0.5 * y**2 - y * (x @ self.W.T)).sum(-1)

    def solve(self, x: Tensor) -> Tensor:
        t = x @ self.W.T
        y = t / (1 + t.abs() ** (2 / 3))  # a rough start
        for _ in range(self.iterations):
            y = y - (y**3 + y - t) / (3 * y**2 + 1)
        return y

    def closed_form_jacobian(self, x: Tensor) -> Tensor:
        y = self.solve(x)
        return self.W / (3 * y**2 + 1).unsqueeze(-1)


class PseudoHuberRegression(DeclarativeNode):
    """Robust linear regression ``y = argmin_u Σ_i φ(a_iᵀu − b_i; α)`` with the pseudo-Huber
    penalty (eq. 44). Inputs: targets ``b (B, n)``, design ``A (B, n, m)``, ``alpha``.

    ``D_b y = H⁻¹ Aᵀ diag(w)`` with ``w_i = (1 + (r_i/α)²)^(-3/2)`` and ``H = Aᵀ diag(w) A``.
    """

    def objective(self, b: Tensor, A: Tensor, alpha: float, *, y: Tensor) -> Tensor:
        r = (A @ y.unsqueeze(-1)).squeeze(-1) - b
        return (alpha**2 * (torch.sqrt(1 + (r / alpha) ** 2) - 1)).sum(-1)

    def solve(self, b: Tensor, A: Tensor, alpha: float) -> Tensor:
        y = torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1)
        for _ in range(100):  # Newton with the exact Hessian; strictly convex
            r = (A @ y.unsqueeze(-1)).squeeze(-1) - b
            s = 1 + (r / alpha) ** 2
            grad = (A.transpose(1, 2) @ (r / s.sqrt()).unsqueeze(-1)).squeeze(-1)
            H = A.transpose(1, 2) @ (s ** -1.5).unsqueeze(-1).mul(A)
            step = torch.linalg.solve(H, grad)
            y = y - step
            if not torch.is_grad_enabled() and float(step.abs().max()) < 1e-15:
                break
        return y

    def closed_form_jacobian(self, b: Tensor, A: Tensor, alpha: float) -> Tensor:
        y = self.solve(b, A, alpha)
        r = (A @ y.unsqueeze(-1)).squeeze(-1) - b
        w = (1 + (r / alpha) ** 2) ** -1.5
        H = A.transpose(1, 2) @ (w.unsqueeze(-1) * A)
        return torch.linalg.solve(H, A.transpose(1, 2) * w.unsqueeze(1))


class SingularAlignment(DeclarativeNode):
    """Eq. 36: ``y ∈ argmin_u −xᵀu / ‖u‖`` whose solutions ``y = αx`` are not isolated.

    ``solve`` returns ``y = scale · x``; the Hessian is singular and the pseudo-inverse
    gives eq. 38, ``Dy = α (I − x xᵀ/‖x‖²)`` (the engine warns that it used it).
    """

    def __init__(self, scale: float = 2.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = scale

    def objective(self, x: Tensor, *, y: Tensor) -> Tensor:
        return -(x * y).sum(-1) / y.norm(dim=-1)

    def solve(self, x: Tensor) -> Tensor:
        return self.scale * x

    def closed_form_jacobian(self, x: Tensor) -> Tensor:
        xh = x / x.norm(dim=-1, keepdim=True)
        return self.scale * (_eye_like(x) - xh.unsqueeze(-1) * xh.unsqueeze(-2))


class UnitSphereProjection(EqualityConstrainedNode):
    """Eq. 49: ``y = argmin_u ½‖u − x‖²`` subject to ``‖u‖² = 1``; ``Dy`` is eq. 48."""

    def objective(self, x: Tensor, *, y: Tensor) -> Tensor:
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x: Tensor, *, y: Tensor) -> Tensor:
        return (y**2).sum(-1, keepdim=True) - 1.0

    def solve(self, x: Tensor) -> Tensor:
        return x / x.norm(dim=-1, keepdim=True)

    def closed_form_jacobian(self, x: Tensor) -> Tensor:
        n = x.norm(dim=-1, keepdim=True)
        y = x / n
        return (_eye_like(x) - y.unsqueeze(-1) * y.unsqueeze(-2)) / n.unsqueeze(-1)


class L2BallProjection(InequalityConstrainedNode):
    """``y = argmin_u ½‖u − x‖²`` subject to ``‖u‖² ≤ r²``: ``x`` inside gives ``Dy = I``,
    outside ``Dy = (r/‖x‖)(I − ŷŷᵀ)``."""

    def __init__(self, radius: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.radius = radius

    def objective(self, x: Tensor, *, y: Tensor) -> Tensor:
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x: Tensor, *, y: Tensor) -> Tensor:
        return (y**2).sum(-1, keepdim=True) - self.radius**2

    def solve(self, x: Tensor) -> Tensor:
        return x * (self.radius / x.norm(dim=-1, keepdim=True)).clamp(max=1.0)

    def closed_form_jacobian(self, x: Tensor) -> Tensor:
        n = x.norm(dim=-1, keepdim=True)
        yh = x / n
        eye = _eye_like(x)
        outside = (self.radius / n).unsqueeze(-1) * (eye - yh.unsqueeze(-1) * yh.unsqueeze(-2))
        return torch.where((n > self.radius).unsqueeze(-1), outside, eye)


class CircleLinearObjective(EqualityConstrainedNode):
    """``y = argmin_u aᵀu`` subject to ``‖u − c‖² = r²`` with ``x = (c₁, c₂, r)``: the
    constraint depends on the input. ``y = c − r a/‖a‖`` and ``Dy = [I, −a/‖a‖]``."""

    def __init__(self, direction: tuple[float, float] = (0.6, -1.3), **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("a", torch.tensor(direction, dtype=torch.float64))

    def objective(self, x: Tensor, *, y: Tensor) -> Tensor:
        return y @ self.a

    def equality_constraints(self, x: Tensor, *, y: Tensor) -> Tensor:
        return ((y - x[:, :2]) ** 2).sum(-1, keepdim=True) - x[:, 2:3] ** 2

    def solve(self, x: Tensor) -> Tensor:
        return x[:, :2] - x[:, 2:3] * self.a / self.a.norm()

    def closed_form_jacobian(self, x: Tensor) -> Tensor:
        ah = (self.a / self.a.norm()).to(x.dtype)
        J = torch.cat([torch.eye(2, dtype=x.dtype), -ah.unsqueeze(-1)], 1)
        return J.expand(x.shape[0], -1, -1)


class MinKLOnSimplex(LinearEqualityConstrainedNode):
    """``y = argmin_u Σ_i u_i log u_i − x_i u_i`` subject to ``1ᵀu = 1``: ``y = softmax(x)``
    and ``Dy = diag(y) − yyᵀ`` (the unconstrained problem would give ``diag(y)``)."""

    def __init__(self, m: int = 5, **kwargs) -> None:
        super().__init__(torch.ones(1, m, dtype=torch.float64),
                         torch.ones(1, dtype=torch.float64), **kwargs)

    def objective(self, x: Tensor, *, y: Tensor) -> Tensor:
        return (y * (y.log() - x)).sum(-1)

    def solve(self, x: Tensor) -> Tensor:
        return torch.softmax(x, -1)

    def closed_form_jacobian(self, x: Tensor) -> Tensor:
        y = torch.softmax(x, -1)
        return torch.diag_embed(y) - y.unsqueeze(-1) * y.unsqueeze(-2)


class BallHalfspaceProjection(InequalityConstrainedNode):
    """Projection onto ``{‖u‖² ≤ 1, u₀ ≥ 0, u₁ ≤ 10}``: three nonlinear/linear inequalities,
    some active and some not. Since the half-space passes through the ball's centre the
    projection is the ball projection of the half-space projection, which gives the
    closed form (differentiated by autograd in ``closed_form_jacobian``)."""

    def objective(self, x: Tensor, *, y: Tensor) -> Tensor:
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x: Tensor, *, y: Tensor) -> Tensor:
        return torch.stack([(y**2).sum(-1) - 1.0, -y[:, 0], y[:, 1] - 10.0], -1)

    @staticmethod
    def _formula(x: Tensor) -> Tensor:
        z = torch.cat([x[:, :1].clamp(min=0), x[:, 1:]], 1)
        return z / z.norm(dim=-1, keepdim=True).clamp(min=1.0)

    def solve(self, x: Tensor) -> Tensor:
        return self._formula(x)

    def closed_form_jacobian(self, x: Tensor) -> Tensor:
        jac = torch.func.vmap(torch.func.jacrev(lambda r: self._formula(r[None])[0]))
        return jac(x)


class CubicFeasibility(EqualityConstrainedNode):
    """A feasibility problem (§4.7.1): find ``u`` with ``u³ + u − x = 0`` (no objective).

    ``Dy = diag(1 / (3y² + 1))``. With ``redundant=True`` the sum of the constraints is added
    as one more (consistent but linearly dependent) constraint: ``p > m``, a non-regular
    point where the engine drops the dependent row (§4.7.3) and the gradient stays exact.
    """

    def __init__(self, redundant: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.redundant = redundant

    def equality_constraints(self, x: Tensor, *, y: Tensor) -> Tensor:
        h = y**3 + y - x
        return torch.cat([h, h.sum(-1, keepdim=True)], 1) if self.redundant else h

    def solve(self, x: Tensor) -> Tensor:
        y = x / (1 + x.abs() ** (2 / 3))
        for _ in range(40):
            y = y - (y**3 + y - x) / (3 * y**2 + 1)
        return y

    def closed_form_jacobian(self, x: Tensor) -> Tensor:
        return torch.diag_embed(1 / (3 * self.solve(x) ** 2 + 1))


class ImperativeAsDeclarative(DeclarativeNode):
    """Prop. 4.10: ``y = argmin_u ½‖u − tanh(Wx)‖²`` equals the imperative ``tanh(Wx)``,
    with the same Jacobian ``diag(1 − tanh²(Wx)) W``."""

    def __init__(self, n: int = 3, m: int = 5, seed: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("W", torch.randn(m, n, generator=gen, dtype=torch.float64))

    def objective(self, x: Tensor, *, y: Tensor) -> Tensor:
        return 0.5 * ((y - torch.tanh(x @ self.W.T)) ** 2).sum(-1)

    def solve(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.W.T)

    def closed_form_jacobian(self, x: Tensor) -> Tensor:
        t = torch.tanh(x @ self.W.T)
        return (1 - t**2).unsqueeze(-1) * self.W
