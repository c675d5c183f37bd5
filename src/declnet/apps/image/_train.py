"""Training and evaluation of one configuration: SGD, step schedule, timing, checkpoints, DDP."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._common import (
    ProcessRole,
    append_jsonl,
    barrier,
    config_differences,
    distributed_info,
    load_checkpoint,
    process_group,
    progress_bar,
    read_json,
    resolve_device,
    run_lock,
    save_atomic,
    sum_over_processes,
    synced_clock,
    trim_jsonl,
    wrap_ddp,
    write_json_atomic,
)
from .._loop import derive_seed, sgd_with_step_schedule, train_epoch
from .._metrics import authors_map, mean_average_precision, topk_accuracy
from ._config import ImageConfig
from ._data import DatasetInfo, load_dataset
from ._model import ResNet, default_radius, resnet18

__all__ = ["Distributed", "build_model", "distributed_context", "evaluate", "train"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULT = "result.json"


@dataclass(frozen=True)
class Distributed(ProcessRole):
    """Where this process stands in a (possibly single-process) run.

    ``is_main`` tells whether this process writes files and shows progress, ``enabled``
    whether a process group with more than one process is in use.

    Attributes:
        rank: Global rank (0 without ``torchrun``).
        world_size: Number of processes (1 without ``torchrun``).
        device: The device this process trains on.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@contextmanager
def distributed_context(device: str = "auto") -> Iterator[Distributed]:
    """Join the process group that ``torchrun`` set up (if any) and leave it at the end.

    Under ``torchrun`` (``WORLD_SIZE > 1``) each process takes the CUDA device
    ``LOCAL_RANK`` (NCCL) or, without CUDA, trains on the CPU (Gloo).

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (ignored for the CUDA index
            under ``torchrun``).

    Yields:
        The :class:`Distributed` description of this process.
    """
    info = distributed_info()
    base = resolve_device(device, info)
    with process_group(info, base):
        yield Distributed(info.rank, info.world_size, base)


class _ProjectionTimer:
    """Accumulates the wall time of a module's forward calls (the projection's solve)."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.active = True
        self._start = 0.0
        self._handles = [
            module.register_forward_pre_hook(self._before),
            module.register_forward_hook(self._after),
        ]

    def _before(self, module: nn.Module, inputs: Any) -> None:
        if self.active:
            self._start = synced_clock(self.device)

    def _after(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.active:
            self.seconds += synced_clock(self.device) - self._start

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    workers: int,
    seed: int,
    epoch: int,
    dist_info: Distributed,
    drop_last: bool = False,
) -> DataLoader:
    """A loader whose order depends only on ``(seed, epoch)``, so that resuming repeats it."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "shuffle", epoch, dist_info.rank))
    sampler: Optional[torch.utils.data.Sampler] = None
    if dist_info.enabled:
        if shuffle:
            sampler = torch.utils.data.DistributedSampler(
                dataset, dist_info.world_size, dist_info.rank, shuffle=True, seed=seed,
                drop_last=drop_last,
            )
            sampler.set_epoch(epoch)
        else:  # evaluation: each process takes every world_size-th sample, none repeated
            sampler = list(range(dist_info.rank, len(dataset), dist_info.world_size))  # type: ignore[arg-type,assignment]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=dist_info.device.type == "cuda",
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    workers: int = 0,
    dist_info: Optional[Distributed] = None,
    progress: Optional[bool] = False,
) -> dict[str, Any]:
    """Top-1, top-5, mAP (on softmax probabilities) and mean loss over a dataset.

    Under ``torchrun`` each process evaluates its share and the scores are gathered, so every
    process returns the metrics of the whole dataset.

    Args:
        model: Maps ``(B, C, H, W)`` images to ``(B, K)`` logits.
        dataset: Items ``(image, label)``.
        batch_size: Images per forward pass.
        workers: Data-loading workers.
        dist_info: This process's place in the run (default: single CPU process).
        progress: Show a progress bar (``None``: only on a terminal).

    Returns:
        ``{"top1", "top5", "map", "map_authors", "loss", "count"}``: accuracies and mAPs
        in ``[0, 1]`` (``map`` over every class; ``map_authors`` the paper's definition,
        interpolated AP over the first six classes), the
        mean cross-entropy and the number of images evaluated.
    """
    dist_info = dist_info or Distributed()
    loader = _loader(
        dataset, batch_size, shuffle=False, workers=workers, seed=0, epoch=0,
        dist_info=dist_info,
    )
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for images, targets in progress_bar(loader, enabled=progress, total=len(loader), desc="eval"):
        images = images.to(dist_info.device, non_blocking=True)
        logits.append(model(images).float().cpu())
        labels.append(targets.cpu())
    model.train(was_training)
    all_logits = torch.cat(logits) if logits else torch.empty(0)
    all_labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    if dist_info.enabled:
        gathered: list[Any] = [None] * dist_info.world_size
        dist.all_gather_object(gathered, (all_logits, all_labels))
        all_logits = torch.cat([part[0] for part in gathered if part[0].numel()])
        all_labels = torch.cat([part[1] for part in gathered if part[1].numel()])
    accuracy = topk_accuracy(all_logits, all_labels, ks=(1, 5))
    probabilities = all_logits.softmax(dim=1)
    return {
        "top1": accuracy[1],
        "top5": accuracy[5],
        "map": mean_average_precision(probabilities, all_labels),
        "map_authors": authors_map(probabilities, all_labels),
        "loss": float(nn.functional.cross_entropy(all_logits, all_labels)),
        "count": all_labels.shape[0],
    }


