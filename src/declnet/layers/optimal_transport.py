"""Entropy-regularised optimal transport as a declarative layer.

    P(M, r, c, γ) = argmin_{P >= 0} ⟨P, M⟩ + (1/γ) Σ_ij P_ij (log P_ij − 1)
                    subject to  P 1 = r,  Pᵀ 1 = c

(Cuturi, 2013). The optimality conditions give ``P = exp(−γM + α 1ᵀ + 1 βᵀ)`` with
the scaled multipliers ``α``, ``β`` of the marginal constraints, found by log-domain
Sinkhorn iterations (alternating exact maximisation over ``α`` and ``β``), which stay
finite at large γ where ``P`` spans many orders of magnitude.

Backward (paper §4, Prop. 4.5; the structure of Campbell et al., 2020): differentiating
the conditions with θ = −γM gives, for an incoming gradient ``V = dL/dP``,

    [diag(r)  P     ] [u]   [(P ⊙ V) 1 ]
    [Pᵀ       diag(c)] [w] = [(P ⊙ V)ᵀ 1],

    dL/dθ = P ⊙ (V − u 1ᵀ − 1 wᵀ),  dL/dr = u,  dL/dc = w,
    dL/dM = −γ dL/dθ,               dL/dγ = −⟨dL/dθ, M⟩.

The system is solved by its Schur complement on the smaller marginal,
``S = diag(c) − Pᵀ diag(r)⁻¹ P`` (n × n for n <= m), whose null vector ``1`` (the
constraints are redundant by one: Σr = Σc) is removed by fixing one entry; no
(m + n)² or (mn)² matrix is formed. The marginal gradients are determined up to adding
``t`` to ``u`` and ``−t`` to ``w`` (a change of ``r`` must keep the mass equal to that
of ``c``); the returned pair is the one with ``Σu = Σw``.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .._diagnostics import DeclarativeWarning
from ._checks import as_param, check_tensor
from ._functorch import batch_first, forward_from_backward, plain, save_for_both
from ._precision import autocast_off, float32_inside, half_dtype

__all__ = ["OptimalTransport", "optimal_transport"]

GammaLike = Union[float, Tensor]

_CHECK_EVERY = 10  # Sinkhorn iterations between two convergence tests


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-6 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-11


def _sinkhorn(
    theta: Tensor, log_r: Tensor, log_c: Tensor, r: Tensor, tol: float, max_iter: int
) -> tuple[Tensor, float, int]:
    """Log-domain Sinkhorn on ``(B, m, n)`` log-kernels θ = −γM.

    Returns ``P``, the worst relative L1 error of the row marginals (the column
    marginals are exact after the last half-step) and the number of iterations. The
    stopping test compares each sample with its own marginals.
    """
    alpha = torch.zeros_like(log_r)
    beta = torch.zeros_like(log_c)
    mass = r.sum(-1)
    err = float("inf")
    it = 0
    while it < max_iter:
        for _ in range(_CHECK_EVERY):
            alpha = log_r - torch.logsumexp(theta + beta.unsqueeze(-2), dim=-1)
            beta = log_c - torch.logsumexp(theta + alpha.unsqueeze(-1), dim=-2)
        it += _CHECK_EVERY
        log_p = theta + alpha.unsqueeze(-1) + beta.unsqueeze(-2)
        rows = torch.logsumexp(log_p, dim=-1).exp()
        err = float(((rows - r).abs().sum(-1) / mass).amax()) if mass.numel() else 0.0
        if err <= tol:
            break
    return torch.exp(theta + alpha.unsqueeze(-1) + beta.unsqueeze(-2)), err, it


def _marginal_solve(p: Tensor, a: Tensor, bb: Tensor) -> tuple[Tensor, Tensor]:
    """Solve ``[[diag(P1), P], [Pᵀ, diag(Pᵀ1)]] [u; w] = [a; bb]`` (balanced gauge).

    The Schur complement is taken on the columns, so call it with ``n <= m``.
    """
    rows = p.sum(-1)
    cols = p.sum(-2)
    pr = p / rows.unsqueeze(-1)  # diag(r)⁻¹ P
    schur = torch.diag_embed(cols) - p.mT @ pr  # (B, n, n), null vector 1
    rhs = bb - (pr.mT @ a.unsqueeze(-1)).squeeze(-1)
    n = p.shape[-1]
    w = torch.zeros_like(bb)
    if n > 1:
        # Fix w_n = 0; the leading block is positive definite for a connected plan.
        red = schur[..., :-1, :-1]
        chol, info = torch.linalg.cholesky_ex(red)
        if bool(plain(info).any()):
            sol = torch.linalg.lstsq(red, rhs[..., :-1].unsqueeze(-1)).solution
        else:
            sol = torch.cholesky_solve(rhs[..., :-1].unsqueeze(-1), chol)
        w = torch.cat([sol.squeeze(-1), torch.zeros_like(bb[..., :1])], dim=-1)
    u = (a - (p @ w.unsqueeze(-1)).squeeze(-1)) / rows
    t = (w.sum(-1, keepdim=True) - u.sum(-1, keepdim=True)) / (u.shape[-1] + n)
    return u + t, w - t


def transport_vjp(p: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(dL/dθ, dL/dr, dL/dc)`` for θ = −γM, by the structured formula (module doc).

    Args:
        p: ``(B, m, n)`` transport plans, v: ``(B, m, n)`` incoming gradients.
    """
    pv = p * v
    a, bb = pv.sum(-1), pv.sum(-2)
    if p.shape[-1] <= p.shape[-2]:
        u, w = _marginal_solve(p, a, bb)
    else:
        w, u = _marginal_solve(p.mT, bb, a)
    grad_theta = pv - p * (u.unsqueeze(-1) + w.unsqueeze(-2))
    return grad_theta, u, w


