"""Training and evaluation of one run: SGD, per-epoch metrics, timings, checkpoints, DDP.

A run lives in its own folder::

    RUN/config.json      the configuration (RunConfig.to_dict())
    RUN/metrics.jsonl    one JSON line per epoch (loss, test top-1, mAP, timings)
    RUN/checkpoint.pt    model, optimiser and scheduler after the last finished epoch
    RUN/final.json       the final evaluation at every test outlier rate, written last

Every source of randomness is seeded from ``config.seed`` and, where it changes over time,
from the epoch number, so a run resumed from its checkpoint (``resume=True``) follows the
same trajectory as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._metrics import mean_average_precision, top1_accuracy
from .config import RunConfig
from .data import PointCloudSet, load_dataset
from .model import PointNet
from .outliers import inject_outliers

__all__ = ["DistributedInfo", "evaluate", "load_data", "run_training"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
FINAL_FILE = "final.json"


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed derived from ``seed`` and a tag (e.g. ("shuffle", epoch))."""
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


# --------------------------------------------------------------------------------------
# Distributed (torchrun) support


@dataclass(frozen=True)
class DistributedInfo:
    """Rank and world size of this process (1 process without torchrun).

    Attributes:
        rank: Global rank.
        world_size: Number of processes.
        local_rank: Rank on this machine (selects the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


def distributed_info() -> DistributedInfo:
    """Read rank and world size from the environment that ``torchrun`` sets."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedInfo()
    return DistributedInfo(
        int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))
    )


def init_distributed(device: torch.device) -> DistributedInfo:
    """Join the process group under ``torchrun`` (NCCL on CUDA, Gloo on CPU); no-op otherwise."""
    info = distributed_info()
    if info.enabled and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return info


