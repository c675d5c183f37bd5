"""What every built-in solver shares: the start, batched derivatives, freezing and reporting.

A solver sees a node only through its contract: ``objective(*xs, y) -> (B,)``,
``equality_constraints(*xs, y) -> (B, p)``, ``inequality_constraints(*xs, y) -> (B, q)``
(``g ≤ 0``) and, for root-finding nodes, ``equations(*xs, y) -> (B, m)``. Derivatives
come from autograd: samples are independent, so the gradient of the batch sum is the batch
of gradients, and Jacobians or Hessians are ``k`` vector-Jacobian products run at once with
``is_grads_batched``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._diagnostics import DeclarativeWarning, check_batched, node_name
from .._solution import Solution

__all__ = [
    "ConvergenceError",
    "Evaluator",
    "Solver",
    "default_tol",
    "iteration_state",
]


class ConvergenceError(RuntimeError):
    """A built-in solver did not converge on some samples and was asked to be strict
    (or the problem has no solution, e.g. an infeasible or unbounded quadratic program)."""


def default_tol(dtype: torch.dtype) -> float:
    """Default stopping tolerance: ``eps^(2/3)`` of the dtype (3.7e-11 in float64, 2.5e-5 in
    float32); Newton-type methods square the error per step, so this is near the floor."""
    return float(torch.finfo(dtype).eps) ** (2.0 / 3.0)


def take(xs: tuple[Any, ...], idx: Tensor | None) -> tuple[Any, ...]:
    """The inputs of the samples ``idx`` (batched tensors are indexed along dimension 0;
    0-d tensors and other inputs are shared and kept)."""
    if idx is None:
        return xs
    return tuple(x[idx] if isinstance(x, Tensor) and x.dim() >= 1 else x for x in xs)


class Evaluator:
    """Batched evaluation of a node's functions at a flat ``y`` of shape ``(B, m)``.

    Args:
        node: the node.
        xs: its inputs (detached).
        shape: the per-sample shape of ``y`` (``y.shape[1:]``).
    """

    def __init__(self, node: Any, xs: tuple[Any, ...], shape: tuple[int, ...]) -> None:
        self.node = node
        self.xs = tuple(x.detach() if isinstance(x, Tensor) else x for x in xs)
        self.shape = tuple(shape)

    def sub(self, idx: Tensor | None) -> Evaluator:
        """The evaluator restricted to the samples ``idx``."""
        if idx is None:
            return self
        out = Evaluator.__new__(Evaluator)
        out.node, out.shape = self.node, self.shape
        out.xs = take(self.xs, idx)
        return out

    def _call(self, name: str, y: Tensor, ndim: int | None) -> Tensor:
        value = getattr(self.node, name)(*self.xs, y=y.reshape(y.shape[0], *self.shape))
        check_batched(self.node, name, value, y.shape[0], ndim)
        return value

    def objective(self, y: Tensor) -> Tensor:
        """``(B,)`` ``f(x, y)``."""
        return self._call("objective", y, 1)

    def equalities(self, y: Tensor) -> Tensor:
        """``(B, p)`` ``h(x, y)``."""
        return self._call("equality_constraints", y, 2)

    def inequalities(self, y: Tensor) -> Tensor:
        """``(B, q)`` ``g(x, y)`` (feasible where ``g ≤ 0``)."""
        return self._call("inequality_constraints", y, 2)

    def equations(self, y: Tensor) -> Tensor:
        """``(B, m)`` the residual of a root-finding node, flattened."""
        value = self._call("equations", y, None)
        return value.reshape(y.shape[0], -1)

    # -- derivatives ------------------------------------------------------------------------
    def value_and_grad(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``f (B,)`` and ``D_Y f (B, m)``."""
        with torch.enable_grad():
            yy = y.detach().requires_grad_(True)
            f = self.objective(yy)
            (g,) = torch.autograd.grad(f.sum(), yy, allow_unused=True)
        return f.detach(), torch.zeros_like(y) if g is None else g


def batched_jacobian(out: Tensor, y: Tensor, create_graph: bool = False) -> Tensor:
    """``(B, k, m)`` Jacobian of ``out (B, k)`` with respect to ``y (B, m)`` by ``k``
    batched vector-Jacobian products (samples are independent)."""
    B, k = out.shape
    if k == 0:
        return y.new_zeros(B, 0, y.shape[1])
    eye = torch.eye(k, dtype=out.dtype, device=out.device).unsqueeze(1).expand(k, B, k)
    (J,) = torch.autograd.grad(out, y, eye, is_grads_batched=True, allow_unused=True,
                               create_graph=create_graph, retain_graph=True)
    if J is None:
        return y.new_zeros(B, k, y.shape[1])
    return J.transpose(0, 1)


def hessian_of(scalar_grad: Tensor, y: Tensor) -> Tensor:
    """``(B, m, m)`` the Jacobian of a gradient ``(B, m)`` built with ``create_graph``."""
    if not scalar_grad.requires_grad:
        return y.new_zeros(y.shape[0], y.shape[1], y.shape[1])
    H = batched_jacobian(scalar_grad, y)
    return 0.5 * (H + H.transpose(1, 2))


