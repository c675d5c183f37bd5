"""The implicit VJP and JVP as ``torch.autograd.Function`` s that compose with ``torch.func``.

The engine needs plain tensors: it makes data-dependent decisions (active sets, fallbacks,
residual checks) and differentiates the node's objective with ``torch.autograd``. Under
``torch.func`` transforms the tensors reaching ``DeclarativeFunction.backward`` (and
``jvp``) are wrapped, one wrapper per transform level. Rather than unwrapping them by
hand, the backward and the forward-mode rule call :class:`ImplicitVJP` and
:class:`ImplicitJVP`, custom functions on which ``torch.func`` applies its own rules
(``torch/_functorch/autograd_function.py``):

- a ``grad``/``jvp`` level is peeled off and the function re-applied one level down; the
  results are wrapped back. Differentiating *those* results again (a second derivative
  through a node inside ``torch.func``) reaches their ``backward``/``jvp``, which raise;
- a ``vmap`` level calls the ``vmap`` staticmethod, which turns the mapped dimension into
  work the engine batches: mapped cotangents or tangents (``jacrev``, ``jacfwd``) become
  extra right-hand sides of one KKT factorisation; mapped inputs (per-sample gradients)
  are folded into the node's batch, samples being independent.

Once every level is peeled off, ``forward`` runs the ordinary engine on plain tensors.
Internally cotangents and tangents carry a leading dimension ``K`` of directions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.stateless import _reparametrize_module

from ._diagnostics import node_name
from ._forward_mode import jvp as _jvp

__all__ = ["ImplicitJVP", "ImplicitVJP", "Spec"]

_HALF = (torch.float16, torch.bfloat16)


@dataclass
class Spec:
    """What the transform-aware functions need besides tensors (static under vmap).

    Attributes:
        node: the declarative node.
        mode: its :class:`~declnet.ImplicitBackward`.
        solution: the :class:`~declnet.Solution` of the forward pass (possibly of the
            batch folded by ``vmap``); used where its ``y`` is the ``y`` seen here.
        low: the half-precision dtype of the inputs, if any (work is done in float32).
        n_xs: the number of node inputs.
        non_tensors: the non-tensor inputs by position.
        need: per input, whether it is differentiated (VJP) or has a tangent (JVP).
        param_names: the node's names of the parameter tensors passed along.
    """

    node: Any
    mode: Any
    solution: Any
    low: torch.dtype | None
    n_xs: int
    non_tensors: dict[int, Any]
    need: list[bool]
    param_names: list[str] = field(default_factory=list)
    n_params: int = 0

    @property
    def n_tensors(self) -> int:
        """The number of tensor inputs."""
        return self.n_xs - len(self.non_tensors)

    @property
    def name(self) -> str:
        return node_name(self.node)

    def inputs(self, tensors: tuple[Tensor, ...]) -> list[Any]:
        """The node's inputs with the non-tensor ones put back in place."""
        it = iter(tensors)
        return [self.non_tensors[i] if i in self.non_tensors else next(it)
                for i in range(self.n_xs)]

    def tensor_need(self) -> list[bool]:
        return [n for i, n in enumerate(self.need) if i not in self.non_tensors]

    def solution_for(self, y: Tensor) -> Any:
        """The forward pass's solution if its ``y`` is this one (same samples, same order),
        else None (the engine then recovers multipliers and the active set itself)."""
        sol = self.solution
        if sol is None or not isinstance(getattr(sol, "y", None), Tensor):
            return None
        if sol.y.shape != y.shape or sol.y.device != y.device:
            return None
        return sol if torch.equal(sol.y.to(y.dtype), y) else None


@contextlib.contextmanager
def _parameters_as(spec: Spec, params: tuple[Tensor, ...]) -> Any:
    """Evaluate the node with its parameters replaced by plain leaves requiring grad
    (the tensors seen here are unwrapped, the node's attributes may not be)."""
    leaves = [p.detach().requires_grad_(True) for p in params]
    if not leaves:
        yield leaves
        return
    with _reparametrize_module(spec.node, dict(zip(spec.param_names, leaves))):
        yield leaves


