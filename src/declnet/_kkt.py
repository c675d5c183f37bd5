"""Solving the KKT system of the implicit backward pass, per sample, batched.

With ``H = D²_YY L``, ``A = D_Y h̃`` (rows of unused constraints zeroed) and ``D = 1`` on
the diagonal of unused rows, the backward pass needs (§6.1 of the paper)::

    [ H  Aᵀ ] [w₁]   [v]
    [ A  D  ] [w₂] = [0]

The solver follows from what is known about ``H`` (see ``_operators``):

- declared diagonal, or with its own ``solve`` (a factor from the forward pass):
  the Schur complement ``S = A H⁻¹ Aᵀ`` (``c × c``), no ``m × m`` matrix;
- dense (declared, or formed by automatic differentiation for small ``m``): equilibrated
  Cholesky of ``H`` and of ``S``, or equilibrated LU of the whole KKT matrix when ``H`` is
  indefinite, all in float64, each solve checked by its scaled residual;
- otherwise matrix-free CG (projected onto ``null(A)``; Jacobi-preconditioned when the
  diagonal is known) or MINRES, falling back to the dense solve when it does not converge
  and the dense system fits the memory budget.

Singularity is judged on equilibrated matrices relative to the data's dtype. Dependent
active constraints (a non-regular point, §4.7.3) are reported to the caller, which drops
them; what is still singular after that is solved by the pseudo-inverse (eq. 35) with a
:class:`~declnet.DeclarativeWarning`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _linalg
from ._diagnostics import warn
from ._operators import DenseOperator, LinearOperator
from ._problem import Problem

__all__ = ["KKTResult", "solve_kkt"]


@dataclass
class KKTResult:
    """``w`` ``(B, m + c, K)`` and, per sample, whether the active constraints were found
    linearly dependent (``dependent``), with the matrix that showed it (``metric``, the
    Schur complement or the Gram matrix ``A Aᵀ``, ``(B, c, c)``)."""

    w: Tensor
    dependent: Tensor
    metric: Tensor | None = None


def _eye(n: int, like: Tensor) -> Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _kkt_matrix(H: Tensor, A: Tensor, dvec: Tensor) -> Tensor:
    top = torch.cat([H, A.transpose(1, 2)], 2)
    bottom = torch.cat([A, torch.diag_embed(dvec)], 2)
    return torch.cat([top, bottom], 1)


def _sq(x: Tensor) -> Tensor:
    """``‖x_b‖²`` per sample of a ``(B, ...)`` tensor (no temporary as large as ``x``)."""
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim()))).square()


def _kkt_residual_ok(Hs: Tensor, As: Tensor, dvec: Tensor, w: Tensor, rhs: Tensor,
                     s: Tensor) -> Tensor:
    """The scaled residual test of :func:`~declnet._linalg.residual_ok` for the KKT system
    ``[[H, Aᵀ], [A, D]] w = rhs`` with ``rhs = [v; 0]`` (the backward's), by blocks (the
    KKT matrix is not formed).

    ``s`` ``(B, m)`` scales the ``y`` rows (the Cholesky scaling of ``H``), ``Hs`` is
    ``diag(s) H diag(s)`` and ``As`` is ``A diag(s)``; each constraint row gets
    ``t_i = 1 / max_j |A_ij s_j|`` (a power of two; 1 for a zero row), so the test is
    invariant to the scale of the variables and of the constraints. In scaled variables
    ``u = [w₁/s; w₂/t]`` the residual is ``[s (H w₁ + Aᵀ w₂ − v); t (A w₁ + D w₂)]``.
    """
    m = Hs.shape[-1]
    rows = As.abs().amax(-1)
    t = torch.exp2(torch.round(torch.log2(rows + (rows == 0)).neg_())).unsqueeze(-1)
    s3 = s.unsqueeze(-1)
    w1, w2 = w[:, :m], w[:, m:]
    u1 = w1 / s3
    b1 = s3 * rhs[:, :m]
    if _shared(Hs):  # one matrix for the batch: one product, one norm
        hu = (u1.transpose(1, 2) @ Hs[0].transpose(0, 1)).transpose(1, 2)
        hnorm = _sq(Hs[:1])
    else:
        hu = Hs @ u1
        hnorm = _sq(Hs)
    At = As * t
    dt = dvec.unsqueeze(-1) * t
    top = torch.baddbmm(hu - b1, As.transpose(1, 2), w2)
    bottom = torch.baddbmm(dt * w2, At, u1)
    res = (_sq(top) + _sq(bottom)).sqrt()
    knorm = (hnorm + 2.0 * _sq(At) + _sq(dt * t)).sqrt()
    unorm = (_sq(u1) + _sq(w2 / t)).sqrt()
    tol = torch.finfo(Hs.dtype).eps ** 0.5
    return torch.isfinite(res) & (res <= tol * (knorm * unorm + _sq(b1).sqrt()))


def _replace(x: Tensor, mask: Tensor, values: Tensor) -> Tensor:
    out = x.clone()
    out[mask] = values
    return out


def _tol(prob: Problem) -> float:
    return _linalg.singular_tol(prob.dtype)


# ---------------------------------------------------------------------------------------
# The Hessian
# ---------------------------------------------------------------------------------------


def _shared(H: Tensor) -> bool:
    """Whether the ``(B, m, m)`` matrix ``H`` is one matrix shared by the batch (expanded,
    e.g. a declared ``(m, m)`` Hessian)."""
    return H.dim() == 3 and H.shape[0] > 1 and H.stride(0) == 0


def _shared_cholesky(H: Tensor, A: Tensor, tol: float) -> tuple[_linalg.Factor, Tensor] | None:
    """Equilibrated Cholesky of a Hessian shared by the batch, factorised once; None where it
    is not (numerically) positive definite, so that the augmented one is used.

    Returns the factor, expanded to the batch, and ``A diag(s)``.
    """
    B = H.shape[0]
    f = _linalg.cholesky_factor(H[:1], tol)
    if not bool(f.ok.all()):
        return None
    size = H.shape
    factor = _linalg.Factor("cholesky", (f.data[0].expand(size),), f.scale.expand(B, -1),
                            f.ok.expand(B), f.scaled.expand(size))
    return factor, A * factor.scale.unsqueeze(-2)


def _well_conditioned(hf: _linalg.Factor, rows: int) -> bool:
    """Whether the scaled Hessian shared by the batch, factorised as ``hf``, is so well
    conditioned that eliminating through it is stable without a residual check.

    ``κ(Hs) ≤ ‖Hs‖_F ‖L⁻¹‖_F²`` (an upper bound, from one triangular inverse of the one
    ``m × m`` factor); the Schur-complement solve then has a backward error of about
    ``rows · eps · κ``, which must be a hundredth of the residual test's ``sqrt(eps)``.
    """
    L = hf.data[0][0]
    cd = L.dtype
    eye = torch.eye(L.shape[-1], dtype=cd, device=L.device)
    inv = torch.linalg.solve_triangular(L, eye, upper=False)
    bound = torch.linalg.matrix_norm(hf.scaled[0]) * _sq(inv.unsqueeze(0))[0]
    eps = torch.finfo(cd).eps
    return bool(bound * (rows * eps) <= 1e-2 * eps ** 0.5)


def hessian_operator(prob: Problem) -> LinearOperator | None:
    """The declared Hessian of the Lagrangian, damped, or None when nothing is declared."""
    op = prob.declared_hessian()
    damping = prob.options.damping
    if op is not None and damping:
        op = op.add_identity(damping)
    return op


def dense_hessian(prob: Problem, op: LinearOperator | None) -> Tensor | None:
    """``H`` ``(B, m, m)`` in the compute dtype: the declared one, or ``m`` Hessian-vector
    products by automatic differentiation in chunks under the memory budget (None if the
    objective has an op without a batching rule)."""
    cd = _linalg.compute_dtype(prob.dtype)
    if op is not None:
        H = op.to_dense()
        if _shared(H):  # one matrix for the batch: convert it once, keep it shared
            return H[:1].to(cd).expand(H.shape)
        return H.to(cd)
    B, m = prob.batch, prob.m
    itemsize = torch.finfo(prob.dtype).bits // 8
    per_column = max(1, 16 * B * m * itemsize)  # a generous guess of one HVP's footprint
    chunk = int(max(1, min(m, prob.options.memory_budget // per_column)))
    eye = _eye(m, prob.y_flat)
    blocks = []
    for start in range(0, m, chunk):  # chunks only bound memory; one chunk when it fits
        cols = eye[start:start + chunk].unsqueeze(1).expand(-1, B, m)
        rows = prob.hessian_columns(cols)
        if rows is None:
            warn(prob.node, "batched Hessian-vector products are not supported by the "
                 "objective; using the matrix-free solver instead.")
            return None
        blocks.append(rows)
    rows = torch.cat(blocks, 0)  # (m, B, m): rows[i, b] = (H_b)_i
    # Symmetrised straight into a contiguous (B, m, m) matrix of the compute dtype (the
    # factorisations need that layout; a permuted one costs a copy in each of them).
    if rows.requires_grad:  # double backward: H must keep its graph
        H = 0.5 * (rows.transpose(0, 1) + rows.permute(1, 2, 0)).to(cd).contiguous()
    else:
        H = torch.empty(B, m, m, dtype=cd, device=rows.device)
        torch.add(rows.transpose(0, 1), rows.permute(1, 2, 0), out=H)
        H.mul_(0.5)
    if prob.options.damping:
        H = H + prob.options.damping * _eye(m, H)
    return H


# ---------------------------------------------------------------------------------------
# Dense and structured solves
# ---------------------------------------------------------------------------------------


# Above this many constraint rows (and c·m), the Schur complement is assembled by
# Jacobian-vector products through the constraints instead of a dense (c × m)(m × c)
# product (see Problem.constraint_jvp).
_JVP_SCHUR_ROWS = 48
_JVP_SCHUR_WORK = 2**18


# The matrix-free Schur complement is assembled in blocks of rows of about this many
# bytes each (small enough to be reused by the allocator rather than paged in anew).
_SCHUR_BLOCK_BYTES = 8 * 2**20


def _schur_matrix_free(prob: Problem, hsolve, rhs: Tensor, inv_diag: Tensor | None = None,
                       ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The Schur-complement solve without forming ``A`` (``c × m`` per sample).

    ``S = A H⁻¹ Aᵀ`` is assembled column block by column block: ``Aᵀ E`` by one vectorised
    backward through the constraints, ``H⁻¹`` by the declared solve, ``A (·)`` by
    Jacobian-vector products; ``A H⁻¹ v`` and ``Aᵀ w₂`` likewise. Memory is that of a
    block, not of ``A``; for constraints such as a transport plan's marginals the cost is
    ``O(c m)`` instead of ``O(c² m)``. ``inv_diag`` ``(B, m)``: ``H⁻¹`` when ``H`` is
    diagonal (applied to the blocks in place). Returns ``(w, ok, S)`` (``S`` None on the
    sparse path when every sample succeeded, see :func:`_schur_sparse`).
    """
    m, c, B = prob.m, prob.c, prob.batch
    cd = rhs.dtype
    v, z = rhs[:, :m], rhs[:, m:]
    hv = hsolve(v)  # (B, m, K)
    itemsize = torch.finfo(prob.dtype).bits // 8
    block = int(max(1, min(c, _SCHUR_BLOCK_BYTES // max(1, B * m * itemsize),
                           prob.options.memory_budget // max(1, 4 * B * m * itemsize))))
    S = None
    if prob.sparse_A and inv_diag is not None:
        # From the declared sparse A, equilibrated as it is assembled: O(nnz) work.
        scaled = prob.sparse_scaled_schur(inv_diag.to(cd))
        if scaled is not None:
            return _schur_sparse(prob, hsolve, *scaled, hv, z)
    if S is None:
        eye = _eye(c, hv).to(prob.dtype)
        cols = []
        for start in range(0, c, block):  # blocks only bound memory
            E = eye[start:start + block].unsqueeze(1).expand(-1, B, c)
            at = prob.constraint_vjp(E)  # (k, B, m): rows of A
            if inv_diag is not None:
                hat = at / inv_diag
            else:
                hat = hsolve(at.permute(1, 2, 0).to(cd)).permute(2, 0, 1)
            cols.append(prob.constraint_jvp(hat.to(prob.dtype)))
        S = torch.cat(cols, 0).permute(1, 2, 0).to(cd)  # (B, c, c)
    S = S + torch.diag_embed(prob.inactive_diagonal.to(cd))
    S = 0.5 * (S + S.transpose(1, 2))
    sf = _linalg.cholesky_factor(S, _tol(prob))
    ahv = prob.constraint_jvp(hv.permute(2, 0, 1).to(prob.dtype)).permute(1, 2, 0).to(cd)
    w2 = sf.solve(ahv - z)  # (B, c, K)
    atw = prob.constraint_vjp(w2.permute(2, 0, 1).to(prob.dtype)).permute(1, 2, 0).to(cd)
    w1 = hv - hsolve(atw)
    w = torch.cat([w1, w2], 1)
    ok = sf.ok & _linalg.finite_samples(w)
    return w, ok, S


def _schur_sparse(prob: Problem, hsolve, Ss: Tensor, s: Tensor, hv: Tensor, z: Tensor,
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`_schur_matrix_free` for a declared sparse ``A`` and diagonal ``H``, given
    ``hsolve = H⁻¹ ·``, the equilibrated ``Ss = diag(s) S diag(s)`` of ``S = A H⁻¹ Aᵀ``
    ``(B, c, c)`` with its scaling ``s`` ``(B, c)``, and ``hv = H⁻¹ v`` ``(B, m, K)``: two
    sparse products, in the compute dtype. ``S`` is symmetric by construction up to
    rounding (Cholesky reads one triangle). ``S + D`` is returned only where some sample
    failed (it then decides which rows to drop); None otherwise."""
    if not prob.all_used:  # a 1 on the diagonal of unused rows (s = 1 there: A's row is 0)
        Ss = Ss + torch.diag_embed(prob.inactive_diagonal.to(Ss.dtype))
    sf = _linalg.cholesky_of_scaled(Ss, s, _tol(prob))
    w2 = sf.solve(prob.sparse_product(hv) - z)  # (B, c, K); products in hv's precision
    w1 = hv - hsolve(prob.sparse_product(w2, transpose=True))
    w = torch.cat([w1, w2], 1)
    ok = sf.ok & _linalg.finite_samples(w)
    if bool(ok.all()):
        return w, ok, None
    return w, ok, Ss / (s.unsqueeze(-1) * s.unsqueeze(-2))


def _schur(prob: Problem, hsolve, rhs: Tensor, structured: bool = False,
           inv_diag: Tensor | None = None,
           ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Solve by the Schur complement given ``hsolve = H⁻¹ ·``; returns ``(w, ok_s, S, H⁻¹A)``
    (``H⁻¹A`` None on the matrix-free path; ``S`` None on the sparse one where every sample
    succeeded)."""
    m, c = prob.m, prob.c
    if (structured and not prob.linear and not prob.A_formed and c >= _JVP_SCHUR_ROWS
            and c * m >= _JVP_SCHUR_WORK):
        w, ok, S = _schur_matrix_free(prob, hsolve, rhs, inv_diag)
        return w, ok, S, None
    A = prob.A_solve.to(rhs.dtype)
    dvec = prob.inactive_diagonal.to(rhs.dtype)
    v, z = rhs[:, :m], rhs[:, m:]
    hv = hsolve(v)
    hat = hsolve(A.transpose(1, 2))
    if (structured and not prob.linear and c >= _JVP_SCHUR_ROWS
            and c * m >= _JVP_SCHUR_WORK):
        cols = prob.constraint_jvp(hat.permute(2, 0, 1).to(prob.dtype))  # (c, B, c)
        S = cols.permute(1, 2, 0).to(rhs.dtype)
    else:
        S = A @ hat
    w, ok, S = _schur_finish(A, dvec, S, hv, hat, z, _tol(prob))
    return w, ok, S, hat


def _schur_finish(A: Tensor, dvec: Tensor, S: Tensor, hv: Tensor, hat: Tensor, z: Tensor,
                  tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """``w`` from ``S = A H⁻¹ Aᵀ``, ``hv = H⁻¹ v`` and ``hat = H⁻¹ Aᵀ``: ``(w, ok, S + D)``."""
    S = S + torch.diag_embed(dvec)
    S = 0.5 * (S + S.transpose(1, 2))
    sf = _linalg.cholesky_factor(S, tol)
    w2 = sf.solve(A @ hv - z)
    w1 = hv - hat @ w2
    w = torch.cat([w1, w2], 1)
    ok = sf.ok & _linalg.finite_samples(w)
    return w, ok, S


def _rows_over(T: Tensor, R: Tensor, upper: bool) -> Tensor:
    """``R T⁻¹`` for triangular ``T`` ``(B, m, m)`` and rows ``R`` ``(B, n, m)``; one ``T``
    shared by the batch (expanded) is applied once to all ``B n`` rows."""
    if _shared(T):
        B, n, m = R.shape
        out = torch.linalg.solve_triangular(T[0], R.reshape(B * n, m), upper=upper, left=False)
        return out.reshape(B, n, m)
    return torch.linalg.solve_triangular(T, R, upper=upper, left=False)


def _schur_cholesky(hf: _linalg.Factor, As: Tensor, dvec: Tensor, rhs: Tensor,
                    tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """The Schur-complement solve through a Cholesky factor of ``H`` (augmented or not).

    With ``diag(s) H diag(s) = L Lᵀ`` (``hf``) and ``As = A diag(s)``, the rows
    ``[Yᵀ; uᵀ] = [As; (diag(s) v)ᵀ] L⁻ᵀ`` come from one triangular solve; then
    ``S = YᵀY`` (symmetric positive semi-definite by construction),
    ``w₂ = (S + D)⁻¹ (Yᵀu − z)`` and ``w₁ = diag(s) L⁻ᵀ (u − Y w₂)``: two triangular
    solves in all, no ``H⁻¹Aᵀ``. (Row form: the solves act on contiguous rows.)

    Returns ``(w, ok, S + D)``.
    """
    m, c = As.shape[-1], As.shape[-2]
    s = hf.scale.to(rhs.dtype)
    L = hf.data[0]
    v, z = rhs[:, :m], rhs[:, m:]
    X = _rows_over(L.transpose(1, 2), torch.cat([As, (s.unsqueeze(-1) * v).transpose(1, 2)], 1),
                   upper=True)  # (B, c + K, m)
    Xa, U = X[:, :c], X[:, c:]
    G = Xa @ X.transpose(1, 2)  # [S, Yᵀu]
    S = G[..., :c] + torch.diag_embed(dvec)
    sf = _linalg.cholesky_factor(S, tol)
    w2 = sf.solve(G[..., c:] - z)  # (B, c, K)
    r = torch.baddbmm(U, w2.transpose(1, 2), Xa, alpha=-1)  # (u − Y w₂)ᵀ
    w1 = s.unsqueeze(-1) * _rows_over(L, r, upper=False).transpose(1, 2)
    w = torch.cat([w1, w2], 1)
    ok = sf.ok & _linalg.finite_samples(w)
    return w, ok, S


def _augmented_cholesky(H: Tensor, A: Tensor, tol: float) -> tuple[_linalg.Factor, Tensor]:
    """Equilibrated Cholesky of ``H + Aᵀ diag(ρ) A``; returns the factor and ``A diag(s)``.

    For any ``ρ`` the system ``[[H + AᵀρA, Aᵀ], [A, D]] w = [v + Aᵀρz; z]`` has the
    solution of the original one (used rows have ``D = 0``, unused rows ``A = 0``), and the
    augmented Hessian is positive definite wherever the reduced Hessian is, also where ``H``
    itself is singular (an eigenvector on the sphere: ``H = 2(λ₁I − X)`` vanishes along
    ``y``): Cholesky and the Schur complement then apply to every strict minimum. The
    backward's right-hand sides have ``z = 0``, so they are those of the original system.
    ``ρᵢ = 1 / ‖(A diag(s))ᵢ‖²`` with ``s`` the Jacobi scaling of ``H`` puts each added
    term on the scale of the scaled ``H`` (whose diagonal is then between 1 and ``1 + c``,
    so ``s`` serves the augmented matrix too); the scaled augmented matrix is formed
    directly, ``diag(s) H diag(s) + (A diag(s))ᵀ ρ (A diag(s))``.
    """
    s = _linalg._jacobi_scale(H)
    As = A * s.unsqueeze(-2)
    norms = As.square().sum(-1)
    positive = norms > 0  # (the inner where keeps the double backward finite)
    rho = torch.where(positive, torch.where(positive, norms, 1.0).reciprocal(), 0.0)
    # Not symmetrised: Cholesky reads the lower triangle only. Without a graph to keep
    # (not a double backward), one (B, m, m) temporary updated in place.
    if torch.is_grad_enabled() and (H.requires_grad or A.requires_grad):
        scaled = torch.baddbmm(s.unsqueeze(-1) * H * s.unsqueeze(-2), As.transpose(1, 2),
                               rho.unsqueeze(-1) * As)
    else:
        scaled = (s.unsqueeze(-1) * H).mul_(s.unsqueeze(-2)).baddbmm_(
            As.transpose(1, 2), rho.unsqueeze(-1) * As)
    return _linalg.cholesky_of_scaled(scaled, s, tol), As


def _gram_dependent(prob: Problem, rows: Tensor) -> Tensor:
    """``(n,)`` True where the used constraint rows of samples ``rows`` are dependent."""
    cd = _linalg.compute_dtype(prob.dtype)
    A = prob.A_solve[rows].to(cd)
    gram = A @ A.transpose(1, 2) + torch.diag_embed(prob.inactive_diagonal[rows].to(cd))
    return ~_linalg.cholesky_factor(gram, _tol(prob)).ok


def _singular_fallback(prob: Problem, K: Tensor, rhs: Tensor, w: Tensor, bad: Tensor) -> Tensor:
    """Re-solve the samples flagged ``bad`` by the pseudo-inverse, and say so."""
    if not bool(bad.any()):
        return w
    sol, truncated = _linalg.solve_symmetric_pinv(K[bad], rhs[bad],
                                                  prob.options.rcond_for(prob.dtype))
    n_sing = int(truncated.sum())
    if n_sing:
        what = ("the Hessian is singular (§4.7.4)" if prob.c == 0 else
                "the KKT matrix is singular: a singular reduced Hessian or a non-regular point "
                "(dependent active constraints, §4.7.3)")
        warn(prob.node, f"{what} for {n_sing} of {prob.batch} samples, judged after "
             "equilibration; the gradient uses the pseudo-inverse (eq. 35), a descent direction "
             "rather than a unique derivative. Consider ImplicitBackward(damping=...) or a "
             "reformulation with a unique solution.")
    elif int(bad.sum()):
        warn(prob.node, f"the dense solve failed its residual check for {int(bad.sum())} of "
             f"{prob.batch} samples although the matrix is not singular; re-solved them with a "
             "symmetric eigendecomposition.")
    return _replace(w, bad, sol)


def _solve_dense(prob: Problem, H: Tensor, rhs: Tensor, method: str,
                 allow_drop: bool) -> KKTResult:
    """Solve densely in the compute dtype; ``H`` ``(B, m, m)``, ``rhs`` ``(B, m + c, K)``."""
    tol = _tol(prob)
    A = prob.A_solve.to(H.dtype)
    dvec = prob.inactive_diagonal.to(H.dtype)
    no = torch.zeros(prob.batch, dtype=torch.bool, device=H.device)
    K = _kkt_matrix(H, A, dvec) if prob.c and method != "cholesky" else H
    if method == "lstsq":
        sol, truncated = _linalg.solve_symmetric_pinv(K, rhs, prob.options.rcond_for(prob.dtype))
        if bool(truncated.any()):
            warn(prob.node, f"the KKT matrix is singular for {int(truncated.sum())} of "
                 f"{prob.batch} samples; the gradient uses the pseudo-inverse (eq. 35).")
        return KKTResult(sol, no)

    dependent = no.clone()
    metric = None
    if method == "cholesky":
        if prob.c == 0:
            hf = _linalg.cholesky_factor(H, tol)
            w = hf.solve(rhs)
            ok = hf.ok
        else:
            # A Hessian shared by the batch (a QP's Q) is factorised once when it is positive
            # definite; otherwise (or per sample) H + AᵀρA. rhs = [v; 0] is also the
            # right-hand side of the augmented system.
            shared = _shared_cholesky(H, A, tol) if _shared(H) else None
            hf, As = shared if shared is not None else _augmented_cholesky(H, A, tol)
            if not bool(hf.ok.any()):  # indefinite everywhere: straight to LU
                w = torch.zeros_like(rhs)
                ok = hf.ok
            else:
                w, ok_s, S = _schur_cholesky(hf, As, dvec, rhs, tol)
                ok = hf.ok & ok_s
                # H + AᵀρA positive definite but S singular: the used rows are dependent.
                dependent = hf.ok & ~ok_s
                metric = S
            # Cholesky is backward stable, but eliminating through the Hessian is not when
            # it is nearly singular along a constraint normal: the scaled residual of the
            # whole (augmented, equivalent) KKT system decides, and LU of the original one
            # takes over where it fails.
            # A shared Hessian certified well conditioned needs no check.
            checked = ok & ~dependent
            if bool(checked.any()) and not (shared is not None
                                            and _well_conditioned(hf, prob.m + prob.c)):
                ok = ok & _kkt_residual_ok(hf.scaled, As, dvec, w, rhs, hf.scale)
        if bool(ok.all()):
            return KKTResult(w, no)
        # Where the augmented H is not positive definite (or the check failed), LU on the
        # whole scaled KKT matrix, checked by its residual.
        bad = ~ok & ~dependent
        if prob.c and (bool(bad.any()) or bool(dependent.any())):
            K = _kkt_matrix(H, A, dvec)
        if bool(bad.any()):
            Kb, rb = K[bad], rhs[bad]
            kscale = _linalg.equilibrate(Kb)
            w_lu, ok_lu = _linalg.solve_lu(Kb, rb, tol, kscale)
            ok_lu = ok_lu & _linalg.residual_ok(Kb, w_lu, rb, scale=kscale)
            w = _replace(w, bad, w_lu)
            ok = ok.clone()
            ok[bad] = ok_lu
    else:  # "lu"
        kscale = _linalg.equilibrate(K)
        w, ok = _linalg.solve_lu(K, rhs, tol, kscale)
        ok = ok & _linalg.residual_ok(K, w, rhs, scale=kscale)
    bad = ~ok & ~dependent
    if prob.c and allow_drop and bool(bad.any()):
        # A singular KKT matrix: dependent constraints are dropped by the caller, the rest
        # (a singular reduced Hessian) goes to the pseudo-inverse.
        idx = bad.nonzero().flatten()
        dep = _gram_dependent(prob, idx)
        if bool(dep.any()):
            dependent = dependent.clone()
            dependent[idx[dep]] = True
            bad = bad & ~dependent
    if bool(dependent.any()) and metric is None:
        Ad = prob.A_solve.to(H.dtype)
        metric = Ad @ Ad.transpose(1, 2) + torch.diag_embed(dvec)
    if not allow_drop:
        bad = bad | dependent
        dependent = no
    w = _singular_fallback(prob, K, rhs, w, bad)
    return KKTResult(w, dependent, metric)


def _solve_structured(prob: Problem, op: LinearOperator, rhs: Tensor,
                      allow_drop: bool) -> KKTResult:
    """``H`` declared with a cheap exact ``solve`` (diagonal, or a forward factor)."""
    cd = _linalg.compute_dtype(prob.dtype)
    no = torch.zeros(prob.batch, dtype=torch.bool, device=rhs.device)

    def hsolve(b: Tensor) -> Tensor:
        return op.solve(b.to(op.dtype)).to(cd) if op.dtype != cd else op.solve(b)

    if prob.c == 0:
        w = hsolve(rhs)
        bad = ~_linalg.finite_samples(w)
        if bool(bad.any()):
            raise ValueError(
                f"{type(prob.node).__name__}: the declared Hessian's solve returned NaN or Inf "
                f"for {int(bad.sum())} of {prob.batch} samples; a declared Hessian must be "
                "non-singular at the solution (add damping, or declare it only where it is)."
            )
        return KKTResult(w, no)
    inv_diag = None
    if getattr(op, "is_diagonal", False):
        inv_diag = op.diagonal().to(prob.dtype)
    w, ok, S, _ = _schur(prob, hsolve, rhs, structured=True, inv_diag=inv_diag)
    dependent = ~ok
    if not allow_drop and bool(dependent.any()):
        # Dependent rows remain after dropping: the minimum-norm w₂ (pseudo-inverse of S).
        bad = dependent
        m = prob.m
        A = prob.A_solve.to(cd)
        hv = hsolve(rhs[:, :m][bad])
        hat = hsolve(A[bad].transpose(1, 2))
        w2, _ = _linalg.solve_symmetric_pinv(S[bad], A[bad] @ hv - rhs[:, m:][bad],
                                             prob.options.rcond_for(prob.dtype))
        w = _replace(w, bad, torch.cat([hv - hat @ w2, w2], 1))
        warn(prob.node, f"the active constraints are linearly dependent for {int(bad.sum())} "
             f"of {prob.batch} samples even after dropping dependent rows; using the "
             "pseudo-inverse of the Schur complement (§4.7.3).")
        dependent = no
    return KKTResult(w, dependent, S)


# ---------------------------------------------------------------------------------------
# Matrix-free solves
# ---------------------------------------------------------------------------------------


def _report_iterative(prob: Problem, name: str, info: _linalg.IterativeInfo, rtol: float,
                      fallback: str) -> None:
    bad = ~info.converged
    if bool(bad.any()):
        warn(prob.node, f"{name} did not reach rtol={rtol:.1e} within {info.iterations} "
             f"iterations for {int(bad.sum())} of {prob.batch} samples (worst relative residual "
             f"{float(info.residual.max()):.2e}); {fallback}")


def _dense_affordable(prob: Problem) -> bool:
    n = prob.m + prob.c
    return prob.batch * n * n * 8 * 3 <= prob.options.memory_budget and n <= 8192


def _solve_matrix_free(prob: Problem, op: LinearOperator | None, v: Tensor,
                       method: str) -> tuple[Tensor, bool]:
    """Matrix-free CG / MINRES on ``v`` ``(B, m)``; returns ``(w, converged)``."""
    opts = prob.options
    m, c = prob.m, prob.c
    rtol = opts.rtol_for(prob.dtype)
    maxiter = opts.maxiter if opts.maxiter is not None else 2 * (m + c) + 10
    A = prob.A_solve
    dvec = prob.inactive_diagonal
    damping = opts.damping if op is None else 0.0

    def hvp(u: Tensor) -> Tensor:
        out = op.matvec(u) if op is not None else prob.hvp(u)
        return out + damping * u if damping else out

    def kkt(u: Tensor) -> Tensor:
        u1, u2 = u[:, :m], u[:, m:]
        top = hvp(u1) + (A.transpose(1, 2) @ u2.unsqueeze(-1)).squeeze(-1)
        bottom = (A @ u1.unsqueeze(-1)).squeeze(-1) + dvec * u2
        return torch.cat([top, bottom], 1)

    can_fall_back = _dense_affordable(prob)
    fallback = ("falling back to the dense solve." if can_fall_back else
                "the gradient is approximate. Raise ImplicitBackward(maxiter=...), add "
                "damping, or declare the Hessian's structure.")
    if method == "cg":
        if c == 0:
            diag = op.diagonal() if op is not None else None
            precond = None
            if diag is not None:
                inv = 1.0 / (diag + damping)
                if bool((torch.isfinite(inv) & (inv > 0)).all()):
                    def precond(u: Tensor, inv: Tensor = inv) -> Tensor:
                        return inv * u
            w, info = _linalg.conjugate_gradient(hvp, v, rtol, maxiter, preconditioner=precond)
        else:
            w, info = _projected_cg(prob, hvp, v, rtol, maxiter)
        if not bool(info.negative_curvature.any()):
            _report_iterative(prob, "CG", info, rtol, fallback)
            return w, bool(info.converged.all())
        warn(prob.node, "the (reduced) Hessian is not positive definite (CG met negative "
             "curvature); switching to MINRES.")
    rhs = torch.cat([v, v.new_zeros(prob.batch, c)], 1)
    w, info = _linalg.minres(kkt if c else hvp, rhs, rtol, maxiter)
    _report_iterative(prob, "MINRES", info, rtol, fallback)
    return w, bool(info.converged.all())


def _projected_cg(prob: Problem, hvp, v: Tensor, rtol: float,
                  maxiter: int) -> tuple[Tensor, _linalg.IterativeInfo]:
    """CG on the null space of ``A`` for the KKT system (constrained, matrix-free).

    ``w₁ ∈ null(A)`` solves ``P H w₁ = P v`` with ``P = I − Aᵀ (AAᵀ)⁻¹ A``; then
    ``w₂ = (AAᵀ)⁻¹ A (v − H w₁)``. Converges where the reduced Hessian is positive
    definite, i.e. at a strict local minimum (second-order sufficient condition).
    """
    cd = _linalg.compute_dtype(prob.dtype)
    A = prob.A_solve
    gram = (A.to(cd) @ A.to(cd).transpose(1, 2)
            + torch.diag_embed(prob.inactive_diagonal.to(cd)))
    eye = _eye(prob.c, gram).expand_as(gram)
    gram_inv, ok = _linalg.solve_cholesky(gram, eye, _tol(prob))
    if not bool(ok.all()):
        gram_inv, _ = _linalg.solve_symmetric_pinv(gram, eye, prob.options.rcond_for(prob.dtype))
        warn(prob.node, "the active constraint gradients are linearly dependent (a non-regular "
             "point, §4.7.3); the matrix-free solve uses their pseudo-inverse.")
    gram_inv = gram_inv.to(prob.dtype)

    def coefficients(u: Tensor) -> Tensor:  # (AAᵀ)⁻¹ A u, (B, c)
        return (gram_inv @ (A @ u.unsqueeze(-1))).squeeze(-1)

    def project(u: Tensor) -> Tensor:
        return u - (A.transpose(1, 2) @ coefficients(u).unsqueeze(-1)).squeeze(-1)

    w1, info = _linalg.conjugate_gradient(lambda u: project(hvp(project(u))), project(v),
                                          rtol, maxiter, scale=v.norm(dim=-1))
    w1 = project(w1)
    w2 = coefficients(v - hvp(w1))
    return torch.cat([w1, w2], 1), info


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def choose_method(prob: Problem, op: LinearOperator | None, force_dense: bool) -> str:
    """The solver for this problem: ``"structured"``, ``"cholesky"``, ``"lu"``,
    ``"lstsq"``, ``"cg"`` or ``"minres"``."""
    method = prob.options.linear_solver
    if method == "auto":
        if op is not None and op.has_solve:
            method = "structured"
        elif isinstance(op, DenseOperator) or prob.m + prob.c <= prob.options.dense_max_size:
            method = "cholesky"
        else:
            method = "cg"
    if (force_dense or prob.graph) and method in ("cg", "minres", "structured"):
        method = "cholesky"
    return method


def solve_kkt(prob: Problem, v: Tensor, *, force_dense: bool = False,
              allow_drop: bool = True) -> KKTResult:
    """Solve for ``w = [w₁; w₂]`` with right-hand sides ``v`` ``(B, m, K)``.

    Args:
        prob: the evaluated problem.
        v: ``(B, m, K)`` ``dJ/dy`` for ``K`` right-hand sides (one factorisation serves all).
        force_dense: use a dense solve even where ``"auto"`` would go matrix-free.
        allow_drop: report dependent constraints (``KKTResult.dependent``) for the caller
            to drop, instead of solving them by the pseudo-inverse.

    Returns:
        A :class:`KKTResult` with ``w`` ``(B, m + c, K)`` in the problem's dtype.
    """
    op = hessian_operator(prob)
    method = choose_method(prob, op, force_dense)
    if prob.graph and not _dense_affordable(prob):
        raise RuntimeError(
            f"{type(prob.node).__name__}: a differentiable backward (create_graph=True, double "
            f"backward) needs the dense KKT system, {prob.m + prob.c} × {prob.m + prob.c} per "
            f"sample for B={prob.batch}, which exceeds ImplicitBackward(memory_budget="
            f"{prob.options.memory_budget}). Raise memory_budget or reduce the problem size."
        )
    cd = _linalg.compute_dtype(prob.dtype)
    B, K = prob.batch, v.shape[2]
    rhs = torch.cat([v, v.new_zeros(B, prob.c, K)], 1).to(cd)
    if method == "structured":
        res = _solve_structured(prob, op, rhs, allow_drop)
    else:
        H = None
        if method in ("cholesky", "lu", "lstsq"):
            H = dense_hessian(prob, op)
            if H is None:
                method = "minres"
        if H is None:
            cols = []
            converged = True
            for k in range(K):  # only jacobian() asks for several columns, and it goes dense
                w, conv = _solve_matrix_free(prob, op, v[..., k], method)
                cols.append(w)
                converged = converged and conv
            w = torch.stack(cols, -1)
            no = torch.zeros(B, dtype=torch.bool, device=v.device)
            if converged or not _dense_affordable(prob):
                return KKTResult(w, no)
            H = dense_hessian(prob, op)
            if H is None:
                return KKTResult(w, no)
            method = "cholesky"
        res = _solve_dense(prob, H, rhs, method, allow_drop)
    res.w = res.w.to(prob.dtype)
    return res
