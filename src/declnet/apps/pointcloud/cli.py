"""Command line: ``python -m declnet.apps.pointcloud {train,sweep,report,export} ...``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._common import add_device_arguments, cli_errors
from .config import PRESETS, RunConfig, SweepConfig, apply_preset
from .data import load_dataset
from .model import POOLS

__all__ = ["main"]

_RUN_FIELDS = (
    "dataset",
    "data_root",
    "cache_dir",
    "num_classes",
    "train_per_class",
    "test_per_class",
    "num_points",
    "width",
    "alpha",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "seed",
    "device",
    "threads",
)


def _run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and model (defaults come from --preset, then RunConfig)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="smoke | demo | paper")
    g.add_argument("--dataset", choices=["synthetic", "modelnet40_h5", "modelnet40_off"])
    g.add_argument("--data-root", help="folder of the real dataset (never downloaded)")
    g.add_argument(
        "--cache-dir", help="cache of sampled OFF meshes (default DATA_ROOT/.declnet_cache)"
    )
    g.add_argument("--num-classes", type=int, help="synthetic: use the first K classes (2-14)")
    g.add_argument("--train-per-class", type=int, help="synthetic: training objects per class")
    g.add_argument("--test-per-class", type=int, help="synthetic: test objects per class")
    g.add_argument("--num-points", type=int, help="points per cloud N")
    g.add_argument("--width", type=int, help="PointNet feature width (1024 in the paper)")
    g.add_argument("--alpha", type=float, help="robustness parameter of the penalties (default 1)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="clouds per step and process (default 24)")
    g.add_argument("--lr", type=float, help="initial learning rate (default 0.01)")
    g.add_argument("--momentum", type=float)
    g.add_argument("--seed", type=int)
    add_device_arguments(g)
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _rates(text: str) -> list[float]:
    try:
        return [float(t) for t in text.replace(",", " ").split()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected outlier rates like '0 0.5', got {text!r}"
        ) from err


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m declnet.apps.pointcloud",
        description="PointNet with max or robust pooling on point clouds with outliers "
        "(deep declarative networks, §7).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train and evaluate one model")
    _run_options(p)
    p.add_argument("--pool", choices=POOLS, default=None, help="global pooling (default max)")
    p.add_argument("--outlier-rate", type=float, help="outlier fraction in training and testing")
    p.add_argument(
        "--test-outlier-rates",
        type=_rates,
        help="evaluate the final model at these rates, e.g. '0 0.5' (default: the training rate)",
    )
    p.add_argument("--out", required=True, help="the run folder")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true", help="continue the run in --out")
    how.add_argument(
        "--overwrite", action="store_true", help="delete the run in --out and train afresh"
    )

    p = sub.add_parser("sweep", help="train a grid of pools × outlier rates, then report")
    _run_options(p)
    p.add_argument(
        "--pools",
        nargs="+",
        choices=POOLS,
        metavar="POOL",
        help=f"pooling choices (default: all six: {' '.join(POOLS)})",
    )
    p.add_argument(
        "--outlier-rates",
        nargs="+",
        type=float,
        metavar="RATE",
        help="outlier fractions, e.g. 0 0.1 0.5",
    )
    p.add_argument(
        "--train-clean",
        action="store_true",
        default=None,
        help="Table 4 protocol: train without outliers, test at every rate",
    )
    p.add_argument(
        "--same-rate",
        dest="train_clean",
        action="store_false",
        help="Table 3 protocol: the same rate in training and testing",
    )
    p.add_argument(
        "--out", default="runs/pointcloud", help="sweep folder (default runs/pointcloud)"
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    p = sub.add_parser("report", help="write tables and plots of a sweep folder")
    p.add_argument("run_dir", help="the sweep folder")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    p = sub.add_parser("export", help="write the synthetic dataset in the modelnet40 HDF5 layout")
    _run_options(p)
    p.add_argument("--out", required=True, help="output folder")
    return parser


def _run_config(options: dict[str, Any], **extra: Any) -> RunConfig:
    kwargs = {k: options[k] for k in _RUN_FIELDS if options.get(k) is not None}
    kwargs["progress"] = not options.get("no_progress", False)
    kwargs.update({k: v for k, v in extra.items() if v is not None})
    return RunConfig(**kwargs)


def _process_group(config: RunConfig) -> Any:
    """Be in ``torchrun``'s process group (if any) for the runs, and leave it afterwards."""
    from .._common import distributed_info, process_group, resolve_device

    info = distributed_info()
    return process_group(info, resolve_device(config.device, info))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    return cli_errors(lambda: _dispatch(args))


def _dispatch(args: argparse.Namespace) -> int:
    from .report import write_report

    if args.command == "report":
        print(write_report(args.run_dir, plots=not args.no_plots))
        return 0

    options = apply_preset(args.preset, vars(args))
    if args.command == "export":
        cfg = _run_config(options)
        from .data import export_h5

        if cfg.dataset != "synthetic":
            raise ValueError("export writes the synthetic dataset; drop --dataset")
        train, test = load_dataset(
            "synthetic",
            num_points=cfg.num_points,
            num_classes=cfg.num_classes,
            train_per_class=cfg.train_per_class,
            test_per_class=cfg.test_per_class,
            seed=cfg.seed,
        )
        for path in export_h5(train, test, args.out):
            print(path)
        return 0

    if args.command == "train":
        from .train import run_training

        rate = options.get("outlier_rate") or 0.0
        cfg = _run_config(
            options,
            pool=options.get("pool"),
            train_outlier_rate=rate,
            test_outlier_rates=options.get("test_outlier_rates") or [rate],
        )
        with _process_group(cfg):
            final = run_training(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
        if final is not None:
            for r in final["results"]:
                print(
                    f"outliers {100 * r['outlier_rate']:g}%: top-1 {100 * r['top1']:.2f}%  "
                    f"mAP {100 * r['map']:.2f}  authors' mAP {100 * r['map_authors']:.2f}"
                )
        return 0

    # sweep
    from .._common import distributed_info
    from .sweep import run_sweep

    sweep = SweepConfig(
        base=_run_config(options),
        pools=list(options.get("pools") or POOLS),
        outlier_rates=list(options.get("outlier_rates") or [0.0, 0.5]),
        train_clean=bool(options.get("train_clean") or False),
    )
    with _process_group(sweep.base):
        run_sweep(sweep, args.out)
    if distributed_info().is_main:
        text = write_report(args.out, plots=not args.no_plots)
        print(text)
        print(f"(tables in {Path(args.out) / 'results.md'}; plots next to it)")
    return 0
