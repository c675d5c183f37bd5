"""Command line: ``python -m declnet.apps.image {train,sweep,report} ...``.

Examples::

    python -m declnet.apps.image sweep --preset demo            # every projection, digits
    python -m declnet.apps.image train --projection l2_ball     # Fashion-MNIST
    torchrun --nproc_per_node 8 -m declnet.apps.image sweep --preset paper \\
        --data-root /data/imagenet --out runs/imagenet
    python -m declnet.apps.image report runs/image
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from .._common import add_device_arguments, cli_errors
from ._config import PRESETS, preset_config
from ._data import DATASETS
from ._model import PROJECTIONS


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``sweep``; unset ones keep the preset's value."""
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, help="default: fashion_mnist")
    data.add_argument(
        "--data-root",
        help="folder of the data (Fashion-MNIST: the IDX files, default the system location "
        "/usr/share/datasets/fashion-mnist; imagefolder: train/ and val/)",
    )
    data.add_argument("--train-subset", type=int, help="train on this many images")
    data.add_argument("--val-subset", type=int, help="evaluate on this many images")
    data.add_argument("--image-size", type=int, help="crop size for imagefolder (224)")
    data.add_argument("--workers", type=int, help="data-loading processes")
    model = parser.add_argument_group("model")
    model.add_argument("--width", type=int, help="channels of the first stage (64)")
    stem = model.add_mutually_exclusive_group()
    stem.add_argument(
        "--small-input", dest="small_input", action="store_true", default=None,
        help="3x3 stride-1 stem without max-pool (default for images under 64 pixels)",
    )
    stem.add_argument(
        "--imagenet-stem", dest="small_input", action="store_false",
        help="7x7 stride-2 stem with max-pool",
    )
    model.add_argument(
        "--radius", type=float,
        help="radius of the sphere/ball (default: the paper's 250, 15, 3 at d=512, scaled to d)",
    )
    model.add_argument(
        "--radius-scale", type=float,
        help="multiply the default radius by this factor (default 1)",
    )
    model.add_argument(
        "--masked", action="store_true", default=None,
        help="plateau-free gradient for the L1 and Linf projections",
    )
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int)
    optim.add_argument("--batch-size", type=int, help="global batch size")
    optim.add_argument("--lr", type=float, help="initial learning rate")
    optim.add_argument("--momentum", type=float)
    optim.add_argument("--weight-decay", type=float)
    optim.add_argument("--lr-step", type=int, help="decay the learning rate every N epochs")
    optim.add_argument("--lr-gamma", type=float, help="learning-rate decay factor")
    optim.add_argument("--seed", type=int)
    optim.add_argument("--sync-bn", action="store_true", default=None,
                       help="synchronised BatchNorm under torchrun")
    system = parser.add_argument_group("system")
    add_device_arguments(system)
    bars = system.add_mutually_exclusive_group()
    bars.add_argument("--progress", dest="progress", action="store_true", default=None,
                      help="always show progress bars (default: on a terminal)")
    bars.add_argument("--no-progress", dest="progress", action="store_false")


_CONFIG_FIELDS = (
    "dataset", "data_root", "train_subset", "val_subset", "image_size", "workers", "width",
    "small_input", "radius", "radius_scale", "masked", "epochs", "batch_size", "lr", "momentum",
    "weight_decay", "lr_step", "lr_gamma", "seed", "sync_bn",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m declnet.apps.image``."""
    parser = argparse.ArgumentParser(
        prog="python -m declnet.apps.image",
        description="ResNet-18 with an Lp-sphere or Lp-ball projection before the classifier "
        "(deep declarative networks, §7, Table 6).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train and evaluate one projection")
    train.add_argument("--projection", choices=PROJECTIONS, default="none")
    train.add_argument("--out", help="run folder (default runs/image/<projection>)")
    how = train.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    how.add_argument(
        "--overwrite", action="store_true",
        help="delete the run in --out (even a finished one) and train afresh",
    )
    _add_run_options(train)
    sweep = commands.add_parser("sweep", help="train every projection, then report")
    sweep.add_argument(
        "--projections", nargs="+", choices=PROJECTIONS, default=list(PROJECTIONS),
        metavar="NAME", help=f"projections to train (default: all of {', '.join(PROJECTIONS)})",
    )
    sweep.add_argument("--out", default="runs/image", help="sweep folder (default runs/image)")
    sweep.add_argument(
        "--fresh", action="store_true",
        help="retrain every projection instead of keeping finished runs and resuming others",
    )
    _add_run_options(sweep)
    report = commands.add_parser("report", help="write RUN_DIR/report.md and print it")
    report.add_argument("run_dir", help="a folder written by sweep")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    return cli_errors(lambda: _dispatch(args))


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "report":
        from ._sweep import write_report

        print(write_report(args.run_dir), end="")
        return 0

    from .._common import configure_threads
    from ._sweep import sweep
    from ._train import distributed_context, train

    overrides = {name: getattr(args, name) for name in _CONFIG_FIELDS}
    if args.command == "train":
        overrides["projection"] = args.projection
    config = preset_config(args.preset, **overrides)
    if args.command == "sweep" and config.radius is not None:
        norms = {name.split("_")[0] for name in args.projections if name != "none"}
        if len(norms) > 1:
            raise ValueError(
                "--radius gives one radius to projections of different norms "
                f"({', '.join(sorted(norms))}), whose scales differ (the paper uses 250, 15 "
                "and 3); sweep one norm at a time, or use --radius-scale"
            )
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    started = time.perf_counter()
    with distributed_context(args.device) as dist_info:
        # Several CPU processes on one machine share the cores instead of oversubscribing.
        cpu_processes = dist_info.enabled and dist_info.device.type == "cpu"
        configure_threads(args.threads, share_cores=cpu_processes)
        if args.command == "train":
            out = args.out or f"runs/image/{config.projection}"
            result = train(
                config, out, resume=args.resume, overwrite=args.overwrite,
                progress=args.progress, dist_info=dist_info,
            )
            if dist_info.is_main:
                from ._sweep import format_report

                print(format_report([result]), end="")
        else:
            sweep(
                config, args.projections, args.out, resume=not args.fresh,
                progress=args.progress, dist_info=dist_info,
            )
            if dist_info.is_main:
                from ._sweep import REPORT

                report = (Path(args.out) / REPORT).read_text()
                print(f"\n{report}", end="")
                print(f"wrote {args.out}/{REPORT} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
