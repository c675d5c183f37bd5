"""Forward and backward time of the standard declarative layers against the alternatives.

For each layer, prints the median time (over interleaved samples, so that all methods
share the machine's noise) of

* ours: the layer (its own solver and closed-form backward);
* plain: the best plain-PyTorch alternative, differentiated by autograd:
    least squares     torch.linalg.lstsq
    optimal transport log-domain Sinkhorn unrolled for as many iterations as ours took
    eigenvectors      torch.linalg.eigh
    total variation   projected gradient on the dual, 300 iterations (inexact)
    sparsemax/entmax  the sort-based threshold written in autograd-able operations
    tridiagonal       torch.linalg.solve on the dense matrix (ours: the default method,
                      and the Thomas algorithm for comparison)
* formula (transport only): the structured closed-form backward written out in plain
  PyTorch on the same plan, i.e. the floor for our backward;
* engine: the same problem as a generic declnet node (implicit backward by the engine).

"bwd" is the time of ``torch.autograd.grad`` alone on a retained graph; ratios are ours
over the alternative (lower is better). Run with a fixed thread count, for example

    OMP_NUM_THREADS=1 python benchmarks/layers.py
    OMP_NUM_THREADS=1 python benchmarks/layers.py --engine-large   # + engine on 100x100 OT
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import declnet
from declnet.layers import (
    eigenvectors,
    entmax,
    least_squares,
    optimal_transport,
    sparsemax,
    total_variation_1d,
    tridiagonal_solve,
)

DOUBLE = torch.float64
Fn = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def _loops_for(fn: Callable[[], object], target_s: float) -> int:
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(target_s / once))


def interleaved(fns: list[Callable[[], object]], repeats: int, target_s: float) -> list[float]:
    """Median seconds per call of each function, timed round-robin."""
    loops = [_loops_for(fn, target_s) for fn in fns]
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, k, out in zip(fns, loops, samples):
            start = time.perf_counter()
            for _ in range(k):
                fn()
            out.append((time.perf_counter() - start) / k)
    return [statistics.median(s) for s in samples]


def forward_timer(fn: Fn, inputs: list[torch.Tensor]) -> Callable[[], None]:
    detached = [t.detach() for t in inputs]

    def run() -> None:
        with torch.no_grad():
            fn(*detached)

    return run


def backward_timer(fn: Fn, inputs: list[torch.Tensor], v: torch.Tensor) -> Callable[[], None]:
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves)

    def run() -> None:
        torch.autograd.grad(y, leaves, v, retain_graph=True)

    return run


# --------------------------------------------------------------------------------------
# Alternatives and generic nodes
# --------------------------------------------------------------------------------------


def lstsq_plain(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(a, b.unsqueeze(-1)).solution.squeeze(-1)


class LeastSquaresNode(declnet.DeclarativeNode):
    def objective(self, a, b, *, y):
        return ((a @ y.unsqueeze(-1)).squeeze(-1) - b).pow(2).sum(-1)

    def solve(self, a, b):
        return least_squares(a, b)


def sinkhorn_unrolled(iters: int, gamma: float) -> Fn:
    def run(cost: torch.Tensor) -> torch.Tensor:
        m, n = cost.shape[-2:]
        log_k = -gamma * cost
        a = torch.zeros(cost.shape[:-1], dtype=cost.dtype)
        b = torch.zeros((*cost.shape[:-2], n), dtype=cost.dtype)
        for _ in range(iters):
            a = -torch.logsumexp(log_k + b.unsqueeze(-2), -1) - torch.log(torch.tensor(m * 1.0))
            b = -torch.logsumexp(log_k + a.unsqueeze(-1), -2) - torch.log(torch.tensor(n * 1.0))
        return torch.exp(log_k + a.unsqueeze(-1) + b.unsqueeze(-2))

    return run


def transport_formula(p: torch.Tensor, v: torch.Tensor, gamma: float) -> torch.Tensor:
    """dL/dM by the Schur-complement formula, written out in plain PyTorch."""
    pv = p * v
    a, bb = pv.sum(-1), pv.sum(-2)
    r, c = p.sum(-1), p.sum(-2)
    pr = p / r.unsqueeze(-1)
    s = torch.diag_embed(c) - p.mT @ pr
    rhs = bb - (pr.mT @ a.unsqueeze(-1)).squeeze(-1)
    w = torch.linalg.solve(s[..., :-1, :-1], rhs[..., :-1])
    w = torch.cat([w, torch.zeros_like(w[..., :1])], -1)
    u = (a - (p @ w.unsqueeze(-1)).squeeze(-1)) / r
    return -gamma * (pv - p * (u.unsqueeze(-1) + w.unsqueeze(-2)))


class TransportNode(declnet.EqualityConstrainedNode):
    def __init__(self, m: int, n: int, gamma: float) -> None:
        super().__init__()
        self.m, self.n, self.gamma = m, n, gamma

    def objective(self, cost, *, y):
        return (y * cost).sum(-1) + (y * (y.log() - 1.0)).sum(-1) / self.gamma

    def equality_constraints(self, cost, *, y):
        p = y.reshape(-1, self.m, self.n)
        return torch.cat([p.sum(-1) - 1.0 / self.m, (p.sum(-2) - 1.0 / self.n)[:, :-1]], -1)

    def solve(self, cost):
        p = optimal_transport(cost.reshape(-1, self.m, self.n), gamma=self.gamma)
        return p.reshape(-1, self.m * self.n)


def eigh_plain(k: int) -> Fn:
    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigh(x)[1].flip(-1)[..., :k]

    return run


class TopEigenvectorNode(declnet.EqualityConstrainedNode):
    def objective(self, x, *, y):
        return -(y * (x @ y.unsqueeze(-1)).squeeze(-1)).sum(-1)

    def equality_constraints(self, x, *, y):
        return (y * y).sum(-1, keepdim=True) - 1.0

    def solve(self, x):
        return eigenvectors(x, k=1)[..., 0]


def tv_dual_unrolled(lam: float, iters: int = 300) -> Fn:
    def run(x: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(x[..., 1:])
        for _ in range(iters):  # step 1/4 (‖D Dᵀ‖ <= 4)
            y = x - torch.nn.functional.pad(z, (1, 0)) + torch.nn.functional.pad(z, (0, 1))
            z = torch.clamp(z + 0.25 * (y[..., 1:] - y[..., :-1]), -lam, lam)
        return x - torch.nn.functional.pad(z, (1, 0)) + torch.nn.functional.pad(z, (0, 1))

    return run


def sparsemax_plain(z: torch.Tensor) -> torch.Tensor:
    zs, _ = torch.sort(z, dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    cs = zs.cumsum(-1)
    support = (1 + k * zs > cs).sum(-1, keepdim=True)
    tau = (cs.gather(-1, support - 1) - 1) / support
    return torch.clamp(z - tau, min=0)


def entmax15_plain(z: torch.Tensor) -> torch.Tensor:
    z = z / 2
    zs, _ = torch.sort(z, dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    mean = zs.cumsum(-1) / k
    mean_sq = (zs * zs).cumsum(-1) / k
    tau = mean - torch.sqrt(torch.clamp((1 - k * (mean_sq - mean**2)) / k, min=0))
    support = (tau <= zs).sum(-1, keepdim=True)
    return torch.clamp(z - tau.gather(-1, support - 1), min=0) ** 2


class SparsemaxNode(declnet.InequalityConstrainedNode):
    def objective(self, z, *, y):
        return 0.5 * (y - z).pow(2).sum(-1)

    def inequality_constraints(self, z, *, y):
        return -y

    def equality_constraints(self, z, *, y):
        return y.sum(-1, keepdim=True) - 1.0

    def solve(self, z):
        return sparsemax(z)


def tridiagonal_dense(lower, diag, upper, rhs):
    t = torch.diag_embed(diag) + torch.diag_embed(upper, 1) + torch.diag_embed(lower, -1)
    return torch.linalg.solve(t, rhs)


class TridiagonalNode(declnet.DeclarativeNode):
    def objective(self, lower, diag, upper, rhs, *, y):
        t = torch.diag_embed(diag) + torch.diag_embed(upper, 1) + torch.diag_embed(lower, -1)
        return 0.5 * ((t @ y.unsqueeze(-1)).squeeze(-1) - rhs).pow(2).sum(-1)

    def solve(self, lower, diag, upper, rhs):
        return tridiagonal_solve(lower, diag, upper, rhs)


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------


def _sinkhorn_iterations(cost: torch.Tensor, gamma: float) -> int:
    """Iterations our forward takes (multiples of its test interval)."""
    from declnet.layers.optimal_transport import _sinkhorn

    m, n = cost.shape[-2:]
    r = torch.full((*cost.shape[:-2], m), 1.0 / m, dtype=cost.dtype)
    c = torch.full((*cost.shape[:-2], n), 1.0 / n, dtype=cost.dtype)
    return _sinkhorn(-gamma * cost, r.log(), c.log(), r, 1e-11, 10_000)[2]


def cases(engine_large: bool) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=DOUBLE)

    out: list[dict[str, Any]] = []
    a, b = rand(64, 100, 10), rand(64, 100)
    out.append(dict(name="least_squares", size="64x100x10", inputs=[a, b], v=rand(64, 10),
                    ours=least_squares, plain=lstsq_plain, engine=LeastSquaresNode()))

    gamma = 1.0
    cost = torch.rand(1, 100, 100, generator=gen, dtype=DOUBLE)
    iters = _sinkhorn_iterations(cost, gamma)
    v = rand(1, 100, 100)
    with torch.no_grad():
        p = optimal_transport(cost, gamma=gamma)
    out.append(dict(
        name="optimal_transport", size=f"1x100x100 g=1 ({iters} it)", inputs=[cost], v=v,
        ours=lambda t: optimal_transport(t, gamma=gamma), plain=sinkhorn_unrolled(iters, gamma),
        formula=lambda: transport_formula(p, v, gamma),
        engine=TransportNode(100, 100, gamma).__call__ if engine_large else None,
        engine_flat=True,
    ))
    g10 = 10.0
    it10 = _sinkhorn_iterations(cost, g10)
    with torch.no_grad():
        p10 = optimal_transport(cost, gamma=g10)
    out.append(dict(
        name="optimal_transport", size=f"1x100x100 g=10 ({it10} it)", inputs=[cost], v=v,
        ours=lambda t: optimal_transport(t, gamma=g10), plain=sinkhorn_unrolled(it10, g10),
        formula=lambda: transport_formula(p10, v, g10), engine=None,
    ))
    small = torch.rand(4, 10, 10, generator=gen, dtype=DOUBLE)
    it_small = _sinkhorn_iterations(small, gamma)
    vs = rand(4, 10, 10)
    with torch.no_grad():
        ps = optimal_transport(small, gamma=gamma)
    out.append(dict(
        name="optimal_transport", size=f"4x10x10 g=1 ({it_small} it)", inputs=[small], v=vs,
        ours=lambda t: optimal_transport(t, gamma=gamma), plain=sinkhorn_unrolled(it_small, gamma),
        formula=lambda: transport_formula(ps, vs, gamma),
        engine=TransportNode(10, 10, gamma), engine_flat=True,
    ))

    s = rand(64, 32, 32)
    x = 0.5 * (s + s.mT)
    out.append(dict(name="eigenvectors k=4", size="64x32x32", inputs=[x], v=rand(64, 32, 4),
                    ours=lambda t: eigenvectors(t, 4), plain=eigh_plain(4), engine=None))
    out.append(dict(name="eigenvectors k=1", size="64x32x32", inputs=[x], v=rand(64, 32, 1),
                    ours=lambda t: eigenvectors(t, 1), plain=eigh_plain(1),
                    engine=lambda t: TopEigenvectorNode()(t).unsqueeze(-1)))

    sig = torch.cumsum(rand(32, 200), -1) * 0.1 + rand(32, 200)
    out.append(dict(name="total_variation_1d", size="32x200 l=1", inputs=[sig], v=rand(32, 200),
                    ours=lambda t: total_variation_1d(t, 1.0), plain=tv_dual_unrolled(1.0),
                    engine=None))

    z = 2.0 * rand(256, 512)
    vz = rand(256, 512)
    out.append(dict(name="sparsemax", size="256x512", inputs=[z], v=vz, ours=sparsemax,
                    plain=sparsemax_plain, engine=None))
    zs = 2.0 * rand(16, 32)
    out.append(dict(name="sparsemax", size="16x32", inputs=[zs], v=rand(16, 32), ours=sparsemax,
                    plain=sparsemax_plain, engine=SparsemaxNode()))
    out.append(dict(name="entmax a=1.5", size="256x512", inputs=[z], v=vz,
                    ours=lambda t: entmax(t, 1.5), plain=entmax15_plain, engine=None))

    n = 256
    tri = [rand(16, n - 1), 4.0 + torch.rand(16, n, generator=gen, dtype=DOUBLE),
           rand(16, n - 1), rand(16, n)]
    out.append(dict(name="tridiagonal_solve", size=f"16x{n}", inputs=tri, v=rand(16, n),
                    ours=tridiagonal_solve, plain=tridiagonal_dense, engine=None))
    out.append(dict(name="tridiagonal thomas", size=f"16x{n}", inputs=tri, v=rand(16, n),
                    ours=lambda *t: tridiagonal_solve(*t, method="thomas"),
                    plain=tridiagonal_dense, engine=None))
    tri_s = [t[:8, :31] if i in (0, 2) else t[:8, :32] for i, t in enumerate(tri)]
    out.append(dict(name="tridiagonal_solve", size="8x32", inputs=tri_s, v=rand(8, 32),
                    ours=tridiagonal_solve, plain=tridiagonal_dense, engine=TridiagonalNode()))
    return out


def _engine_fn(case: dict[str, Any]) -> tuple[Fn, list[torch.Tensor], torch.Tensor]:
    eng = case["engine"]
    if case.get("engine_flat"):
        cost = case["inputs"][0]
        return eng, [cost.reshape(cost.shape[0], -1)], case["v"].reshape(cost.shape[0], -1)
    return eng, case["inputs"], case["v"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31, help="timed samples per method")
    parser.add_argument("--sample-ms", type=float, default=2.0, help="length of one sample")
    parser.add_argument("--engine-large", action="store_true",
                        help="also time the generic engine on 100x100 transport (slow)")
    args = parser.parse_args()
    target = args.sample_ms / 1e3
    # The generic engine may warn (LU residual checks) on these problems; it recovers.
    warnings.simplefilter("ignore", declnet.DeclarativeWarning)
    print(f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}, float64, "
          f"median of {args.repeats} interleaved samples")
    head = (f"{'layer':<18} {'size':<26}| {'fwd ours':>9} {'fwd plain':>9} {'ratio':>6} | "
            f"{'bwd ours':>9} {'bwd plain':>9} {'ratio':>6} | {'bwd other':>10} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    for case in cases(args.engine_large):
        ins, v = case["inputs"], case["v"]
        fwd = interleaved([forward_timer(case["ours"], ins), forward_timer(case["plain"], ins)],
                          args.repeats, target)
        bwd_fns = [backward_timer(case["ours"], ins, v), backward_timer(case["plain"], ins, v)]
        labels = []
        if "formula" in case:
            bwd_fns.append(case["formula"])
            labels.append("formula")
        if case["engine"] is not None:
            fn, e_ins, e_v = _engine_fn(case)
            labels.append("engine")
            if case.get("engine_flat") and ins[0].shape[-1] >= 100:
                bwd = interleaved(bwd_fns, args.repeats, target)
                bwd.append(interleaved([backward_timer(fn, e_ins, e_v)], 1, target)[0])
            else:
                bwd_fns.append(backward_timer(fn, e_ins, e_v))
                bwd = interleaved(bwd_fns, args.repeats, target)
        else:
            bwd = interleaved(bwd_fns, args.repeats, target)
        fo, fp = fwd
        bo, bp = bwd[:2]
        line = (f"{case['name']:<18} {case['size']:<26}| {fo * 1e3:7.2f}ms {fp * 1e3:7.2f}ms "
                f"{fo / fp:6.2f} | {bo * 1e3:7.2f}ms {bp * 1e3:7.2f}ms {bo / bp:6.2f} |")
        for label, t in zip(labels, bwd[2:]):
            line += f" {label} {t * 1e3:8.2f}ms {bo / t:6.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
