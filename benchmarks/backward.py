"""Backward-pass time and peak memory of the implicit engine against two baselines.

Problems (batch 16, m = n):

- unconstrained: ``y = argmin_u ½ (u − x)ᵀ Q (u − x) + Σ log cosh u``,
- equality constrained: ``y = argmin_u ½ (u − x)ᵀ Q (u − x)`` subject to ``‖u‖² = 1``,

with a dense, well-conditioned symmetric positive definite ``Q``. Methods:

- ``engine (auto)``: the engine as configured by default (dense up to ``m + p = 64``,
  matrix-free CG beyond);
- ``engine dense``: a dense KKT solve (Cholesky of ``H`` and of the Schur complement);
- ``engine CG`` / ``engine MINRES``: matrix-free, Hessian-vector products only;
- ``per-dim``: the straightforward approach of building ``H`` and ``B`` (and ``A``, ``C``)
  with one autograd call per output dimension and solving with them (Prop. 4.4/4.5
  as written, the approach of the paper's reference code);
- ``unrolled``: autograd through 100 iterations of (projected) gradient descent.

Times are medians of repeats of the backward pass alone (the forward solve is excluded);
memory is the peak of tensor allocations during the backward pass above what was
allocated before it (PyTorch profiler on CPU, the allocator's peak on CUDA). Speed-ups
are against the per-dimension baseline measured in the same run.

A second suite (``--suite structured``) times shared problems from ``_structured.py``
against the best alternative measured in the same run, with interleaved repeats:
ridge regression (B = 64, m = 100 and 1000) vs autograd through ``torch.linalg.solve``;
the top eigenvector of a symmetric 64 × 64 matrix vs ``torch.linalg.eigh`` autograd;
entropic transport 100 × 100 at γ = 10 with a declared diagonal Hessian vs the structured
closed form in plain PyTorch and vs unrolled Sinkhorn; a QP (n = 50, 25 inequalities, ``Q``
declared) vs autograd through a dense KKT solve and vs qpth when it is installed (it is
never a dependency). Each engine row is shown with structure declared and without
("auto").

Run: ``python benchmarks/backward.py [--suite structured] [--sizes 10 100 1000]
[--device cuda]``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

import declnet

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BATCH = 16
UNROLL_STEPS = 100


def make_q(m: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(m, m, generator=gen, dtype=torch.float64) / math.sqrt(m)
    Q = torch.eye(m, dtype=torch.float64) + 0.25 * (G @ G.T)
    return Q.to(dtype=dtype, device=device)


class Unconstrained(declnet.DeclarativeNode):
    def __init__(self, Q: torch.Tensor, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("Q", Q)

    def objective(self, x, *, y):
        d = y - x
        return 0.5 * (d * (d @ self.Q)).sum(-1) + torch.log(torch.cosh(y)).sum(-1)

    def solve(self, x):
        y = x.clone()
        for _ in range(30):  # Newton
            g = (y - x) @ self.Q + torch.tanh(y)
            H = self.Q + torch.diag_embed(1 - torch.tanh(y) ** 2)
            y = y - torch.linalg.solve(H, g.unsqueeze(-1)).squeeze(-1)
        return y

    def unrolled(self, x):
        step = 1.0 / (float(torch.linalg.eigvalsh(self.Q).max()) + 1.0)
        y = x
        for _ in range(UNROLL_STEPS):
            y = y - step * ((y - x) @ self.Q + torch.tanh(y))
        return y


class SphereConstrained(declnet.EqualityConstrainedNode):
    def __init__(self, Q: torch.Tensor, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("Q", Q)
        evals, evecs = torch.linalg.eigh(Q)
        self.register_buffer("evals", evals)
        self.register_buffer("evecs", evecs)

    def objective(self, x, *, y):
        d = y - x
        return 0.5 * (d * (d @ self.Q)).sum(-1)

    def equality_constraints(self, x, *, y):
        return (y**2).sum(-1, keepdim=True) - 1.0

    def solve(self, x):
        # Q (u − x) = 2λu  ⇒  u = V diag(Λ / (Λ − 2λ)) Vᵀ x, with 2λ < Λ_min and ‖u‖ = 1
        # (the global minimiser on the sphere); bisection on t = 2λ.
        c = (x @ self.evecs) * self.evals
        lo = torch.full_like(x[:, :1], -1e6)
        hi = torch.full_like(x[:, :1], float(self.evals.min()) - 1e-9)
        for _ in range(200):
            t = 0.5 * (lo + hi)
            norm2 = ((c / (self.evals - t)) ** 2).sum(-1, keepdim=True)
            lo = torch.where(norm2 < 1, t, lo)
            hi = torch.where(norm2 < 1, hi, t)
        return (c / (self.evals - 0.5 * (lo + hi))) @ self.evecs.T

    def unrolled(self, x):
        step = 1.0 / float(torch.linalg.eigvalsh(self.Q).max())
        y = x / x.norm(dim=-1, keepdim=True)
        for _ in range(UNROLL_STEPS):
            y = y - step * ((y - x) @ self.Q)
            y = y / y.norm(dim=-1, keepdim=True)
        return y


def per_dimension_vjp(node, x, y, v, constrained: bool) -> torch.Tensor:
    """Build H, B (and A, C) with one autograd call per output dimension, then solve."""
    x = x.detach().requires_grad_(True)
    y = y.detach().requires_grad_(True)
    m = y.shape[1]
    f = node.objective(x, y=y)
    (fy,) = torch.autograd.grad(f.sum(), y, create_graph=True)
    if constrained:
        h = node.equality_constraints(x, y=y)
        (A,) = torch.autograd.grad(h.sum(), y, create_graph=True)  # p = 1
        (C,) = torch.autograd.grad(h.sum(), x, retain_graph=True, allow_unused=True)
        C = torch.zeros_like(x) if C is None else C
        lam = (A * fy).sum(-1, keepdim=True) / (A * A).sum(-1, keepdim=True)  # eq. 25
        ly = fy - lam.detach() * A
    else:
        ly = fy
    H_rows, B_rows = [], []
    for i in range(m):  # one double-backward per output dimension
        hy, hx = torch.autograd.grad(ly[:, i].sum(), (y, x), retain_graph=True)
        H_rows.append(hy)
        B_rows.append(hx)
    H = torch.stack(H_rows, 1)
    Bm = torch.stack(B_rows, 1)
    if not constrained:
        Dy = -torch.linalg.solve(H, Bm)
    else:  # Prop. 4.5: Dy = H⁻¹Aᵀ(AH⁻¹Aᵀ)⁻¹(AH⁻¹B − C) − H⁻¹B
        A = A.detach().unsqueeze(1)
        C = C.detach().unsqueeze(1)
        HiA = torch.linalg.solve(H, A.transpose(1, 2))
        HiB = torch.linalg.solve(H, Bm)
        S = A @ HiA
        Dy = HiA @ torch.linalg.solve(S, A @ HiB - C) - HiB
    return torch.einsum("bi,bij->bj", v, Dy)


def timed(fn: Callable[[], object], repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn: Callable[[], object], device: str) -> float:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return float(peak)


def run(sizes: list[int], dtypes: list[torch.dtype], device: str, repeats: int) -> None:
    print(f"# backward pass, batch {BATCH}, device {device}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    header = ("| problem | dtype | m=n | method | time (ms) | speed-up vs per-dim | "
              "peak extra memory (MB) |\n|---|---|---|---|---|---|---|")
    print(header)
    for kind in ("unconstrained", "equality"):
        for dtype in dtypes:
            for m in sizes:
                Q = make_q(m, dtype, device)
                cls = Unconstrained if kind == "unconstrained" else SphereConstrained
                gen = torch.Generator().manual_seed(1)
                x = torch.randn(BATCH, m, generator=gen, dtype=torch.float64).to(dtype=dtype,
                                                                                 device=device)
                v = torch.randn(BATCH, m, generator=gen, dtype=torch.float64).to(dtype=dtype,
                                                                                 device=device)
                auto = cls(Q)
                dense = cls(Q, backward=declnet.ImplicitBackward("cholesky"))
                free = cls(Q, backward=declnet.ImplicitBackward("cg"))
                minres = cls(Q, backward=declnet.ImplicitBackward("minres"))
                y = dense.solve(x)

                def engine(node=None, y=y, x=x, v=v):
                    return declnet.implicit_vjp(node, x.requires_grad_(True), y=y, grad_y=v)

                def naive(node=dense, y=y, x=x, v=v, kind=kind):
                    return per_dimension_vjp(node, x, y, v, kind == "equality")

                def unrolled(node=dense, x=x, v=v):
                    xg = x.detach().requires_grad_(True)
                    out = node.unrolled(xg)
                    return torch.autograd.grad(out, xg, v)

                methods = [("engine (auto)", lambda n=auto: engine(n)),
                           ("engine dense", lambda n=dense: engine(n)),
                           ("engine CG", lambda n=free: engine(n)),
                           ("engine MINRES", lambda n=minres: engine(n)),
                           ("per-dim", naive),
                           ("unrolled (backward)", None)]
                results = {}
                for name, fn in methods:
                    if name.startswith("unrolled"):
                        xg = x.detach().requires_grad_(True)
                        out = dense.unrolled(xg)

                        def fn(out=out, xg=xg, v=v):  # backward only, graph kept
                            return torch.autograd.grad(out, xg, v, retain_graph=True)
                    reps = repeats if m < 1000 or name != "per-dim" else max(1, repeats // 2)
                    fn()  # warm-up
                    t = timed(fn, reps, device)
                    mem = peak_memory(fn, device)
                    results[name] = (t, mem)
                base = results["per-dim"][0]
                for name, (t, mem) in results.items():
                    print(f"| {kind} | {str(dtype).replace('torch.', '')} | {m} | {name} | "
                          f"{1e3 * t:.2f} | {base / t:.1f} | {mem / 2**20:.2f} |", flush=True)


def run_structured(device: str, repeats: int, only: list[str] | None) -> None:
    """Shared problems (``_structured.py``) against the best alternative in the same run.

    Repeats are interleaved (one call of every method per round) and the median kept; the
    ratio is the method's time over the fastest non-engine method of its row group.
    """
    import _structured as problems

    print(f"\n# structured backward, float64, device {device}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {repeats} interleaved repeats (medians)")
    print("| problem | B | m | method | time (ms) | vs best alternative | peak extra memory "
          "(MB) |\n|---|---|---|---|---|---|---|")
    for title, (factory, shapes) in problems.PROBLEMS.items():
        if only and not any(o in title for o in only):
            continue
        for B, m in shapes:
            methods = factory(B, m, torch.float64, device)
            for fn in methods.values():
                fn()  # warm-up
            times: dict[str, list[float]] = {name: [] for name in methods}
            slow = {name for name in methods if name == "engine, auto" and m >= 1000}
            for r in range(repeats):
                for name, fn in methods.items():
                    if name in slow and r > 0:
                        continue  # one timed call of a very slow row
                    times[name].append(timed(fn, 1, device))
            med = {name: statistics.median(t) for name, t in times.items()}
            alternatives = [t for name, t in med.items() if not name.startswith("engine")]
            best = min(alternatives) if alternatives else float("nan")
            for name, fn in methods.items():
                mem = peak_memory(fn, device)
                print(f"| {title} | {B} | {m} | {name} | {1e3 * med[name]:.2f} | "
                      f"{med[name] / best:.2f}× | {mem / 2**20:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=["generic", "structured", "all"], default="all")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="structured problems whose title contains "
                        "one of these words")
    args = parser.parse_args()
    dtypes = [getattr(torch, d) for d in args.dtypes]
    if args.suite in ("generic", "all"):
        run(args.sizes, dtypes, args.device, args.repeats)
    if args.suite in ("structured", "all"):
        run_structured(args.device, args.repeats, args.only)


if __name__ == "__main__":
    main()
