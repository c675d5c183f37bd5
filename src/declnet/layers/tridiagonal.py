"""Batched tridiagonal linear systems as a declarative layer.

The solution of ``T x = r`` with ``T`` tridiagonal is the minimiser of the strongly convex
quadratic ``½‖T x − r‖²`` (or, for symmetric positive definite ``T``, of
``½ xᵀ T x − rᵀ x``); its gradient follows from implicit differentiation of the
optimality condition ``T x = r`` (paper §4, Proposition 4.4): for an incoming gradient
``v = dL/dx``,

    g = T⁻ᵀ v,   dL/dr = g,   dL/dT = −g xᵀ  (kept on the three diagonals),

so the whole backward is one transposed tridiagonal solve plus three products.

Forward solvers (``method``), all batched over the leading dimensions with no loop over
the batch: the Thomas algorithm (tridiagonal LU without pivoting, n dependent steps),
parallel cyclic reduction (the same eliminations reordered into ⌈log₂ n⌉ vectorised
steps; the default for all but small problems, since in PyTorch the cost of Thomas is
the per-step overhead of its n small operations), and for small problems a dense
batched LU with partial pivoting. Thomas and cyclic reduction do not pivot: they are
stable for diagonally dominant or symmetric positive definite ``T``. A singular system
or a zero pivot gives non-finite values, reported with a
:class:`declnet.DeclarativeWarning`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._diagnostics import DeclarativeWarning
from ._checks import check_tensor, run_value_check, value_check
from ._functorch import batch_first, forward_from_backward, save_for_both
from ._precision import autocast_off, float32_inside

__all__ = ["tridiagonal_solve"]


def _thomas(lower: Tensor, diag: Tensor, upper: Tensor, rhs: Tensor) -> Tensor:
    """Thomas algorithm on broadcast inputs with the sequence in dimension 0.

    Args:
        lower: ``(n − 1, *batch)`` sub-diagonal.
        diag: ``(n, *batch)`` diagonal.
        upper: ``(n − 1, *batch)`` super-diagonal.
        rhs: ``(n, *batch)`` right-hand side.

    Returns:
        ``(n, *batch)`` the solution.
    """
    n = diag.shape[0]
    d, r, lo, up = diag.unbind(0), rhs.unbind(0), lower.unbind(0), upper.unbind(0)
    c: list[Tensor] = []  # modified super-diagonal c'_i = upper_i / pivot_i
    z: list[Tensor] = []  # modified right-hand side
    inv = 1.0 / d[0]
    z.append(r[0] * inv)
    for i in range(1, n):
        c.append(up[i - 1] * inv)
        inv = 1.0 / torch.addcmul(d[i], lo[i - 1], c[i - 1], value=-1.0)
        z.append(torch.addcmul(r[i], lo[i - 1], z[i - 1], value=-1.0) * inv)
    x = [z[-1]]
    for i in range(n - 2, -1, -1):
        x.append(torch.addcmul(z[i], c[i], x[-1], value=-1.0))
    return torch.stack(x[::-1])


def _cyclic_reduction(lower: Tensor, diag: Tensor, upper: Tensor, rhs: Tensor) -> Tensor:
    """Parallel cyclic reduction on ``(..., n)`` inputs of one common shape.

    Level ``s = 1, 2, 4, ...`` eliminates from every equation
    ``a_i x_{i−s} + b_i x_i + c_i x_{i+s} = d_i`` its two neighbours ``i ± s`` (absent
    neighbours are the identity equation), which doubles the coupling distance; after
    ⌈log₂ n⌉ levels every equation is decoupled and ``x = d / b``. O(n log n) work in
    ⌈log₂ n⌉ vectorised steps (Hockney, 1965; Hockney & Jesshope, *Parallel Computers*,
    1981), against n dependent steps for Thomas. Like Thomas it does not pivot.
    """
    n = diag.shape[-1]
    zero = diag.new_zeros((*diag.shape[:-1], 1))
    a = torch.cat([zero, lower], -1)  # a_i = T[i, i − 1]
    c = torch.cat([upper, zero], -1)  # c_i = T[i, i + 1]
    b, d = diag, rhs
    s = 1
    while s < n:
        pad = diag.new_zeros((*diag.shape[:-1], s))
        one = pad + 1.0

        def below(t: Tensor, fill: Tensor, s: int = s) -> Tensor:  # t_{i − s}
            return torch.cat([fill, t[..., :-s]], -1)

        def above(t: Tensor, fill: Tensor, s: int = s) -> Tensor:  # t_{i + s}
            return torch.cat([t[..., s:], fill], -1)

        k1 = a / below(b, one)
        k2 = c / above(b, one)
        b = b - below(c, pad) * k1 - above(a, pad) * k2
        d = d - below(d, pad) * k1 - above(d, pad) * k2
        a, c = -below(a, pad) * k1, -above(c, pad) * k2
        s *= 2
    return d / b


# Below this many batch · n² the dense batched LU (with pivoting) beats the loops of
# Thomas and cyclic reduction, whose cost is dominated by per-step overhead.
_DENSE_MAX_WORK = 200_000


_METHODS = ("auto", "thomas", "cyclic", "dense")


def _resolve(method: str, numel: int, n: int) -> str:
    """The concrete method for ``"auto"``: dense for small problems, cyclic otherwise."""
    if method != "auto":
        return method
    return "dense" if numel * n <= _DENSE_MAX_WORK else "cyclic"


def _dense_solve(lower: Tensor, diag: Tensor, upper: Tensor, rhs: Tensor) -> Tensor:
    """Batched LU with partial pivoting on the assembled matrix, differentiated by autograd
    (whose backward is one transposed solve with the same LU factors); NaN if singular."""
    t = torch.diag_embed(diag)
    if diag.shape[-1] > 1:
        t = t + torch.diag_embed(upper, 1) + torch.diag_embed(lower, -1)
    x, info = torch.linalg.solve_ex(t, rhs)
    return torch.where(info.unsqueeze(-1) == 0, x, torch.nan)


def _solve_last(lower: Tensor, diag: Tensor, upper: Tensor, rhs: Tensor, method: str) -> Tensor:
    """Thomas or cyclic reduction on ``(..., n)`` inputs of one shape; returns ``(..., n)``."""
    if method == "cyclic":
        return _cyclic_reduction(lower, diag, upper, rhs)
    out = _thomas(
        lower.movedim(-1, 0), diag.movedim(-1, 0), upper.movedim(-1, 0), rhs.movedim(-1, 0)
    )
    return out.movedim(0, -1)


def _tridiagonal_jvp(ctx: Any, d_lower: Tensor | None, d_diag: Tensor | None,
                     d_upper: Tensor | None, d_rhs: Tensor | None, _: Any) -> Tensor:
    """Forward mode: ``ẋ = T⁻¹ (ṙ − Ṫ x)``, one more solve."""
    lower, diag, upper, x = ctx.saved_tensors
    rhs = torch.zeros_like(x) if d_rhs is None else d_rhs.expand_as(x)
    if d_diag is not None:
        rhs = rhs - d_diag * x
    if d_upper is not None:
        rhs = rhs - torch.nn.functional.pad(d_upper * x[..., 1:], (0, 1))
    if d_lower is not None:
        rhs = rhs - torch.nn.functional.pad(d_lower * x[..., :-1], (1, 0))
    return _TridiagonalFunction.apply(lower, diag, upper, rhs, ctx.method)


@forward_from_backward(jvp=_tridiagonal_jvp)
class _TridiagonalFunction(torch.autograd.Function):
    """x = T⁻¹ r with the backward by one transposed solve (itself differentiable)."""

    @staticmethod
    def forward(lower: Tensor, diag: Tensor, upper: Tensor, rhs: Tensor, method: str) -> Tensor:
        return _solve_last(lower, diag, upper, rhs, method)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        lower, diag, upper, _, ctx.method = inputs
        save_for_both(ctx, lower, diag, upper, output)

    @staticmethod
    @autocast_off
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:
        lower, diag, upper, x = ctx.saved_tensors
        # Tᵀ swaps the two off-diagonals.
        g = _TridiagonalFunction.apply(upper, diag, lower, v, ctx.method)
        grad_diag = -g * x if ctx.needs_input_grad[1] else None
        grad_upper = -g[..., :-1] * x[..., 1:] if ctx.needs_input_grad[2] else None
        grad_lower = -g[..., 1:] * x[..., :-1] if ctx.needs_input_grad[0] else None
        return grad_lower, grad_diag, grad_upper, g, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], *args: Any) -> tuple[Tensor, int]:
        """The solvers are batched over leading dimensions: move the vmapped one first."""
        size = info.batch_size
        parts = [batch_first(t, d, size) for t, d in zip(args[:4], in_dims[:4])]
        batch = torch.broadcast_shapes(*(t.shape[:-1] for t in parts))
        parts = [t.expand(*batch, t.shape[-1]) for t in parts]
        return _TridiagonalFunction.apply(*parts, args[4]), 0


@float32_inside
def tridiagonal_solve(
    lower: Tensor, diag: Tensor, upper: Tensor, rhs: Tensor, *, method: str = "auto"
) -> Tensor:
    """Solve the batched tridiagonal systems ``T x = r``.

    ``T`` has ``diag`` on its diagonal, ``upper`` above it (``T[i, i + 1] = upper[i]``) and
    ``lower`` below it (``T[i + 1, i] = lower[i]``). All leading dimensions are batch
    dimensions and broadcast against each other. Gradients flow to all four inputs
    through one transposed tridiagonal solve (§4, Prop. 4.4 applied to ``T x − r = 0``).

    Args:
        lower: ``(..., n − 1)`` sub-diagonal.
        diag: ``(..., n)`` diagonal.
        upper: ``(..., n − 1)`` super-diagonal.
        rhs: ``(..., n)`` right-hand side.
        method: ``"thomas"`` (the Thomas algorithm: O(n) work in n dependent steps),
            ``"cyclic"`` (parallel cyclic reduction: O(n log n) work in ⌈log₂ n⌉
            vectorised steps), ``"dense"`` (batched LU with partial pivoting on the
            assembled matrix) or ``"auto"``: dense when batch · n² <= 2·10⁵, cyclic
            otherwise (the fastest in PyTorch, where each dependent step costs a few
            kernel calls). The backward uses the same method (for dense, autograd
            through the LU solve, which reuses its factors).

    Returns:
        ``(..., n)`` the solution ``x``, with the broadcast batch shape.

    Raises:
        TypeError: for non-tensor or non-floating-point inputs.
        ValueError: for inconsistent lengths, batch shapes that do not broadcast, mixed
            dtypes or devices, or an unknown method.

    Example:
        >>> d = torch.full((2, 5), 4.0); e = torch.ones(2, 4)
        >>> x = tridiagonal_solve(e, d, e, torch.ones(2, 5))
    """
    lower = check_tensor(lower, "lower")
    diag = check_tensor(diag, "diag")
    upper = check_tensor(upper, "upper")
    rhs = check_tensor(rhs, "rhs")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}.")
    n = diag.shape[-1]
    if n == 0:
        raise ValueError("diag has length 0; a tridiagonal system needs n >= 1.")
    for name, t, want in (("lower", lower, n - 1), ("upper", upper, n - 1), ("rhs", rhs, n)):
        if t.shape[-1] != want:
            raise ValueError(
                f"{name} must have length {want} in its last dimension (diag has n={n}); "
                f"got shape {tuple(t.shape)}."
            )
    for name, t in (("lower", lower), ("upper", upper), ("rhs", rhs)):
        if t.dtype != diag.dtype or t.device != diag.device:
            raise ValueError(
                f"{name} is {t.dtype} on {t.device} but diag is {diag.dtype} on "
                f"{diag.device}; convert them to one dtype and device."
            )
    try:
        batch = torch.broadcast_shapes(
            lower.shape[:-1], diag.shape[:-1], upper.shape[:-1], rhs.shape[:-1]
        )
    except RuntimeError as err:
        raise ValueError(
            f"the batch shapes of lower {tuple(lower.shape)}, diag {tuple(diag.shape)}, "
            f"upper {tuple(upper.shape)} and rhs {tuple(rhs.shape)} do not broadcast."
        ) from err
    b_lower = lower.expand(*batch, n - 1)
    b_diag = diag.expand(*batch, n)
    b_upper = upper.expand(*batch, n - 1)
    b_rhs = rhs.expand(*batch, n)
    method = _resolve(method, b_diag.numel(), n)
    if method == "dense":
        x = _dense_solve(b_lower, b_diag, b_upper, b_rhs)
    else:
        x = _TridiagonalFunction.apply(b_lower, b_diag, b_upper, b_rhs, method)
    run_value_check("tridiagonal_finite", "tridiagonal_solve", x, diag, rhs)
    return x


@value_check("tridiagonal_finite")
def _warn_if_not_finite(tensors: Sequence[Tensor], label: str) -> None:
    """Warn when the solution ``x`` is not finite although ``diag`` and ``rhs`` are."""
    x, diag, rhs = tensors
    if not bool(torch.isfinite(x).all()) and bool(
        torch.isfinite(diag).all() & torch.isfinite(rhs).all()
    ):
        warnings.warn(
            f"{label}: the solution has non-finite entries: the matrix is singular, "
            "or the Thomas algorithm met a zero pivot (it does not pivot). It is stable for "
            "diagonally dominant or symmetric positive definite matrices; use "
            "torch.linalg.solve for others.",
            DeclarativeWarning,
            stacklevel=4,  # the caller of tridiagonal_solve (eager mode)
        )
