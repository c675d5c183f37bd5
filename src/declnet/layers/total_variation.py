"""1-D total-variation denoising as a declarative layer.

    y(x, λ) = argmin_u ½‖u − x‖² + λ Σ_i |u_{i+1} − u_i|      (λ >= 0)

(Rudin, Osher & Fatemi, 1992; the fused-lasso signal approximator). The solution is
piecewise constant: consecutive entries fuse into groups ``G`` on which ``y`` is
constant, and on each group the optimality condition reads

    y_G = mean_G(x) − λ c_G,   c_G = (σ_G^left + σ_G^right) / |G|,

with ``σ`` the signs ``sign(y_G − y_neighbour)`` of the jumps at the group's two ends
(0 at the ends of the signal). Holding the groups and signs fixed (they are locally
constant almost everywhere), differentiating gives the exact Jacobian (paper §4.7.2:
Prop. 4.4 on the smooth reduced problem over the group values):

    dL/dx_i = mean_{G(i)}(v),      dL/dλ = − Σ_G c_G Σ_{i∈G} v_i,

so the backward averages the incoming gradient over each fused group; it is not the
identity once pieces fuse. The forward is Condat's direct algorithm (exact, usually
O(n)), batched over all samples.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from torch import Tensor, nn

from ._checks import as_param, check_dim, check_tensor
from ._condat import tv1d_condat
from ._functorch import batch_first, forward_from_backward, save_for_both
from ._precision import autocast_off, float32_inside

__all__ = ["TotalVariation1d", "total_variation_1d"]

WeightLike = Union[float, Tensor]


def _group_mean(v: Tensor, group: Tensor, counts: Tensor) -> Tensor:
    """Mean of ``v`` over each row's groups, broadcast back to ``(B, n)``."""
    sums = torch.zeros_like(v).scatter_add(1, group, v)
    return (sums / counts).gather(1, group)


@forward_from_backward
class _TotalVariationFunction(torch.autograd.Function):
    """TV denoising on ``(B, n)`` rows with per-row ``λ`` of shape ``(B,)``.

    The backward is linear in ``v`` with locally constant groups, and written with
    differentiable operations, so double backward is exact (almost everywhere).
    """

    @staticmethod
    def forward(x: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
        return tv1d_condat(x, lam)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        y, group = output
        ctx.mark_non_differentiable(group)
        save_for_both(ctx, y, group)

    @staticmethod
    @autocast_off
    def backward(ctx: Any, v: Tensor, _: Any) -> tuple[Tensor | None, ...]:
        y, group = ctx.saved_tensors
        counts = torch.zeros_like(y).scatter_add(1, group, torch.ones_like(y)).clamp(min=1.0)
        gx = _group_mean(v, group, counts)
        glam = None
        if ctx.needs_input_grad[1]:
            # σ at both ends of each entry's group: non-zero only at group boundaries.
            diff = torch.sign(y[:, 1:] - y[:, :-1]).detach()
            t = torch.nn.functional.pad(diff, (1, 0)) - torch.nn.functional.pad(diff, (0, 1))
            glam = -(t * gx).sum(1)  # = −Σ_G c_G Σ_G v
        return gx, glam

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], x: Tensor, lam: Tensor) -> tuple[Any, Any]:
        """Fold the vmapped dimension into the rows: one call on ``V·B`` signals."""
        size = info.batch_size
        xb, lb = batch_first(x, in_dims[0], size), batch_first(lam, in_dims[1], size)
        rows, n = xb.shape[1:]
        y, group = _TotalVariationFunction.apply(
            xb.reshape(size * rows, n), lb.expand(size, rows).reshape(size * rows)
        )
        return (y.reshape(size, rows, n), group.reshape(size, rows, n)), (0, 0)


@float32_inside
def total_variation_1d(x: Tensor, weight: WeightLike, dim: int = -1) -> Tensor:
    """1-D total-variation denoising ``argmin_y ½‖y − x‖² + λ Σ|y_{i+1} − y_i|``.

    Exact forward (Condat's direct algorithm), backward averaging the incoming gradient
    over each fused group, and a gradient for ``λ`` (module docstring).

    Args:
        x: ``(..., n, ...)`` signals, float32 or float64; the signal runs along ``dim``
            and every other dimension is a batch dimension. float16 and bfloat16 are
            solved and differentiated in float32 and the result returned in their dtype.
        weight: ``λ >= 0``: a float, or a tensor broadcastable to the batch shape
            (``x.shape`` without ``dim``); it may require grad.
        dim: the dimension the signal runs along.

    Returns:
        The denoised signals, of ``x``'s shape: piecewise constant along ``dim``.

    Raises:
        TypeError / ValueError: for a non-float ``x``, a bad ``dim``, a negative or
            non-finite ``weight``, or one that does not broadcast to the batch shape.

    Example:
        >>> total_variation_1d(torch.tensor([0.0, 0.2, 3.0, 3.2]), 0.2)
        tensor([0.2000, 0.2000, 3.0000, 3.0000])
    """
    x = check_tensor(x, "x")
    dim = check_dim(x, dim)
    lam = as_param(weight, x, "weight")
    xl = x.movedim(dim, -1)
    batch = xl.shape[:-1]
    try:
        lam_b = lam.expand(batch) if lam.dim() <= len(batch) else None
    except RuntimeError:
        lam_b = None
    if lam_b is None:
        raise ValueError(
            f"weight of shape {tuple(lam.shape)} does not broadcast to the batch shape "
            f"{tuple(batch)} (x.shape {tuple(x.shape)} without dim={dim}). Use a float or "
            "a tensor of the batch shape."
        )
    n = xl.shape[-1]
    rows = xl.reshape(-1, n)
    y, _ = _TotalVariationFunction.apply(rows, lam_b.reshape(-1))
    return y.reshape(xl.shape).movedim(-1, dim)


class TotalVariation1d(nn.Module):
    """Module form of :func:`total_variation_1d` with a (by default learnable) weight.

    Args:
        weight: the initial ``λ >= 0``.
        learnable: make ``λ`` an ``nn.Parameter``.
        dim: the dimension the signal runs along.
    """

    def __init__(self, weight: float = 1.0, learnable: bool = True, dim: int = -1) -> None:
        super().__init__()
        value = torch.tensor(float(weight))
        if not (float(weight) >= 0.0):
            raise ValueError(f"weight must be >= 0; got weight={weight}.")
        if learnable:
            self.weight = nn.Parameter(value)
        else:
            self.register_buffer("weight", value)
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return total_variation_1d(x, self.weight.to(x.dtype), self.dim)

    def extra_repr(self) -> str:
        return f"weight={float(self.weight.detach()):g}, dim={self.dim}"
