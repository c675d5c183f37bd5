"""Fused per-set reductions of robust vector pooling, for the built-in penalties.

Every kernel works in the *scaled frame* of :func:`declnet.layers._vector_pool_solvers.frame`:
points ``z (M, C, n)`` (coordinates before points, the layout of a ``(B, C, N)`` input)
centred on each set's bounding box and divided by its half-width (so
``|z| ≤ 1``), a current output ``y (M, C)`` and the scaled penalty parameter ``a (M, 1)``.
With ``d_i = y − z_i`` and ``ρ_i = ‖d_i‖²`` each penalty gives, up to one positive factor
per set (which cancels in every use: the reweighted mean, the Newton step ``H⁻¹ g`` and the
Jacobians ``H⁻¹ H_i``):

- ``w_i ∝ φ'(r_i)/r_i`` (the reweighting weight),
- ``c_i ∝ (φ''(r_i) − w_i)/r_i²``, so that ``H_i = w_i I + c_i d_i d_iᵀ`` (Prop. 4.4),
- ``h_i = w_i + c_i ρ_i ∝ φ''(r_i)`` (``H_i d_i = h_i d_i``),
- ``φ_i`` (the objective, up to the factor; compared between starts of one set only).

The formulas are written so that nothing overflows or turns into NaN for any ``a`` in
``[0, a_max]`` (a point on the output, ``a`` below the smallest normal float): powers of
``r / α`` are never formed where they could overflow. Written as eager PyTorch each op
allocates an ``(M, C, n)`` or ``(M, n)`` temporary; :func:`declnet.layers._kernels.kernel`
compiles them into a few passes over ``z`` when worthwhile. One function per penalty and
reduction (each is compiled on its own), sharing the helpers below.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._kernels import register

__all__ = ["KERNELS", "WELSCH_T2_MAX"]

# t² = ρ/α² beyond which exp(−t²/2) is 0 in every floating dtype (as in the scalar kernels).
WELSCH_T2_MAX = 64.0**2

Terms = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def _floor_square(rho: Tensor, a: Tensor) -> Tensor:
    """``max(a², tiny)``: a positive square for the divisions below."""
    return (a * a).clamp_min(torch.finfo(rho.dtype).tiny)


def _pseudo_huber(rho: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Factor 1/α: ``w = (α² + ρ)^(-1/2)``, ``c = −w³``, ``h = α² w³``."""
    u = (a * a + rho).clamp_min(torch.finfo(rho.dtype).tiny).rsqrt()
    u3 = u * u * u
    return u, -u3, (a * a) * u3


def _outside(rho: Tensor, a2: Tensor) -> Tensor:
    """``1[ρ > α²]`` as a clamped sign: exact, and several times faster in eager mode on CPU
    than a comparison and a conversion of its boolean result."""
    return torch.sign(rho - a2).clamp_min(0)


