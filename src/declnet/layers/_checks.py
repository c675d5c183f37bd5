"""Input checks shared by the standard declarative layers (private)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


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


def check_dim(x: Tensor, dim: Any, name: str = "x") -> int:
    """Return ``dim`` as a non-negative index into ``x`` after checking it."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int; got {dim!r} of type {type(dim).__name__}.")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"dim={dim} is out of range for {name} of shape {tuple(x.shape)}; "
            f"allowed: {-x.dim()} <= dim <= {x.dim() - 1}."
        )
    dim = dim % x.dim()
    if x.shape[dim] == 0:
        raise ValueError(f"{name} has size 0 along dim={dim} (shape {tuple(x.shape)}).")
    return dim


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

