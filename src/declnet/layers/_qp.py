"""Batched primal-dual interior-point method (Mehrotra) for dense convex quadratic programs.

``min_y ½ yᵀQy + pᵀy`` s.t. ``Gy ≤ h`` (``q`` rows) and ``Ay = b`` (``r`` rows), with slacks
``s = h − Gy ≥ 0`` and multipliers ``z ≥ 0`` (inequalities), ``ν`` (equalities). Every
iteration factors the reduced KKT matrix ``[[Q + Gᵀ diag(z/s) G, Aᵀ], [A, 0]]`` once
(batched Cholesky and a Schur complement) and uses it for both the predictor and the
corrector; at the returned point the well-conditioned augmented matrix
``K = [[Q, Gᵀ, Aᵀ], [G, −diag(s/z), 0], [A, 0, 0]]`` is factored once (batched LU) and
kept for the backward pass (Amos & Kolter, 2017, "OptNet").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["QPResult", "kkt_matrix", "kkt_solve", "solve_qp"]


@dataclass
class QPResult:
    """The solver's state at the returned point (all batched, ``B`` first)."""

    y: Tensor  # (B, m)
    z: Tensor  # (B, q)
    nu: Tensor  # (B, r)
    s: Tensor  # (B, q)
    lu: Tensor  # (B, m + r, m + r)
    pivots: Tensor  # (B, m + r)
    converged: Tensor  # (B,)
    iterations: Tensor  # (B,)
    residual: Tensor  # (B,)
    status: list[str]  # per sample: "solved", "infeasible", "unbounded", "not converged"


def _bmv(M: Tensor, v: Tensor) -> Tensor:
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def kkt_matrix(Q: Tensor, G: Tensor, A: Tensor, w: Tensor) -> Tensor:
    """The augmented KKT matrix ``[[Q + δI, Gᵀ, Aᵀ], [G, −diag(w), 0], [A, 0, 0 − δI]]``,
    ``(B, m + q + r)``, built with differentiable operations (``δ`` is a constant; see
    :func:`_factor`)."""
    B, m = Q.shape[0], Q.shape[-1]
    q, r = G.shape[1], A.shape[1]
    delta = 100 * torch.finfo(Q.dtype).eps * (1.0 + Q.detach().abs().amax((1, 2)))
    top = Q + delta[:, None, None] * torch.eye(m, dtype=Q.dtype, device=Q.device)
    Z = Q.new_zeros
    eye_r = torch.eye(r, dtype=Q.dtype, device=Q.device)
    return torch.cat([
        torch.cat([top, G.transpose(1, 2), A.transpose(1, 2)], 2),
        torch.cat([G, torch.diag_embed(-w), Z(B, q, r)], 2),
        torch.cat([A, Z(B, r, q), -delta[:, None, None] * eye_r], 2),
    ], 1)


