"""Built-in forward solvers and the layers built on them, against the usual alternatives.

Sections (float64, batch 16, CPU unless ``--device cuda``):

- **QP** — ``declnet.layers.quadratic_program`` against qpth's ``QPFunction`` (the OptNet
  reference implementation) on random strictly feasible QPs with ``n`` variables, ``q``
  inequalities and 2 equalities: forward time, backward time (backward pass alone, after an
  untimed forward) and the relative error of ``∂ℓ/∂p · d`` against central finite
  differences of declnet's forward (the same reference for both). qpth is optional: the
  section says "qpth not installed" without it.
- **DEQ** — ``FixedPointNode`` with ``y = tanh(W y + U x + b)`` (the DEQ of Bai et al.),
  ``m = 64`` and ``256``: backward (the default, the adjoint fixed-point iteration, and
  GMRES) against a hand-written implicit backward (the hook of
  the implicit-layers tutorial: the adjoint fixed point ``u = v + (∂G/∂y)ᵀu`` by plain
  iteration of vector-Jacobian products, to the same tolerance), and against torchdeq when
  it is installed.
- **Newton / L-BFGS** — the built-in solvers against a user-written batched Newton (closed
  form gradient and Hessian) on ``argmin_u ½ (u − x)ᵀQ(u − x) + Σ log cosh u``.

Every method of a row is run in each repeat, interleaved, and the table reports medians
(the CPU may be shared). Ratios are declnet time / other time (below 1: declnet faster).

Run: ``OMP_NUM_THREADS=1 python benchmarks/solvers.py [--repeats 15] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import declnet.solvers as solvers
from declnet._node import DeclarativeNode
from declnet._root import FixedPointNode
from declnet.layers import quadratic_program

BATCH = 16
DT = torch.float64


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Callable[[], object]]], repeats: int,
                device: str) -> dict[str, float]:
    """Median seconds of each timed call; ``fns[name]()`` prepares (untimed) and returns the
    call to time. Methods alternate within each repeat."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for name, prepare in fns.items():
            call = prepare()
            _sync(device)
            t0 = time.perf_counter()
            call()
            _sync(device)
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# -- QP ------------------------------------------------------------------------------------
def random_qp(n: int, q: int, r: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    L = torch.randn(BATCH, n, n, dtype=DT, generator=gen)
    Q = L @ L.transpose(1, 2) / n + 0.1 * torch.eye(n, dtype=DT)
    p = torch.randn(BATCH, n, dtype=DT, generator=gen)
    G = torch.randn(BATCH, q, n, dtype=DT, generator=gen)
    y0 = 0.1 * torch.randn(BATCH, n, dtype=DT, generator=gen)  # strictly feasible point
    h = (G @ y0.unsqueeze(-1)).squeeze(-1) + torch.rand(BATCH, q, dtype=DT, generator=gen)
    A = torch.randn(BATCH, r, n, dtype=DT, generator=gen)
    b = (A @ y0.unsqueeze(-1)).squeeze(-1)
    return [t.to(device) for t in (Q, p, G, h, A, b)]


def qp_section(repeats: int, device: str) -> list[list[str]]:
    try:
        from qpth.qp import QPFunction
    except ImportError:
        print("qpth not installed: `pip install qpth` in the benchmark environment to compare.")
        QPFunction = None
    return [qp_row(n, q, QPFunction, repeats, device) for n, q in ((10, 10), (50, 25))]


def qp_row(n: int, q: int, QPFunction, repeats: int, device: str) -> list[str]:
    args = random_qp(n, q, 2, device)
    w = torch.randn(BATCH, n, dtype=DT, device=device)
    d = torch.randn(BATCH, n, dtype=DT, device=device)

    def ours(*a):
        return quadratic_program(*a)

    methods = {"declnet": ours}
    if QPFunction is not None:
        from qpth.qp import QPSolvers

        def theirs(*a):
            return QPFunction(verbose=-1, solver=QPSolvers.PDIPM_BATCHED, eps=1e-12,
                              maxIter=50)(*a)
        methods["qpth"] = theirs

    def forward(fn):
        return lambda: (lambda: fn(*args))

    def backward(fn):
        def prepare():
            a = [t.clone().requires_grad_(True) for t in args]
            loss = (w * fn(*a)).sum()
            return lambda: loss.backward()
        return prepare

    fwd = interleaved({k: forward(f) for k, f in methods.items()}, repeats, device)
    bwd = interleaved({k: backward(f) for k, f in methods.items()}, repeats, device)
    # gradient accuracy w.r.t. p against central differences of declnet's forward
    eps = 1e-6
    Q, p, G, h, A, b = args
    with torch.no_grad():
        fd = ((w * ours(Q, p + eps * d, G, h, A, b)).sum()
              - (w * ours(Q, p - eps * d, G, h, A, b)).sum()) / (2 * eps)
    err = {}
    for k, f in methods.items():
        pp = p.clone().requires_grad_(True)
        (w * f(Q, pp, G, h, A, b)).sum().backward()
        err[k] = abs(float((pp.grad * d).sum() - fd)) / abs(float(fd))
    y_ours = ours(*args)
    row = [f"QP n={n} q={q} r=2", f"{fwd['declnet'] * 1e3:.2f}", f"{bwd['declnet'] * 1e3:.2f}",
           f"{err['declnet']:.1e}"]
    if "qpth" in methods:
        diff = float((methods["qpth"](*args) - y_ours).abs().max())
        row += [f"{fwd['qpth'] * 1e3:.2f}", f"{bwd['qpth'] * 1e3:.2f}", f"{err['qpth']:.1e}",
                f"{fwd['declnet'] / fwd['qpth']:.2f}", f"{bwd['declnet'] / bwd['qpth']:.2f}",
                f"{diff:.1e}"]
    else:
        row += ["-"] * 6
    return row


# -- DEQ -----------------------------------------------------------------------------------
class DEQ(FixedPointNode):
    def __init__(self, n: int, m: int, **kwargs) -> None:
        super().__init__(**kwargs)
        gen = torch.Generator().manual_seed(0)
        W = torch.randn(m, m, dtype=DT, generator=gen)
        self.W = nn.Parameter(0.9 * W / torch.linalg.matrix_norm(W, 2))
        self.U = nn.Parameter(torch.randn(m, n, dtype=DT, generator=gen) / n**0.5)
        self.b = nn.Parameter(torch.zeros(m, dtype=DT))

    def fixed_point_map(self, x, *, y):
        return torch.tanh(y @ self.W.T + x @ self.U.T + self.b)

    def initial_guess(self, x):
        return x.new_zeros(x.shape[0], self.W.shape[0])


def hand_written_deq(node: DEQ, x: torch.Tensor, tol: float) -> torch.Tensor:
    """The implicit-layers tutorial's DEQ: forward by the same solver, backward by a hook
    iterating the adjoint fixed point with vector-Jacobian products."""
    with torch.no_grad():
        y_star = solvers.Anderson()(node, x).y
    y = node.fixed_point_map(x, y=y_star)
    y0 = y.clone().detach().requires_grad_(True)
    g0 = node.fixed_point_map(x, y=y0)

    def hook(grad):
        u = grad
        for _ in range(500):
            (vjp,) = torch.autograd.grad(g0, y0, u, retain_graph=True)
            new = vjp + grad
            if float((new - u).abs().max()) <= tol * (1 + float(new.abs().max())):
                return new
            u = new
        return u

    y.register_hook(hook)
    return y


def deq_section(repeats: int, device: str) -> list[list[str]]:
    try:
        import torchdeq  # noqa: F401
        have_torchdeq = True
    except ImportError:
        print("torchdeq not installed: its column is left empty.")
        have_torchdeq = False
    return [deq_row(m, have_torchdeq, repeats, device) for m in (64, 256)]


def deq_row(m: int, have_torchdeq: bool, repeats: int, device: str) -> list[str]:
    n = 32
    node = DEQ(n, m).to(device)
    node_gmres = DEQ(n, m, linear_solver="gmres").to(device)
    x = torch.randn(BATCH, n, dtype=DT, device=device)
    w = torch.randn(BATCH, m, dtype=DT, device=device)

    def prepare(make):
        def p():
            xx = x.clone().requires_grad_(True)
            loss = (w * make(xx)).sum()
            return lambda: loss.backward()
        return p

    fns = {
        "declnet default": prepare(lambda xx: node(xx)),
        "declnet GMRES": prepare(lambda xx: node_gmres(xx)),
        "hand-written": prepare(lambda xx: hand_written_deq(node, xx, 1e-10)),
    }
    if have_torchdeq:
        fns["torchdeq"] = prepare(lambda xx: torchdeq_forward(node, xx))
    t = interleaved(fns, repeats, device)
    # the gradients agree
    grads = {}
    for k, make in (("lu", node), ("hand", None)):
        xx = x.clone().requires_grad_(True)
        out = make(xx) if make is not None else hand_written_deq(node, xx, 1e-12)
        (grads[k],) = torch.autograd.grad((w * out).sum(), xx)
    diff = float((grads["lu"] - grads["hand"]).abs().max() / grads["hand"].abs().max())
    row = [f"DEQ m={m}", f"{t['declnet default'] * 1e3:.2f}", f"{t['declnet GMRES'] * 1e3:.2f}",
           f"{t['hand-written'] * 1e3:.2f}",
           f"{t['declnet default'] / t['hand-written']:.2f}",
           f"{t['declnet GMRES'] / t['hand-written']:.2f}",
           f"{t['torchdeq'] * 1e3:.2f}" if "torchdeq" in t else "-", f"{diff:.1e}"]
    return row


def torchdeq_forward(node: DEQ, x: torch.Tensor) -> torch.Tensor:
    from torchdeq import get_deq

    deq = get_deq(f_solver="anderson", b_solver="anderson", f_max_iter=200, b_max_iter=200,
                  f_tol=1e-10, b_tol=1e-10, ift=True)
    z, _ = deq(lambda y: node.fixed_point_map(x, y=y), node.initial_guess(x))
    return z[-1]


# -- Newton / L-BFGS -----------------------------------------------------------------------
class LogCosh(DeclarativeNode):
    """``argmin_u ½ (u − x)ᵀQ(u − x) + Σ log cosh u``."""

    def __init__(self, m: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        M = torch.randn(m, m, dtype=DT, generator=gen) / m**0.5
        self.register_buffer("Q", torch.eye(m, dtype=DT) + 0.25 * M @ M.T)

    def objective(self, x, *, y):
        d = y - x
        return 0.5 * (d * (d @ self.Q)).sum(-1) + torch.log(torch.cosh(y)).sum(-1)

    def initial_guess(self, x):
        return torch.zeros_like(x)

    def solve(self, x):  # what a user writes: Newton with the closed-form derivatives
        y = torch.zeros_like(x)
        for _ in range(50):
            g = (y - x) @ self.Q + torch.tanh(y)
            if float(g.abs().max()) <= 1e-10:
                break
            H = self.Q + torch.diag_embed(1 - torch.tanh(y) ** 2)
            y = y - torch.linalg.solve(H, g)
        return y


def newton_section(repeats: int, device: str) -> list[list[str]]:
    return [newton_row(m, repeats, device) for m in (10, 100)]


def newton_row(m: int, repeats: int, device: str) -> list[str]:
    node = LogCosh(m).to(device)
    x = 2 * torch.randn(BATCH, m, dtype=DT, device=device)
    t = interleaved({
        "user": lambda: (lambda: node.solve(x)),
        "Newton": lambda: (lambda: solvers.Newton(tol=1e-11)(node, x)),
        "LBFGS": lambda: (lambda: solvers.LBFGS(tol=1e-10)(node, x)),
    }, repeats, device)
    ref = node.solve(x)
    e_n = float((solvers.Newton(tol=1e-11)(node, x).y - ref).abs().max())
    e_l = float((solvers.LBFGS(tol=1e-10)(node, x).y - ref).abs().max())
    return [f"log-cosh m={m}", f"{t['user'] * 1e3:.2f}", f"{t['Newton'] * 1e3:.2f}",
            f"{t['LBFGS'] * 1e3:.2f}", f"{t['Newton'] / t['user']:.2f}",
            f"{t['LBFGS'] / t['user']:.2f}", f"{e_n:.0e} / {e_l:.0e}"]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sections", nargs="+", default=["qp", "deq", "newton"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"batch {BATCH}, float64, medians of {args.repeats} interleaved repeats (ms)\n")
    if "qp" in args.sections:
        print(table(["problem", "declnet fwd", "declnet bwd", "declnet grad err", "qpth fwd",
                     "qpth bwd", "qpth grad err", "fwd ratio", "bwd ratio", "max |Δy|"],
                    qp_section(args.repeats, args.device)), "\n")
    if "deq" in args.sections:
        print(table(["problem", "declnet default bwd", "declnet GMRES bwd", "hand-written bwd",
                     "default ratio", "GMRES ratio", "torchdeq bwd", "rel. grad diff"],
                    deq_section(args.repeats, args.device)), "\n")
    if "newton" in args.sections:
        print(table(["problem", "user solve", "Newton()", "LBFGS()", "Newton ratio",
                     "LBFGS ratio", "max |Δy| N / L"],
                    newton_section(args.repeats, args.device)))


if __name__ == "__main__":
    main()
