"""Eigenvectors of symmetric matrices as a declarative layer.

The top k eigenvectors of a symmetric ``X`` solve the problem on the Stiefel manifold

    Y(X) = argmax_{Yᵀ Y = I_k} tr(Yᵀ X Y)      (argmin for the bottom k)

(paper §4.3, Prop. 4.5 with the orthonormality constraints as ``h``), with the
columns ordered by eigenvalue and a fixed sign. The forward is a batched symmetric
eigendecomposition (``torch.linalg.eigh``). Implicit differentiation of
``X y_j = λ_j y_j``, ``y_jᵀ y_j = 1`` gives for the j-th column
``dy_j = (λ_j I − X)⁺ dX y_j``, so with ``U``, ``λ`` the full decomposition and ``G``
the incoming gradient (n × k),

    dL/dX = sym( U [F ⊙ (Uᵀ G)] Yᵀ ),   F_ij = 1 / (λ_j − λ_i)  for λ_i ≠ λ_j, else 0,

with ``sym(A) = (A + Aᵀ)/2`` (the gradient on symmetric matrices).

Repeated eigenvalues: where ``|λ_i − λ_j|`` is within rounding (100 eps max|λ|) the
eigenvectors are not differentiable (not even unique); ``F_ij`` is set to 0, the
pseudo-inverse of the singular ``(λ_j I − X)`` (paper §4.7.4, equation (35) with
Z = 0). The gradient is then the exact gradient of any loss that is invariant to
rotations within the repeated eigenspace (the projector ``Y Yᵀ``, subspace
distances), and finite for every loss: no NaN.

Sign convention: each eigenvector is scaled by ±1 so that its entry of largest
magnitude (the first such entry on ties) is positive; the sign is a deterministic
function of ``X``, stable across calls and devices.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_tensor, run_value_check, value_check
from ._functorch import batch_first, forward_from_backward, save_for_both
from ._precision import autocast_off, float32_inside

__all__ = ["EigenDecomposition", "eigenvectors"]


def _select(x: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (λ, U, λ_sel, Y_sel) with fixed signs; eigenvalues ordered as requested."""
    lam, u = torch.linalg.eigh(x)  # ascending
    if largest:
        lam, u = lam.flip(-1), u.flip(-1)
    big = u.abs().argmax(-2, keepdim=True)  # (..., 1, n): the first largest entry
    sign = torch.sign(u.gather(-2, big))
    u = u * torch.where(sign == 0, torch.ones_like(sign), sign)
    return lam, u, lam[..., :k], u[..., :k]



@value_check("eigen_symmetric")
def _check_symmetric(tensors: list[Tensor], label: str) -> None:
    """``X`` symmetric to within √eps relative, and finite."""
    (x,) = tensors
    if not x.numel():  # an empty batch
        return
    asym = (x - x.mT).abs().amax()
    scale = x.abs().amax().clamp(min=torch.finfo(x.dtype).tiny)
    if bool(asym > torch.finfo(x.dtype).eps ** 0.5 * scale) or not bool(torch.isfinite(asym)):
        raise ValueError(
            f"{label}: X must be symmetric (and finite); got max |X − Xᵀ| = {float(asym):.3g} "
            f"for max |X| = {float(scale):.3g}. Pass the symmetric part (X + X.mT) / 2."
        )