@forward_from_backward
class _TransportFunction(torch.autograd.Function):
    """``P`` by Sinkhorn; the backward (:func:`transport_vjp`) is written with
    differentiable operations on the saved output ``P``, so it can be differentiated again
    (the Schur complement is re-formed from ``P``: nothing non-differentiable is saved)."""

    @staticmethod
    def forward(
        m: Tensor, r: Tensor, c: Tensor, gamma: Tensor, tol: float, max_iter: int
    ) -> Tensor:
        theta = -gamma.reshape(-1, 1, 1) * m
        p, err, _ = _sinkhorn(theta, r.log(), c.log(), r, tol, max_iter)
        if err > tol:
            warnings.warn(
                f"optimal_transport: Sinkhorn stopped at max_iter={max_iter} with a relative "
                f"marginal error {err:.3g} > tol={tol:g}. Raise max_iter, lower gamma, or "
                "rescale the cost; the backward assumes an exact solution.",
                DeclarativeWarning,
                stacklevel=4,
            )
        return p

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        m, _, _, gamma, _, _ = inputs
        save_for_both(ctx, m, gamma, output)

    @staticmethod
    @autocast_off
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:
        m, gamma, p = ctx.saved_tensors
        grad_theta, grad_r, grad_c = transport_vjp(p, v)
        grad_m = -gamma.reshape(-1, 1, 1) * grad_theta if ctx.needs_input_grad[0] else None
        grad_gamma = -(grad_theta * m).sum((-2, -1)) if ctx.needs_input_grad[3] else None
        return grad_m, grad_r, grad_c, grad_gamma, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], *args: Any) -> tuple[Tensor, int]:
        """Fold the vmapped dimension into the batch: one Sinkhorn run on ``V·B`` problems."""
        size = info.batch_size
        m, r, c, gamma = (batch_first(t, d, size) for t, d in zip(args[:4], in_dims[:4]))
        batch, rows, cols = m.shape[1:]
        p = _TransportFunction.apply(
            m.reshape(size * batch, rows, cols),
            r.expand(size, batch, rows).reshape(size * batch, rows),
            c.expand(size, batch, cols).reshape(size * batch, cols),
            gamma.expand(size, batch).reshape(size * batch),
            *args[4:],
        )
        return p.reshape(size, batch, rows, cols), 0


def _marginal(x: Optional[Tensor], name: str, size: int, m_: Tensor) -> Tensor:
    if x is None:
        return torch.full(
            (*m_.shape[:-2], size), 1.0 / size, dtype=m_.dtype, device=m_.device
        )
    x = check_tensor(x, name)
    if x.shape[-1] != size or x.dtype != m_.dtype or x.device != m_.device:
        raise ValueError(
            f"{name} must be a {m_.dtype} tensor of shape (..., {size}) on {m_.device} "
            f"for M of shape {tuple(m_.shape)}; got {x.dtype} {tuple(x.shape)} on {x.device}."
        )
    bad = plain(~(x > 0) | ~torch.isfinite(x))
    if bool(bad.any()):
        raise ValueError(
            f"every entry of {name} must be finite and > 0 (drop empty rows or columns of "
            f"M instead); got {plain(x.detach()).reshape(-1)[bad.reshape(-1)][0].item()}."
        )
    return x


def optimal_transport(
    M: Tensor,
    r: Optional[Tensor] = None,
    c: Optional[Tensor] = None,
    gamma: GammaLike = 1.0,
    *,
    tol: Optional[float] = None,
    max_iter: int = 10_000,
) -> Tensor:
    """Entropic optimal transport plan for cost ``M`` between marginals ``r`` and ``c``.

    ``P = argmin_{P 1 = r, Pᵀ1 = c} ⟨P, M⟩ + (1/γ) Σ P (log P − 1)`` (module docstring),
    by log-domain Sinkhorn with a per-sample stopping test, differentiated by the
    structured formula (Schur complement on the smaller marginal).

    Args:
        M: ``(..., m, n)`` costs, float32 or float64 (``r``, ``c`` of the same dtype).
            float16 and bfloat16 are solved and differentiated in float32 and the plan
            returned in their dtype (autocast is off inside); half-precision marginals may
            differ in mass by their rounding (4 eps relative) and are then rescaled to
            their mean mass.
        r: ``(..., m)`` positive row marginals (uniform ``1/m`` if None).
        c: ``(..., n)`` positive column marginals (uniform ``1/n`` if None); each sample's
            ``r`` and ``c`` must have the same total mass.
        gamma: the inverse temperature ``γ > 0``: a float or a tensor broadcastable to
            the batch shape ``...``; it may require grad. Larger is closer to unregularised
            transport (and slower to converge).
        tol: stop when every sample's row marginal has relative L1 error ``<= tol``
            (1e-6 in float32 and half precision, 1e-11 in float64 by default).
        max_iter: the iteration cap (a :class:`declnet.DeclarativeWarning` if reached).

    Returns:
        ``(..., m, n)`` the transport plans ``P``.

    Raises:
        TypeError / ValueError: for bad shapes or dtypes, non-positive marginals or
            ``gamma``, and marginals of different mass (infeasible problems).

    Example:
        >>> M = torch.rand(4, 10, 12, requires_grad=True)
        >>> P = optimal_transport(M, gamma=5.0)      # uniform marginals
        >>> (P * M).sum().backward()                  # fills M.grad
    """
    return _optimal_transport(M, r, c, gamma, tol, max_iter, half_dtype(r, c))


