"""Robust vector pooling: forward/backward time per penalty next to max and mean pooling.

For sets of points ``x (B, C, N)`` (N points in R^C per sample), prints the median forward
and backward time of ``robust_vector_pool`` with each built-in penalty (fused kernels, in
each set's scaled frame) and with the same penalty through the generic path that a user's
penalty takes (the penalty's own ``weight`` / ``radial_excess`` in the data's coordinates,
which was the only path before the fused kernels), next to max and mean pooling measured
in the same run, and the largest difference between the two answers (relative to the
data's spread).

    OMP_NUM_THREADS=1 python benchmarks/robust_vector_pool.py
    python benchmarks/robust_vector_pool.py --shape 8 3 4096 --compile never

Times are medians of ``--repeats`` interleaved rounds after one warm-up run (which includes
any ``torch.compile`` time). By default a table with compiled kernels (``always``) and one
with eager kernels (``never``) are printed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from robust_pool import measure_interleaved

import declnet
from declnet.layers import (
    Huber,
    PseudoHuber,
    TruncatedQuadratic,
    Welsch,
    robust_vector_pool,
    set_compile_mode,
)


def generic(cls: type[declnet.layers.Penalty]) -> type[declnet.layers.Penalty]:
    """The built-in penalty as a user's subclass: solved and differentiated generically."""
    return type(f"Generic{cls.__name__}", (cls,), {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--shape", type=int, nargs=3, action="append", default=None, metavar=("B", "C", "N")
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--compile", default="both", choices=("both", "always", "never"))
    args = parser.parse_args()
    modes = ("always", "never") if args.compile == "both" else (args.compile,)
    device = args.device
    shapes = args.shape or [(8, 64, 1024), (8, 3, 4096), (64, 16, 256)]
    a = args.alpha
    print(
        f"torch {torch.__version__}, declnet {declnet.__version__}, device {device}, "
        f"threads {torch.get_num_threads()}, {args.dtype}, alpha = {a}, "
        f"median of {args.repeats} interleaved runs\n"
    )
    penalties = [PseudoHuber, Huber, Welsch, TruncatedQuadratic]
    for shape in shapes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(*shape, generator=gen, dtype=getattr(torch, args.dtype))
        x[..., : shape[-1] // 10] += 5.0  # a cluster of outliers
        x = x.to(device)
        layers: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = [
            ("max pool (torch.max)", lambda t: torch.max(t, -1).values),
            ("mean pool", lambda t: t.mean(-1)),
        ]
        for cls in penalties:
            user = generic(cls)
            layers.append((cls.__name__, lambda t, c=cls: robust_vector_pool(t, c(a))))
            layers.append(
                (f"{cls.__name__} generic", lambda t, c=user: robust_vector_pool(t, c(a)))
            )
        for mode in modes:
            set_compile_mode(mode)
            timings = measure_interleaved([p for _, p in layers], x, args.repeats, device)
            base_f, base_b = timings[0][1], timings[0][2]
            print(f"shape (B, C, N) = {tuple(shape)}, compile mode {mode!r}")
            header = (
                f"{'layer':<30}{'fwd ms':>9}{'bwd ms':>9}{'fwd/max':>9}{'bwd/max':>9}"
                f"{'warm-up s':>11}{'|Δy|/spread':>13}"
            )
            print(header)
            print("-" * len(header))
            spread = float(x.amax() - x.amin())
            with torch.no_grad():
                outs = [p(x) for _, p in layers]
            for i, ((name, _), (warm, fwd, bwd)) in enumerate(zip(layers, timings)):
                diff = ""
                if name.endswith("generic"):
                    diff = f"{float((outs[i] - outs[i - 1]).abs().max()) / spread:.1e}"
                print(
                    f"{name:<30}{fwd * 1e3:>9.2f}{bwd * 1e3:>9.2f}{fwd / base_f:>9.1f}"
                    f"{bwd / base_b:>9.1f}{warm:>11.2f}{diff:>13}"
                )
            print()


if __name__ == "__main__":
    main()
