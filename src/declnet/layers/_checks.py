"""Input checks shared by the ready-made layers (pooling, projections, the standard layers).

Every check raises a :class:`TypeError` or :class:`ValueError` whose message says what was
expected, what came, and how to fix it. Nothing here computes a layer's output.

Checks of tensor *values* (a positive α, a finite solution) need the data: a Python ``if``
on them cannot be traced by ``torch.compile(fullgraph=True)``. Such checks are registered
with :func:`value_check` and run through :func:`run_value_check`: at once in eager mode,
and, while ``torch.compile`` traces, as a node of the compiled graph (the side-effecting
custom operator ``declnet::value_check``) that runs the same check, with the same error,
whenever the graph runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import Tensor

from ._functorch import plain

__all__ = [
    "DimLike",
    "RadiusLike",
    "as_param",
    "check_dim",
    "check_floating",
    "check_kind",
    "check_p",
    "check_radius",
    "check_tensor",
    "normalise_dims",
    "pool_alpha",
    "run_value_check",
    "value_check",
]

DimLike = Union[int, Sequence[int]]
RadiusLike = Union[float, int, Tensor]

_KINDS = ("sphere", "ball")

ValueCheck = Callable[[Sequence[Tensor], str], None]
_VALUE_CHECKS: dict[str, ValueCheck] = {}


def value_check(name: str) -> Callable[[ValueCheck], ValueCheck]:
    """Register ``fn(tensors, label)`` as the value check called ``name``.

    ``fn`` receives detached tensors (every sample of a vmapped one) and the caller's
    label (e.g. the layer's name), and raises (or warns) when the values are not allowed.
    """

    def register(fn: ValueCheck) -> ValueCheck:
        if name in _VALUE_CHECKS:
            raise RuntimeError(f"a value check named {name!r} is already registered.")
        _VALUE_CHECKS[name] = fn
        return fn

    return register


@torch.library.custom_op("declnet::value_check", mutates_args=())
def _value_check_op(tensors: list[Tensor], check: str, label: str) -> None:
    """The registered check ``check`` on ``tensors``, as one opaque graph node."""
    _VALUE_CHECKS[check](tensors, label)


@_value_check_op.register_fake
def _(tensors: list[Tensor], check: str, label: str) -> None:
    return None


# The operator returns nothing: mark it as side-effecting so that graph passes keep it.
torch.fx.node.has_side_effect(torch.ops.declnet.value_check.default)


def run_value_check(check: str, label: str, *tensors: Tensor) -> None:
    """Run the value check registered as ``check`` on ``tensors``.

    In eager mode (and under ``torch.func`` transforms, on every sample) it runs now; while
    ``torch.compile`` traces, it is recorded as the operator ``declnet::value_check``, so
    that the compiled graph runs the same check, with the same error, on every call and
    does not break on a data-dependent branch.

    Args:
        check: the name given to :func:`value_check`.
        label: passed to the check (e.g. the layer's name, for the message).
        *tensors: the tensors whose values are checked (not differentiated).
    """
    values = [plain(t.detach()) for t in tensors]
    if torch.compiler.is_compiling():
        _value_check_op(values, check, label)
    else:
        _VALUE_CHECKS[check](values, label)


def check_floating(x: object, what: str) -> Tensor:
    """``x`` itself after checking that it is a floating-point tensor.

    Args:
        x: the layer's input.
        what: the layer's name, for the message.

    Raises:
        TypeError: ``x`` is not a tensor, or not floating point.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: x must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"{what}: x must be a floating-point tensor (float32 or float64), got {x.dtype}; "
            "convert it with x.float()."
        )
    return x


def normalise_dims(x: Tensor, dim: DimLike, name: str = "dim") -> tuple[int, ...]:
    """The dimension(s) ``dim`` of ``x`` as sorted non-negative indices.

    Raises:
        TypeError: ``dim`` is neither an int nor a sequence of ints.
        ValueError: ``dim`` is empty, out of range or names a dimension twice.
    """
    if isinstance(dim, bool) or not isinstance(dim, (int, Sequence)):
        raise TypeError(f"{name} must be an int or a tuple of ints, got {dim!r}.")
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if len(dims) == 0:
        raise ValueError(f"{name} must name at least one dimension, got {dim!r}.")
    nd = x.dim()
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"{name} must be an int or a tuple of ints, got {dim!r}.")
        if not -nd <= d < nd:
            raise ValueError(
                f"{name}={d} is out of range for an input of shape {tuple(x.shape)} "
                f"({nd} dimensions): allowed values are {-nd}..{nd - 1}."
            )
        out.append(d % nd)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={dim!r} names the same dimension twice.")
    return tuple(sorted(out))


