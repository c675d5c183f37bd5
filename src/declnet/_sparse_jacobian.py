"""A declared sparse constraint Jacobian ``A`` ``(B, c, m)`` (a COO tensor from a node's
``constraint_jacobian``): its products with vectors and the Schur complement
``A diag(d)⁻¹ Aᵀ``, in ``O(nnz)`` work, never densely.

The index arithmetic depends only on where the entries are. A node usually declares the
same pattern at every call (a transport plan's marginals), so it is computed once per
node and reused while the indices are unchanged: they are compared entry by entry at each
call (one ``O(nnz)`` pass, skipped when the node returns the very index tensor of the
earlier call, unmodified since), so a changed pattern is always noticed.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from . import _linalg

__all__ = ["SparsePattern", "pattern_of"]

# Above this many entries in one column of A, S = A diag(d)⁻¹ Aᵀ is not assembled from
# pairs of entries (their number grows as the square); it is formed by products instead.
MAX_PER_COLUMN = 16


class SparsePattern:
    """The index arithmetic of a sparse ``A`` ``(B, c, m)`` with entries at ``indices``
    ``(3, nnz)`` (batch, row, column; repeated entries allowed: they add up).

    Attributes:
        row: ``(nnz,)`` each entry's flat index into ``(B·c)``.
        col: ``(nnz,)`` each entry's flat index into ``(B·m)``.
        pairs: ``(first, second, dest)`` for the Schur complement: every ordered pair of
            entries in one column (an entry with itself included), and the flat index
            into ``(B·c·c)`` of the term ``a_first a_second / d`` it adds; None when a
            column holds more than :data:`MAX_PER_COLUMN` entries.
    """

    def __init__(self, indices: Tensor, shape: tuple[int, int, int]) -> None:
        _, c, m = shape
        self.indices = indices.clone()  # a copy: the node may refill its own in place
        # The node's own index tensor, kept alive (so that its memory is not reused) with
        # its version counter: the same, unmodified tensor at the next call (a node that
        # returns the Jacobian it built once) is recognised without comparing entries.
        self._source = indices
        self._source_version = indices._version
        self.shape = shape
        b, i, j = indices
        self.row = b * c + i
        self.col = b * m + j
        self.pairs = _same_column_pairs(self.col, MAX_PER_COLUMN)
        self._diagonal_pairs: tuple[Tensor | None, Tensor | None, Tensor] | None = None
        if self.pairs is not None:
            first, second = self.pairs
            dest = self.row.index_select(0, first) * c + i.index_select(0, second)
            self.pairs = (first, second, dest)
            # The pairs that add to a diagonal entry of S (both entries in one row), with
            # that entry's flat index into (B·c): S's diagonal without S.
            on = (i.index_select(0, first) == i.index_select(0, second)).nonzero().flatten()
            first_on, second_on = first[on], second[on]
            if on.numel() == indices.shape[1] and bool((first_on == second_on).all()):
                # No repeated entries: the pairs are each entry with itself (in entry order).
                self._diagonal_pairs = (None, None, self.row)
            else:
                self._diagonal_pairs = (first_on, second_on, self.row.index_select(0, first_on))

    def matches(self, indices: Tensor, shape: tuple[int, int, int]) -> bool:
        """Whether a sparse ``A`` of ``shape`` with entries at ``indices`` has this pattern."""
        if shape != self.shape or indices.shape != self.indices.shape:
            return False
        source = self._source
        if (indices.data_ptr() == source.data_ptr() and indices.stride() == source.stride()
                and indices.device == source.device
                and indices._version == self._source_version == source._version):
            return True  # the same memory, never written to since: the same entries
        return indices.device == self.indices.device and torch.equal(indices, self.indices)

    def product(self, values: Tensor, X: Tensor, transpose: bool) -> Tensor:
        """``A X`` (``X`` ``(B, m, K)`` -> ``(B, c, K)``) or, with ``transpose``, ``Aᵀ X``
        (``(B, c, K)`` -> ``(B, m, K)``), with ``A``'s entries ``values`` ``(nnz,)``.

        One gather and one scatter-add over the entries (on flat vectors when ``K = 1``:
        the one-dimensional kernels are 2-3x faster than the row-wise ones on CPU).
        """
        B, c, m = self.shape
        src, dst, size = (self.row, self.col, m) if transpose else (self.col, self.row, c)
        K = X.shape[-1]
        values = values.to(X.dtype)
        if K == 1:
            terms = X.reshape(-1).index_select(0, src) * values
            return X.new_zeros(B * size).scatter_add_(0, dst, terms).view(B, size, 1)
        out = X.new_zeros(B * size, K)
        out.index_add_(0, dst, X.reshape(-1, K).index_select(0, src) * values.unsqueeze(-1))
        return out.view(B, size, K)

    def schur(self, values: Tensor, d: Tensor) -> Tensor | None:
        """``S = A diag(d)⁻¹ Aᵀ`` ``(B, c, c)`` for ``d`` ``(B, m)``: ``O(nnz k)`` work with
        ``k`` the most entries in one column (two for a transport plan's marginals)
        instead of ``O(c m)``; None when that is more than :data:`MAX_PER_COLUMN`."""
        if self.pairs is None:
            return None
        values = values.to(torch.promote_types(values.dtype, d.dtype))  # sums in d's precision
        return self._assemble(values / self._at_columns(d, values.dtype), values)

    def scaled_schur(self, values: Tensor, d: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(diag(s) S diag(s), s)`` for :meth:`schur`'s ``S``, with ``s`` ``(B, c)`` the
        Jacobi scaling of ``S`` (powers of two; 1 where ``S``'s diagonal is not positive),
        assembled from scaled entries: ``S`` itself is never formed (on CPU a pass over a
        ``c × c`` matrix costs as much as the assembly). None as for :meth:`schur`."""
        if self.pairs is None or self._diagonal_pairs is None:
            return None
        B, c, _ = self.shape
        values = values.to(torch.promote_types(values.dtype, d.dtype))
        over_d = values / self._at_columns(d, values.dtype)
        first, second, dest = self._diagonal_pairs
        if first is None:  # the pairs of an entry with itself, in entry order
            terms = over_d * values
        else:
            terms = over_d.index_select(0, first).mul_(values.index_select(0, second))
        diag = values.new_zeros(B * c).scatter_add_(0, dest, terms)
        s = _linalg.diagonal_scale(diag)
        at_rows = s.index_select(0, self.row)
        return self._assemble(over_d.mul_(at_rows), values * at_rows), s.view(B, c)

    def _at_columns(self, d: Tensor, dtype: torch.dtype) -> Tensor:
        """``d`` ``(B, m)`` at each entry's column, ``(nnz,)``."""
        return d.to(dtype).reshape(-1).index_select(0, self.col)

    def _assemble(self, left: Tensor, right: Tensor) -> Tensor:
        """``Σ left_first right_second`` over the same-column pairs, into ``(B, c, c)``."""
        B, c, _ = self.shape
        first, second, dest = self.pairs  # type: ignore[misc]
        terms = left.index_select(0, first).mul_(right.index_select(0, second))
        return left.new_zeros(B * c * c).scatter_add_(0, dest, terms).view(B, c, c)


def _same_column_pairs(col: Tensor, most: int) -> tuple[Tensor, Tensor] | None:
    """Every ordered pair ``(e₁, e₂)`` of entries in the same column (``col``: each entry's
    column; ``e₁ = e₂`` included) as ``(first, second)``; None when a column holds more
    than ``most`` entries. No sort: slot ``t`` of every column is its ``t``-th smallest
    entry index, found by a minimum over the entries not yet placed."""
    n = col.numel()
    if n == 0:
        empty = col.new_zeros(0)
        return empty, empty
    size = int(col.max()) + 1
    index = torch.arange(n, device=col.device)
    free = index
    slots = []
    while True:
        slot = torch.full((size,), n, dtype=torch.long, device=col.device)
        slot.scatter_reduce_(0, col, free, "amin")
        if not bool((slot < n).any()):
            break
        if len(slots) == most:
            return None
        slots.append(slot)
        claimed = slot.index_select(0, col) == index
        free = torch.where(claimed, n, free)
    table = torch.stack(slots)  # (k, columns): entry indices, n where a column has fewer
    k = table.shape[0]
    first = table.unsqueeze(1).expand(k, k, size).reshape(-1)
    second = table.unsqueeze(0).expand(k, k, size).reshape(-1)
    keep = (first < n) & (second < n)
    return first[keep], second[keep]


# One pattern per node, dropped with the node.
_PATTERNS: weakref.WeakKeyDictionary[Any, SparsePattern] = weakref.WeakKeyDictionary()


def pattern_of(node: Any, A: Tensor) -> SparsePattern:
    """The :class:`SparsePattern` of the sparse COO tensor ``A`` ``(B, c, m)`` declared by
    ``node``: the one computed at an earlier call when the entries are where they were."""
    indices = A._indices()
    shape = tuple(A.shape)
    try:
        known = _PATTERNS.get(node)
    except TypeError:  # a node that cannot be weakly referenced: no reuse
        known = None
    if known is not None and known.matches(indices, shape):  # type: ignore[arg-type]
        return known
    pattern = SparsePattern(indices, shape)  # type: ignore[arg-type]
    try:
        _PATTERNS[node] = pattern
    except TypeError:
        pass
    return pattern
