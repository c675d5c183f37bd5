"""Fused per-row reductions used by the robust pooling solvers, compiled when worthwhile.

Every kernel here is a pure function of tensors ``x (M, n)``, ``u (M, 1)`` and ``a`` (a 0-d
tensor or ``(M, 1)``) that reduces over the last dimension. Written as eager PyTorch each op
allocates and re-reads an ``(M, n)`` temporary; ``torch.compile`` fuses a kernel into one pass
over ``x``. The eager and compiled versions compute the same formulas; their sums may differ
in the last bits because the summation order differs.

Compilation policy (see :func:`set_compile_mode`):

- ``"auto"`` (default; environment variable ``DECLNET_COMPILE``): compile for inputs with at
  least 2**20 elements, on CPU and CUDA, unless already inside ``torch.compile``;
- ``"always"`` / ``"never"``.

If compiling fails (no C++ compiler, no Triton, an unsupported platform) declnet warns once
and uses the eager kernels from then on; compilation is never required.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .._diagnostics import DeclarativeWarning

__all__ = ["compile_mode", "kernel", "register", "set_compile_mode"]

_MODES = ("auto", "always", "never")
_AUTO_MIN_NUMEL = 1 << 20
_state: dict[str, object] = {"mode": None, "broken": False}
_compiled: dict[str, Callable[..., object]] = {}


def set_compile_mode(mode: str) -> None:
    """Choose when robust pooling compiles its fused kernels with ``torch.compile``.

    Args:
        mode: ``"auto"`` (compile for inputs of at least 2**20 elements), ``"always"`` or
            ``"never"`` (eager PyTorch only).

    Raises:
        ValueError: for any other value.

    Example:
        >>> set_compile_mode("never")   # e.g. in a test suite, to avoid compile time
    """
    if mode not in _MODES:
        raise ValueError(f"compile mode must be one of {_MODES}, got {mode!r}.")
    _state["mode"] = mode


def compile_mode() -> str:
    """The current compile mode (``"auto"``, ``"always"`` or ``"never"``)."""
    mode = _state["mode"]
    if mode is None:
        env = os.environ.get("DECLNET_COMPILE", "auto").strip().lower()
        mode = {"0": "never", "off": "never", "1": "always", "on": "always"}.get(env, env)
        if mode not in _MODES:
            warnings.warn(
                f"DECLNET_COMPILE={env!r} is not one of {_MODES} (or 0/1); using 'auto'.",
                DeclarativeWarning,
                stacklevel=3,
            )
            mode = "auto"
        _state["mode"] = mode
    return str(mode)


def _want_compiled(x: Tensor) -> bool:
    if _state["broken"]:
        return False
    mode = compile_mode()
    if mode == "never" or x.device.type not in ("cpu", "cuda"):
        return False
    if torch.compiler.is_compiling():
        return False
    return mode == "always" or x.numel() >= _AUTO_MIN_NUMEL


# --------------------------------------------------------------------------------------------
# The kernels. t = (u - x) / α throughout. Kernels with an ``inv`` flag take ``a = 1 / α``
# when it is true (see _RECIPROCAL): a product is several times cheaper than a quotient.


def _scaled(d: Tensor, a: Tensor, inv: bool) -> Tensor:
    """``d / α`` in place (``d`` is a temporary): ``d * a`` when ``inv`` (``a`` is ``1 / α``),
    ``d / a`` otherwise."""
    return d.mul_(a) if inv else d.div_(a)

# |t| beyond which exp(−t²/2) is 0 in float64 (and float32): clamping t there changes no
# Welsch term and keeps t² and (1 − t²)·e finite for far outliers (−inf · 0 would be NaN).
WELSCH_T_MAX = 64.0
# Pseudo-Huber: t is clamped at sqrt(max)/2 of its dtype, where t / sqrt(1 + t²) is ±1 to
# the dtype's precision, t² is still finite and (1 + t²)^(-3/2) underflows to 0 as it should.
PSEUDO_HUBER_T_MAX = 1e18  # a bound valid in both float32 and float64 (for rescaled rows)


def _rsqrt_one_plus_square(t: Tensor) -> Tensor:
    """``(1 + t²)^(-1/2)`` in one new tensor."""
    return torch.addcmul(torch.ones((), dtype=t.dtype, device=t.device), t, t).rsqrt_()


def _pseudo_huber_terms(t: Tensor) -> tuple[Tensor, Tensor]:
    """``t / sqrt(1 + t²)`` and ``(1 + t²)^(-1/2)``, with t clamped where ``t²`` would
    overflow. ``t`` (a temporary) is overwritten: the kernels work in place where they can,
    which saves a third of the eager time (fewer temporaries as large as the input)."""
    bound = math.sqrt(torch.finfo(t.dtype).max) / 2
    t = t.clamp_(-bound, bound)
    r = _rsqrt_one_plus_square(t)
    return t.mul_(r), r


def row_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row minimum, maximum and sum in one pass; each ``(M, 1)``."""
    return (
        x.amin(-1, keepdim=True),
        x.amax(-1, keepdim=True),
        x.sum(-1, keepdim=True),
    )


