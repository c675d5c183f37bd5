"""Penalty functions for robust pooling (paper §5.1, Table 1).

A penalty ``φ(z; α)`` scores a residual ``z = u − x_i``. The robust pooling layers
minimise ``Σ_i φ(u − x_i; α)`` over ``u``; their backward needs ``φ'`` and ``φ''``
(Proposition 4.4 gives ``∂y/∂x_i = φ''(y − x_i) / Σ_j φ''(y − x_j)``) and, when ``α``
is learned, the mixed derivative ``∂²φ/∂z∂α``.

This module holds the one copy of every penalty used anywhere in declnet. Each penalty is
a small :class:`torch.nn.Module` so that a learnable ``α`` (an :class:`torch.nn.Parameter`)
is registered with whichever module holds the penalty.

Every method takes an optional ``alpha`` that overrides the penalty's own ``α``; the
pooling layers use it to pass ``α`` already broadcast to the shape they need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Union

import torch
from torch import Tensor

from ._checks import run_value_check, value_check

__all__ = [
    "Huber",
    "Penalty",
    "PenaltyLike",
    "PseudoHuber",
    "Quadratic",
    "TruncatedQuadratic",
    "Welsch",
    "as_penalty",
    "penalty_names",
]

AlphaLike = Union[float, Tensor]


def _check_alpha(alpha: object, owner: str) -> AlphaLike:
    """Validate a scale parameter: a positive finite float or a floating tensor of such."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, Tensor)):
        raise TypeError(
            f"{owner}: alpha must be a positive float or a floating-point tensor, "
            f"got {type(alpha).__name__}."
        )
    if isinstance(alpha, Tensor):
        if not alpha.is_floating_point():
            raise TypeError(
                f"{owner}: alpha must be a floating-point tensor, got dtype {alpha.dtype}."
            )
        if alpha.numel() == 0:
            raise ValueError(f"{owner}: alpha must not be empty, got shape {tuple(alpha.shape)}.")
        run_value_check("penalty_alpha", owner, alpha)
        return alpha
    value = float(alpha)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}: alpha must be a positive finite number, got {alpha!r}.")
    return value


@value_check("penalty_alpha")
def _check_alpha_values(tensors: Sequence[Tensor], owner: str) -> None:
    (alpha,) = tensors  # every sample of a vmapped alpha
    bad = ~(torch.isfinite(alpha) & (alpha > 0))
    if bool(bad.any()):
        raise ValueError(
            f"{owner}: alpha must be positive and finite everywhere; got "
            f"{int(bad.sum())} bad value(s) (min {alpha.min().item():.3g})."
        )


