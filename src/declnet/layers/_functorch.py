"""Small helpers that let the layers run under ``torch.func`` transforms (vmap, grad).

Every layer's autograd Function has a ``vmap`` staticmethod that folds the vmapped
dimension into the layer's own batch dimension (the layers are natively batched, so a
vmapped call is one batched call). The input checks of the public functions read their
verdict through :func:`plain`, so that they still run, unchanged, when the checked tensor
is a vmapped one (``bool()`` of a vmapped tensor is not allowed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "batch_first",
    "differentiable_backward",
    "forward_from_backward",
    "has_tangent",
    "plain",
    "save_for_both",
    "surely_none",
    "transforms_active",
]


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp, ...) is running."""
    return bool(torch._C._are_functorch_transforms_active())


def has_tangent(*tensors: Any) -> bool:
    """Whether a tensor among ``tensors`` is a dual tensor of ``torch.autograd.forward_ad``
    (it carries a tangent, without requiring grad)."""
    if torch.autograd.forward_ad._current_level < 0:
        return False
    return any(isinstance(t, Tensor) and torch.autograd.forward_ad.unpack_dual(t).tangent
               is not None for t in tensors)


def plain(t: Tensor) -> Tensor:
    """``t`` without its ``torch.func`` wrappers (for a vmapped tensor: all its samples,
    the vmapped dimensions first).

    For validation only: the result is not connected to any transform, so a check such as
    ``bool(plain(bad).any())`` tests every sample of a vmapped call.
    """
    if not transforms_active():
        return t
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        bdim = functorch.maybe_get_bdim(t) if functorch.is_batchedtensor(t) else None
        t = functorch.get_unwrapped(t)
        if bdim is not None and bdim >= 0:
            t = t.movedim(bdim, 0)
    return t


def batch_first(t: Tensor, bdim: int | None, size: int) -> Tensor:
    """``t`` with its vmapped dimension ``bdim`` moved first, or expanded to ``size`` there
    when ``t`` is not vmapped (``bdim`` is None)."""
    if bdim is None:
        return t.expand(size, *t.shape)
    return t.movedim(bdim, 0)


def differentiable_backward() -> bool:
    """Whether a backward must be built from differentiable, traceable torch operations:
    when it is itself differentiated (``create_graph=True``: grad mode is on inside the
    backward), traced by ``torch.compile``, or run under a ``torch.func`` transform."""
    return torch.is_grad_enabled() or torch.compiler.is_compiling() or transforms_active()


def surely_none(mask: Tensor) -> bool:
    """Whether no entry of ``mask`` is set, for skipping a fix-up on a fast path.

    In eager mode this reads the mask (one device sync). While ``torch.compile`` traces it
    is ``False`` without reading it, so the fix-up, which must then leave the result as it
    would be without it, is part of the graph (a data-dependent branch would break it).
    """
    return not torch.compiler.is_compiling() and not bool(mask.any())


# ---------------------------------------------------------------------------------------
# Forward mode from the backward
# ---------------------------------------------------------------------------------------


def save_for_both(ctx: Any, *tensors: Tensor | None) -> None:
    """``ctx.save_for_backward(*tensors)`` and ``ctx.save_for_forward(*tensors)``: what the
    backward reads is also there for the ``jvp`` that :func:`forward_from_backward` adds."""
    ctx.save_for_backward(*tensors)
    ctx.save_for_forward(*tensors)


class _BackwardView:
    """A Function's ``ctx`` as its backward expects it, inside ``jvp``: the tensors saved
    for the forward and the inputs that have tangents as the ones that need gradients."""

    def __init__(self, ctx: Any, needs: tuple[bool, ...]) -> None:
        self._ctx = ctx
        self.saved_tensors = ctx.saved_tensors
        self.needs_input_grad = needs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


class _Traceable:
    """A layer's autograd Function in two versions: with forward mode (``jvp``) in eager
    code and under ``torch.func``, without it when ``torch.compile`` traces the call
    (dynamo cannot trace a Function that defines ``jvp``). ``apply`` picks; every other
    attribute is the eager version's."""

    def __init__(self, traced: type, eager: type) -> None:
        self.traced, self.eager = traced, eager

    def apply(self, *args: Any) -> Any:
        fn = self.traced if torch.compiler.is_compiling() else self.eager
        return fn.apply(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.eager, name)


def _forward_levels() -> int:
    """How many ``torch.func`` forward-mode transforms (jvp, jacfwd) are active."""
    stack = torch._C._functorch.get_interpreter_stack() or []
    jvp = torch._C._functorch.TransformType.Jvp
    return sum(1 for interpreter in stack if interpreter.key() == jvp)


