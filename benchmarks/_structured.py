"""Shared problems of the structured backward benchmark, each with the best alternative.

Every problem builds, for a batch, the node's inputs, its solution, an upstream gradient
``v`` and a set of backward-only callables (the engine with and without declared
structure, and the alternatives), so that ``backward.py`` can time them interleaved.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

import declnet

Methods = dict[str, Callable[[], object]]

#: False when run against a declnet without declared structure (to measure "before").
HAS_STRUCTURE = hasattr(declnet, "DiagonalOperator")


def _engine(node, xs, sol, v):
    """The engine's backward alone, in either API generation."""
    if HAS_STRUCTURE:
        return declnet.implicit_vjp(node, *xs, y=sol.y, grad_y=v, solution=sol)
    return declnet.implicit_vjp(node, tuple(xs), sol.y, v, sol)


def _structured(declare: bool) -> bool:
    return declare and HAS_STRUCTURE


def _solution(y, **kwargs):
    if not HAS_STRUCTURE:
        kwargs.pop("hessian", None)
    return declnet.Solution(y, **kwargs)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype=dtype,
                                                                             device=device)


# -- ridge regression ---------------------------------------------------------------------


class Ridge(declnet.DeclarativeNode):
    """``y = argmin ½‖A y − b‖² + ½ ρ ‖y‖²``; optionally declares ``H = AᵀA + ρI`` with the
    Cholesky factor of the forward solve."""

    def __init__(self, rho: float, declare: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rho = rho
        self.declare = declare

    def objective(self, A, b, *, y):
        r = (A @ y.unsqueeze(-1)).squeeze(-1) - b
        return 0.5 * (r * r).sum(-1) + 0.5 * self.rho * (y * y).sum(-1)

    def solve(self, A, b):
        m = A.shape[-1]
        H = A.transpose(1, 2) @ A + self.rho * torch.eye(m, dtype=A.dtype, device=A.device)
        L = torch.linalg.cholesky(H)
        y = torch.cholesky_solve(A.transpose(1, 2) @ b.unsqueeze(-1), L).squeeze(-1)
        if not _structured(self.declare):
            return declnet.Solution(y)
        return declnet.Solution(y, hessian=declnet.DenseOperator(H, cholesky=L))


def ridge(B: int, m: int, dtype: torch.dtype, device: str) -> Methods:
    n = m + m // 2
    A = _randn(B, n, m, seed=1, dtype=dtype, device=device) / math.sqrt(n)
    b = _randn(B, n, seed=2, dtype=dtype, device=device)
    v = _randn(B, m, seed=3, dtype=dtype, device=device)
    rho = 0.1
    Ag, bg = A.clone().requires_grad_(True), b.clone().requires_grad_(True)
    methods: Methods = {}
    for name, declare in (("engine, structure declared", True), ("engine, auto", False)):
        if declare and not HAS_STRUCTURE:
            continue
        node = Ridge(rho, declare)
        sol = node.solve(A, b)
        methods[name] = lambda node=node, sol=sol: _engine(node, (Ag, bg), sol, v)
    eye = torch.eye(m, dtype=dtype, device=device)
    y_ad = torch.linalg.solve(Ag.transpose(1, 2) @ Ag + rho * eye,
                              (Ag.transpose(1, 2) @ bg.unsqueeze(-1))).squeeze(-1)
    methods["autograd through linalg.solve"] = (
        lambda: torch.autograd.grad(y_ad, (Ag, bg), v, retain_graph=True))
    return methods


# -- top eigenvector ----------------------------------------------------------------------


class TopEigenvector(declnet.EqualityConstrainedNode):
    """``y = argmin −yᵀXy`` s.t. ``‖y‖² = 1`` (the top eigenvector), ``H = 2(λ₁I − X)``."""

    def __init__(self, declare: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.declare = declare

    def objective(self, X, *, y):
        return -(y * (X @ y.unsqueeze(-1)).squeeze(-1)).sum(-1)

    def equality_constraints(self, X, *, y):
        return (y * y).sum(-1, keepdim=True) - 1.0

    def solve(self, X):
        evals, evecs = torch.linalg.eigh(X)
        y = evecs[..., -1]
        y = y * torch.sign(y[:, :1] + (y[:, :1] == 0))
        lam = -evals[..., -1:]  # D_Y f = −2Xy = λ (2y)
        if not _structured(self.declare):
            return declnet.Solution(y, multipliers=lam)
        m = X.shape[-1]
        H = 2.0 * (evals[..., -1, None, None] * torch.eye(m, dtype=X.dtype) - X)
        return declnet.Solution(y, multipliers=lam, hessian=H)


def eigenvector(B: int, m: int, dtype: torch.dtype, device: str) -> Methods:
    G = _randn(B, m, m, seed=4, dtype=dtype, device=device)
    X = 0.5 * (G + G.transpose(1, 2))
    v = _randn(B, m, seed=5, dtype=dtype, device=device)
    Xg = X.clone().requires_grad_(True)
    methods: Methods = {}
    for name, declare in (("engine, structure declared", True), ("engine, auto", False)):
        if declare and not HAS_STRUCTURE:
            continue
        node = TopEigenvector(declare)
        sol = node.solve(X)
        methods[name] = lambda node=node, sol=sol: _engine(node, (Xg,), sol, v)
    _evals, evecs = torch.linalg.eigh(Xg)
    top = evecs[..., -1]
    sign = torch.sign(top[:, :1].detach() + (top[:, :1].detach() == 0))
    y_ad = top * sign
    methods["autograd through linalg.eigh"] = (
        lambda: torch.autograd.grad(y_ad, Xg, v, retain_graph=True))
    return methods


# -- entropic optimal transport -----------------------------------------------------------


def _sinkhorn(M, r, c, gamma, iterations):
    f = torch.zeros_like(r)
    g = torch.zeros_like(c)
    for _ in range(iterations):
        f = (torch.log(r) - torch.logsumexp(gamma * (g.unsqueeze(-2) - M), -1)) / gamma
        g = (torch.log(c) - torch.logsumexp(gamma * (f.unsqueeze(-1) - M), -2)) / gamma
    return torch.exp(gamma * (f.unsqueeze(-1) + g.unsqueeze(-2) - M)), f, g


class Transport(declnet.EqualityConstrainedNode):
    """Entropic OT, ``P = argmin ⟨M, P⟩ + (1/γ) Σ P (log P − 1)`` with its marginals;
    declares ``H = diag(1/(γP))`` and the multipliers from the Sinkhorn potentials."""

    def __init__(self, gamma: float, iterations: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gamma = gamma
        self.iterations = iterations

    def objective(self, M, r, c, *, y):
        return (M * y).sum((-2, -1)) + (y * (torch.log(y) - 1)).sum((-2, -1)) / self.gamma

    def equality_constraints(self, M, r, c, *, y):
        return torch.cat([y.sum(-1) - r, (y.sum(-2) - c)[:, :-1]], -1)

    def solve(self, M, r, c):
        P, f, g = _sinkhorn(M, r, c, self.gamma, self.iterations)
        lam = torch.cat([f + g[:, -1:], (g - g[:, -1:])[:, :-1]], -1)
        if not HAS_STRUCTURE:
            return declnet.Solution(P, multipliers=lam)
        return declnet.Solution(P, multipliers=lam,
                                hessian=declnet.DiagonalOperator(1.0 / (self.gamma * P.flatten(1))))


class SparseTransport(Transport):
    """:class:`Transport` that also declares its marginals' Jacobian as a sparse COO tensor
    (two entries per column of the plan). The marginals are linear, so the tensor is built
    once per shape and returned again (as a user would)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._jacobians: dict[tuple, torch.Tensor] = {}

    def constraint_jacobian(self, M, r, c, *, y):
        key = (tuple(y.shape), y.dtype, y.device)
        if key not in self._jacobians:
            self._jacobians[key] = self._marginals_jacobian(y)
        return self._jacobians[key]

    def _marginals_jacobian(self, y):
        B, n, k = y.shape
        ii, ll = torch.meshgrid(torch.arange(n, device=y.device),
                                torch.arange(k, device=y.device), indexing="ij")
        j = (ii * k + ll).reshape(-1)
        rows = torch.cat([ii.reshape(-1), n + ll.reshape(-1)])
        cols = torch.cat([j, j])
        keep = rows < n + k - 1  # the last column sum is dropped
        rows, cols = rows[keep], cols[keep]
        nnz = rows.numel()
        batch = torch.arange(B, device=y.device).repeat_interleave(nnz)
        index = torch.stack([batch, rows.repeat(B), cols.repeat(B)])
        values = torch.ones(B * nnz, dtype=y.dtype, device=y.device)
        return torch.sparse_coo_tensor(index, values, (B, n + k - 1, n * k),
                                       check_invariants=False)


def transport_closed_form(P: torch.Tensor, v: torch.Tensor, gamma: float) -> torch.Tensor:
    """``dJ/dM`` by the structured formula in plain PyTorch: the ``(n + k − 1)``-square
    marginal system ``[[diag(r), P̄], [P̄ᵀ, diag(c̄)]]`` (last column constraint dropped)."""
    n, _k = P.shape[-2:]
    r, c = P.sum(-1), P.sum(-2)
    Pb = P[..., :-1]
    S = torch.cat([torch.cat([torch.diag_embed(r), Pb], -1),
                   torch.cat([Pb.transpose(-1, -2), torch.diag_embed(c[..., :-1])], -1)], -2)
    pv = P * v
    rhs = torch.cat([pv.sum(-1), pv.sum(-2)[..., :-1]], -1).unsqueeze(-1)
    ab = torch.cholesky_solve(rhs, torch.linalg.cholesky(S)).squeeze(-1)
    alpha = ab[..., :n]
    beta = torch.cat([ab[..., n:], torch.zeros_like(ab[..., :1])], -1)
    return -gamma * P * (v - alpha.unsqueeze(-1) - beta.unsqueeze(-2))


def transport(B: int, m: int, dtype: torch.dtype, device: str) -> Methods:
    n = k = m
    gamma = 10.0
    M = _randn(B, n, k, seed=6, dtype=dtype, device=device).abs()
    r = torch.full((B, n), 1.0 / n, dtype=dtype, device=device)
    c = torch.full((B, k), 1.0 / k, dtype=dtype, device=device)
    v = _randn(B, n, k, seed=7, dtype=dtype, device=device)
    node = Transport(gamma, 300)
    sparse = SparseTransport(gamma, 300)
    sol = node.solve(M, r, c)
    Mg = M.clone().requires_grad_(True)
    methods: Methods = {
        "engine, structure declared" if HAS_STRUCTURE else "engine, auto":
            lambda: _engine(node, (Mg, r, c), sol, v),
        **({"engine, diagonal H and sparse A declared":
            lambda: _engine(sparse, (Mg, r, c), sol, v)} if HAS_STRUCTURE else {}),
        "structured closed form": lambda: transport_closed_form(sol.y, v, gamma),
    }
    P_unrolled, _, _ = _sinkhorn(Mg, r, c, gamma, 100)
    methods["unrolled Sinkhorn (100 it.)"] = (
        lambda: torch.autograd.grad(P_unrolled, Mg, v, retain_graph=True))
    return methods


# -- quadratic program --------------------------------------------------------------------


class QP(declnet.InequalityConstrainedNode):
    """``y = argmin ½ yᵀQy + pᵀy`` s.t. ``G y ≤ h``; the instances are built with a known
    solution and multipliers; ``Q`` is declared as the Hessian and ``G`` as the constraint
    Jacobian."""

    def __init__(self, Q, y_star, lam, declare: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.Q, self.y_star, self.lam, self.declare = Q, y_star, lam, declare

    def objective(self, p, G, h, *, y):
        return 0.5 * (y * (y @ self.Q.transpose(-1, -2))).sum(-1) + (p * y).sum(-1)

    def inequality_constraints(self, p, G, h, *, y):
        return (G @ y.unsqueeze(-1)).squeeze(-1) - h

    def constraint_jacobian(self, p, G, h, *, y):
        return G if self.declare else None

    def solve(self, p, G, h):
        return _solution(self.y_star, multipliers=self.lam,
                         hessian=self.Q.expand(p.shape[0], -1, -1) if self.declare else None)


def qp_instance(B: int, n: int, q: int, dtype: torch.dtype, device: str):
    L = _randn(n, n, seed=8, dtype=dtype, device=device) / math.sqrt(n)
    Q = L @ L.T + 0.1 * torch.eye(n, dtype=dtype, device=device)
    G = _randn(B, q, n, seed=9, dtype=dtype, device=device)
    y_star = _randn(B, n, seed=10, dtype=dtype, device=device)
    active = torch.arange(q, device=device) < q // 2
    mu = torch.where(active, _randn(B, q, seed=11, dtype=dtype, device=device).abs() + 0.1, 0.0)
    slack = torch.where(active, 0.0, _randn(B, q, seed=12, dtype=dtype, device=device).abs()
                        + 0.1)
    h = (G @ y_star.unsqueeze(-1)).squeeze(-1) + slack
    p = -(y_star @ Q.T) - (G.transpose(1, 2) @ mu.unsqueeze(-1)).squeeze(-1)
    return Q, G, h, p, y_star, mu, active


def qp(B: int, n: int, dtype: torch.dtype, device: str, q: int = 25) -> Methods:
    Q, G, h, p, y_star, mu, active = qp_instance(B, n, q, dtype, device)
    v = _randn(B, n, seed=13, dtype=dtype, device=device)
    pg, Gg, hg = (t.clone().requires_grad_(True) for t in (p, G, h))
    methods: Methods = {}
    for name, declare in (("engine, structure declared", True), ("engine, auto", False)):
        if declare and not HAS_STRUCTURE:
            continue
        node = QP(Q, y_star, -mu, declare)
        sol = node.solve(p, G, h)
        methods[name] = lambda node=node, sol=sol: _engine(node, (pg, Gg, hg), sol, v)
    # Alternative: autograd through a dense solve of the KKT system of the active set.
    Ga = Gg * active.to(dtype).unsqueeze(-1)
    eye = torch.diag_embed((~active).to(dtype).expand(B, q))
    K = torch.cat([torch.cat([Q.expand(B, n, n), Ga.transpose(1, 2)], 2),
                   torch.cat([Ga, eye], 2)], 1)
    rhs = torch.cat([-pg, hg * active.to(dtype)], 1).unsqueeze(-1)
    y_kkt = torch.linalg.solve(K, rhs).squeeze(-1)[:, :n]
    methods["autograd through a dense KKT solve"] = (
        lambda: torch.autograd.grad(y_kkt, (pg, Gg, hg), v, retain_graph=True))
    try:
        import qpth  # noqa: F401  (an optional peer, never a dependency)
    except ImportError:
        pass
    else:
        from qpth.qp import QPFunction

        e = torch.zeros(B, 0, dtype=dtype, device=device)
        Ae = torch.zeros(B, 0, n, dtype=dtype, device=device)
        qp_y = QPFunction(verbose=-1)(Q.expand(B, n, n), pg, Gg, hg, Ae, e)
        methods["qpth"] = lambda: torch.autograd.grad(qp_y, (pg, Gg, hg), v, retain_graph=True)
    return methods


PROBLEMS = {
    "ridge regression": (ridge, [(64, 100), (64, 1000)]),
    "top eigenvector": (eigenvector, [(16, 64)]),
    "entropic OT (γ = 10)": (transport, [(4, 100)]),
    "QP (25 inequalities)": (qp, [(16, 50)]),
}