def _factor(Q: Tensor, G: Tensor, A: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """LU of the augmented KKT matrix ``[[Q + δI, Gᵀ, Aᵀ], [G, −diag(w), 0], [A, 0, 0]]``
    with ``w = s/z``, ``(B, m + q + r)`` (``δ = 100 eps (1 + max|Q|)`` keeps a singular ``Q``
    factorable; ``−δI`` in the last block does the same for dependent rows of ``A``).
    Unlike the reduced ``Q + Gᵀ diag(z/s) G``, whose entries grow like ``1/s`` on the
    active constraints, this matrix stays well conditioned at the solution: active rows
    tend to equalities (``w → 0``), inactive ones decouple."""
    lu, piv, _ = torch.linalg.lu_factor_ex(kkt_matrix(Q, G, A, w))
    return lu, piv


def kkt_solve(lu: Tensor, piv: Tensor, r1: Tensor, r2: Tensor, r3: Tensor
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Solve ``K [u; v; w] = [r1; r2; r3]`` with a factorisation from :func:`_factor`."""
    m, q = r1.shape[1], r2.shape[1]
    rhs = torch.cat([r1, r2, r3], 1).unsqueeze(-1)
    sol = torch.linalg.lu_solve(lu, piv, rhs).squeeze(-1)
    return sol[:, :m], sol[:, m:m + q], sol[:, m + q:]


def _reduced_factor(Q: Tensor, G: Tensor, A: Tensor, d: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor] | None:
    """Cholesky factors for the reduced system ``[[Q + Gᵀ diag(d) G, Aᵀ], [A, 0]]``
    (``d = z/s``): ``L`` of ``M = Q + GᵀDG + δI``, ``Y = M⁻¹Aᵀ`` and ``Lₛ`` of the Schur
    complement ``A M⁻¹ Aᵀ``; cheaper than the augmented LU (``m`` instead of ``m + q + r``)
    and accurate enough for the steps. None where ``M`` or the Schur complement is not
    numerically positive definite (the caller then uses the augmented system)."""
    m, r = Q.shape[-1], A.shape[1]
    M = Q + G.transpose(1, 2) @ (d.unsqueeze(-1) * G)
    delta = 100 * torch.finfo(Q.dtype).eps * (1.0 + Q.abs().amax((1, 2)))
    M = M + delta[:, None, None] * torch.eye(m, dtype=Q.dtype, device=Q.device)
    L, info = torch.linalg.cholesky_ex(M)
    if bool((info > 0).any()):
        return None
    Y = torch.cholesky_solve(A.transpose(1, 2), L)
    Ls = L.new_zeros(L.shape[0], 0, 0)
    if r:
        S = A @ Y
        Ls, info = torch.linalg.cholesky_ex(S)
        if bool((info > 0).any()):
            return None
    return L, Y, Ls


def _reduced_solve(fac: tuple[Tensor, Tensor, Tensor], A: Tensor, ry: Tensor, re: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """Solve ``[[M, Aᵀ], [A, 0]] [u; w] = [ry; re]`` with :func:`_reduced_factor`'s factors:
    ``w = S⁻¹(A M⁻¹ ry − re)``, ``u = M⁻¹ry − Y w``."""
    L, Y, Ls = fac
    u = torch.cholesky_solve(ry.unsqueeze(-1), L).squeeze(-1)
    if A.shape[1] == 0:
        return u, ry.new_zeros(ry.shape[0], 0)
    w = torch.cholesky_solve((_bmv(A, u) - re).unsqueeze(-1), Ls).squeeze(-1)
    return u - _bmv(Y, w), w


def _max_step(v: Tensor, dv: Tensor) -> Tensor:
    """``(B,)`` the largest ``α ≤ 1`` with ``v + α dv ≥ 0``."""
    if v.shape[1] == 0:
        return v.new_ones(v.shape[0])
    ratio = torch.where(dv < 0, -v / dv, torch.full_like(v, float("inf")))
    return ratio.amin(-1).clamp(max=1.0)


def solve_qp(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor,
             tol: float, max_iter: int) -> QPResult:
    """Run the interior-point method on a batch (every argument has the batch dimension).

    Args:
        Q: ``(B, m, m)`` symmetric positive semi-definite. p: ``(B, m)``.
        G: ``(B, q, m)``; h: ``(B, q)``. A: ``(B, r, m)``; b: ``(B, r)`` (``q`` or ``r`` may
            be 0).
        tol: relative stopping tolerance.
        max_iter: iteration limit.
    """
    B = p.shape[0]
    q, r = G.shape[1], A.shape[1]
    dev, dt = p.device, p.dtype
    # start: the least-squares point of the KKT system with D = I, slacks shifted inside
    lu, piv = _factor(Q, G, A, p.new_ones(B, q))
    y, z, nu = kkt_solve(lu, piv, -p, h, b)
    s = h - _bmv(G, y)
    if q:
        s = s + (1.0 - s.amin(-1, keepdim=True)).clamp_min(0.0)
        z = z + (1.0 - z.amin(-1, keepdim=True)).clamp_min(0.0)
    sp = 1.0 + p.abs().amax(-1) + Q.abs().amax((1, 2))
    sh = 1.0 + (h.abs().amax(-1) if q else p.new_zeros(B))
    sb = 1.0 + (b.abs().amax(-1) if r else p.new_zeros(B))
    active = torch.ones(B, dtype=torch.bool, device=dev)
    converged = torch.zeros_like(active)
    diverged = torch.zeros_like(active)
    iters = torch.zeros(B, dtype=torch.long, device=dev)
    res = torch.full((B,), float("inf"), dtype=dt, device=dev)
    huge = 1.0 / tol ** 1.5
    for it in range(max_iter + 1):
        idx = active.nonzero().flatten()
        if idx.numel() == 0:
            break
        sel = idx if idx.numel() < B else slice(None)
        Qi, pi, Gi, hi, Ai, bi = Q[sel], p[sel], G[sel], h[sel], A[sel], b[sel]
        yi, si, zi, nui = y[sel], s[sel], z[sel], nu[sel]
        Gt = Gi.transpose(1, 2)
        rd = _bmv(Qi, yi) + pi + _bmv(Gt, zi) + _bmv(Ai.transpose(1, 2), nui)
        rp = _bmv(Gi, yi) + si - hi
        re = _bmv(Ai, yi) - bi
        mu = (si * zi).sum(-1) / max(q, 1)
        obj = 1.0 + (0.5 * (yi * _bmv(Qi, yi)).sum(-1) + (pi * yi).sum(-1)).abs()
        zero = torch.zeros_like(mu)
        err = torch.stack([
            rd.abs().amax(-1) / sp[sel],
            rp.abs().amax(-1) / sh[sel] if q else zero,
            re.abs().amax(-1) / sb[sel] if r else zero,
            mu / obj,
        ]).amax(0)
        res[idx] = err
        done = err <= tol
        dual = torch.cat([zi, nui, zero.unsqueeze(-1)], 1).abs().amax(-1)
        blown = ~done & ((yi.abs().amax(-1) > huge * sp[sel]) | (dual > huge * sp[sel])
                         | ~torch.isfinite(err))
        converged[idx[done]] = True
        diverged[idx[blown]] = True
        active[idx[done | blown]] = False
        if it == max_iter:
            break
        keep = ~(done | blown)
        if not bool(keep.any()):
            break
        if not bool(keep.all()):
            idx = idx[keep]
            Qi, Gi, Gt, Ai = Qi[keep], Gi[keep], Gt[keep], Ai[keep]
            yi, si, zi, nui = yi[keep], si[keep], zi[keep], nui[keep]
            rd, rp, re, mu = rd[keep], rp[keep], re[keep], mu[keep]
        fac = _reduced_factor(Qi, Gi, Ai, zi / si)
        lu, piv = _factor(Qi, Gi, Ai, si / zi) if fac is None else (None, None)

        def direction(rc: Tensor, Gi: Tensor = Gi, Gt: Tensor = Gt, Ai: Tensor = Ai,
                      si: Tensor = si, zi: Tensor = zi, rd: Tensor = rd, rp: Tensor = rp,
                      re: Tensor = re, fac: tuple[Tensor, Tensor, Tensor] | None = fac,
                      lu: Tensor | None = lu, piv: Tensor | None = piv) -> tuple[Tensor, ...]:
            if fac is None:
                dy, dz, dnu = kkt_solve(lu, piv, -rd, -rp + rc / zi, -re)
                ds = (-rc - si * dz) / zi
            else:
                dy, dnu = _reduced_solve(fac, Ai, -rd + _bmv(Gt, (rc - zi * rp) / si), -re)
                ds = -rp - _bmv(Gi, dy)
                dz = (-rc - zi * ds) / si
            return dy, dnu, ds, dz

        # predictor (affine scaling), then Mehrotra's centring-corrector with the same factor
        dy, dnu, ds, dz = direction(si * zi)
        if q:
            a_aff = torch.minimum(_max_step(si, ds), _max_step(zi, dz)).unsqueeze(-1)
            mu_aff = ((si + a_aff * ds) * (zi + a_aff * dz)).sum(-1) / q
            sigma = (mu_aff / mu.clamp_min(torch.finfo(dt).tiny)).clamp(0.0, 1.0) ** 3
            dy, dnu, ds, dz = direction(si * zi + ds * dz - (sigma * mu).unsqueeze(-1))
            alpha = (0.99 * torch.minimum(_max_step(si, ds), _max_step(zi, dz))).clamp(max=1.0)
        else:
            alpha = torch.ones_like(mu)
        a = alpha.unsqueeze(-1)
        new = (yi + a * dy, nui + a * dnu, si + a * ds, zi + a * dz)
        finite = torch.stack([torch.isfinite(t).all(-1) for t in new]).all(0)
        if not bool(finite.all()):  # keep the last finite iterate for the diagnosis
            diverged[idx[~finite]] = True
            active[idx[~finite]] = False
            idx = idx[finite]
            new = tuple(t[finite] for t in new)
        y[idx], nu[idx], s[idx], z[idx] = new
        iters[idx] += 1
    status = _classify(Q, p, G, h, A, b, y, z, nu, converged, diverged, tol)
    LU, PIV = _factor(Q, G, A, s / z)  # at the returned point, for the backward pass
    return QPResult(y, z, nu, s, LU, PIV, converged, iters, res, status)


def _classify(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, y: Tensor,
              z: Tensor, nu: Tensor, converged: Tensor, diverged: Tensor, tol: float
              ) -> list[str]:
    """Per-sample status; for unsolved samples, look for certificates of infeasibility
    (``Gᵀz + Aᵀν ≈ 0`` with ``hᵀz + bᵀν < 0``) or unboundedness (``Qy ≈ 0``, ``Gy ≤ 0``,
    ``Ay ≈ 0``, ``pᵀy < 0``) in the normalised final iterate."""
    status = ["solved" if c else "not converged" for c in converged.tolist()]
    bad = (~converged).nonzero().flatten().tolist()
    if not bad:
        return status
    cert = 1e3 * tol ** 0.5
    w = torch.cat([z, nu], 1)
    wn = w.abs().amax(-1).clamp_min(torch.finfo(y.dtype).tiny)
    zt, nt = z / wn.unsqueeze(-1), nu / wn.unsqueeze(-1)
    dual_res = (_bmv(G.transpose(1, 2), zt) + _bmv(A.transpose(1, 2), nt)).abs().amax(-1)
    gap = (h * zt).sum(-1) + (b * nt).sum(-1)
    yn = y.abs().amax(-1).clamp_min(torch.finfo(y.dtype).tiny)
    yt = y / yn.unsqueeze(-1)
    scale = 1.0 + p.abs().amax(-1) + Q.abs().amax((1, 2))
    ray = torch.stack([
        _bmv(Q, yt).abs().amax(-1) / scale,
        _bmv(G, yt).clamp_min(0).amax(-1) if G.shape[1] else torch.zeros_like(yn),
        _bmv(A, yt).abs().amax(-1) if A.shape[1] else torch.zeros_like(yn),
    ]).amax(0)
    descent = (p * yt).sum(-1)
    for i in bad:
        if dual_res[i] <= cert and gap[i] < -cert:
            status[i] = "infeasible"
        elif ray[i] <= cert and descent[i] < -cert:
            status[i] = "unbounded"
        elif bool(diverged[i]):
            status[i] = "infeasible" if float(wn[i]) >= float(yn[i]) else "unbounded"
    return status
