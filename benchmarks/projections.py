"""Forward and backward time of the Lp projections against the plain operations.

For each size (B, n) and each projection, prints the median time of our layer and of the
plain PyTorch operation it generalises, measured interleaved in the same run, and their
ratio (ours / plain; lower is better); "(min)" is the ratio of the fastest samples, a
useful second opinion on a busy machine:

    L2 sphere   F.normalize(x)
    L2 ball     x * min(1, r / ‖x‖)
    L∞ ball     x.clamp(-r, r)
    L∞ sphere   x.clamp(-r, r)           (no plain equivalent; for reference)
    L1 ball     torch.sort(|x|)          (the cost of one sort: the bound for Duchi et al.)
    L1 sphere   torch.sort(|x|)

"backward" is the time of ``y.backward(v)`` alone (the forward graph is built once and
retained), against the plain operation's autograd backward.

Run with a fixed thread count, for example:

    OMP_NUM_THREADS=1 python benchmarks/projections.py
    python benchmarks/projections.py --device cuda --repeats 101
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from declnet.layers import project_onto_ball, project_onto_sphere

RADIUS = 1.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _loops_for(fn: Callable[[], object], device: torch.device, target_s: float) -> int:
    """Number of calls that makes one timed sample last about ``target_s`` seconds."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(target_s / once))


def _interleaved_times(
    fns: list[Callable[[], object]], device: torch.device, repeats: int, target_s: float
) -> list[tuple[float, float]]:
    """(median, min) seconds per call of each function, timed round-robin to share noise."""
    loops = [_loops_for(fn, device, target_s) for fn in fns]
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, k, out in zip(fns, loops, samples):
            _sync(device)
            start = time.perf_counter()
            for _ in range(k):
                fn()
            _sync(device)
            out.append((time.perf_counter() - start) / k)
    return [(statistics.median(s), min(s)) for s in samples]


def _backward_timer(
    op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, v: torch.Tensor
) -> Callable[[], None]:
    leaf = x.detach().clone().requires_grad_(True)
    y = op(leaf)
    if isinstance(y, tuple):  # torch.sort returns (values, indices)
        y = y[0]

    def run() -> None:
        leaf.grad = None
        y.backward(v, retain_graph=True)

    return run


def _cases() -> list[tuple[str, Callable, Callable]]:
    def l2_ball_plain(x: torch.Tensor) -> torch.Tensor:
        return x * torch.clamp(RADIUS / x.norm(dim=-1, keepdim=True), max=1.0)

    def sort_abs(x: torch.Tensor) -> torch.Tensor:
        return torch.sort(x.abs(), dim=-1)[0]

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)

    def clamp(x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-RADIUS, RADIUS)

    return [
        ("L2 sphere", lambda x: project_onto_sphere(x, 2, RADIUS), normalize),
        ("L2 ball", lambda x: project_onto_ball(x, 2, RADIUS), l2_ball_plain),
        ("Linf ball", lambda x: project_onto_ball(x, math.inf, RADIUS), clamp),
        ("Linf sphere", lambda x: project_onto_sphere(x, math.inf, RADIUS), clamp),
        ("L1 ball", lambda x: project_onto_ball(x, 1, RADIUS), sort_abs),
        ("L1 sphere", lambda x: project_onto_sphere(x, 1, RADIUS), sort_abs),
    ]


def _forward_timer(op: Callable, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            op(x)

    return run


def main() -> None:
    """Parse the options, run every case and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=101, help="timed samples per operation")
    parser.add_argument("--sample-ms", type=float, default=1.0, help="length of one sample")
    parser.add_argument("--sizes", default="256x512,256x4096", help="comma-separated BxN")
    args = parser.parse_args()

    device = torch.device(args.device)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"float32, median of {args.repeats} samples of ~{args.sample_ms:g} ms, radius {RADIUS}"
    )
    header = (
        f"{'op':<12} {'B x n':>10} | {'fwd ours':>10} {'fwd plain':>10} {'ratio':>6} "
        f"{'(min)':>6} | {'bwd ours':>10} {'bwd plain':>10} {'ratio':>6} {'(min)':>6}"
    )
    print(header)
    print("-" * len(header))
    for b, n in sizes:
        # Standard normal rows lie outside the unit ball for every p at these sizes.
        x = torch.randn(b, n, device=device, dtype=torch.float32)
        v = torch.randn(b, n, device=device, dtype=torch.float32)
        for name, ours, plain in _cases():
            fwd = _interleaved_times(
                [_forward_timer(ours, x), _forward_timer(plain, x)],
                device,
                args.repeats,
                args.sample_ms / 1e3,
            )
            bwd = _interleaved_times(
                [_backward_timer(ours, x, v), _backward_timer(plain, x, v)],
                device,
                args.repeats,
                args.sample_ms / 1e3,
            )
            (fo, fo_min), (fp, fp_min) = fwd
            (bo, bo_min), (bp, bp_min) = bwd
            print(
                f"{name:<12} {f'{b}x{n}':>10} | {fo * 1e6:8.1f}us {fp * 1e6:8.1f}us "
                f"{fo / fp:6.2f} {fo_min / fp_min:6.2f} | {bo * 1e6:8.1f}us {bp * 1e6:8.1f}us "
                f"{bo / bp:6.2f} {bo_min / bp_min:6.2f}"
            )


if __name__ == "__main__":
    main()
