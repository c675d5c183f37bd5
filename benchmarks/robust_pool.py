"""Robust pooling: forward/backward time per penalty next to max and mean pooling.

Prints, for the PointNet shape (B, C, N) (default (8, 1024, 1024) on CPU, (24, 1024, 2048)
on CUDA), the median forward and backward time of each penalty and of max / mean pooling
measured in the same run, their ratios to max pooling, and the fraction of channels whose
pooled value is at the global minimum (checked on a subset against a dense float64 grid).
A second table gives the Welsch miss rate on harder synthetic data.

    OMP_NUM_THREADS=1 python benchmarks/robust_pool.py
    python benchmarks/robust_pool.py --device cuda
    python benchmarks/robust_pool.py --compile never        # eager kernels only
    python benchmarks/robust_pool.py --compile auto         # compiled kernels only

Max pooling is ``torch.max(x, dim)`` (values and indices, as PointNet does); ``amax`` is
shown too. Times are medians of ``--repeats`` interleaved rounds (each round runs every
layer once) after one warm-up run (the warm-up includes any ``torch.compile`` time,
reported separately). By default one table with compiled kernels (``auto``) and one with
eager kernels (``never``) are printed, the ratios of each against max pooling in the same
table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import declnet
from declnet.layers import (
    Huber,
    PseudoHuber,
    TruncatedQuadratic,
    Welsch,
    robust_pool,
    set_compile_mode,
)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def measure_interleaved(
    pools: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, repeats: int, device: str
) -> list[tuple[float, float, float]]:
    """(warm-up seconds, median forward seconds, median backward seconds) per pool.

    The repeats are interleaved (every pool runs once per round), so that a slower or
    faster period of a shared machine affects all pools alike.
    """
    xg = x.detach().clone().requires_grad_()
    v = torch.ones(x.shape[:-1], device=x.device, dtype=x.dtype)

    def once(pool: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
        xg.grad = None
        out: list[torch.Tensor] = []
        fwd = timed(lambda: out.append(pool(xg)), device)
        bwd = timed(lambda: out[0].backward(v), device)
        return fwd, bwd

    warm = [sum(once(pool)) for pool in pools]
    runs: list[list[tuple[float, float]]] = [[] for _ in pools]
    for _ in range(repeats):
        for i, pool in enumerate(pools):
            runs[i].append(once(pool))
    return [
        (w, statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
        for w, rs in zip(warm, runs)
    ]


def grid_minimum(pen: declnet.Penalty, x: torch.Tensor, points: int = 2001) -> torch.Tensor:
    """Global minimum of Σφ(u − x_i) per row of x (R, n), float64: a dense grid over
    [min − α, max + α] with spacing ≪ α, refined by a finer grid around the best point."""
    alpha = float(pen.alpha)
    lo, hi = x.amin(-1, keepdim=True) - alpha, x.amax(-1, keepdim=True) + alpha
    best_f = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    best_u = torch.zeros(x.shape[0], 1, dtype=torch.float64)
    for chunk in torch.linspace(0, 1, points, dtype=torch.float64).split(200):
        grid = lo + (hi - lo) * chunk
        f = pen.phi(grid.unsqueeze(-1) - x.unsqueeze(-2)).sum(-1)
        fm, idx = f.min(-1)
        better = fm < best_f
        best_f = torch.where(better, fm, best_f)
        best_u = torch.where(better.unsqueeze(-1), grid.gather(-1, idx.unsqueeze(-1)), best_u)
    step = (hi - lo) / (points - 1)
    fine = best_u + step * torch.linspace(-1, 1, 201, dtype=torch.float64)
    f = pen.phi(fine.unsqueeze(-1) - x.unsqueeze(-2)).sum(-1)
    return torch.minimum(best_f, f.amin(-1))


def at_global_minimum(pen: declnet.Penalty, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows of x (R, n) whose y (R,) has the global minimum objective (float64)."""
    x64, y64 = x.double().cpu(), y.double().cpu()
    f_y = pen.phi(y64.unsqueeze(-1) - x64).sum(-1)
    f_star = grid_minimum(pen, x64)
    tol = 1e-6 * (1 + f_star.abs())
    return float((f_y <= f_star + tol).double().mean())


