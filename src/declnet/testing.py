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
from ._implicit import implicit_vjp, optimality_residual
from ._running import solve_node
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
    node: Any, xs: Sequence[Any], grad_y: Tensor, eps: float = 1e-6,
    wrt: Sequence[bool] | None = None,
) -> tuple[Tensor | None, ...]:
    """``grad_y · Dy(x)`` by central differences of ``node.solve``.

    Perturbs one coordinate of every sample at once (samples are independent), so it
    costs two solves per input coordinate of one sample, not per batch element.

    Args:
        node: a declarative node.
        xs: inputs; every floating tensor is differentiated (0-d tensors too) unless
            ``wrt`` says otherwise.
        grad_y: ``(B, ...)`` shaped like ``y``.
        eps: step size (use float64 inputs).
        wrt: which inputs to differentiate (default: every floating tensor).

    Returns:
        One tensor per input shaped like it (``None`` for inputs not differentiated).
    """
    xs = list(xs)
    out: list[Tensor | None] = []
    for i, x in enumerate(xs):
        if not (isinstance(x, Tensor) and x.is_floating_point()) or (wrt is not None
                                                                     and not wrt[i]):
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


def _finite_difference_params(node: Any, xs: Sequence[Any], grad_y: Tensor, eps: float,
                              params: Sequence[Tensor]) -> list[Tensor]:
    """``grad_y · Dy(θ)`` by central differences for each parameter ``θ`` of the node."""
    out = []
    for p in params:
        grad = torch.zeros_like(p)
        flat, gflat = p.data.view(-1), grad.view(-1)
        for j in range(flat.numel()):
            keep = flat[j].item()
            vals = []
            for sign in (1.0, -1.0):
                flat[j] = keep + sign * eps
                vals.append(solve_node(node, xs).y)
            flat[j] = keep
            gflat[j] = (grad_y * (vals[0] - vals[1])).sum() / (2 * eps)
        out.append(grad)
    return out


def _probe(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fixed, irregular probe direction that no random draw of the user's reproduces."""
    n = 1
    for s in shape:
        n *= s
    k = torch.arange(n, dtype=torch.float64)
    probe = torch.sin(2.399963229728653 * k + 0.5) + 0.25 * torch.cos(0.7071 * k * k + 1.0)
    return probe.reshape(shape).to(dtype=dtype, device=device)


@dataclass
class GradientCheck:
    """Result of :func:`check_gradients`.

    Attributes:
        passed: every error is within tolerance.
        max_abs_error: largest ``|implicit − finite difference|`` over all inputs.
        max_rel_error: that error relative to ``max |finite difference|`` (per input).
        implicit: the implicit gradients, one per input (then one per parameter checked).
        numerical: the finite-difference gradients, in the same order.
        names: what each entry is (``"input 0"``, ``"parameter W"``, ...).
        failed: the names of the entries that failed.
    """

    passed: bool
    max_abs_error: float
    max_rel_error: float
    implicit: tuple[Tensor | None, ...]
    numerical: tuple[Tensor | None, ...]
    names: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()

    def __str__(self) -> str:
        status = "passed" if self.passed else "FAILED"
        where = f" (failed: {', '.join(self.failed)})" if self.failed else ""
        return (f"gradient check {status}: max abs error {self.max_abs_error:.3e}, "
                f"max rel error {self.max_rel_error:.3e}{where}")


def check_gradients(
    node: Any,
    *xs: Any,
    grad_y: Tensor | None = None,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    raise_exception: bool = True,
    wrt: Sequence[int] | None = None,
    parameters: bool = True,
) -> GradientCheck:
    """Compare a node's implicit gradient with finite differences of its ``solve``.

    Args:
        node: a declarative node.
        *xs: its inputs; use float64 for meaningful tolerances.
        grad_y: the vector ``v`` of ``v · Dy``; by default a fixed irregular direction
            (not a random draw, which could coincide with the user's own inputs).
        eps: finite-difference step.
        atol: absolute tolerance.
        rtol: tolerance relative to the largest finite-difference entry of each input.
        raise_exception: raise ``AssertionError`` with the report when the check fails.
        wrt: indices of the inputs to check (default: every floating-point tensor input).
        parameters: also check the node's learnable parameters (``nn.Parameter`` s that
            require grad).

    Returns:
        A :class:`GradientCheck` with the worst errors and the names of what failed.

    Raises:
        AssertionError: the gradients disagree and ``raise_exception`` is True.
        ValueError: ``wrt`` names an input that is not a floating-point tensor.

    Example:
        >>> report = declnet.testing.check_gradients(node, x.double())
        >>> print(report)   # gradient check passed: max abs error 3.1e-10, ...
    """
    floating = [isinstance(x, Tensor) and x.is_floating_point() for x in xs]
    if wrt is None:
        need = floating
    else:
        need = [False] * len(xs)
        for i in wrt:
            if not (isinstance(i, int) and -len(xs) <= i < len(xs)) or not floating[i]:
                raise ValueError(
                    f"check_gradients: wrt must list indices of floating-point tensor inputs "
                    f"(0..{len(xs) - 1}); got {i!r}."
                )
            need[i] = True
    solution = solve_node(node, xs)
    y = solution.y
    if grad_y is None:
        grad_y = _probe(y.shape, y.dtype, y.device)
    params = [p for p in node.parameters() if p.requires_grad] if parameters and isinstance(
        node, torch.nn.Module) else []
    grads = implicit_vjp(node, *xs, y=y, grad_y=grad_y, solution=solution, params=params,
                         wrt=need)
    implicit = list(grads[:len(xs)])
    numerical = list(finite_difference_vjp(node, xs, grad_y, eps, wrt=need))
    names = [f"input {i}" for i in range(len(xs))]
    if params:
        implicit += list(grads[len(xs):])
        numerical += _finite_difference_params(node, xs, grad_y, eps, params)
        lookup = {id(p): n for n, p in node.named_parameters()}
        names += [f"parameter {lookup.get(id(p), '?')}" for p in params]
    max_abs = max_rel = 0.0
    failed = []
    for name, imp, num in zip(names, implicit, numerical):
        if num is None:
            continue
        imp = torch.zeros_like(num) if imp is None else imp
        err = float((imp - num).abs().max()) if num.numel() else 0.0
        scale = float(num.abs().max()) if num.numel() else 0.0
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / scale if scale > 0 else err)
        if not err <= atol + rtol * scale:
            failed.append(name)
    report = GradientCheck(not failed, max_abs, max_rel, tuple(implicit), tuple(numerical),
                           tuple(names), tuple(failed))
    if raise_exception and failed:
        raise AssertionError(f"{node_name(node)}: {report}")
    return report
