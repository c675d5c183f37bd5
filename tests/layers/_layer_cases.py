"""Every ready-made layer as a function of tensors, with small float64 inputs: the shared
cases of the layer feature tests (double backward, ``torch.func``, precision, compile)."""

from __future__ import annotations

import math

import torch

import declnet.layers as L
from declnet.layers import Penalty

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=_gen(seed))


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, dtype=F64, generator=_gen(seed))


class Cauchy(Penalty):
    """A user's penalty with closed-form derivatives (Table 1 backward)."""

    is_smooth = True

    def phi(self, z, alpha=None):
        a = self._a(alpha)
        return 0.5 * a * a * torch.log1p((z / a) ** 2)

    def dphi(self, z, alpha=None):
        a = self._a(alpha)
        return z / (1 + (z / a) ** 2)

    def d2phi(self, z, alpha=None):
        t2 = (z / self._a(alpha)) ** 2
        return (1 - t2) / (1 + t2) ** 2

    def dphi_dalpha(self, z, alpha=None):
        a = self._a(alpha)
        t2 = (z / a) ** 2
        return 2 * z * t2 / (a * (1 + t2) ** 2)


class PlainCauchy(Penalty):
    """A user's penalty with ``phi`` only (differentiated by the generic engine)."""

    is_smooth = True

    def phi(self, z, alpha=None):
        a = self._a(alpha)
        return 0.5 * a * a * torch.log1p((z / a) ** 2)


def _simplex_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Marginals of equal mass whatever the (perturbed) parameters."""
    return torch.softmax(a, -1), torch.softmax(b, -1)


def _spd(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x + x.mT)


_Q = randn(3, 3, seed=5) @ randn(3, 3, seed=5).mT + torch.eye(3, dtype=F64)

# (name, function of tensors, per-sample inputs (no batch dimension where the layer allows))
CASES = {
    **{
        f"robust_pool-{name}": (lambda x, n=name: L.robust_pool(x, n), (randn(3, 7, seed=1),))
        for name in ("pseudo_huber", "huber", "welsch", "truncated_quadratic", "quadratic")
    },
    "robust_pool-pseudo_huber-alpha": (
        lambda x, a: L.robust_pool(x, L.PseudoHuber(a)),
        (randn(3, 7, seed=2), torch.tensor(0.7, dtype=F64)),
    ),
    "robust_pool-welsch-alpha": (
        lambda x, a: L.robust_pool(x, L.Welsch(a)),
        (randn(3, 7, seed=3), torch.tensor(1.3, dtype=F64)),
    ),
    "robust_pool-user": (lambda x: L.robust_pool(x, Cauchy(1.0)), (randn(3, 6, seed=4),)),
    "robust_pool-user-alpha": (
        lambda x, a: L.robust_pool(x, Cauchy(a)),
        (randn(3, 6, seed=4), torch.tensor(0.9, dtype=F64)),
    ),
    "robust_pool-user-engine": (
        lambda x: L.robust_pool(x, PlainCauchy(1.0)),
        (randn(2, 6, seed=6),),
    ),
    "robust_vector_pool": (
        lambda x: L.robust_vector_pool(x, L.PseudoHuber(0.7), dim=-1, vector_dim=0),
        (randn(3, 6, seed=7),),
    ),
    **{
        f"project-{kind}-p{p}": (
            lambda x, f=f, p=p: f(x, p, 1.0, masked=True),
            (randn(3, 5, seed=8),),
        )
        for kind, f in (("sphere", L.project_onto_sphere), ("ball", L.project_onto_ball))
        for p in (1, 2, math.inf, 1.5, 3.0)
    },
    "project-simplex": (lambda x: L.project_onto_simplex(x), (randn(3, 5, seed=9),)),
    "least_squares": (
        lambda A, b, w: L.least_squares(A, b, w, ridge=0.1),
        (randn(6, 3, seed=10), randn(6, seed=11), rand(6, seed=12) + 0.5),
    ),
    "optimal_transport": (
        lambda M, a, b: L.optimal_transport(M, *_simplex_pair(a, b), gamma=2.0),
        (rand(4, 3, seed=13), randn(4, seed=14), randn(3, seed=15)),
    ),
    "eigenvectors": (
        lambda X: L.eigenvectors(_spd(X), 2),
        (_spd(randn(4, 4, seed=16)) + torch.diag(torch.arange(4, dtype=F64)),),
    ),
    "total_variation_1d": (lambda x: L.total_variation_1d(x, 0.3), (randn(8, seed=17),)),
    "tridiagonal": (
        lambda lo, d, up, b: L.tridiagonal_solve(lo, d, up, b, method="cyclic"),
        (0.3 * randn(4, seed=18), rand(5, seed=19) + 3, 0.3 * randn(4, seed=20), randn(5)),
    ),
    "tridiagonal-thomas": (
        lambda lo, d, up, b: L.tridiagonal_solve(lo, d, up, b, method="thomas"),
        (0.3 * randn(4, seed=18), rand(5, seed=19) + 3, 0.3 * randn(4, seed=20), randn(5)),
    ),
    "sparsemax": (lambda x: L.sparsemax(x), (randn(5, seed=21),)),
    "entmax-1.5": (lambda x: L.entmax(x, 1.5), (randn(5, seed=22),)),
    "entmax-1.3": (lambda x: L.entmax(x, 1.3), (randn(5, seed=23),)),
    "quadratic_program": (
        lambda Q, p, G, h: L.quadratic_program(Q, p, G, h)[0],
        (_Q, randn(3, seed=24), randn(2, 3, seed=25), 0.3 * rand(2, seed=26)),
    ),
}
