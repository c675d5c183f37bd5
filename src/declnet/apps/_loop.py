"""The training loop shared by the experiments: optimiser and schedule, one timed epoch, checks.

Each experiment keeps its data, model and evaluation; what one epoch of training is — draw a
batch, forward, loss, backward, step, with the device synchronised at each boundary so that
the three phases are timed also on a GPU, a stop on a non-finite loss, and the sums reduced
over the ``torchrun`` processes — is defined here once.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._common import progress_bar, sum_over_processes, synced_clock

__all__ = [
    "EpochTotals",
    "NonFiniteLossError",
    "check_options",
    "derive_seed",
    "sgd_with_step_schedule",
    "train_epoch",
]


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite: the run stops without a result."""


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed derived from ``seed`` and a tag, e.g. ``("shuffle", epoch)``.

    Every random stream of both experiments (initialisation, shuffling, dropout, outliers) is
    seeded this way, so it depends only on the run's seed and on what it is for, and a resumed
    run draws the same numbers as one that was never interrupted.
    """
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def check_options(*, lr: float, momentum: float, seed: int, weight_decay: float = 0.0) -> None:
    """Validate the optimisation options that both experiments share.

    Args:
        lr: Learning rate, finite and positive.
        momentum: SGD momentum in ``[0, 1)``.
        seed: Seed, an integer ``>= 0``.
        weight_decay: Finite and non-negative.

    Raises:
        ValueError: Naming the option, what it must be and what it got.
    """
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr must be a finite positive number, got {lr}")
    if not (math.isfinite(momentum) and 0.0 <= momentum < 1.0):
        raise ValueError(f"--momentum must lie in [0, 1), got {momentum}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0.0):
        raise ValueError(f"--weight-decay must be finite and non-negative, got {weight_decay}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")


def sgd_with_step_schedule(
    parameters: Iterable[nn.Parameter],
    *,
    lr: float,
    momentum: float,
    weight_decay: float = 0.0,
    step_size: int,
    gamma: float,
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.StepLR]:
    """SGD with momentum and a learning rate multiplied by ``gamma`` every ``step_size`` epochs.

    Args:
        parameters: What to train.
        lr: Initial learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        step_size: Epochs between two decays (at least 1).
        gamma: Decay factor.

    Returns:
        ``(optimizer, scheduler)``; call ``scheduler.step()`` once per epoch.
    """
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, max(1, step_size), gamma)
    return optimizer, scheduler


@dataclass
class EpochTotals:
    """Sums over one epoch of training (over every process under ``torchrun``).

    Attributes:
        loss_sum: Sum over the samples of the training loss.
        correct: Samples whose highest logit is the true class.
        count: Samples trained on.
        data_s: Seconds waiting for batches (and copying them to the device).
        forward_s: Seconds in the forward pass and the loss.
        backward_s: Seconds in the backward pass and the optimiser step.
    """

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    data_s: float = 0.0
    forward_s: float = 0.0
    backward_s: float = 0.0

    @property
    def loss(self) -> float:
        """Mean training loss (NaN without samples)."""
        return self.loss_sum / self.count if self.count else math.nan

    @property
    def top1(self) -> float:
        """Training accuracy (NaN without samples)."""
        return self.correct / self.count if self.count else math.nan


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    total: int,
    desc: str,
    progress: Optional[bool],
    what: str,
    epoch: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    hint: str = "lower --lr, or look for NaN or infinite values in the data",
) -> EpochTotals:
    """Train ``model`` for one pass over ``batches``, timing data, forward and backward.

    The device is synchronised before each clock reading, so the phases are timed also on a
    GPU, whose kernels run asynchronously. The loss is checked after every forward pass: a
    NaN or infinite loss stops training before the weights take the step.

    Args:
        model: The module to train (wrapped in ``DistributedDataParallel`` under ``torchrun``),
            in training mode.
        batches: ``(inputs, targets)`` pairs, on any device (they are moved to ``device``).
        optimizer: Steps the parameters.
        device: The device of this process.
        total: Batches in ``batches``, for the progress bar.
        desc: Label of the progress bar.
        progress: Progress bar: ``True`` always, ``None`` on a terminal, ``False`` never.
        what: Names the run in the error on a non-finite loss.
        epoch: Zero-based epoch, for that error.
        loss_fn: Loss of ``(logits, targets)``, a mean over the batch.
        hint: What the error on a non-finite loss suggests.

    Returns:
        The sums of the epoch over every process.

    Raises:
        NonFiniteLossError: If the loss becomes NaN or infinite.
    """
    sums = torch.zeros(6, dtype=torch.float64)  # loss, correct, count, data, forward, backward
    bar: Any = progress_bar(batches, total=total, desc=desc, enabled=progress)
    iterator = iter(bar)
    step = 0
    while True:
        t0 = synced_clock(device)
        try:
            inputs, targets = next(iterator)
        except StopIteration:
            break
        step += 1
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        t1 = synced_clock(device)
        logits = model(inputs)
        loss = loss_fn(logits, targets)
        t2 = synced_clock(device)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"{what}: the training loss became {value} at epoch {epoch + 1}, step {step}; "
                f"stopped without a result ({hint})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        t3 = synced_clock(device)
        batch = targets.shape[0]
        correct = float((logits.detach().argmax(1) == targets).sum())
        sums += torch.tensor(
            [value * batch, correct, batch, t1 - t0, t2 - t1, t3 - t2], dtype=torch.float64
        )
        bar.set_postfix(loss=f"{value:.3f}", refresh=False)
    sums = sum_over_processes(sums, device)
    return EpochTotals(*(float(v) for v in sums))