def check_dim(x: Any, dim: Any) -> int:
    """Check a projection's input and return ``dim`` as a non-negative index.

    Raises:
        TypeError: ``x`` is not a floating tensor, or ``dim`` is not an int.
        ValueError: ``x`` is 0-d, ``dim`` is out of range, or ``x`` is empty along it.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"x must have a floating-point dtype; got {x.dtype}. Convert it with x.float()."
        )
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int; got {dim!r} of type {type(dim).__name__}.")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension to project along; got a 0-d tensor.")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"dim={dim} is out of range for x of shape {tuple(x.shape)}; "
            f"allowed: {-x.dim()} <= dim <= {x.dim() - 1}."
        )
    dim = dim % x.dim()
    if x.shape[dim] == 0:
        raise ValueError(
            f"x has size 0 along dim={dim} (shape {tuple(x.shape)}); nothing to project."
        )
    return dim


def check_p(p: Any) -> float:
    """``p`` as a float after checking that it names an Lp norm (``p ≥ 1``).

    Raises:
        TypeError: ``p`` is not a real number.
        ValueError: ``p < 1`` or NaN.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(
            f"p must be a real number (1, 2, math.inf or any p > 1); got {p!r} "
            f"of type {type(p).__name__}."
        )
    p = float(p)
    if math.isnan(p) or p < 1.0:
        raise ValueError(
            f"p must be >= 1 so that ‖·‖_p is a norm and the ball is convex; got p={p}. "
            "Allowed: 1, 2, math.inf, or any real p in (1, inf)."
        )
    return p