def _work_precision(spec: Spec, tensors: list[Any]) -> list[Any]:
    if spec.low is None:
        return tensors
    return [t.float() if isinstance(t, Tensor) and t.dtype in _HALF else t for t in tensors]


def _higher_order_error(spec: Spec, what: str) -> RuntimeError:
    return RuntimeError(
        f"{spec.name}: {what} through a declarative node's implicit derivative is not "
        "supported under torch.func (a second derivative by nested transforms, e.g. "
        "grad(grad(f)), jacfwd(jacrev(f)) or hessian(f)). First derivatives work with every "
        "torch.func transform; for second derivatives use torch.autograd.grad with "
        "create_graph=True outside torch.func (double backward is implicit there)."
    )


# ---------------------------------------------------------------------------------------
# vmap: folding a mapped dimension into directions or into the batch
# ---------------------------------------------------------------------------------------


class _Fold:
    """How one vmap level is mapped onto the engine's batch and its ``K`` directions.

    Tensors have roles: ``"sample"`` (batched along the node's first dimension),
    ``"shared"`` (0-d inputs and parameters, one per batch), ``"dir_sample"`` /
    ``"dir_shared"`` (directions ``(K, ...)`` of sample / shared tensors). When only
    directions are mapped, the ``V`` mapped copies become ``V·K`` directions. When samples
    are mapped, they are folded into the batch (``V·B`` samples); directions of one copy
    must then act on that copy only wherever a shared tensor is involved, so they become
    ``V·K`` block-diagonal directions (results are read on the diagonal). That case, e.g.
    per-sample gradients of a node's own parameters, costs ``V`` times the right-hand
    sides and ``V²·B·m`` memory; mapped inputs alone cost nothing extra.
    """

    def __init__(self, spec: Spec, size: int, tensors: tuple[Any, ...],
                 dims: tuple[Any, ...], roles: list[str], shared_results: bool) -> None:
        self.V = size
        self.spec = spec
        for t, d, r in zip(tensors, dims, roles):
            if d is not None and r == "shared":
                what = "parameters" if t.dim() > 1 else "parameters or 0-d inputs"
                raise ValueError(
                    f"{spec.name}: vmap over a node's {what} is not supported (a mapped "
                    f"tensor, dimension {d} of shape {tuple(t.shape)}, that the node shares "
                    "across its batch). Map over the node's batched inputs instead; for "
                    "per-sample "
                    "gradients of parameters use torch.func.vmap(torch.func.grad(...)) "
                    "with the parameters unmapped (in_dims=None)."
                )
        self.samples = any(d is not None for d, r in zip(dims, roles) if r == "sample")
        self.split = self.samples and (shared_results or any(
            t is not None and r == "dir_shared" for t, r in zip(tensors, roles)))
        # B: samples per mapped copy; K: directions per mapped copy.
        self.B = next((self._front(t, d).shape[1] for t, d, r in zip(tensors, dims, roles)
                       if r == "sample"), 0)
        self.K = next((self._front(t, d).shape[1] for t, d, r in zip(tensors, dims, roles)
                       if t is not None and r.startswith("dir")), 0)

    def _front(self, t: Tensor, d: int | None) -> Tensor:
        """``t`` with the mapped dimension first (expanded where it is not mapped)."""
        if d is not None:
            return t.movedim(d, 0)
        return t.unsqueeze(0).expand(self.V, *t.shape)

    def fold(self, tensors: tuple[Any, ...], dims: tuple[Any, ...],
             roles: list[str]) -> list[Any]:
        V, K, B = self.V, self.K, self.B
        out: list[Any] = []
        for t, d, r in zip(tensors, dims, roles):
            if t is None or not isinstance(t, Tensor) or r == "shared":
                out.append(t)
                continue
            if r == "sample":
                if not self.samples:
                    out.append(t)
                    continue
                t = self._front(t, d)
                out.append(t.reshape(V * B, *t.shape[2:]))
                continue
            t = self._front(t, d)  # (V, K, ...)
            if r == "dir_shared" or not self.samples:
                out.append(t.reshape(V * K, *t.shape[2:]))
            elif self.split:  # (V, K, B, ...) -> (V·K, V·B, ...) block-diagonal
                tail = t.shape[3:]
                eye = torch.eye(V, dtype=t.dtype, device=t.device)
                blocks = t.unsqueeze(2) * eye.view(V, 1, V, 1, *([1] * len(tail)))
                out.append(blocks.reshape(V * K, V * B, *tail))
            else:  # (V, K, B, ...) -> (K, V·B, ...)
                out.append(t.transpose(0, 1).reshape(K, V * B, *t.shape[3:]))
        return out

    def unfold(self, result: Tensor, role: str) -> Tensor:
        """A result of the folded call back to ``(V, K, ...)`` (mapped dimension first)."""
        V, K, B = self.V, self.K, self.B
        if role == "shared" or not self.samples:
            return result.reshape(V, K, *result.shape[1:])
        tail = result.shape[2:]
        if self.split:
            blocks = result.reshape(V, K, V, B, *tail)
            return blocks.diagonal(0, 0, 2).movedim(-1, 0)
        return result.reshape(K, V, B, *tail).transpose(0, 1)


