"""Declarative nodes: the user's contract.

A node's output is ``y(x) ∈ argmin_u f(x, u)`` subject to optional constraints. The
user subclasses one of the node classes here, writes the objective (and constraints)
as batched PyTorch code, and a ``solve`` that finds ``y`` by any algorithm; the
library differentiates ``y`` by implicit differentiation of the optimality
conditions (Propositions 4.4–4.6 of the paper).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ._diagnostics import check_batched, node_name
from ._implicit import jacobian as _jacobian
from ._modes import ImplicitBackward, UnrolledBackward, check_mode
from ._solution import Solution
from .solvers import default_solver

__all__ = [
    "DeclarativeNode",
    "EqualityConstrainedNode",
    "InequalityConstrainedNode",
    "LinearEqualityConstrainedNode",
    "declarative",
]


class DeclarativeNode(nn.Module):
    """An unconstrained declarative node, ``y(x) ∈ argmin_u f(x, u)`` (Prop. 4.4).

    Subclasses implement

    - ``objective(*xs, y) -> (B,)``: the objective for each sample, batched; ``y`` is passed
      by keyword and has the shape that ``solve`` returns, ``(B, ...)``.
    - ``solve(*xs) -> y or Solution``: any algorithm at all, run under ``torch.no_grad()``;
      or no ``solve`` at all and ``initial_guess(*xs) -> y0``, and a built-in batched solver
      runs (``solver=`` chooses it; by default one is picked from the node's kind and size).

    Optionally, ``hessian(*xs, y, multipliers)`` returns the Hessian of the Lagrangian at
    ``y`` — a dense ``(B, m, m)`` tensor or a :class:`~declnet.LinearOperator` (e.g.
    :class:`~declnet.DiagonalOperator`), or None to declare nothing — and the backward pass
    chooses its solver from that structure (``docs/concepts.md``); ``Solution.hessian``
    from ``solve`` does the same and wins. Constrained nodes may likewise return the
    constraint Jacobian ``D_Y h̃`` ``(B, p + q, m)`` (equalities first) from
    ``constraint_jacobian(*xs, y)``, dense or as a sparse COO tensor (then, with a
    diagonal Hessian, the Schur complement is formed from its entries).

    Calling the node solves and returns a differentiable ``y``; its backward pass solves
    one linear system per sample (the Hessian of the objective, or the KKT matrix for
    constrained nodes) and never back-propagates through ``solve``.

    Inputs: every tensor input with at least one dimension is batched along its first
    dimension, and all of them must share the batch size ``B``; samples are independent.
    0-d tensors and non-tensor inputs are shared by the whole batch. Inputs that do not
    require grad, and non-tensor inputs, get no gradient. Learnable parameters of the node
    (its ``nn.Parameter`` s used inside the objective or constraints) get gradients too.

    Args:
        backward: how to differentiate, an :class:`~declnet.ImplicitBackward` (the default)
            or :class:`~declnet.UnrolledBackward`.
        check_optimality: after each solve, compute the first-order optimality residual
            and warn (:class:`~declnet.DeclarativeWarning`) when it exceeds
            ``optimality_tol``; a wrong ``y`` is the most common user error.
        optimality_tol: tolerance for that check, relative to ``1 + ‖D_Y f‖`` (default
            ``sqrt(eps)`` of the dtype, times 10).
        solver: the forward solver used when the class has no ``solve`` (a
            :mod:`declnet.solvers` solver such as ``declnet.solvers.Newton()``); a
            user-written ``solve`` wins.
        strict: raise instead of warning when the default solver does not converge.

    Example:
        >>> class Mean(declnet.DeclarativeNode):
        ...     def objective(self, x, *, y):          # (B, n), (B, 1) -> (B,)
        ...         return 0.5 * ((y - x) ** 2).sum(-1)
        ...     def solve(self, x):
        ...         return x.mean(-1, keepdim=True)
        >>> x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
        >>> Mean()(x).sum().backward()                 # x.grad == 1/10 everywhere
    """

    #: The kinds of constraints the class may define ("equality", "inequality").
    _constraint_kinds: ClassVar[frozenset[str]] = frozenset()
    #: True for nodes with fixed linear constraints ``A y = d`` (no multipliers needed).
    _linear_constraints: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for kind, base in (("equality", "EqualityConstrainedNode (or InequalityConstrainedNode)"),
                           ("inequality", "InequalityConstrainedNode")):
            if f"{kind}_constraints" in cls.__dict__ and kind not in cls._constraint_kinds:
                raise TypeError(
                    f"{cls.__name__} defines `{kind}_constraints`, but derives from "
                    f"{cls.__mro__[1].__name__}, which has no {kind} constraints: they would be "
                    f"ignored. Derive from declnet.{base} instead."
                )

    def __init__(
        self,
        *,
        backward: Any = None,
        check_optimality: bool = False,
        optimality_tol: float | None = None,
        solver: Any = None,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if solver is not None and not callable(solver):
            raise TypeError(
                f"{node_name(self)}: solver must be a declnet.solvers solver (called as "
                f"solver(node, *xs) -> Solution), got {type(solver).__name__}."
            )
        self.solver = solver
        self.strict = bool(strict)
        if backward is not None and not isinstance(backward, (ImplicitBackward,
                                                                UnrolledBackward)):
            raise TypeError(
                f"{node_name(self)}: backward must be declnet.ImplicitBackward(...) or "
                f"declnet.UnrolledBackward(), got {type(backward).__name__}."
            )
        self.backward_mode = ImplicitBackward() if backward is None else backward
        self.check_optimality = check_optimality
        self.optimality_tol = optimality_tol

    # -- the user's part -------------------------------------------------------------------
    def objective(self, *xs: Any, y: Tensor) -> Tensor:
        """The objective ``f(x, y)`` for each sample, shape ``(B,)``. Abstract: subclasses
        implement it (constrained nodes may omit it for a feasibility problem)."""
        raise NotImplementedError(  # abstract
            f"{node_name(self)} must implement `objective(self, *xs, y)` returning a (B,) "
            "tensor (or derive from a constrained node class, where omitting it means a "
            "feasibility problem)."
        )

    def solve(self, *xs: Any) -> Tensor | Solution:
        """Solve the optimisation problem for a batch; runs under ``torch.no_grad()``.

        Subclasses usually implement it with any algorithm. Without one, the node's
        ``solver`` (a :mod:`declnet.solvers` solver) runs, or one chosen from the node's kind
        and size (:func:`declnet.solvers.default_solver`), starting from
        ``initial_guess(*xs)``; ``strict=True`` makes non-convergence an error.
        """
        if not callable(getattr(self, "initial_guess", None)):
            raise TypeError(
                f"{node_name(self)} has no `solve` method. Implement `solve(self, *xs)` "
                "returning the minimiser y of shape (B, ...) (or a declnet.Solution), or define "
                "`initial_guess(self, *xs)` returning a starting point of that shape so that a "
                "built-in solver (declnet.solvers) can run."
            )
        solver = self.solver if self.solver is not None else \
            default_solver(self, *xs, strict=self.strict)
        return solver(self, *xs)

    # -- structure queried by the engine ----------------------------------------------------
    @property
    def has_equality_constraints(self) -> bool:
        """Whether the node defines ``equality_constraints``."""
        return False

    @property
    def has_inequality_constraints(self) -> bool:
        """Whether the node defines ``inequality_constraints``."""
        return False

    @property
    def has_objective(self) -> bool:
        """False for a feasibility problem (a constrained node without an objective)."""
        return type(self).objective is not _FEASIBILITY_OBJECTIVE

    def forward(self, *xs: Any) -> Tensor:
        """Solve for ``y`` and return it, differentiable with respect to ``xs`` and the
        node's parameters.

        Args:
            *xs: the inputs, batched along the first dimension.

        Returns:
            ``y`` of shape ``(B, ...)`` as returned by ``solve``.
        """
        return declarative(self, *xs)

    def jacobian(self, *xs: Any) -> Tensor | tuple[Tensor, ...]:
        """The full Jacobian ``Dy(x)`` for small problems (teaching, tests).

        Forms the Jacobian by solving the KKT system once per sample with all ``m`` unit
        right-hand sides at once (dense factorisation). Use the node's backward pass, which
        never forms it, for anything large.

        Args:
            *xs: the inputs; each tensor input ``x`` of shape ``(B, *s)``.

        Returns:
            For each tensor input, ``(B, *y.shape[1:], *s)`` with entry ``[b, i, j] = ∂y_bi/∂x_bj``
            (a tuple when there are several tensor inputs). For a 0-d (shared) input the
            trailing dimensions are empty and the entries are per-sample derivatives.
        """
        return _jacobian(self, xs)


def _feasibility_objective(self: DeclarativeNode, *xs: Any, y: Tensor) -> Tensor:
    """No objective: a feasibility problem (§4.7.1), ``f ≡ 0``."""
    return torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)


_FEASIBILITY_OBJECTIVE = _feasibility_objective


class EqualityConstrainedNode(DeclarativeNode):
    """A declarative node with equality constraints ``h(x, y) = 0`` (Prop. 4.5).

    Subclasses implement ``objective`` (omit it for a feasibility problem),
    ``equality_constraints(*xs, y) -> (B, p)`` and ``solve``. The constraint Jacobian
    must have full row rank at the solution (regularity); where it does not, the engine
    falls back to a pseudo-inverse and warns (§4.7.3).

    Example:
        >>> class SphereProjection(declnet.EqualityConstrainedNode):
        ...     def objective(self, x, *, y):
        ...         return 0.5 * ((y - x) ** 2).sum(-1)
        ...     def equality_constraints(self, x, *, y):
        ...         return (y ** 2).sum(-1, keepdim=True) - 1.0
        ...     def solve(self, x):
        ...         return x / x.norm(dim=-1, keepdim=True)
    """

    objective = _feasibility_objective
    _constraint_kinds = frozenset({"equality"})

    @property
    def has_equality_constraints(self) -> bool:
        return True

    def equality_constraints(self, *xs: Any, y: Tensor) -> Tensor:
        """``h(x, y)`` of shape ``(B, p)``; the solution satisfies ``h = 0``. Abstract."""
        raise NotImplementedError(  # abstract
            f"{node_name(self)} must implement `equality_constraints(self, *xs, y)` "
            "returning a (B, p) tensor."
        )


class InequalityConstrainedNode(DeclarativeNode):
    """A declarative node with inequality constraints ``g(x, y) ≤ 0`` and optionally
    equality constraints ``h(x, y) = 0`` (Prop. 4.6).

    Subclasses implement ``objective`` (omit it for a feasibility problem),
    ``inequality_constraints(*xs, y) -> (B, q)``, optionally
    ``equality_constraints(*xs, y) -> (B, p)``, and ``solve``.

    Active set: inequality ``i`` is active where ``g_i ≥ −tol`` with ``tol`` relative to the
    problem's scale (see :class:`~declnet.ImplicitBackward`), unless ``solve`` returns a
    :class:`Solution` with an ``active`` mask. Active constraints are treated as
    equalities, inactive ones are dropped (masked per sample, so the batch keeps one
    shape). An active constraint whose multiplier is zero (a degenerate point, where the
    gradient is one-sided) is kept as an equality: the gradient returned is the one of the
    problem with that constraint held tight.
    """

    objective = _feasibility_objective
    _constraint_kinds = frozenset({"equality", "inequality"})

    @property
    def has_inequality_constraints(self) -> bool:
        return True

    @property
    def has_equality_constraints(self) -> bool:
        return type(self).equality_constraints is not InequalityConstrainedNode.equality_constraints

    def inequality_constraints(self, *xs: Any, y: Tensor) -> Tensor:
        """``g(x, y)`` of shape ``(B, q)``; the solution satisfies ``g ≤ 0``. Abstract."""
        raise NotImplementedError(  # abstract
            f"{node_name(self)} must implement `inequality_constraints(self, *xs, y)` "
            "returning a (B, q) tensor."
        )

    def equality_constraints(self, *xs: Any, y: Tensor) -> Tensor:
        """Optional ``h(x, y)`` of shape ``(B, p)``."""
        return y.new_zeros(y.shape[0], 0)


class LinearEqualityConstrainedNode(DeclarativeNode):
    """A declarative node with fixed linear equality constraints ``A y = d`` (Cor. 4.9).

    The constraints do not depend on the inputs, so the backward pass needs no
    multipliers and no second derivatives of the constraints: it solves
    ``[[H, Aᵀ], [A, 0]] w = [v, 0]`` with ``H = D²_YY f``.

    Args:
        A: ``(p, m)`` or per-sample ``(B, p, m)`` constraint matrix with full row rank,
            where ``m`` is the number of elements of one sample of ``y``.
        d: ``(p,)`` or ``(B, p)`` right-hand side.
        **kwargs: passed to :class:`DeclarativeNode`.

    Subclasses implement ``objective`` and ``solve``; ``equality_constraints`` is provided.
    The constraints are recognised as linear by the class, not by the presence of a
    ``constraint_matrix`` method.

    Example:
        >>> class MinKL(declnet.LinearEqualityConstrainedNode):   # y on the simplex
        ...     def objective(self, x, *, y):
        ...         return (y * (y.log() - x)).sum(-1)
        ...     def solve(self, x):
        ...         return torch.softmax(x, -1)
        >>> node = MinKL(torch.ones(1, 5), torch.ones(1))
    """

    _constraint_kinds = frozenset({"equality"})
    _linear_constraints = True

    def __init__(self, A: Tensor, d: Tensor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(A, Tensor) or not isinstance(d, Tensor):
            raise TypeError(
                f"{node_name(self)}: A and d must be tensors, got {type(A).__name__} and "
                f"{type(d).__name__}."
            )
        if A.dim() not in (2, 3) or d.dim() != A.dim() - 1 or d.shape[-1] != A.shape[-2]:
            raise ValueError(
                f"{node_name(self)}: expected A of shape (p, m) with d of shape (p,), or A of "
                f"shape (B, p, m) with d of shape (B, p); got A {tuple(A.shape)} and d "
                f"{tuple(d.shape)}."
            )
        self.register_buffer("A", A)
        self.register_buffer("d", d)

    @property
    def has_equality_constraints(self) -> bool:
        return True

    def constraint_matrix(self, batch: int, m: int) -> Tensor:
        """``A`` broadcast to ``(B, p, m)``, checked against the output size ``m``."""
        A = self.A
        if A.shape[-1] != m or (A.dim() == 3 and A.shape[0] != batch):
            raise ValueError(
                f"{node_name(self)}: A has shape {tuple(A.shape)} but the output has B={batch} "
                f"samples of m={m} elements; expected (p, {m}) or ({batch}, p, {m})."
            )
        return A.expand(batch, *A.shape[-2:])

    def equality_constraints(self, *xs: Any, y: Tensor) -> Tensor:
        """``A y − d`` of shape ``(B, p)``."""
        batch = y.shape[0]
        flat = y.flatten(1) if y.dim() > 1 else y.unsqueeze(1)
        A = self.constraint_matrix(batch, flat.shape[1]).to(flat.dtype)
        d = self.d.to(flat.dtype).expand(batch, A.shape[1])
        return check_batched(self, "equality_constraints", (A @ flat.unsqueeze(-1)).squeeze(-1) - d,
                             batch, 2)


def declarative(node: Any, *xs: Any) -> Tensor:
    """Evaluate a declarative node functionally: ``y = argmin`` for inputs ``xs``.

    Equivalent to ``node(*xs)``. With :class:`~declnet.ImplicitBackward` (the default) the
    result is differentiated implicitly; with :class:`~declnet.UnrolledBackward` the
    node's ``solve`` runs with autograd enabled and is back-propagated through.

    Args:
        node: a :class:`~declnet.DeclarativeNode`.
        *xs: its inputs, batched along the first dimension.

    Returns:
        ``y`` ``(B, ...)``.

    Raises:
        TypeError: ``node`` is not a declarative node, or ``solve`` returned no tensor.
        ValueError: inputs disagree on the batch size, ``y`` has the wrong batch size or is
            not finite.
    """
    if not isinstance(node, DeclarativeNode):
        raise TypeError(
            f"declarative() expects a declnet.DeclarativeNode, got {type(node).__name__}."
        )
    return _run(node, xs)


@torch.compiler.disable
def _run(node: DeclarativeNode, xs: tuple[Any, ...]) -> Tensor:
    """Solve and attach the backward. ``torch.compile`` does not trace into it: a user's
    ``solve`` is arbitrary Python with data-dependent control flow, so a compiled model
    runs the node eagerly between its compiled graphs."""
    return check_mode(node).apply(node, xs)