@forward_from_backward
class _EigenFunction(torch.autograd.Function):
    """The full decomposition ``(λ, U)`` of symmetric ``X`` (ordered, signs fixed), both
    differentiable outputs.

    With incoming gradients ``g_λ`` and ``G_U``, ``dL/dX = sym(U [diag(g_λ) + F ⊙ (Uᵀ G_U)]
    Uᵀ)`` (module docstring; ``F_ij = 1/(λ_j − λ_i)``, 0 within rounding of a repeated
    eigenvalue). The backward uses the saved *outputs* ``λ`` and ``U``, which carry their
    dependence on ``X``, so differentiating it again (``create_graph=True``) gives the
    second derivatives (for distinct eigenvalues).
    """

    @staticmethod
    def forward(x: Tensor, largest: bool) -> tuple[Tensor, Tensor]:
        lam, u, _, _ = _select(x, x.shape[-1], largest)
        return lam, u

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        save_for_both(ctx, *output)

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g_lam: Tensor | None, g_u: Tensor | None) -> tuple[Tensor | None, ...]:
        lam, u = ctx.saved_tensors
        inner = torch.zeros_like(u) if g_lam is None else torch.diag_embed(g_lam)
        if g_u is not None:
            gap = lam.unsqueeze(-2) - lam.unsqueeze(-1)  # (..., n, n): λ_j − λ_i
            tol = 100 * torch.finfo(lam.dtype).eps * lam.detach().abs().amax(-1, keepdim=True)
            ok = gap.abs() > tol.unsqueeze(-1)
            f = torch.where(ok, 1.0 / torch.where(ok, gap, torch.ones_like(gap)), 0.0)
            inner = inner + f * (u.mT @ g_u)
        a = u @ inner @ u.mT
        return 0.5 * (a + a.mT), None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], x: Tensor, largest: bool) -> tuple[Any, Any]:
        """The decomposition is batched over leading dimensions: move the vmapped one first."""
        lam, u = _EigenFunction.apply(batch_first(x, in_dims[0], info.batch_size), largest)
        return (lam, u), (0, 0)


@float32_inside
def eigenvectors(X: Tensor, k: int = 1, largest: bool = True) -> Tensor:
    """The top (or bottom) ``k`` eigenvectors of symmetric matrices, differentiably.

    ``Y = argmax_{YᵀY = I} tr(YᵀXY)`` (argmin if ``largest=False``), with a sign
    convention stable across calls (the largest-magnitude entry of each column is
    positive) and a closed-form backward that stays finite at repeated eigenvalues
    (module docstring).

    Args:
        X: ``(..., n, n)`` symmetric matrices, float32 or float64 (symmetric to within
            √eps relative; the symmetric part is used). float16 and bfloat16 are solved and
            differentiated in float32 and the result returned in their dtype; autocast is
            off inside.
        k: the number of eigenvectors, ``1 <= k <= n``.
        largest: the top ``k`` (by eigenvalue, largest first) or the bottom ``k``
            (smallest first).

    Returns:
        ``(..., n, k)`` orthonormal eigenvectors as columns.

    Raises:
        TypeError / ValueError: for non-square or non-symmetric ``X`` or a bad ``k``.

    Example:
        >>> S = torch.randn(8, 5, 5); X = S @ S.mT
        >>> v = eigenvectors(X, k=2)            # (8, 5, 2): the two principal directions
    """
    X = check_tensor(X, "X", min_dim=2)
    n = X.shape[-1]
    if X.shape[-2] != n or n == 0:
        raise ValueError(f"X must be a batch of square matrices (..., n, n); got {tuple(X.shape)}.")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int with 1 <= k <= n = {n}; got k={k!r}.")
    if not isinstance(largest, bool):
        raise TypeError(f"largest must be a bool; got {largest!r}.")
    run_value_check("eigen_symmetric", "eigenvectors", X)
    _, u = _EigenFunction.apply(0.5 * (X + X.mT), largest)
    return u[..., :k]


class EigenDecomposition(nn.Module):
    """Module form of :func:`eigenvectors`.

    Args:
        k: the number of eigenvectors.
        largest: top ``k`` (default) or bottom ``k``.
    """

    def __init__(self, k: int = 1, largest: bool = True) -> None:
        super().__init__()
        self.k = k
        self.largest = largest

    def forward(self, X: Tensor) -> Tensor:
        return eigenvectors(X, self.k, self.largest)

    def extra_repr(self) -> str:
        return f"k={self.k}, largest={self.largest}"