class Penalty(torch.nn.Module):
    """Abstract penalty ``φ(z; α)`` of a residual ``z``.

    The built-in subclasses implement :meth:`phi`, :meth:`dphi`, :meth:`d2phi`,
    :meth:`weight`, :meth:`dphi_dalpha` and :meth:`radial_excess`. All methods are
    elementwise: ``z`` may have any shape and ``alpha`` (when given) must broadcast
    against it.

    A user's subclass works in :func:`~declnet.layers.robust_pool` when it implements
    :meth:`phi` (even and non-decreasing in ``|z|``); it is solved by a generic multi-start
    Newton search, using :meth:`dphi` and :meth:`d2phi` where implemented (autograd of
    :meth:`phi` otherwise). With :meth:`d2phi` (and :meth:`dphi_dalpha` for a learnable
    ``α``) its backward is Table 1's closed form; without, the generic implicit engine.
    A subclass of a built-in penalty is treated as a user's penalty (it may change ``φ``).
    Vector pooling also needs :meth:`weight`, :meth:`radial_excess` and :meth:`dphi_dalpha`.

    Example:
        >>> class Cauchy(Penalty):
        ...     is_smooth = True
        ...     def phi(self, z, alpha=None):
        ...         a = self._a(alpha)
        ...         return 0.5 * a * a * torch.log1p((z / a) ** 2)
        >>> y = robust_pool(torch.randn(4, 100), Cauchy(alpha=1.0))   # (4,)

    Attributes:
        name: the string name accepted by :func:`as_penalty` (e.g. ``"welsch"``).
        is_convex: whether ``φ`` is convex in ``z`` (then every stationary point of
            ``Σ_i φ(u − x_i)`` is a global minimum).
        is_smooth: whether ``φ`` is twice continuously differentiable.
        alpha: the scale ``α`` (a positive float or a positive floating tensor,
            possibly an :class:`torch.nn.Parameter`); ``None`` for :class:`Quadratic`.
    """

    name: ClassVar[str] = ""
    is_convex: ClassVar[bool] = False
    is_smooth: ClassVar[bool] = False

    def __init__(self, alpha: AlphaLike | None = 1.0) -> None:
        super().__init__()
        if alpha is None:
            self.alpha = None
        else:
            self.alpha = _check_alpha(alpha, type(self).__name__)

    def _a(self, alpha: AlphaLike | None) -> AlphaLike:
        return self.alpha if alpha is None else alpha

    def phi(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        """The penalty ``φ(z; α)``, elementwise. ``z``: any shape; returns the same shape."""
        raise NotImplementedError  # abstract: every subclass overrides it

    def dphi(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        """First derivative ``∂φ/∂z``, elementwise (a one-sided choice at kinks)."""
        raise NotImplementedError  # abstract: every subclass overrides it

    def d2phi(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        """Second derivative ``∂²φ/∂z²``, elementwise (the value inside ``|z| ≤ α`` at kinks)."""
        raise NotImplementedError  # abstract: every subclass overrides it

    def weight(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        """The reweighting factor ``φ'(z) / z`` (its limit at ``z = 0``), elementwise.

        It is the weight of iteratively reweighted least squares and the radial factor of the
        gradient of ``φ(‖z‖)`` for vectors.
        """
        raise NotImplementedError  # abstract: every subclass overrides it

    def radial_excess(self, r: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        """``(φ''(r) − φ'(r)/r) / r²`` for ``r ≥ 0`` (its limit at ``r = 0``), elementwise.

        The Hessian of ``φ(‖d‖)`` with respect to a vector ``d`` is
        ``weight(r) I + radial_excess(r) d dᵀ`` with ``r = ‖d‖``.
        """
        raise NotImplementedError  # abstract: every subclass overrides it

    def dphi_dalpha(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        """The mixed derivative ``∂²φ/∂z∂α``, elementwise (needed for a learnable ``α``)."""
        raise NotImplementedError  # abstract: every subclass overrides it

    def extra_repr(self) -> str:
        if self.alpha is None:
            return ""
        if isinstance(self.alpha, Tensor):
            return f"alpha=tensor(shape={tuple(self.alpha.shape)})"
        return f"alpha={self.alpha:g}"


class Quadratic(Penalty):
    """Quadratic penalty ``φ(z) = z²/2``; pooling with it is the mean (eq. 41).

    Convex, smooth, no scale parameter (``alpha`` is ``None``).

    Example:
        >>> Quadratic().phi(torch.tensor([2.0]))
        tensor([2.])
    """

    name = "quadratic"
    is_convex = True
    is_smooth = True

    def __init__(self) -> None:
        super().__init__(alpha=None)

    def phi(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        return 0.5 * z * z

    def dphi(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        return z.clone()

    def d2phi(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        return torch.ones_like(z)

    def weight(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        return torch.ones_like(z)

    def radial_excess(self, r: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        return torch.zeros_like(r)

    def dphi_dalpha(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        return torch.zeros_like(z)


class PseudoHuber(Penalty):
    """Pseudo-Huber penalty ``φ(z; α) = α² (sqrt(1 + (z/α)²) − 1)`` (eq. 44).

    Strictly convex and smooth: the pooled value is unique.

    Args:
        alpha: scale ``α > 0``: a float, or a tensor (learnable when it requires grad).

    Example:
        >>> PseudoHuber(alpha=1.0).d2phi(torch.tensor([0.0]))
        tensor([1.])
    """

    name = "pseudo_huber"
    is_convex = True
    is_smooth = True

    # Written with hypot(1, t) = sqrt(1 + t²), which does not overflow where t² would, and
    # without the cancellation of sqrt(1 + t²) − 1 for small t.

    @staticmethod
    def _hypot(t: Tensor) -> Tensor:
        return torch.hypot(torch.ones_like(t), t)

    def phi(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        a = self._a(alpha)
        t = z / a
        return (a * a) * (t * (t / (self._hypot(t) + 1)))

    def dphi(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        t = z / self._a(alpha)
        return z / self._hypot(t)

    def d2phi(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        t = z / self._a(alpha)
        return self._hypot(t).reciprocal() ** 3

    def weight(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        t = z / self._a(alpha)
        return self._hypot(t).reciprocal()

    def radial_excess(self, r: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        a = self._a(alpha)
        t = r / a
        return -(self._hypot(t).reciprocal() ** 3) / (a * a)

    def dphi_dalpha(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        t = z / self._a(alpha)
        return (t / self._hypot(t)) ** 3


class Huber(Penalty):
    """Huber penalty: ``z²/2`` for ``|z| ≤ α``, ``α(|z| − α/2)`` otherwise (eq. 43).

    Convex, once continuously differentiable; the minimiser may be an interval. At the kinks
    ``|z| = α`` the second derivative is taken as 1 (the inside value, as in Table 1).

    Args:
        alpha: scale ``α > 0``: a float, or a tensor (learnable when it requires grad).

    Example:
        >>> Huber(alpha=1.0).phi(torch.tensor([3.0]))
        tensor([2.5000])
    """

    name = "huber"
    is_convex = True
    is_smooth = False

    def phi(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        a = self._a(alpha)
        az = z.abs()
        return torch.where(az <= a, 0.5 * z * z, a * (az - 0.5 * a))

    def dphi(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        a = self._a(alpha)
        if isinstance(a, Tensor):
            return torch.minimum(torch.maximum(z, -a), a)
        return z.clamp(-a, a)

    def d2phi(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        return (z.abs() <= self._a(alpha)).to(z.dtype)

    def weight(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        a = self._a(alpha)
        az = z.abs()
        return torch.where(az <= a, torch.ones_like(z), a / az)

    def radial_excess(self, r: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        a = self._a(alpha)
        return torch.where(r <= a, torch.zeros_like(r), -a / (r * r * r))

    def dphi_dalpha(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        return torch.sign(z) * (z.abs() > self._a(alpha)).to(z.dtype)


class Welsch(Penalty):
    """Welsch penalty ``φ(z; α) = 1 − exp(−z² / (2α²))`` (eq. 45).

    Smooth but not convex: the pooling objective may have several local minima.

    Args:
        alpha: scale ``α > 0``: a float, or a tensor (learnable when it requires grad).

    Example:
        >>> Welsch(alpha=1.0).phi(torch.tensor([0.0]))
        tensor([0.])
    """

    name = "welsch"
    is_convex = False
    is_smooth = True

    def phi(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        t = z / self._a(alpha)
        return -torch.expm1(-0.5 * t * t)

    def dphi(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        a = self._a(alpha)
        t = z / a
        return t * torch.exp(-0.5 * t * t) / a

    def d2phi(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        a = self._a(alpha)
        t = z / a
        return (1 - t * t) * torch.exp(-0.5 * t * t) / (a * a)

    def weight(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        a = self._a(alpha)
        t = z / a
        return torch.exp(-0.5 * t * t) / (a * a)

    def radial_excess(self, r: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        a = self._a(alpha)
        t = r / a
        return -torch.exp(-0.5 * t * t) / (a * a * a * a)

    def dphi_dalpha(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        a = self._a(alpha)
        t = z / a
        return t * (t * t - 2) * torch.exp(-0.5 * t * t) / (a * a)


class TruncatedQuadratic(Penalty):
    """Truncated quadratic: ``z²/2`` for ``|z| ≤ α``, ``α²/2`` otherwise (§5.1).

    Neither convex nor smooth (continuous only). Its derivatives are taken from the inside
    at ``|z| = α``. ``∂²φ/∂z∂α`` is zero wherever it exists, so the pooled value does not
    move with ``α`` except where it jumps from one cluster to another.

    Args:
        alpha: scale ``α > 0``: a float, or a tensor.

    Example:
        >>> TruncatedQuadratic(alpha=1.0).phi(torch.tensor([3.0]))
        tensor([0.5000])
    """

    name = "truncated_quadratic"
    is_convex = False
    is_smooth = False

    def phi(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        a = self._a(alpha)
        return 0.5 * torch.minimum(z * z, torch.as_tensor(a * a, dtype=z.dtype, device=z.device))

    def dphi(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        return z * (z.abs() <= self._a(alpha)).to(z.dtype)

    def d2phi(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        return (z.abs() <= self._a(alpha)).to(z.dtype)

    def weight(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        return (z.abs() <= self._a(alpha)).to(z.dtype)

    def radial_excess(self, r: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        return torch.zeros_like(r)

    def dphi_dalpha(self, z: Tensor, alpha: AlphaLike | None = None) -> Tensor:
        return torch.zeros_like(z)


_REGISTRY: dict[str, type[Penalty]] = {
    cls.name: cls for cls in (Quadratic, PseudoHuber, Huber, Welsch, TruncatedQuadratic)
}

PenaltyLike = Union[Penalty, str]


def penalty_names() -> tuple[str, ...]:
    """The string names accepted wherever a penalty is, e.g. ``("quadratic", ...)``."""
    return tuple(_REGISTRY)


def as_penalty(penalty: PenaltyLike) -> Penalty:
    """Return a penalty object from a :class:`Penalty` or its string name.

    Names are case-insensitive and ``-`` or a space may stand for ``_``
    (``"Pseudo-Huber"`` is ``"pseudo_huber"``). A name gives the penalty with ``α = 1``.

    Args:
        penalty: a :class:`Penalty` instance, of a built-in class or of a user's subclass
            (returned unchanged), or one of :func:`penalty_names`.

    Returns:
        The penalty object.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
        TypeError: for anything that is neither a string nor a :class:`Penalty`.

    Example:
        >>> as_penalty("welsch")
        Welsch(alpha=1)
    """
    if isinstance(penalty, Penalty):
        return penalty
    if isinstance(penalty, str):
        key = penalty.strip().lower().replace("-", "_").replace(" ", "_")
        if key not in _REGISTRY:
            raise ValueError(
                f"unknown penalty {penalty!r}; expected one of {', '.join(_REGISTRY)} "
                "or a Penalty object such as Welsch(alpha=0.5)."
            )
        return _REGISTRY[key]()
    raise TypeError(
        f"penalty must be a Penalty object or a string name, got {type(penalty).__name__}."
    )
