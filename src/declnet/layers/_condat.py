"""Batched form of Condat's direct algorithm for 1-D total-variation denoising (private).

L. Condat, "A direct algorithm for 1-D total variation denoising", IEEE Signal
Processing Letters 20(11), 2013. The algorithm scans the signal once, keeping for the
current segment the lowest and highest admissible values (``vmin``, ``vmax``) and the
running residuals (``umin``, ``umax``) that tell when a segment must end with a negative
or a positive jump; on a jump it restarts just after the last point where the bound was
attained. Each sample of the batch carries its own scan state, so one step of the loop
advances every sample by one step of its own scan (all branches computed and selected
with ``where``); the loop ends when every sample has finished.

The scan is a long chain of tiny element-wise operations, so its cost is the per-call
overhead of the array library: on CPU it runs on numpy arrays (several times cheaper per
call than torch), on other devices on torch tensors; both run the same code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


class _TorchOps:
    where = staticmethod(torch.where)

    def __init__(self, bsz: int, device: torch.device) -> None:
        self.device = device

    def ints(self, shape: tuple[int, ...]) -> Any:
        return torch.zeros(shape, dtype=torch.long, device=self.device)

    def bools(self, shape: tuple[int, ...]) -> Any:
        return torch.zeros(shape, dtype=torch.bool, device=self.device)

    @staticmethod
    def at(x: Any, idx: Any) -> Any:
        return x.gather(1, idx.unsqueeze(1)).squeeze(1)

    @staticmethod
    def put(x: Any, idx: Any, val: Any) -> None:
        x.scatter_(1, idx.unsqueeze(1), val.unsqueeze(1))

    @staticmethod
    def upto(k: Any, last: int) -> Any:
        return torch.clamp(k, max=last)


class _NumpyOps:
    where = staticmethod(np.where)

    def __init__(self, bsz: int, device: torch.device) -> None:
        self.rows = np.arange(bsz)

    @staticmethod
    def ints(shape: tuple[int, ...]) -> Any:
        return np.zeros(shape, dtype=np.int64)

    @staticmethod
    def bools(shape: tuple[int, ...]) -> Any:
        return np.zeros(shape, dtype=bool)

    def at(self, x: Any, idx: Any) -> Any:
        return x[self.rows, idx]

    def put(self, x: Any, idx: Any, val: Any) -> None:
        x[self.rows, idx] = val

    @staticmethod
    def upto(k: Any, last: int) -> Any:
        return np.minimum(k, last)


def tv1d_condat(x: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """Exact minimiser of ½‖y − x‖² + λ Σ|y_{i+1} − y_i| for each row.

    Args:
        x: ``(B, n)`` signals, ``n >= 1``.
        lam: ``(B,)`` non-negative weights.

    Returns:
        ``(y, group)``: ``(B, n)`` the solution and ``(B, n)`` int64 ids of the fused
        groups (constant pieces) of each row, ``0, 1, ...`` from the left.
    """
    bsz, n = x.shape
    dev = x.device
    if n == 1:
        return x.clone(), torch.zeros(bsz, 1, dtype=torch.long, device=dev)
    if x.device.type == "cpu":
        start, value = _scan(x.detach().numpy(), lam.detach().numpy(), _NumpyOps(bsz, dev))
        start, value = torch.from_numpy(start), torch.from_numpy(value)
    else:
        start, value = _scan(x, lam, _TorchOps(bsz, dev))
    group = start.to(torch.long).cumsum(1) - 1
    idx = torch.arange(n, device=dev).expand(bsz, n)
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(1).values
    return value.gather(1, first), group


def _scan(x: Any, lam: Any, ops: Any) -> tuple[Any, Any]:
    """The batched scan on ``(B, n)`` arrays of numpy or torch; returns (start, value)."""
    bsz, n = x.shape
    last = n - 1
    k = k0 = kminus = kplus = ops.ints((bsz,))
    x0 = x[:, 0]
    vmin, vmax = x0 - lam, x0 + lam
    umin, umax = lam + 0.0, -lam
    twolam = 2.0 * lam
    done = ops.bools((bsz,))
    start = ops.bools((bsz, n))  # marks the first index of each piece
    value = 0.0 * x  # the value of each piece, stored at its first index
    for _ in range(n * n + 4):  # the scan takes at most O(n²) steps, usually about n
        at_end = k == last
        # --- at the end of the signal (k = n − 1) ---------------------------------------
        a1 = at_end & (umin < 0)  # the segment must end low: emit vmin up to kminus
        a2 = at_end & ~a1 & (umax > 0)  # ... or high: emit vmax up to kplus
        a3 = at_end & ~a1 & ~a2  # finished: the last segment takes the mean value
        # --- inside the signal --------------------------------------------------------
        nxt = ops.at(x, ops.upto(k + 1, last))
        umin_n = umin + nxt - vmin
        b1 = ~at_end & (umin_n < -lam)  # negative jump
        umax_n = umax + nxt - vmax
        b2 = ~at_end & ~b1 & (umax_n > lam)  # positive jump
        b3 = ~at_end & ~b1 & ~b2  # extend the segment
        live = ~done
        a1, a2, a3, b1, b2, b3 = (m & live for m in (a1, a2, a3, b1, b2, b3))

        low = a1 | b1  # emit vmin on [k0, kminus], restart at kminus + 1
        high = a2 | b2  # emit vmax on [k0, kplus], restart at kplus + 1
        emit = low | high | a3
        final = vmin + umin / (k - k0 + 1)
        val = ops.where(low, vmin, ops.where(high, vmax, final))
        row_start = ops.at(start, k0) | emit
        row_value = ops.where(emit, val, ops.at(value, k0))
        ops.put(start, k0, row_start)
        ops.put(value, k0, row_value)
        done = done | a3
        if bool(done.all()):
            break

        new0 = ops.upto(ops.where(low, kminus, kplus) + 1, last)
        xr = ops.at(x, new0)
        restart = low | high
        # Restart states (Condat's C code, in order of the branches above).
        vmin_r = ops.where(a1 | b1, xr, ops.where(b2, xr - twolam, vmin))
        vmax_r = ops.where(a2 | b2, xr, ops.where(b1, xr + twolam, vmax))
        umin_r = ops.where(a2, xr - lam - vmin, lam)
        umax_r = ops.where(a1, xr + lam - vmax, -lam)
        kminus_r = ops.where(a2, kminus, new0)
        kplus_r = ops.where(a1, kplus, new0)
        # Extension: k + 1, and tighten the bounds that were attained.
        k_e = k + 1
        cnt = k_e - k0 + 1
        hit_min = umin_n >= lam
        hit_max = umax_n <= -lam
        vmin_e = ops.where(hit_min, vmin + (umin_n - lam) / cnt, vmin)
        vmax_e = ops.where(hit_max, vmax + (umax_n + lam) / cnt, vmax)
        umin_e = ops.where(hit_min, lam, umin_n)
        umax_e = ops.where(hit_max, -lam, umax_n)
        kminus_e = ops.where(hit_min, k_e, kminus)
        kplus_e = ops.where(hit_max, k_e, kplus)

        vmin = ops.where(restart, vmin_r, ops.where(b3, vmin_e, vmin))
        vmax = ops.where(restart, vmax_r, ops.where(b3, vmax_e, vmax))
        umin = ops.where(restart, umin_r, ops.where(b3, umin_e, umin))
        umax = ops.where(restart, umax_r, ops.where(b3, umax_e, umax))
        kminus = ops.where(restart, kminus_r, ops.where(b3, kminus_e, kminus))
        kplus = ops.where(restart, kplus_r, ops.where(b3, kplus_e, kplus))
        k = ops.where(restart, new0, ops.where(b3, k_e, k))
        k0 = ops.where(restart, new0, k0)
    else:  # pragma: no cover - the scan always terminates
        raise RuntimeError("total_variation_1d: the direct algorithm did not terminate.")
    return start, value
