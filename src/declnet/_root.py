"""Root-finding and fixed-point nodes: ``y`` solves ``F(x, y) = 0`` or ``y = G(x, y)``.

By the implicit function theorem (the paper's Lemma 4.3 with the optimality condition
replaced by ``F``), ``Dy(x) = −(D_Y F)⁻¹ D_X F``, so the backward pass turns the incoming
gradient ``v = ∂ℓ/∂y`` into ``u`` with ``(D_Y F)ᵀ u = v`` — one linear solve per sample,
batched — and returns ``−uᵀ D_X F`` by one vector-Jacobian product through ``equations``
(for the inputs and the module's parameters at once). A fixed-point node has
``F = G − y``, so ``(I − D_Y Gᵀ) u = v`` (Bai et al., 2019, "Deep Equilibrium Models").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._diagnostics import check_batched, node_name, warn
from ._solution import Solution
from .solvers import Anderson, default_solver

__all__ = ["FixedPointNode", "RootNode", "gmres"]


def gmres(op: Any, b: Tensor, rtol: float, max_iter: int, check_every: int = 2
          ) -> tuple[Tensor, Tensor, int]:
    """Batched GMRES without restarts for ``op(u) = b``, ``b (B, m)``.

    Arnoldi with classical Gram–Schmidt and one re-orthogonalisation pass when the new
    vector lost more than half its norm (as stable as modified Gram–Schmidt, in batched
    products). Every ``check_every`` steps the small least-squares problem
    ``min ‖βe₁ − H̄c‖`` is solved through its normal equations, and the residual of the
    iterate ``x = Vc`` it gives is evaluated exactly (so it is never underestimated); the
    last step uses a QR-based least-squares solve. Stops when all relative residuals are
    below ``rtol``.

    Returns:
        ``x (B, m)``, the relative residuals ``(B,)`` and the number of iterations.
    """
    B, m = b.shape
    k = max(1, min(max_iter, m))
    tiny = torch.finfo(b.dtype).tiny
    beta = b.norm(dim=-1)
    safe = beta.clamp_min(tiny)
    cap = min(k, 32)
    V = b.new_zeros(B, cap + 1, m)
    Hbar = b.new_zeros(B, cap + 1, cap)
    V[:, 0] = b / safe.unsqueeze(-1)
    e1 = b.new_zeros(B, k + 1)
    e1[:, 0] = beta
    c = b.new_zeros(B, 0)
    rel = torch.ones_like(beta)

    def least_squares(j: int, exact: bool) -> tuple[Tensor, Tensor]:
        Hj, ej = Hbar[:, : j + 2, : j + 1], e1[:, : j + 2]
        if exact:
            cj = torch.linalg.lstsq(Hj, ej.unsqueeze(-1)).solution.squeeze(-1)
        else:
            N = Hj.transpose(1, 2) @ Hj
            L, _ = torch.linalg.cholesky_ex(N)
            cj = torch.cholesky_solve((Hj.transpose(1, 2) @ ej.unsqueeze(-1)), L).squeeze(-1)
        r = ej - (Hj @ cj.unsqueeze(-1)).squeeze(-1)
        return cj, torch.nan_to_num(r.norm(dim=-1) / safe, nan=float("inf"))

    j = 0
    for j in range(k):
        if j + 1 > cap:  # grow the basis
            new = min(2 * cap, k)
            V = torch.cat([V, V.new_zeros(B, new - cap, m)], 1)
            Hbar = torch.cat([torch.cat([Hbar, Hbar.new_zeros(B, cap + 1, new - cap)], 2),
                              Hbar.new_zeros(B, new - cap, new)], 1)
            cap = new
        w = op(V[:, j])
        w0 = w.norm(dim=-1)
        Vj = V[:, : j + 1]
        h = (Vj * w.unsqueeze(1)).sum(-1)
        w = w - (Vj * h.unsqueeze(-1)).sum(1)
        if bool((w.norm(dim=-1) < 0.5 * w0).any()):
            h2 = (Vj * w.unsqueeze(1)).sum(-1)
            w = w - (Vj * h2.unsqueeze(-1)).sum(1)
            h = h + h2
        hn = w.norm(dim=-1)
        Hbar[:, : j + 1, j] = h
        Hbar[:, j + 1, j] = hn
        V[:, j + 1] = w / hn.clamp_min(tiny).unsqueeze(-1)
        last = j + 1 == k
        if (j + 1) % check_every == 0 or last or bool((hn <= rtol * safe).all()):
            c, rel = least_squares(j, exact=last)
            if bool((rel <= rtol).all()):
                break
    if not bool((rel <= rtol).all()):
        c, rel = least_squares(j, exact=True)
    x = (V[:, : c.shape[1]] * c.unsqueeze(-1)).sum(1)
    return x, rel, j + 1


class _RootFunction(torch.autograd.Function):
    """Forward: the node's solve under ``no_grad``. Backward: one ``(D_Y F)ᵀ`` solve."""

    @staticmethod
    def forward(ctx: Any, node: RootNode, n: int, *args: Any) -> Tensor:
        xs = args[:n]
        detached = tuple(x.detach() if isinstance(x, Tensor) else x for x in xs)
        with torch.no_grad():
            result = node.solve(*detached)
        sol = result if isinstance(result, Solution) else Solution(result)
        y = sol.y
        if not isinstance(y, Tensor) or y.dim() == 0:
            raise TypeError(
                f"{node_name(node)}.solve must return a (B, ...) tensor or a declnet.Solution, "
                f"got {type(y).__name__}."
            )
        node.solver_info = sol.info
        ctx.node, ctx.n = node, n
        ctx.tensor_index = [i for i, x in enumerate(args) if isinstance(x, Tensor)]
        ctx.others = [None if isinstance(a, Tensor) else a for a in args]
        ctx.save_for_backward(*[args[i] for i in ctx.tensor_index], y)
        return y.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Any, ...]:
        node, n = ctx.node, ctx.n
        saved = ctx.saved_tensors
        args = list(ctx.others)
        for i, t in zip(ctx.tensor_index, saved[:-1]):
            args[i] = t
        y = saved[-1]
        needs = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            inputs = []
            params = [p for p in node.parameters() if p.requires_grad]
            for i, a in enumerate(args):
                if i >= n:  # the node's own parameters, used by `equations` directly
                    args[i] = params[i - n]
                    if needs[i]:
                        inputs.append(args[i])
                elif isinstance(a, Tensor):
                    a = a.detach().requires_grad_(bool(needs[i]))
                    args[i] = a
                    if needs[i]:
                        inputs.append(a)
            yy = y.detach().requires_grad_(True)
            F = node.equations(*args[:n], y=yy)
            check_batched(node, "equations", F, y.shape[0], None)
            B = y.shape[0]
            Ff = F.reshape(B, -1)
            v = grad_y.reshape(B, -1).to(Ff.dtype)
            u = node._adjoint(Ff, yy, v)
            if not inputs:
                return (None, None, *([None] * len(args)))
            grads = torch.autograd.grad(Ff, inputs, -u, allow_unused=True)
        it = iter(grads)
        out: list[Any] = []
        for i, a in enumerate(args):
            g = next(it) if isinstance(a, Tensor) and needs[i] else None
            out.append(torch.zeros_like(a) if g is None and needs[i] else g)
        return (None, None, *out)


