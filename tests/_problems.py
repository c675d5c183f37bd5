"""Problems with known gradients at hostile scales, shared by the engine tests."""

from __future__ import annotations

import torch

import declnet
from declnet import testing as dt


def rand(*shape, seed=0, dtype=torch.float64):
    """A seeded standard normal tensor (float64 draws, then cast)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


#: Every node kind as (id, make node, make a float64 input): the shared cases of the
#: autograd-feature tests (double backward, torch.func).
NODE_KINDS = [
    ("unconstrained", lambda: dt.QuadraticNode(3, 4), lambda: rand(2, 3)),
    ("nonlinear", lambda: dt.PolynomialNode(3, 4), lambda: rand(2, 3)),
    ("equality", lambda: dt.UnitSphereProjection(), lambda: rand(2, 4)),
    ("inequality_active", lambda: dt.L2BallProjection(1.0), lambda: 3 * rand(2, 4)),
    ("inequality_inactive", lambda: dt.L2BallProjection(100.0), lambda: rand(2, 4)),
    ("linear_equality", lambda: dt.MinKLOnSimplex(4), lambda: rand(2, 4)),
    ("mixed_active_inactive", lambda: dt.BallHalfspaceProjection(),
     lambda: torch.tensor([[-0.5, 2.0, 1.0, 0.3, -0.2], [0.4, 0.1, -0.2, 0.3, 0.1]],
                          dtype=torch.float64)),
]


class ScaledQuadratic(declnet.DeclarativeNode):
    """``y = argmin_u ½ (u − x)ᵀ H (u − x)``: ``y = x`` and ``Dy = I`` for any SPD ``H``."""

    def __init__(self, H: torch.Tensor, declare: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("H", H)
        self.declare = declare

    def objective(self, x, *, y):
        d = y - x
        return 0.5 * (d * (d @ self.H.to(d.dtype).T)).sum(-1)

    def solve(self, x):
        return x.clone()


def log_sinkhorn(M, r, c, gamma, iterations=2000):
    """Entropic OT ``P = argmin ⟨M, P⟩ + (1/γ) Σ P (log P − 1)``, ``P1 = r``, ``Pᵀ1 = c``,
    in the log domain (float64); returns ``P`` and the potentials ``(f, g)``."""
    f = torch.zeros_like(r)
    g = torch.zeros_like(c)
    for _ in range(iterations):
        f = (torch.log(r) - torch.logsumexp(gamma * (g.unsqueeze(-2) - M), -1)) / gamma
        g = (torch.log(c) - torch.logsumexp(gamma * (f.unsqueeze(-1) - M), -2)) / gamma
    P = torch.exp(gamma * (f.unsqueeze(-1) + g.unsqueeze(-2) - M))
    return P, f, g


class EntropicTransport(declnet.EqualityConstrainedNode):
    """Entropic OT as a generic node: ``y`` is the plan ``P`` ``(B, n, k)``."""

    def __init__(self, gamma: float, declare_hessian: bool = False,
                 give_multipliers: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gamma = gamma
        self.declare_hessian = declare_hessian
        self.give_multipliers = give_multipliers

    def objective(self, M, r, c, *, y):
        return (M * y).sum((-2, -1)) + (y * (torch.log(y) - 1)).sum((-2, -1)) / self.gamma

    def equality_constraints(self, M, r, c, *, y):
        # The last column sum follows from the others and the row sums: drop it.
        return torch.cat([y.sum(-1) - r, (y.sum(-2) - c)[:, :-1]], -1)

    def solve(self, M, r, c):
        P, f, g = log_sinkhorn(M, r, c, self.gamma)
        if self.give_multipliers:
            # D_P f = M + log P / γ = f ⊕ g = λᵀ A: row multipliers f, column ones g − g_last.
            lam = torch.cat([f + g[:, -1:], (g - g[:, -1:])[:, :-1]], -1)
            return declnet.Solution(P, multipliers=lam)
        return P

    def hessian(self, M, r, c, *, y, multipliers):
        if not self.declare_hessian:
            return None  # not declared: the engine forms it
        return declnet.DiagonalOperator(1.0 / (self.gamma * y.flatten(1)))


def marginal_jacobian(B, n, k, all_marginals=False, dtype=torch.float64):
    """The Jacobian of a plan's marginals ``[P 1; Pᵀ 1]`` (the last column sum dropped
    unless ``all_marginals``) as a sparse COO tensor ``(B, n + k [− 1], n k)``."""
    ii, ll = torch.meshgrid(torch.arange(n), torch.arange(k), indexing="ij")
    j = (ii * k + ll).reshape(-1)
    rows = torch.cat([ii.reshape(-1), n + ll.reshape(-1)])
    cols = torch.cat([j, j])
    c = n + k if all_marginals else n + k - 1
    keep = rows < c
    rows, cols = rows[keep], cols[keep]
    nnz = rows.numel()
    index = torch.stack([torch.arange(B).repeat_interleave(nnz), rows.repeat(B), cols.repeat(B)])
    return torch.sparse_coo_tensor(index, torch.ones(B * nnz, dtype=dtype), (B, c, n * k),
                                   check_invariants=True)


def transport_vjp_closed_form(P, v, gamma):
    """``dJ/dM`` for entropic OT by the structured formula (float64, pseudo-inverse).

    ``w = γ P ⊙ (v − α ⊕ β)`` with ``(α, β)`` solving the marginal system
    ``[[diag(r), P], [Pᵀ, diag(c)]] [α; β] = [(P ⊙ v) 1; (P ⊙ v)ᵀ 1]``; ``dJ/dM = −w``.
    """
    n = P.shape[1]
    r, c = P.sum(-1), P.sum(-2)
    top = torch.cat([torch.diag_embed(r), P], -1)
    bottom = torch.cat([P.transpose(-1, -2), torch.diag_embed(c)], -1)
    S = torch.cat([top, bottom], -2)
    pv = P * v
    rhs = torch.cat([pv.sum(-1), pv.sum(-2)], -1).unsqueeze(-1)
    ab = torch.linalg.lstsq(S, rhs, driver="gelsd").solution.squeeze(-1)
    alpha, beta = ab[:, :n], ab[:, n:]
    w = gamma * P * (v - alpha.unsqueeze(-1) - beta.unsqueeze(-2))
    return -w


class TopEigenvector(declnet.EqualityConstrainedNode):
    """``y = argmin −yᵀXy`` s.t. ``‖y‖² = 1``: the top eigenvector. The Hessian of the
    Lagrangian, ``2(λ₁I − X)``, is singular along ``y`` while the KKT system is regular."""

    def __init__(self, declare: bool = False, give_multipliers: bool = False,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.declare = declare
        self.give_multipliers = give_multipliers

    def objective(self, X, *, y):
        return -(y * (X @ y.unsqueeze(-1)).squeeze(-1)).sum(-1)

    def equality_constraints(self, X, *, y):
        return (y * y).sum(-1, keepdim=True) - 1.0

    def solve(self, X):
        evals, evecs = torch.linalg.eigh(X)
        y = evecs[..., -1]
        y = y * torch.sign(y[:, :1])
        if not self.give_multipliers:
            return y  # multipliers by least squares (eq. 25)
        return declnet.Solution(y, multipliers=-evals[..., -1:])

    def hessian(self, X, *, y, multipliers):
        if not self.declare:
            return None
        lam1 = -multipliers[:, :1, None]
        return 2.0 * (lam1 * torch.eye(X.shape[-1], dtype=X.dtype) - X)
