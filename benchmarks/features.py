"""Cost of PyTorch features through declarative layers: double backward, forward mode and
torch.compile.

Table (a): time of a double backward (a gradient penalty: ``g = ∂L/∂x`` with
``create_graph=True``, then ``∂‖g‖²/∂x``) relative to a single backward (``∂L/∂x``), both
including the forward, for ``L = ‖f(x)‖²`` and

- a generic declarative node (``declnet.DeclarativeNode`` with an objective only, solved by
  the default solver and differentiated by the implicit engine),
- ``robust_pool`` (pseudo-Huber, closed-form backward),
- ``project_onto_ball`` (p = 2),
- ``least_squares`` (ridge).

Table (b): forward mode, ``torch.func.jvp`` with one tangent (``Dy · ẋ``), relative to
reverse mode (``v · Dy`` by ``torch.autograd.grad``), both including the forward, for the
same layers.

Table (c): one training step (forward, loss, backward) of the point-cloud PointNet with
robust pseudo-Huber pooling (:class:`declnet.apps.pointcloud.model.PointNet`), eager
against ``torch.compile(fullgraph=True)``; the compile time (first call) is shown apart.

Times are medians of interleaved repeats (the methods of a row alternate, so drifts in
machine load affect them alike). The thread count is printed.

Run: ``python benchmarks/features.py [--repeats 15] [--batch 8] [--points 256]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

import declnet
from declnet.apps.pointcloud.model import PointNet
from declnet.layers import PseudoHuber, least_squares, project_onto_ball, robust_pool


class _LogCoshNode(declnet.DeclarativeNode):
    """``y = argmin_u Σ ½(u − x)² + log cosh u`` per sample: an objective and a starting
    point, no solver of its own (a built-in Newton solver runs)."""

    def initial_guess(self, x: Tensor) -> Tensor:
        return x.detach().clone()

    def objective(self, x: Tensor, *, y: Tensor) -> Tensor:
        return (0.5 * (y - x) ** 2 + torch.log(torch.cosh(y))).sum(-1)


def _interleaved(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time (ms) of each function, the functions alternating on every repeat."""
    for fn in fns:  # warm-up
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(1e3 * (time.perf_counter() - start))
    return [statistics.median(t) for t in times]


def _single(f: Callable[..., Tensor], args: tuple[Tensor, ...]) -> Callable[[], object]:
    def run() -> object:
        return torch.autograd.grad(f(*args).square().sum(), args[0])

    return run


def _double(f: Callable[..., Tensor], args: tuple[Tensor, ...]) -> Callable[[], object]:
    def run() -> object:
        (g,) = torch.autograd.grad(f(*args).square().sum(), args[0], create_graph=True)
        return torch.autograd.grad(g.square().sum(), args[0])

    return run


def _cases() -> list[tuple[str, Callable[..., Tensor], tuple[Tensor, ...]]]:
    gen = torch.Generator().manual_seed(0)
    node = _LogCoshNode()
    cases: list[tuple[str, Callable[..., Tensor], tuple[Tensor, ...]]] = [
        (
            "DeclarativeNode (B=64, n=16)",
            lambda x: declnet.declarative(node, x),
            (torch.randn(64, 16, generator=gen),),
        ),
        (
            "robust_pool pseudo-Huber (64x64x256)",
            lambda x: robust_pool(x, PseudoHuber(0.5), dim=-1),
            (torch.randn(64, 64, 256, generator=gen),),
        ),
        (
            "project_onto_ball p=2 (256x512)",
            lambda x: project_onto_ball(x, 2, 1.0),
            (torch.randn(256, 512, generator=gen),),
        ),
        (
            "least_squares (B=64, 100x8)",
            lambda a, b: least_squares(a, b, ridge=0.1),
            (torch.randn(64, 100, 8, generator=gen), torch.randn(64, 100, generator=gen)),
        ),
    ]
    return cases


def double_backward_table(repeats: int) -> None:
    print("(a) double backward vs single backward (forward included), ms")
    print(f"{'layer':40s} {'single':>9s} {'double':>9s} {'ratio':>7s}")
    for name, f, args in _cases():
        args = tuple(a.requires_grad_() for a in args)
        single, double = _interleaved([_single(f, args), _double(f, args)], repeats)
        print(f"{name:40s} {single:9.2f} {double:9.2f} {double / single:7.2f}")


def forward_mode_table(repeats: int) -> None:
    print("(b) forward mode (torch.func.jvp, one tangent) vs reverse mode (forward included), ms")
    print(f"{'layer':40s} {'reverse':>9s} {'forward':>9s} {'ratio':>7s}")
    for name, f, args in _cases():
        gen = torch.Generator().manual_seed(1)
        tangents = tuple(torch.randn(a.shape, generator=gen) for a in args)
        v = torch.randn(f(*args).shape, generator=gen)
        grad_args = tuple(a.detach().requires_grad_() for a in args)

        def reverse(f=f, grad_args=grad_args, v=v) -> object:
            return torch.autograd.grad(f(*grad_args), grad_args, v)

        def forward(f=f, args=args, tangents=tangents) -> object:
            return torch.func.jvp(f, args, tangents)

        rev, fwd = _interleaved([reverse, forward], repeats)
        print(f"{name:40s} {rev:9.2f} {fwd:9.2f} {fwd / rev:7.2f}")


def compile_table(repeats: int, batch: int, points: int) -> None:
    torch.manual_seed(0)
    model = PointNet(10, pool="pseudo_huber", alpha=1.0, width=128)
    x = torch.rand(batch, points, 3)
    labels = torch.randint(0, 10, (batch,))

    def step(net: Callable[[Tensor], Tensor]) -> Callable[[], object]:
        def run() -> object:
            model.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net(x), labels)
            loss.backward()
            return loss

        return run

    compiled = torch.compile(model, fullgraph=True)
    start = time.perf_counter()
    step(compiled)()
    compile_s = time.perf_counter() - start
    eager_ms, compiled_ms = _interleaved([step(model), step(compiled)], repeats)
    print(f"(c) PointNet training step, pseudo-Huber pooling, B={batch}, N={points}, W=128, ms")
    print(f"{'mode':40s} {'step':>9s}")
    print(f"{'eager':40s} {eager_ms:9.2f}")
    print(f"{'torch.compile(fullgraph=True)':40s} {compiled_ms:9.2f}")
    print(f"{'speed-up':40s} {eager_ms / compiled_ms:9.2f}")
    print(f"(first compiled call, compilation included: {compile_s:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--points", type=int, default=256)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}")
    double_backward_table(args.repeats)
    print()
    forward_mode_table(args.repeats)
    print()
    compile_table(args.repeats, args.batch, args.points)


if __name__ == "__main__":
    main()
