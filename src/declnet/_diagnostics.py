"""Warnings, errors and optimality residuals with messages that name the node."""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DeclarativeWarning",
    "OptimalityResidual",
    "check_batched",
    "node_name",
    "warn",
]


class DeclarativeWarning(UserWarning):
    """Numerical trouble in a declarative node (a fallback was used, a solve did not
    converge, the solver's output is not optimal). The message names the node."""


class OptimalityResidual(NamedTuple):
    """First-order optimality residuals of a node's solution, per sample.

    Attributes:
        stationarity: ``(B,)`` ``‖D_Y L(x, y, λ)‖`` with ``L = f − λᵀ h̃`` over the active set.
        equality: ``(B,)`` ``‖h(x, y)‖`` (zeros when the node has no equalities).
        inequality: ``(B,)`` ``max_i max(g_i(x, y), 0)`` (zeros when it has no inequalities).
        dual: ``(B,)`` ``max_i max(λ_i, 0)`` over active inequalities: their multipliers must
            be ``≤ 0`` in the paper's convention (Prop. 4.6).
        multipliers: ``(B, p + q)`` the multipliers used (zeros for inactive inequalities).
    """

    stationarity: Tensor
    equality: Tensor
    inequality: Tensor
    dual: Tensor
    multipliers: Tensor

    def worst(self) -> float:
        """The largest residual over all samples and kinds."""
        return max(float(t.max()) if t.numel() else 0.0 for t in self[:4])


def node_name(node: Any) -> str:
    """The name used for a node in messages (its class name)."""
    return type(node).__name__


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside declnet and torch (the user's line)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        inside = path.startswith(_PACKAGE_DIR + os.sep) or path.startswith(_TORCH_DIR + os.sep)
        # Frames of the package's own tests and user nodes are outside both directories.
        if not inside:
            return level
        frame = frame.f_back
        level += 1
    return level


def warn(node: Any, message: str, stacklevel: int | None = None) -> None:
    """Issue a :class:`DeclarativeWarning` prefixed with the node's name.

    The warning points at the first line outside declnet and torch (the user's call or
    their ``backward()``) unless ``stacklevel`` is given.
    """
    level = _user_stacklevel() if stacklevel is None else stacklevel
    warnings.warn(f"{node_name(node)}: {message}", DeclarativeWarning, stacklevel=level)


def check_batched(node: Any, what: str, value: Any, batch: int, ndim: int | None) -> Tensor:
    """Check that a user function returned a tensor of shape ``(batch, ...)``.

    Args:
        node: the node (for the message).
        what: what was evaluated, e.g. ``"objective"``.
        value: what the user's function returned.
        batch: expected size of the first dimension.
        ndim: expected number of dimensions (None: any ``>= 1``).

    Returns:
        ``value`` unchanged.

    Raises:
        TypeError: ``value`` is not a tensor.
        ValueError: wrong number of dimensions or batch size.
    """
    name = node_name(node)
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{name}.{what} must return a torch.Tensor, but returned {type(value).__name__}."
        )
    expected = {1: "(B,)", 2: "(B, k)"}.get(ndim or 0, "(B, ...)")
    if (ndim is not None and value.dim() != ndim) or value.dim() == 0 or value.shape[0] != batch:
        hint = ""
        if what == "objective" and value.dim() == 0:
            hint = " Return one value per sample: reduce over every dimension but the first."
        elif what == "objective" and value.dim() > 1:
            hint = " Sum over the non-batch dimensions, e.g. `.sum(-1)`."
        elif what.endswith("constraints") and value.dim() == 1:
            hint = " Use `keepdim=True` or `.unsqueeze(-1)` for a single constraint."
        raise ValueError(
            f"{name}.{what} must return a tensor of shape {expected} with B={batch}, "
            f"but returned shape {tuple(value.shape)}.{hint}"
        )
    return value


def nonfinite_samples(y: Tensor) -> Tensor:
    """``(B,)`` True where a sample of ``y`` has a NaN or Inf."""
    return ~torch.isfinite(y.reshape(y.shape[0], math.prod(y.shape[1:]))).all(-1)