def run_radius(config: ImageConfig, feature_dim: int) -> Optional[float]:
    """The projection radius of a run: ``config.radius``, else the scaled default.

    Returns:
        ``None`` without a projection, else the radius.
    """
    if config.projection == "none":
        return None
    if config.radius is not None:
        return config.radius
    return config.radius_scale * default_radius(config.projection, feature_dim)  # type: ignore[operator]


def build_model(config: ImageConfig, info: DatasetInfo) -> ResNet:
    """ResNet-18 for a configuration and dataset (seeded by ``config.seed``).

    Returns:
        A :class:`ResNet` mapping ``(B, info.in_channels, H, W)`` to ``(B, info.num_classes)``.
    """
    torch.manual_seed(derive_seed(config.seed, "init"))
    small = config.small_input if config.small_input is not None else info.small_input
    return resnet18(
        info.num_classes,
        width=config.width,
        in_channels=info.in_channels,
        small_input=small,
        projection=config.projection,
        radius=run_radius(config, 8 * config.width),
        masked=config.masked,
    )


def train(
    config: ImageConfig,
    out_dir: Union[str, os.PathLike[str]],
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    progress: Optional[bool] = None,
    dist_info: Optional[Distributed] = None,
    log: Any = print,
) -> dict[str, Any]:
    """Train and evaluate one configuration; write metrics, checkpoints and the result.

    Files in ``out_dir`` (written by rank 0 only): ``metrics.jsonl`` (one JSON object per
    epoch: losses, top-1, top-5, mAP, learning rate, times), ``checkpoint.pt`` (after every
    epoch: model, optimiser, schedule, timing so far and the configuration) and
    ``result.json`` (the final row of the table).

    Timing follows Table 6: per training image, the time waiting for data (including the copy
    to the device), the forward pass with the loss, and the backward pass with the optimiser
    step; the projection's own forward time is also measured. On CUDA the device is
    synchronised at each boundary.

    Args:
        config: The run.
        out_dir: Folder for the files.
        resume: Continue from ``out_dir/checkpoint.pt`` when there is one (a run with a
            ``result.json`` is returned as it is).
        overwrite: Delete a run found in ``out_dir`` and start afresh. Without it or
            ``resume``, a folder that holds a run (finished or not) is an error: a finished
            result is never deleted unless asked for.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (unused when ``dist_info``
            is given).
        progress: Progress bars (``None``: only on a terminal).
        dist_info: From :func:`distributed_context` under ``torchrun``.
        log: Called with one line of text per epoch (rank 0 only).

    Returns:
        The result: ``{"projection", "radius", "top1", "top5", "map", "val_loss",
        "train_loss", "data_us", "forward_us", "backward_us", "projection_us", "params",
        "epochs", "train_images", "val_images", "val_evaluated", "dataset", "device",
        "wall_s", "config"}``.

    The folder is locked while the run trains (``.lock``): a second process on the same
    folder stops with an error naming the first.

    Raises:
        ValueError: If the folder holds a run and neither ``resume`` nor ``overwrite`` is
            given, the checkpoint to resume was made with another configuration, a file of
            the run is damaged, another process holds the folder, the loss becomes NaN or
            infinite, or the batch size does not divide among the processes.
    """
    dist_info = dist_info or Distributed(0, 1, resolve_device(device))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; give a folder for the run")
    lock = run_lock(out) if dist_info.is_main else contextlib.nullcontext()
    try:
        with lock:
            return _train_locked(
                config, out, resume=resume, overwrite=overwrite, progress=progress,
                dist_info=dist_info, log=log,
            )
    finally:
        barrier()


