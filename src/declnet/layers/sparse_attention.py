"""Sparse attention: sparsemax and α-entmax as declarative layers.

α-entmax maps scores ``z`` to the probability vector

    p(z) = argmax_{p ∈ Δ}  pᵀz + H_α(p),
    H_α(p) = (1 − Σ pᵢ^α) / (α(α − 1))     (Tsallis α-entropy, α > 1),

the projection of ``z`` onto the simplex ``Δ`` under the α-Tsallis regulariser
(Peters, Niculae & Martins, 2019; Martins & Astudillo, 2016 for α = 2). Its optimality
conditions give the thresholded form

    p_i = [(α − 1) z_i − τ]_+^{1/(α − 1)},   τ such that Σ p_i = 1.

α = 2 is sparsemax, the Euclidean projection onto the simplex (paper §5.2); α → 1 is
softmax. Forward: exact sort-based thresholds for α = 2 and α = 1.5, bisection on τ
for other α. Backward, by implicit differentiation of the conditions above (paper §4,
Prop. 4.6 with the non-negativity constraints active off the support): with
``s_i = p_i^{2 − α}`` on the support and 0 elsewhere,

    dL/dz = s ⊙ v − s (sᵀv) / (Σ s),

which has no factor 1/(α − 1): the (α − 1) from differentiating ``(α − 1) z − τ``
cancels the exponent's 1/(α − 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_dim, check_tensor
from ._functorch import batch_first, forward_from_backward, save_for_both
from ._precision import autocast_off, float32_inside

__all__ = ["Entmax", "Sparsemax", "entmax", "sparsemax"]

_BISECTION_ITERS = 60  # halves the bracket to below float64 resolution


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a real number >= 1; got {alpha!r}.")
    alpha = float(alpha)
    if not (alpha >= 1.0 and math.isfinite(alpha)):
        raise ValueError(
            f"alpha must be finite and >= 1 (1: softmax, 1.5: entmax, 2: sparsemax); "
            f"got alpha={alpha}."
        )
    return alpha


def _sparsemax_last(z: Tensor) -> Tensor:
    """Sparsemax along the last dimension by sorting (Martins & Astudillo, 2016)."""
    z = z - z.amax(-1, keepdim=True)
    zs, _ = torch.sort(z, dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=z.device)
    cs = zs.cumsum(-1)
    support = (1.0 + k * zs > cs).sum(-1, keepdim=True)
    tau = (cs.gather(-1, support - 1) - 1.0) / support.to(z.dtype)
    return torch.clamp(z - tau, min=0.0)


def _entmax15_last(z: Tensor) -> Tensor:
    """1.5-entmax along the last dimension by sorting: p = [z/2 − τ]²_+ with Σ p = 1."""
    z = (z - z.amax(-1, keepdim=True)) / 2.0
    zs, _ = torch.sort(z, dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=z.device)
    mean = zs.cumsum(-1) / k
    mean_sq = (zs * zs).cumsum(-1) / k
    # τ_k solves k τ² − 2 τ Σ zs + Σ zs² − 1 = 0 on the top-k support (smaller root).
    delta = (1.0 - k * (mean_sq - mean * mean)) / k
    tau = mean - torch.sqrt(torch.clamp(delta, min=0.0))
    support = (tau <= zs).sum(-1, keepdim=True)
    tau_star = tau.gather(-1, support - 1)
    p = torch.clamp(z - tau_star, min=0.0)
    return p * p


def _entmax_bisect_last(z: Tensor, alpha: float) -> Tensor:
    """α-entmax along the last dimension by bisection on the threshold τ."""
    d = z.shape[-1]
    am1 = alpha - 1.0
    u = am1 * (z - z.amax(-1, keepdim=True))  # max u = 0
    # Σ p(τ) is decreasing in τ; Σ p(−1) >= 1 and Σ p(−(1/d)^{α−1}) <= 1.
    lo = torch.full_like(u[..., :1], -1.0)
    hi = torch.full_like(u[..., :1], -((1.0 / d) ** am1))
    inv = 1.0 / am1
    for _ in range(_BISECTION_ITERS):
        mid = 0.5 * (lo + hi)
        mass = torch.clamp(u - mid, min=0.0).pow(inv).sum(-1, keepdim=True)
        big = mass >= 1.0
        lo = torch.where(big, mid, lo)
        hi = torch.where(big, hi, mid)
    p = torch.clamp(u - 0.5 * (lo + hi), min=0.0).pow(inv)
    return p / p.sum(-1, keepdim=True)


def _entmax_forward(z: Tensor, alpha: float, dim: int) -> Tensor:
    zl = z.movedim(dim, -1)
    if alpha == 1.0:
        p = torch.softmax(zl, dim=-1)
    elif alpha == 2.0:
        p = _sparsemax_last(zl)
    elif alpha == 1.5:
        p = _entmax15_last(zl)
    else:
        p = _entmax_bisect_last(zl, alpha)
    return p.movedim(-1, dim)


def _entmax_vjp(p: Tensor, v: Tensor, alpha: float, dim: int) -> Tensor:
    """dL/dz = s ⊙ v − s (sᵀv)/Σs with s = p^{2−α} on the support (0 elsewhere)."""
    if alpha == 2.0:
        s = (p > 0).to(p.dtype)
    elif alpha == 1.0:
        s = p
    else:
        # p^{2−α} on the support; the where keeps double backward finite at p = 0.
        support = p > 0
        safe = torch.where(support, p, torch.ones_like(p))
        s = torch.where(support, torch.sqrt(safe) if alpha == 1.5 else safe.pow(2.0 - alpha), 0.0)
    sv = s * v
    return sv - s * (sv.sum(dim, keepdim=True) / s.sum(dim, keepdim=True))


@forward_from_backward(symmetric=True)
class _EntmaxFunction(torch.autograd.Function):
    """α-entmax with the closed-form backward (itself differentiable)."""

    @staticmethod
    def forward(z: Tensor, alpha: float, dim: int) -> Tensor:
        return _entmax_forward(z, alpha, dim)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, ctx.alpha, ctx.dim = inputs
        save_for_both(ctx, output)

    @staticmethod
    @autocast_off
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:
        (p,) = ctx.saved_tensors
        return _entmax_vjp(p, v, ctx.alpha, ctx.dim), None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], z: Tensor, alpha: float, dim: int) -> Any:
        """Every dimension but ``dim`` is a batch dimension: move the vmapped one first."""
        zb = batch_first(z, in_dims[0], info.batch_size)
        return _EntmaxFunction.apply(zb, alpha, dim + 1), 0


@float32_inside
def entmax(x: Tensor, alpha: float = 1.5, dim: int = -1) -> Tensor:
    """α-entmax of scores ``x`` along ``dim``: a sparse softmax.

    ``p = argmax_{p ∈ Δ} pᵀx + H_α(p)`` with the Tsallis α-entropy (module docstring);
    α = 1 is softmax, α = 1.5 the usual entmax, α = 2 sparsemax. Exact for α ∈ {1, 1.5, 2}
    (sort-based thresholds), bisection to float64 resolution otherwise. The backward is
    the closed form ``s ⊙ v − s (sᵀv)/Σs`` with ``s = p^{2−α}`` on the support.

    Args:
        x: ``(..., d, ...)`` scores, float32 or float64.
        alpha: the Tsallis parameter, a float ``>= 1``.
        dim: the dimension to normalise along; all others are batch dimensions.

    Returns:
        A tensor of ``x``'s shape, non-negative and summing to 1 along ``dim``.

    Raises:
        TypeError / ValueError: for a non-float ``x``, a bad ``dim`` or ``alpha < 1``.

    Example:
        >>> p = entmax(torch.tensor([[2.0, 1.0, -3.0]]), alpha=1.5)  # p[0, 2] == 0
    """
    x = check_tensor(x, "x")
    dim = check_dim(x, dim)
    alpha = _check_alpha(alpha)
    return _EntmaxFunction.apply(x, alpha, dim)


@float32_inside
def sparsemax(x: Tensor, dim: int = -1) -> Tensor:
    """Sparsemax of ``x`` along ``dim``: the Euclidean projection onto the simplex.

    ``p = argmin_{p ∈ Δ} ‖p − x‖²`` (α-entmax with α = 2; paper §5.2 for the
    projection). Exact sort-based forward; backward ``v − mean_S(v)`` on the support
    ``S = {p > 0}``, 0 elsewhere.

    Args:
        x: ``(..., d, ...)`` scores, float32 or float64.
        dim: the dimension to normalise along.

    Returns:
        A tensor of ``x``'s shape on the simplex along ``dim``.

    Example:
        >>> sparsemax(torch.tensor([1.0, 0.2, -1.0]))
        tensor([0.9000, 0.1000, 0.0000])
    """
    x = check_tensor(x, "x")
    dim = check_dim(x, dim)
    return _EntmaxFunction.apply(x, 2.0, dim)


class Entmax(nn.Module):
    """Module form of :func:`entmax`.

    Args:
        alpha: the Tsallis parameter ``>= 1`` (1.5 by default).
        dim: the dimension to normalise along.
    """

    def __init__(self, alpha: float = 1.5, dim: int = -1) -> None:
        super().__init__()
        self.alpha = _check_alpha(alpha)
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return entmax(x, self.alpha, self.dim)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, dim={self.dim}"


class Sparsemax(nn.Module):
    """Module form of :func:`sparsemax`.

    Args:
        dim: the dimension to normalise along.
    """

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return sparsemax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