def check_kind(kind: Any) -> str:
    """``kind`` after checking that it is ``"sphere"`` or ``"ball"``."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'sphere' or 'ball'; got {kind!r}.")
    return kind


def check_radius(radius: Any, x: Tensor, dim: int, name: str = "radius") -> float | Tensor:
    """The radius as a float or as a tensor broadcastable to ``x`` with size 1 at ``dim``.

    A tensor radius may broadcast against the batch shape (``x.shape`` without ``dim``) or
    against ``x.shape`` with size 1 at ``dim``.

    Raises:
        TypeError: a bool or a non-number.
        ValueError: a value that is not finite and positive, another device, or a shape that
            does not broadcast.
    """
    if isinstance(radius, bool):
        raise TypeError(f"{name} must be a positive float or tensor; got {radius!r}.")
    if isinstance(radius, (int, float)):
        radius = float(radius)
        if not (radius > 0.0 and math.isfinite(radius)):  # also rejects NaN
            raise ValueError(f"{name} must be > 0 and finite; got {name}={radius}.")
        return radius
    if not isinstance(radius, Tensor):
        raise TypeError(f"{name} must be a positive float or tensor; got {type(radius).__name__}.")
    if radius.device != x.device:
        raise ValueError(f"{name} is on {radius.device} but x is on {x.device}; move one of them.")
    radius = radius.to(x.dtype)
    batch_shape = x.shape[:dim] + x.shape[dim + 1 :]
    if radius.dim() == x.dim():
        if radius.shape[dim] != 1:
            raise ValueError(
                f"{name} of shape {tuple(radius.shape)} has as many dimensions as x "
                f"{tuple(x.shape)}, so it must have size 1 along dim={dim}."
            )
        keepdim = radius
    else:
        try:
            ok = torch.broadcast_shapes(radius.shape, batch_shape) == batch_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} of shape {tuple(radius.shape)} does not broadcast to the batch shape "
                f"{tuple(batch_shape)} (x.shape {tuple(x.shape)} without dim={dim}). "
                "Use a float, a tensor of the batch shape, or one with size 1 at dim."
            )
        lead = (1,) * (len(batch_shape) - radius.dim())
        keepdim = radius.reshape(lead + tuple(radius.shape)).unsqueeze(dim)
    try:
        ok = torch.broadcast_shapes(keepdim.shape, x.shape) == x.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} of shape {tuple(radius.shape)} does not broadcast to x of shape "
            f"{tuple(x.shape)} with size 1 along dim={dim}."
        )
    run_value_check("radius", name, keepdim)
    return keepdim


@value_check("radius")
def _check_radius_values(tensors: Sequence[Tensor], name: str) -> None:
    (radius,) = tensors
    bad = ~((radius > 0) & torch.isfinite(radius))  # also catches NaN
    if bool(bad.any()):
        raise ValueError(
            f"every entry of {name} must be > 0 and finite; got "
            f"{name} = {radius.flatten()[bad.flatten()][0].item()}."
        )


def pool_alpha(
    alpha: float | Tensor | None,
    owner: str,
    out_shape: tuple[int, ...],
    rows: int,
    x: Tensor,
    kept_dims: tuple[int, ...] = (),
) -> Tensor:
    """A pooling penalty's ``α`` as a 0-d tensor or as ``(rows, 1)``, in x's dtype.

    A tensor ``α`` must broadcast to ``out_shape``, or (with ``keepdim``) to ``out_shape``
    with size-1 dimensions inserted at ``kept_dims``; it stays differentiable. A penalty
    without a scale (``α`` is ``None``) gets ``α = 1``.

    Raises:
        ValueError: ``α`` is not positive and finite everywhere, or does not broadcast.
    """
    if alpha is None:
        return torch.ones((), dtype=x.dtype, device=x.device)
    if not isinstance(alpha, Tensor):
        return torch.tensor(float(alpha), dtype=x.dtype, device=x.device)
    run_value_check("pool_alpha", owner, alpha)
    alpha = alpha.to(device=x.device, dtype=x.dtype)
    if alpha.numel() == 1:
        return alpha.reshape(())
    kept_shape = list(out_shape)
    for d in kept_dims:
        kept_shape.insert(d, 1)
    for target, squeeze in ((out_shape, False), (tuple(kept_shape), bool(kept_dims))):
        if alpha.dim() > len(target):
            continue
        try:
            expanded = alpha.expand(target)
        except RuntimeError:
            continue
        if squeeze:
            expanded = expanded.squeeze(kept_dims)
        return expanded.reshape(rows, 1)
    raise ValueError(
        f"alpha of shape {tuple(alpha.shape)} does not broadcast to the pooled output "
        f"shape {out_shape}; use a scalar or a tensor broadcastable to it."
    )


@value_check("pool_alpha")
def _check_pool_alpha_values(tensors: Sequence[Tensor], owner: str) -> None:
    (values,) = tensors  # every sample of a vmapped alpha
    if bool((~(values > 0)).any()) or not bool(torch.isfinite(values).all()):
        raise ValueError(
            f"{owner}: alpha must be positive and finite everywhere, got "
            f"min {values.min().item():.3g} (a learnable alpha may have left the "
            "allowed range: parametrise it, e.g. alpha = softplus(raw))."
        )


def check_tensor(x: Any, name: str, min_dim: int = 1) -> Tensor:
    """Check that ``x`` is a floating-point tensor with at least ``min_dim`` dimensions."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must have a floating-point dtype (float32 or float64); got {x.dtype}. "
            f"Convert it with {name}.double() or {name}.float()."
        )
    if x.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimension(s); got shape {tuple(x.shape)}."
        )
    return x


def as_param(value: Any, like: Tensor, name: str, *, positive: bool = False) -> Tensor:
    """A float or tensor parameter as a tensor of ``like``'s dtype and device.

    Checks that it is finite and ``>= 0`` (``> 0`` when ``positive``).
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a tensor; got {value!r}.")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite; got {name}={value}.")
        value = torch.tensor(float(value), dtype=like.dtype, device=like.device)
    elif not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a float or a tensor; got {type(value).__name__}.")
    elif value.device != like.device:
        raise ValueError(
            f"{name} is on {value.device} but the input is on {like.device}; move one of them."
        )
    value = value.to(like.dtype)
    bound = "> 0" if positive else ">= 0"
    bad = ~torch.isfinite(value) | ((value <= 0) if positive else (value < 0))
    if bool(bad.any()):
        first = value.detach().reshape(-1)[bad.reshape(-1)][0].item()
        raise ValueError(f"every entry of {name} must be finite and {bound}; got {name}={first}.")
    return value
