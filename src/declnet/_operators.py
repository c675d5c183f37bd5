"""Batched symmetric linear operators: how a node tells the engine what its Hessian is.

The backward pass solves systems with the Hessian of the Lagrangian ``H = D²_YY L``
(Propositions 4.4–4.6). Without help the engine forms ``H`` by automatic differentiation
(``m`` Hessian-vector products) or uses it matrix-free. A node that knows ``H`` — from
the maths of its problem or from its forward solver — returns it from ``hessian(*xs, y,
multipliers)`` or in :class:`~declnet.Solution` ``.hessian`` as a dense ``(B, m, m)``
tensor or one of these operators, and the engine picks the solver from the structure:

- :class:`DiagonalOperator`: ``H = diag(d)``; constrained systems reduce to the ``c × c``
  Schur complement ``A H⁻¹ Aᵀ``, and no ``m × m`` matrix is ever formed;
- :class:`DenseOperator`: a dense ``H``, optionally with its Cholesky factor from the
  forward pass, which is then reused for every right-hand side;
- :class:`MatrixFreeOperator`: only ``u ↦ H u`` (and optionally the diagonal, used as a
  Jacobi preconditioner by conjugate gradients).

Like lineax's operator tags, an operator says what it knows; subclasses of
:class:`LinearOperator` may add their own ``solve``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["DenseOperator", "DiagonalOperator", "LinearOperator", "MatrixFreeOperator"]


class LinearOperator:
    """A batch of symmetric ``m × m`` operators, one per sample.

    Subclasses implement :meth:`matvec`; they may override :meth:`diagonal`,
    :meth:`to_dense` and :meth:`solve` when they can do better than the defaults.

    Attributes:
        batch: the number of samples ``B``.
        size: ``m``.
        dtype, device: of the vectors it acts on.
    """

    def __init__(self, batch: int, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.batch = int(batch)
        self.size = int(size)
        self.dtype = dtype
        self.device = torch.device(device)

    #: True when :meth:`solve` is exact and cheap (the engine then never forms ``H``).
    has_solve: bool = False
    #: True when the operator is diagonal.
    is_diagonal: bool = False

    def matvec(self, u: Tensor) -> Tensor:
        """``H u`` for ``u`` of shape ``(B, m)``; returns ``(B, m)``. Abstract."""
        raise NotImplementedError(  # abstract
            f"{type(self).__name__} must implement matvec(u) for u of shape (B, m)."
        )

    def diagonal(self) -> Tensor | None:
        """``(B, m)`` diagonal of ``H`` if it is known cheaply, else None."""
        return None

    def to_dense(self) -> Tensor:
        """``(B, m, m)`` dense matrix (by ``m`` matrix-vector products unless overridden)."""
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        cols = [self.matvec(eye[j].expand(self.batch, self.size)) for j in range(self.size)]
        return torch.stack(cols, -1)

    def solve(self, rhs: Tensor) -> Tensor:
        """``H⁻¹ rhs`` for ``rhs`` of shape ``(B, m, K)``; only when :attr:`has_solve`."""
        raise NotImplementedError(  # abstract
            f"{type(self).__name__} has no solve(); the engine factorises it instead."
        )

    def add_identity(self, gamma: float) -> LinearOperator:
        """``H + γ I`` (damping, §4.7.4)."""
        return _Shifted(self, gamma)

    def _check_vector(self, u: Tensor) -> None:
        if u.shape != (self.batch, self.size):
            raise ValueError(
                f"{type(self).__name__}: expected a vector of shape ({self.batch}, {self.size}), "
                f"got {tuple(u.shape)}."
            )


def _as_batched(t: Tensor, batch: int | None, dims: int, what: str) -> Tensor:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {type(t).__name__}.")
    if t.dim() == dims - 1:
        t = t.unsqueeze(0).expand(batch or 1, *t.shape)
    if t.dim() != dims:
        raise ValueError(
            f"{what} must have {dims} dimensions (batch first) or {dims - 1} (shared by the "
            f"batch), got shape {tuple(t.shape)}."
        )
    return t


class DiagonalOperator(LinearOperator):
    """``H = diag(d)`` per sample.

    Args:
        d: ``(B, m)`` the diagonal (or ``(m,)``, shared by the batch). For a Hessian at a
            strict minimum it is positive; entries may span many orders of magnitude (the
            engine never adds or compares them with each other).

    Example:
        >>> # entropic transport: H = diag(1 / (γ P)) for the plan P flattened to (B, m)
        >>> declnet.DiagonalOperator(1.0 / (gamma * P.flatten(1)))
    """

    has_solve = True
    is_diagonal = True

    def __init__(self, d: Tensor) -> None:
        d = _as_batched(d, None, 2, "DiagonalOperator: d")
        super().__init__(d.shape[0], d.shape[1], d.dtype, d.device)
        self.d = d

    def matvec(self, u: Tensor) -> Tensor:
        return self.d * u

    def diagonal(self) -> Tensor:
        return self.d

    def to_dense(self) -> Tensor:
        return torch.diag_embed(self.d)

    def solve(self, rhs: Tensor) -> Tensor:
        return rhs / self.d.unsqueeze(-1)

    def add_identity(self, gamma: float) -> LinearOperator:
        return DiagonalOperator(self.d + gamma)


class DenseOperator(LinearOperator):
    """A dense ``H`` ``(B, m, m)``, optionally with its Cholesky factor.

    Args:
        matrix: ``(B, m, m)`` symmetric (or ``(m, m)``, shared by the batch).
        cholesky: optional lower-triangular ``L`` with ``H = L Lᵀ`` ``(B, m, m)``, e.g. the
            factor the forward solver computed; the backward pass then solves with it and
            forms nothing.

    Example:
        >>> L = torch.linalg.cholesky(A.mT @ A + ridge * I)      # in solve()
        >>> return declnet.Solution(y, hessian=declnet.DenseOperator(A.mT @ A + ridge * I,
        ...                                                        cholesky=L))
    """

    def __init__(self, matrix: Tensor, cholesky: Tensor | None = None) -> None:
        matrix = _as_batched(matrix, None, 3, "DenseOperator: matrix")
        if matrix.shape[-1] != matrix.shape[-2]:
            raise ValueError(
                f"DenseOperator: matrix must be square, got shape {tuple(matrix.shape)}."
            )
        super().__init__(matrix.shape[0], matrix.shape[1], matrix.dtype, matrix.device)
        self.matrix = matrix
        if cholesky is not None:
            cholesky = _as_batched(cholesky, matrix.shape[0], 3, "DenseOperator: cholesky")
            if cholesky.shape[-2:] != matrix.shape[-2:]:
                raise ValueError(
                    f"DenseOperator: cholesky must have the matrix's shape "
                    f"{tuple(matrix.shape)}, got {tuple(cholesky.shape)}."
                )
        self.cholesky = cholesky
        self.has_solve = cholesky is not None

    def matvec(self, u: Tensor) -> Tensor:
        return (self.matrix @ u.unsqueeze(-1)).squeeze(-1)

    def diagonal(self) -> Tensor:
        return self.matrix.diagonal(dim1=-2, dim2=-1)

    def to_dense(self) -> Tensor:
        return self.matrix

    def solve(self, rhs: Tensor) -> Tensor:
        if self.cholesky is None:
            return super().solve(rhs)
        return torch.cholesky_solve(rhs, self.cholesky.to(rhs.dtype))

    def add_identity(self, gamma: float) -> LinearOperator:
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        return DenseOperator(self.matrix + gamma * eye)


class MatrixFreeOperator(LinearOperator):
    """``H`` known only through ``u ↦ H u``.

    Args:
        matvec: a function of ``u`` ``(B, m)`` returning ``H u`` ``(B, m)``.
        batch: ``B``; size: ``m``; dtype, device: of the vectors.
        diagonal: optional ``(B, m)`` diagonal, used as a Jacobi preconditioner.
    """

    def __init__(self, matvec: Callable[[Tensor], Tensor], batch: int, size: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 diagonal: Tensor | None = None) -> None:
        if not callable(matvec):
            raise TypeError(
                f"MatrixFreeOperator: matvec must be callable, got {type(matvec).__name__}."
            )
        super().__init__(batch, size, dtype, torch.device(device))
        self._matvec = matvec
        if diagonal is not None:
            diagonal = _as_batched(diagonal, batch, 2, "MatrixFreeOperator: diagonal")
        self._diagonal = diagonal

    def matvec(self, u: Tensor) -> Tensor:
        out = self._matvec(u)
        if not isinstance(out, Tensor) or out.shape != u.shape:
            raise ValueError(
                f"MatrixFreeOperator: matvec must return a tensor of the shape of its input "
                f"{tuple(u.shape)}, got {getattr(out, 'shape', type(out).__name__)}."
            )
        return out

    def diagonal(self) -> Tensor | None:
        return self._diagonal


class _Shifted(LinearOperator):
    """``H + γ I`` for an operator without a cheaper form."""

    def __init__(self, base: LinearOperator, gamma: float) -> None:
        super().__init__(base.batch, base.size, base.dtype, base.device)
        self.base = base
        self.gamma = float(gamma)

    def matvec(self, u: Tensor) -> Tensor:
        return self.base.matvec(u) + self.gamma * u

    def diagonal(self) -> Tensor | None:
        d = self.base.diagonal()
        return None if d is None else d + self.gamma

    def to_dense(self) -> Tensor:
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        return self.base.to_dense() + self.gamma * eye


def as_operator(value: object, batch: int, size: int, what: str) -> LinearOperator:
    """Check a declared Hessian and wrap a dense tensor as a :class:`DenseOperator`.

    Raises:
        TypeError: ``value`` is neither a tensor nor a :class:`LinearOperator`.
        ValueError: its shape is not ``(B, m, m)`` for this problem.
    """
    if isinstance(value, Tensor):
        if value.dim() == 2:
            value = value.unsqueeze(0).expand(batch, *value.shape)
        if value.shape != (batch, size, size):
            raise ValueError(
                f"{what} must be a ({batch}, {size}, {size}) tensor (the Hessian of the "
                f"Lagrangian per sample) or a declnet.LinearOperator, got shape "
                f"{tuple(value.shape)}."
            )
        return DenseOperator(value)
    if isinstance(value, LinearOperator):
        if value.batch != batch or value.size != size:
            raise ValueError(
                f"{what} is a {type(value).__name__} for B={value.batch}, m={value.size}, but "
                f"the problem has B={batch}, m={size}."
            )
        return value
    raise TypeError(
        f"{what} must be a (B, m, m) tensor or a declnet.LinearOperator "
        f"(DiagonalOperator, DenseOperator, MatrixFreeOperator), got {type(value).__name__}."
    )