def _huber(rho: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Factor 1/α: ``w = 1/max(α, r)``; outside ``c = −w³``, ``h = 0``; inside ``c = 0``,
    ``h = w = 1/α``."""
    a2 = _floor_square(rho, a)
    w = torch.maximum(rho, a2).rsqrt()
    out = _outside(rho, a2)
    return w, -(w * w * w) * out, w * (1 - out)


def _welsch_t2(rho: Tensor, a: Tensor) -> Tensor:
    return (rho / _floor_square(rho, a)).clamp_max(WELSCH_T2_MAX)


def _welsch(rho: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Factor α²: ``w = e = exp(−t²/2)``, ``c = −e/α²``, ``h = (1 − t²) e``."""
    t2 = _welsch_t2(rho, a)
    e = torch.exp(-0.5 * t2)
    return e, -e / _floor_square(rho, a), (1 - t2) * e


def _truncated(rho: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``w = h = 1[ρ ≤ α²]``, ``c = 0``."""
    w = 1 - _outside(rho, _floor_square(rho, a))
    return w, torch.zeros_like(w), w


def _pseudo_huber_phi(rho: Tensor, a: Tensor) -> Tensor:
    """``φ/α = ρ / (sqrt(α² + ρ) + α)``."""
    return rho / ((a * a + rho).sqrt() + a).clamp_min(torch.finfo(rho.dtype).tiny)


def _huber_phi(rho: Tensor, a: Tensor) -> Tensor:
    """``φ/α``: ``ρ/(2α)`` inside, ``r − α/2`` outside."""
    a2 = _floor_square(rho, a)
    inside = rho <= a2
    return torch.where(inside, 0.5 * rho * torch.maximum(rho, a2).rsqrt(), rho.sqrt() - 0.5 * a)


def _welsch_phi(rho: Tensor, a: Tensor) -> Tensor:
    """``φ = 1 − exp(−t²/2)``."""
    return -torch.expm1(-0.5 * _welsch_t2(rho, a))


def _truncated_phi(rho: Tensor, a: Tensor) -> Tensor:
    """``φ/α² = min(t², 1)/2``."""
    return 0.5 * (rho / _floor_square(rho, a)).clamp_max(1.0)


# --------------------------------------------------------------------------------------------
# The shared bodies.


def _offsets(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``d = y − z`` ``(M, C, n)`` and ``ρ = ‖d‖²`` ``(M, n)``."""
    d = y.unsqueeze(-1) - z
    return d, (d * d).sum(1)  # |z| ≤ 1 in the frame: no overflow


def _eager_in_place() -> bool:
    """Whether temporaries may be reused in place: not while autograd records the kernel
    (a differentiated backward) or ``torch.compile`` traces it (which fuses them anyway)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _distances(z: Tensor, y: Tensor) -> Tensor:
    """``ρ = ‖y − z_i‖²`` ``(M, n)`` alone: squared in place (one temporary as large as
    ``z``, not two) where :func:`_eager_in_place`."""
    if not _eager_in_place():
        return _offsets(z, y)[1]
    return (y.unsqueeze(-1) - z).square_().sum(1)


def _reweight_sums(z: Tensor, y: Tensor, a: Tensor, terms: Terms) -> tuple[Tensor, Tensor]:
    """Σ w_i ``(M, 1)`` and Σ w_i d_i ``(M, C)``: the reweighted mean is ``y − Σwd / Σw``.

    ``Σ w_i d_i = (Σ w_i) y − Σ w_i z_i``: no cancellation beyond the dtype's precision in
    the frame, where ``|y|, |z| ≤ 1``."""
    w = terms(_distances(z, y), a)[0]
    wsum = w.sum(-1, keepdim=True)
    return wsum, wsum * y - torch.bmm(z, w.unsqueeze(-1)).squeeze(-1)


def _scaled_offsets(d: Tensor, c: Tensor, spare: Tensor | None) -> Tensor:
    """``c_i d_i`` ``(M, C, n)``, written into ``spare`` when there is one."""
    if spare is None:
        return d * c.unsqueeze(1)
    return torch.mul(d, c.unsqueeze(1), out=spare)


def _offsets_spare(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`_offsets` and, where :func:`_eager_in_place`, the ``d²`` temporary for reuse."""
    if not _eager_in_place():
        return (*_offsets(z, y), None)
    d = y.unsqueeze(-1) - z
    sq = d * d
    return d, sq.sum(1), sq


def _curvature_sums(
    z: Tensor, y: Tensor, a: Tensor, terms: Terms
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Σ w_i ``(M, 1)``, the gradient Σ w_i d_i ``(M, C)``, Σ c_i d_i d_iᵀ ``(M, C, C)``
    (so ``H = Σw I + Σ c d dᵀ``) and Σ h_i d_i ``(M, C)``."""
    d, rho, spare = _offsets_spare(z, y)
    w, c, h = terms(rho, a)
    both = torch.bmm(d, torch.stack((w, h), -1))  # Σ w d and Σ h d in one pass, (M, C, 2)
    outer = torch.bmm(_scaled_offsets(d, c, spare), d.transpose(1, 2))
    return w.sum(-1, keepdim=True), both[..., 0], outer, both[..., 1]


def _objective(z: Tensor, y: Tensor, a: Tensor, phi: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Σ φ_i ``(M, 1)``, summed in float64."""
    return phi(_distances(z, y), a).sum(-1, keepdim=True, dtype=torch.float64)


def _gradient(z: Tensor, y: Tensor, a: Tensor, u: Tensor, terms: Terms) -> Tensor:
    """``H_i u = w_i u + c_i (d_i · u) d_i`` ``(M, C, n)``: with ``u = H⁻¹ v`` the
    vector-Jacobian product ``vᵀ ∂y/∂x_i`` (Prop. 4.4)."""
    d, rho, spare = _offsets_spare(z, y)
    w, c, _ = terms(rho, a)
    du = torch.bmm(u.unsqueeze(1), d).squeeze(1)  # (M, n)
    out = _scaled_offsets(d, c * du, spare)
    return out.addcmul_(u.unsqueeze(-1), w.unsqueeze(1))  # in place on a new tensor


# --------------------------------------------------------------------------------------------
# One function per penalty and reduction: torch.compile keeps its compiled versions per
# function, so the four penalties do not share (and exhaust) one function's cache.


def vector_pseudo_huber_reweight(z: Tensor, y: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    return _reweight_sums(z, y, a, _pseudo_huber)


def vector_huber_reweight(z: Tensor, y: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    return _reweight_sums(z, y, a, _huber)


def vector_welsch_reweight(z: Tensor, y: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    return _reweight_sums(z, y, a, _welsch)


def vector_truncated_reweight(z: Tensor, y: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    return _reweight_sums(z, y, a, _truncated)


def vector_pseudo_huber_curvature(z: Tensor, y: Tensor, a: Tensor) -> tuple[Tensor, ...]:
    return _curvature_sums(z, y, a, _pseudo_huber)


def vector_huber_curvature(z: Tensor, y: Tensor, a: Tensor) -> tuple[Tensor, ...]:
    return _curvature_sums(z, y, a, _huber)


def vector_welsch_curvature(z: Tensor, y: Tensor, a: Tensor) -> tuple[Tensor, ...]:
    return _curvature_sums(z, y, a, _welsch)


def vector_truncated_curvature(z: Tensor, y: Tensor, a: Tensor) -> tuple[Tensor, ...]:
    return _curvature_sums(z, y, a, _truncated)


def vector_pseudo_huber_objective(z: Tensor, y: Tensor, a: Tensor) -> Tensor:
    return _objective(z, y, a, _pseudo_huber_phi)


def vector_huber_objective(z: Tensor, y: Tensor, a: Tensor) -> Tensor:
    return _objective(z, y, a, _huber_phi)


def vector_welsch_objective(z: Tensor, y: Tensor, a: Tensor) -> Tensor:
    return _objective(z, y, a, _welsch_phi)


def vector_truncated_objective(z: Tensor, y: Tensor, a: Tensor) -> Tensor:
    return _objective(z, y, a, _truncated_phi)


def vector_pseudo_huber_gradient(z: Tensor, y: Tensor, a: Tensor, u: Tensor) -> Tensor:
    return _gradient(z, y, a, u, _pseudo_huber)


def vector_huber_gradient(z: Tensor, y: Tensor, a: Tensor, u: Tensor) -> Tensor:
    return _gradient(z, y, a, u, _huber)


def vector_welsch_gradient(z: Tensor, y: Tensor, a: Tensor, u: Tensor) -> Tensor:
    return _gradient(z, y, a, u, _welsch)


def vector_truncated_gradient(z: Tensor, y: Tensor, a: Tensor, u: Tensor) -> Tensor:
    return _gradient(z, y, a, u, _truncated)


# KERNELS[penalty class name][reduction] -> eager kernel.
KERNELS: dict[str, dict[str, Callable[..., object]]] = {
    "PseudoHuber": {
        "reweight": vector_pseudo_huber_reweight,
        "curvature": vector_pseudo_huber_curvature,
        "objective": vector_pseudo_huber_objective,
        "gradient": vector_pseudo_huber_gradient,
    },
    "Huber": {
        "reweight": vector_huber_reweight,
        "curvature": vector_huber_curvature,
        "objective": vector_huber_objective,
        "gradient": vector_huber_gradient,
    },
    "Welsch": {
        "reweight": vector_welsch_reweight,
        "curvature": vector_welsch_curvature,
        "objective": vector_welsch_objective,
        "gradient": vector_welsch_gradient,
    },
    "TruncatedQuadratic": {
        "reweight": vector_truncated_reweight,
        "curvature": vector_truncated_curvature,
        "objective": vector_truncated_objective,
        "gradient": vector_truncated_gradient,
    },
}

# Unblocked: one set is already as large as the scalar kernels' blocks of rows.
register(*(fn for table in KERNELS.values() for fn in table.values()), blocks=False)
