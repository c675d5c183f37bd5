"""Quadratic-programming layers (OptNet, Amos & Kolter, 2017).

``y = argmin_u ½ uᵀQu + pᵀu`` subject to ``Gu ≤ h`` and ``Au = b``, batched: forward by a
batched primal-dual interior-point method (Mehrotra's predictor-corrector), backward by one
solve with the forward's final KKT factorisation (Amos & Kolter, 2017, eqs. 7–8):
with ``D = diag(z/s)``, ``K [d_y; d_z; d_ν] = [∂ℓ/∂y; 0; 0]`` for the augmented
``K = [[Q, Gᵀ, Aᵀ], [G, −D⁻¹, 0], [A, 0, 0]]`` (so ``d_z = D G d_y``) gives
``∂ℓ/∂p = −d_y``, ``∂ℓ/∂Q = −½(d_y yᵀ + y d_yᵀ)``, ``∂ℓ/∂h = d_z``,
``∂ℓ/∂G = −(z d_yᵀ + d_z yᵀ)``, ``∂ℓ/∂b = d_ν``, ``∂ℓ/∂A = −(ν d_yᵀ + d_ν yᵀ)``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .._diagnostics import DeclarativeWarning
from ._functorch import batch_first, differentiable_backward, forward_from_backward, save_for_both
from ._precision import autocast_off, float32_inside
from ._qp import QPResult, kkt_matrix, kkt_solve, solve_qp

__all__ = ["QuadraticProgram", "QuadraticProgramError", "quadratic_program"]


class QuadraticProgramError(ValueError):
    """Some samples of a quadratic program are infeasible, unbounded, or were not solved.

    Attributes:
        status: per sample, ``"solved"``, ``"infeasible"``, ``"unbounded"`` or
            ``"not converged"``.
    """

    def __init__(self, message: str, status: list[str]) -> None:
        super().__init__(message)
        self.status = status


_SPEC = {  # name: (dims without batch, dims with batch)
    "Q": 2, "p": 1, "G": 2, "h": 1, "A": 2, "b": 1,
}


def _batch(args: dict[str, Tensor | None]) -> int | None:
    batch, first = None, ""
    for name, t in args.items():
        if t is None or t.dim() != _SPEC[name] + 1:
            continue
        if batch is None:
            batch, first = t.shape[0], name
        elif t.shape[0] != batch:
            raise ValueError(
                f"quadratic_program: batched arguments must share the batch size; {first} has "
                f"{batch} samples but {name} has shape {tuple(t.shape)}."
            )
    return batch


def _check(args: dict[str, Tensor | None]) -> tuple[int, int, int]:
    Q, p = args["Q"], args["p"]
    for name, t in args.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"quadratic_program: {name} must be a tensor, got {type(t).__name__}.")
        if t.dim() not in (_SPEC[name], _SPEC[name] + 1):
            shape = {"Q": "(m, m)", "p": "(m,)", "G": "(q, m)", "h": "(q,)", "A": "(r, m)",
                     "b": "(r,)"}[name]
            raise ValueError(
                f"quadratic_program: {name} must have shape {shape} (shared by the batch) or "
                f"(B, {shape[1:]}, got {tuple(t.shape)}."
            )
    if (args["G"] is None) != (args["h"] is None) or (args["A"] is None) != (args["b"] is None):
        raise ValueError("quadratic_program: pass G together with h, and A together with b.")
    m = p.shape[-1]
    if Q.shape[-2:] != (m, m):
        raise ValueError(f"quadratic_program: Q must be ({m}, {m}) for p of size {m}, got "
                         f"{tuple(Q.shape)}.")
    q = r = 0
    for M, v, name in ((args["G"], args["h"], "G, h"), (args["A"], args["b"], "A, b")):
        if M is None:
            continue
        if M.shape[-1] != m or v.shape[-1] != M.shape[-2]:
            raise ValueError(
                f"quadratic_program: {name} must be (k, {m}) and (k,), got {tuple(M.shape)} "
                f"and {tuple(v.shape)}."
            )
        if name == "G, h":
            q = M.shape[-2]
        else:
            r = M.shape[-2]
    return m, q, r


def _full(t: Tensor, name: str, batch: int) -> Tensor:
    """An argument with the batch dimension: shared ones are expanded to ``batch``."""
    return t.expand(batch, *t.shape) if t.dim() == _SPEC[name] else t


@forward_from_backward(outputs=3)
class _QPFunction(torch.autograd.Function):
    """``(y, z, ν)`` of the QP (all differentiable outputs) and the final KKT factorisation
    ``(LU, pivots)`` (non-differentiable), kept for the backward.

    Backward (module docstring, with incoming gradients for ``z`` and ``ν`` as well):
    ``K [a_y; a_z; a_ν] = [g_y; g_z; g_ν]``, then ``∂ℓ/∂p = −a_y`` and so on. The ordinary
    backward solves with the saved LU; when the backward is itself differentiated
    (``create_graph=True``) or transformed, ``K`` is rebuilt from the saved inputs and the
    saved outputs ``y``, ``z`` (``s = h − Gy``), which carry their dependence on every
    argument, and solved with differentiable operations: the second derivatives are those
    of implicit differentiation of the KKT conditions (a.e., for a fixed active set).
    """

    @staticmethod
    def forward(opts: dict[str, Any], Q: Tensor, p: Tensor, G: Tensor, h: Tensor,  # type: ignore[override]
                A: Tensor, b: Tensor) -> tuple[Tensor, ...]:
        B = opts["batch"]
        full = [_full(t.detach(), n, B) for n, t in zip("QpGhAb", (Q, p, G, h, A, b))]
        Qf, pf, Gf, hf, Af, bf = full
        Qf = 0.5 * (Qf + Qf.transpose(1, 2))
        with torch.no_grad():
            res = solve_qp(Qf, pf, Gf, hf, Af, bf, opts["tol"], opts["max_iter"])
        _report(res, opts)
        opts["last"] = res
        return res.y.clone(), res.z.clone(), res.nu.clone(), res.lu, res.pivots

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        opts, Q, _, G, h, A, _ = inputs
        y, z, nu, lu, piv = output
        ctx.mark_non_differentiable(lu, piv)
        ctx.opts = opts
        save_for_both(ctx, Q, G, h, A, y, z, nu, lu, piv)

    @staticmethod
    @autocast_off
    def backward(ctx: Any, grad_y: Tensor | None, grad_z: Tensor | None,  # type: ignore[override]
                 grad_nu: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        Q, G, h, A, y, z, nu, lu, piv = ctx.saved_tensors
        B = y.shape[0]
        gy = torch.zeros_like(y) if grad_y is None else grad_y.to(y.dtype)
        gz = torch.zeros_like(z) if grad_z is None else grad_z.to(z.dtype)
        gnu = torch.zeros_like(nu) if grad_nu is None else grad_nu.to(nu.dtype)
        m, q = y.shape[1], z.shape[1]
        if differentiable_backward():
            Qf, Gf, hf, Af = (_full(t, n, B) for n, t in zip("QGhA", (Q, G, h, A)))
            Qf = 0.5 * (Qf + Qf.transpose(1, 2))
            s = hf - (Gf @ y.unsqueeze(-1)).squeeze(-1)
            K = kkt_matrix(Qf, Gf, Af, s / z)
            sol = torch.linalg.solve(K, torch.cat([gy, gz, gnu], 1))
            dy, dz, dnu = sol[:, :m], sol[:, m:m + q], sol[:, m + q:]
        else:
            dy, dz, dnu = kkt_solve(lu, piv, gy, gz, gnu)  # dz = diag(z/s) G dy for g_z = 0
        need = ctx.needs_input_grad[1:]
        shapes = ctx.opts["shapes"]

        def fit(g: Tensor, k: int) -> Tensor:
            return g.sum(0) if len(shapes[k]) == g.dim() - 1 else g

        outer = torch.einsum
        grads: list[Tensor | None] = [None] * 6
        if need[0]:
            gq = -0.5 * (outer("bi,bj->bij", dy, y) + outer("bi,bj->bij", y, dy))
            grads[0] = fit(gq, 0)
        if need[1]:
            grads[1] = fit(-dy, 1)
        if need[2]:
            grads[2] = fit(-(outer("bi,bj->bij", z, dy) + outer("bi,bj->bij", dz, y)), 2)
        if need[3]:
            grads[3] = fit(dz, 3)
        if need[4]:
            grads[4] = fit(-(outer("bi,bj->bij", nu, dy) + outer("bi,bj->bij", dnu, y)), 4)
        if need[5]:
            grads[5] = fit(dnu, 5)
        return (None, *grads)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], opts: dict[str, Any], *args: Tensor
             ) -> tuple[Any, Any]:
        """Fold the vmapped dimension into the batch: one interior-point run on ``V·B``."""
        size, batch = info.batch_size, opts["batch"]
        flat = []
        for name, t, d in zip("QpGhAb", args, in_dims[1:]):
            t = batch_first(t, d, size)
            t = t.unsqueeze(1) if t.dim() == _SPEC[name] + 1 else t
            core = t.shape[2:]
            flat.append(t.expand(size, batch, *core).reshape(size * batch, *core))
        inner = dict(opts, batch=size * batch, shapes=[tuple(t.shape) for t in flat])
        out = _QPFunction.apply(inner, *flat)
        opts["last"] = inner["last"]
        return tuple(o.reshape(size, batch, *o.shape[1:]) for o in out), (0,) * len(out)


def _report(res: QPResult, opts: dict[str, Any]) -> None:
    bad = [(i, st) for i, st in enumerate(res.status) if st != "solved"]
    if not bad:
        return
    hard = [(i, st) for i, st in bad if st in ("infeasible", "unbounded")]
    lines = ", ".join(f"sample {i}: {st}" for i, st in bad[:10])
    more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
    worst = float(res.residual[[i for i, _ in bad]].max())
    msg = (f"quadratic_program: {len(bad)} of {len(res.status)} samples were not solved "
           f"({lines}{more}); worst residual {worst:.3g} (tol {opts['tol']:.3g}). ")
    if hard or opts["strict"]:
        raise QuadraticProgramError(
            msg + "Check that Gy ≤ h, Ay = b is feasible, that A has full row rank and that Q "
            "is positive semi-definite and bounded on the feasible set.", res.status)
    warnings.warn(msg + "Raise `max_iter` or `tol`.", DeclarativeWarning, stacklevel=4)


def quadratic_program(Q: Tensor, p: Tensor, G: Tensor | None = None, h: Tensor | None = None,
                      A: Tensor | None = None, b: Tensor | None = None, *,
                      tol: float | None = None, max_iter: int = 50,
                      strict: bool = True) -> Tensor:
    """Solve ``y = argmin_u ½ uᵀQu + pᵀu`` s.t. ``Gu ≤ h``, ``Au = b``, batched and
    differentiable with respect to every argument (OptNet).

    Each argument is either shared by the batch (no batch dimension) or batched (a leading
    ``B``); gradients of shared arguments are summed over the batch.

    Args:
        Q: ``(m, m)`` or ``(B, m, m)``, symmetric positive semi-definite (symmetrised).
            Every argument is float32 or float64 (promoted to a common dtype); float16 and
            bfloat16 are solved and differentiated in float32 and the solution returned in
            their dtype. Autocast is off inside: the interior-point method runs in float32
            under ``torch.autocast``.
        p: ``(m,)`` or ``(B, m)``.
        G: optional ``(q, m)`` or ``(B, q, m)``; h: ``(q,)`` or ``(B, q)``.
        A: optional ``(r, m)`` or ``(B, r, m)`` with full row rank; b: ``(r,)`` or ``(B, r)``.
        tol: relative stopping tolerance of the KKT residuals and the duality gap (default
            ``eps^0.8`` of the dtype: 3e-13 in float64, 3e-6 in float32 and half precision;
            the gradient needs the slacks of active constraints well below their
            multipliers).
        max_iter: interior-point iteration limit (default 50).
        strict: raise :class:`QuadraticProgramError` for samples that did not converge (when
            False, warn for those; infeasible or unbounded samples always raise).

    Returns:
        ``(B, m)`` the minimisers (``B = 1`` when no argument is batched).

    Raises:
        QuadraticProgramError: some samples are infeasible, unbounded or unsolved; the
            message names each one.

    Example:
        >>> Q = torch.eye(3, dtype=torch.float64)
        >>> p = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
        >>> G, h = torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        >>> y = quadratic_program(Q, p, G, h)        # y = min(−p, 1), elementwise
    """
    return _run(Q, p, G, h, A, b, tol, max_iter, strict)[0]


@float32_inside
def _run(Q: Tensor, p: Tensor, G: Tensor | None, h: Tensor | None, A: Tensor | None,
         b: Tensor | None, tol: float | None, max_iter: int, strict: bool
         ) -> tuple[Tensor, dict[str, Any]]:
    args = {"Q": Q, "p": p, "G": G, "h": h, "A": A, "b": b}
    m, q, r = _check(args)
    batch = _batch(args)
    if batch is None:  # nothing batched: one problem (an empty batch stays empty)
        batch = 1
    dtype = torch.promote_types(Q.dtype, p.dtype)
    if not dtype.is_floating_point:
        raise TypeError(f"quadratic_program: Q and p must be floating point, got {dtype}.")
    dev = p.device
    if G is None:
        G, h = p.new_zeros(0, m, dtype=dtype), p.new_zeros(0, dtype=dtype)
    if A is None:
        A, b = p.new_zeros(0, m, dtype=dtype), p.new_zeros(0, dtype=dtype)
    tensors = [t.to(device=dev, dtype=dtype) for t in (Q, p, G, h, A, b)]
    opts = {"batch": batch, "tol": float(torch.finfo(dtype).eps) ** 0.8 if tol is None
            else float(tol), "max_iter": max_iter, "strict": strict,
            "shapes": [tuple(t.shape) for t in tensors], "q": q, "r": r}
    return _QPFunction.apply(opts, *tensors)[0], opts


class QuadraticProgram(nn.Module):
    """``nn.Module`` form of :func:`quadratic_program`; ``forward(Q, p, G, h, A, b)``.

    Args:
        tol: see :func:`quadratic_program`.
        max_iter: see :func:`quadratic_program`.
        strict: see :func:`quadratic_program`.

    Attributes:
        info: after each forward pass, per-sample ``converged``, ``iterations``,
            ``residual`` and ``status``, and the multipliers ``z`` (inequalities, ``≥ 0``)
            and ``nu`` (equalities) in the usual convention ``Qy + p + Gᵀz + Aᵀν = 0``.
    """

    def __init__(self, *, tol: float | None = None, max_iter: int = 50,
                 strict: bool = True) -> None:
        super().__init__()
        self.tol, self.max_iter, self.strict = tol, max_iter, strict
        self.info: dict[str, Any] = {}

    def forward(self, Q: Tensor, p: Tensor, G: Tensor | None = None, h: Tensor | None = None,
                A: Tensor | None = None, b: Tensor | None = None) -> Tensor:
        y, opts = _run(Q, p, G, h, A, b, self.tol, self.max_iter, self.strict)
        res = opts["last"]
        self.info = {"converged": res.converged, "iterations": res.iterations,
                     "residual": res.residual, "status": res.status, "z": res.z.to(y.dtype),
                     "nu": res.nu.to(y.dtype)}
        return y
