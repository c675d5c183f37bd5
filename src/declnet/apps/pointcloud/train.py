"""Training and evaluation of one run: SGD, per-epoch metrics, timings, checkpoints, DDP.

A run lives in its own folder::

    RUN/config.json      the configuration (RunConfig.to_dict())
    RUN/metrics.jsonl    one JSON line per epoch (loss, test top-1, mAP, timings)
    RUN/checkpoint.pt    model, optimiser and scheduler after the last finished epoch
    RUN/result.json      the final evaluation at every test outlier rate, written last

Every source of randomness is seeded from ``config.seed`` and, where it changes over time,
from the epoch number, so a run resumed from its checkpoint (``resume=True``) follows the
same trajectory as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._common import (
    DistributedInfo,
    append_jsonl,
    barrier,
    config_differences,
    configure_threads,
    distributed_info,
    init_process_group,
    load_checkpoint,
    read_json,
    read_jsonl,
    resolve_device,
    run_lock,
    save_atomic,
    trim_jsonl,
    wrap_ddp,
    write_json_atomic,
)
from .._loop import derive_seed, sgd_with_step_schedule, train_epoch
from .._metrics import authors_map, mean_average_precision, top1_accuracy
from .config import RunConfig
from .data import PointCloudSet, load_dataset
from .model import PointNet
from .outliers import inject_outliers

__all__ = ["DistributedInfo", "evaluate", "load_data", "run_training"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
RESULT_FILE = "result.json"


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
    """Evaluate a classifier: mean loss, top-1 accuracy and the two mAPs.

    Both mAPs rank the softmax probabilities: ``map`` is the standard mean over every class
    of the (uninterpolated) average precision, ``map_authors`` the quantity of the paper's
    tables (VOC-interpolated AP averaged over the first six classes only, as the authors'
    code computes it; see :func:`~declnet.apps._metrics.authors_map`).

    Args:
        model: Maps (B, N, 3) clouds to (B, K) logits.
        points: (n, N, 3) clouds.
        labels: (n,) classes.
        device: Where to run.
        batch_size: Clouds per forward pass.

    Returns:
        ``{"loss": ..., "top1": ..., "map": ..., "map_authors": ...}`` (accuracy and mAPs
        in [0, 1]).
    """
    was_training = model.training
    model.eval()
    logits = []
    for start in range(0, len(points), batch_size):
        logits.append(model(points[start : start + batch_size].to(device)).float().cpu())
    model.train(was_training)
    scores = torch.cat(logits)
    probabilities = scores.softmax(dim=1)
    return {
        "loss": float(F.cross_entropy(scores, labels)),
        "top1": top1_accuracy(scores, labels),
        "map": mean_average_precision(probabilities, labels),
        "map_authors": authors_map(probabilities, labels),
    }


# --------------------------------------------------------------------------------------
# Training


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


def _evaluate_at(
    model: nn.Module,
    test_set: PointCloudSet,
    rates: list[float],
    config: RunConfig,
    device: torch.device,
) -> list[dict[str, Any]]:
    results = []
    for rate in rates:
        points = corrupted(test_set.points, rate, config.seed, "test")
        results.append({"outlier_rate": rate, **evaluate(model, points, test_set.labels, device)})
    return results


def _clear_run(run_dir: Path) -> None:
    """Delete the files of a run (``--overwrite``), leaving anything else in the folder."""
    for file in (RESULT_FILE, CHECKPOINT_FILE, METRICS_FILE, CONFIG_FILE):
        (run_dir / file).unlink(missing_ok=True)


def run_training(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    data: tuple[PointCloudSet, PointCloudSet] | None = None,
    name: str | None = None,
    stop_after_epochs: int | None = None,
) -> dict[str, Any] | None:
    """Train and evaluate one PointNet, writing the run folder described in the module docs.

    The folder is locked while the run trains (``RUN/.lock``): a second process on the same
    folder stops with an error naming the first.

    Args:
        config: The run configuration.
        run_dir: The run's folder (created).
        resume: Continue from ``run_dir/checkpoint.pt`` if it exists (a finished run just
            returns its results, evaluated at any test outlier rate it lacks).
        overwrite: Delete a run found in the folder and start afresh. Without it or
            ``resume``, a folder that already holds a run is an error.
        data: Clean ``(train, test)`` sets, to share one loaded dataset between runs
            (default: load what ``config`` describes).
        name: Name shown in progress output (default: the folder name).
        stop_after_epochs: Stop after this many epochs in total, as if interrupted (for
            testing ``resume``); the run then has no ``result.json``.

    Returns:
        The contents of ``result.json``, or None when stopped early.

    Raises:
        ValueError: If the folder holds a different or unfinished run and neither ``resume``
            nor ``overwrite`` is set, the configuration differs from the saved one, a file of
            the run is damaged, another process holds the folder, or the loss becomes NaN.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is a file, not a folder; give a folder for the run")
    name = name or run_dir.name
    info = distributed_info()
    device = resolve_device(config.device, info)
    init_process_group(info, device)
    # Several CPU processes on one machine share the cores instead of oversubscribing them.
    configure_threads(config.threads, share_cores=info.enabled and device.type == "cpu")
    lock = run_lock(run_dir) if info.is_main else contextlib.nullcontext()
    try:
        with lock:
            return _run_locked(
                config,
                run_dir,
                info,
                device,
                resume=resume,
                overwrite=overwrite,
                data=data,
                name=name,
                stop_after_epochs=stop_after_epochs,
            )
    finally:
        barrier()