def shortest_window(s: Tensor, k: int) -> Tensor:
    """Index ``j`` of the shortest window ``s[j + k] − s[j]`` of sorted rows; ``(M, 1)``."""
    return (s[:, k:] - s[:, :-k]).argmin(-1, keepdim=True)


def pseudo_huber_sums(
    x: Tensor, u: Tensor, a: Tensor, inv: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """With ``q_i = t_i / sqrt(1 + t_i²)`` and ``r_i = (1 + t_i²)^(-1/2)``: Σ q_i, Σ r_i³ and
    Σ q_i r_i⁴; each ``(M, 1)``.

    For the pseudo-Huber penalty these are ``Σφ'(u − x_i) / α``, ``Σφ''`` and
    ``−α Σφ''' / 3``: what a Halley step needs.
    """
    q, r = _pseudo_huber_terms(_scaled(u - x, a, inv))
    r3 = (r * r).mul_(r)
    s1, s2 = q.sum(-1, keepdim=True), r3.sum(-1, keepdim=True)
    return s1, s2, r3.mul_(r).mul_(q).sum(-1, keepdim=True)


def pseudo_huber_first_sums(
    x: Tensor, u: Tensor, a: Tensor, inv: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`row_stats` of ``x`` and :func:`pseudo_huber_sums` at ``u``, in one pass."""
    return row_stats(x) + pseudo_huber_sums(x, u, a, inv)


# Indicators as sign(·) clamped at 0 (1 where positive, 0 at zero, below zero and for NaN):
# exact, and several times faster in eager mode on CPU than a comparison and a conversion
# of the boolean result (which are not vectorised there); the same under torch.compile.


def _positive(t: Tensor) -> Tensor:
    """``1[t > 0]`` in ``t``'s dtype, in place (``t`` is a temporary)."""
    return t.sign_().clamp_min_(0)


def huber_sums(x: Tensor, u: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """Σ φ'(u − x_i) and the number of strict inliers ``|u − x_i| < α``; each ``(M, 1)``."""
    z = u - x
    h = _positive(a - z.abs()).sum(-1, keepdim=True)
    g = torch.minimum(torch.maximum(z, -a), a).sum(-1, keepdim=True)
    return g, h


def huber_first_sums(
    x: Tensor, u: Tensor, a: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`row_stats` of ``x`` and :func:`huber_sums` at ``u``, in one pass."""
    return row_stats(x) + huber_sums(x, u, a)


def welsch_sums(
    x: Tensor, u: Tensor, a: Tensor, inv: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """For ``e_i = exp(−t_i²/2)``: Σ t_i e_i, Σ (1 − t_i²) e_i and Σ e_i; each ``(M, 1)``.

    These are ``α Σφ'``, ``α² Σφ''`` and ``α² Σ weight`` (so ``n − Σ e_i`` is the objective).
    """
    t = _scaled(u - x, a, inv).clamp_(-WELSCH_T_MAX, WELSCH_T_MAX)
    t2 = t * t
    e = (t2 * -0.5).exp_()
    s_e = e.sum(-1, keepdim=True)
    s_h = t2.neg_().add_(1).mul_(e).sum(-1, keepdim=True)
    return t.mul_(e).sum(-1, keepdim=True), s_h, s_e


def pseudo_huber_backward_sums(
    x: Tensor, y: Tensor, a: Tensor, inv: bool = False
) -> tuple[Tensor, Tensor]:
    """Σ w_i and Σ t_i³ w_i with ``w_i = (1 + t_i²)^(-3/2)``; each ``(M, 1)``."""
    q, r = _pseudo_huber_terms(_scaled(y - x, a, inv))  # t³ w = (t r)³ = q³, bounded by 1
    w = (r * r).mul_(r).sum(-1, keepdim=True)
    return w, (q * q).mul_(q).sum(-1, keepdim=True)


def pseudo_huber_backward_grad(
    x: Tensor, y: Tensor, a: Tensor, scale: Tensor, inv: bool = False
) -> Tensor:
    """``scale · (1 + t_i²)^(-3/2)``, shape ``(M, n)``."""
    t = _scaled(y - x, a, inv)
    r = _rsqrt_one_plus_square(t)
    return (r * r).mul_(r).mul_(scale)


def welsch_backward_sums(
    x: Tensor, y: Tensor, a: Tensor, inv: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """With ``e_i = exp(−t_i²/2)``: Σ(1−t²)e, Σ|1−t²|e, Σ e, Σ t(t²−2)e, Σ t³e; each (M, 1)."""
    t = _scaled(y - x, a, inv).clamp_(-WELSCH_T_MAX, WELSCH_T_MAX)
    t2 = t * t
    e = (t2 * -0.5).exp_()
    c = (1 - t2).mul_(e)
    s_c, s_e = c.sum(-1, keepdim=True), e.sum(-1, keepdim=True)
    s_abs = c.abs_().sum(-1, keepdim=True)
    te = t.mul_(e)
    s_shift = (te * t2).sum(-1, keepdim=True)
    s_newton = t2.sub_(2).mul_(te).sum(-1, keepdim=True)
    return s_c, s_abs, s_e, s_newton, s_shift


def welsch_backward_grad(
    x: Tensor,
    y: Tensor,
    a: Tensor,
    scale_newton: Tensor,
    scale_shift: Tensor,
    inv: bool = False,
) -> Tensor:
    """``scale_newton · (1 − t²) e + scale_shift · e``, shape ``(M, n)``."""
    t = _scaled(y - x, a, inv).clamp_(-WELSCH_T_MAX, WELSCH_T_MAX)
    t2 = t * t
    e = (t2 * -0.5).exp_()
    return t2.neg_().add_(1).mul_(scale_newton).add_(scale_shift).mul_(e)


def huber_backward_sums(x: Tensor, y: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """Number of inliers ``|y − x_i| ≤ α`` and Σ sign(y − x_i) over outliers; each ``(M, 1)``."""
    z = y - x
    outlier = _positive(z.abs() - a)
    cnt = z.shape[-1] - outlier.sum(-1, keepdim=True)
    return cnt, outlier.mul_(z.sign_()).sum(-1, keepdim=True)


def _window(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``1[lo ≤ x_i ≤ hi]`` in ``x``'s dtype (``lo ≤ hi``; also 1 for a NaN, whose row is
    NaN anyway)."""
    return _positive(lo - x).add_(_positive(x - hi)).neg_().add_(1)


def window_sums(x: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Σ x_i and the count over ``lo ≤ x_i ≤ hi``; each ``(M, 1)``."""
    m = _window(x, lo, hi)
    return (x * m).sum(-1, keepdim=True), m.sum(-1, keepdim=True)


def truncated_prefix_sums(s: Tensor, ref: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """Prefix sums of ``d = (s − ref) / α`` and ``d²`` in float64; each ``(M, n)``."""
    d = (s.to(torch.float64) - ref.to(torch.float64)) / a.to(torch.float64)
    return d.cumsum(-1), (d * d).cumsum(-1)


def truncated_window_costs(
    p1: Tensor, p2: Tensor, bounds: Tensor, exits: bool
) -> tuple[Tensor, Tensor]:
    """Best window cost ``(SSE + α² (n − size)) / α²`` and its index among n windows; ``(M, 1)``.

    ``p1``, ``p2`` are inclusive prefix sums ``(M, n)``; window k is ``[k+1, bounds_k)`` when
    ``exits`` and ``[bounds_k, k+1)`` otherwise (0-based, end exclusive).
    """
    n = p1.shape[-1]
    k1 = torch.arange(1, n + 1, device=p1.device, dtype=bounds.dtype)
    zero = torch.zeros((), dtype=p1.dtype, device=p1.device)
    at1 = torch.where(bounds > 0, p1.gather(1, (bounds - 1).clamp_min(0)), zero)
    at2 = torch.where(bounds > 0, p2.gather(1, (bounds - 1).clamp_min(0)), zero)
    if exits:
        s1, s2, size = at1 - p1, at2 - p2, bounds - k1
    else:
        s1, s2, size = p1 - at1, p2 - at2, k1 - bounds
    size_f = size.to(p1.dtype)
    cost = (s2 - s1 * s1 / size_f).clamp_min(0) + (n - size_f)
    cost = torch.where(size > 0, cost, torch.inf)
    best, index = cost.min(-1, keepdim=True)
    return best, index


def _bins(s: Tensor, o: Tensor, h: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """The bin coordinate ``q = (s − o) / h`` clamped to ``[−1, bins]`` (NaN → −1), its floor
    and the bin index ``floor(q) + 1`` (0: below, ``bins + 1``: at or above ``bins``)."""
    q = torch.nan_to_num((s - o) / h, nan=-1.0, posinf=float(bins), neginf=-1.0)
    q = q.clamp(-1.0, float(bins))
    fl = q.floor()
    return q, fl, (fl + 1).to(torch.int64)


def histogram_counts(s: Tensor, o: Tensor, h: Tensor, bins: int) -> Tensor:
    """Counts of ``q = (s − o) / h`` on ``bins`` unit bins with two overflow bins (as
    :func:`truncated_histogram`, counts only); ``(M, bins + 2)`` in ``s``'s dtype."""
    idx = _bins(s, o, h, bins)[2]
    out = torch.zeros((s.shape[0], bins + 2), dtype=s.dtype, device=s.device)
    return out.scatter_add_(1, idx, torch.ones_like(s))


def truncated_histogram(
    s: Tensor, o: Tensor, h: Tensor, bins: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Histogram of ``q = (s − o) / h`` on ``bins`` unit bins, with two overflow bins.

    Bin ``k + 1`` holds ``k ≤ q < k + 1`` for ``0 ≤ k < bins``; bin 0 holds ``q < 0`` (and
    NaN), bin ``bins + 1`` holds ``q ≥ bins``. Returns the counts and, over the regular bins,
    the sums of the local coordinate ``l = q − k − 1/2`` and of ``l²`` (0 in the overflow
    bins); each ``(M, bins + 2)``.
    """
    q, fl, idx = _bins(s, o, h, bins)
    regular = (fl >= 0) & (fl < bins)
    local = torch.where(regular, q - fl - 0.5, 0.0)
    shape = (s.shape[0], bins + 2)
    cnt = torch.zeros(shape, dtype=s.dtype, device=s.device).scatter_add_(
        1, idx, torch.ones_like(s)
    )
    s1 = torch.zeros(shape, dtype=s.dtype, device=s.device).scatter_add_(1, idx, local)
    s2 = torch.zeros(shape, dtype=s.dtype, device=s.device).scatter_add_(1, idx, local * local)
    return cnt, s1, s2


def truncated_objective(x: Tensor, u: Tensor, a: Tensor) -> Tensor:
    """``Σ_i min(t_i², 1)`` (twice the truncated-quadratic objective over ``α²``), summed in
    float64; ``(M, 1)``."""
    t = (u - x) / a
    return torch.clamp_max(t * t, 1.0).sum(-1, keepdim=True, dtype=torch.float64)


def truncated_range_sums(
    s: Tensor, begin: Tensor, end: Tensor, ref: Tensor, a: Tensor
) -> tuple[Tensor, Tensor]:
    """Σ d and Σ d² over the columns ``begin ≤ j < end`` of ``d = (s − ref) / α``, in float64
    (``ref`` and ``a`` float64); each ``(M, 1)``."""
    col = torch.arange(s.shape[-1], device=s.device)
    inside = (col >= begin) & (col < end)
    d = torch.where(inside, (s.to(torch.float64) - ref) / a, 0.0)
    return d.sum(-1, keepdim=True), (d * d).sum(-1, keepdim=True)


def huber_backward_grad(x: Tensor, y: Tensor, a: Tensor, scale: Tensor) -> Tensor:
    """``scale · 1[|y − x_i| ≤ α]``, shape ``(M, n)``."""
    return _positive((y - x).abs_() - a).neg_().add_(1).mul_(scale)


def window_grad(x: Tensor, lo: Tensor, hi: Tensor, scale: Tensor) -> Tensor:
    """``scale · 1[lo ≤ x_i ≤ hi]``, shape ``(M, n)``."""
    return _window(x, lo, hi).mul_(scale)


_EAGER: dict[str, Callable[..., object]] = {
    f.__name__: f
    for f in (
        row_stats,
        shortest_window,
        pseudo_huber_sums,
        pseudo_huber_first_sums,
        huber_sums,
        huber_first_sums,
        welsch_sums,
        pseudo_huber_backward_sums,
        pseudo_huber_backward_grad,
        welsch_backward_sums,
        welsch_backward_grad,
        huber_backward_sums,
        huber_backward_grad,
        window_sums,
        window_grad,
        truncated_prefix_sums,
        truncated_window_costs,
        truncated_histogram,
        histogram_counts,
        truncated_objective,
        truncated_range_sums,
    )
}


def register(*kernels: Callable[..., object], blocks: bool = True) -> None:
    """Make kernels defined in another module (vector pooling's) available to :func:`kernel`
    under their function names, with the same compilation policy; ``blocks=False``: the
    eager kernel runs on the whole input rather than on blocks of rows."""
    for fn in kernels:
        known = _EAGER.setdefault(fn.__name__, fn)
        if known is not fn:
            raise RuntimeError(f"two robust pooling kernels are named {fn.__name__!r}")
        if not blocks:
            _UNBLOCKED.add(fn.__name__)


_UNBLOCKED: set[str] = set()


_EAGER_BLOCK = 1 << 16  # elements per block of rows for the eager kernels


def _in_blocks(eager: Callable[..., object]) -> Callable[..., object]:
    """Run an eager kernel on blocks of rows, writing each block into the whole outputs.

    Eager PyTorch allocates a temporary as large as its input for every op; on blocks of
    about 2**16 elements those stay in cache and the allocator reuses them, which is several
    times faster on CPU than one op over a large input. The first argument's first dimension
    is the number of rows ``M``; arguments with that first dimension are split, others (0-d
    tensors, ints) are passed whole. The loop is over blocks of many rows, not over rows.
    """

    def run(*args: object) -> object:
        first: Tensor = args[0]  # type: ignore[assignment]  # always the per-row input
        rows = first.shape[0]
        block = max(1, _EAGER_BLOCK // max(1, first[0].numel())) if rows else 1
        if rows <= block:
            return eager(*args)
        outs: list[Tensor] = []
        single = False
        for start in range(0, rows, block):
            sliced = [
                a[start : start + block]
                if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == rows
                else a
                for a in args
            ]
            part = eager(*sliced)
            if not outs:
                single = not isinstance(part, tuple)
            parts = (part,) if single else part
            if not outs:  # the whole outputs, written block by block (no concatenation)
                outs = [p.new_empty((rows, *p.shape[1:])) for p in parts]  # type: ignore[union-attr]
            for out, p in zip(outs, parts):  # type: ignore[arg-type]
                out[start : start + block].copy_(p)
        return outs[0] if single else tuple(outs)

    return run


# Kernels whose third argument is α and whose last one is the ``inv`` flag: :func:`kernel`
# passes them 1 / α (and ``inv=True``) wherever 1 / α is a normal float, so that
# (u − x) · (1 / α) is within one unit in the last place of (u − x) / α.
_RECIPROCAL = frozenset(
    {
        "pseudo_huber_sums",
        "pseudo_huber_first_sums",
        "welsch_sums",
        "pseudo_huber_backward_sums",
        "pseudo_huber_backward_grad",
        "welsch_backward_sums",
        "welsch_backward_grad",
    }
)


def _with_reciprocal(run: Callable[..., object]) -> Callable[..., object]:
    def call(*args: Tensor) -> object:
        a = args[2]
        info = torch.finfo(a.dtype)
        if bool(((a >= 1 / info.max) & (a <= 1 / info.tiny)).all()):
            return run(*args[:2], 1 / a, *args[3:], True)
        return run(*args, False)

    return call


def kernel(name: str, x: Tensor) -> Callable[..., object]:
    """The kernel ``name`` for input ``x`` (M, ...): compiled (with an eager fallback) or
    eager (on blocks of rows, on CPU). Called with α; those in ``_RECIPROCAL`` receive
    ``1 / α`` where that is exact enough."""
    run = _kernel(name, x)
    return _with_reciprocal(run) if name in _RECIPROCAL else run


def _kernel(name: str, x: Tensor) -> Callable[..., object]:
    """:func:`kernel` without the reciprocal of α."""
    eager = _EAGER[name]
    blocked = eager if name in _UNBLOCKED else _in_blocks(eager)
    if not _want_compiled(x):
        return blocked if x.device.type == "cpu" else eager
    compiled = _compiled.get(name)
    if compiled is None:
        # dynamic=None: the first shape is specialised; a second one (a last block of rows,
        # rows set aside after converging) compiles one shape-generic version.
        compiled = torch.compile(eager, fullgraph=True, dynamic=None)
        _compiled[name] = compiled

    def run(*args: Tensor) -> object:
        if _state["broken"]:
            return blocked(*args)
        try:
            return compiled(*args)
        except Exception as err:  # compilation failures come in many types; see below
            # torch.compile raises backend-specific errors (missing compiler, Triton, ...).
            # The eager kernel computes the same formula, so fall back to it for good.
            _state["broken"] = True
            warnings.warn(
                f"declnet: compiling the robust pooling kernel {name!r} failed "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "using eager PyTorch from now on (same results, slower). "
                "Call declnet.layers.set_compile_mode('never') to silence this.",
                DeclarativeWarning,
                stacklevel=2,
            )
            return blocked(*args)

    return run