def synthetic(kind: str, rows: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Data sets where Welsch pooling with α = 1 has several local minima."""
    if kind == "gaussian":
        return torch.randn(rows, n, generator=gen)
    if kind == "two clusters 70/30":
        k = int(0.7 * n)
        shift = 2 + 6 * torch.rand(rows, 1, generator=gen)
        return torch.cat(
            [torch.randn(rows, k, generator=gen), shift + torch.randn(rows, n - k, generator=gen)],
            -1,
        )
    if kind == "two clusters 52/48":
        k = int(0.52 * n)
        shift = 3 + 3 * torch.rand(rows, 1, generator=gen)
        return torch.cat(
            [torch.randn(rows, k, generator=gen), shift + torch.randn(rows, n - k, generator=gen)],
            -1,
        )
    if kind == "five clusters":
        centres = 6 * torch.randn(rows, 5, generator=gen)
        which = torch.randint(0, 5, (rows, n), generator=gen)
        return centres.gather(-1, which) + 0.5 * torch.randn(rows, n, generator=gen)
    if kind == "uniform [0, 20]":
        return 20 * torch.rand(rows, n, generator=gen)
    if kind == "cauchy":
        return torch.distributions.Cauchy(0.0, 1.0).sample((rows, n))
    raise ValueError(kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("B", "C", "N"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument(
        "--compile",
        default="both",
        choices=("both", "auto", "always", "never"),
        help="compile mode of the kernels; 'both' prints an 'auto' and a 'never' table",
    )
    parser.add_argument(
        "--check-rows", type=int, default=256, help="channels checked against the dense grid"
    )
    parser.add_argument(
        "--miss-rows",
        type=int,
        default=2000,
        help="rows per synthetic data set for the Welsch miss rate",
    )
    args = parser.parse_args()
    modes = ("auto", "never") if args.compile == "both" else (args.compile,)
    device = args.device
    shape = tuple(args.shape or ((24, 1024, 2048) if device == "cuda" else (8, 1024, 1024)))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(device)
    a = args.alpha

    print(
        f"torch {torch.__version__}, declnet {declnet.__version__}, device {device}, "
        f"threads {torch.get_num_threads()}, compile {args.compile}"
    )
    print(
        f"shape (B, C, N) = {shape}, float32, alpha = {a}, "
        f"median of {args.repeats} interleaved runs\n"
    )

    layers: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], object]] = [
        ("max pool (torch.max)", lambda t: torch.max(t, -1).values, None),
        ("amax", lambda t: torch.amax(t, -1), None),
        ("mean pool", lambda t: t.mean(-1), None),
        ("pseudo-Huber", lambda t: robust_pool(t, PseudoHuber(a)), PseudoHuber(a)),
        ("Huber", lambda t: robust_pool(t, Huber(a)), Huber(a)),
        ("Welsch", lambda t: robust_pool(t, Welsch(a)), Welsch(a)),
        (
            "truncated quadratic",
            lambda t: robust_pool(t, TruncatedQuadratic(a)),
            TruncatedQuadratic(a),
        ),
    ]
    for mode in modes:
        set_compile_mode(mode)
        print(f"compile mode {mode!r}")
        timings = measure_interleaved([pool for _, pool, _ in layers], x, args.repeats, device)
        results = []
        for (name, pool, pen), (warm, fwd, bwd) in zip(layers, timings):
            frac = ""
            if pen is not None:
                rows = x.reshape(-1, shape[-1])[: args.check_rows]
                with torch.no_grad():
                    y = pool(rows)
                frac = f"{at_global_minimum(pen, rows, y):.4f}"
            results.append((name, warm, fwd, bwd, frac))
        base_f, base_b = results[0][2], results[0][3]
        header = (
            f"{'layer':<22}{'fwd ms':>9}{'bwd ms':>9}{'fwd/max':>9}{'bwd/max':>9}"
            f"{'warm-up s':>11}{'at global min':>15}"
        )
        print(header)
        print("-" * len(header))
        for name, warm, fwd, bwd, frac in results:
            print(
                f"{name:<22}{fwd * 1e3:>9.1f}{bwd * 1e3:>9.1f}{fwd / base_f:>9.1f}"
                f"{bwd / base_b:>9.1f}{warm:>11.1f}{frac:>15}"
            )
        print()

    print(
        f"\nWelsch (alpha = 1) at the global minimum, {args.miss_rows} rows per data set, "
        "n = 256, float32 input, dense float64 grid:"
    )
    print(f"{'data':<22}{'miss rate':>11}")
    pen = Welsch(1.0)
    for kind in (
        "gaussian",
        "two clusters 70/30",
        "two clusters 52/48",
        "five clusters",
        "uniform [0, 20]",
        "cauchy",
    ):
        data = synthetic(kind, args.miss_rows, 256, gen)
        with torch.no_grad():
            y = robust_pool(data.to(device), pen).cpu()
        hit = at_global_minimum(pen, data, y)
        print(f"{kind:<22}{1 - hit:>11.4f}")


if __name__ == "__main__":
    main()