@float32_inside
def _optimal_transport(
    M: Tensor,
    r: Optional[Tensor],
    c: Optional[Tensor],
    gamma: GammaLike,
    tol: Optional[float],
    max_iter: int,
    low: Optional[torch.dtype],
) -> Tensor:
    """:func:`optimal_transport` in float32 for half-precision inputs; ``low`` is the half
    dtype of the given marginals, if any (they are then only known to its rounding)."""
    M = check_tensor(M, "M", min_dim=2)
    m, n = M.shape[-2:]
    if m == 0 or n == 0:
        raise ValueError(f"M must have at least one row and one column; got {tuple(M.shape)}.")
    r = _marginal(r, "r", m, M)
    c = _marginal(c, "c", n, M)
    g = as_param(gamma, M, "gamma", positive=True)
    if tol is None:
        tol = _default_tol(M.dtype)
    if not (isinstance(max_iter, int) and max_iter > 0):
        raise ValueError(f"max_iter must be a positive int; got {max_iter!r}.")
    try:
        batch = torch.broadcast_shapes(M.shape[:-2], r.shape[:-1], c.shape[:-1], g.shape)
    except RuntimeError as err:
        raise ValueError(
            f"the batch shapes of M {tuple(M.shape)}, r {tuple(r.shape)}, c {tuple(c.shape)} "
            f"and gamma {tuple(g.shape)} do not broadcast."
        ) from err
    mass_r, mass_c = r.detach().sum(-1), c.detach().sum(-1)
    gap = plain((mass_r - mass_c).abs() / torch.maximum(mass_r, mass_c))
    # Half-precision marginals normalised to the same mass differ by up to their rounding
    # (about eps of their dtype, relative): accept that much, and rescale both (as
    # constants) to the mean mass so that Sinkhorn can meet its tolerance in float32.
    slack = max(100 * tol, 1e-5, 0.0 if low is None else 4 * torch.finfo(low).eps)
    if bool((gap > slack).any()):
        raise ValueError(
            "infeasible marginals: r and c must have the same total mass in every sample; "
            f"got relative differences up to {float(gap.max()):.3g}. Normalise both, e.g. "
            "r / r.sum(-1, keepdim=True) and c / c.sum(-1, keepdim=True)."
        )
    if low is not None:
        mean = 0.5 * (mass_r + mass_c)
        r, c = r * (mean / mass_r).unsqueeze(-1), c * (mean / mass_c).unsqueeze(-1)
    p = _TransportFunction.apply(
        M.expand(*batch, m, n).reshape(-1, m, n),
        r.expand(*batch, m).reshape(-1, m),
        c.expand(*batch, n).reshape(-1, n),
        g.expand(batch).reshape(-1),
        float(tol),
        max_iter,
    )
    return p.reshape(*batch, m, n)


class OptimalTransport(nn.Module):
    """Module form of :func:`optimal_transport`: ``forward(M, r=None, c=None)``.

    Args:
        gamma: the inverse temperature ``γ > 0``.
        learnable: make ``γ`` an ``nn.Parameter``.
        tol: Sinkhorn's stopping test.
        max_iter: Sinkhorn's iteration cap.
    """

    def __init__(
        self,
        gamma: float = 1.0,
        learnable: bool = False,
        tol: Optional[float] = None,
        max_iter: int = 10_000,
    ) -> None:
        super().__init__()
        if not float(gamma) > 0.0:
            raise ValueError(f"gamma must be > 0; got gamma={gamma}.")
        value = torch.tensor(float(gamma))
        if learnable:
            self.gamma = nn.Parameter(value)
        else:
            self.register_buffer("gamma", value)
        self.tol = tol
        self.max_iter = max_iter

    def forward(self, M: Tensor, r: Optional[Tensor] = None, c: Optional[Tensor] = None) -> Tensor:
        return optimal_transport(
            M, r, c, self.gamma.to(M.dtype), tol=self.tol, max_iter=self.max_iter
        )

    def extra_repr(self) -> str:
        return f"gamma={float(self.gamma.detach()):g}"