def _run_locked(
    config: RunConfig,
    run_dir: Path,
    info: DistributedInfo,
    device: torch.device,
    *,
    resume: bool,
    overwrite: bool,
    data: tuple[PointCloudSet, PointCloudSet] | None,
    name: str,
    stop_after_epochs: int | None,
) -> dict[str, Any] | None:
    final_path = run_dir / RESULT_FILE
    ckpt_path = run_dir / CHECKPOINT_FILE
    config_path = run_dir / CONFIG_FILE
    if overwrite and info.is_main:
        _clear_run(run_dir)
    barrier()
    saved_rates: list[float] = []
    if config_path.is_file():
        try:
            saved = RunConfig.from_dict(read_json(config_path))
        except TypeError as err:
            raise ValueError(f"{config_path} is not a run configuration ({err})") from err
        # The test rates only choose the final evaluations: a finished run is evaluated at
        # the rates it lacks from its checkpoint (Table 4 from Table 3's clean models).
        differences = config_differences(
            saved.result_fields(), config.result_fields(), ignore=("test_outlier_rates",)
        )
        if differences:
            raise ValueError(
                f"{run_dir} holds a run with another configuration ("
                + "; ".join(differences)
                + "); choose another output folder, or pass --overwrite to replace it"
            )
        if not resume:
            raise ValueError(
                f"{run_dir} already holds a run; pass --resume to continue it or --overwrite "
                "to replace it"
            )
        saved_rates = list(saved.test_outlier_rates)
    if resume and final_path.is_file():
        final = read_json(final_path)
        missing = [
            r
            for r in config.test_outlier_rates
            if r not in {float(x["outlier_rate"]) for x in final.get("results", [])}
        ]
        if not missing:
            return final
    else:
        final = None
    barrier()  # every process has checked the folder before the main one writes to it

    train_set, test_set = data if data is not None else load_data(config)
    torch.manual_seed(derive_seed(config.seed, "init"))
    model: nn.Module = PointNet(train_set.num_classes, config.pool, config.alpha, config.width)
    if info.enabled and device.type == "cuda":
        # BatchNorm statistics over the whole batch of all processes, as on one device.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)

    if final is not None:  # finished: evaluate the saved model at the new rates only
        state = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(state["model"])
        have = {float(r["outlier_rate"]): r for r in final["results"]}
        rates = sorted(set(have) | set(config.test_outlier_rates))
        new = _evaluate_at(model, test_set, [r for r in rates if r not in have], config, device)
        have.update({r["outlier_rate"]: r for r in new})
        final["results"] = [have[r] for r in rates]
        final["protocol"] = protocol(dataclasses.replace(config, test_outlier_rates=rates))
        if info.is_main:
            write_json_atomic(config_path, {**config.to_dict(), "test_outlier_rates": rates})
            write_json_atomic(final_path, final)
        return final

    train_points = corrupted(train_set.points, config.train_outlier_rate, config.seed, "train")
    test_points = corrupted(test_set.points, config.train_outlier_rate, config.seed, "test")
    optimizer, scheduler = sgd_with_step_schedule(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        step_size=config.epochs // 3,
        gamma=0.5,
    )
    start_epoch = 0
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, map_location=device)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch = int(state["epoch"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise ValueError(
                f"{ckpt_path} does not fit this run ({type(err).__name__}: {err}); delete it "
                "or pass --overwrite"
            ) from err
    rates_now = sorted(set(saved_rates) | set(config.test_outlier_rates))
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(config_path, {**config.to_dict(), "test_outlier_rates": rates_now})
        # Drop metrics of epochs after the checkpoint (written just before an interruption).
        trim_jsonl(run_dir / METRICS_FILE, start_epoch)
    barrier()

    train_model: nn.Module = model
    if info.enabled:
        train_model = wrap_ddp(model, device)
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
        lr = optimizer.param_groups[0]["lr"]
        batches = (
            (train_points[idx], train_set.labels[idx])
            for idx in _batches(len(train_points), config.batch_size, config.seed, epoch, info)
        )
        sums = train_epoch(
            train_model,
            batches,
            optimizer,
            device,
            total=steps,
            desc=f"{name} {epoch + 1}/{config.epochs}",
            progress=show,
            what=str(run_dir),
            epoch=epoch,
        )
        scheduler.step()
        test = evaluate(model, test_points, test_set.labels, device)
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": sums.loss,
            "train_top1": sums.top1,
            "test_outlier_rate": config.train_outlier_rate,
            "test_loss": test["loss"],
            "test_top1": test["top1"],
            "test_map": test["map"],
            "test_map_authors": test["map_authors"],
            # Per point cloud, in milliseconds (summed over processes, divided by all clouds).
            "time_data_ms": sums.data_s / sums.count * 1e3,
            "time_forward_ms": sums.forward_s / sums.count * 1e3,
            "time_backward_ms": sums.backward_s / sums.count * 1e3,
            "epoch_seconds": time.perf_counter() - t_epoch,
        }
        if info.is_main:
            append_jsonl(run_dir / METRICS_FILE, record)
            save_atomic(
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "config": config.to_dict(),
                },
                ckpt_path,
            )
        barrier()
    if last_epoch < config.epochs:
        return None

    results = _evaluate_at(model, test_set, rates_now, config, device)
    metrics = read_jsonl(run_dir / METRICS_FILE) if info.is_main else []
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
        "protocol": protocol(dataclasses.replace(config, test_outlier_rates=rates_now)),
        "epochs": config.epochs,
        "device": str(device),
        "world_size": info.world_size,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "results": results,
        "timing_ms_per_cloud": timing,
    }
    if info.is_main:
        write_json_atomic(final_path, final)
    return final
