"""Half precision and autocast for the ready-made layers (private).

The layers' solvers and backward formulas need more precision than float16 or bfloat16
carry (factorisations, interior-point and Sinkhorn iterations), and several of the
operations they use have no half-precision kernels. As for declarative nodes
(:class:`declnet.DeclarativeFunction`), a layer given a float16 or bfloat16 input works in
float32 with autocast off, and returns its result in that half dtype:

- :func:`float32_inside` wraps a layer's public function: half-precision tensor
  arguments are cast to float32, the body runs with autocast disabled, and floating
  tensor results are cast back. The casts are ordinary differentiable operations, so
  the layer's ``autograd.Function`` sees float32 inputs and float32 incoming gradients,
  and each input's gradient comes back in that input's dtype.
- :func:`autocast_off` wraps an ``autograd.Function.backward``: the backward runs with
  autocast disabled even when ``.backward()`` is called inside an autocast region
  (autograd runs a backward under the caller's autocast state).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from .._function import _low_precision, _no_autocast, _upcast

__all__ = ["autocast_off", "float32_inside", "half_dtype"]

F = TypeVar("F", bound=Callable[..., Any])


def half_dtype(*xs: Any) -> torch.dtype | None:
    """The float16 / bfloat16 dtype of the first such tensor among ``xs``, else None."""
    return _low_precision(xs)


def _restore(out: Any, low: Any) -> Any:
    """``out`` (a tensor, or a tuple whose tensors are cast) in the half dtype ``low``."""
    if isinstance(out, Tensor):
        return out.to(low) if out.is_floating_point() else out
    if isinstance(out, tuple):
        return tuple(_restore(o, low) if isinstance(o, Tensor) else o for o in out)
    return out


def _autocast_on(t: Tensor) -> bool:
    """Whether autocast is enabled for ``t``'s device type."""
    kind = t.device.type
    return kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind)


def float32_inside(fn: F) -> F:
    """Run a layer function in float32 with autocast off; results in the inputs' half dtype.

    When any tensor argument (positional or keyword) is float16 or bfloat16, every such
    argument is cast to float32 and the floating-point tensors of the result (a tensor, or
    the tensors of a tuple) are cast to that half dtype. Autocast (of the first tensor's
    device type) is disabled while the function runs, so float32 inputs under
    ``torch.autocast`` give float32 results computed in float32.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        low = _low_precision(tuple(tensors))
        if low is None and not (tensors and _autocast_on(tensors[0])):
            return fn(*args, **kwargs)  # the common case: nothing to do
        if low is not None:
            args = tuple(_upcast(args))
            keys = list(kwargs)
            kwargs = dict(zip(keys, _upcast([kwargs[k] for k in keys])))
        with _no_autocast(tensors):
            out = fn(*args, **kwargs)
        return out if low is None else _restore(out, low)

    return wrapper  # type: ignore[return-value]


def autocast_off(backward: F) -> F:
    """Run an ``autograd.Function`` backward with autocast disabled (on the gradients'
    device)."""

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> Any:
        first = next((g for g in grads if isinstance(g, Tensor)), None)
        if first is None or not _autocast_on(first):
            return backward(ctx, *grads)
        with _no_autocast(grads):
            return backward(ctx, *grads)

    return wrapper  # type: ignore[return-value]