def _train_locked(
    config: ImageConfig,
    out: Path,
    *,
    resume: bool,
    overwrite: bool,
    progress: Optional[bool],
    dist_info: Distributed,
    log: Any,
) -> dict[str, Any]:
    result_path, checkpoint_path = out / RESULT, out / CHECKPOINT
    found = [path.name for path in (result_path, checkpoint_path, out / METRICS) if path.exists()]
    if found and not resume:
        if not overwrite:
            raise ValueError(
                f"{out} already holds a run ({', '.join(found)}); pass --resume to continue "
                "it, --overwrite to delete it and train afresh, or give another --out"
            )
        barrier()  # every process has looked before the main one deletes
        if dist_info.is_main:
            for name in found:
                (out / name).unlink(missing_ok=True)
    config_dict = config.to_dict()
    checkpoint: Optional[dict[str, Any]] = None
    if resume and result_path.is_file():
        result = read_json(result_path)
        differences = config_differences(result.get("config", {}), config_dict)
        if not differences:
            return result
        if differences != [d for d in differences if d.startswith("epochs:")]:
            raise ValueError(
                f"{out} holds a finished run with another configuration ("
                + "; ".join(differences)
                + "); choose another output folder or pass --overwrite"
            )
        # Only the number of epochs changed: continue training from the checkpoint.
    if resume and checkpoint_path.is_file():
        checkpoint = load_checkpoint(checkpoint_path, map_location="cpu")
        # More epochs may be asked for on resuming; nothing else may change.
        differences = [
            d
            for d in config_differences(checkpoint["config"], config_dict)
            if not d.startswith("epochs:")
        ]
        if differences:
            raise ValueError(
                f"cannot resume {checkpoint_path}: it was made with another configuration ("
                + "; ".join(differences)
                + "); choose another output folder or pass --overwrite"
            )
        if checkpoint["epoch"] > config.epochs:
            raise ValueError(
                f"cannot resume {checkpoint_path}: it has trained {checkpoint['epoch']} epochs, "
                f"more than the {config.epochs} asked for"
            )
    if config.batch_size % dist_info.world_size:
        raise ValueError(
            f"batch_size {config.batch_size} does not divide among {dist_info.world_size} "
            "processes; pick a multiple of the number of processes"
        )
    local_batch = config.batch_size // dist_info.world_size

    train_set, val_set, info = load_dataset(
        config.dataset,
        config.data_root,
        image_size=config.image_size,
        train_subset=config.train_subset,
        val_subset=config.val_subset,
        seed=config.seed,
    )
    model = build_model(config, info).to(dist_info.device)
    if dist_info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its kernels
    radius = run_radius(config, model.feature_dim)
    params = sum(p.numel() for p in model.parameters())
    timer = (
        _ProjectionTimer(model.projection, dist_info.device)
        if config.projection != "none"
        else None
    )
    net: nn.Module = model
    if dist_info.enabled:
        if config.sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = wrap_ddp(net, dist_info.device)
    optimizer, scheduler = sgd_with_step_schedule(
        net.parameters(), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay, step_size=config.lr_step, gamma=config.lr_gamma,
    )
    totals = {"data": 0.0, "forward": 0.0, "backward": 0.0, "projection": 0.0, "images": 0}
    start_epoch, wall_before = 0, 0.0
    train_loss = math.nan
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        totals = checkpoint["totals"]
        start_epoch, wall_before = checkpoint["epoch"], checkpoint["wall_s"]
        train_loss = checkpoint["train_loss"]
        if dist_info.is_main:
            log(f"resuming {out} after epoch {start_epoch}")
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # A fresh run starts a fresh log; a resumed one drops the epochs logged after the
        # checkpoint was taken (an interrupted save).
        trim_jsonl(out / METRICS, start_epoch)
    device = dist_info.device
    started = time.perf_counter()
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, config.epochs):
        net.train()
        loader = _loader(
            train_set, local_batch, shuffle=True, workers=config.workers, seed=config.seed,
            epoch=epoch, dist_info=dist_info, drop_last=len(train_set) > config.batch_size,
        )
        projection_before = timer.seconds if timer else 0.0
        sums = train_epoch(
            net, loader, optimizer, device, total=len(loader),
            desc=f"{config.projection} {epoch + 1}/{config.epochs}",
            progress=progress if dist_info.is_main else False, what=str(out), epoch=epoch,
            hint="lower --lr, check --radius, or look for NaN or infinite values in the data",
        )
        projection = (timer.seconds if timer else 0.0) - projection_before
        if dist_info.enabled:
            projection = float(sum_over_processes(torch.tensor([projection]), device)[0])
        scheduler.step()
        totals["data"] += sums.data_s
        totals["forward"] += sums.forward_s
        totals["backward"] += sums.backward_s
        totals["projection"] += projection
        totals["images"] += int(sums.count)
        train_loss = sums.loss
        if timer:
            timer.active = False
        # The unwrapped model: DDP's forward is a collective, and the shards may differ by a batch.
        metrics = evaluate(
            model, val_set, batch_size=max(local_batch, 256), workers=config.workers,
            dist_info=dist_info, progress=progress if dist_info.is_main else False,
        )
        if timer:
            timer.active = True
        wall = wall_before + time.perf_counter() - started
        images_done = max(totals["images"], 1)
        record = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "train_top1": sums.top1,
            "val_loss": metrics["loss"],
            "top1": metrics["top1"],
            "top5": metrics["top5"],
            "map": metrics["map"],
            "map_authors": metrics["map_authors"],
            "data_us": 1e6 * totals["data"] / images_done,
            "forward_us": 1e6 * totals["forward"] / images_done,
            "backward_us": 1e6 * totals["backward"] / images_done,
            "projection_us": 1e6 * totals["projection"] / images_done,
            "wall_s": wall,
        }
        if dist_info.is_main:
            append_jsonl(out / METRICS, record)
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "totals": totals,
                "wall_s": wall,
                "train_loss": train_loss,
                "config": config_dict,
            }
            save_atomic(state, checkpoint_path)
            log(
                f"{config.projection:>11} epoch {epoch + 1:>3}/{config.epochs}: "
                f"loss {train_loss:.4f}  top-1 {100 * metrics['top1']:.2f}%  "
                f"top-5 {100 * metrics['top5']:.2f}%  mAP {100 * metrics['map']:.2f}  "
                f"authors' mAP {100 * metrics['map_authors']:.2f}  "
                f"({wall:.1f} s)"
            )
    if timer:
        timer.remove()
    if not metrics:  # resumed a checkpoint of the last epoch: evaluate it once more
        metrics = evaluate(
            model, val_set, batch_size=max(local_batch, 256), workers=config.workers,
            dist_info=dist_info,
        )
    images_done = max(totals["images"], 1)
    result = {
        "projection": config.projection,
        "radius": radius,
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "map": metrics["map"],
        "map_authors": metrics["map_authors"],
        "val_loss": metrics["loss"],
        "train_loss": train_loss,
        "data_us": 1e6 * totals["data"] / images_done,
        "forward_us": 1e6 * totals["forward"] / images_done,
        "backward_us": 1e6 * totals["backward"] / images_done,
        "projection_us": 1e6 * totals["projection"] / images_done,
        "params": params,
        "epochs": config.epochs,
        "train_images": len(train_set),  # type: ignore[arg-type]
        "val_images": len(val_set),  # type: ignore[arg-type]
        "val_evaluated": metrics["count"],
        "dataset": info.name,
        "device": str(device) + (f" x{dist_info.world_size}" if dist_info.enabled else ""),
        "wall_s": wall_before + time.perf_counter() - started,
        "config": config_dict,
    }
    if dist_info.is_main:
        write_json_atomic(result_path, result)
    barrier()
    return result