@dataclass
class Solver:
    """Base of the built-in solvers: ``solver(node, *xs, y0=None) -> Solution``.

    Args:
        tol: stopping tolerance (default :func:`default_tol` of the dtype).
        max_iter: iteration limit.
        strict: raise :class:`ConvergenceError` instead of warning when some samples do not
            converge.
    """

    tol: float | None = None
    max_iter: int = 100
    strict: bool = False

    def __call__(self, node: Any, *xs: Any, y0: Tensor | None = None) -> Solution:
        with torch.no_grad():
            return self.solve(node, *xs, y0=y0)

    def solve(self, node: Any, *xs: Any, y0: Tensor | None = None) -> Solution:
        """Solve the node's problem for the batch ``xs`` starting from ``y0`` (default
        ``node.initial_guess(*xs)``)."""
        raise NotImplementedError  # abstract

    # -- helpers -----------------------------------------------------------------------------
    def tolerance(self, dtype: torch.dtype) -> float:
        return default_tol(dtype) if self.tol is None else float(self.tol)

    def start(self, node: Any, xs: tuple[Any, ...], y0: Tensor | None) -> Tensor:
        """The starting point ``(B, ...)``: ``y0``, else ``node.initial_guess(*xs)``."""
        if y0 is None:
            guess = getattr(node, "initial_guess", None)
            if guess is None:
                raise TypeError(
                    f"{type(self).__name__} needs a starting point for {node_name(node)}, which "
                    "has no `initial_guess(self, *xs)`. Define it to return a (B, ...) tensor "
                    "of the output's shape, or pass `y0=`."
                )
            y0 = guess(*(x.detach() if isinstance(x, Tensor) else x for x in xs))
        if not isinstance(y0, Tensor) or y0.dim() == 0 or not y0.is_floating_point():
            raise TypeError(
                f"{type(self).__name__}: the starting point for {node_name(node)} must be a "
                f"floating (B, ...) tensor, got "
                f"{type(y0).__name__ if not isinstance(y0, Tensor) else tuple(y0.shape)}."
            )
        for x in xs:
            if isinstance(x, Tensor) and x.dim() >= 1 and x.shape[0] != y0.shape[0]:
                raise ValueError(
                    f"{type(self).__name__}: the starting point for {node_name(node)} has batch "
                    f"size {y0.shape[0]} but an input has shape {tuple(x.shape)}."
                )
        return y0.detach().clone()

    def finish(self, node: Any, y: Tensor, converged: Tensor, iterations: Tensor,
               residual: Tensor, **info: Any) -> dict[str, Any]:
        """Report non-convergence (warn, or raise when ``strict``) and build ``info``."""
        info = {"converged": converged, "iterations": iterations, "residual": residual, **info}
        bad = ~converged
        if bool(bad.any()):
            n = int(bad.sum())
            worst = float(residual[bad].max())
            idx = bad.nonzero().flatten().tolist()
            msg = (f"{node_name(node)}: {type(self).__name__} did not converge on {n} of "
                   f"{converged.numel()} samples (samples {idx[:8]}{'...' if n > 8 else ''}) in "
                   f"{self.max_iter} iterations; worst residual {worst:.3g} (tol "
                   f"{self.tolerance(y.dtype):.3g}). Try a better `initial_guess`, more "
                   "`max_iter`, or another solver.")
            if self.strict:
                raise ConvergenceError(msg)
            import warnings

            warnings.warn(msg, DeclarativeWarning, stacklevel=4)
        return info


def backtrack(merit: Any, y: Tensor, d: Tensor, phi0: Tensor, slope: Tensor,
              steps: int = 30, c: float = 1e-4) -> Tensor:
    """Batched Armijo backtracking: the largest ``t = 2^-k`` with
    ``merit(y + t d) ≤ phi0 + c t slope + 10 eps |phi0|`` per sample (``slope < 0``);
    ``(B,)``. The last term forgives rounding in the merit function, which would otherwise
    stall the search once the decrease predicted by ``slope`` is below ``eps |phi0|``.

    Samples that never satisfy it take the last (smallest) step.
    """
    slack = 10 * float(torch.finfo(y.dtype).eps) * phi0.abs()
    B = y.shape[0]
    t = torch.ones(B, dtype=y.dtype, device=y.device)
    todo = torch.ones(B, dtype=torch.bool, device=y.device)
    for _ in range(steps):
        idx = todo.nonzero().flatten()
        if idx.numel() == 0:
            break
        ti = t[idx]
        phi = merit(idx, y[idx] + ti.unsqueeze(-1) * d[idx])
        ok = torch.isfinite(phi) & (phi <= phi0[idx] + c * ti * slope[idx] + slack[idx])
        todo[idx[ok]] = False
        t[idx[~ok]] = ti[~ok] * 0.5
    return t


def solution(y: Tensor, shape: tuple[int, ...], **kwargs: Any) -> Solution:
    """A :class:`Solution` with ``y`` reshaped to ``(B, *shape)``."""
    return Solution(y.reshape(y.shape[0], *shape), **kwargs)


def iteration_state(y: Tensor, first: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample bookkeeping of a batched iteration on ``y`` ``(B, m)``.

    Returns:
        ``(active, converged, iterations, residual)``: every sample active, none converged,
        ``first`` iterations counted, residuals ``inf``.
    """
    B = y.shape[0]
    active = torch.ones(B, dtype=torch.bool, device=y.device)
    iters = torch.full((B,), first, dtype=torch.long, device=y.device)
    res = torch.full((B,), float("inf"), dtype=y.dtype, device=y.device)
    return active, torch.zeros_like(active), iters, res