def _first_order_jvp(name: str, jvp: Any) -> Any:
    """``jvp``, refusing forward mode over forward mode: PyTorch does not differentiate a
    Function's ``jvp`` under an outer forward-mode transform (the result would be zero)."""

    def guarded(ctx: Any, *tangents: Any) -> Any:
        if _forward_levels() > 1:
            raise RuntimeError(
                f"{name.lstrip('_')}: forward mode over forward mode (jvp of jvp, jacfwd of "
                "jacfwd) through a declarative layer is not supported. For second "
                "derivatives use torch.func.hessian (jacfwd over jacrev), or double "
                "backward (torch.autograd.grad(..., create_graph=True))."
            )
        return jvp(ctx, *tangents)

    return guarded


def forward_from_backward(cls: type | None = None, *, symmetric: bool = False,
                          outputs: int | None = None, jvp: Any = None) -> Any:
    """Class decorator: give a layer's autograd Function a ``jvp`` (forward mode:
    ``torch.func.jvp`` / ``jacfwd``, ``torch.autograd.forward_ad``) computed from its own
    backward, which every layer writes with differentiable operations.

    The backward is linear in the incoming gradient ``v``: ``backward(v) = Jᵀ v``. So
    ``J ẋ`` is the vector-Jacobian product of that linear map with cotangent ``ẋ``: one
    backward and one differentiation of it (``torch.func.vjp``, so this also works inside
    other transforms), with no Jacobian formed. With ``symmetric=True`` (a Euclidean
    projection, whose Jacobian is symmetric where it exists: ``Π = I − ∇(½ dist²)``),
    a tangent of the first input alone needs one backward only: ``J ẋ = Jᵀ ẋ``.

    The Function's ``setup_context`` must save its tensors with :func:`save_for_both` and
    its outputs must be tensors (a tuple of them for several); ``outputs`` is the number of
    leading differentiable outputs when the others are marked non-differentiable (saved
    factors), which get no tangent. ``jvp``: the Function's own forward mode (a function
    ``jvp(ctx, *tangents)``), used instead of the one derived from the backward.

    Returns an object whose ``apply`` calls the Function with forward mode in eager code
    and under ``torch.func``, and without it when ``torch.compile`` traces it.
    """

    own_jvp = jvp

    def decorate(fn_cls: type) -> _Traceable:
        setup = fn_cls.setup_context

        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
            setup(ctx, inputs, output)
            outs = output if isinstance(output, tuple) else (output,)
            ctx.forward_outputs = tuple((o.shape, o.dtype, o.device) for o in outs)

        def derived_jvp(ctx: Any, *tangents: Tensor | None) -> Any:
            meta = ctx.forward_outputs
            idx = [i for i, t in enumerate(tangents) if t is not None]
            view = _BackwardView(ctx, tuple(t is not None for t in tangents))
            keep = len(meta) if outputs is None else outputs
            differentiable = [k < keep and (dt.is_floating_point or dt.is_complex)
                              for k, (_, dt, _) in enumerate(meta)]
            if symmetric and idx == [0] and keep == 1:
                return fn_cls.backward(view, tangents[0])[0]

            def transpose(*vs: Tensor) -> tuple[Tensor, ...]:
                grads = fn_cls.backward(view, *vs)
                return tuple(torch.zeros_like(tangents[i]) if grads[i] is None else grads[i]
                             for i in idx)

            primals = tuple(torch.zeros(s, dtype=dt, device=dev)
                            for (s, dt, dev), ok in zip(meta, differentiable) if ok)

            def on_floats(*vs: Tensor) -> tuple[Tensor, ...]:
                it = iter(vs)
                return transpose(*(next(it) if ok else None for ok in differentiable))

            _, pullback = torch.func.vjp(on_floats, *primals)
            dys = iter(pullback(tuple(tangents[i] for i in idx)))
            out = tuple(next(dys) if ok else None for ok in differentiable)
            return out if len(meta) > 1 else out[0]

        if "jvp" in vars(fn_cls):
            raise TypeError(f"{fn_cls.__name__} defines jvp; pass it as jvp= instead.")
        eager = type(fn_cls.__name__, (fn_cls,), {
            "__doc__": fn_cls.__doc__,
            "setup_context": staticmethod(setup_context),
            "jvp": staticmethod(_first_order_jvp(fn_cls.__name__, derived_jvp if own_jvp is None
                                                 else own_jvp)),
        })
        return _Traceable(fn_cls, eager)

    return decorate if cls is None else decorate(cls)