def _roles(x_tensors: tuple[Tensor, ...], x_dims: tuple[Any, ...], n_params: int) -> list[str]:
    """``"sample"`` for batched inputs, ``"shared"`` for 0-d ones (by their dimension
    under the mapped one) and for parameters."""
    return ["shared" if x.dim() - (d is not None) == 0 else "sample"
            for x, d in zip(x_tensors, x_dims)] + ["shared"] * n_params


def _no_autocast(device: torch.device) -> Any:
    if device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


# ---------------------------------------------------------------------------------------
# Reverse mode
# ---------------------------------------------------------------------------------------


class _FirstOrder(torch.autograd.Function):
    """A derivative computed by implicit differentiation, itself not differentiable under
    ``torch.func``: differentiating it again raises a clear error (never a silent zero).
    ``apply``'s first argument is the :class:`Spec`; ``_result`` names the derivative."""

    _result = "the derivative"

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.spec = inputs[0]

    @classmethod
    def backward(cls, ctx: Any, *grads: Any) -> Any:
        raise _higher_order_error(ctx.spec, f"differentiating {cls._result}")

    @classmethod
    def jvp(cls, ctx: Any, *tangents: Any) -> Any:
        raise _higher_order_error(ctx.spec, f"forward-mode differentiation of {cls._result}")


