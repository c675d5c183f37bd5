"""Running a node's ``solve``: batch size, detached inputs, and checks of what it returns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._diagnostics import node_name, nonfinite_samples
from ._solution import Solution

__all__ = ["as_solution", "batch_size", "solve_node"]


def batch_size(node: Any, xs: Sequence[Any]) -> int | None:
    """The common first dimension of the batched tensor inputs (None if there are none).

    Raises:
        ValueError: two batched inputs disagree.
    """
    batch: int | None = None
    first = -1
    for i, x in enumerate(xs):
        if isinstance(x, Tensor) and x.dim() >= 1:
            if batch is None:
                batch, first = x.shape[0], i
            elif x.shape[0] != batch:
                raise ValueError(
                    f"{node_name(node)}: inputs must share the batch size (first dimension); "
                    f"input {first} has shape {tuple(xs[first].shape)} but input {i} has shape "
                    f"{tuple(x.shape)}. Inputs shared by the whole batch should be 0-d tensors "
                    "or parameters/buffers of the node."
                )
    return batch


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    if a.device != b.device or a.device.type == "meta":
        return False
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except RuntimeError:  # tensors without storage (e.g. some tensor subclasses)
        return False


def as_solution(node: Any, result: Any, batch: int | None,
                inputs: Sequence[Any] = ()) -> Solution:
    """Check what ``solve`` returned and wrap a bare tensor as a :class:`Solution`.

    A ``y`` that shares memory with one of ``inputs`` (``solve`` returned its input or a
    view of it) is copied, so that later in-place changes of either cannot corrupt the other.

    Raises:
        TypeError: not a tensor / Solution, or not floating point.
        ValueError: wrong batch size, a meta tensor, or NaN/Inf in some samples.
    """
    sol = result if isinstance(result, Solution) else Solution(result)
    y = sol.y
    name = node_name(node)
    if not isinstance(y, Tensor):
        raise TypeError(
            f"{name}.solve must return a tensor y of shape (B, ...) or a declnet.Solution, but "
            f"returned {type(y).__name__}."
        )
    if y.device.type == "meta":
        raise ValueError(
            f"{name}.solve returned a tensor on the meta device (shape {tuple(y.shape)}); it "
            "must return the computed solution on the device of the inputs."
        )
    if y.dim() == 0 or (batch is not None and y.shape[0] != batch):
        raise ValueError(
            f"{name}.solve returned y of shape {tuple(y.shape)}, but the inputs have batch size "
            f"B={batch}; y must have shape (B, ...)."
        )
    if not y.is_floating_point():
        raise TypeError(f"{name}.solve returned y of dtype {y.dtype}; expected a floating dtype.")
    bad = nonfinite_samples(y)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"{name}.solve returned y with NaN or Inf in {len(idx)} of {y.shape[0]} samples "
            f"(samples {idx[:8]}{'...' if len(idx) > 8 else ''}). Check the solver and its "
            "inputs; the implicit gradient is only defined at a solution."
        )
    if any(isinstance(x, Tensor) and _shares_memory(y, x) for x in inputs):
        sol.y = y.clone()
    if sol.multipliers is not None:
        lam = sol.multipliers
        if not isinstance(lam, Tensor):
            raise TypeError(
                f"{name}.solve returned Solution.multipliers of type {type(lam).__name__}; "
                "expected a (B, p + q) tensor."
            )
        bad = nonfinite_samples(lam) if lam.dim() >= 1 and lam.shape[0] else None
        if bad is not None and bool(bad.any()):
            idx = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"{name}.solve returned multipliers with NaN or Inf in {len(idx)} of "
                f"{lam.shape[0]} samples (samples {idx[:8]}). Return finite multipliers, or "
                "none (the engine then recovers them by least squares, eq. 25)."
            )
    return sol


def solve_node(node: Any, xs: Sequence[Any]) -> Solution:
    """Run ``node.solve`` without gradients on detached inputs and validate its output.

    Args:
        node: a declarative node.
        xs: its inputs.

    Returns:
        A :class:`~declnet.Solution` whose ``y`` has been checked (shape, finiteness).
    """
    xs = tuple(xs)
    batch = batch_size(node, xs)
    detached = tuple(x.detach() if isinstance(x, Tensor) else x for x in xs)
    with torch.no_grad():
        result = node.solve(*detached)
    return as_solution(node, result, batch, detached)