class RootNode(nn.Module):
    """A node whose output solves a square nonlinear system, ``F(x, y) = 0``.

    Subclasses implement

    - ``equations(*xs, y) -> (B, m)``: the residual for each sample (or ``(B, ...)`` with as
      many elements per sample as ``y``), batched;
    - ``initial_guess(*xs) -> (B, ...)``: the start (it fixes the shape of ``y``);
    - optionally ``solve(*xs) -> y or Solution``, which wins over the built-in solvers.

    The forward pass runs ``solver(self, *xs)`` under ``no_grad`` (default:
    :class:`~declnet.solvers.Newton` for ``m ≤ 256``, else :class:`~declnet.solvers.Broyden`);
    the backward pass solves ``(D_Y F)ᵀ u = ∂ℓ/∂y`` once per sample — dense LU on the
    ``(B, m, m)`` Jacobian (``m`` batched VJPs) for ``m ≤ dense_limit``, matrix-free GMRES
    on VJPs beyond — and returns ``−uᵀ D_X F`` for the inputs and the parameters. The
    solver's ``info`` of the last forward pass is kept in ``solver_info``.

    Args:
        solver: a built-in solver (``solver(node, *xs, y0=None) -> Solution``) or None for
            the default.
        linear_solver: ``"auto"``, ``"lu"`` or ``"gmres"`` for the backward pass.
        dense_limit: the largest ``m`` for which ``"auto"`` uses LU (default 256).
        rtol: relative residual of GMRES (default ``√eps`` of the dtype, times 0.01).
        max_iter: GMRES iteration limit (default ``min(m, 200)``).

    Example:
        >>> class Cubic(RootNode):                    # y³ + y = x, elementwise
        ...     def equations(self, x, *, y):
        ...         return y ** 3 + y - x
        ...     def initial_guess(self, x):
        ...         return torch.zeros_like(x)
        >>> y = Cubic()(torch.randn(4, 3, dtype=torch.float64, requires_grad=True))
    """

    def __init__(self, *, solver: Any = None, linear_solver: str = "auto",
                 dense_limit: int = 256, rtol: float | None = None,
                 max_iter: int | None = None) -> None:
        super().__init__()
        if linear_solver not in ("auto", "lu", "gmres"):
            raise ValueError(
                f"{node_name(self)}: linear_solver must be 'auto', 'lu' or 'gmres', got "
                f"{linear_solver!r}."
            )
        self.solver = solver
        self.linear_solver = linear_solver
        self.dense_limit = dense_limit
        self.rtol = rtol
        self.max_iter = max_iter
        self.solver_info: dict[str, Any] = {}

    def equations(self, *xs: Any, y: Tensor) -> Tensor:
        """``F(x, y)`` of shape ``(B, m)``; the output satisfies ``F = 0``. Abstract."""
        raise NotImplementedError(  # abstract
            f"{node_name(self)} must implement `equations(self, *xs, y)` returning a (B, m) "
            "tensor with as many elements per sample as y."
        )

    def initial_guess(self, *xs: Any) -> Tensor:
        """The starting point ``(B, ...)`` of the forward solver. Abstract."""
        raise NotImplementedError(  # abstract
            f"{node_name(self)} must implement `initial_guess(self, *xs)` returning the "
            "(B, ...) starting point (it also fixes the shape of y), or its own `solve`."
        )

    def default_solver(self, *xs: Any) -> Any:
        """The solver used when none was given: Newton for ``m ≤ 256``, else Broyden."""
        return default_solver(self, *xs)

    def solve(self, *xs: Any) -> Tensor | Solution:
        """Solve for ``y`` under ``no_grad`` with ``self.solver`` (or the default)."""
        solver = self.solver if self.solver is not None else self.default_solver(*xs)
        return solver(self, *xs)

    def forward(self, *xs: Any) -> Tensor:
        """``y(x)`` of shape ``(B, ...)``, differentiable w.r.t. the inputs and parameters."""
        params = [p for p in self.parameters() if p.requires_grad]
        n = len(xs)
        return _RootFunction.apply(self, n, *xs, *params)

    # -- backward ---------------------------------------------------------------------------
    def _adjoint(self, F: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """``u (B, m)`` with ``(D_Y F)ᵀ u = v``; ``F (B, m)`` built from ``y`` with a graph."""
        B, m = F.shape
        if m != y[0].numel():
            raise ValueError(
                f"{node_name(self)}.equations returned {m} equations per sample for an "
                f"output of {y[0].numel()} elements; the system must be square."
            )
        method = self.linear_solver
        if method == "auto":
            method = "lu" if m <= self.dense_limit else "gmres"
        if method == "lu":
            eye = torch.eye(m, dtype=F.dtype, device=F.device).unsqueeze(1).expand(m, B, m)
            (J,) = torch.autograd.grad(F, y, eye, is_grads_batched=True, retain_graph=True)
            J = J.reshape(m, B, m).transpose(0, 1)  # (B, m, m): J[b, i, :] = ∂F_i/∂y
            u, info = torch.linalg.solve_ex(J.transpose(1, 2), v)
            bad = (info > 0) | ~torch.isfinite(u).all(-1)
            if bool(bad.any()):
                warn(self, f"the Jacobian D_Y F is singular for {int(bad.sum())} samples; "
                     "using the pseudo-inverse there.")
                u[bad] = (torch.linalg.pinv(J[bad].transpose(1, 2))
                          @ v[bad].unsqueeze(-1)).squeeze(-1)
            return u

        return self._adjoint_gmres(F, y, v)

    def _adjoint_gmres(self, F: Tensor, y: Tensor, v: Tensor) -> Tensor:
        B, m = F.shape

        def op(w: Tensor) -> Tensor:
            (out,) = torch.autograd.grad(F, y, w.reshape(F.shape), retain_graph=True)
            return out.reshape(B, -1)

        eps = float(torch.finfo(F.dtype).eps)
        rtol = self.rtol if self.rtol is not None else 0.01 * eps ** 0.5
        max_iter = self.max_iter if self.max_iter is not None else min(m, 200)
        u, rel, _ = gmres(op, v, rtol, max_iter)
        if bool((rel > max(rtol, 10 * eps ** 0.5)).any()):
            warn(self, f"GMRES for the backward pass stopped at relative residual "
                 f"{float(rel.max()):.3g} after {max_iter} iterations; raise `max_iter`.")
        return u


class FixedPointNode(RootNode):
    """A node whose output is a fixed point, ``y = G(x, y)`` (a deep equilibrium layer).

    Subclasses implement ``fixed_point_map(*xs, y) -> (B, ...)`` (the shape of ``y``) and
    ``initial_guess(*xs)``; the forward pass runs :class:`~declnet.solvers.Anderson` by
    default, and the backward pass solves ``(I − D_Y G)ᵀ u = ∂ℓ/∂y``: by dense LU for
    ``m ≤ dense_limit`` (default 32 here), beyond by the adjoint fixed-point iteration
    ``u ← ∂ℓ/∂y + D_Y Gᵀ u`` (one VJP a step, convergent wherever the forward's plain
    iteration is), with GMRES as the fallback; ``linear_solver="lu"`` or ``"gmres"`` forces
    one.

    Example (the DEQ of Bai et al., 2019: ``y = tanh(W y + U x + b)``):
        >>> class DEQ(FixedPointNode):
        ...     def __init__(self, n, m):
        ...         super().__init__()
        ...         self.W = nn.Linear(m, m, bias=False)
        ...         self.U = nn.Linear(n, m)
        ...     def fixed_point_map(self, x, *, y):
        ...         return torch.tanh(self.W(y) + self.U(x))
        ...     def initial_guess(self, x):
        ...         return x.new_zeros(x.shape[0], self.W.in_features)
    """

    def __init__(self, *, solver: Any = None, linear_solver: str = "auto",
                 dense_limit: int = 32, rtol: float | None = None,
                 max_iter: int | None = None) -> None:
        super().__init__(solver=solver, linear_solver=linear_solver, dense_limit=dense_limit,
                         rtol=rtol, max_iter=max_iter)

    def fixed_point_map(self, *xs: Any, y: Tensor) -> Tensor:
        """``G(x, y)`` with the shape of ``y``. Abstract."""
        raise NotImplementedError(  # abstract
            f"{node_name(self)} must implement `fixed_point_map(self, *xs, y)` returning a "
            "tensor of y's shape."
        )

    def equations(self, *xs: Any, y: Tensor) -> Tensor:
        """``G(x, y) − y``."""
        return (self.fixed_point_map(*xs, y=y) - y).reshape(y.shape[0], -1)

    def _adjoint(self, F: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """``u`` with ``(I − D_Y G)ᵀ u = v``: above ``dense_limit`` (``"auto"``), by the
        adjoint fixed-point iteration ``u ← v + D_Y Gᵀ u`` (as cheap as the forward's, one
        VJP per step), falling back to GMRES if that does not converge in ``max_iter``."""
        B, m = F.shape
        method = self.linear_solver
        if method == "lu" or method == "gmres" or (method == "auto" and m <= self.dense_limit):
            return super()._adjoint(F, y, v)
        eps = float(torch.finfo(F.dtype).eps)
        rtol = self.rtol if self.rtol is not None else 0.01 * eps ** 0.5
        u = v  # ũ = −u solves ũ = v + D_Y Gᵀ ũ
        prev = float("inf")
        for _ in range(self.max_iter if self.max_iter is not None else 200):
            (jt,) = torch.autograd.grad(F, y, u.reshape(F.shape), retain_graph=True)
            new = v + jt.reshape(B, -1) + u  # D_Y Gᵀ ũ = (D_Y F)ᵀ ũ + ũ
            step = float((new - u).abs().max())
            u = new
            if step <= rtol * (1.0 + float(u.abs().max())):
                return -u
            if step > 2 * prev:  # not a contraction here
                break
            prev = step
        return super()._adjoint_gmres(F, y, v)

    def default_solver(self, *xs: Any) -> Any:
        """Anderson acceleration."""
        return Anderson()
