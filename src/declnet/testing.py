"""Tools to check declarative nodes: finite differences, gradient checks and residuals.

The zoo (``QuadraticNode``, ``UnitSphereProjection``, ...) holds the paper's examples, each
with a ``closed_form_jacobian``. Use :func:`check_gradients` on every node you write: it
compares the implicit gradient against central finite differences of the node's own
``solve``, which catches both a wrong objective/constraint and a solver that does not
return a minimiser.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._diagnostics import node_name
from ._function import solve_node
from ._implicit import _vjp, optimality_residual
from ._zoo import (
    BallHalfspaceProjection,
    CircleLinearObjective,
    CubicFeasibility,
    ImperativeAsDeclarative,
    L2BallProjection,
    MinKLOnSimplex,
    PolynomialNode,
    PseudoHuberRegression,
    QuadraticNode,
    SingularAlignment,
    UnitSphereProjection,
)

__all__ = [
    "BallHalfspaceProjection",
    "CircleLinearObjective",
    "CubicFeasibility",
    "GradientCheck",
    "ImperativeAsDeclarative",
    "L2BallProjection",
    "MinKLOnSimplex",
    "PolynomialNode",
    "PseudoHuberRegression",
    "QuadraticNode",
    "SingularAlignment",
    "UnitSphereProjection",
    "check_gradients",
    "finite_difference_vjp",
    "optimality_residual",
]


def finite_difference_vjp(
    node: Any, xs: Sequence[Any], grad_y: Tensor, eps: float = 1e-6
) -> tuple[Tensor | None, ...]:
    """``grad_y · Dy(x)`` by central differences of ``node.solve``.

    Perturbs one coordinate of every sample at once (samples are independent), so it
    costs two solves per input coordinate of one sample, not per batch element.

    Args:
        node: a declarative node.
        xs: inputs; every floating tensor is differentiated (0-d tensors too).
        grad_y: ``(B, ...)`` shaped like ``y``.
        eps: step size (use float64 inputs).

    Returns:
        One tensor per input shaped like it (``None`` for non-float inputs).
    """
    xs = list(xs)
    out: list[Tensor | None] = []
    for i, x in enumerate(xs):
        if not (isinstance(x, Tensor) and x.is_floating_point()):
            out.append(None)
            continue
        x0 = x.detach()
        shared = x0.dim() == 0
        flat = x0.reshape(1, 1) if shared else x0.reshape(x0.shape[0], -1)
        grad = torch.zeros_like(flat)
        for j in range(flat.shape[1]):
            vals = []
            for sign in (1.0, -1.0):
                pert = flat.clone()
                pert[:, j] += sign * eps
                xs_p = [*xs[:i], pert.reshape(x0.shape), *xs[i + 1:]]
                vals.append(solve_node(node, xs_p).y)
            dy = (vals[0] - vals[1]) / (2 * eps)
            prod = (grad_y * dy).reshape(dy.shape[0], -1).sum(-1)
            grad[:, j] = prod.sum() if shared else prod
        out.append(grad.reshape(x0.shape))
    return tuple(out)


@dataclass
class GradientCheck:
    """Result of :func:`check_gradients`.

    Attributes:
        passed: every error is within tolerance.
        max_abs_error: largest ``|implicit − finite difference|`` over all inputs.
        max_rel_error: that error relative to ``max |finite difference|`` (per input).
        implicit: the implicit gradients, one per input.
        numerical: the finite-difference gradients, one per input.
    """

    passed: bool
    max_abs_error: float
    max_rel_error: float
    implicit: tuple[Tensor | None, ...]
    numerical: tuple[Tensor | None, ...]

    def __str__(self) -> str:
        status = "passed" if self.passed else "FAILED"
        return (f"gradient check {status}: max abs error {self.max_abs_error:.3e}, "
                f"max rel error {self.max_rel_error:.3e}")


def check_gradients(
    node: Any,
    *xs: Any,
    grad_y: Tensor | None = None,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    raise_exception: bool = True,
    seed: int = 0,
) -> GradientCheck:
    """Compare a node's implicit gradient with finite differences of its ``solve``.

    Args:
        node: a declarative node.
        *xs: its inputs; use float64 for meaningful tolerances.
        grad_y: the vector ``v`` of ``v · Dy``; random (seeded) if None.
        eps: finite-difference step.
        atol: absolute tolerance.
        rtol: tolerance relative to the largest finite-difference entry of each input.
        raise_exception: raise ``AssertionError`` with the report when the check fails.
        seed: seed of the random ``grad_y``.

    Returns:
        A :class:`GradientCheck` with the worst errors.

    Raises:
        AssertionError: the gradients disagree and ``raise_exception`` is True.

    Example:
        >>> report = declnet.testing.check_gradients(node, x.double())
        >>> print(report)   # gradient check passed: max abs error 3.1e-10, ...
    """
    solution = solve_node(node, xs)
    y = solution.y
    if grad_y is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        grad_y = torch.randn(y.shape, generator=gen, dtype=y.dtype).to(y.device)
    need = [isinstance(x, Tensor) and x.is_floating_point() for x in xs]
    implicit, _ = _vjp(node, xs, y, grad_y, solution, (), None, need)
    numerical = finite_difference_vjp(node, xs, grad_y, eps)
    max_abs = max_rel = 0.0
    passed = True
    for imp, num in zip(implicit, numerical):
        if num is None:
            continue
        imp = torch.zeros_like(num) if imp is None else imp
        err = float((imp - num).abs().max()) if num.numel() else 0.0
        scale = float(num.abs().max()) if num.numel() else 0.0
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / scale if scale > 0 else err)
        passed = passed and err <= atol + rtol * scale
    report = GradientCheck(passed, max_abs, max_rel, tuple(implicit), numerical)
    if raise_exception and not passed:
        raise AssertionError(f"{node_name(node)}: {report}")
    return report