class ImplicitVJP(_FirstOrder):
    """``grad_y · Dy`` for ``K`` cotangents: ``apply(spec, grad_y, y, *x_tensors, *params)``
    with ``grad_y`` ``(K, *y.shape)`` and the parameters to differentiate; returns
    ``(K, *t.shape)`` per differentiated input tensor, then per parameter (zeros where the
    node does not depend on it)."""

    _result = "the gradient"

    @staticmethod
    def forward(spec: Spec, grad_y: Tensor, y: Tensor,  # type: ignore[override]
                *tensors: Tensor) -> tuple[Tensor, ...]:
        x_tensors, params = tensors[:spec.n_tensors], tensors[spec.n_tensors:]
        sol = spec.solution_for(y)
        xs = _work_precision(spec, spec.inputs(x_tensors))
        work_y = sol.y if sol is not None else _work_precision(spec, [y])[0]
        gy = _work_precision(spec, [grad_y])[0]
        K = gy.shape[0]
        with _parameters_as(spec, params) as leaves, _no_autocast(y.device):
            # One cotangent: the plain VJP (no batched double backward needed).
            x_grads, p_grads = spec.mode.vjp(spec.node, xs, work_y.detach(),
                                             gy[0] if K == 1 else gy, solution=sol,
                                             params=leaves, need_grad=spec.need)
        if K == 1:
            x_grads = [None if g is None else g.unsqueeze(0) for g in x_grads]
            p_grads = [None if g is None else g.unsqueeze(0) for g in p_grads]
        wanted = [(x, g) for x, g, n in zip(xs, x_grads, spec.need) if n]
        wanted += list(zip(params, p_grads))
        originals = [x for x, n in zip(x_tensors, spec.tensor_need()) if n] + list(params)
        return tuple(
            (torch.zeros(K, *t.shape, dtype=t.dtype, device=t.device) if g is None
             else g.detach().to(o.dtype))
            for (t, g), o in zip(wanted, originals))

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], spec: Spec, grad_y: Tensor, y: Tensor,
             *tensors: Tensor) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        n = spec.n_tensors
        dims = tuple(in_dims[1:])
        base = _roles(tensors[:n], dims[2:2 + n], len(tensors) - n)
        roles = ["dir_sample", "sample", *base]
        result_roles = [r for r, need in zip(base[:n], spec.tensor_need()) if need]
        result_roles += base[n:]
        args = (grad_y, y, *tensors)
        fold = _Fold(spec, info.batch_size, args, dims, roles,
                     shared_results="shared" in result_roles)
        outs = ImplicitVJP.apply(spec, *fold.fold(args, dims, roles))
        return (tuple(fold.unfold(o, r) for o, r in zip(outs, result_roles)),
                (0,) * len(outs))


# ---------------------------------------------------------------------------------------
# Forward mode
# ---------------------------------------------------------------------------------------


class ImplicitJVP(_FirstOrder):
    """``Dy · ẋ`` for ``K`` directions: ``apply(spec, y, *x_tensors, *params, *tangents)``
    with the parameters that have tangents and one ``(K, *t.shape)`` tangent per input
    tensor with ``spec.need``, then per parameter; returns ``ẏ`` ``(K, *y.shape)``."""

    _result = "the forward-mode derivative"

    @staticmethod
    def _split(spec: Spec, tensors: tuple[Any, ...]) -> tuple[Any, Any, Any, Any]:
        n, n_p = spec.n_tensors, spec.n_params
        x_tensors, params = tensors[:n], tensors[n:n + n_p]
        tans = iter(tensors[n + n_p:])
        x_tans = [next(tans) if need else None for need in spec.tensor_need()]
        return x_tensors, params, x_tans, list(tans)

    @staticmethod
    def forward(spec: Spec, y: Tensor, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        x_tensors, params, x_tans, p_tans = ImplicitJVP._split(spec, tensors)
        sol = spec.solution_for(y)
        xs = _work_precision(spec, spec.inputs(x_tensors))
        it = iter(_work_precision(spec, x_tans))
        tangents = [None if i in spec.non_tensors else next(it) for i in range(spec.n_xs)]
        work_y = sol.y if sol is not None else _work_precision(spec, [y])[0]
        with _parameters_as(spec, params) as leaves, _no_autocast(y.device):
            dy = _jvp(spec.node, xs, work_y.detach(), tangents, options=spec.mode,
                      solution=sol, params=leaves,
                      param_tangents=_work_precision(spec, p_tans))
        return dy.to(y.dtype)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], spec: Spec, y: Tensor,
             *tensors: Tensor) -> tuple[Tensor, int]:
        n, n_p = spec.n_tensors, spec.n_params
        dims = tuple(in_dims[1:])
        base = _roles(tensors[:n], dims[1:1 + n], n_p)
        x_dirs = ["dir_" + r for r, need in zip(base[:n], spec.tensor_need()) if need]
        roles = ["sample", *base, *x_dirs, *(["dir_shared"] * n_p)]
        args = (y, *tensors)
        fold = _Fold(spec, info.batch_size, args, dims, roles, shared_results=False)
        dy = ImplicitJVP.apply(spec, *fold.fold(args, dims, roles))
        return fold.unfold(dy, "sample"), 0
