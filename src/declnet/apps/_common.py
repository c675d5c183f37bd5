"""Infrastructure shared by the experiments: processes and devices, files of a run, progress.

Both experiments train under plain ``python`` or under ``torchrun`` (one process per device,
``DistributedDataParallel``), keep a run in a folder that can be resumed after an interruption
(an atomically replaced checkpoint, a ``metrics.jsonl`` log with one JSON line per epoch, JSON
results) and time the phases of a training step with the device synchronised. The pieces that
are the same in both live here; each experiment keeps its own seeding, data, model and files.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

__all__ = [
    "DistributedInfo",
    "ProcessRole",
    "RunLockedError",
    "add_device_arguments",
    "append_jsonl",
    "barrier",
    "cli_errors",
    "config_differences",
    "configure_threads",
    "distributed_info",
    "init_process_group",
    "load_checkpoint",
    "process_group",
    "progress_bar",
    "read_json",
    "read_jsonl",
    "resolve_device",
    "run_lock",
    "save_atomic",
    "sum_over_processes",
    "synced_clock",
    "synchronize",
    "trim_jsonl",
    "wrap_ddp",
    "write_json_atomic",
    "write_text_atomic",
]

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------
# Processes (torchrun) and devices


class ProcessRole:
    """What a process's ``rank`` and ``world_size`` say about its role.

    A base of the dataclasses that describe a process, which define the two fields.
    """

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


@dataclass(frozen=True)
class DistributedInfo(ProcessRole):
    """Rank and world size of this process (one process without ``torchrun``).

    Attributes:
        rank: Global rank.
        world_size: Number of processes.
        local_rank: Rank on this machine (selects the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError as err:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from err


def distributed_info() -> DistributedInfo:
    """Read rank and world size from the environment that ``torchrun`` sets.

    Returns:
        ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` when ``WORLD_SIZE > 1``, else the
        single-process default.

    Raises:
        ValueError: If one of these variables is not an integer.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistributedInfo()
    return DistributedInfo(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0))


def resolve_device(name: str, info: Optional[DistributedInfo] = None) -> torch.device:
    """The device of this process, made the current CUDA device when it is a GPU.

    ``"auto"`` picks CUDA when torch finds a device, else the CPU. A CUDA device gets a
    concrete index: under ``torchrun`` (``info.enabled``) each process takes GPU
    ``LOCAL_RANK`` whatever index was asked for, so that no two processes share a GPU;
    otherwise the index given, or 0.

    Args:
        name: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (any ``torch.device`` name).
        info: This process's place among the processes (default: a single process).

    Returns:
        The device.

    Raises:
        ValueError: If CUDA is asked for but torch finds no CUDA device, or the name is not a
            device.
    """
    info = info or DistributedInfo()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(
            f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N"
        ) from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} asked for CUDA, but torch finds no CUDA device")
        if info.enabled:
            device = torch.device("cuda", info.local_rank)
        elif device.index is None:
            device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    return device


def init_process_group(info: DistributedInfo, device: torch.device) -> bool:
    """Join the process group that ``torchrun`` set up: NCCL on CUDA, Gloo on the CPU.

    Args:
        info: This process's place (nothing happens for a single process).
        device: The device of this process (chooses the backend).

    Returns:
        Whether this call joined the group (False for a single process or when the group
        already exists); the caller that joined it may leave it again.
    """
    if not info.enabled or torch.distributed.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return True


@contextmanager
def process_group(info: DistributedInfo, device: torch.device) -> Iterator[None]:
    """Be in ``torchrun``'s process group for the ``with`` block, and leave it afterwards.

    A group that existed before is left as it is.

    Args:
        info: This process's place.
        device: The device of this process.
    """
    joined = init_process_group(info, device)
    try:
        yield
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def barrier() -> None:
    """Wait for every process of the group (nothing to wait for without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def sum_over_processes(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a tensor over the processes of the group (itself without a group).

    Args:
        values: Any tensor; it is sent through ``device`` (NCCL needs GPU tensors).
        device: The device of this process.

    Returns:
        The sum, on the device and with the dtype of ``values``.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    packed = values.to(device)
    if packed is values:
        packed = values.clone()
    torch.distributed.all_reduce(packed)
    return packed.to(values.device)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` on ``device`` (the group must exist).

    Args:
        model: The module, already on ``device``.
        device: A CUDA device (one GPU per process) or the CPU.

    Returns:
        The wrapped module.
    """
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def configure_threads(threads: Optional[int], *, share_cores: bool = False) -> None:
    """Set torch's CPU threads.

    Args:
        threads: Threads asked for; clamped to ``[1, os.cpu_count()]``. ``None`` leaves
            torch's default, unless ``share_cores``.
        share_cores: Several CPU processes share this machine (``torchrun`` on the CPU):
            without ``threads``, give each ``cpu_count // LOCAL_WORLD_SIZE`` threads instead
            of oversubscribing the cores.
    """
    cores = os.cpu_count() or 1
    if threads is not None:
        torch.set_num_threads(max(1, min(threads, cores)))
    elif share_cores:
        local = _env_int("LOCAL_WORLD_SIZE", _env_int("WORLD_SIZE", 1))
        torch.set_num_threads(max(1, cores // max(1, local)))


def synchronize(device: torch.device) -> None:
    """Wait for the queued work of a CUDA device (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced_clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device has finished its queued work.

    Differences of two readings time the work in between, also on a GPU, whose kernels run
    asynchronously.
    """
    synchronize(device)
    return time.perf_counter()


# --------------------------------------------------------------------------------------
# Files of a run


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A fresh temporary name next to ``path`` that replaces ``path`` when the block succeeds.

    The name is unique (``path.<random>.tmp``), so two processes writing the same file never
    write into each other's temporary file; the last rename wins.
    """
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(handle)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # the permissions of a file opened for writing
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save`` that never leaves a half-written file at ``path``.

    The object is written next to ``path`` and then renamed over it, so an interruption
    leaves the previous file (a checkpoint, typically) intact.

    Args:
        obj: What ``torch.save`` accepts.
        path: The file.
    """
    with _replacing(Path(path)) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Any:
    """Load a file written by :func:`save_atomic`, restricted to tensors and plain data.

    Args:
        path: The file.
        map_location: Where to put the tensors.

    Returns:
        The saved object.

    Raises:
        ValueError: If the file cannot be read as a checkpoint (truncated or corrupt); the
            message names the file and says how to go on.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # unpickling, zip and storage errors all mean a damaged file
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no details'}); it is truncated or "
            "corrupt: delete it to restart that run from scratch, or pass --overwrite"
        ) from err


def read_json(path: PathLike) -> Any:
    """The contents of a JSON file that a run wrote, with a clear error when it is damaged.

    Args:
        path: The file.

    Returns:
        The decoded data.

    Raises:
        ValueError: If the file is not valid JSON (truncated or edited by hand); the message
            names the file and says how to go on.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); it is truncated or corrupt: delete it (or the "
            "whole run folder) and run again, or pass --overwrite"
        ) from err


class RunLockedError(ValueError):
    """Another process holds the lock of a run folder."""


LOCK_FILE = ".lock"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(folder: PathLike) -> Iterator[Path]:
    """Hold ``folder/.lock`` for the ``with`` block, so only one process writes the run.

    The lock file names the process (host and pid). A lock left behind by a process that no
    longer runs on this host is taken over; one held by a live process, or by any process on
    another host, is an error.

    Args:
        folder: The run folder (created when missing).

    Yields:
        The lock file.

    Raises:
        RunLockedError: If another process holds the lock; the message names it.
        NotADirectoryError: If ``folder`` or a parent is a file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    for _ in range(3):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            stale = (
                holder.get("host") == me["host"]
                and isinstance(holder.get("pid"), int)
                and not _process_alive(holder["pid"])
            )
            if stale:
                path.unlink(missing_ok=True)
                continue
            if not holder:  # being written this instant, or damaged: look once more
                time.sleep(0.1)
                try:
                    holder = json.loads(path.read_text() or "{}")
                except (OSError, json.JSONDecodeError):
                    holder = {}
            raise RunLockedError(
                f"{folder} is in use by process {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} (lock file {path}); wait for it to finish or give "
                "another --out; if that process no longer runs, delete the lock file"
            ) from None
        with os.fdopen(handle, "w") as stream:
            json.dump(me, stream)
        break
    else:  # pragma: no cover - three processes racing for one stale lock
        raise RunLockedError(f"could not take the lock {path}; try again")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def write_json_atomic(path: PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON ending in a newline, replacing ``path`` atomically.

    Args:
        path: The file.
        data: JSON-serialisable data.

    Raises:
        TypeError: If ``data`` is not JSON-serialisable (``path`` is then left as it was).
    """
    text = json.dumps(data, indent=2) + "\n"
    with _replacing(Path(path)) as tmp:
        tmp.write_text(text)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path``, replacing it atomically (a report, typically).

    Args:
        path: The file.
        text: Its new contents.
    """
    with _replacing(Path(path)) as tmp:
        tmp.write_text(text)


def append_jsonl(path: PathLike, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (created if missing)."""
    line = json.dumps(dict(record)) + "\n"
    with open(path, "a") as handle:
        handle.write(line)


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a missing file has none.

    Raises:
        ValueError: If a line is not JSON (the message names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number} is not JSON: {err}") from err
    return records


def trim_jsonl(path: PathLike, last_epoch: int) -> None:
    """Keep the lines of a per-epoch log up to ``last_epoch``; drop the rest.

    On resuming from the checkpoint of epoch ``last_epoch`` the epochs logged after it (by a
    run interrupted between logging and saving) are dropped, so that the log holds every
    epoch once; so is a last line cut short by an interruption. ``last_epoch=0`` empties the
    log for a fresh run. The kept lines are not rewritten; the file is created when missing.

    Args:
        path: A JSON-lines file whose records have an ``"epoch"`` number.
        last_epoch: The last epoch to keep.

    Raises:
        ValueError: If a line other than the last is not JSON, or a record has no
            ``"epoch"``.
    """
    path = Path(path)
    kept = []
    if last_epoch > 0 and path.is_file():
        lines = path.read_text().splitlines()
        last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if number == last:
                    break  # an append cut short: it logged an epoch after the checkpoint
                raise ValueError(f"{path}: line {number} is not JSON: {line[:80]!r}") from err
            if not isinstance(record, dict) or "epoch" not in record:
                raise ValueError(f"{path}: line {number} has no epoch: {line[:80]!r}")
            if record["epoch"] <= last_epoch:
                kept.append(line + "\n")
    path.write_text("".join(kept))


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], *, ignore: Iterable[str] = ()
) -> list[str]:
    """Describe how a saved configuration differs from the current one.

    Args:
        saved: The configuration found in a run folder.
        current: The configuration asked for now.
        ignore: Keys whose values may differ (settings that do not change results).

    Returns:
        One ``"key: <saved> there, <current> now"`` line per differing key, sorted by key;
        empty when they agree.
    """
    skip = set(ignore)
    return [
        f"{key}: {saved.get(key)!r} there, {current.get(key)!r} now"
        for key in sorted((set(saved) | set(current)) - skip)
        if saved.get(key) != current.get(key)
    ]


# --------------------------------------------------------------------------------------
# Command line and progress


def _os_error_message(err: OSError) -> str:
    if err.filename is None and err.errno is None:
        return str(err)  # raised with a message of its own
    name = err.filename if err.filename is not None else "a file"
    reason = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        advice = "free some space, or give an --out on another disk, and run again with --resume"
    elif isinstance(err, (NotADirectoryError, FileExistsError)):
        advice = "a file stands where a folder is needed: give another --out"
    elif isinstance(err, PermissionError):
        advice = "give an --out you may write to"
    elif isinstance(err, IsADirectoryError):
        advice = "a folder stands where a file is needed: give the file's path"
    else:
        advice = "check the path and run again"
    return f"{name}: {reason}; {advice}"


def cli_errors(run: Any) -> int:
    """Call ``run()`` and turn the errors a user can fix into one line on stderr.

    ``ValueError`` (bad options, damaged files, a locked or finished run, a diverged loss),
    ``OSError`` (a full disk, a file where a folder belongs, missing permissions) and
    ``ImportError`` (a missing optional package) print ``error: ...`` and give exit status 2;
    a keyboard interrupt gives 130. Anything else is a bug and keeps its traceback.

    Args:
        run: A callable returning the exit status.

    Returns:
        The exit status.
    """
    try:
        return int(run())
    except KeyboardInterrupt:
        print("interrupted; run the same command with --resume to continue", file=sys.stderr)
        return 130
    except (ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {_os_error_message(err)}", file=sys.stderr)
        return 2


def add_device_arguments(parser: Any) -> None:
    """Add ``--device`` (default ``auto``) and ``--threads`` to a parser or argument group.

    The values go to :func:`resolve_device` and :func:`configure_threads`.

    Args:
        parser: An ``argparse.ArgumentParser`` or one of its argument groups.
    """
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto: CUDA if any)"
    )
    parser.add_argument("--threads", type=int, help="CPU threads for torch")


class _Silent:
    """An iterable with the progress-bar methods the training loops call, doing nothing."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self._iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self._iterable)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Ignore the values a bar would show."""


def progress_bar(iterable: Iterable[Any], *, total: int, desc: str, enabled: Optional[bool]) -> Any:
    """``iterable`` with a tqdm progress bar on stderr, when wanted and tqdm is installed.

    Args:
        iterable: What to iterate over.
        total: Its length, for the bar.
        desc: The bar's label.
        enabled: ``True`` always shows the bar, ``None`` only on a terminal, ``False`` never.

    Returns:
        An iterable over ``iterable`` with a ``set_postfix(**values)`` method (which does
        nothing without a bar). The bar disappears when the iteration ends.
    """
    if enabled is False:
        return _Silent(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the [apps] extra
        return _Silent(iterable)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        disable=None if enabled is None else False,
    )