def resolve_device(name: str, info: DistributedInfo) -> torch.device:
    """The device of this process: "auto" picks CUDA when available; under torchrun each
    process takes GPU ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", info.local_rank if info.enabled else 0)
        torch.cuda.set_device(device)
    return device


def _barrier(info: DistributedInfo) -> None:
    if info.enabled:
        torch.distributed.barrier()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------
# Data


def load_data(config: RunConfig) -> tuple[PointCloudSet, PointCloudSet]:
    """Load the clean train and test sets that ``config`` describes."""
    return load_dataset(
        config.dataset,
        num_points=config.num_points,
        data_root=config.data_root,
        num_classes=config.num_classes,
        train_per_class=config.train_per_class,
        test_per_class=config.test_per_class,
        seed=config.seed,
        cache_dir=config.cache_dir,
    )


def corrupted(points: torch.Tensor, rate: float, seed: int, split: str) -> torch.Tensor:
    """``points`` with a fixed set of outliers for this seed, rate and split."""
    return inject_outliers(points, rate, derive_seed(seed, "outliers", split, f"{rate:.6f}"))


def protocol(config: RunConfig) -> str:
    """The evaluation protocol of a run.

    Returns:
        "same" (Table 3: tested at the training outlier rate only), "clean" (Table 4: trained
        without outliers, tested at several rates) or "mixed" (anything else).
    """
    if config.test_outlier_rates == [config.train_outlier_rate]:
        return "same"
    return "clean" if config.train_outlier_rate == 0.0 else "mixed"


# --------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    points: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    batch_size: int = 64,
) -> dict[str, float]:
    """Evaluate a classifier: mean loss, top-1 accuracy and mAP.

    Args:
        model: Maps (B, N, 3) clouds to (B, K) logits.
        points: (n, N, 3) clouds.
        labels: (n,) classes.
        device: Where to run.
        batch_size: Clouds per forward pass.

    Returns:
        ``{"loss": ..., "top1": ..., "map": ...}`` (accuracy and mAP in [0, 1]).
    """
    was_training = model.training
    model.eval()
    logits = []
    for start in range(0, len(points), batch_size):
        logits.append(model(points[start : start + batch_size].to(device)).float().cpu())
    model.train(was_training)
    scores = torch.cat(logits)
    return {
        "loss": float(F.cross_entropy(scores, labels)),
        "top1": top1_accuracy(scores, labels),
        "map": mean_average_precision(scores, labels),
    }


# --------------------------------------------------------------------------------------
# Training


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm comes with the [apps] extra
            return contextlib.nullcontext(_NoBar())
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    return contextlib.nullcontext(_NoBar())


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass


def _batches(
    n: int, batch_size: int, seed: int, epoch: int, info: DistributedInfo
) -> Iterator[torch.Tensor]:
    """Index batches of one epoch: a seeded permutation, split evenly over the processes,
    dropping the incomplete last batch (BatchNorm needs more than one sample)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "shuffle", epoch))
    order = torch.randperm(n, generator=generator)
    per_process = n // info.world_size
    mine = order[info.rank * per_process : (info.rank + 1) * per_process]
    for start in range(0, per_process - batch_size + 1, batch_size):
        yield mine[start : start + batch_size]


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_training(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    data: tuple[PointCloudSet, PointCloudSet] | None = None,
    name: str | None = None,
    stop_after_epochs: int | None = None,
) -> dict[str, Any] | None:
    """Train and evaluate one PointNet, writing the run folder described in the module docs.

    Args:
        config: The run configuration.
        run_dir: The run's folder (created).
        resume: Continue from ``run_dir/checkpoint.pt`` if it exists (a finished run just
            returns its results). Without it, a folder that already holds a run is an error.
        data: Clean ``(train, test)`` sets, to share one loaded dataset between runs
            (default: load what ``config`` describes).
        name: Name shown in progress output (default: the folder name).
        stop_after_epochs: Stop after this many epochs in total, as if interrupted (for
            testing ``resume``); the run then has no ``final.json``.

    Returns:
        The contents of ``final.json``, or None when stopped early.

    Raises:
        ValueError: If the folder holds a different or unfinished run and ``resume`` is not
            set, or the configuration differs from the saved one.
    """
    run_dir = Path(run_dir)
    name = name or run_dir.name
    info = distributed_info()
    device = resolve_device(config.device, info)
    info = init_distributed(device)
    cores = os.cpu_count() or 1
    if config.threads is not None:
        torch.set_num_threads(max(1, min(config.threads, cores)))
    elif info.enabled and device.type == "cpu":
        # Several CPU processes on one machine: share the cores instead of oversubscribing.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
        torch.set_num_threads(max(1, cores // local))

    final_path = run_dir / FINAL_FILE
    ckpt_path = run_dir / CHECKPOINT_FILE
    config_path = run_dir / CONFIG_FILE
    if config_path.is_file():
        saved = RunConfig.from_dict(json.loads(config_path.read_text()))
        if saved.result_fields() != config.result_fields():
            diff = {
                k: (v, config.result_fields()[k])
                for k, v in saved.result_fields().items()
                if config.result_fields()[k] != v
            }
            raise ValueError(
                f"{run_dir} holds a run with another configuration (saved vs now: {diff}); "
                "choose another output folder"
            )
        if not resume:
            raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it")
    if resume and final_path.is_file():
        return json.loads(final_path.read_text())
    _barrier(info)  # every process has checked the folder before the main one writes to it

    train_set, test_set = data if data is not None else load_data(config)
    train_points = corrupted(train_set.points, config.train_outlier_rate, config.seed, "train")
    test_points = corrupted(test_set.points, config.train_outlier_rate, config.seed, "test")

    torch.manual_seed(derive_seed(config.seed, "init"))
    model: nn.Module = PointNet(train_set.num_classes, config.pool, config.alpha, config.width)
    if info.enabled and device.type == "cuda":
        # BatchNorm statistics over the whole batch of all processes, as on one device.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=max(1, config.epochs // 3), gamma=0.5
    )
    start_epoch = 0
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        # Drop metrics of epochs after the checkpoint (written just before an interruption).
        kept = [m for m in _read_metrics(run_dir / METRICS_FILE) if m["epoch"] <= start_epoch]
        (run_dir / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in kept))
    _barrier(info)

    train_model: nn.Module = model
    if info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    show = config.progress and info.is_main
    last_epoch = (
        config.epochs if stop_after_epochs is None else min(config.epochs, stop_after_epochs)
    )
    steps = len(train_points) // info.world_size // config.batch_size
    if steps == 0:
        raise ValueError(
            f"the training set ({len(train_points)} clouds over {info.world_size} processes) "
            f"is smaller than one batch of {config.batch_size}"
        )
    for epoch in range(start_epoch, last_epoch):
        torch.manual_seed(derive_seed(config.seed, "epoch", epoch))  # dropout
        model.train()
        t_epoch = time.perf_counter()
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        times = torch.zeros(3, dtype=torch.float64)  # data, forward, backward (seconds)
        lr = optimizer.param_groups[0]["lr"]
        with _progress(steps, f"{name} {epoch + 1}/{config.epochs}", show) as bar:
            for idx in _batches(len(train_points), config.batch_size, config.seed, epoch, info):
                _synchronize(device)
                t0 = time.perf_counter()
                x = train_points[idx].to(device, non_blocking=True)
                y = train_set.labels[idx].to(device, non_blocking=True)
                _synchronize(device)
                t1 = time.perf_counter()
                logits = train_model(x)
                loss = F.cross_entropy(logits, y)
                _synchronize(device)
                t2 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                _synchronize(device)
                t3 = time.perf_counter()
                times += torch.tensor([t1 - t0, t2 - t1, t3 - t2], dtype=torch.float64)
                totals[0] += float(loss.detach()) * len(idx)
                totals[1] += float((logits.argmax(1) == y).sum())
                totals[2] += len(idx)
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        scheduler.step()
        if info.enabled:
            packed = torch.cat([totals, times]).to(device)
            torch.distributed.all_reduce(packed)
            packed = packed.cpu()
            totals, times = packed[:3], packed[3:]
        test = evaluate(model, test_points, test_set.labels, device)
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": float(totals[0] / totals[2]),
            "train_top1": float(totals[1] / totals[2]),
            "test_outlier_rate": config.train_outlier_rate,
            "test_loss": test["loss"],
            "test_top1": test["top1"],
            "test_map": test["map"],
            # Per point cloud, in milliseconds (summed over processes, divided by all clouds).
            "time_data_ms": float(times[0] / totals[2] * 1e3),
            "time_forward_ms": float(times[1] / totals[2] * 1e3),
            "time_backward_ms": float(times[2] / totals[2] * 1e3),
            "epoch_seconds": time.perf_counter() - t_epoch,
        }
        if info.is_main:
            with (run_dir / METRICS_FILE).open("a") as f:
                f.write(json.dumps(record) + "\n")
            _save_atomic(
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "config": config.to_dict(),
                },
                ckpt_path,
            )
        _barrier(info)
    if last_epoch < config.epochs:
        return None

    results = []
    for rate in config.test_outlier_rates:
        points = corrupted(test_set.points, rate, config.seed, "test")
        results.append({"outlier_rate": rate, **evaluate(model, points, test_set.labels, device)})
    metrics = _read_metrics(run_dir / METRICS_FILE) if info.is_main else []
    # Median over epochs: robust to the first epoch's warm-up and to other load on the machine.
    timing = {
        key: statistics.median(m[f"time_{key}_ms"] for m in metrics) if metrics else float("nan")
        for key in ("data", "forward", "backward")
    }
    final = {
        "name": name,
        "pool": config.pool,
        "alpha": config.alpha,
        "train_outlier_rate": config.train_outlier_rate,
        "protocol": protocol(config),
        "epochs": config.epochs,
        "device": str(device),
        "world_size": info.world_size,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "results": results,
        "timing_ms_per_cloud": timing,
    }
    if info.is_main:
        final_path.write_text(json.dumps(final, indent=2) + "\n")
    _barrier(info)
    return final
