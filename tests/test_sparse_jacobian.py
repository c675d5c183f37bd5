"""A declared sparse constraint Jacobian: products, the Schur complement, and the reuse of
its index arithmetic across calls (never stale)."""

import pytest
import torch

from declnet import _sparse_jacobian as sj


def _random_sparse(B, c, m, nnz, seed, repeats=0):
    """A sparse COO ``(B, c, m)`` with ``nnz`` random entries per sample, the first
    ``repeats`` of them repeated (uncoalesced: they add up)."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.arange(B).repeat_interleave(nnz)
    i = torch.randint(0, c, (B * nnz,), generator=gen)
    j = torch.randint(0, m, (B * nnz,), generator=gen)
    index = torch.stack([b, i, j])
    if repeats:
        index = torch.cat([index, index[:, :repeats]], 1)
    values = torch.randn(index.shape[1], generator=gen, dtype=torch.float64)
    return torch.sparse_coo_tensor(index, values, (B, c, m), check_invariants=True)


def test_products_and_schur_equal_the_dense_ones():
    B, c, m = 3, 7, 40
    A = _random_sparse(B, c, m, nnz=60, seed=0, repeats=9)
    dense = A.to_dense()
    pattern = sj.SparsePattern(A._indices(), (B, c, m))
    values = A._values()
    gen = torch.Generator().manual_seed(1)
    d = torch.rand(B, m, generator=gen, dtype=torch.float64) + 0.1
    expected = dense @ (dense / d.unsqueeze(1)).transpose(1, 2)
    torch.testing.assert_close(pattern.schur(values, d), expected, rtol=1e-12, atol=1e-12)
    for K in (1, 3):
        X = torch.randn(B, m, K, generator=gen, dtype=torch.float64)
        W = torch.randn(B, c, K, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(pattern.product(values, X, False), dense @ X)
        torch.testing.assert_close(pattern.product(values, W, True),
                                   dense.transpose(1, 2) @ W)


@pytest.mark.parametrize("repeats", [0, 9], ids=["coalesced", "repeated entries"])
def test_scaled_schur_is_the_equilibrated_schur_complement(repeats):
    """``(diag(s) S diag(s), s)`` assembled from scaled entries: ``s`` powers of two that put
    S's diagonal in [1/2, 2), 1 on an empty row; repeated entries add up as in ``S``."""
    B, c, m = 3, 7, 40
    A = _random_sparse(B, c, m, nnz=60, seed=2, repeats=repeats)
    index = A._indices()
    keep = ~((index[0] == 1) & (index[1] == 4))  # row 4 of sample 1 empty: its scale is 1
    A = torch.sparse_coo_tensor(index[:, keep], A._values()[keep], A.shape)
    if not repeats:
        A = A.coalesce()
    dense = A.to_dense()
    pattern = sj.SparsePattern(A._indices(), (B, c, m))
    gen = torch.Generator().manual_seed(3)
    d = 10.0 ** (6 * torch.rand(B, m, generator=gen, dtype=torch.float64) - 3)
    S = dense @ (dense / d.unsqueeze(1)).transpose(1, 2)
    Ss, scale = pattern.scaled_schur(A._values(), d)
    torch.testing.assert_close(Ss, scale.unsqueeze(-1) * S * scale.unsqueeze(-2), rtol=1e-12,
                               atol=0.0)
    assert bool((torch.log2(scale) == torch.log2(scale).round()).all())
    diag = Ss.diagonal(dim1=-2, dim2=-1)
    assert scale[1, 4] == 1.0 and diag[1, 4] == 0.0
    diag = torch.cat([diag[:1].flatten(), diag[1, :4], diag[1, 5:], diag[2:].flatten()])
    assert bool(((diag >= 0.5) & (diag < 2.0)).all())


def test_schur_declines_columns_with_many_entries():
    """More than MAX_PER_COLUMN entries in one column: no pair assembly (None)."""
    B, c, m = 1, sj.MAX_PER_COLUMN + 2, 3
    i = torch.arange(c)
    index = torch.stack([torch.zeros_like(i), i, torch.zeros_like(i)])
    A = torch.sparse_coo_tensor(index, torch.ones(c, dtype=torch.float64), (B, c, m),
                                check_invariants=True)
    pattern = sj.SparsePattern(A._indices(), (B, c, m))
    assert pattern.schur(A._values(), torch.ones(B, m, dtype=torch.float64)) is None


def test_pattern_is_reused_only_while_the_entries_stay_where_they_were():
    class Node:  # any object that can be weakly referenced
        pass

    node = Node()
    B, c, m = 2, 5, 30
    A = _random_sparse(B, c, m, nnz=20, seed=2)
    first = sj.pattern_of(node, A)
    assert sj.pattern_of(node, A) is first  # the same tensor again
    same = torch.sparse_coo_tensor(A._indices().clone(), A._values() * 2, A.shape,
                                   check_invariants=True)
    assert sj.pattern_of(node, same) is first  # equal indices, other values
    moved = _random_sparse(B, c, m, nnz=20, seed=3)
    second = sj.pattern_of(node, moved)
    assert second is not first
    # Indices refilled in place by the node: a new pattern, and the right products.
    index = moved._indices()
    index[2] = (index[2] + 1) % m
    third = sj.pattern_of(node, moved)
    assert third is not second
    X = torch.randn(B, m, 1, dtype=torch.float64)
    torch.testing.assert_close(third.product(moved._values(), X, False), moved.to_dense() @ X)
    assert sj.pattern_of(Node(), moved) is not third  # one pattern per node
