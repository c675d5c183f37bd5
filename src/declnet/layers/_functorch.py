"""Small helpers that let the layers run under ``torch.func`` transforms (vmap, grad).

Every layer's autograd Function has a ``vmap`` staticmethod that folds the vmapped
dimension into the layer's own batch dimension (the layers are natively batched, so a
vmapped call is one batched call). The input checks of the public functions read their
verdict through :func:`plain`, so that they still run, unchanged, when the checked tensor
is a vmapped one (``bool()`` of a vmapped tensor is not allowed).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batch_first", "differentiable_backward", "plain", "surely_none", "transforms_active"]


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp, ...) is running."""
    return bool(torch._C._are_functorch_transforms_active())


def plain(t: Tensor) -> Tensor:
    """``t`` without its ``torch.func`` wrappers (for a vmapped tensor: all its samples,
    the vmapped dimensions first).

    For validation only: the result is not connected to any transform, so a check such as
    ``bool(plain(bad).any())`` tests every sample of a vmapped call.
    """
    if not transforms_active():
        return t
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        bdim = functorch.maybe_get_bdim(t) if functorch.is_batchedtensor(t) else None
        t = functorch.get_unwrapped(t)
        if bdim is not None and bdim >= 0:
            t = t.movedim(bdim, 0)
    return t


def batch_first(t: Tensor, bdim: int | None, size: int) -> Tensor:
    """``t`` with its vmapped dimension ``bdim`` moved first, or expanded to ``size`` there
    when ``t`` is not vmapped (``bdim`` is None)."""
    if bdim is None:
        return t.expand(size, *t.shape)
    return t.movedim(bdim, 0)


def differentiable_backward() -> bool:
    """Whether a backward must be built from differentiable, traceable torch operations:
    when it is itself differentiated (``create_graph=True``: grad mode is on inside the
    backward), traced by ``torch.compile``, or run under a ``torch.func`` transform."""
    return torch.is_grad_enabled() or torch.compiler.is_compiling() or transforms_active()


def surely_none(mask: Tensor) -> bool:
    """Whether no entry of ``mask`` is set, for skipping a fix-up on a fast path.

    In eager mode this reads the mask (one device sync). While ``torch.compile`` traces it
    is ``False`` without reading it, so the fix-up, which must then leave the result as it
    would be without it, is part of the graph (a data-dependent branch would break it).
    """
    return not torch.compiler.is_compiling() and not bool(mask.any())
